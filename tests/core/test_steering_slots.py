"""Slots with unequal numbers of ops share one table: each row gets exactly its own slot's ops.

The tables pad every slot to the longest slot's op count (feature 0 / Op.NONE, a zero
direction, head 0 / code 0). These tests set things up so that a padding op applied
by mistake changes the output, and compare a batched step with each request alone.
"""

import pytest
import torch

from rudder.core.codebook import Codebook, CodebookConfig
from rudder.core.sae import SAE, SAEConfig
from rudder.core.steering import (
    CodeEdit,
    DirectionEdit,
    FeatureEdit,
    Gate,
    Op,
    ReadoutSpec,
    RowIndex,
    SiteArtifacts,
    SteeringSpec,
    build_tables,
    steer_site,
)

SITE = "blocks.1.hook_resid_post"
D = 16
SLOTS = [0, 1, 2, 0, 1, 2, 0, -1]  # interleaved rows of three requests, then padding
POSITIONS = [0, 0, 0, 1, 1, 1, 2, 0]


@pytest.fixture
def artifacts():
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=D, d_sae=64, hook_name=SITE)).requires_grad_(False)
    sae.W_enc.normal_(0, 0.5)
    sae.W_dec.normal_(0, 0.5)
    sae.b_enc.normal_(0, 0.2)
    sae.b_enc[0] = 10.0  # feature 0 on everywhere: the padding op (feature 0, Op.NONE = zero it) would show
    cb = Codebook(CodebookConfig("cb", SITE, num_codes=16, k=2, d_code=8, num_heads=2)).requires_grad_(False)
    cb.codes[:, 0] = 1.0  # constant code: cosine ~0 with any LayerNorm'd row, never chosen unless forced
    return sae, cb


def specs_for(kind: str) -> list[SteeringSpec]:
    """Slot 0: three ops, slot 1: one, slot 2: none."""
    if kind == "features":
        return [SteeringSpec(features=(FeatureEdit("s", 5, Op.CLAMP, 3.0), FeatureEdit("s", 9, Op.ADD, 1.5),
                                       FeatureEdit("s", 5, Op.SCALE, 2.0))),
                SteeringSpec(features=(FeatureEdit("s", 7, Op.ADD, 2.0),)),
                SteeringSpec()]
    if kind == "directions":
        v = torch.randn(3, D, generator=torch.Generator().manual_seed(1))
        return [SteeringSpec(directions=(DirectionEdit(SITE, v[0], 1.0), DirectionEdit(SITE, v[1], -2.0),
                                         DirectionEdit(SITE, v[0], 0.5))),
                SteeringSpec(directions=(DirectionEdit(SITE, v[2], 3.0),)),
                SteeringSpec()]
    return [SteeringSpec(codes=(CodeEdit("cb", 0, 3), CodeEdit("cb", 1, 4), CodeEdit("cb", 1, 5, 2.0))),
            SteeringSpec(codes=(CodeEdit("cb", 1, 6, 1.5),)),
            SteeringSpec()]


def site_artifacts(kind, sae, cb) -> SiteArtifacts | None:
    return {"features": SiteArtifacts(saes={"s": sae}), "directions": None,
            "codes": SiteArtifacts(codebooks={"cb": cb})}[kind]


