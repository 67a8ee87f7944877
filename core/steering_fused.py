"""The in-graph edit as one Triton kernel: feature edits of an elementwise SAE, for every row of a
step, with fixed shapes (so it captures in a CUDA graph).

`fused_sae_delta(sae, x, table, rows)` is `steering.sae_delta_all_rows` for a standard (ReLU) or
JumpReLU SAE: per row, the encoder columns of its M edited features (not the dictionary), the
ops applied in the request's order (two on one feature chain), and the sum of
(f' − f) W_dec[i] over the features whose value changed last. One program per row: it reads the
row, M encoder columns and M decoder rows, and writes one row, so a step's edit is one kernel
instead of ~20 small ones. `tests/core/test_steering_fused.py` holds it to `sae_delta_all_rows`
under the Triton interpreter (TRITON_INTERPRET=1, on CPU); `bench/cuda_steering_op.py --fused`
times it inside a CUDA graph. Not used by the server yet (see docs/benchmarks.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from rudder.core.sae import SAE
from rudder.core.steering import RowIndex, SaeTable

SUPPORTED = ("standard", "jumprelu")


@triton.jit
def _edit_kernel(xin_ptr, feat_ptr, act_ptr, scale_ptr, shift_ptr, wenc_ptr, benc_ptr, thr_ptr, wdec_ptr, out_ptr,
                 d, d_sae, M, jump: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    r = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    ms = tl.arange(0, BLOCK_M)
    on_d, on_m = cols < d, ms < M
    xin = tl.load(xin_ptr + r * d + cols, mask=on_d, other=0.0).to(tl.float32)
    feat = tl.load(feat_ptr + r * M + ms, mask=on_m, other=0)
    act = tl.load(act_ptr + r * M + ms, mask=on_m, other=0) != 0
    scale = tl.load(scale_ptr + r * M + ms, mask=on_m, other=0.0).to(tl.float32)
    shift = tl.load(shift_ptr + r * M + ms, mask=on_m, other=0.0).to(tl.float32)
    both = on_m[:, None] & on_d[None, :]
    # W_enc is (d, d_sae): feature f's column, read in place
    w_enc = tl.load(wenc_ptr + cols[None, :] * d_sae + feat[:, None], mask=both, other=0.0).to(tl.float32)
    pre = tl.sum(w_enc * xin[None, :], axis=1) + tl.load(benc_ptr + feat, mask=on_m, other=0.0).to(tl.float32)
    f0 = tl.maximum(pre, 0.0)
    if jump:
        f0 = tl.where(pre > tl.load(thr_ptr + feat, mask=on_m, other=0.0).to(tl.float32), f0, 0.0)
    # the ops in order: `cur` holds each column's feature's value so far; an active op sets it for every
    # column of its feature, so a later op on the same feature starts from it
    cur = f0
    f1 = f0
    for m in tl.static_range(BLOCK_M):
        here = ms == m
        c = tl.sum(tl.where(here, cur, 0.0))
        sc = tl.sum(tl.where(here, scale, 0.0))
        sh = tl.sum(tl.where(here, shift, 0.0))
        a = tl.sum(tl.where(here & act, 1, 0)) > 0
        f = tl.sum(tl.where(here, feat, 0))
        # each op as f' = f scale + shift, exactly the shift where the op sets the value (steering._apply_op)
        new = tl.where(sc == 0.0, sh, c * sc + sh)
        f1 = tl.where(here, tl.where(a, new, c), f1)
        cur = tl.where(a & (feat == f), new, cur)
    # a column holds its feature's final value unless a later active op edits the same feature
    later = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for m in tl.static_range(BLOCK_M):
        here = ms == m
        f = tl.sum(tl.where(here, feat, 0))
        a = tl.sum(tl.where(here & act, 1, 0)) > 0
        later = tl.where((ms < m) & a & (feat == f), 1, later)
    coef = tl.where(act & (later == 0), f1 - f0, 0.0)
    w_dec = tl.load(wdec_ptr + feat[:, None] * d + cols[None, :], mask=both, other=0.0).to(tl.float32)  # (M, d)
    delta = tl.sum(coef[:, None] * w_dec, axis=0)
    tl.store(out_ptr + r * d + cols, delta, mask=on_d)


def fused_sae_delta(sae: SAE, x: Tensor, table: SaeTable, rows: RowIndex) -> Tensor:
    """`sae_delta_all_rows(sae, x, table, rows)` in one kernel: `(N, d_out)` float32, zero for rows
    without active ops. A standard or JumpReLU SAE reading its site as is (no normalized input)."""
    if sae.cfg.activation not in SUPPORTED or sae.in_scale is not None or sae.cfg.is_transcoder:
        raise ValueError(f"the fused edit serves {', '.join(SUPPORTED)} SAEs on their site's own values; "
                         f"{sae.cfg.architecture} goes through steering.sae_delta_all_rows")
    slot, act = table.active_all(rows)
    n, m = act.shape
    xin = sae._input(x).contiguous()
    out = torch.empty(n, sae.cfg.d_in, dtype=torch.float32, device=x.device)
    jump = sae.cfg.activation == "jumprelu"
    _edit_kernel[(n,)](xin, table.feature[slot].contiguous(), act.to(torch.int8).contiguous(),
                       table.scale[slot].contiguous(), table.shift[slot].contiguous(), sae.W_enc.contiguous(),
                       sae.encoder_bias.contiguous(), (sae.threshold if jump else sae.encoder_bias).contiguous(),
                       sae.W_dec.contiguous(), out, sae.cfg.d_in, sae.cfg.d_sae, m, jump=jump,
                       BLOCK_D=triton.next_power_of_2(sae.cfg.d_in), BLOCK_M=triton.next_power_of_2(max(m, 1)))
    return out
