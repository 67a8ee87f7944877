"""The reference backend on a tiny random Llama: batching, the no-op guarantee, codebooks, sites."""

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM

from rudder.core.codebook import Codebook, CodebookConfig, save_codebooks
from rudder.core.hf_sites import hook_site
from rudder.core.sites import KINDS, Site
from rudder.core.steering import CodeEdit, FeatureEdit, Op, ReadoutSpec, RowIndex, SteeringSpec, StepTables, steer_site
from rudder.server.backends.base import EngineRequest, Sampling
from rudder.server.backends.reference import ReferenceEngine
from tests.server.engines import collect, tokens

PROMPTS = ["The capital of France", "Sparse autoencoders find", "The quick brown fox jumps", "Steering"]


@pytest.fixture(scope="module")
def engine(tiny_dir, tiny_sae_dir):
    return ReferenceEngine(tiny_dir, saes=[f"s={tiny_sae_dir}"])


def test_unsteered_request_in_a_steered_batch_matches_it_alone(engine):
    steer = SteeringSpec(features=(FeatureEdit("s", 3, Op.CLAMP, 30.0),))
    reqs = [EngineRequest(engine.tokenize(p), Sampling(max_tokens=12, ignore_eos=True)) for p in PROMPTS]
    alone = [asyncio.run(collect(engine, [r]))[0] for r in reqs]
    mixed = [EngineRequest(r.prompt_ids, r.sampling, steer if i % 2 else SteeringSpec()) for i, r in enumerate(reqs)]
    together = asyncio.run(collect(engine, mixed))
    for i in (0, 2):
        assert tokens(together[i]) == tokens(alone[i])
    assert any(tokens(together[i]) != tokens(alone[i]) for i in (1, 3)), "steering changed nothing"


def test_hooks_through_the_core_with_no_ops_leave_logits_bit_identical(tiny_dir):
    engine = ReferenceEngine(tiny_dir)
    ids = torch.tensor([engine.tokenize(PROMPTS[0])])

    def through_core(site, x):
        flat = x.reshape(-1, x.shape[-1])
        rows = RowIndex(torch.zeros(len(flat), dtype=torch.long), torch.arange(len(flat)))
        out, _ = steer_site(site, flat, None, StepTables(), rows)
        return out.view(x.shape)

    with torch.no_grad():
        before = engine.model(ids).logits
        handles = [hook_site(engine.model, Site(layer, kind), through_core)
                   for layer in range(engine.shape.num_layers) for kind in KINDS]
        after = engine.model(ids).logits
        for h in handles:
            h.remove()
    assert torch.equal(before, after)


def test_trace_gives_readouts_at_every_prompt_token(engine):
    ids = engine.tokenize(PROMPTS[1])
    spec = SteeringSpec(readouts=ReadoutSpec(saes=("s",), top_k=4, feature_ids=(1, 2)))
    (events,) = asyncio.run(collect(engine, [EngineRequest(ids, steering=spec, trace=True)]))
    assert [e.token_id for e in events] == ids and all(e.is_prompt for e in events)
    assert [e.position for e in events] == list(range(len(ids)))
    for e in events:
        (r,) = e.readouts
        assert len(r.top_ids) == 4 and r.selected_ids == [1, 2]
        assert r.top_values == sorted(r.top_values, reverse=True)


def test_generated_tokens_carry_the_readout_of_the_row_that_chose_them(engine):
    ids = engine.tokenize(PROMPTS[0])
    spec = SteeringSpec(readouts=ReadoutSpec(saes=("s",), top_k=2, include_prompt=True))
    (events,) = asyncio.run(collect(engine, [EngineRequest(ids, Sampling(max_tokens=3, ignore_eos=True), spec)]))
    prompt = [e for e in events if e.is_prompt]
    generated = [e for e in events if not e.is_prompt]
    assert len(prompt) == len(ids) and len(generated) == 3
    # the first generated token was chosen at the last prompt position: same activations
    assert generated[0].readouts[0].top_ids == prompt[-1].readouts[0].top_ids
    assert generated[-1].finish == "length"


def test_sampling_is_reproducible_with_a_seed(engine):
    ids = engine.tokenize(PROMPTS[2])
    r = EngineRequest(ids, Sampling(max_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=7, ignore_eos=True))
    a, b = asyncio.run(collect(engine, [r, r]))
    assert tokens(a) == tokens(b)


