"""The shared step recorder: a steered row made non-finite goes on as it came and is reported."""

import pytest
import torch

from rudder.core.sae import SAE, SAEConfig
from rudder.core.steering import FeatureEdit, Op, SiteArtifacts, SteeringSpec, build_tables
from rudder.server.backends.step import Span, StepRecorder, finite_rows, row_index

SITE = "blocks.0.hook_resid_post"


def sae() -> SAE:
    torch.manual_seed(0)
    s = SAE(SAEConfig(d_in=8, d_sae=16, hook_name=SITE))
    torch.nn.init.normal_(s.W_enc)
    torch.nn.init.normal_(s.W_dec)
    return s


def test_a_row_the_steering_overflows_goes_on_unsteered_and_is_reported():
    s = sae()
    x = torch.randn(3, 8)
    overflow = SteeringSpec(features=(FeatureEdit("s", 1, Op.ADD, 1e4),) + (FeatureEdit("s", 1, Op.SCALE, 1e4),) * 10)
    fine = SteeringSpec(features=(FeatureEdit("s", 2, Op.CLAMP, 3.0),))
    specs = [overflow, fine]
    tables = build_tables(specs, [3, 3], saes={"s": s})
    spans = [Span(0, 0, 1, 0, 1, overflow), Span(1, 1, 2, 0, 1, fine)]  # row 2: a request nobody steers
    step = StepRecorder(tables, row_index(torch.tensor([0, 0, 0]), spans, "cpu"), specs)
    out = step.steer(SITE, x, SiteArtifacts(saes={"s": s}))
    assert torch.isfinite(out).all()
    assert torch.equal(out[0], x[0])  # overflowed: as it came in
    assert not torch.equal(out[1], x[1])  # steered
    assert torch.equal(out[2], x[2])  # left alone
    assert step.broken_slots() == {0}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_finite_rows_finds_every_row_with_an_inf_or_nan_and_no_other(dtype):
    big = torch.finfo(dtype).max
    x = torch.randn(7, 64).to(dtype)
    x[1, 3], x[2, 0], x[3, 63] = float("inf"), float("-inf"), float("nan")
    x[4] = big  # finite, though its sum overflows
    x[5, ::2], x[5, 1::2] = big, -big
    x[6] = -0.0
    assert finite_rows(x).tolist() == [True, False, False, False, True, True, True]
    assert torch.equal(finite_rows(x), torch.isfinite(x).all(dim=-1))


def test_tables_drop_what_names_an_sae_of_another_generation():
    s = sae()
    spec = SteeringSpec(features=(FeatureEdit("s", 15, Op.CLAMP, 3.0),), generations=(("s", 1),))
    assert build_tables([spec], [3], saes={"s": s}, generations={"s": 1}).saes["s"].valid.any()
    assert "s" not in build_tables([spec], [3], saes={"s": s}, generations={"s": 2}).saes


def test_the_sampled_row_is_the_last_once_the_prompt_is_computed():
    spec = SteeringSpec(features=(FeatureEdit("s", 1, Op.CLAMP, 1.0),))
    assert Span(0, 4, 10, 0, 6, spec).sampled_row() == 9  # the whole prompt in one step
    assert Span(0, 4, 8, 0, 6, spec).sampled_row() is None  # a chunk of it
    assert Span(0, 8, 9, 6, 6, spec).sampled_row() == 8  # decoding
    assert Span(0, 8, 9, 6, 6, spec).read_rows() == range(0)  # no readouts asked
