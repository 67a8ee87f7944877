"""Each model family the vLLM backend serves, on a tiny random model, against the reference
backend (the Llama layout is tested at length in test_vllm_backend.py). One engine per family:
each is a different model; this module is apart so that a parallel run balances it."""

from __future__ import annotations

import asyncio
import os

import pytest

from rudder.core.errors import ArtifactError
from rudder.core.hf_sites import VLLM_FAMILIES
from rudder.core.steering import FeatureEdit, Op, ReadoutSpec, SteeringSpec
from rudder.server.backends.base import EngineRequest, Sampling
from rudder.server.backends.reference import ReferenceEngine
from tests.server.engines import assert_same_readouts, collect, start, tokens
from tests.tiny import make_model, make_sae, make_tokenizer

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB per engine; the tiny models need little

vllm_backend = pytest.importorskip("vllm") and pytest.importorskip("rudder.server.backends.vllm")
pytestmark = pytest.mark.vllm

PROMPTS = ["The capital of France", "Sparse autoencoders find", "The quick brown fox jumps"]


# Llama is test_vllm_backend.py; Gemma-2, GPT-2 and GPT-NeoX also with SAEs at attn.hook_z and hook_mlp_out
FAMILY_SITES = {family: ("blocks.1.hook_resid_post",) for family in VLLM_FAMILIES if family != "llama"}
FAMILY_SITES["llama-3-rope"] = ("blocks.1.hook_resid_post",)  # Llama-3's rope scaling (factor 8 past 64 positions)
LLAMA3_ROPE = dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 64})
FAMILY_SITES["gemma2"] = FAMILY_SITES["gpt2"] = FAMILY_SITES["gpt_neox"] = (
    "blocks.1.hook_resid_post", "blocks.0.attn.hook_z", "blocks.1.hook_mlp_out")


@pytest.mark.parametrize("family", sorted(FAMILY_SITES))
def test_each_family_serves_as_on_the_reference_backend(loop, tmp_path, family):
    """A tiny random model of each family: an SAE at each site reads out the same top features on both
    backends, greedy tokens agree, and a clamp changes the continuation."""
    extra = LLAMA3_ROPE if family == "llama-3-rope" else {}
    model = make_model(tmp_path / family, family=family.partition("-")[0], heads=2, kv_heads=1, layers=2, **extra)
    saes = []
    for i, site in enumerate(FAMILY_SITES[family]):
        make_sae(tmp_path / f"s{i}", site, seed=i)
        saes.append(f"s{i}={tmp_path / f's{i}'}")
    names = tuple(s.split("=")[0] for s in saes)
    read = ReadoutSpec(saes=names, top_k=4)
    clamps = [SteeringSpec(features=(FeatureEdit(name, 7, Op.CLAMP, 30.0),), readouts=read) for name in names]
    engine = start(loop, vllm_backend.VllmEngine(model, saes, max_model_len=256))
    try:
        requests = [EngineRequest(engine.tokenize(p), Sampling(max_tokens=8, ignore_eos=True), spec)
                    for p in PROMPTS for spec in (SteeringSpec(readouts=read), *clamps)]
        got = loop.run(collect(engine, requests))
    finally:
        loop.run(engine.stop())
    want = asyncio.run(collect(ReferenceEngine(model, saes), requests))
    # Gemma-2 soft-caps its attention logits: vLLM's CPU attention kernel does it with its own tanh, and
    # values read after it differ from eager PyTorch's by up to ~0.15% (1e-3 holds with the cap off)
    rel = 2e-3 if family == "gemma2" else 1e-3
    for i, (g, w) in enumerate(zip(got, want)):
        assert tokens(g) == tokens(w), f"{family} request {i}"
        assert_same_readouts(g, w, rel)
    per_prompt = 1 + len(clamps)
    for c in range(1, per_prompt):  # each clamp steers some prompt
        assert any(tokens(got[i]) != tokens(got[i + c]) for i in range(0, len(got), per_prompt)), names[c - 1]




@pytest.mark.parametrize("backend", ["vllm", "reference"])
def test_a_family_without_a_layout_is_refused_naming_those_served(tmp_path, backend):
    from transformers import OPTConfig, OPTForCausalLM

    OPTForCausalLM(OPTConfig(num_hidden_layers=2, hidden_size=64, ffn_dim=128, num_attention_heads=2,
                             word_embed_proj_dim=64, vocab_size=320)).save_pretrained(tmp_path)
    make_tokenizer().save_pretrained(tmp_path)
    engine = vllm_backend.VllmEngine if backend == "vllm" else ReferenceEngine
    with pytest.raises(ArtifactError, match="model type 'opt' is not supported; Rudder serves llama, .*gpt_neox"):
        engine(tmp_path)
