"""The bfloat16 screen for a float32 SAE's top pre-activations gives the float32 answer: on random
encoders, on the default SAE, where bfloat16 cannot tell the features apart (its certificate fails
and the rows take a wider round, or the full encode), on rows with an inf, in chunks, and inside a
steering step's edits and readouts."""

from __future__ import annotations

import os
import shlex
import shutil

import pytest
import torch

from rudder.core import screen_kernel, screened_topk
from rudder.core.default_model import default_sae_dirs
from rudder.core.sae import SAE, SAEConfig
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


@pytest.fixture(autouse=True, params=["C kernel", "torch ops"])
def kernel(request, monkeypatch):
    """Every test here runs twice: the screen's work in C (`screen_kernel`), and as torch ops."""
    monkeypatch.setenv("RUDDER_SAE_KERNEL", "1" if request.param == "C kernel" else "0")
    if request.param == "C kernel":
        if not shutil.which(shlex.split(os.environ.get("CC", "cc"))[0]):
            pytest.skip("no C compiler here: the screen runs as torch ops")
        assert screen_kernel.library() is not None, "a C compiler is here but the screen's kernel did not build"
    return request.param


@pytest.fixture
def rounds(monkeypatch):
    """Each certification round the screen runs: (candidates, rows, rows that failed)."""
    seen: list[tuple[int, int, int]] = []
    real = screened_topk._round

    def spy(screen, x, b, n, m):
        out = real(screen, x, b, n, m)
        seen.append((m, x.shape[0], int(out[2].sum())))
        return out

    monkeypatch.setattr(screened_topk, "_round", spy)
    return seen


def exact_top(x, W, b, n):
    return torch.addmm(b, x, W).topk(n, dim=-1)


