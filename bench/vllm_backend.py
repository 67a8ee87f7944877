"""vLLM backend throughput beside the reference backend, on the same requests.

    .venv/bin/python bench/vllm_backend.py [--tokens 64] [--repeats 2]

Default model, greedy, ignore EOS, `--tokens` new tokens per stream, 16 and 32
concurrent streams, chat prompts. Modes:
  plain              no steering (vLLM: plain vLLM, `AsyncLLM` with its default compilation
                     and no Rudder in it, on the same engine settings)
  steered            every request clamps one feature of the SAE at blocks.15.hook_resid_post
  steered+readout    the same, plus a top-16 readout of that SAE on every generated token
The SAE is the default trained one (576x4608) if present, else a random one of that shape.

Cores: vLLM gets both (VLLM_CPU_OMP_THREADS_BIND=0-1, VLLM_CPU_NUM_OF_RESERVED_CPU=0);
the reference backend runs after vLLM has stopped, with 2 torch threads. Each
measurement is the best of `--repeats`, runs interleaved by mode (runs vary ~3%).
Prints a table and writes bench/results/vllm_backend.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
from pathlib import Path

os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")

import torch  # noqa: E402
from reference_backend import run as tokens_per_second  # noqa: E402  (bench/ is on sys.path)

from rudder.core.default_model import default_sae_dirs, ensure_default_model  # noqa: E402
from rudder.core.sae import SAE, SAEConfig  # noqa: E402
from rudder.core.steering import FeatureEdit, Op, ReadoutSpec, SteeringSpec  # noqa: E402
from rudder.server.backends.base import HfTokenizing  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SITE = "blocks.15.hook_resid_post"
STREAMS = (16, 32)


class PlainVllm(HfTokenizing):
    """vLLM itself: an `AsyncLLM` built from the same engine arguments as Rudder's, without Rudder's
    worker (so no op at any site), driven with the same requests."""

    name = "vllm"

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
        import uuid

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


def sae_spec(tmp: Path) -> str:
    for p in default_sae_dirs():
        if json.loads((p / "cfg.json").read_text())["metadata"]["hook_name"] == SITE:
            return f"sae={p}"
    sae = SAE(SAEConfig(d_in=576, d_sae=4608, hook_name=SITE))
    torch.nn.init.normal_(sae.W_enc, std=0.04)
    torch.nn.init.normal_(sae.W_dec, std=0.04)
    return f"sae={sae.save(tmp / 'random-sae')}"


MODES = {
    "plain": SteeringSpec(),
    "steered": SteeringSpec(features=(FeatureEdit("sae", 221, Op.CLAMP, 6.0),)),
    "steered+readout": SteeringSpec(features=(FeatureEdit("sae", 221, Op.CLAMP, 6.0),),
                                    readouts=ReadoutSpec(saes=("sae",), top_k=16)),
}


async def measure(engine, modes: list[str], tokens: int, repeats: int) -> dict[str, dict[int, float]]:
    await engine.start()
    await tokens_per_second(engine, 4, 8, MODES[modes[-1]])  # warm-up
    best: dict[str, dict[int, float]] = {m: {} for m in modes}
    for streams in STREAMS:
        for _ in range(repeats):
            for m in modes:
                tps = await tokens_per_second(engine, streams, tokens, MODES[m])
                best[m][streams] = max(best[m].get(streams, 0.0), tps)
                print(f"  {engine.name:<9} {m:<16} {streams:>2} streams: {tps:7.1f} tok/s", flush=True)
    await engine.stop()
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench/results/vllm_backend.json"))
    args = ap.parse_args()
    from rudder.server.backends.reference import ReferenceEngine
    from rudder.server.backends.vllm import VllmEngine

    model = ensure_default_model(download=False)
    with tempfile.TemporaryDirectory() as tmp:
        spec = sae_spec(Path(tmp))
        results = {"vllm": {}, "reference": {}}
        results["vllm"].update(asyncio.run(measure(PlainVllm(model, max_num_seqs=64), ["plain"],
                                                   args.tokens, args.repeats)))
        steered = asyncio.run(measure(VllmEngine(model, [spec], max_num_seqs=64),
                                      ["steered", "steered+readout"], args.tokens, args.repeats))
        results["vllm"].update(steered)
        torch.set_num_threads(2)
        results["reference"] = asyncio.run(measure(ReferenceEngine(model, [spec], max_batch=64), list(MODES),
                                                   args.tokens, args.repeats))

    v, r = results["vllm"], results["reference"]
    print(f"\ntokens/s, {args.tokens} new tokens per stream, greedy; vLLM on cores 0-1, reference 2 torch threads "
          f"({os.cpu_count()} cores)")
    print(f"{'streams':>7} {'mode':<16} {'vLLM':>8} {'reference':>10} {'vLLM/plain vLLM':>16} {'vLLM/reference':>15}")
    ratios = {}
    for n in STREAMS:
        for m in MODES:
            to_plain = v[m][n] / v["plain"][n]
            to_ref = v[m][n] / r[m][n]
            ratios[f"{m}@{n}"] = {"over_plain_vllm": to_plain, "over_reference": to_ref,
                                  "lead_kept": to_ref / (v["plain"][n] / r["plain"][n])}
            print(f"{n:>7} {m:<16} {v[m][n]:8.1f} {r[m][n]:10.1f} {to_plain:16.3f} {to_ref:15.3f}")
    print("targets: steered >= 0.98x plain vLLM; steered+readout >= 0.95x; steered vLLM keeps >= 0.93x of "
          "plain vLLM's lead over the reference")
    for n in STREAMS:
        print(f"  {n} streams: steered {ratios[f'steered@{n}']['over_plain_vllm']:.3f}x, +readout "
              f"{ratios[f'steered+readout@{n}']['over_plain_vllm']:.3f}x, lead kept "
              f"{ratios[f'steered@{n}']['lead_kept']:.3f} / {ratios[f'steered+readout@{n}']['lead_kept']:.3f}")
    Path(args.out).write_text(json.dumps({
        "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "vllm_cores": os.environ["VLLM_CPU_OMP_THREADS_BIND"], "reference_threads": 2, "tokens": args.tokens,
        "repeats": args.repeats, "sae": spec, "site": SITE, "tokens_per_second": results, "ratios": ratios,
    }, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
