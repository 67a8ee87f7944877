"""The SAELens side of bench/default_sae_quality.py; runs in .venv-saelens, never in Rudder's.

    .venv-saelens/bin/python bench/saelens_sae_peer.py WORK_DIR

WORK_DIR holds `job.json` (the default SAE's training settings) and `activations.safetensors`
(every activation batch Rudder's trainer used, in its order, with its normalisation scale).
SAELens' own trainer (`SAETrainer`, `TopKTrainingSAE`) trains on exactly those batches,
normalised by the same scale, and writes its inference folder to WORK_DIR/saelens_sae
(in normalised units: the bench folds the scale back). Prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import sae_lens
import torch
from sae_lens import LoggingConfig
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer
from safetensors.torch import load_file


def batches(acts: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    while True:  # SAELens may draw past the end (norm estimate is off here, so it should not)
        for i in range(0, len(acts) - size + 1, size):
            yield acts[i:i + size]


def main() -> None:
    work = Path(sys.argv[1])
    job = json.loads((work / "job.json").read_text())
    torch.set_num_threads(job["threads"])
    torch.manual_seed(job["seed"])
    data = load_file(work / "activations.safetensors")
    acts = data["activations"] * data["scale"]  # the same normalisation Rudder trained with
    steps = len(acts) // job["batch_tokens"]
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=acts.shape[1], d_sae=job["d_sae"], k=job["k"],
                                                dtype="float32", device="cpu"))
    cfg = SAETrainerConfig(
        total_training_samples=steps * job["batch_tokens"], train_batch_size_samples=job["batch_tokens"],
        lr=job["lr"], lr_end=job["lr"] * job["min_lr_factor"], lr_scheduler_name="cosineannealing",
        lr_warm_up_steps=job["warmup_steps"], device="cpu",
        dead_feature_window=max(1, job["dead_window_tokens"] // job["batch_tokens"]),
        logger=LoggingConfig(log_to_wandb=False), n_checkpoints=0, save_final_checkpoint=False,
    )
    trainer = SAETrainer(cfg, sae, batches(acts, job["batch_tokens"]))
    start = time.perf_counter()
    trained = trainer.fit()
    seconds = time.perf_counter() - start
    trained.cfg.metadata.hook_name = job["site"]
    trained.cfg.metadata.model_name = "SmolLM2-135M-Instruct"
    trained.save_inference_model(work / "saelens_sae")
    print(json.dumps({"sae_lens": sae_lens.__version__, "steps": steps, "seconds": seconds,
                      "tokens_per_second": steps * job["batch_tokens"] / seconds,
                      "aux_loss_coefficient": sae.cfg.aux_loss_coefficient,
                      "decoder_init_norm": sae.cfg.decoder_init_norm}))


if __name__ == "__main__":
    main()
