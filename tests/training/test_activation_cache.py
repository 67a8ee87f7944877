"""The activation cache: written once, it trains the SAE the model would have trained; a cache of
other data is refused in one line, before training."""

from __future__ import annotations

import json

import pytest
import torch

from rudder.cli import main
from rudder.core.errors import InvalidArgument
from rudder.core.sae import SAE
from rudder.training.cache import MANIFEST
from rudder.training.config import load_config
from rudder.training.sae import run

SITE = "blocks.1.hook_resid_post"
DATA = {"context": 32, "corpus_tokens": 24_000, "eval_tokens": 1024, "seed": 0}
TRAIN = {"d_sae": 64, "tokens": 6144, "batch_tokens": 256, "buffer_tokens": 2048, "lr": 3e-3,
         "warmup_tokens": 512, "architecture": "topk", "k": 8}


def config(tiny_dir, out, **overrides):
    return load_config(None, {"model": str(tiny_dir), "sites": [SITE], **DATA, **TRAIN, "out": str(out),
                              **overrides})


@pytest.fixture(scope="module")
def cache(tiny_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("cache") / "acts"
    sets = [x for k, v in {**DATA, **TRAIN}.items() for x in ("--set", f"{k}={v}")]
    assert main(["cache", "activations", "--model", str(tiny_dir), "--site", SITE, "--out", str(path),
                 "--shard-tokens", "1500", *sets]) == 0
    return path


def test_a_cache_trains_the_sae_the_model_would_have(tiny_dir, tmp_path, cache):
    manifest = json.loads((cache / MANIFEST).read_text())
    assert manifest["sites"] == [SITE] and manifest["d"] == {SITE: 64} and len(manifest["shards"]) > 2
    assert manifest["tokens"] == sum(s["rows"] for s in manifest["shards"]) >= TRAIN["tokens"]
    run(config(tiny_dir, tmp_path / "from_model"))
    run(config(tiny_dir, tmp_path / "from_cache", activations=str(cache)))
    a, b = SAE.load(tmp_path / "from_model"), SAE.load(tmp_path / "from_cache")
    for name, p in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[name], p, msg=name)
    assert b.cfg.metadata["eval"]["explained_variance"] == pytest.approx(a.cfg.metadata["eval"]["explained_variance"])


@pytest.mark.parametrize("overrides,message", [
    ({"sites": ["blocks.0.hook_resid_post"]}, "holds blocks.1.hook_resid_post, not blocks.0.hook_resid_post"),
    ({"seed": 1}, r"other data settings \(seed\)"),
    ({"tokens": 60_000}, "ran out after"),
    ({"objective": "e2e"}, "feeds the local objective"),
])
def test_a_cache_of_other_data_is_refused_and_nothing_is_written(tiny_dir, tmp_path, cache, overrides, message):
    with pytest.raises(InvalidArgument, match=message):
        run(config(tiny_dir, tmp_path / "sae", activations=str(cache), **overrides))
    assert not (tmp_path / "sae").exists()


