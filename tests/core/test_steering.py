"""The steering math on token rows: no-op guarantee, the four ops, scopes, directions, readouts."""

import pytest
import torch

from rudder.core.sae import SAE, SAEConfig
from rudder.core.steering import (DirectionEdit, FeatureEdit, Op, ReadoutSpec, RowIndex, Scope, SiteArtifacts,
                                  SteeringSpec, build_tables, steer_site)

SITE = "blocks.1.hook_resid_post"


@pytest.fixture
def sae():
    torch.manual_seed(0)
    s = SAE(SAEConfig(d_in=16, d_sae=64, hook_name=SITE))
    with torch.no_grad():
        s.W_enc.normal_(0, 0.5)
        s.W_dec.normal_(0, 0.5)
        s.b_enc.normal_(0, 0.2)
        s.b_dec.normal_(0, 0.2)
    return s


def rows_for(slots, positions):
    return RowIndex(torch.tensor(slots), torch.tensor(positions))


def run(sae, specs, prompt_lens, slots, positions, x):
    tables = build_tables(specs, prompt_lens)
    return steer_site(SITE, x, SiteArtifacts(saes={"s": sae}), tables, rows_for(slots, positions))


def test_rows_without_ops_are_bit_identical(sae):
    x = torch.randn(6, 16)
    spec = SteeringSpec(features=(FeatureEdit("s", 3, Op.CLAMP, 5.0),))
    # slot 0 steered (rows 0-2), slot 1 unsteered (rows 3-4), row 5 padding
    out, _ = run(sae, [spec, None], [3, 3], [0, 0, 0, -1, -1, -1], [0, 1, 2, 0, 1, 0], x.clone())
    assert torch.equal(out[3:], x[3:])
    assert not torch.equal(out[:3], x[:3])
    # a site with tables but no ops for anyone leaves everything identical
    out2, _ = run(sae, [SteeringSpec(readouts=ReadoutSpec(saes=("s",), top_k=4))], [3], [0, 0, 0], [0, 1, 2],
                  x[:3].clone())
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
