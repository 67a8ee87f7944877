"""SAE training throughput: Rudder local and e2e, and SAELens local, side by side in one run.

    scripts/saelens_env.sh                      # once: SAELens in .venv-saelens (bench only)
    .venv/bin/python bench/sae_training.py [--threads 2] [--tokens 61440] [--autocast]

Same model shape (SmolLM2-135M), site (blocks.15.hook_resid_pre), dictionary
(576 x 4608), batch (4096 tokens), context (128), shuffle buffer (16,384 tokens;
both keep half and serve the rest, so a run forwards about its own tokens plus half
a buffer) and token windows for both. Tokens/s is the training call's wall time over its tokens,
after a warm-up run on each side (first runs are several times slower). SAELens then
loads the artifact Rudder wrote and we compare its outputs with ours. Prints a table
and writes bench/results/sae_training.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from rudder.training.config import load_config
from rudder.training.sae import SaeTrainer

ROOT = Path(__file__).resolve().parents[1]
SITE = "blocks.15.hook_resid_pre"
BUFFER_TOKENS, CONTEXT, BATCH, D_SAE = 16_384, 128, 4096, 4608


def rudder_run(objective: str, tokens: int, out: Path, threads: int, autocast: bool) -> tuple[float, SaeTrainer]:
    cfg = load_config(None, {"sites": [SITE], "d_sae": D_SAE, "objective": objective, "tokens": tokens,
                             "batch_tokens": BATCH, "micro_batch_tokens": 1024 if objective != "local" else None,
                             "context": CONTEXT, "buffer_tokens": BUFFER_TOKENS, "eval_tokens": 0,
                             "checkpoint_every_steps": 10_000, "threads": threads, "autocast": autocast,
                             "out": str(out)})
    trainer = SaeTrainer(cfg)
    start = time.perf_counter()
    saes = trainer.train()
    seconds = time.perf_counter() - start
    trainer.finish(saes)
    return tokens / seconds, trainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=61_440, help="local training tokens (15 steps)")
    ap.add_argument("--e2e-tokens", type=int, default=16_384, help="e2e training tokens (4 steps)")
    ap.add_argument("--autocast", action="store_true", help="both sides: bfloat16 autocast of the LM and SAE")
    ap.add_argument("--peer-python", default=str(ROOT / ".venv-saelens/bin/python"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rudder_run("local", 8192, tmp / "warmup", args.threads, args.autocast)
        local_tps, trainer = rudder_run("local", args.tokens, tmp / "local", args.threads, args.autocast)
        e2e_tps, _ = rudder_run("e2e", args.e2e_tokens, tmp / "e2e", args.threads, args.autocast)
        print(f"rudder local {local_tps:.0f} tok/s, e2e {e2e_tps:.0f} tok/s")

        torch.save(trainer.split.train.tolist(), tmp / "windows.pt")
        sae = trainer.saes[SITE].export({})
        x = trainer.lm.activations(trainer.split.train[:4].long(), [SITE])[SITE]
        with torch.no_grad():
            f = sae.encode(x)
            torch.save({"x": x, "features": f, "reconstruction": sae.decode(f)}, tmp / "rudder_io.pt")
        (tmp / "rudder_sae").symlink_to(tmp / "local")
        store = 16
        (tmp / "job.json").write_text(json.dumps({
            "d_in": 576, "d_sae": D_SAE, "site": SITE, "context": CONTEXT, "batch_tokens": BATCH,
            "store_batch_prompts": store,
            "n_batches_in_buffer": BUFFER_TOKENS // CONTEXT,  # SAELens: mixing buffer = this x context tokens
            "tokens": args.tokens, "warmup_tokens": 8192, "lr": 4e-4, "threads": args.threads,
            "autocast": args.autocast}))
        env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        peer = subprocess.run([args.peer_python, str(ROOT / "bench/saelens_peer.py"), str(tmp)], env=env,
                              capture_output=True, text=True)
        if peer.returncode != 0:
            raise SystemExit(f"SAELens run failed (is {args.peer_python} set up? scripts/saelens_env.sh):\n"
                             + peer.stderr[-3000:])
        saelens = json.loads(peer.stdout.strip().splitlines()[-1])

    ratio = local_tps / saelens["local_tokens_per_second"]
    rows = [("Rudder local", local_tps), ("Rudder e2e", e2e_tps),
            ("SAELens local", saelens["local_tokens_per_second"])]
    print(f"\n{'trainer':<14} {'tokens/s':>9}   ({args.threads} threads, {os.cpu_count()} cores, "
          f"{'bf16 autocast' if args.autocast else 'fp32'})")
    for name, tps in rows:
        print(f"{name:<14} {tps:9.0f}")
    print(f"e2e / local (Rudder): {e2e_tps / local_tps:.3f}x;  Rudder / SAELens (local): {ratio:.2f}x")
    compat = saelens.get("rudder_artifact_in_saelens")
    if compat:
        print(f"SAELens loaded Rudder's artifact: max |Δ features| {compat['max_abs_diff_features']:.2e}, "
              f"max |Δ reconstruction| {compat['max_abs_diff_reconstruction']:.2e}")
    out = Path(args.out or ROOT / f"bench/results/sae_training{'_bf16' if args.autocast else ''}.json")
    out.write_text(json.dumps({
        "threads": args.threads, "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__, "autocast": args.autocast, "site": SITE, "d_sae": D_SAE, "batch_tokens": BATCH,
        "context": CONTEXT, "buffer_tokens": BUFFER_TOKENS, "tokens": {"local": args.tokens, "e2e": args.e2e_tokens},
        "rudder_local_tokens_per_second": local_tps, "rudder_e2e_tokens_per_second": e2e_tps,
        "e2e_over_local": e2e_tps / local_tps, "saelens": saelens, "rudder_over_saelens_local": ratio,
    }, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
