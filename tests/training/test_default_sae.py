"""The shipped default SAE (models/default-saes/resid15): the one artifact every machine serves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from rudder.core.default_model import default_model_dir, default_sae_dirs, is_converted
from rudder.core.sae import SAE

SHIPPED = Path(__file__).resolve().parents[2] / "models/default-saes/resid15"


def test_the_shipped_sae_is_small_complete_and_served_by_default(monkeypatch):
    monkeypatch.delenv("RUDDER_DEFAULT_SAES", raising=False)
    assert SHIPPED in default_sae_dirs()
    for f in SHIPPED.iterdir():
        assert f.stat().st_size < 20 * 2**20, f"{f.name} is over 20 MB"
    with safe_open(SHIPPED / "sae_weights.safetensors", "pt") as w:
        assert {w.get_slice(k).get_dtype() for k in w.keys()} == {"BF16"}
    sae = SAE.load(SHIPPED)
    assert sae.W_enc.dtype == torch.float32  # the loader upcasts: it runs in float32
    assert (sae.cfg.architecture, sae.cfg.k, sae.cfg.d_in, sae.cfg.d_sae) == ("topk", 32, 576, 4608)
    assert sae.cfg.hook_name == "blocks.15.hook_resid_post"
    meta = sae.cfg.metadata
    assert set(meta["corpus"]) == {"wordnet", "fortunes", "stdlib"}
    ev = meta["eval"]
    # the targets, measured at training on 32,768 held-out tokens
    assert ev["dead"] / sae.cfg.d_sae < 0.05 and ev["l0"] <= 64 and ev["ce_loss_score"] >= 0.95
    features = json.loads((SHIPPED / "feature_metadata.json").read_text())["features"]
    assert [f["id"] for f in features] == list(range(sae.cfg.d_sae))
    alive = [f for f in features if f["density"] > 0]
    # the metadata pass and the evaluation see the same tokens through differently shaped bf16 forwards
    assert abs(len(alive) - (sae.cfg.d_sae - ev["dead"])) <= 0.01 * sae.cfg.d_sae
    assert all(f["max_activation"] > 0 and f["top_examples"] for f in alive)


@pytest.mark.default_model
@pytest.mark.slow
@pytest.mark.skipif(not is_converted(), reason="default model not converted: run `rudder fetch-default`")
def test_the_shipped_sae_reconstructs_the_default_model_here():
    """Robust properties only, on this machine's float32 forward and the stdlib's text."""
    from rudder.training.corpus import train_eval_split
    from rudder.training.evaluate import evaluate_sae
    from rudder.training.lm import HookedLM

    lm = HookedLM.load(default_model_dir())
    windows = train_eval_split(lm.tokenizer, 128, eval_tokens=3072).eval
    m = evaluate_sae(lm, SAE.load(SHIPPED), windows)
    assert m["l0"] == pytest.approx(32, abs=0.5)
    assert m["explained_variance"] > 0.6
    assert m["ce_loss_score"] > 0.9