def test_codebook_model_serves_codes_and_forcing_reads_back(tmp_path, tiny_dir):
    import shutil

    model = tmp_path / "cb-model"
    shutil.copytree(tiny_dir, model)
    torch.manual_seed(0)
    cb = Codebook(CodebookConfig("attn1", "blocks.1.attn.hook_z", num_codes=32, k=2, d_code=16, num_heads=4))
    save_codebooks([cb], model)
    engine = ReferenceEngine(model)
    assert "attn1" in engine.artifacts.codebooks
    ids = engine.tokenize(PROMPTS[0])
    read = ReadoutSpec(codebooks=("attn1",))
    forced = SteeringSpec(codes=(CodeEdit("attn1", head=2, code=31),), readouts=read)
    plain, steered = asyncio.run(collect(engine, [
        EngineRequest(ids, Sampling(max_tokens=4, ignore_eos=True), SteeringSpec(readouts=read)),
        EngineRequest(ids, Sampling(max_tokens=4, ignore_eos=True), forced)]))
    for e in steered:
        (r,) = e.readouts
        assert len(r.codes) == 4 and 31 in r.codes[2]
    assert any(31 not in e.readouts[0].codes[2] for e in plain)


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_gemma_sites_mean_what_transformerlens_means(tmp_path, family):
    """Gemma normalises each sublayer's output before adding it: hook_mlp_out is the MLP's contribution
    after the post-feedforward norm, so resid_post = resid_pre + (attention's normed output) + mlp_out;
    and the engine serves the family with an SAE there, a clamp changing the continuation."""
    from tests.tiny import make_model, make_sae, make_tokenizer

    make_model(tmp_path / "m", family=family, heads=2, kv_heads=1, layers=2)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    tok = make_tokenizer()
    seen = {}

    def keep(name, x):
        seen[name] = x.detach().clone()
        return x

    handles = [hook_site(model, Site(1, k), keep) for k in ("hook_resid_pre", "hook_resid_post", "hook_mlp_out")]
    handles.append(model.model.layers[1].post_attention_layernorm.register_forward_hook(
        lambda m, a, out: seen.__setitem__("attn_out", out.detach().clone())))
    with torch.no_grad():
        model(torch.tensor([tok("The quick brown fox").input_ids]))
    for h in handles:
        h.remove()
    torch.testing.assert_close(seen["blocks.1.hook_resid_post"],
                               seen["blocks.1.hook_resid_pre"] + seen["attn_out"] + seen["blocks.1.hook_mlp_out"])

    make_sae(tmp_path / "s", "blocks.1.hook_mlp_out")
    engine = ReferenceEngine(tmp_path / "m", saes=[f"s={tmp_path / 's'}"])
    ids = engine.tokenize("The quick brown fox")
    plain, steered = asyncio.run(collect(engine, [
        EngineRequest(ids, Sampling(max_tokens=8, ignore_eos=True)),
        EngineRequest(ids, Sampling(max_tokens=8, ignore_eos=True),
                      SteeringSpec(features=(FeatureEdit("s", 7, Op.CLAMP, 200.0),)))]))
    assert tokens(plain) != tokens(steered)


@pytest.mark.parametrize("site", ["blocks.1.hook_resid_post", "blocks.0.attn.hook_z", "blocks.1.hook_mlp_out"])
def test_gpt_neox_serves_on_the_reference_backend(tmp_path, site):
    """Pythia's family (parallel residual; vLLM 0.32 runs it through its Transformers backend, which
    Rudder's op does not place in): an SAE at each site reads out, and a clamp steers."""
    from tests.tiny import make_model, make_sae

    model = make_model(tmp_path / "m", family="gpt_neox", heads=2, layers=2)
    make_sae(tmp_path / "s", site)
    engine = ReferenceEngine(model, saes=[f"s={tmp_path / 's'}"])
    read = ReadoutSpec(saes=("s",), top_k=3)
    requests = [EngineRequest(engine.tokenize(p), Sampling(max_tokens=8, ignore_eos=True), spec)
                for p in ("The quick brown fox", "What is the capital", "Sparse autoencoders")
                for spec in (SteeringSpec(readouts=read),
                             SteeringSpec(features=(FeatureEdit("s", 7, Op.CLAMP, 30.0),), readouts=read))]
    out = asyncio.run(collect(engine, requests))
    assert all(len(e.readouts[0].top_ids) == 3 for events in out for e in events)
    assert all(e.readouts[0].top_ids[0] == 7 for events in out[1::2] for e in events)  # the clamp reads back
    assert any(tokens(out[i]) != tokens(out[i + 1]) for i in range(0, len(out), 2))


def test_a_transcoder_reads_the_mlp_input_and_steers_its_output(tmp_path):
    """Its features are SAE.encode of the MLP's input (which the fixtures check against SAELens); a
    clamp reads back and changes the continuation, and a second SAE at the MLP's output sees the edit."""
    from tests.tiny import make_model, make_transcoder

    model_dir = make_model(tmp_path / "m", layers=2)
    tc = make_transcoder(tmp_path / "t", layer=1, architecture="jumprelu_skip_transcoder")
    engine = ReferenceEngine(model_dir, saes=[f"t={tmp_path / 't'}"])
    assert {s.name for s in engine.artifacts.saes["t"].sites} == {"blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out"}
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = engine.tokenize("The quick brown fox")
    seen = []
    handle = hook_site(model, Site(1, "mlp.hook_in"), lambda name, x: seen.append(x.detach().clone()) or x)
    with torch.no_grad():
        model(torch.tensor([ids]))
    handle.remove()
    want = tc.encode(seen[0][0])  # (prompt, d_sae)
    read = ReadoutSpec(saes=("t",), top_k=3)
    plain, steered = asyncio.run(collect(engine, [
        EngineRequest(ids, Sampling(max_tokens=8, ignore_eos=True),
                      SteeringSpec(readouts=ReadoutSpec(saes=("t",), top_k=3, include_prompt=True))),
        EngineRequest(ids, Sampling(max_tokens=8, ignore_eos=True),
                      SteeringSpec(features=(FeatureEdit("t", 7, Op.CLAMP, 40.0),), readouts=read))]))
    prompt = [e for e in plain if e.is_prompt]
    assert len(prompt) == len(ids)
    for e in prompt:
        values, top = want[e.position].topk(3)
        assert e.readouts[0].top_ids == top.tolist()
        assert e.readouts[0].top_values == pytest.approx(values.tolist(), rel=1e-5, abs=1e-5)
    assert all(e.readouts[0].top_ids[0] == 7 and e.readouts[0].top_values[0] == pytest.approx(40.0) for e in steered)
    assert tokens(plain) != tokens(steered)
