"""The steering math on token rows: no-op guarantee, the four ops, scopes, directions, readouts."""

import pytest
import torch

from rudder.core.sae import SAE, SAEConfig
from rudder.core.steering import (
    DirectionEdit,
    FeatureEdit,
    Op,
    ReadoutSpec,
    RowIndex,
    Scope,
    SiteArtifacts,
    SteeringSpec,
    build_tables,
    steer_site,
)

SITE = "blocks.1.hook_resid_post"


@pytest.fixture
def sae():
    return random_sae(0)


def rows_for(slots, positions):
    return RowIndex(torch.tensor(slots), torch.tensor(positions))


def frozen_topk_sae(seed: int, d_in: int = 16, d_sae: int = 64, k: int = 8) -> SAE:
    """A TopK SAE (16 -> 64, k = 8 unless told) with weights N(0, 0.5), frozen as served; the generator seeded."""
    torch.manual_seed(seed)
    s = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, hook_name=SITE, architecture="topk", k=k))
    for p in s.parameters():
        p.normal_(0, 0.5)
    return s.requires_grad_(False)


def run(sae, specs, prompt_lens, slots, positions, x):
    tables = build_tables(specs, prompt_lens)
    return steer_site(SITE, x, SiteArtifacts(saes={"s": sae}), tables, rows_for(slots, positions))


def test_rows_without_ops_are_bit_identical(sae):
    with torch.no_grad():
        sae.b_enc[0] = 10.0  # feature 0 on everywhere: a padding op (feature 0, Op.NONE) applied would zero it
    x = torch.randn(7, 16)
    assert (sae.encode(x)[:, 0] > 0).all()
    steered = SteeringSpec(features=(FeatureEdit("s", 3, Op.CLAMP, 5.0),))
    reader = SteeringSpec(readouts=ReadoutSpec(saes=("s",), top_k=4))
    # slot 0 steered (rows 0-2), slot 1 a request with no edits (rows 3-4),
    # slot 2 reads but does not steer (row 5), row 6 padding
    tables = build_tables([steered, None, reader], [3, 3, 3])
    assert tables.saes["s"].valid.tolist() == [[True], [False], [False]]  # slots 1 and 2 are there, with no ops
    rows = rows_for([0, 0, 0, 1, 1, 2, -1], [0, 1, 2, 0, 1, 0, 0])
    out, readouts = steer_site(SITE, x.clone(), SiteArtifacts(saes={"s": sae}), tables, rows)
    assert torch.equal(out[3:], x[3:])
    assert not torch.equal(out[:3], x[:3])
    (r,) = readouts
    assert r.rows.tolist() == [5]
    # a site with tables but no ops for anyone leaves everything identical
    out2, _ = run(sae, [reader], [3], [0, 0, 0], [0, 1, 2], x[:3].clone())
    assert torch.equal(out2, x[:3])


@pytest.mark.parametrize("op,value", [(Op.CLAMP, 50.0), (Op.ADD, 1.5), (Op.SCALE, 3.0), (Op.ABLATE, 0.0)])
def test_each_op_moves_x_by_exactly_the_decoded_feature_change(sae, op, value):
    x = torch.randn(4, 16)
    f = sae.encode(x)
    feature = int(f[0].argmax())  # an active feature, so scale and ablate change something
    spec = SteeringSpec(features=(FeatureEdit("s", feature, op, value),),
                        readouts=ReadoutSpec(saes=("s",), top_k=3, feature_ids=(feature,)))
    out, readouts = run(sae, [spec], [4], [0, 0, 0, 0], [0, 1, 2, 3], x.clone())
    f_new = f.clone()
    f_new[:, feature] = {Op.CLAMP: torch.full((4,), value), Op.ADD: f[:, feature] + value,
                         Op.SCALE: f[:, feature] * value, Op.ABLATE: torch.zeros(4)}[op]
    expected = x + (f_new - f) @ sae.W_dec
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    (r,) = readouts
    assert r.rows.tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(r.selected_values[:, 0], f_new[:, feature])  # readout shows the intervened value
    if op == Op.CLAMP:
        assert (r.top_ids[:, 0] == feature).all()