def assert_same_top(got, x, W, b, n):
    """The same values as the float32 encode's top n, and ids whose float32 values are those values
    (ids may differ only between features that tie in float32)."""
    values, ids = got
    full = torch.addmm(b, x, W)
    want = full.topk(n, dim=-1)
    torch.testing.assert_close(values, want.values, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(full.gather(1, ids), want.values, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n", [1, 16, 32])
def test_screened_top_equals_the_float32_encode_on_random_encoders(rounds, seed, n):
    g = torch.Generator().manual_seed(seed)
    d, F = 96, 1024
    W = torch.randn(d, F, generator=g) / d**0.5
    b = torch.randn(F, generator=g) * 0.1
    x = torch.randn(40, d, generator=g) * (1 + 10 * torch.rand(40, 1, generator=g))
    got = screened_topk.top_pre_acts(screened_topk.Screen.build(W, b), x, b, n)
    assert_same_top(got, x, W, b, n)
    assert rounds == [(n + screened_topk.MARGIN, 40, 0)]  # the bound is tight enough: every row certifies at once


@pytest.mark.parametrize("ties", [40, 256])
def test_where_bfloat16_cannot_rank_the_features_the_answer_is_still_float32s(rounds, ties):
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
    m = n + screened_topk.MARGIN
    assert rounds == [(m, 6, 6), (4 * m, 6, 0 if ties == 40 else 6)]  # the second round, or then the full encode


def test_rows_with_an_inf_are_encoded_in_full_and_the_others_are_screened():
    g = torch.Generator().manual_seed(2)
    d, F, n = 64, 512, 8
    W, b = torch.randn(d, F, generator=g), torch.zeros(F)
    x = torch.randn(5, d, generator=g)
    x[2, 7] = float("inf")
    values, ids = screened_topk.top_pre_acts(screened_topk.Screen.build(W, b), x, b, n)
    want = torch.addmm(b, x, W).topk(n, dim=-1)
    torch.testing.assert_close(values, want.values, rtol=2e-6, atol=1e-6, equal_nan=True)
    assert torch.equal(ids[2], want.indices[2])


def test_an_encoder_with_a_nan_column_gives_what_the_float32_encode_gives(rounds, kernel):
    """Corrupt weights: the float32 encode ranks the NaN feature first on every row. The torch ops'
    top-k ranks its NaN bound first too, so it is a candidate and the rows certify; the C kernel
    finds a bound it cannot trust, so every row fails and is encoded in full."""
    g = torch.Generator().manual_seed(5)
    d, F, n = 64, 512, 8
    W, b = torch.randn(d, F, generator=g), torch.zeros(F)
    W[3, 100] = float("nan")
    x = torch.randn(5, d, generator=g)
    values, ids = screened_topk.top_pre_acts(screened_topk.Screen.build(W, b), x, b, n)
    want = torch.addmm(b, x, W).topk(n, dim=-1)
    torch.testing.assert_close(values, want.values, equal_nan=True)
    assert torch.equal(ids, want.indices) and (ids[:, 0] == 100).all()
    assert [failed for _, _, failed in rounds] == ([5, 5] if kernel == "C kernel" else [0])


def test_long_inputs_are_screened_in_chunks_and_wide_top_n_falls_back_to_the_plain_encode(monkeypatch, rounds):
    g = torch.Generator().manual_seed(3)
    d, F = 32, 256
    W, b = torch.randn(d, F, generator=g), torch.randn(F, generator=g)
    x = torch.randn(10, d, generator=g)
    screen = screened_topk.Screen.build(W, b)
    monkeypatch.setattr(screened_topk, "CHUNK_ELEMENTS", 4 * (4 + screened_topk.MARGIN) * d * 3)  # 3 rows a chunk
    assert_same_top(screened_topk.top_pre_acts(screen, x, b, 4), x, W, b, 4)
    assert [r for _, r, _ in rounds] == [3, 3, 3, 1]
    rounds.clear()
    assert_same_top(screened_topk.top_pre_acts(screen, x, b, 60), x, W, b, 60)  # 4 x 76 candidates > 256
    assert rounds == []


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
        assert_same_top(got, xs, sae.W_enc, sae.encoder_bias, sae.cfg.k)


def test_topk_encode_screens_a_frozen_sae_and_follows_its_weights(monkeypatch, rounds):
    monkeypatch.setattr(screened_topk, "_FAST_BF16", True)  # as on a CPU with AVX512-BF16 or AMX
    monkeypatch.delenv("RUDDER_SAE_SCREEN", raising=False)
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=32, d_sae=512, hook_name="blocks.0.hook_resid_post", architecture="topk", k=8))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(20, 32)
    assert not screened_topk.usable(sae.W_enc, sae.encoder_bias, x)  # an SAE being trained is not screened
    sae.requires_grad_(False)  # as SAE.load leaves it
    assert screened_topk.usable(sae.W_enc, sae.encoder_bias, x)
    assert not screened_topk.usable(sae.W_enc.to(torch.bfloat16), sae.encoder_bias, x)

    def dense_from_topk():
        values, ids = sae.topk_encode(x)
        return torch.zeros(20, 512).scatter_(-1, ids, values)

    torch.testing.assert_close(dense_from_topk(), sae.encode(x), rtol=2e-6, atol=1e-6)
    assert len(rounds) == 1
    sae.W_enc.mul_(-1)  # written in place: the screen is rebuilt for the new weights
    torch.testing.assert_close(dense_from_topk(), sae.encode(x), rtol=2e-6, atol=1e-6)
    sae.b_enc = torch.nn.Parameter(torch.randn(512), requires_grad=False)  # replaced
    torch.testing.assert_close(dense_from_topk(), sae.encode(x), rtol=2e-6, atol=1e-6)
    assert len(rounds) == 3
    monkeypatch.setenv("RUDDER_SAE_SCREEN", "0")
    assert not screened_topk.usable(sae.W_enc, sae.encoder_bias, x)


@pytest.fixture
def screened_steps(monkeypatch):
    """The rows of each call a step made into the screen (its top n, or its membership test)."""
    calls = []

    def spied(real):
        def spy(*a):
            calls.append(a[1].shape[0])
            return real(*a)
        return spy

    for name in ("top_pre_acts", "topk_active_at", "topk_active_all"):
        monkeypatch.setattr(screened_topk, name, spied(getattr(screened_topk, name)))
    monkeypatch.setattr(screened_topk, "_FAST_BF16", True)  # as on a CPU with AVX512-BF16 or AMX
    monkeypatch.delenv("RUDDER_SAE_SCREEN", raising=False)
    return calls


