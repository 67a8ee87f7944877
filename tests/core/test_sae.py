"""SAELens folder format and the encode/decode formulas."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rudder.core.errors import ArtifactError
from rudder.core.sae import ACTIVATIONS, SAE, SAELENS_FORMAT_VERSION, register_activation


def write_saelens_folder(path, architecture="standard", d_in=8, d_sae=16, k=None, seed=0):
    """A folder written by hand exactly as SAELens v6 writes one."""
    g = torch.Generator().manual_seed(seed)
    w = {
        "W_enc": torch.randn(d_in, d_sae, generator=g),
        "b_enc": torch.randn(d_sae, generator=g),
        "W_dec": torch.randn(d_sae, d_in, generator=g),
        "b_dec": torch.randn(d_in, generator=g),
    }
    if architecture == "jumprelu":
        w["threshold"] = torch.rand(d_sae, generator=g)
    path.mkdir(parents=True)
    save_file(w, path / "sae_weights.safetensors")
    cfg = {"architecture": architecture, "d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"model_name": "tiny", "hook_name": "blocks.1.hook_resid_post", "prepend_bos": True}}
    if k:
        cfg["k"] = k
    (path / "cfg.json").write_text(json.dumps(cfg))
    return w


@pytest.mark.parametrize("architecture,k", [("standard", None), ("topk", 3), ("jumprelu", None)])
def test_saelens_folder_loads_and_encodes_per_formula(tmp_path, architecture, k):
    w = write_saelens_folder(tmp_path / "sae", architecture, k=k)
    sae = SAE.load(tmp_path / "sae")
    assert sae.cfg.hook_name == "blocks.1.hook_resid_post" and sae.cfg.model_name == "tiny"
    x = torch.randn(5, 8)
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    if architecture == "standard":
        expected = pre.clamp(min=0)
    elif architecture == "topk":
        keep = pre.topk(k, dim=-1).indices
        expected = torch.zeros_like(pre).scatter(-1, keep, pre.gather(-1, keep).clamp(min=0))
        assert ((sae.encode(x) > 0).sum(-1) <= k).all()
    else:
        expected = torch.where(pre > w["threshold"], pre, torch.zeros_like(pre)).clamp(min=0)
    torch.testing.assert_close(sae.encode(x), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sae.decode(expected), expected @ w["W_dec"] + w["b_dec"], rtol=1e-6, atol=1e-6)


def test_save_then_load_round_trips_and_writes_saelens_keys(tmp_path):
    write_saelens_folder(tmp_path / "a", "topk", k=4)
    sae = SAE.load(tmp_path / "a")
    sae.save(tmp_path / "b")
    cfg = json.loads((tmp_path / "b" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 4
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    assert cfg["metadata"]["sae_lens_version"] == SAELENS_FORMAT_VERSION  # else SAELens reads it as pre-6
    again = SAE.load(tmp_path / "b")
    for name, p in sae.named_parameters():
        assert torch.equal(p, dict(again.named_parameters())[name])


def test_mismatched_shapes_and_unknown_architecture_are_clear_errors(tmp_path):
    write_saelens_folder(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "cfg.json").read_text())
    cfg["d_sae"] = 17
    (tmp_path / "a" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match="do not match"):
        SAE.load(tmp_path / "a")
    cfg["architecture"] = "gated-ish"
    (tmp_path / "a" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match="not supported"):
        SAE.load(tmp_path / "a")
    with pytest.raises(ArtifactError, match="not an SAE folder"):
        SAE.load(tmp_path / "nothing")


def test_registering_an_architecture_twice_raises():
    assert set(ACTIVATIONS) >= {"standard", "topk", "jumprelu"}
    with pytest.raises(ValueError, match="twice"):
        register_activation("standard")(lambda sae, pre: pre)


FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "saelens"


TRANSCODER_FIXTURES = ["transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder"]


@pytest.mark.parametrize("fixture", ["standard", "topk", "jumprelu", "topk_rescaled", "gated", *TRANSCODER_FIXTURES])
def test_folders_written_by_saelens_give_saelens_outputs(fixture):
    """Fixtures saved by SAELens 6.54.12 itself (scripts/make_saelens_fixtures.py), with its outputs:
    features, and the reconstruction (a transcoder's prediction of the MLP's output, skip term in)."""
    sae = SAE.load(FIXTURES / fixture)
    expected = load_file(FIXTURES / fixture / "expected.safetensors")
    if fixture in TRANSCODER_FIXTURES:
        assert sae.cfg.architecture == fixture and sae.cfg.is_transcoder
        assert (sae.cfg.hook_name, sae.cfg.hook_name_out) == ("blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out")
    else:
        assert sae.cfg.architecture == fixture.split("_")[0] and sae.cfg.hook_name == "blocks.1.hook_resid_post"
    f = sae.encode(expected["x"])
    torch.testing.assert_close(f, expected["features"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae(expected["x"]), expected["reconstruction"], rtol=1e-5, atol=1e-5)


def test_an_saelens_sae_of_one_head_serves_as_an_sae_of_its_whole_site():
    """`metadata.hook_head_index`: widened to every head at load, it reads head 1 as SAELens does and
    its reconstruction writes head 1 alone (the other heads' columns are zero, so edits leave them)."""
    from rudder.core.artifacts import Artifacts
    from rudder.core.hf_sites import ModelShape

    shape = ModelShape("llama", num_layers=2, d_model=64, num_heads=4, d_head=16, vocab_size=320)
    for weights in (False, True):  # the front end reads the config only; the workers load the weights
        attached = Artifacts().add_sae(f"h={FIXTURES / 'standard_head'}", shape, torch.device("cpu"), weights=weights)
        assert attached.cfg.d_in == 64 and attached.site.name == "blocks.0.attn.hook_z"
    sae = attached.sae
    expected = load_file(FIXTURES / "standard_head" / "expected.safetensors")
    x = torch.randn(len(expected["x"]), 4, 16)
    x[:, 1] = expected["x"]
    f = sae.encode(x.flatten(1))
    torch.testing.assert_close(f, expected["features"], rtol=1e-5, atol=1e-5)
    out = sae.decode(f).unflatten(1, (4, 16))
    torch.testing.assert_close(out[:, 1], expected["reconstruction"], rtol=1e-5, atol=1e-5)
    assert out[:, [0, 2, 3]].abs().max() == 0
    bad = ModelShape("llama", num_layers=2, d_model=64, num_heads=2, d_head=32, vocab_size=320)
    with pytest.raises(ArtifactError, match="reads head 1 with d_in=16, but this llama model has 2 heads of 32"):
        Artifacts().add_sae(f"h={FIXTURES / 'standard_head'}", bad, torch.device("cpu"))


def test_an_older_scaling_factor_is_folded_into_the_decoder(tmp_path):
    """SAELens before 6 could scale features before decoding (`scaling_factor`): the same as scaling
    the decoder's rows, which is what loading does; the features read out are unchanged."""
    w = write_saelens_folder(tmp_path / "a", "standard")
    scale = torch.rand(w["W_dec"].shape[0]) + 0.5
    save_file({**w, "scaling_factor": scale}, tmp_path / "a" / "sae_weights.safetensors")
    sae = SAE.load(tmp_path / "a")
    x = torch.randn(5, w["W_enc"].shape[0])
    f = sae.encode(x)
    torch.testing.assert_close(sae.decode(f), (f * scale) @ w["W_dec"] + w["b_dec"])


def test_topk_rescaled_by_decoder_norm_is_folded_at_load():
    """SAELens' TopK trainer keeps `rescale_acts_by_decoder_norm`: we fold the norms in at load."""
    raw = load_file(FIXTURES / "topk_rescaled" / "sae_weights.safetensors")
    norms = raw["W_dec"].norm(dim=1)
    assert (norms - 1).abs().max() > 0.5  # the fixture's rows are far from unit norm: folding matters
    sae = SAE.load(FIXTURES / "topk_rescaled")
    assert not sae.cfg.rescale_acts_by_decoder_norm
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(sae.cfg.d_sae))
    torch.testing.assert_close(sae.W_enc, raw["W_enc"] * norms)


