"""Local vs e2e vs e2e+ds SAEs on the default model, same site, same training tokens.

    .venv/bin/python bench/sae_objectives.py [--tokens 160000] [--threads 2]

Trains the three objectives from configs/sae/compare.yaml (one shared config, the
objective and its coefficients changed), evaluates each on the same held-out
tokens, prints a table and writes bench/results/sae_objectives.json. Braun et al.
(2024) report that e2e SAEs reach a similar CE-loss increase with lower L0 and
fewer alive features than local ones.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

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
    ap.add_argument("--out", default=str(ROOT / "bench/results/sae_objectives.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in OBJECTIVES.items():
            extra = dict(overrides, out=str(Path(tmp) / name), threads=args.threads)
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
            rows[name] = {"loss": {"sparsity": cfg.sparsity_coeff, "mse": cfg.mse_coeff,
                                   "kl": cfg.loss.kl if name != "local" else 0.0,
                                   "downstream": cfg.loss.downstream if name == "e2e_ds" else 0.0}, **result}
    header = f"{'objective':<8} {'L0':>7} {'alive':>6} {'dead':>5} {'EV':>6} {'CE incr':>8} {'KL':>7} " \
             f"{'CE rec':>7} {'tok/s':>7}"
    print(header)
    for name, r in rows.items():
        print(f"{name:<8} {r['l0']:7.1f} {r['alive']:6d} {r['dead']:5d} {r['explained_variance']:6.3f} "
              f"{r['ce_increase']:8.4f} {r['kl']:7.4f} {r['ce_loss_score']:7.3f} {r['train_tokens_per_second']:7.0f}")
    out = {"config": load_config(args.config, {"out": "unused"}).model_dump(mode="json"),
           "threads": args.threads, "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
           "torch": torch.__version__, "results": rows}
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