def steer_twice(monkeypatch, screened_steps, sae, x, specs, screens: bool = True):
    """One steering step through the screen (if `screens`: an elementwise SAE's edits read their own
    columns, no screen), and the same with RUDDER_SAE_SCREEN=0."""

    rows = RowIndex(torch.zeros(x.shape[0], dtype=torch.long), torch.arange(x.shape[0]))

    def step():
        return steer_site(sae.cfg.hook_name, x, SiteArtifacts(saes={"s": sae}), build_tables(specs, [5]), rows)

    screened = step()
    assert bool(screened_steps) == screens  # the step went through the screen, or had no need of it
    monkeypatch.setenv("RUDDER_SAE_SCREEN", "0")
    screened_steps.clear()
    whole = step()
    assert not screened_steps
    return screened, whole


def assert_same_step(screened, whole):
    (s_out, s_reads), (w_out, w_reads) = screened, whole
    torch.testing.assert_close(s_out, w_out, rtol=1e-5, atol=1e-5)
    assert len(s_reads) == len(w_reads)
    for s, w in zip(s_reads, w_reads):
        torch.testing.assert_close(s.top_values, w.top_values, rtol=1e-5, atol=1e-5)
        assert torch.equal(s.top_ids, w.top_ids)
        assert torch.equal(s.selected_ids, w.selected_ids)
        torch.testing.assert_close(s.selected_values, w.selected_values, rtol=1e-5, atol=1e-5)


def random_frozen_sae(architecture: str, d_sae: int = 256) -> SAE:
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=32, d_sae=d_sae, hook_name="blocks.1.hook_resid_post", architecture=architecture,
                        k=24 if architecture == "topk" else None))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.3)
    return sae.requires_grad_(False)


@pytest.mark.parametrize("architecture", ["standard", "topk"])
@pytest.mark.parametrize("mode", ["edits and readouts", "readouts only", "edits only"])
def test_steering_through_the_screen_equals_the_whole_float32_encode(monkeypatch, screened_steps, architecture,
                                                                      mode):
    """A step with edits that push features out of the top (a clamp to 0 of each row's strongest,
    one of them then raised by a second op on the same feature) and into it (a large add), a top-8
    readout and selected features, as a serving step runs it (a frozen SAE): the edited
    activations, the readouts' ids and values, and the selected values equal those of the whole
    float32 encode (RUDDER_SAE_SCREEN=0)."""

    sae = random_frozen_sae(architecture)
    x = torch.randn(5, 32)
    strongest = sae.encode(x).argmax(-1).unique()
    edits = () if mode == "readouts only" else (
        *[FeatureEdit("s", int(f), Op.CLAMP, 0.0) for f in strongest], FeatureEdit("s", 11, Op.ADD, 50.0),
        FeatureEdit("s", int(strongest[0]), Op.ADD, 0.5))
    reads = ReadoutSpec() if mode == "edits only" else ReadoutSpec(saes=("s",), top_k=8, feature_ids=(3, 11, 200))
    specs = [SteeringSpec(features=edits, readouts=reads)]
    screens = not (mode == "edits only" and architecture == "standard")
    assert_same_step(*steer_twice(monkeypatch, screened_steps, sae, x, specs, screens))


