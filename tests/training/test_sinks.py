"""Later attention sinks (positions with a norm far above the rest) are kept out of SAE training
and metrics and pass through splices unchanged, as position 0 does."""

from __future__ import annotations

import torch

from rudder.core.hf_sites import hook_site
from rudder.training.lm import SINK_NORM_RATIO, HookedLM, sink_rows

SITE = "blocks.1.hook_resid_post"


def test_sink_rows_flags_only_positions_far_above_their_sequence_median():
    x = torch.randn(2, 9, 16)
    x[0, 3] *= 4 * SINK_NORM_RATIO
    x[1, 5] *= 2  # large, but no sink
    assert sink_rows(x).nonzero().tolist() == [[0, 3]]


def test_training_drops_sinks_and_splices_pass_them_through(tiny_dir):
    lm = HookedLM.load(tiny_dir)
    ids = torch.tensor([lm.tokenizer("The quick brown fox jumps over the lazy dog.").input_ids] * 2)

    def make_sink(name, x):  # position 4 of the first sequence becomes a massive activation
        x = x.clone()
        x[0, 4] *= 1000
        return x

    handle = hook_site(lm.model, lm.site("blocks.0.hook_resid_post"), make_sink)
    try:
        every = lm.activations(ids, [SITE])[SITE]
        kept = lm.activations(ids, [SITE], drop_sinks=True)[SITE]
        clean = lm.run(ids, capture=[SITE])[1][SITE]
        zeroed = lm.run(ids, capture=[SITE], replace={SITE: torch.zeros_like})[1][SITE]
    finally:
        handle.remove()
    n = ids.shape[0] * (ids.shape[1] - 1)
    assert every.shape[0] == n and kept.shape[0] == n - 1
    assert kept.norm(dim=-1).max() < every.norm(dim=-1).max() / 100
    # run() sees positions 1..: the sink at position 4 is row 3 of the first sequence
    assert torch.equal(zeroed[0, 3], clean[0, 3]) and clean[0, 3].norm() > 0
    zeroed[0, 3] = 0
    assert zeroed.abs().max() == 0
