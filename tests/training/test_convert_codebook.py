"""A checkpoint in the reference code's layout converts to a model that computes what the reference computes."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from rudder.core.codebook import load_codebooks
from rudder.core.errors import ArtifactError
from rudder.training.codebook import snapping
from rudder.training.convert_codebook import convert
from rudder.training.tokfsm import TokFSM, make_model, save_model

N, K = 24, 2


def reference_layout(tmp_path, similarity):
    """A tiny GPT-NeoX wrapped as codebook-features saves it: group codebooks per head at layer 1's
    attention, one vanilla codebook at layer 0's MLP, all under `model.`."""
    base = tmp_path / "base"
    model = make_model(hidden=64, layers=2, heads=2, mlp=128)
    save_model(model, TokFSM.build(), base, {})
    g = torch.Generator().manual_seed(1)
    state = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    books = {}
    for h in range(2):
        prefix = f"model.gpt_neox.layers.1.attention.codebook_layer.codebook.{h}"
        books[("attn", h)] = (torch.randn(N, 32, generator=g) * torch.rand(N, 1, generator=g) * 3,
                              1 + 0.2 * torch.randn(32, generator=g), 0.1 * torch.randn(32, generator=g))
        (state[f"{prefix}.codebook.weight"], state[f"{prefix}.ln.weight"],
         state[f"{prefix}.ln.bias"]) = books[("attn", h)]
    prefix = "model.gpt_neox.layers.0.mlp.codebook_layer"
    books[("mlp", 0)] = (torch.randn(N, 64, generator=g), torch.ones(64), torch.zeros(64))
    state[f"{prefix}.codebook.weight"], state[f"{prefix}.ln.weight"], state[f"{prefix}.ln.bias"] = books[("mlp", 0)]
    ref = tmp_path / "ref"
    ref.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, ref / "model.safetensors")
    (ref / "config.json").write_text(json.dumps({
        "codebook_at": ["attn_preproj", "mlp"], "num_codes": N, "k_codebook": [K, 1], "layers_to_snap": [0, 1],
        "codebook_type": ["group", "vanilla"], "similarity_metric": similarity}))
    return base, ref, books


def reference_forward(base, books, ids, similarity):
    """The reference's computation written out: LN the input, score, mean of the top-k codes (the codes
    themselves are the output)."""
    model = AutoModelForCausalLM.from_pretrained(base).eval()

    def snap(x, codes, w, b, k):
        xn = F.layer_norm(x, (x.shape[-1],), w, b)
        logits = xn @ codes.T if similarity == "inner_product" else -torch.cdist(xn, codes)
        return codes[logits.topk(k, dim=-1).indices].mean(-2)

    def attn_pre(module, args):
        x = args[0]
        heads = [snap(x[..., h * 32:(h + 1) * 32], *books[("attn", h)], K) for h in range(2)]
        return (torch.cat(heads, -1),)

    def mlp_post(module, args, out):
        return snap(out, *books[("mlp", 0)], 1)

    model.gpt_neox.layers[1].attention.dense.register_forward_pre_hook(attn_pre)
    model.gpt_neox.layers[0].mlp.register_forward_hook(mlp_post)
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("similarity", ["inner_product", "euclidean"])
def test_converted_checkpoint_reproduces_the_reference(tmp_path, similarity):
    base, ref, books = reference_layout(tmp_path, similarity)
    cfgs = convert(ref, base, tmp_path / "out")
    assert {(c.id, c.site, c.num_heads, c.k, c.similarity) for c in cfgs} == {
        ("attn_preproj.1", "blocks.1.attn.hook_z", 2, K, similarity),
        ("mlp.0", "blocks.0.hook_mlp_out", 1, 1, similarity)}
    ids = TokFSM.build().sample(4, torch.Generator().manual_seed(0))
    want = reference_forward(base, books, ids, similarity)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    codebooks = {cb.cfg.id: cb for cb in load_codebooks(tmp_path / "out")}
    with torch.no_grad(), snapping(model, codebooks):
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        plain = model(ids).logits
    assert not torch.allclose(plain, want, atol=1e-3)  # the codebooks matter to the output


def test_a_folder_without_codebook_config_is_refused(tmp_path):
    base, ref, _ = reference_layout(tmp_path, "euclidean")
    (ref / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    with pytest.raises(ArtifactError, match="codebook-features checkpoint"):
        convert(ref, base, tmp_path / "out")
