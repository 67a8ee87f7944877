"""Rudder's vLLM engine against plain vLLM, inside one process, on the same requests.

    .venv/bin/python bench/vllm_backend.py [--streams 32] [--tokens 64] [--rounds 3] [--reference]

The engine-level view (`bench/vllm_vs_vllm_serve.py` is the view through the servers):
plain vLLM is vLLM's own `AsyncLLM` built from the same engine arguments as Rudder's engine,
without Rudder's worker (no op at any site), with its default compilation. Both engines run at
once and are measured in turn, round by round (each round starts at another row, after a pause
of PAUSE_S so the engine measured before has gone idle); each gets both cores when it runs
(VLLM_CPU_OMP_THREADS_BIND=0-1, VLLM_CPU_NUM_OF_RESERVED_CPU=0). Default model, float32,
`--streams` chat streams of `--tokens` new tokens, greedy, EOS ignored. Rows:
  plain vLLM                 no steering, no Rudder
  steered (ReLU)             every request clamps one feature of a standard (ReLU) SAE of the
                             default SAE's shape (576 x 4,608, random weights): the cheap edit,
                             one encoder column and one decoder row per edited feature
  steered + readout (ReLU)   the same plus a top-16 readout of that SAE on every generated token
  steered (TopK)             the same clamp on the default TopK SAE, whose feature values depend
                             on each other, so every steered row encodes the whole dictionary
  steered + readout (TopK)   the same plus a top-16 readout
  guard (ReLU)               every request carries a guard on a feature of the ReLU SAE (a
                             threshold it never reaches): the cost of watching a feature
  steered + guard (ReLU)     the ReLU clamp and that guard: against "steered (ReLU)"
Both SAEs sit at blocks.15.hook_resid_post. `--reference` adds the reference backend (after
vLLM has stopped, 2 torch threads) for the same rows. Prints the best of `--rounds` per row,
its spread (best minus worst), the ratio to plain vLLM, and the median over rounds of its ratio
to its base row in the same round (a guard against the same row without it, a readout against
its steered row): a paired figure, steadier than best against best on a noisy machine.
"op ms/step (share)": the op's own time inside vLLM's worker while the row ran (the worker times
its op body every step and sends it with the step's record): the median step, and the share of
the run's wall time all steps' op time took (medians over rounds). Unlike tokens/s, it does not
swing with the machine's speed from round to round.
Then, after the engines stop, "host ms/step": what the worker does per forward step for each
row's 32 requests outside the model (the op at the site, routing the readouts to the requests,
deciding their gates), timed in this process on the same SAEs (2 torch threads), on the default
model's own activations at the site (`decode_rows`). Writes bench/results/vllm_backend.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
import uuid
from pathlib import Path

os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")

import torch  # noqa: E402
from paired import paired  # noqa: E402  (bench/ is on sys.path)
from reference_backend import run as tokens_per_second  # noqa: E402

from rudder.core.default_model import default_sae_dirs, ensure_default_model  # noqa: E402
from rudder.core.sae import SAE, SAEConfig  # noqa: E402
from rudder.core.steering import FeatureEdit, Gate, Op, ReadoutSpec, SteeringSpec  # noqa: E402
from rudder.server.app import freeze_startup_heap  # noqa: E402
from rudder.server.backends.base import HfTokenizing  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SITE = "blocks.15.hook_resid_post"
PAUSE_S = 3.0
FEATURE, VALUE = 221, 6.0


class PlainVllm(HfTokenizing):
    """vLLM itself: an `AsyncLLM` built from the same engine arguments as Rudder's, without Rudder's
    worker (so no op at any site), driven with the same requests."""

    name = "plain vLLM"

    def __init__(self, model: Path, **kwargs):
        from rudder.server.backends.vllm import VllmEngine

        rudder = VllmEngine(model, **kwargs)  # only for its engine arguments and tokenizer
        self.args, self.tokenizer = rudder.args, rudder.tokenizer
        self.args.worker_cls, self.args.additional_config = "auto", {}
        self.llm = None

    async def start(self):
        from vllm.v1.engine.async_llm import AsyncLLM

        if self.llm is None:
            self.llm = AsyncLLM.from_engine_args(self.args)

    async def stop(self):
        self.llm.shutdown()
        self.llm = None

    async def generate(self, request):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(max_tokens=request.sampling.max_tokens, temperature=0, ignore_eos=True,
                                detokenize=False, output_kind=RequestOutputKind.DELTA)
        async for out in self.llm.generate({"prompt_token_ids": request.prompt_ids}, params,
                                           request_id=uuid.uuid4().hex):
            for _ in out.outputs[0].token_ids:
                yield _Token()


class _Token:
    is_prompt = False


def sae_specs(tmp: Path) -> list[str]:
    """`topk=` the default SAE at SITE (a random TopK one of its shape if it is not built) and
    `relu=` a random standard SAE of the same shape."""
    specs = []
    for arch, name in (("topk", "topk"), ("standard", "relu")):
        found = [p for p in default_sae_dirs() if arch == "topk"
                 and json.loads((p / "cfg.json").read_text())["metadata"]["hook_name"] == SITE]
        if found:
            specs.append(f"{name}={found[0]}")
            continue
        sae = SAE(SAEConfig(d_in=576, d_sae=4608, hook_name=SITE, architecture=arch,
                            **({"k": 32} if arch == "topk" else {})))
        torch.nn.init.normal_(sae.W_enc, std=0.04)
        torch.nn.init.normal_(sae.W_dec, std=0.04)
        specs.append(f"{name}={sae.save(tmp / f'random-{name}')}")
    return specs


def _mode(sae: str, readout: bool) -> SteeringSpec:
    return SteeringSpec(features=(FeatureEdit(sae, FEATURE, Op.CLAMP, VALUE),),
                        readouts=ReadoutSpec(saes=(sae,), top_k=16) if readout else ReadoutSpec())


NEVER = Gate("relu", FEATURE + 1, 1e4)  # a guard that watches a feature and never fires

MODES = {
    "plain": SteeringSpec(),
    "steered (ReLU)": _mode("relu", False),
    "steered + readout (ReLU)": _mode("relu", True),
    "steered (TopK)": _mode("topk", False),
    "steered + readout (TopK)": _mode("topk", True),
    "guard (ReLU)": SteeringSpec(guards=(NEVER,)),
    "steered + guard (ReLU)": SteeringSpec(features=_mode("relu", False).features, guards=(NEVER,)),
}


BASE = {"steered + readout (ReLU)": "steered (ReLU)", "steered + readout (TopK)": "steered (TopK)",
        "steered + guard (ReLU)": "steered (ReLU)"}  # else plain


def paired_to_base(runs: dict[str, list[float]], mode: str) -> float:
    """Median over rounds of `mode`'s tokens/s over its base row's in the same round."""
    return paired(runs[mode], runs[BASE.get(mode, "plain")])["median"]


def _host_step(spec: SteeringSpec, tables, spans, gates, positions: torch.Tensor, x: torch.Tensor,
               artifacts) -> None:
    """One step's worker work outside the model, as `vllm_worker._Steerer` does it."""
    from rudder.server.backends.step import StepRecorder, row_index

    if not spec.active:  # the worker skips a step no request steers or reads
        return
    rec = StepRecorder(tables, row_index(positions, spans, "cpu"), [spec] * len(spans))
    rec.steer(SITE, x, artifacts)
    rec.routed()
    at = rec.host_rows[1]
    for span, gate in zip(spans, gates):
        for row in span.reported_rows():
            gate.observe(at[row], rec.gate_values(row))


