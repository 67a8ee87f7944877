"""Local vs e2e vs e2e+ds SAEs on the default model, same site, same training tokens.

    .venv/bin/python bench/sae_objectives.py [--tokens 160000] [--threads 2]
    .venv/bin/python bench/sae_objectives.py --sweep 1,3,10,30 --tokens 81920   # the Pareto sweep

Trains the three objectives from configs/sae/compare.yaml (one shared config, the
objective and its coefficients changed), evaluates each on the same held-out
tokens, prints a table and writes bench/results/sae_objectives.json. Braun et al.
(2024) report that e2e SAEs reach a similar CE-loss increase with lower L0 and
fewer alive features than local ones.

With --sweep, every objective is trained at each sparsity coefficient λ (objectives
interleaved within a λ), and the result is the Pareto picture the claim is about:
L0 and alive features against CE-loss increase, compared at matched CE increase
(bench/results/sae_pareto.json, docs/img/sae_pareto.png).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch

from rudder.training.config import load_config
from rudder.training.sae import run

ROOT = Path(__file__).resolve().parents[1]
OBJECTIVES = {
    "local": {"objective": "local"},
    "e2e": {"objective": "e2e"},
    "e2e_ds": {"objective": "e2e_ds"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs/sae/compare.yaml"))
    ap.add_argument("--tokens", type=int, default=None, help="override the config's training tokens")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="OBJECTIVE:KEY=VALUE",
                    help="per-objective override, e.g. e2e:loss.sparsity=2")
    ap.add_argument("--sweep", default=None, metavar="L1,L2,...",
                    help="sparsity coefficients: train every objective at each (the Pareto sweep)")
    ap.add_argument("--out", default=None, help="JSON to write (default: bench/results/sae_objectives.json, "
                    "or sae_pareto.json with --sweep)")
    ap.add_argument("--png", default=str(ROOT / "docs/img/sae_pareto.png"), help="the sweep's plot")
    ap.add_argument("--objectives", default=",".join(OBJECTIVES), help="the sweep's objectives (comma-separated)")
    ap.add_argument("--append", action="store_true",
                    help="add the sweep's runs to those already in --out (same config), e.g. more λ for one objective")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.sweep:
        return sweep(args, [float(v) for v in args.sweep.split(",")])
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in OBJECTIVES:
            rows[name] = train_one(args, name, Path(tmp), {})
    header = f"{'objective':<8} {'L0':>7} {'alive':>6} {'dead':>5} {'EV':>6} {'CE incr':>8} {'KL':>7} " \
             f"{'CE rec':>7} {'tok/s':>7}"
    print(header)
    for name, r in rows.items():
        print(f"{name:<8} {r['l0']:7.1f} {r['alive']:6d} {r['dead']:5d} {r['explained_variance']:6.3f} "
              f"{r['ce_increase']:8.4f} {r['kl']:7.4f} {r['ce_loss_score']:7.3f} {r['train_tokens_per_second']:7.0f}")
    out = {**header_fields(args), "results": rows}
    path = Path(args.out or ROOT / "bench/results/sae_objectives.json")
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")


def header_fields(args) -> dict:
    extra = {"out": "unused", **({"tokens": args.tokens} if args.tokens else {})}
    return {"config": load_config(args.config, extra).model_dump(mode="json"), "threads": args.threads,
            "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__}


def train_one(args, name: str, tmp: Path, more: dict) -> dict:
    """Train one objective with the shared config, the command line's overrides and `more`; its eval row."""
    extra = dict(OBJECTIVES[name], out=str(tmp / name), threads=args.threads, **more)
    if args.tokens:
        extra["tokens"] = args.tokens
    for item in args.set:
        objective, kv = item.split(":", 1)
        if objective == name:
            key, value = kv.split("=", 1)
            extra[key] = value
    cfg = load_config(args.config, extra)
    (result,) = run(cfg).values()
    result.pop("path")
    return {"loss": {"sparsity": cfg.sparsity_coeff, "mse": cfg.mse_coeff,
                     "kl": cfg.loss.kl if name != "local" else 0.0,
                     "downstream": cfg.loss.downstream if name == "e2e_ds" else 0.0}, **result}


