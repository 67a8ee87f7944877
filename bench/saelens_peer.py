"""The SAELens side of bench/sae_training.py; runs in its own environment, never in Rudder's.

    .venv-saelens/bin/python bench/saelens_peer.py WORK_DIR

WORK_DIR holds `job.json` (sizes, tokens, threads) and `windows.pt` (the token
windows Rudder trained on), and, optionally, `rudder_sae/` with `rudder_io.pt` (inputs
and Rudder's features): SAELens then loads Rudder's artifact and we compare outputs.
Prints one JSON line.

The model is a transformer-lens HookedTransformer of SmolLM2-135M's shape with
random weights (transformer-lens 3.9 has no SmolLM2 entry); the weights' values do
not change the cost of a forward.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from sae_lens import SAE, LanguageModelSAERunnerConfig, LoggingConfig, StandardTrainingSAEConfig
from sae_lens.llm_sae_training_runner import LanguageModelSAETrainingRunner
from transformer_lens import HookedTransformer, HookedTransformerConfig


def smollm2_shape() -> HookedTransformer:
    cfg = HookedTransformerConfig(
        d_model=576, n_layers=30, n_heads=9, d_head=64, n_key_value_heads=3, d_mlp=1536, d_vocab=49152,
        n_ctx=2048, act_fn="silu", gated_mlp=True, normalization_type="RMS", final_rms=True,
        positional_embedding_type="rotary", rotary_base=100000, original_architecture="LlamaForCausalLM",
        default_prepend_bos=False, seed=0,
    )
    return HookedTransformer(cfg).eval()


def train(model, dataset, job: dict, tokens: int, out: str) -> float:
    cfg = LanguageModelSAERunnerConfig(
        sae=StandardTrainingSAEConfig(d_in=job["d_in"], d_sae=job["d_sae"], l1_coefficient=1.0),
        model_name="smollm2-135m-shape", hook_name=job["site"], context_size=job["context"],
        is_dataset_tokenized=True, streaming=False, prepend_bos=False,
        training_tokens=tokens, train_batch_size_tokens=job["batch_tokens"],
        store_batch_size_prompts=job["store_batch_prompts"], n_batches_in_buffer=job["n_batches_in_buffer"],
        lr=job["lr"], device="cpu", dtype="float32", autocast=job["autocast"], autocast_lm=job["autocast"],
        logger=LoggingConfig(log_to_wandb=False), n_checkpoints=0, save_final_checkpoint=False,
        output_path=out, verbose=False, n_batches_for_norm_estimate=1,
    )
    runner = LanguageModelSAETrainingRunner(cfg, override_model=model, override_dataset=dataset)
    start = time.perf_counter()
    runner.run()
    return time.perf_counter() - start


def main() -> None:
    work = Path(sys.argv[1])
    job = json.loads((work / "job.json").read_text())
    torch.set_num_threads(job["threads"])
    windows = torch.load(work / "windows.pt")
    dataset = Dataset.from_dict({"input_ids": windows})
    model = smollm2_shape()
    result: dict = {"threads": job["threads"]}
    with tempfile.TemporaryDirectory() as tmp:
        train(model, dataset, job, job["warmup_tokens"], tmp + "/warmup")  # first runs are slow; see environment.md
        seconds = train(model, dataset, job, job["tokens"], tmp + "/timed")
    result["local_tokens_per_second"] = job["tokens"] / seconds
    result["local_seconds"] = seconds

    if (work / "rudder_sae").exists():  # Rudder's artifact, loaded by SAELens
        sae = SAE.load_from_disk(work / "rudder_sae")
        io = torch.load(work / "rudder_io.pt")
        with torch.no_grad():
            f = sae.encode(io["x"])
            recon = sae.decode(f)
        result["rudder_artifact_in_saelens"] = {
            "architecture": sae.cfg.architecture(),
            "hook_name": sae.cfg.metadata.hook_name,
            "max_abs_diff_features": (f - io["features"]).abs().max().item(),
            "max_abs_diff_reconstruction": (recon - io["reconstruction"]).abs().max().item(),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
