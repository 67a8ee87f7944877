"""SAEs written by SAELens itself, one of each v6 inference architecture, served through the gRPC server
on both backends: every prompt token's readout is what SAELens' own `encode` gives on that token's
activation as TransformerLens names it (captured from the Hugging Face model; the transcoders read
`ln2.hook_normalized`, the norm's output before its weights, which the model's random norm weights
make differ from the MLP's input), and a clamp on each steers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from rudder import client as rc
from rudder.core.hf_sites import hook_site
from rudder.core.sites import Site
from rudder.server.app import BackgroundServer
from rudder.server.requests import Limits
from tests.server.test_load_and_faults import BACKENDS, make_engine
from tests.tiny import make_model

sae_lens = pytest.importorskip("sae_lens", reason="the sae-lens extra (rudder[saelens]) is not installed")

D, HEADS = 64, 2
PROMPT = "Sparse autoencoders find features; codebooks snap activations to codes."
# name: (SAELens config class, its arguments, hook name, extra metadata)
TRANSCODE = dict(d_in=D, d_out=D, d_sae=96, apply_b_dec_to_input=False)
SAES = {
    "standard": ("StandardSAEConfig", dict(d_in=D, d_sae=96), "blocks.1.hook_resid_post", {}),
    "topk": ("TopKSAEConfig", dict(d_in=D, d_sae=96, k=6, rescale_acts_by_decoder_norm=True),
             "blocks.1.hook_resid_pre", {}),
    "jumprelu": ("JumpReLUSAEConfig", dict(d_in=D, d_sae=96), "blocks.0.hook_mlp_out", {}),
    "gated": ("GatedSAEConfig", dict(d_in=D, d_sae=96), "blocks.0.hook_resid_post", {}),
    "head": ("StandardSAEConfig", dict(d_in=D // HEADS, d_sae=48), "blocks.1.attn.hook_z", {"hook_head_index": 1}),
    "tc": ("TranscoderConfig", TRANSCODE, "blocks.0.ln2.hook_normalized", {"hook_name_out": "blocks.0.hook_mlp_out"}),
    "skip_tc": ("SkipTranscoderConfig", TRANSCODE, "blocks.1.ln2.hook_normalized",
                {"hook_name_out": "blocks.1.hook_mlp_out"}),
    "jr_tc": ("JumpReLUTranscoderConfig", TRANSCODE, "blocks.1.ln2.hook_normalized",
              {"hook_name_out": "blocks.1.hook_mlp_out"}),
    "jr_skip_tc": ("JumpReLUSkipTranscoderConfig", TRANSCODE, "blocks.0.ln2.hook_normalized",
                   {"hook_name_out": "blocks.0.hook_mlp_out"}),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The tiny model, and each SAE as SAELens saves it, with SAELens' features on the prompt."""
    root = tmp_path_factory.mktemp("saelens-served")
    model_dir = make_model(root / "m", heads=HEADS, kv_heads=1, layers=2, hidden=D)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():  # norm weights away from 1, so reading before or after them differs
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.uniform_(0.5, 2.0)
    model.save_pretrained(model_dir)
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_dir)(PROMPT).input_ids
    acts = {}

    def keep(name, x):
        acts[name] = x[0].detach().clone()
        return x

    def keep_normalized(layer):  # TransformerLens' RMSNorm hook_normalized: x / rms(x), before the weight
        def pre(module, args):
            x = args[0][0].detach()
            acts[f"blocks.{layer}.ln2.hook_normalized"] = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True)
                                                                        + module.variance_epsilon)
        return pre

    hooks = {spec[2] for spec in SAES.values()}
    handles = [hook_site(model, Site.parse(h), keep) for h in hooks if "hook_normalized" not in h]
    handles += [model.model.layers[Site.parse(h).layer].post_attention_layernorm.register_forward_pre_hook(
        keep_normalized(Site.parse(h).layer)) for h in hooks if "hook_normalized" in h]
    with torch.no_grad():
        model(torch.tensor([ids]))
    for h in handles:
        h.remove()
    torch.manual_seed(0)
    expected = {}
    for name, (cls, kwargs, hook, meta) in SAES.items():
        cfg = getattr(sae_lens, cls)(**kwargs)
        cfg.metadata.hook_name, cfg.metadata.model_name = hook, "tiny-llama"
        for key, value in meta.items():
            setattr(cfg.metadata, key, value)
        sae = sae_lens.SAE.from_dict(cfg.to_dict())
        with torch.no_grad():
            for p in sae.parameters():
                p.normal_(0, 0.3)
            if hasattr(sae, "threshold"):
                sae.threshold.uniform_(0, 0.3)
            x = acts[hook if "hook_normalized" in hook else Site.parse(hook).name]
            if "hook_head_index" in meta:
                x = x.unflatten(-1, (HEADS, D // HEADS))[:, meta["hook_head_index"]]
            expected[name] = sae.encode(x)  # (prompt, d_sae)
        sae.save_model(root / name)
    return model_dir, root, ids, expected


@pytest.fixture(scope="module", params=BACKENDS)
def served(request, folders):
    model_dir, root, ids, expected = folders
    engine = make_engine(request.param, model_dir, [f"{name}={root / name}" for name in SAES])
    with BackgroundServer(engine, "tiny", limits=Limits(max_tokens=8, max_readout_top_k=64)) as srv, \
            rc.Client(srv.address, timeout=600) as client:
        yield request.param, client, ids, expected


def test_each_architecture_reads_out_what_saelens_encodes(served):
    _, client, ids, expected = served
    info = {s.id: s for s in client.model_info().saes}
    assert (info["tc"].site, info["tc"].site_out) == ("blocks.0.mlp.hook_in", "blocks.0.hook_mlp_out")
    assert info["gated"].architecture == "gated" and info["standard"].site_out == ""
    assert info["head"].d_in == D  # one head, served as an SAE of the whole attn.hook_z site
    toks = client.trace(PROMPT, readouts=rc.readouts(saes=list(SAES), top_k=5))
    assert [t.id for t in toks] == ids
    tol = dict(rel=1e-5, abs=1e-5)  # float32 throughout (vLLM's kernels too, on this tiny model)
    for name, f in expected.items():
        for t in toks:
            got = t.readout(name).top
            values, _ = f[t.position].topk(5)
            assert [v for _, v in got] == pytest.approx(values.tolist(), **tol), (name, t.position)
            assert all(f[t.position, i] == pytest.approx(v, **tol) for i, v in got), (name, t.position)


def test_a_clamp_on_each_architecture_steers_and_reads_back(served):
    _, client, _, _ = served
    def run(*interventions):
        return [t for t in client.generate(PROMPT, max_tokens=6, ignore_eos=True, interventions=list(interventions),
                                           readouts=rc.readouts(saes=list(SAES), feature_ids=[5]))]
    plain = [t.id for t in run()]
    for name in SAES:
        steered = run(rc.clamp(name, 5, 40.0))
        assert all(t.readout(name).selected == {5: pytest.approx(40.0)} for t in steered), name
        assert [t.id for t in steered] != plain, name
