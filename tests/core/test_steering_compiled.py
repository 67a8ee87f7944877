"""The edit path compiles whole: feature edits and directions over the fixed-size per-slot tables
compile with torch.compile(fullgraph=True) and no graph break (the proxy for "no host
synchronisation, no data-dependent shapes", which CUDA graphs need), and give the steering
math's result: x' = x + sum over edited features of (f'_i - f_i) W_dec[i] + alpha v."""

from __future__ import annotations

import pytest
import torch

from rudder.core.sae import SAE, SAEConfig
from rudder.core.steering import (
    DirectionEdit,
    FeatureEdit,
    Op,
    RowIndex,
    Scope,
    SiteArtifacts,
    SteeringSpec,
    apply_direction,
    build_tables,
    sae_edit_all_rows,
    steer_site,
)

SITE = "blocks.0.hook_resid_post"
SPECS = [
    SteeringSpec(features=(FeatureEdit("s", 3, Op.CLAMP, 5.0), FeatureEdit("s", 7, Op.ADD, 2.0, Scope("generated"))),
                 directions=(DirectionEdit(SITE, torch.linspace(-1, 1, 16), 0.5),)),
    SteeringSpec(features=(FeatureEdit("s", 3, Op.SCALE, 0.0), FeatureEdit("s", 9, Op.ABLATE),
                           FeatureEdit("s", 3, Op.ADD, 2.0))),  # feature 3 twice: the ops chain
    SteeringSpec(),
]
PROMPT_LENS = [3, 2, 4]
SLOT = torch.tensor([0, 0, 0, 1, 1, 2, -1, 0])
POSITION = torch.tensor([1, 2, 3, 0, 5, 1, 0, 7])


def make_sae(architecture: str) -> SAE:
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=16, d_sae=64, hook_name=SITE, architecture=architecture,
                        k=8 if architecture == "topk" else None))
    with torch.no_grad():
        for p in (sae.W_enc, sae.W_dec, sae.b_enc):
            p.normal_(0, 0.5)
        if architecture == "jumprelu":
            sae.threshold.uniform_(0, 0.3)
    return sae


def oracle(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """The steering math row by row, from the whole dictionary."""
    out = x.clone()
    f = sae.encode(x)
    for n, (slot, pos) in enumerate(zip(SLOT.tolist(), POSITION.tolist())):
        if slot < 0:
            continue
        spec, f_new = SPECS[slot], f[n].clone()
        for e in spec.features:
            lo, hi = e.scope.bounds(PROMPT_LENS[slot])
            if lo <= pos < hi:
                i = e.feature
                f_new[i] = {Op.CLAMP: e.value, Op.ADD: f_new[i] + e.value, Op.SCALE: f_new[i] * e.value,
                            Op.ABLATE: 0.0}[e.op]
        out[n] += (f_new - f[n]) @ sae.W_dec
        for d in spec.directions:
            out[n] += d.alpha * torch.tensor(d.vector)
    return out


@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "topk"])
def test_the_edit_path_compiles_whole_and_gives_the_steering_math(architecture):
    sae = make_sae(architecture)
    tables = build_tables(SPECS, PROMPT_LENS, saes={"s": sae})
    table, directions = tables.saes["s"], tables.directions[SITE]

    def edit(x, slot, position):
        rows = RowIndex(slot, position)
        return apply_direction(sae_edit_all_rows(sae, x, table, rows), directions, rows)

    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(edit)(x, SLOT, POSITION)
    assert explained.graph_break_count == 0, explained.break_reasons
    # Dynamo's whole-graph capture is the check; the eager backend runs the captured graph (no C++ toolchain).
    compiled = torch.compile(edit, fullgraph=True, dynamic=True, backend="eager")
    want = oracle(sae, x)
    torch.testing.assert_close(compiled(x, SLOT, POSITION), want, rtol=1e-5, atol=1e-5)
    # The shared steer_site (every backend's path) agrees, and the unsteered rows are left exactly alone.
    got, _ = steer_site(SITE, x, SiteArtifacts(saes={"s": sae}), tables, RowIndex(SLOT, POSITION))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[5:7], x[5:7])
    assert not torch.allclose(got[:5], x[:5])  # the edits did something
    # Another batch of another size replays the same compiled code.
    more = torch.randn(3, 16)
    rows3 = (SLOT[:3], POSITION[:3])
    torch.testing.assert_close(compiled(more, *rows3), edit(more, *rows3), rtol=1e-5, atol=1e-5)