@torch.no_grad()
@pytest.mark.parametrize("screen", ["1", "0"])
@pytest.mark.parametrize("op,value", [(Op.ADD, 1.5), (Op.SCALE, 3.0)])
def test_a_topk_prefill_edits_every_row_and_reads_out_the_last(monkeypatch, op, value, screen):
    """A prefill step of a (frozen, as served) TopK SAE: every prompt row is edited, only the last (the
    one that chooses the first token) is read out, and only that row's top k is found (the others
    take the edit's membership test), through the bfloat16 screen or not. Each row moves by exactly
    its decoded feature change, from its own top k (a feature outside it reads 0), and the readout
    shows the edited top k."""
    from rudder.core import screened_topk

    monkeypatch.setattr(screened_topk, "_FAST_BF16", True)
    monkeypatch.setenv("RUDDER_SAE_SCREEN", screen)
    encoded: list[int] = []
    real = SAE.topk_encode
    monkeypatch.setattr(SAE, "topk_encode", lambda self, x: encoded.append(x.shape[0]) or real(self, x))
    s = frozen_topk_sae(3)
    x = torch.randn(6, 16)
    f = s.encode(x)
    feature = int((f > 0).sum(0).argmax())  # among the k on some rows, not on others
    assert 0 < int((f[:, feature] > 0).sum()) < 6
    spec = SteeringSpec(features=(FeatureEdit("s", feature, op, value),), readouts=ReadoutSpec(saes=("s",), top_k=4))
    rows = RowIndex(torch.zeros(6, dtype=torch.long), torch.arange(6), torch.tensor([False] * 5 + [True]))
    out, (r,) = steer_site(SITE, x.clone(), SiteArtifacts(saes={"s": s}), build_tables([spec], [6]), rows)
    f_new = f.clone()
    f_new[:, feature] = f[:, feature] + value if op == Op.ADD else f[:, feature] * value
    torch.testing.assert_close(out, x + (f_new - f) @ s.W_dec, rtol=1e-5, atol=1e-5)
    assert r.rows.tolist() == [5]
    top = f_new[5].topk(4)
    torch.testing.assert_close(r.top_values[0], top.values, rtol=1e-5, atol=1e-5)
    assert r.top_ids[0].tolist() == top.indices.tolist()
    assert encoded == [1]  # the row read out


@pytest.mark.parametrize("top_k", [3, 6])
@torch.no_grad()
def test_a_topk_readout_from_its_k_active_features_equals_the_dense_one(monkeypatch, top_k):
    """A decode step of a TopK SAE reads out from its rows' k active features, not from a dense
    (R, d_sae) activation: the same top ids and values, the same selected values, with the edits
    written in (a clamp that enters the top, an ablation that leaves it). top_k + 2 edits above k
    (6 + 2 > 8 here) is read from the dense activation."""
    from rudder.core import steering

    s = frozen_topk_sae(5)
    x = torch.randn(5, 16)
    f = s.encode(x)
    assert bool((f > 0).sum(1).ge(8).all())  # every row has k active features
    on, off = int(f[0].argmax()), int((f[0] == 0).nonzero()[0])  # one of row 0's top, one it lacks
    spec = SteeringSpec(features=(FeatureEdit("s", on, Op.CLAMP, 0.0), FeatureEdit("s", off, Op.CLAMP, 50.0)),
                        readouts=ReadoutSpec(saes=("s",), top_k=top_k, feature_ids=(on, off, 7)))
    tables, rows = build_tables([spec] * 5, [3] * 5), RowIndex(torch.arange(5), torch.full((5,), 4))
    used = []
    real = steering._topk_top
    monkeypatch.setattr(steering, "_topk_top", lambda *a: used.append(real(*a)) or used[-1])
    out, (r,) = steer_site(SITE, x.clone(), SiteArtifacts(saes={"s": s}), tables, rows)
    assert (used[0] is not None) == (top_k + 2 <= 8)
    monkeypatch.setattr(steering, "_topk_top", lambda *a: None)  # the dense readout
    out_dense, (d,) = steer_site(SITE, x.clone(), SiteArtifacts(saes={"s": s}), tables, rows)
    f_new = f.clone()
    f_new[:, on], f_new[:, off] = 0.0, 50.0
    top = f_new.topk(top_k)
    for got in (r, d):
        assert got.top_ids.tolist() == top.indices.tolist()
        torch.testing.assert_close(got.top_values, top.values, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.selected_values, f_new[:, got.selected_ids], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, out_dense, rtol=0, atol=0)