def at_ce(points: list[dict], ce: float, key: str) -> float | None:
    """`key` interpolated (log-log) at CE increase `ce` along one objective's sweep, None outside it."""
    pts = sorted((p["ce_increase"], p[key]) for p in points if p["ce_increase"] > 0 and p[key] > 0)
    for (c0, v0), (c1, v1) in zip(pts, pts[1:]):
        if c0 <= ce <= c1:
            t = 0.0 if c1 == c0 else (np.log(ce) - np.log(c0)) / (np.log(c1) - np.log(c0))
            return float(np.exp(np.log(v0) + t * (np.log(v1) - np.log(v0))))
    return None


def matched(runs: dict[str, list[dict]]) -> list[dict]:
    """L0 and alive features of each objective at the CE increases every objective's sweep spans."""
    lows = [min(p["ce_increase"] for p in pts) for pts in runs.values()]
    highs = [max(p["ce_increase"] for p in pts) for pts in runs.values()]
    lo, hi = max(lows), min(highs)
    if lo >= hi:
        return []
    return [{"ce_increase": float(ce), **{f"{name}_{key}": at_ce(pts, float(ce), key)
                                          for name, pts in runs.items() for key in ("l0", "alive")}}
            for ce in np.geomspace(lo, hi, 3)]


def sweep(args, coeffs: list[float]) -> None:
    path = Path(args.out or ROOT / "bench/results/sae_pareto.json")
    runs: dict[str, list[dict]] = {name: [] for name in OBJECTIVES}
    if args.append:
        before = json.loads(path.read_text())
        if before["config"] != header_fields(args)["config"]:
            raise SystemExit(f"--append: {path} was made with another config; drop --append")
        runs = before["runs"]
        coeffs_all = sorted(set(before["coefficients"]) | set(coeffs))
    else:
        coeffs_all = coeffs
    chosen = args.objectives.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        for coeff in coeffs:  # objectives interleaved, so that machine noise spreads over all three
            for name in chosen:
                row = train_one(args, name, Path(tmp), {"loss.sparsity": coeff})
                runs[name].append(row)
                print(f"{name:<7} λ={coeff:<6g} L0 {row['l0']:8.1f} alive {row['alive']:5d} "
                      f"CE increase {row['ce_increase']:.4f}")
    print(f"{'objective':<8} {'λ':>6} {'L0':>8} {'alive':>6} {'CE incr':>8} {'KL':>7} {'tok/s':>6}")
    for name, pts in runs.items():
        for r in pts:
            print(f"{name:<8} {r['loss']['sparsity']:6g} {r['l0']:8.1f} {r['alive']:6d} {r['ce_increase']:8.4f} "
                  f"{r['kl']:7.4f} {r['train_tokens_per_second']:6.0f}")
    compare = matched(runs)
    for m in compare:
        print(f"at CE increase {m['ce_increase']:.4f}: " + ", ".join(
            f"{name} L0 {m[f'{name}_l0']:.1f}" for name in runs if m[f"{name}_l0"] is not None))
    out = {**header_fields(args), "coefficients": coeffs_all, "runs": runs, "matched": compare}
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")
    plot(runs, Path(args.png))


def plot(runs: dict[str, list[dict]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, pts in runs.items():
        pts = sorted(pts, key=lambda p: p["ce_increase"])
        for ax, key in zip(axes, ("l0", "alive")):
            ax.plot([p["ce_increase"] for p in pts], [p[key] for p in pts], marker="o", label=name)
            for p in pts:
                ax.annotate(f"λ={p['loss']['sparsity']:g}", (p["ce_increase"], p[key]), fontsize=7)
    for ax, label in zip(axes, ("L0", "alive features")):
        ax.set_xscale("log")
        ax.set_xlabel("CE loss increase (nats)")
        ax.set_ylabel(label)
        ax.legend()
    axes[0].set_yscale("log")
    fig.suptitle("local vs e2e vs e2e+ds SAEs, blocks.15.hook_resid_pre of the default model")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