@torch.no_grad()
@pytest.mark.parametrize("kind", ["features", "directions", "codes"])
def test_each_row_gets_exactly_its_own_slots_ops(artifacts, kind):
    sae, cb = artifacts
    arts = site_artifacts(kind, sae, cb)
    specs = specs_for(kind)
    x = torch.randn(len(SLOTS), D)
    tables = build_tables(specs, [1, 1, 1])
    table = {"features": tables.saes.get("s"), "directions": tables.directions.get(SITE),
             "codes": tables.codebooks.get("cb")}[kind]
    assert table.valid.tolist() == [[True] * 3, [True, False, False], [False] * 3]  # padded to 3 ops
    out, _ = steer_site(SITE, x.clone(), arts, tables, RowIndex(torch.tensor(SLOTS), torch.tensor(POSITIONS)))

    untouched, _ = steer_site(SITE, x.clone(), arts, build_tables([None], [1]),
                              RowIndex(torch.full((len(SLOTS),), -1), torch.tensor(POSITIONS)))
    for slot, spec in enumerate(specs):
        mine = [i for i, s in enumerate(SLOTS) if s == slot]
        alone, _ = steer_site(SITE, x[mine].clone(), arts, build_tables([spec], [1]),
                              RowIndex(torch.zeros(len(mine), dtype=torch.long), torch.tensor(POSITIONS)[mine]))
        torch.testing.assert_close(out[mine], alone, rtol=1e-5, atol=1e-5)
        if spec.steers:
            assert not torch.allclose(out[mine], untouched[mine], atol=1e-3), f"slot {slot}'s ops did nothing"
        else:
            assert torch.equal(out[mine], untouched[mine])  # slot 2: no ops, rows as if nobody steered
    assert torch.equal(out[-1], untouched[-1])  # padding row


@torch.no_grad()
def test_padding_ops_would_show(artifacts):
    """The guard behind the test above: the padding ops are not harmless no-ops by accident."""
    sae, cb = artifacts
    x = torch.randn(4, D)
    rows = RowIndex(torch.zeros(4, dtype=torch.long), torch.arange(4))
    pad_feature = SteeringSpec(features=(FeatureEdit("s", 0, Op.NONE),))
    out, _ = steer_site(SITE, x.clone(), SiteArtifacts(saes={"s": sae}), build_tables([pad_feature], [4]), rows)
    assert not torch.allclose(out, x, atol=1e-3)
    pad_code = SteeringSpec(codes=(CodeEdit("cb", 0, 0, 1.0),))
    arts = SiteArtifacts(codebooks={"cb": cb})
    forced, _ = steer_site(SITE, x.clone(), arts, build_tables([pad_code], [4]), rows)
    plain, _ = steer_site(SITE, x.clone(), arts, build_tables([None], [4]), rows)
    assert not torch.allclose(forced, plain, atol=1e-3)


@pytest.mark.parametrize("edits", [False, True])
def test_a_slot_that_only_watches_gates_reads_what_a_full_readout_reads(artifacts, edits):
    """A guard-only slot encodes just the watched columns (K + M of d_sae): its values must be the
    full readout's, edits written in, beside a slot that reads the SAE out in full."""
    sae, _ = artifacts
    watched = (5, 9, 30)
    ops = (FeatureEdit("s", 5, Op.CLAMP, 3.0), FeatureEdit("s", 5, Op.SCALE, 2.0),
           FeatureEdit("s", 30, Op.ADD, 1.5)) if edits else ()
    guards = tuple(Gate("s", f, 1e9) for f in watched)  # never fire: this test reads their values
    full = ReadoutSpec(saes=("s",), top_k=4, feature_ids=watched)
    x = torch.randn(len(SLOTS), D, generator=torch.Generator().manual_seed(3))
    rows = RowIndex(torch.tensor(SLOTS), torch.tensor(POSITIONS))

    def values(specs):
        tables = build_tables(specs, [3, 3, 3])
        _, readouts = steer_site(SITE, x, SiteArtifacts(saes={"s": sae}), tables, rows)
        out = {}
        for r in readouts:
            ids = r.selected_ids.tolist()
            for row, vals in zip(r.rows.tolist(), r.selected_values.tolist()):
                out[row] = {f: v for f, v in zip(ids, vals) if f in watched}
        return out, tables

    gated, tables = values([SteeringSpec(features=ops, guards=guards), SteeringSpec(readouts=full), SteeringSpec()])
    reference, _ = values([SteeringSpec(features=ops, readouts=full), SteeringSpec(readouts=full), SteeringSpec()])
    assert tables.saes["s"].gates_only.tolist() == [True, False, False]
    assert sorted(gated) == sorted(reference) == [0, 1, 3, 4, 6]
    for row in gated:
        assert gated[row] == pytest.approx(reference[row], abs=1e-5)
    if edits:  # the clamp then the scale: 6.0 at every position of slot 0
        assert all(gated[row][5] == pytest.approx(6.0) for row in (0, 3, 6))