@torch.no_grad()
def test_each_op_gives_its_value_exactly_whatever_the_activation(sae):
    """CLAMP and ABLATE set the value even where the activation is not finite (inf 0 is NaN), ADD and
    SCALE follow the activation, SCALE keeps a -0.0; with two ops on one feature, the second applies to
    the first's value."""
    from rudder.core.steering import _feature_edits

    ops = [Op.CLAMP, Op.ABLATE, Op.ADD, Op.SCALE, Op.CLAMP, Op.ADD]
    f0 = torch.tensor([[float("inf")], [float("nan")], [1.0], [-0.0], [float("nan")], [float("-inf")]])
    table = build_tables([SteeringSpec(features=(FeatureEdit("s", 3, op, 2.5),)) for op in ops], [1] * 6).saes["s"]
    slot, act = torch.arange(6), torch.ones(6, 1, dtype=torch.bool)
    _, f1, last = _feature_edits(sae, torch.zeros(6, 16), table, slot, act, f0=f0)
    assert f1[:4, 0].tolist()[:3] == [2.5, 0.0, 3.5] and f1[4, 0] == 2.5 and f1[5, 0] == float("-inf")
    assert f1[3, 0] == 0 and torch.signbit(f1[3, 0])  # -0.0 x 2.5
    assert last.all()
    chained = build_tables([SteeringSpec(features=(FeatureEdit("s", 3, Op.CLAMP, 2.0),
                                                   FeatureEdit("s", 3, Op.SCALE, 3.0)))], [1]).saes["s"]
    _, f1, last = _feature_edits(sae, torch.zeros(1, 16), chained, torch.zeros(1, dtype=torch.long),
                                 torch.ones(1, 2, dtype=torch.bool), f0=torch.full((1, 2), float("nan")))
    assert f1.tolist() == [[2.0, 6.0]] and last.tolist() == [[False, True]]


def test_scope_limits_the_positions_touched(sae):
    x = torch.randn(6, 16)
    positions = [0, 1, 2, 3, 4, 5]  # prompt length 3: rows 3.. are generated tokens
    for scope, touched in [(Scope("prompt"), {0, 1, 2}), (Scope("generated"), {3, 4, 5}),
                           (Scope("range", 1, 4), {1, 2, 3}), (Scope("range", 4), {4, 5}), (Scope(), set(range(6)))]:
        spec = SteeringSpec(features=(FeatureEdit("s", 7, Op.CLAMP, 9.0, scope),))
        out, _ = run(sae, [spec], [3], [0] * 6, positions, x.clone())
        changed = {i for i in range(6) if not torch.equal(out[i], x[i])}
        assert changed == touched, scope


def test_ops_on_one_feature_apply_in_request_order(sae):
    x = torch.randn(2, 16)
    spec = SteeringSpec(features=(FeatureEdit("s", 5, Op.CLAMP, 2.0), FeatureEdit("s", 5, Op.SCALE, 3.0)),
                        readouts=ReadoutSpec(saes=("s",), feature_ids=(5,)))
    _, (r,) = run(sae, [spec], [2], [0, 0], [0, 1], x.clone())
    torch.testing.assert_close(r.selected_values[:, 0], torch.full((2,), 6.0))


def test_direction_add_and_batched_slots_do_not_mix(sae):
    x = torch.randn(4, 16)
    v = torch.randn(16)
    spec = SteeringSpec(directions=(DirectionEdit(SITE, v, 2.0),))
    tables = build_tables([None, spec], [2, 2])
    out, _ = steer_site(SITE, x.clone(), None, tables, rows_for([-1, -1, 1, 1], [0, 1, 0, 1]))
    assert torch.equal(out[:2], x[:2])
    torch.testing.assert_close(out[2:], x[2:] + 2.0 * v)


def test_readout_rows_follow_the_read_mask(sae):
    x = torch.randn(3, 16)
    spec = SteeringSpec(readouts=ReadoutSpec(saes=("s",), top_k=2))
    tables = build_tables([spec], [3])
    rows = RowIndex(torch.tensor([0, 0, 0]), torch.tensor([0, 1, 2]), torch.tensor([False, False, True]))
    _, (r,) = steer_site(SITE, x, SiteArtifacts(saes={"s": sae}), tables, rows)
    assert r.rows.tolist() == [2]
    torch.testing.assert_close(r.top_values[0], sae.encode(x[2]).topk(2).values)


