"""The steering math's in-graph form inside a CUDA graph: cost per decode step, and equality with eager.

    python bench/cuda_steering_op.py [--layers 16] [--d-model 2048] [--batch 32] [--replays 200]

Needs CUDA, torch and transformers (not vLLM, not an install of Rudder: the repository's `core/`
is imported from this checkout). On a machine without CUDA it says so and exits 0 (CI skips it).

What it does: a random Llama (transformers, bfloat16; `--d-model`, `--layers`) runs one decode
step for `--batch` sequences (one new token each, no KV cache, so the step is a lower bound on a
real one and the op's share an upper bound). The steering at a site is Rudder's own in-graph
form, `core.steering.sae_edit_all_rows` (a clamp, add, scale or ablate of ReLU-SAE features
from their encoder columns and decoder rows) then `apply_direction` (x + alpha v), over fixed
size tables: `slots x ops` per SAE and per site, a per-row slot index, rows of no request
pointing at slot -1 (masked). The step is captured once with `torch.cuda.graph` at 0, 1 and 4
sites (resid_post of evenly spaced layers); then, for every replay, new random tables (other
features, values, scopes, directions, slots) are copied into the captured buffers, so one graph
serves every mix of steerings without a host synchronisation. Checks: each graph's logits
equal eager's with the same tables (after the tables change too). Reports ms per step (median
of `--replays`), the op's cost over the plain graph, and eager's. Each steered row runs twice:
with the torch form ("torch") and with the feature edits as one Triton kernel
(`core.steering_fused`, "fused"; the directions stay torch).

Writes bench/results/cuda_steering_op.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

if "rudder" not in sys.modules:  # this checkout's core/, installed or not
    try:
        import rudder.core  # noqa: F401
    except ImportError:
        pkg = types.ModuleType("rudder")
        pkg.__path__ = []
        core = types.ModuleType("rudder.core")
        core.__path__ = [str(ROOT / "core")]
        sys.modules.update({"rudder": pkg, "rudder.core": core})

from rudder.core.sae import SAE, SAEConfig  # noqa: E402
from rudder.core.steering import (  # noqa: E402
    DirectionEdit,
    FeatureEdit,
    Op,
    RowIndex,
    Scope,
    SteeringSpec,
    StepTables,
    apply_direction,
    build_tables,
    sae_edit_all_rows,
)

D_SAE_PER_D = 8  # SAE width: 8 x d_model
OPS_PER_SLOT = 2  # feature edits per request per SAE (and directions per site)


def random_specs(n: int, sites: list[str], d_sae: int, d: int, gen: torch.Generator) -> list[SteeringSpec]:
    """One spec per slot, each with OPS_PER_SLOT feature edits of every site's SAE and as many directions."""
    specs = []
    for _ in range(n):
        features, directions = [], []
        for site in sites:
            for _ in range(OPS_PER_SLOT):
                op = Op(int(torch.randint(1, 5, (1,), generator=gen)))
                start = int(torch.randint(0, 8, (1,), generator=gen))
                features.append(FeatureEdit(site, int(torch.randint(0, d_sae, (1,), generator=gen)), op,
                                            float(torch.rand(1, generator=gen) * 4), Scope("range", start)))
                directions.append(DirectionEdit(site, tuple(torch.randn(d, generator=gen).mul(0.01).tolist()),
                                                alpha=float(torch.rand(1, generator=gen)), scope=Scope("range", start)))
        specs.append(SteeringSpec(features=tuple(features), directions=tuple(directions)))
    return specs


def copy_tables(dst: StepTables, src: StepTables) -> None:
    """Write `src` into the captured buffers of `dst` (same shapes: same slots and ops per slot)."""
    for group in ("saes", "directions"):
        for key, table in getattr(dst, group).items():
            new = getattr(src, group)[key]
            for name, value in vars(table).items():
                if isinstance(value, torch.Tensor):
                    value.copy_(getattr(new, name))


