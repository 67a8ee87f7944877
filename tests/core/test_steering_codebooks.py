"""Codebooks through `steer_site`: always on, forced codes per slot, code readouts, against `Codebook.snap`."""

import pytest
import torch

from rudder.core.codebook import Codebook, CodebookConfig, ForcedCodes
from rudder.core.steering import (
    CodeEdit,
    ReadoutSpec,
    RowIndex,
    Scope,
    SiteArtifacts,
    SteeringSpec,
    build_tables,
    steer_site,
)

SITE = "blocks.0.attn.hook_z"
HEADS, D_CODE, K = 2, 8, 2


@pytest.fixture
def cb():
    torch.manual_seed(0)
    c = Codebook(CodebookConfig("cb", SITE, num_codes=16, k=K, d_code=D_CODE, num_heads=HEADS)).requires_grad_(False)
    c.ln_weight.uniform_(0.5, 1.5)
    # Code 0 of each head is constant: its cosine with a LayerNorm'd row (mean zero) is ~0, so it is never
    # chosen on its own. A padding op (head 0, code 0) applied by mistake would show.
    c.ln_bias.zero_()
    c.codes[:, 0] = 1.0
    return c


def plain(cb, x):
    """The codebook's own output and ids for x (N, G*d), no steering."""
    y, ids = cb.snap(x.view(x.shape[0], HEADS, D_CODE))
    return y.reshape(x.shape), ids


def step(cb, specs, prompt_lens, slots, positions, x):
    tables = build_tables(specs, prompt_lens)
    rows = RowIndex(torch.tensor(slots), torch.tensor(positions))
    return steer_site(SITE, x.clone(), SiteArtifacts(codebooks={"cb": cb}), tables, rows)


def outside(ids, rows, head):
    """A code (not 0) active in none of `rows` at `head`."""
    used = set(ids[rows, head].flatten().tolist())
    return next(c for c in range(1, 16) if c not in used)


def test_codebook_is_always_on_and_reads_nothing_unasked(cb):
    x = torch.randn(5, HEADS * D_CODE)
    y0, ids0 = plain(cb, x)
    assert not (ids0 == 0).any()
    out, readouts = step(cb, [None, None], [2, 2], [0, 0, 1, 1, -1], [0, 1, 0, 1, 0], x)
    assert torch.equal(out, y0)  # every row snapped, padding included, and nothing else done
    assert not torch.equal(out, x)
    assert readouts == []


def test_forced_codes_change_only_their_slots_rows_and_match_snap(cb):
    x = torch.randn(6, HEADS * D_CODE)
    y0, ids0 = plain(cb, x)
    c1 = outside(ids0, [0, 1, 2], 1)
    steer = SteeringSpec(codes=(CodeEdit("cb", 1, c1, 1.5),), readouts=ReadoutSpec(codebooks=("cb",)))
    reader = SteeringSpec(readouts=ReadoutSpec(codebooks=("cb",)))
    # slot 0 forces (rows 0-2), slot 1 only reads (rows 3-4), row 5 padding
    out, readouts = step(cb, [steer, reader], [3, 3], [0, 0, 0, 1, 1, -1], [0, 1, 2, 0, 1, 0], x)

    forced = [ForcedCodes(torch.tensor([0, 1, 2]), torch.tensor([1, 1, 1]), torch.tensor([c1] * 3),
                          torch.tensor([1.5] * 3))]
    y_ref, ids_ref = cb.snap(x.view(6, HEADS, D_CODE), forced)
    torch.testing.assert_close(out, y_ref.reshape(6, -1))
    assert torch.equal(out[3:], y0[3:])
    assert not torch.equal(out[:3], y0[:3])
    (r,) = readouts
    assert r.source == "cb" and r.rows.tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(r.ids, ids_ref[:5])  # (R, G, k) code ids, forced ones included
    assert (r.ids[:3, 1] == c1).any(dim=-1).all()
    assert torch.equal(r.ids[3:], ids0[3:5])


def test_forced_codes_follow_their_scope(cb):
    x = torch.randn(4, HEADS * D_CODE)
    y0, ids0 = plain(cb, x)
    c = outside(ids0, [0, 1, 2, 3], 0)
    spec = SteeringSpec(codes=(CodeEdit("cb", 0, c, 1.0, Scope("generated")),))
    out, _ = step(cb, [spec], [2], [0] * 4, [0, 1, 2, 3], x)
    forced = [ForcedCodes(torch.tensor([2, 3]), torch.tensor([0, 0]), torch.tensor([c, c]), torch.tensor([1.0, 1.0]))]
    y_ref, _ = cb.snap(x.view(4, HEADS, D_CODE), forced)
    torch.testing.assert_close(out, y_ref.reshape(4, -1))
    assert torch.equal(out[:2], y0[:2]) and not torch.equal(out[2:], y0[2:])


def test_two_forced_codes_on_one_head_apply_in_request_order(cb):
    x = torch.randn(2, HEADS * D_CODE)
    _, ids0 = plain(cb, x)
    free = [c for c in range(1, 16) if c not in ids0[:, 1].flatten().tolist()][:2]
    spec = SteeringSpec(codes=tuple(CodeEdit("cb", 1, c, s) for c, s in zip(free, (1.0, 2.0))),
                        readouts=ReadoutSpec(codebooks=("cb",)))
    out, (r,) = step(cb, [spec], [2], [0, 0], [0, 1], x)
    passes = [ForcedCodes(torch.tensor([0, 1]), torch.tensor([1, 1]), torch.tensor([c, c]), torch.tensor([s, s]))
              for c, s in zip(free, (1.0, 2.0))]
    y_ref, ids_ref = cb.snap(x.view(2, HEADS, D_CODE), passes)
    torch.testing.assert_close(out, y_ref.reshape(2, -1))
    assert torch.equal(r.ids, ids_ref)
    assert r.ids[:, 1].tolist() == [[free[1], free[0]]] * 2  # k=2: both slots forced, the later one first