def edit_cfg(path, **changes):
    cfg = json.loads((path / "cfg.json").read_text())
    for key, value in changes.items():
        if key == "metadata":
            cfg["metadata"].update(value)
        else:
            cfg[key] = value
    (path / "cfg.json").write_text(json.dumps(cfg))


def test_a_legacy_topk_config_loads_as_topk(tmp_path):
    """SAELens before 6 wrote TopK SAEs as `standard` with `activation_fn_str: topk`."""
    w = write_saelens_folder(tmp_path / "a", "standard")
    edit_cfg(tmp_path / "a", activation_fn_str="topk", activation_fn_kwargs={"k": 3})
    sae = SAE.load(tmp_path / "a")
    assert sae.cfg.architecture == "topk" and sae.cfg.k == 3
    x = torch.randn(5, 8)
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    top = pre.topk(3, dim=-1)
    want = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    torch.testing.assert_close(sae.encode(x), want)


@pytest.mark.parametrize("changes,fragments", [
    (dict(hook_head_index=2), ("hook_head_index", "one attention head")),
    (dict(model_from_pretrained_kwargs={"fold_value_biases": True}), ("fold_value_biases",)),
    (dict(activation_fn="tanh-relu"), ("activation_fn 'tanh-relu'",)),
    (dict(dtype="float64x"), ("dtype 'float64x'",)),
])
def test_configs_rudder_cannot_serve_faithfully_are_refused_with_the_key(tmp_path, changes, fragments):
    write_saelens_folder(tmp_path / "a")
    edit_cfg(tmp_path / "a", **changes)
    with pytest.raises(ArtifactError) as e:
        SAE.load(tmp_path / "a")
    for f in fragments:
        assert f in str(e.value)