def decode_rows(streams: int) -> torch.Tensor:
    """What the site sees in decode steps of the bench's requests: the default model's residual
    stream after block 15 at the first generated positions of each chat prompt (greedy,
    computed in bfloat16, as vLLM runs the model on this CPU), `(streams, 576)` float32, distinct
    rows. Host-step timings run on these rows, not on random ones: how many candidates the SAE
    screen needs depends on real activations."""
    from reference_backend import PROMPTS
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = ensure_default_model(download=False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    per_prompt = -(-streams // len(PROMPTS))
    rows: list[torch.Tensor] = []
    with torch.inference_mode():
        for prompt in PROMPTS:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)["input_ids"]
            seq = model.generate(ids, max_new_tokens=per_prompt, do_sample=False, pad_token_id=tokenizer.eos_token_id)
            hidden = model(seq, output_hidden_states=True).hidden_states[16][0]  # after block 15 (0: the embedding)
            rows.extend(hidden[ids.shape[1] - 1:seq.shape[1] - 1].float())  # the rows that chose generated tokens
    return torch.stack(rows[:streams])


def host_ms_per_step(specs: list[str], streams: int, repeat: int = 300) -> dict[str, float]:
    """Per row: the worker's work outside the model for one decode step of `streams` requests
    (`StepRecorder.steer` at the site, `routed`, `GateState.observe` per row), on the bench's SAEs;
    best of 3 timings of `repeat` steps, in ms."""
    from rudder.core.steering import SiteArtifacts, build_tables
    from rudder.server.backends.step import GateState, Span

    torch.set_num_threads(2)
    saes = {spec.split("=", 1)[0]: SAE.load(spec.split("=", 1)[1]).requires_grad_(False) for spec in specs}
    artifacts = SiteArtifacts(saes=saes)
    x, positions = decode_rows(streams), torch.arange(streams) + 40
    out = {}
    for mode, spec in MODES.items():
        args = (spec, build_tables([spec] * streams, [20] * streams, "cpu", saes),
                [Span(i, i, i + 1, 40, 20, spec) for i in range(streams)],
                [GateState(spec, 20) for _ in range(streams)] if GateState.needed(spec) else [],
                positions, x, artifacts)
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(repeat):
                _host_step(*args)
            best = min(best, (time.perf_counter() - t0) / repeat * 1e3)
        out[mode] = round(best, 3)
    return out


async def measure(plain, rudder, streams: int, tokens: int,
                  rounds: int) -> tuple[dict[str, list[float]], dict[str, list[list[float]]]]:
    """Tokens/s per row and round; and per Rudder row and round, the op's time in each forward step
    inside vLLM's worker (`StepRecord.hook_s`: every site's op body, as the worker timed it)."""
    rows = [(plain, "plain"), *((rudder, m) for m in MODES if m != "plain")]
    for engine in (plain, rudder):
        await engine.start()
        await tokens_per_second(engine, 4, 8, MODES["steered + readout (TopK)" if engine is rudder else "plain"])
    freeze_startup_heap()  # as `rudder serve` and `vllm serve` do once up: no full collection of the start-up heap
    runs: dict[str, list[float]] = {m: [] for _, m in rows}
    hooks: dict[str, list[list[float]]] = {m: [] for _, m in rows}
    for r in range(rounds):
        for engine, mode in rows[r % len(rows):] + rows[:r % len(rows)]:  # each round starts elsewhere
            await asyncio.sleep(PAUSE_S)  # the engine measured before goes idle first
            steps: list[float] = []
            rudder.on_hook_step = steps.append
            tps = await tokens_per_second(engine, streams, tokens, MODES[mode])
            runs[mode].append(tps)
            hooks[mode].append(steps)
            print(f"round {r}: {mode:<26} {tps:7.1f} tok/s, op {1e3 * sum(steps):6.1f} ms in {len(steps)} steps",
                  flush=True)
    rudder.on_hook_step = None
    for engine in (plain, rudder):
        await engine.stop()
    return runs, hooks


def op_in_engine(steps: list[list[float]], runs: list[float], streams: int, tokens: int) -> dict[str, float]:
    """The op's time inside vLLM's worker for one row: the median over rounds of its median step (ms)
    and of its share of the run's wall time (every step's op time over the run's seconds)."""
    if not any(steps):
        return {"ms_per_step": 0.0, "share": 0.0}
    median = statistics.median
    return {"ms_per_step": round(1e3 * median(median(s) for s in steps if s), 3),
            "share": round(median(sum(s) * tps / (streams * tokens) for s, tps in zip(steps, runs)), 4)}


async def measure_reference(engine, streams: int, tokens: int, rounds: int) -> dict[str, list[float]]:
    runs: dict[str, list[float]] = {m: [] for m in MODES}
    await engine.start()
    for _ in range(rounds):
        for mode in MODES:
            runs[mode].append(await tokens_per_second(engine, streams, tokens, MODES[mode]))
            print(f"reference: {mode:<26} {runs[mode][-1]:7.1f} tok/s", flush=True)
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reference", action="store_true", help="also measure the reference backend")
    ap.add_argument("--out", default=str(ROOT / "bench/results/vllm_backend.json"))
    args = ap.parse_args()
    from rudder.server.backends.reference import ReferenceEngine
    from rudder.server.backends.vllm import VllmEngine

    model = ensure_default_model(download=False)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        specs = sae_specs(Path(tmp))
        runs, hooks = asyncio.run(measure(PlainVllm(model, max_num_seqs=64), VllmEngine(model, specs, max_num_seqs=64),
                                          args.streams, args.tokens, args.rounds))
        reference = None
        if args.reference:
            torch.set_num_threads(2)
            reference = asyncio.run(measure_reference(ReferenceEngine(model, specs, max_batch=64),
                                                      args.streams, args.tokens, args.rounds))
        host = host_ms_per_step(specs, args.streams)

    base = max(runs["plain"])
    step_ms = 1e3 * args.streams / base  # a plain decode step of all the streams
    rows = [{"mode": m, "best_tok_s": round(max(v), 1), "spread": round(max(v) - min(v), 1),
             "vs_plain_vllm": round(max(v) / base, 3), "base": BASE.get(m, "plain"),
             "vs_base_paired": paired_to_base(runs, m), "vs_plain_paired": paired(v, runs["plain"]),
             "host_ms_per_step": host[m], "op_in_engine": op_in_engine(hooks[m], v, args.streams, args.tokens),
             **({"reference_tok_s": round(max(reference[m]), 1)} if reference else {})} for m, v in runs.items()]
    print(f"\n{args.streams} chat streams x {args.tokens} tokens, float32, greedy, EOS ignored; vLLM on cores 0-1 "
          f"({os.cpu_count()} cores), best of {args.rounds} interleaved rounds")
    header = (f"{'mode':<26} {'tok/s':>8} {'spread':>7} {'x plain vLLM':>13} {'x plain, paired (min-max)':>26} "
              f"{'x base, paired':>15} {'host ms/step':>13} {'op ms/step (share)':>19}")
    print(header + (f" {'reference':>10}" if reference else ""))
    for row in rows:
        p = row["vs_plain_paired"]
        print(f"{row['mode']:<26} {row['best_tok_s']:8.1f} {row['spread']:7.1f} {row['vs_plain_vllm']:13.3f} "
              f"{p['median']:>9.3f} ({p['min']:.3f}-{p['max']:.3f}) "
              f"{row['vs_base_paired']:15.3f} {row['host_ms_per_step']:13.3f} "
              f"{row['op_in_engine']['ms_per_step']:10.2f} ({100 * row['op_in_engine']['share']:.1f}%)"
              + (f" {row['reference_tok_s']:10.1f}" if reference else ""))
    print("targets: steered >= 0.97x plain vLLM, steered + readout >= 0.95x (paired), a guard <= 2% (steered + "
          "guard against steered)")
    Path(args.out).write_text(json.dumps({
        "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "vllm_cores": os.environ["VLLM_CPU_OMP_THREADS_BIND"], "dtype": "float32", "streams": args.streams,
        "tokens": args.tokens, "rounds": args.rounds, "saes": specs, "site": SITE, "runs": runs, "rows": rows,
        "reference": reference, "plain_step_ms": round(step_ms, 1), "wall_s": round(time.time() - t0),
    }, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
