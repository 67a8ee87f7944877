"""Our codebook layer against the paper's formula, written out independently here."""

import pytest
import torch
import torch.nn.functional as F

from rudder.core.codebook import Codebook, CodebookConfig, ForcedCodes, load_codebooks, save_codebooks


def paper_snap(x, codes, ln_w, ln_b, k, similarity="cosine"):
    """Per head: LayerNorm the input, similarity to each code, mean of the top-k codes."""
    out, ids = [], []
    for h in range(codes.shape[0]):
        xn = F.layer_norm(x[:, h], (x.shape[-1],)) * ln_w[h] + ln_b[h]
        if similarity == "cosine":
            sim = F.cosine_similarity(xn[:, None, :], codes[h][None, :, :], dim=-1)  # (T, N)
        elif similarity == "inner_product":
            sim = xn @ codes[h].T
        else:
            sim = -((xn[:, None, :] - codes[h][None]) ** 2).sum(-1).sqrt()
        top = sim.topk(k, dim=-1).indices
        ids.append(top)
        out.append(codes[h][top].mean(dim=1))
    return torch.stack(out, 1), torch.stack(ids, 1)


def make(k=1, heads=1, n=32, d=8, seed=0, similarity="cosine"):
    torch.manual_seed(seed)
    cb = Codebook(CodebookConfig("cb", "blocks.0.attn.hook_z", num_codes=n, k=k, d_code=d, num_heads=heads,
                                 similarity=similarity))
    with torch.no_grad():
        cb.ln_weight.uniform_(0.5, 1.5)
        cb.ln_bias.normal_(0, 0.1)
    return cb


@pytest.mark.parametrize("similarity", ["cosine", "inner_product", "euclidean"])
@pytest.mark.parametrize("k,heads", [(1, 1), (3, 1), (1, 4), (4, 3)])
def test_snap_equals_paper_formula(k, heads, similarity):
    cb = make(k, heads, similarity=similarity)
    with torch.no_grad():
        cb.codes.mul_(torch.rand(heads, 32, 1) * 2 + 0.5)  # unequal norms: the metrics rank differently
    x = torch.randn(20, heads, 8) * 3
    y, ids = cb.snap(x)
    y_ref, ids_ref = paper_snap(x, cb.codes.detach(), cb.ln_weight.detach(), cb.ln_bias.detach(), k, similarity)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)


def test_outputs_live_in_code_space_not_layernorm_space():
    cb = make(k=1)
    with torch.no_grad():
        cb.codes.mul_(100)  # large codes: output scale follows the codes, not the LayerNorm
    y, ids = cb.snap(torch.randn(4, 1, 8))
    assert torch.equal(y, cb.codes[0, ids[:, 0, 0]][:, None, :])


def test_forcing_replaces_the_lowest_ranked_slot_and_strength_one_is_natural():
    cb = make(k=3, heads=2)
    x = torch.randn(6, 2, 8)
    y0, ids0 = cb.snap(x)
    scores = cb.scores(x)
    # a code outside row 2 / head 1's active set
    outside = next(c for c in scores[2, 1].argsort() .tolist() if c not in ids0[2, 1].tolist())
    forced = [ForcedCodes(torch.tensor([2]), torch.tensor([1]), torch.tensor([outside]), torch.tensor([1.0]))]
    y, ids = cb.snap(x, forced)
    assert ids[2, 1].tolist() == ids0[2, 1, :2].tolist() + [outside]  # best two kept, lowest replaced
    expected = (cb.codes[1, ids0[2, 1, 0]] + cb.codes[1, ids0[2, 1, 1]] + cb.codes[1, outside]) / 3
    torch.testing.assert_close(y[2, 1], expected)
    mask = torch.ones(6, 2, dtype=torch.bool)
    mask[2, 1] = False
    assert torch.equal(y[mask], y0[mask]) and torch.equal(ids[mask], ids0[mask])  # other rows untouched


def test_forcing_an_active_code_keeps_the_set_and_strength_scales_it():
    cb = make(k=2)
    x = torch.randn(3, 1, 8)
    y0, ids0 = cb.snap(x)
    c = ids0[0, 0, 0]
    same = cb.snap(x, [ForcedCodes(torch.tensor([0]), torch.tensor([0]), c[None], torch.tensor([1.0]))])
    assert torch.equal(same[0], y0) and torch.equal(same[1], ids0)
    y3, _ = cb.snap(x, [ForcedCodes(torch.tensor([0]), torch.tensor([0]), c[None], torch.tensor([3.0]))])
    torch.testing.assert_close(y3[0, 0], y0[0, 0] + 2 * cb.codes[0, c] / 2)


def test_two_forced_codes_fill_the_two_lowest_slots():
    cb = make(k=3)
    x = torch.randn(1, 1, 8)
    _, ids0 = cb.snap(x)
    free = [c for c in range(32) if c not in ids0[0, 0].tolist()][:2]
    passes = [ForcedCodes(torch.tensor([0]), torch.tensor([0]), torch.tensor([c]), torch.tensor([1.0])) for c in free]
    _, ids = cb.snap(x, passes)
    assert ids[0, 0].tolist() == [ids0[0, 0, 0].item(), free[1], free[0]]


def test_codebook_artifact_round_trip(tmp_path):
    cbs = [make(k=2, heads=4), make(k=1, heads=1, seed=1)]
    cbs[1].cfg.id, cbs[1].cfg.site = "mlp0", "blocks.0.hook_mlp_out"
    save_codebooks(cbs, tmp_path / "cb")
    loaded = load_codebooks(tmp_path / "cb")
    assert [c.cfg for c in loaded] == [c.cfg for c in cbs]
    x = torch.randn(5, 4, 8)
    assert torch.equal(loaded[0].snap(x)[0], cbs[0].snap(x)[0])


def test_scoring_follows_codes_changed_in_place():
    """Served codebooks cache their scoring codes; an in-place change (an optimizer step, a dead-code
    replacement, a load) must be seen at once."""
    cb = make(k=2, heads=2)
    x = torch.randn(10, 2, 8)
    with torch.no_grad():
        cb.snap(x)
        cb.codes.mul_(-1.0)
        cb.codes[0, :5] = torch.randn(5, 8)
        y, ids = cb.snap(x)
    y_ref, ids_ref = paper_snap(x, cb.codes.detach(), cb.ln_weight.detach(), cb.ln_bias.detach(), 2)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(y, y_ref)