def test_processing_that_leaves_the_sites_alone_is_accepted(tmp_path):
    write_saelens_folder(tmp_path / "a")
    edit_cfg(tmp_path / "a", metadata={"model_from_pretrained_kwargs": {"fold_ln": True, "center_unembed": True,
                                                                         "center_writing_weights": False}})
    assert SAE.load(tmp_path / "a").cfg.d_sae == 16


def test_center_writing_weights_is_applied_as_the_change_of_basis_it_is(tmp_path):
    """TransformerLens' center_writing_weights (gpt2-small-res-jb) centres every weight that writes to the
    residual stream: its stream is then the raw stream minus its mean, at every residual site. Checked on
    a tiny GPT-2 centred by hand; the SAE reads its input so, and only at residual-stream sites."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from rudder.core.hf_sites import hook_site
    from rudder.core.sites import Site

    torch.manual_seed(0)
    raw = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16)).eval()
    centred = GPT2LMHeadModel(raw.config).eval()
    centred.load_state_dict(raw.state_dict())
    with torch.no_grad():
        for emb in (centred.transformer.wte.weight, centred.transformer.wpe.weight):
            emb.sub_(emb.mean(-1, keepdim=True))
        for block in centred.transformer.h:
            for proj in (block.attn.c_proj, block.mlp.c_proj):  # Conv1D: weight (in, out)
                proj.weight.sub_(proj.weight.mean(-1, keepdim=True))
                proj.bias.sub_(proj.bias.mean())
    sites = [Site(1, "hook_resid_pre"), Site(1, "hook_mlp_out"), Site(1, "hook_resid_post")]

    def acts(model):
        seen = {}

        def keep(name, x):
            seen[name] = x.clone()
            return x

        handles = [hook_site(model, s, keep) for s in sites]
        with torch.no_grad():
            model(torch.tensor([[1, 5, 9, 3]]))
        for h in handles:
            h.remove()
        return seen

    a, b = acts(raw), acts(centred)
    for s in sites:
        torch.testing.assert_close(b[s.name], a[s.name] - a[s.name].mean(-1, keepdim=True), rtol=1e-4, atol=1e-5)

    w = write_saelens_folder(tmp_path / "a", d_in=32)
    edit_cfg(tmp_path / "a", metadata={"model_from_pretrained_kwargs": {"center_writing_weights": True}})
    sae = SAE.load(tmp_path / "a")
    assert sae.cfg.center_input
    x = a["blocks.1.hook_resid_post"][0]
    torch.testing.assert_close(sae.encode(x), torch.relu((b["blocks.1.hook_resid_post"][0] - w["b_dec"]) @ w["W_enc"]
                                                         + w["b_enc"]), rtol=1e-4, atol=1e-4)
    edit_cfg(tmp_path / "a", metadata={"hook_name": "blocks.1.attn.hook_z"})  # z is not written to the stream
    assert not SAE.load(tmp_path / "a").cfg.center_input
    # TransformerLens centres LayerNorm models only: served on an RMSNorm family, the flag changes nothing
    from rudder.core.artifacts import Artifacts
    from rudder.core.hf_sites import ModelShape

    edit_cfg(tmp_path / "a", metadata={"hook_name": "blocks.1.hook_resid_post"})
    for family, centred in (("gpt2", True), ("gpt_neox", True), ("llama", False), ("gemma2", False)):
        shape = ModelShape(family, num_layers=2, d_model=32, num_heads=2, d_head=16, vocab_size=50)
        assert Artifacts().add_sae(str(tmp_path / "a"), shape, torch.device("cpu")).cfg.center_input == centred


def test_an_sae_runs_in_its_own_dtype(tmp_path):
    write_saelens_folder(tmp_path / "a")
    edit_cfg(tmp_path / "a", dtype="bfloat16")
    assert SAE.load(tmp_path / "a").W_enc.dtype == torch.bfloat16


@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu", "gated"])
def test_folders_rudder_writes_load_in_saelens_with_their_hook_and_outputs(tmp_path, architecture):
    """SAELens' own loader (the sae-lens extra) reads what `SAE.save` writes: hook and model names,
    and the same features and reconstructions."""
    sae_lens = pytest.importorskip("sae_lens", reason="the sae-lens extra (rudder[saelens]) is not installed")
    from rudder.core.sae import SAEConfig

    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=8, d_sae=24, hook_name="blocks.1.hook_mlp_out", architecture=architecture,
                        k=4 if architecture == "topk" else None, model_name="tiny"))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.5)
    sae.save(tmp_path / "s")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "s"), device="cpu")
    assert theirs.cfg.metadata.hook_name == "blocks.1.hook_mlp_out" and theirs.cfg.metadata.model_name == "tiny"
    x = torch.randn(6, 8) * 2
    with torch.no_grad():
        f = theirs.encode(x)
        torch.testing.assert_close(sae.encode(x), f, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae.decode(f), theirs.decode(f), rtol=1e-5, atol=1e-5)
