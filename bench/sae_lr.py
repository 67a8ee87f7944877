"""Which learning rate does Rudder's TopK trainer want? The race's SAE (bench/sae_race.py: the
default model's blocks.15.hook_resid_pre, 576 x 4,608 latents, k 32, 4,096 tokens a step) trained
from one activation cache at several peak learning rates, each at each token budget, measured by
one evaluator on the same held-out tokens. `rudder.training.config.default_lr` follows from it.

    .venv/bin/python bench/sae_lr.py [--tokens 262144,1048576] [--lrs 4e-4,2e-3,4e-3]

Quality only (no timings). Prints a table; writes bench/results/sae_lr.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from rudder.core.default_model import default_model_dir
from rudder.training.cache import write as write_cache
from rudder.training.corpus import train_eval_split
from rudder.training.evaluate import evaluate_sae
from rudder.training.lm import HookedLM
from rudder.training.sae import SaeTrainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sae_race import CONTEXT, D_SAE, EVAL_TOKENS, SITE, config  # noqa: E402  (the race's shape and data)

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="262144,1048576", help="token budgets, comma-separated")
    ap.add_argument("--lrs", default="4e-4,2e-3,4e-3", help="peak learning rates, comma-separated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/sae_lr.json")
    args = ap.parse_args()
    budgets = [int(t) for t in args.tokens.split(",")]
    lrs = [float(x) for x in args.lrs.split(",")]
    torch.set_num_threads(args.threads)
    lm = HookedLM.load(default_model_dir())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for tokens in budgets:
            split = train_eval_split(lm.tokenizer, CONTEXT, EVAL_TOKENS, tokens + EVAL_TOKENS)
            cache = tmp / f"cache-{tokens}"
            write_cache(config(tokens, tmp / "unused", args.threads), cache)
            for lr in lrs:
                sae = SaeTrainer(config(tokens, tmp / f"sae-{tokens}-{lr:g}", args.threads, activations=str(cache),
                                        lr=lr)).train()[SITE]
                m = evaluate_sae(lm, sae, split.eval)
                rows.append({"tokens": tokens, "lr": lr, "explained_variance": m["explained_variance"],
                             "ce_loss_score": m["ce_loss_score"], "dead_fraction": m["dead"] / D_SAE})
                print(f"{tokens:>9,} tokens  lr {lr:<7g} EV {m['explained_variance']:.3f}  "
                      f"CE recovered {m['ce_loss_score']:.3f}  dead {m['dead'] / D_SAE:.1%}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "site": SITE, "d_sae": D_SAE,
                                    "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