class Steering:
    """Forward hooks on decoder layers that steer their output with the in-graph form."""

    def __init__(self, model, layers: list[int], saes: dict[str, SAE], batch: int, fused: bool = False):
        self.sites = {f"blocks.{i}.hook_resid_post": i for i in layers}
        self.saes, self.batch, self.fused = saes, batch, fused
        dev = next(model.parameters()).device
        self.rows = RowIndex(torch.zeros(batch, dtype=torch.long, device=dev),
                             torch.zeros(batch, dtype=torch.long, device=dev))
        self.tables = StepTables()
        self.handles = [model.model.layers[i].register_forward_hook(self._hook(site))
                        for site, i in self.sites.items()]

    def set(self, specs: list[SteeringSpec], slot: torch.Tensor, position: torch.Tensor) -> None:
        """New tables and rows: into the captured buffers once they exist."""
        dev = self.rows.slot.device
        new = build_tables(specs, [4] * len(specs), dev, self.saes)
        if self.tables.empty:
            self.tables = new
        else:
            copy_tables(self.tables, new)
        self.rows.slot.copy_(slot)
        self.rows.position.copy_(position)

    def _hook(self, site: str):
        def hook(module, args, out):
            hidden = out[0] if isinstance(out, tuple) else out
            x = hidden.reshape(-1, hidden.shape[-1])
            if self.fused:  # one Triton kernel for the feature edits (core.steering_fused)
                from rudder.core.steering_fused import fused_sae_delta

                x = x + fused_sae_delta(self.saes[site], x, self.tables.saes[site], self.rows).to(x.dtype)
            else:
                x = sae_edit_all_rows(self.saes[site], x, self.tables.saes[site], self.rows)
            x = apply_direction(x, self.tables.directions[site], self.rows).view(hidden.shape)
            return (x, *out[1:]) if isinstance(out, tuple) else x
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def timed(fn, replays: int, before=None) -> float:
    """Median ms of `fn` over `replays` (CUDA events); `before` runs untimed ahead of each."""
    times = []
    for _ in range(replays):
        if before:
            before()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--d-model", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--replays", type=int, default=200)
    ap.add_argument("--out", default=str(ROOT / "bench/results/cuda_steering_op.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs one (skipped)")
        return
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    dev, dtype, d = torch.device("cuda"), torch.bfloat16, args.d_model
    cfg = LlamaConfig(hidden_size=d, intermediate_size=4 * d, num_hidden_layers=args.layers,
                      num_attention_heads=d // 64, num_key_value_heads=max(1, d // 256), vocab_size=32000)
    model = LlamaForCausalLM(cfg).to(dev, dtype).eval()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, 1), device=dev)

    def step():
        return model(input_ids=ids, use_cache=False).logits

    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "d_model": d,
               "layers": args.layers, "batch": args.batch, "dtype": "bfloat16", "d_sae": D_SAE_PER_D * d,
               "ops_per_slot": OPS_PER_SLOT, "replays": args.replays, "rows": []}
    with torch.inference_mode():
        for n_sites, edit in ((0, "none"), (1, "torch"), (4, "torch"), (1, "fused"), (4, "fused")):
            layers = [round(i * (args.layers - 1) / max(1, n_sites - 1)) for i in range(n_sites)] if n_sites > 1 \
                else [args.layers // 2] * n_sites
            saes = {}
            for i in layers:
                sae = SAE(SAEConfig(d_in=d, d_sae=D_SAE_PER_D * d, hook_name=f"blocks.{i}.hook_resid_post"))
                torch.nn.init.normal_(sae.W_enc, std=d ** -0.5)
                torch.nn.init.normal_(sae.W_dec, std=0.02)
                saes[sae.cfg.hook_name] = sae.to(dev, dtype)
            steering = Steering(model, layers, saes, args.batch, fused=edit == "fused") if n_sites else None

            def new_tables(steering=steering, saes=saes):
                if steering:
                    slot = torch.randint(-1, args.batch, (args.batch,), generator=gen)  # -1: a row nobody steers
                    steering.set(random_specs(args.batch, list(saes), D_SAE_PER_D * d, d, gen), slot,
                                 torch.randint(0, 16, (args.batch,), generator=gen))

            new_tables()
            side = torch.cuda.Stream()  # warm-up on a side stream, as torch.cuda.graph wants
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_logits = step()
            max_err = 0.0
            for _ in range(3):  # the graph follows the tables as they change
                new_tables()
                graph.replay()
                eager = step()
                max_err = max(max_err, (static_logits.float() - eager.float()).abs().max().item())
            assert max_err <= 1e-2 * eager.float().abs().max().item(), f"graph and eager differ by {max_err}"
            if n_sites == 0:
                plain = static_logits.clone()
            else:  # and the steering did something
                assert (static_logits.float() - plain.float()).abs().max().item() > 1e-3, "steering had no effect"
            row = {"sites": n_sites, "edit": edit,
                   "graph_ms": timed(graph.replay, args.replays, new_tables if steering else None),
                   "eager_ms": timed(step, max(10, args.replays // 4)), "max_abs_diff_vs_eager": max_err}
            results["rows"].append(row)
            if steering:
                steering.remove()
            print(f"{n_sites} sites ({edit} edit): graph {row['graph_ms']:.3f} ms/step, "
                  f"eager {row['eager_ms']:.3f} ms/step, graph vs eager max |diff| {max_err:.2e}", flush=True)
    base = results["rows"][0]["graph_ms"]
    for row in results["rows"]:
        row["graph_over_plain_graph"] = row["graph_ms"] / base
    print(f"\n{results['device']}, Llama d={d} x {args.layers} layers, batch {args.batch}, bfloat16; ReLU SAEs "
          f"{D_SAE_PER_D * d} wide, {OPS_PER_SLOT} feature edits + {OPS_PER_SLOT} directions per request per site")
    print(f"{'sites':>5} {'edit':>6} {'graph ms':>9} {'x plain graph':>14} {'eager ms':>9}")
    for row in results["rows"]:
        print(f"{row['sites']:>5} {row['edit']:>6} {row['graph_ms']:9.3f} {row['graph_over_plain_graph']:14.3f} "
              f"{row['eager_ms']:9.3f}")
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
