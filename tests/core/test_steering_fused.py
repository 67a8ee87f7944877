"""The fused edit kernel (core.steering_fused) against the in-graph torch form it replaces,
`sae_delta_all_rows`, under the Triton interpreter on CPU: every op, chained ops on one feature,
scopes, rows of no request, a standard and a JumpReLU SAE."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rudder.core.sae import SAE, SAEConfig
from rudder.core.steering import (
    FeatureEdit,
    Op,
    RowIndex,
    Scope,
    SteeringSpec,
    build_tables,
    sae_delta_all_rows,
)


def in_interpreter(call: str) -> None:
    """Run `call` (a function of this module) in a fresh Python with TRITON_INTERPRET=1: triton reads it
    when it is first imported, which in this process has already happened."""
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", f"from tests.core.test_steering_fused import *; {call}"],
                          cwd=root, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def sae_of(arch: str, seed: int) -> SAE:
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_in=48, d_sae=96, hook_name="blocks.0.hook_resid_post", architecture=arch))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(std=0.3)
        if arch == "jumprelu":
            sae.threshold.uniform_(0.0, 0.5)
    return sae.requires_grad_(False)


SPECS = [
    SteeringSpec(features=(FeatureEdit("s", 3, Op.CLAMP, 5.0), FeatureEdit("s", 7, Op.ADD, -2.0))),
    SteeringSpec(features=(FeatureEdit("s", 3, Op.SCALE, 3.0), FeatureEdit("s", 3, Op.ADD, 1.5),  # chained
                           FeatureEdit("s", 9, Op.ABLATE))),
    SteeringSpec(),
    SteeringSpec(features=(FeatureEdit("s", 11, Op.CLAMP, -4.0, Scope("range", 6, 8)),
                           FeatureEdit("s", 11, Op.SCALE, 0.5), FeatureEdit("s", 20, Op.CLAMP, 0.0))),
]


def check_equal(arch: str) -> None:
    from rudder.core.steering_fused import fused_sae_delta

    sae = sae_of(arch, 0)
    tables = build_tables(SPECS, [4, 4, 4, 4], "cpu", {"s": sae})
    n = 10
    slot = torch.tensor([0, 1, 2, 3, -1, 3, 0, 1, 3, -1])  # rows of every slot, and of no request
    rows = RowIndex(slot, torch.arange(n) + 3, None)
    x = torch.randn(n, 48)
    want = sae_delta_all_rows(sae, x, tables.saes["s"], rows)
    got = fused_sae_delta(sae, x, tables.saes["s"], rows)
    assert torch.allclose(got, want.float(), atol=1e-5, rtol=1e-5), (got - want).abs().max()
    assert got[4].abs().max() == 0 and got[9].abs().max() == 0  # no request: untouched
    assert got[2].abs().max() == 0  # a request without ops
    assert got[0].abs().max() > 0 and got[1].abs().max() > 0 and got[3].abs().max() > 0


def check_refusal() -> None:
    from rudder.core.steering_fused import fused_sae_delta

    sae = SAE(SAEConfig(d_in=48, d_sae=96, hook_name="blocks.0.hook_resid_post", architecture="topk", k=4))
    tables = build_tables(SPECS[:1], [4], "cpu", {"s": sae})
    rows = RowIndex(torch.zeros(2, dtype=torch.long), torch.arange(2), None)
    with pytest.raises(ValueError, match="sae_delta_all_rows"):
        fused_sae_delta(sae, torch.randn(2, 48), tables.saes["s"], rows)


@pytest.mark.parametrize("arch", ["standard", "jumprelu"])
def test_the_fused_kernel_equals_the_torch_form(arch):
    in_interpreter(f"check_equal({arch!r})")


def test_the_fused_kernel_refuses_what_it_does_not_serve():
    in_interpreter("check_refusal()")