@pytest.mark.parametrize("architecture", ["standard", "jumprelu"])
def test_a_readout_of_selected_features_only_reads_their_columns(architecture):
    """top_k 0 with selected features (one of them clamped): the readout and the edit the whole
    encode gives, from the selected features' columns alone."""

    sae = random_frozen_sae(architecture)
    x = torch.randn(5, 32)
    specs = [SteeringSpec(features=(FeatureEdit("s", 11, Op.CLAMP, 4.0),),
                          readouts=ReadoutSpec(saes=("s",), top_k=0, feature_ids=(3, 11, 200)))]
    rows = RowIndex(torch.zeros(5, dtype=torch.long), torch.arange(5))
    out, (r,) = steer_site(sae.cfg.hook_name, x, SiteArtifacts(saes={"s": sae}), build_tables(specs, [5]), rows)
    f = sae.encode(x)
    torch.testing.assert_close(out, x + (4.0 - f[:, 11:12]) * sae.W_dec[11], rtol=1e-5, atol=1e-5)
    f[:, 11] = 4.0
    assert r.top_ids.shape == (5, 0) and r.selected_ids.tolist() == [3, 11, 200]
    torch.testing.assert_close(r.selected_values, f[:, [3, 11, 200]], rtol=1e-5, atol=1e-5)


def test_a_readout_of_rows_with_few_active_features_shows_the_dense_encodes_zeros(monkeypatch, screened_steps):
    """Rows with fewer active features than the readout shows: its zeros carry the dense encode's ids
    (such a step is read from the whole encode)."""

    sae = random_frozen_sae("standard")
    with torch.no_grad():
        sae.b_enc[3:] = -50.0  # only features 0-2 can be active
    x = torch.randn(5, 32)
    specs = [SteeringSpec(readouts=ReadoutSpec(saes=("s",), top_k=8))]
    assert_same_step(*steer_twice(monkeypatch, screened_steps, sae, x, specs))


def frozen_topk_sae(W: torch.Tensor, b: torch.Tensor, k: int) -> SAE:
    sae = SAE(SAEConfig(d_in=W.shape[0], d_sae=W.shape[1], hook_name="blocks.0.hook_resid_post",
                        architecture="topk", k=k, apply_b_dec_to_input=False))
    with torch.no_grad():
        sae.W_enc.copy_(W)
        sae.b_enc.copy_(b)
    return sae.requires_grad_(False)