def random_sae(seed: int) -> SAE:
    torch.manual_seed(seed)
    s = SAE(SAEConfig(d_in=16, d_sae=64, hook_name=SITE))
    with torch.no_grad():
        s.W_enc.normal_(0, 0.5)
        s.W_dec.normal_(0, 0.5)
        s.b_enc.normal_(0, 0.2)
        s.b_dec.normal_(0, 0.2)
    return s


@torch.no_grad()
def test_two_saes_at_one_site_apply_in_order_each_keeping_its_error(sae):
    """SAE b edits the output of SAE a's edit: x1 = x + (fa' − fa) Wa, x2 = x1 + (fb' − fb(x1)) Wb."""
    sae_b = random_sae(1)
    x = torch.randn(4, 16)
    fa = sae.encode(x)
    feat_a = int(fa[0].argmax())
    fa_new = fa.clone()
    fa_new[:, feat_a] = 4.0
    x1 = x + (fa_new - fa) @ sae.W_dec
    fb = sae_b.encode(x1)
    feat_b = int(fb[0].argmax())  # active after a's edit, so scaling it changes something
    fb_new = fb.clone()
    fb_new[:, feat_b] *= 3.0
    expected = x1 + (fb_new - fb) @ sae_b.W_dec

    spec = SteeringSpec(features=(FeatureEdit("a", feat_a, Op.CLAMP, 4.0), FeatureEdit("b", feat_b, Op.SCALE, 3.0)),
                        readouts=ReadoutSpec(saes=("a", "b"), feature_ids=(feat_a, feat_b)))
    tables = build_tables([spec], [4])
    out, readouts = steer_site(SITE, x.clone(), SiteArtifacts(saes={"a": sae, "b": sae_b}), tables,
                               rows_for([0] * 4, [0, 1, 2, 3]))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # each SAE's reconstruction error passes through its own edit unchanged
    torch.testing.assert_close(x1 - sae.decode(fa_new), x - sae.decode(fa), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out - sae_b.decode(fb_new), x1 - sae_b.decode(fb), rtol=1e-5, atol=1e-5)
    # the order is observable: b encoding the original x (or b before a) would give another x'
    fb_of_x = sae_b.encode(x)
    fb_of_x_new = fb_of_x.clone()
    fb_of_x_new[:, feat_b] *= 3.0
    unordered = x1 + (fb_of_x_new - fb_of_x) @ sae_b.W_dec
    assert not torch.allclose(out, unordered, atol=1e-3)
    # readouts come in site order and show each SAE's edited features
    assert [r.source for r in readouts] == ["a", "b"]
    for r, feat, f_new in [(readouts[0], feat_a, fa_new), (readouts[1], feat_b, fb_new)]:
        col = r.selected_ids.tolist().index(feat)
        torch.testing.assert_close(r.selected_values[:, col], f_new[:, feat], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["standard", "topk"])
@torch.no_grad()
def test_an_fp32_sae_on_a_bf16_stream_runs_in_fp32_as_saelens_does(arch):
    """The SAE casts the (bfloat16) activations to its own dtype: readouts equal the fp32 SAE's on the
    same bf16 activations, and an edit is computed in fp32, then written back in bf16."""
    torch.manual_seed(3)
    s = SAE(SAEConfig(d_in=16, d_sae=64, hook_name=SITE, architecture=arch, k=8 if arch == "topk" else None))
    s.W_enc.normal_(0, 0.5)
    s.W_dec.normal_(0, 0.5)
    x = torch.randn(4, 16).to(torch.bfloat16)
    spec = SteeringSpec(features=(FeatureEdit("s", 5, Op.CLAMP, 6.3),), readouts=ReadoutSpec(saes=("s",), top_k=4))
    out, (r,) = steer_site(SITE, x, SiteArtifacts(saes={"s": s}), build_tables([spec], [4]),
                           RowIndex(torch.zeros(4, dtype=torch.long), torch.arange(4)))
    f = s.encode(x.float())
    assert out.dtype == torch.bfloat16 and r.top_values.dtype == torch.float32
    f[:, 5] = 6.3  # the readout is of f', the edited features, exactly 6.3 (not bf16's 6.3125)
    # equal up to float32 rounding order (a TopK SAE's readout may come through the bfloat16 screen,
    # which recomputes its candidates' values from their own columns); bf16 would be ~1e-2 off
    torch.testing.assert_close(r.top_values, f.topk(4).values, rtol=1e-6, atol=1e-6)
    want = x + ((6.3 - s.encode(x.float())[:, 5:6]) * s.W_dec[5]).to(torch.bfloat16)  # the change, in fp32
    torch.testing.assert_close(out, want, rtol=0, atol=0)


