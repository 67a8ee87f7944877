"""The bfloat16 screen for a float32 SAE's top pre-activations gives the float32 answer: on random
encoders, on the default SAE, and where bfloat16 cannot tell the features apart (its certificate
fails and the rows are encoded in full)."""

from __future__ import annotations

import pytest
import torch

from rudder.core import screened_topk
from rudder.core.default_model import default_sae_dirs
from rudder.core.sae import SAE, SAEConfig


def exact_top(x, W, b, n):
    return torch.addmm(b, x, W).topk(n, dim=-1)


def assert_same_top(got, want, atol=1e-5):
    values, ids = got
    assert torch.allclose(values, want.values, rtol=1e-5, atol=atol)
    # ids may differ only between features whose values tie in float32
    same = ids == want.indices
    assert torch.allclose(values[~same], want.values[~same], rtol=0, atol=atol)
    assert same.float().mean() > 0.99


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n", [1, 16, 32])
def test_screened_top_equals_the_float32_encode_on_random_encoders(seed, n):
    g = torch.Generator().manual_seed(seed)
    d, F = 96, 1024
    W = torch.randn(d, F, generator=g) / d**0.5
    b = torch.randn(F, generator=g) * 0.1
    x = torch.randn(40, d, generator=g) * (1 + 10 * torch.rand(40, 1, generator=g))
    got = screened_topk.top_pre_acts(screened_topk.Screen.build(W, b), x, b, n)
    assert_same_top(got, exact_top(x, W, b, n))


@pytest.mark.parametrize("ties", [40, 256])
def test_where_bfloat16_cannot_rank_the_features_the_answer_is_still_float32s(ties):
    """`ties` features whose columns differ by less than bfloat16's resolution: the screen cannot rank
    them, the float32 encode can. 40 fit in the second, wider round of candidates; 256 send the rows
    to the full encode. A screen that trusted its first candidates would rank them wrongly."""
    g = torch.Generator().manual_seed(0)
    d, F, n = 64, 512, 8
    base = torch.randn(d, 1, generator=g)
    W = torch.cat([base + 1e-3 * torch.randn(d, ties, generator=g), 0.1 * torch.randn(d, F - ties, generator=g)], 1)
    b = torch.zeros(F)
    x = base.T.repeat(6, 1) + 0.01 * torch.randn(6, d, generator=g)
    screen = screened_topk.Screen.build(W, b)
    screened = torch.mm(x.to(torch.bfloat16), screen.w_lo).float().topk(n, dim=-1).indices
    exact = torch.addmm(b, x, W).topk(n, dim=-1).indices
    assert any(set(a.tolist()) != set(e.tolist()) for a, e in zip(screened, exact))  # bfloat16 alone picks wrongly
    values, ids = screened_topk.top_pre_acts(screen, x, b, n)
    full = torch.addmm(b, x, W)
    want = full.topk(n, dim=-1)
    assert torch.allclose(values, want.values, rtol=2e-6, atol=0)  # a wrong pick is ~1e-4 lower
    assert torch.allclose(full.gather(1, ids), want.values, rtol=2e-6, atol=0)


def test_the_default_sae_screens_to_its_float32_top_k():
    dirs = default_sae_dirs()
    if not dirs:
        pytest.skip("no default SAE in this tree")
    sae = SAE.load(dirs[0])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, sae.cfg.d_in, generator=g) * 0.4 + sae.b_dec.detach()
    with torch.no_grad():
        xs = sae._input(x)
        got = screened_topk.top_pre_acts(sae._screen(), xs, sae.encoder_bias, sae.cfg.k)
        assert_same_top(got, exact_top(xs, sae.W_enc, sae.encoder_bias, sae.cfg.k))


def test_topk_encode_screens_only_where_it_applies_and_follows_weight_changes(monkeypatch):
    monkeypatch.setattr(screened_topk, "_FAST_BF16", True)  # as on a CPU with AVX512-BF16 or AMX
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=32, d_sae=512, hook_name="blocks.0.hook_resid_post", architecture="topk", k=8))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(20, 32)
    with torch.no_grad():
        assert screened_topk.usable(sae.W_enc, x)
        values, ids = sae.topk_encode(x)
        dense = sae.encode(x)
        assert torch.allclose(torch.zeros_like(dense).scatter_(-1, ids, values), dense, atol=1e-5)
        sae.W_enc.mul_(-1)  # the screen is rebuilt for the new weights
        values, ids = sae.topk_encode(x)
        assert torch.allclose(torch.zeros_like(dense).scatter_(-1, ids, values), sae.encode(x), atol=1e-5)
    assert not screened_topk.usable(sae.W_enc, x)  # autograd on: the plain float32 path
    monkeypatch.setenv("RUDDER_SAE_SCREEN", "0")
    with torch.no_grad():
        assert not screened_topk.usable(sae.W_enc, x)
        assert not screened_topk.usable(sae.W_enc.to(torch.bfloat16), x)


@pytest.mark.parametrize("architecture", ["standard", "topk"])
@pytest.mark.parametrize("reading_only", [False, True])
def test_steering_through_the_screen_equals_the_whole_float32_encode(monkeypatch, architecture, reading_only):
    """A step with edits that push features out of the top (a clamp to 0 of each row's strongest) and
    into it (a large add), a top-8 readout and selected features, as a serving step runs it (no
    autograd): the edited activations, the readouts' ids and values, and the selected values
    equal those of the whole float32 encode (RUDDER_SAE_SCREEN=0)."""
    from rudder.core.steering import (
        FeatureEdit,
        Op,
        ReadoutSpec,
        RowIndex,
        SiteArtifacts,
        SteeringSpec,
        build_tables,
        steer_site,
    )

    monkeypatch.setattr(screened_topk, "_FAST_BF16", True)  # as on a CPU with AVX512-BF16 or AMX
    site = "blocks.1.hook_resid_post"
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=32, d_sae=256, hook_name=site, architecture=architecture,
                        k=24 if architecture == "topk" else None))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(5, 32)
    with torch.no_grad():
        strongest = sae.encode(x).argmax(-1)
    edits = () if reading_only else tuple(
        [FeatureEdit("s", int(f), Op.CLAMP, 0.0) for f in strongest.unique()] + [FeatureEdit("s", 11, Op.ADD, 50.0)])
    specs = [SteeringSpec(features=edits, readouts=ReadoutSpec(saes=("s",), top_k=8, feature_ids=(3, 11, 200)))]
    rows = RowIndex(torch.zeros(5, dtype=torch.long), torch.arange(5))

    def step():
        with torch.no_grad():
            out, (r,) = steer_site(site, x, SiteArtifacts(saes={"s": sae}), build_tables(specs, [5]), rows)
        return out, r

    screened_out, screened = step()
    monkeypatch.setenv("RUDDER_SAE_SCREEN", "0")
    whole_out, whole = step()
    torch.testing.assert_close(screened_out, whole_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(screened.top_values, whole.top_values, rtol=1e-5, atol=1e-5)
    assert torch.equal(screened.top_ids, whole.top_ids)
    assert torch.equal(screened.selected_ids, whole.selected_ids)
    torch.testing.assert_close(screened.selected_values, whole.selected_values, rtol=1e-5, atol=1e-5)
