"""A request's steering crosses processes (to vLLM's workers) as typed builtins and comes back equal;
a direction by SAE feature stays (sae, feature) on the wire and is resolved where the SAE lives."""

from __future__ import annotations

import json

import msgspec
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rudder.core.sae import SAE, SAEConfig
from rudder.core.steering import (
    CodeEdit,
    DirectionEdit,
    FeatureEdit,
    Op,
    ReadoutSpec,
    RowIndex,
    Scope,
    SteeringSpec,
    build_tables,
    spec_from_wire,
    spec_to_wire,
    steer_site,
)

names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=8)
floats = st.floats(allow_nan=False, allow_infinity=False, width=32)
scopes = st.one_of(
    st.sampled_from([Scope(), Scope("prompt"), Scope("generated")]),
    st.builds(lambda a, n: Scope("range", a, None if n is None else a + 1 + n),
              st.integers(0, 1000), st.none() | st.integers(0, 1000)),
)
features = st.builds(FeatureEdit, names, st.integers(0, 2**20), st.sampled_from(list(Op)[1:]), floats, scopes)
directions = st.one_of(
    st.builds(lambda site, v, a, sc: DirectionEdit(site, tuple(v), a, sc),
              names, st.lists(floats, min_size=1, max_size=8), floats, scopes),
    st.builds(lambda site, a, sc, sae, f: DirectionEdit(site, alpha=a, scope=sc, sae=sae, feature=f),
              names, floats, scopes, names, st.integers(0, 2**20)),
)
codes = st.builds(CodeEdit, names, st.integers(0, 64), st.integers(0, 10_000), floats, scopes)
readouts = st.builds(ReadoutSpec, st.tuples(names), st.tuples(names), st.integers(0, 256),
                     st.lists(st.integers(0, 2**20), max_size=4).map(tuple), st.booleans())
specs = st.builds(SteeringSpec, st.lists(features, max_size=3).map(tuple), st.lists(directions, max_size=3).map(tuple),
                  st.lists(codes, max_size=3).map(tuple), readouts)


@given(specs)
def test_a_spec_survives_the_wire_as_json(spec):
    raw = json.loads(json.dumps(spec_to_wire(spec)))  # what another process could receive
    assert spec_from_wire(raw) == spec


def test_a_malformed_wire_spec_is_refused_with_the_field_named():
    raw = spec_to_wire(SteeringSpec(features=(FeatureEdit("s", 1, Op.CLAMP, 2.0),)))
    raw["features"][0]["feature"] = "one"
    with pytest.raises(msgspec.ValidationError, match="feature"):
        spec_from_wire(raw)


def test_a_direction_needs_values_or_a_feature_exactly():
    with pytest.raises(ValueError, match="exactly one"):
        DirectionEdit("blocks.0.hook_resid_post", alpha=1.0)
    with pytest.raises(ValueError, match="exactly one"):
        DirectionEdit("blocks.0.hook_resid_post", (1.0,), sae="s", feature=0)


def test_a_feature_direction_is_small_on_the_wire_and_resolves_to_the_decoder_row():
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=16, d_sae=64, hook_name="blocks.0.hook_resid_post"))
    by_feature = SteeringSpec(directions=(DirectionEdit("blocks.0.hook_resid_post", alpha=3.0, sae="s", feature=5),))
    wire = spec_from_wire(json.loads(json.dumps(spec_to_wire(by_feature))))
    sent = spec_to_wire(by_feature)["directions"][0]
    assert (sent["vector"], sent["sae"], sent["feature"]) == (None, "s", 5)  # no decoder row copied
    by_vector = SteeringSpec(directions=(DirectionEdit("blocks.0.hook_resid_post", sae.W_dec[5], 3.0),))
    x = torch.randn(4, 16)
    rows = RowIndex(torch.zeros(4, dtype=torch.long), torch.arange(4))
    got, _ = steer_site("blocks.0.hook_resid_post", x, None, build_tables([wire], [2], saes={"s": sae}), rows)
    want, _ = steer_site("blocks.0.hook_resid_post", x, None, build_tables([by_vector], [2]), rows)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got, x + 3.0 * sae.W_dec[5])
    # The SAE gone (unloaded while the request ran): the direction is dropped, the rows left alone.
    gone, _ = steer_site("blocks.0.hook_resid_post", x, None, build_tables([wire], [2], saes={}), rows)
    assert torch.equal(gone, x)