@pytest.mark.parametrize("architecture", ["transcoder", "jumprelu_skip_transcoder"])
def test_a_transcoder_reads_where_it_reads_and_edits_where_it_writes(architecture):
    """Features from the MLP's input; a clamp adds exactly (v - f) W_dec to the MLP's output, later in
    the same pass (the skip term and the error cancel), and nothing to the input site."""
    from rudder.core.sae import SAE, SAEConfig

    torch.manual_seed(0)
    tc = SAE(SAEConfig(d_in=16, d_sae=32, d_out=16, hook_name="blocks.1.ln2.hook_normalized",
                       hook_name_out="blocks.1.hook_mlp_out", architecture=architecture, apply_b_dec_to_input=False))
    with torch.no_grad():
        for p in tc.parameters():
            p.normal_(0, 0.5)
    x_in, x_out = torch.randn(3, 16), torch.randn(3, 16)
    spec = SteeringSpec(features=(FeatureEdit("t", 5, Op.CLAMP, 7.0),), readouts=ReadoutSpec(saes=("t",), top_k=3))
    tables, rows, pending = build_tables([spec], [3]), rows_for([0, 0, 0], [0, 1, 2]), {}
    arts = SiteArtifacts(saes={"t": tc})
    same_in, readouts = steer_site("blocks.1.mlp.hook_in", x_in, arts, tables, rows, pending)
    assert torch.equal(same_in, x_in) and set(pending) == {"blocks.1.hook_mlp_out"}
    f = tc.encode(x_in)
    (r,) = readouts
    assert r.top_ids[:, 0].tolist() == [5, 5, 5] and torch.allclose(r.top_values[:, 0], torch.full((3,), 7.0))
    out, _ = steer_site("blocks.1.hook_mlp_out", x_out, None, tables, rows, pending)
    torch.testing.assert_close(out, x_out + (7.0 - f[:, 5:6]) * tc.W_dec[5])
    assert pending == {}  # consumed in the pass


@pytest.mark.parametrize("arch", ["standard", "topk"])
@torch.no_grad()
def test_a_step_where_every_row_reads_needs_no_rows_picked_out(arch):
    """Where the host knows every row is read and every slot reads the SAE (`RowIndex.every_row_read`,
    `SaeTable.every_slot_reads`: a decode step of readers), the op skips picking rows, and reads and
    edits exactly as when it picks them."""

    sae = frozen_topk_sae(5) if arch == "topk" else random_sae(5).requires_grad_(False)
    read = ReadoutSpec(saes=("s",), top_k=4, feature_ids=(3, 9))
    specs = [SteeringSpec(features=(FeatureEdit("s", 3, Op.CLAMP, 4.0),), readouts=read),
             SteeringSpec(readouts=read),
             SteeringSpec(features=(FeatureEdit("s", 9, Op.ADD, 1.0), FeatureEdit("s", 9, Op.SCALE, 2.0)),
                          readouts=read)]
    tables = build_tables(specs, [2, 2, 2])
    assert tables.saes["s"].every_slot_reads
    assert not build_tables(specs + [SteeringSpec()], [2] * 4).saes["s"].every_slot_reads
    x = torch.randn(6, 16) * 2
    slots, positions = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([2, 2, 2, 3, 3, 3])
    got = []
    for every in (True, False):
        rows = RowIndex(slots, positions, torch.ones(6, dtype=torch.bool), every_row_read=every)
        got.append(steer_site(SITE, x.clone(), SiteArtifacts(saes={"s": sae}), tables, rows))
    (out_a, (ra,)), (out_b, (rb,)) = got
    assert not torch.equal(out_a, x) and torch.equal(out_a, out_b)
    for name in ("rows", "top_ids", "top_values", "selected_ids", "selected_values"):
        assert torch.equal(getattr(ra, name), getattr(rb, name)), name