def test_a_cache_of_a_file_changed_in_place_is_refused(tiny_dir, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text(" ".join(f"note {i} says the weather was fine and the tea was warm." for i in range(600)))
    small = {"corpus": [str(text)], "corpus_tokens": 4096, "eval_tokens": 256, "tokens": 512, "buffer_tokens": 512}
    sets = [x for k, v in {**DATA, **TRAIN, **small}.items() for x in ("--set", f"{k}={v}")]
    assert main(["cache", "activations", "--model", str(tiny_dir), "--site", SITE, "--out", str(tmp_path / "c"),
                 *sets]) == 0
    text.write_text(text.read_text().replace("tea", "ink"))  # same path, same size, other words
    with pytest.raises(InvalidArgument, match=r"other contents of .*notes\.txt"):
        run(config(tiny_dir, tmp_path / "sae", activations=str(tmp_path / "c"), **small))
    assert not (tmp_path / "sae").exists()


def test_a_cache_is_not_written_over(tiny_dir, cache):
    from rudder.training.cache import write

    with pytest.raises(InvalidArgument, match="already holds a cache"):
        write(config(tiny_dir, cache), cache)


@pytest.mark.slow
@pytest.mark.parametrize("source", ["model", "cache"])
def test_two_ranks_under_torchrun_train_what_one_process_trains(tiny_dir, tmp_path, cache, source):
    """Same data, same global batch: the ranks gather their chunks into one process's shuffle
    buffer and each trains on its half of every batch; DDP-style gradient averaging then gives
    one process's step."""
    import os
    import subprocess
    import sys

    extra = {"activations": str(cache)} if source == "cache" else {}
    run(config(tiny_dir, tmp_path / "one", **extra))
    sets = [x for k, v in {**DATA, **TRAIN, **extra, "threads": 1}.items() for x in ("--set", f"{k}={v}")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "rudder.cli", "train", "sae", "--model", str(tiny_dir), "--site", SITE,
           "--out", str(tmp_path / "two"), *sets]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = SAE.load(tmp_path / "one"), SAE.load(tmp_path / "two")
    assert two.cfg.metadata["world_size"] == 2
    for name, p in one.state_dict().items():
        torch.testing.assert_close(two.state_dict()[name], p, rtol=1e-4, atol=1e-5, msg=name)


def saelens_cache(path, acts: torch.Tensor, context: int) -> None:
    """A cache in the format SAELens' CacheActivationsRunner writes, made by its own `_create_shard`
    (the runner itself needs a TransformerLens model and a hub dataset): a dataset with one
    Array2D (context, d_in) column named by the hook, and token_ids."""
    from types import SimpleNamespace

    from datasets import Array2D, Features, Sequence, Value
    from sae_lens.cache_activations_runner import CacheActivationsRunner

    runner = object.__new__(CacheActivationsRunner)
    n, d = len(acts) // context, acts.shape[-1]
    runner.cfg = SimpleNamespace(hook_name=SITE, n_seq_in_buffer=n, d_in=d)
    runner.context_size = context
    runner.features = Features({SITE: Array2D(shape=(context, d), dtype="float32"),
                                "token_ids": Sequence(Value(dtype="int32"), length=context)})
    runner._create_shard((acts, torch.zeros(len(acts), dtype=torch.int32))).save_to_disk(str(path))


def test_a_cache_saelens_wrote_trains_an_sae_here(tiny_dir, tmp_path):
    from rudder.training.cache import ActivationCache
    from rudder.training.corpus import train_eval_split
    from rudder.training.lm import HookedLM

    lm = HookedLM.load(tiny_dir)
    windows = train_eval_split(lm.tokenizer, 33, 0, max_tokens=33 * 400).train[:400].long()
    acts = torch.cat([lm.activations(windows[i:i + 50], [SITE])[SITE] for i in range(0, 400, 50)])  # 32 a window
    saelens_cache(tmp_path / "sl", acts, 32)
    cfg = config(tiny_dir, tmp_path / "sae", activations=str(tmp_path / "sl"))
    first = ActivationCache(tmp_path / "sl", cfg, [SITE], dims={SITE: 64}).take()
    torch.testing.assert_close(first[SITE], acts[:16 * 32])  # 16 sequences a chunk, every position
    second_rank = ActivationCache(tmp_path / "sl", cfg, [SITE], rank=1, size=2).take()
    torch.testing.assert_close(second_rank[SITE], acts[16 * 32:32 * 32])
    (result,) = run(config(tiny_dir, tmp_path / "sae", activations=str(tmp_path / "sl"))).values()
    (from_model,) = run(config(tiny_dir, tmp_path / "from_model")).values()  # other rows (SAELens keeps sinks)
    assert result["explained_variance"] == pytest.approx(from_model["explained_variance"], abs=0.1)
    saelens_cache(tmp_path / "narrow", acts[:, :32], 32)
    with pytest.raises(InvalidArgument, match="width 32, the model's is 64"):
        run(config(tiny_dir, tmp_path / "other", activations=str(tmp_path / "narrow")))


@pytest.mark.slow
def test_a_two_rank_run_killed_and_resumed_ends_as_the_uninterrupted_run(tiny_dir, tmp_path):
    """The checkpoint keeps the shuffle buffer, the gathered queue and the data position, and rank 0
    hands it to rank 1: the resumed run trains the very SAE one uninterrupted process trains. Rank 0
    dies at a known checkpoint (RUDDER_FAULT_EXIT_AT_STEP) and torchrun takes rank 1 down with it."""
    import os
    import subprocess
    import sys

    run(config(tiny_dir, tmp_path / "whole", checkpoint_every_steps=4))
    sets = [x for k, v in {**DATA, **TRAIN, "threads": 1, "checkpoint_every_steps": 4}.items()
            for x in ("--set", f"{k}={v}")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "rudder.cli", "train", "sae", "--model", str(tiny_dir), "--site", SITE,
           "--out", str(tmp_path / "two"), *sets]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ckpt = tmp_path / "two.ckpt" / "checkpoint.pt"
    # the run dies right after its step-8 checkpoint (as a SIGKILL would), whatever the machine's speed
    killed = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                            env={**env, "RUDDER_FAULT_EXIT_AT_STEP": "8"})
    assert killed.returncode != 0 and ckpt.exists()
    killed_at = torch.load(ckpt, weights_only=False)["step"]
    assert killed_at == 8 and not (tmp_path / "two").exists()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"at step {killed_at}" in done.stderr
    whole, resumed = SAE.load(tmp_path / "whole"), SAE.load(tmp_path / "two")
    for name, p in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], p, rtol=1e-4, atol=1e-5, msg=name)
