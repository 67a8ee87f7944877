"""The default SAE against SAELens at the same budget: same activations, tokens, width and L0.

    scripts/saelens_env.sh                                   # once: SAELens in .venv-saelens (bench only)
    .venv/bin/python bench/default_sae_quality.py            # ~35 min on 2 cores
    .venv/bin/python bench/default_sae_quality.py --rudder-sae DIR --activations FILE   # reuse a run

1. Rudder trains the default SAE (configs/sae/default.yaml: TopK, k=32, 4,608 latents,
   2 M tokens at blocks.15.hook_resid_post) and records every activation batch it used.
2. SAELens' own trainer (TopK, its defaults for AuxK and initialisation) trains on those very
   batches in the same order, with the same normalisation, learning rate, schedule and batch.
3. Both, and the shipped SAE (models/default-saes/resid15), are evaluated by one function
   (`rudder.training.evaluate.evaluate_sae`) on the same held-out windows: L0, dead fraction,
   explained variance, CE increase, KL, CE loss recovered (SAELens' score).

Prints a table and writes bench/results/default_sae_quality.json.
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

from rudder.core.default_model import default_model_dir
from rudder.core.sae import SAE
from rudder.training.config import SaeTrainConfig, load_config
from rudder.training.corpus import train_eval_split
from rudder.training.evaluate import evaluate_sae
from rudder.training.lm import HookedLM
from rudder.training.sae import TrainingSae, run

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/sae/default.yaml"
SHIPPED = ROOT / "models/default-saes/resid15"


def saelens_run(work: Path, cfg, peer_python: str) -> dict:
    (work / "job.json").write_text(json.dumps({
        "d_sae": cfg.d_sae, "k": cfg.k, "batch_tokens": cfg.batch_tokens, "lr": cfg.lr,
        "min_lr_factor": cfg.min_lr_factor, "warmup_steps": cfg.warmup_tokens // cfg.batch_tokens,
        "dead_window_tokens": cfg.dead.window_tokens, "threads": cfg.threads or 2, "seed": cfg.seed,
        "site": cfg.sites[0]}))
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    peer = subprocess.run([peer_python, str(ROOT / "bench/saelens_sae_peer.py"), str(work)], env=env,
                          capture_output=True, text=True)
    if peer.returncode != 0:
        raise SystemExit(f"SAELens run failed (is {peer_python} set up? scripts/saelens_env.sh):\n"
                         + peer.stderr[-3000:])
    return json.loads(peer.stdout.strip().splitlines()[-1])


def saelens_sae_in_raw_units(folder: Path, scale: float, hook_name: str) -> SAE:
    """SAELens' folder (normalised units; Rudder's loader folds its decoder norms) with the
    normalisation folded back exactly as Rudder's export does."""
    sae = SAE.load(folder)
    sae.cfg.hook_name = hook_name
    trainer = TrainingSae(sae.cfg, scale)
    trainer.sae.load_state_dict(sae.state_dict())
    return trainer.export({"trained_by": "SAELens"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rudder-sae", type=Path, help="a Rudder SAE trained with the default config (skip step 1)")
    ap.add_argument("--activations", type=Path, help="the activations that run recorded (save_activations)")
    ap.add_argument("--work", type=Path, help="keep intermediate results here; a SAELens SAE already there is reused")
    ap.add_argument("--peer-python", default=str(ROOT / ".venv-saelens/bin/python"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/default_sae_quality.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        acts_file, rudder_dir = args.activations, args.rudder_sae
        if rudder_dir is None:
            rudder_dir, acts_file = work / "rudder_sae", work / "activations.safetensors"
            run(load_config(CONFIG, {"out": str(rudder_dir), "save_activations": str(acts_file)}))
        (work / "activations.safetensors").unlink(missing_ok=True)
        (work / "activations.safetensors").symlink_to(acts_file.resolve())
        rudder_sae = SAE.load(rudder_dir)
        # the settings of the run SAELens is compared with (its recorded config, not today's file)
        cfg = SaeTrainConfig.model_validate({**rudder_sae.cfg.metadata["config"], "out": str(work / "unused"),
                                             "save_activations": None})
        if (work / "saelens_sae/cfg.json").exists() and (work / "saelens_run.json").exists():
            print(f"==> reusing SAELens' SAE in {work}")
        else:
            print("==> SAELens trains on the same activations (about 20 minutes)", flush=True)
            (work / "saelens_run.json").write_text(json.dumps(saelens_run(work, cfg, args.peer_python)))
        peer = json.loads((work / "saelens_run.json").read_text())
        job = json.loads((work / "job.json").read_text())  # what SAELens was given
        scale = rudder_sae.cfg.metadata["normalisation_scale"][cfg.sites[0]]
        saelens_sae = saelens_sae_in_raw_units(work / "saelens_sae", scale, cfg.sites[0])

        print("==> evaluating on the held-out windows")
        torch.set_num_threads(cfg.threads or 2)
        lm = HookedLM.load(cfg.model or default_model_dir(), autocast=cfg.autocast)
        split = train_eval_split(lm.tokenizer, cfg.context, cfg.eval_tokens, cfg.corpus_tokens, cfg.corpus)
        aux = lambda sae: sae.cfg.metadata["loss"]["aux_k"]  # noqa: E731
        rows = {f"Rudder (AuxK {aux(rudder_sae):g})": evaluate_sae(lm, rudder_sae, split.eval),
                "SAELens (AuxK 1)": evaluate_sae(lm, saelens_sae, split.eval)}
        if SHIPPED.exists() and SHIPPED.resolve() != rudder_dir.resolve():
            shipped = SAE.load(SHIPPED)
            rows[f"Rudder shipped (AuxK {aux(shipped):g})"] = evaluate_sae(lm, shipped, split.eval)
    rudder_tps = rudder_sae.cfg.metadata.get("train_tokens_per_second")  # LM forward included
    print(f"\nblocks.15.hook_resid_post of SmolLM2-135M-Instruct, TopK k={cfg.k}, {cfg.d_sae} latents, "
          f"{cfg.tokens:,} training tokens, {next(iter(rows.values()))['eval_tokens']:,} held-out tokens; "
          f"{cfg.threads} threads on {os.cpu_count()} cores")
    print(f"{'trainer':<28} {'L0':>6} {'dead':>7} {'expl.var':>9} {'CE incr.':>9} {'KL':>7} {'CE rec.':>8}")
    for name, m in rows.items():
        print(f"{name:<28} {m['l0']:6.1f} {m['dead'] / cfg.d_sae:7.2%} {m['explained_variance']:9.3f} "
              f"{m['ce_increase']:9.4f} {m['kl']:7.4f} {m['ce_loss_score']:8.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "threads": cfg.threads, "torch": torch.__version__,
        "config": json.loads(cfg.model_dump_json(exclude={"out", "save_activations"})),  # the run SAELens got
        "saelens": peer, "saelens_job": job, "rudder_train_tokens_per_second": rudder_tps,
        "results": {name: {**m, "dead_fraction": m["dead"] / cfg.d_sae} for name, m in rows.items()},
    }, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
