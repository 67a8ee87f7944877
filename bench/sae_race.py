"""A race of TopK SAE trainers on the same data, site, shape, k and batch: Rudder against
sparsify (EleutherAI's `eai-sparsify`, its own `Trainer` with its defaults; its eager decode,
as `SPARSIFY_DISABLE_TRITON=1` picks on a machine without a GPU), both reading the
frozen default model, and both SAEs measured by one evaluator (rudder.training.evaluate). Each
trainer runs with its defaults (Rudder: Adam at `default_lr`, 4e-3 at this size; sparsify: signum).

    .venv/bin/python -m pip install eai-sparsify==1.3.3     # once; a bench-only peer
    .venv/bin/python bench/sae_race.py [--tokens 262144] [--repeats 2] [--threads 2]

Same windows (the stdlib corpus packed at context 128; the same held-out windows for the
evaluation), site blocks.15.hook_resid_pre (sparsify's hookpoint `layers.14`, the output of the
layer before), 576 x 4608 latents, k 32, 4,096 tokens a step (sparsify: 32 sequences). Tokens/s
is the training call's wall time over its tokens (model forward included), runs interleaved,
best of `--repeats`, after a short warm-up run of each. Quality (explained variance, CE loss
recovered, dead fraction) is that of each side's first run at the budget.

From a cache: `rudder cache activations` once for the same config, then Rudder trains from it, and
SAELens' own trainer (`SAETrainer`, `TopKTrainingSAE`, its defaults but the lr schedule) trains on
the same rows (shuffled once, normalised by Rudder's scale and folded back), interleaved too.

Prints a table; writes bench/results/sae_race.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from rudder.core.default_model import default_model_dir
from rudder.core.sae import SAE, SAEConfig
from rudder.training.cache import write as write_cache
from rudder.training.config import load_config
from rudder.training.corpus import train_eval_split
from rudder.training.evaluate import evaluate_sae
from rudder.training.lm import HookedLM
from rudder.training.sae import SaeTrainer

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parents[1]
SITE, HOOKPOINT = "blocks.15.hook_resid_pre", "layers.14"
CONTEXT, BATCH, D_SAE, K, EVAL_TOKENS = 128, 4096, 4608, 32, 8192
RUNS = {"rudder": "r", "sparsify": "s", "rudder from its cache": "rc", "SAELens from the same cache": "lc"}
BUFFER = 16_384  # Rudder's shuffle buffer (sparsify has none): a run forwards its tokens plus half of it


def config(tokens: int, out: Path, threads: int, **more):
    return load_config(None, {"sites": [SITE], "architecture": "topk", "d_sae": D_SAE, "k": K, "tokens": tokens,
                              "batch_tokens": BATCH, "buffer_tokens": BUFFER, "context": CONTEXT,
                              "corpus_tokens": tokens + EVAL_TOKENS, "eval_tokens": EVAL_TOKENS,
                              "checkpoint_every_steps": 10_000, "threads": threads, "out": str(out), **more})


def rudder(tokens: int, out: Path, threads: int, cache: Path | None = None) -> tuple[float, SAE]:
    trainer = SaeTrainer(config(tokens, out, threads, **({"activations": str(cache)} if cache else {})))
    start = time.perf_counter()
    saes = trainer.train()
    seconds = time.perf_counter() - start
    return tokens / seconds, saes[SITE]


def saelens_from_cache(cache: Path, scale: float, tokens: int, out: Path, threads: int) -> tuple[float, SAE]:
    """SAELens' own trainer (`SAETrainer`, `TopKTrainingSAE`, its defaults) on the cache's rows,
    shuffled once, normalised by Rudder's scale (folded back after, as Rudder's export does)."""
    from default_sae_quality import saelens_sae_in_raw_units
    from sae_lens import LoggingConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer
    from safetensors.torch import load_file

    torch.set_num_threads(threads)
    manifest = json.loads((cache / "manifest.json").read_text())
    rows = torch.cat([load_file(cache / sh["file"])[SITE] for sh in manifest["shards"]])
    rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))] * scale
    steps = tokens // BATCH
    batches = iter([rows[i * BATCH:(i + 1) * BATCH] for i in range(steps)])
    torch.manual_seed(0)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=rows.shape[1], d_sae=D_SAE, k=K, dtype="float32", device="cpu"))
    cfg = SAETrainerConfig(total_training_samples=steps * BATCH, train_batch_size_samples=BATCH, lr=4e-4,
                           lr_end=4e-5, lr_scheduler_name="cosineannealing", lr_warm_up_steps=2, device="cpu",
                           dead_feature_window=12, logger=LoggingConfig(log_to_wandb=False), n_checkpoints=0,
                           save_final_checkpoint=False)
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = SAETrainer(cfg, sae, batches)
        start = time.perf_counter()
        trained = trainer.fit()
        seconds = time.perf_counter() - start
    trained.cfg.metadata.hook_name = SITE
    trained.save_inference_model(out)
    return steps * BATCH / seconds, saelens_sae_in_raw_units(out, scale, SITE)


def sparsify(model, windows: list[list[int]], tokens: int, out: Path, threads: int) -> tuple[float, SAE]:
    from datasets import Dataset
    from sparsify import SaeConfig, TrainConfig, Trainer

    torch.set_num_threads(threads)
    n = tokens // CONTEXT
    data = Dataset.from_dict({"input_ids": windows[:n]}).with_format("torch")
    cfg = TrainConfig(SaeConfig(num_latents=D_SAE, k=K), batch_size=BATCH // CONTEXT, hookpoints=[HOOKPOINT],
                      log_to_wandb=False, save_dir=str(out), save_every=10**9)
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = Trainer(cfg, data, model)
        start = time.perf_counter()
        trainer.fit()
        seconds = time.perf_counter() - start
    coder = trainer.saes[HOOKPOINT]
    sae = SAE(SAEConfig(d_in=576, d_sae=D_SAE, hook_name=SITE, architecture="topk", k=K))
    with torch.no_grad():  # sparsify: relu(W_e (x − b_dec) + b_e), top k, then W_d: our TopK's math
        sae.W_enc.copy_(coder.encoder.weight.T)
        sae.b_enc.copy_(coder.encoder.bias)
        sae.W_dec.copy_(coder.W_dec)
        sae.b_dec.copy_(coder.b_dec)
    return n * CONTEXT / seconds, sae


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=262_144, help="training tokens of each run (64 steps)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/sae_race.json")
    args = ap.parse_args()
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # its switch for machines without a GPU (Triton's decode)
    try:
        import sparsify as _  # noqa: F401
    except ImportError:
        raise SystemExit("sparsify is not installed: .venv/bin/python -m pip install eai-sparsify==1.3.3") from None
    torch.set_num_threads(args.threads)
    lm = HookedLM.load(default_model_dir())
    # the windows Rudder's trainer reads (its corpus capped the same way), for sparsify and the evaluation
    split = train_eval_split(lm.tokenizer, CONTEXT, EVAL_TOKENS, args.tokens + EVAL_TOKENS)
    g = torch.Generator().manual_seed(0)
    windows = split.train[torch.randperm(len(split.train), generator=g).tolist()].tolist()  # sparsify does not shuffle
    speed: dict[str, list[float]] = {k: [] for k in RUNS}
    quality: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = tmp / "cache"
        write_cache(config(args.tokens, tmp / "unused", args.threads), cache)
        rudder(8192, tmp / "warm-r", args.threads)  # first runs pay one-off costs on both sides
        sparsify(lm.model, windows, 8192, tmp / "warm-s", args.threads)
        runs = {"rudder": lambda o: rudder(args.tokens, o, args.threads),
                "sparsify": lambda o: sparsify(lm.model, windows, args.tokens, o, args.threads),
                "rudder from its cache": lambda o: rudder(args.tokens, o, args.threads, cache),
                # SAELens is given the normalisation Rudder's SAE from the same cache recorded
                "SAELens from the same cache": lambda o: saelens_from_cache(
                    cache, trained["rudder from its cache"].cfg.metadata["normalisation_scale"][SITE], args.tokens,
                    o, args.threads)}
        trained: dict[str, SAE] = {}
        for r in range(args.repeats):
            for name, run in runs.items():
                tps, trained[name] = run(tmp / f"{RUNS[name]}{r}")
                sae = trained[name]
                speed[name].append(tps)
                print(f"{name}: {tps:,.0f} tokens/s", flush=True)
                if r == 0:
                    m = evaluate_sae(lm, sae, split.eval)
                    quality[name] = {k: m[k] for k in ("explained_variance", "ce_loss_score", "ce_increase", "l0")}
                    quality[name]["dead_fraction"] = m["dead"] / D_SAE
    best = {k: max(v) for k, v in speed.items()}
    print(f"\nTopK {D_SAE} x 576, k {K}, {BATCH} tokens a step, {args.tokens:,} tokens; torch {args.threads} threads "
          f"on {os.cpu_count()} cores; best of {args.repeats}")
    print("| trainer | tokens/s (spread) | explained variance | CE loss recovered | dead |\n"
          "| --- | --- | --- | --- | --- |")
    for k in speed:
        q = quality[k]
        print(f"| {k} | {best[k]:,.0f} ({min(speed[k]):,.0f}-{max(speed[k]):,.0f}) | {q['explained_variance']:.3f} | "
              f"{q['ce_loss_score']:.3f} | {q['dead_fraction']:.1%} |")
    print(f"Rudder / sparsify tokens/s from the model: {best['rudder'] / best['sparsify']:.2f}x; from a cache, "
          f"Rudder / SAELens: {best['rudder from its cache'] / best['SAELens from the same cache']:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d"), "threads": args.threads, "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "site": SITE, "d_sae": D_SAE, "k": K, "batch_tokens": BATCH, "context": CONTEXT, "tokens": args.tokens,
        "eval_tokens": EVAL_TOKENS, "tokens_per_second": speed, "quality": quality,
        "rudder_over_sparsify": best["rudder"] / best["sparsify"],
        "rudder_over_saelens_from_cache": best["rudder from its cache"] / best["SAELens from the same cache"]},
        indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