def membership_cases(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: its strongest and its weakest feature (clear cases), and its k-th and (k+1)-th (the
    boundary)."""
    order = pre.argsort(dim=-1, descending=True)
    return torch.stack([order[:, 0], order[:, -1]], dim=1), torch.stack([order[:, k - 1], order[:, k]], dim=1)


@pytest.mark.parametrize("all_rows", [64, 0])  # every row in one C call, or the rows above 0 picked first
@pytest.mark.parametrize("ties", [0, 256, -1])
def test_an_edit_reads_whether_its_feature_is_among_the_k_as_the_float32_top_k_does(monkeypatch, ties, all_rows):
    """`topk_active_at` (an edit's f0 without finding the top k) equals the float32 top k read at the
    feature, for the strongest, the weakest, the k-th and the (k+1)-th feature of each row. Clear
    cases are decided from the bounds; where bfloat16 cannot tell the features apart (256 columns
    1e-5 apart, in order), the rows are left undecided and answered from the top k; where the
    features are far apart (ties=-1: one column times 1.05^j), even the boundary is decided."""
    monkeypatch.setattr(screened_topk, "_FAST_BF16", True)
    monkeypatch.setattr(screened_topk, "ALL_ROWS", all_rows)
    monkeypatch.delenv("RUDDER_SAE_SCREEN", raising=False)
    undecided: list[int] = []

    def spied(real):
        def spy(*a):
            out = real(*a)
            if out is not None:  # topk_active_all without the kernel: the rows above 0 go to topk_active_at
                undecided.append(int(out[1].sum()))
            return out
        return spy

    for name in ("topk_active_at", "topk_active_all"):
        monkeypatch.setattr(screened_topk, name, spied(getattr(screened_topk, name)))
    g = torch.Generator().manual_seed(4)
    d, F, k = 64, 512, 16
    if ties > 0:
        base = torch.randn(d, 1, generator=g)
        W = torch.cat([base * (1 + 1e-5 * torch.arange(ties)), 0.1 * torch.randn(d, F - ties, generator=g)], 1)
        x = base.T.repeat(6, 1) + 0.01 * torch.randn(6, d, generator=g)
    elif ties < 0:
        base = torch.randn(d, 1, generator=g)
        F = 128  # values 5% apart: well beyond the bound (~1.3% of a value here)
        W = base * (1.05 ** torch.arange(F, dtype=torch.float32))[torch.randperm(F, generator=g)]
        x = base.T.repeat(6, 1) + 0.01 * torch.randn(6, d, generator=g)
    else:
        W, x = torch.randn(d, F, generator=g) / d**0.5, torch.randn(6, d, generator=g) * 3
    b = torch.zeros(F)
    sae = frozen_topk_sae(W, b, k)
    pre = torch.addmm(b, x, W)
    top = pre.topk(k)
    dense = torch.zeros_like(pre).scatter_(-1, top.indices, torch.relu(top.values))
    clear, boundary = membership_cases(pre, k)
    for feat in (clear, boundary):
        torch.testing.assert_close(sae.topk_active_at(x, feat), dense.gather(1, feat), rtol=2e-6, atol=1e-6)
    if ties > 0:
        assert undecided[1] == 6  # bfloat16 sees the boundary's two columns as one
    else:
        assert undecided[0] == 0 and (ties == 0 or undecided[1] == 0)


@pytest.mark.parametrize("screen,all_rows", [("1", 64), ("1", 0), ("0", 64)])
def test_an_edit_reads_the_other_features_only_on_rows_where_its_feature_is_above_zero(monkeypatch, screen, kernel,
                                                                                        all_rows):
    """A TopK SAE ReLUs its k values, so an edited feature at or below 0 reads 0 whether or not it is
    among the k: only rows where some edited feature is above 0 (or NaN) are encoded, screened or not,
    and every row equals the float32 top k read at the feature. A decode-sized step (up to
    `ALL_ROWS`) goes to the C kernel whole, which skips those rows itself."""
    monkeypatch.setattr(screened_topk, "_FAST_BF16", True)
    monkeypatch.setattr(screened_topk, "ALL_ROWS", all_rows)
    monkeypatch.setenv("RUDDER_SAE_SCREEN", screen)
    encoded: list = []  # rows screened ("s", n), screened whole in C ("all", n), or encoded in float32 (n)
    real_screen, real_all, real_pre = screened_topk.topk_active_at, screened_topk.topk_active_all, SAE._pre_acts
    monkeypatch.setattr(screened_topk, "topk_active_at",
                        lambda *a: encoded.append(("s", a[1].shape[0])) or real_screen(*a))
    monkeypatch.setattr(screened_topk, "topk_active_all",
                        lambda *a: (out := real_all(*a)) is not None and encoded.append(("all", a[1].shape[0])) or out)
    monkeypatch.setattr(SAE, "_pre_acts", lambda self, x: encoded.append(x.shape[0]) or real_pre(self, x))
    g = torch.Generator().manual_seed(9)
    d, F, k = 64, 512, 16
    W, b = torch.randn(d, F, generator=g) / d**0.5, torch.zeros(F)
    sae = frozen_topk_sae(W, b, k)
    x = torch.randn(12, d, generator=g) * 3
    x[5] = float("nan")
    pre = torch.addmm(b, x, W)
    top = pre.topk(k)
    dense = torch.zeros_like(pre).scatter_(-1, top.indices, torch.relu(top.values))
    feat = pre.argsort(dim=-1, descending=True)[:, :2]  # among the k, and positive, on every row
    feat[[0, 3, 7]] = pre[[0, 3, 7]].argsort(dim=-1)[:, :2]  # these rows edit their two weakest: below 0
    torch.testing.assert_close(sae.topk_active_at(x, feat), dense.gather(1, feat), rtol=2e-6, atol=1e-6,
                               equal_nan=True)
    # the rows above 0 and the NaN row: screened (the NaN row, undecided, then in float32), or in float32
    whole = screen == "1" and kernel == "C kernel" and all_rows >= 12
    assert encoded == ([("all", 12), 1] if whole else [("s", 9), 1] if screen == "1" else [9])
