"""The n largest pre-activations of a float32 SAE, exact, at about a bfloat16 matmul's cost.

A TopK SAE's edit or readout needs every feature's pre-activation on every row it touches: one
float32 (N, d) @ (d, F) matmul, the largest part of a steered step's cost on a CPU (1.5 ms of a
~55 ms decode step for the default SAE at 32 rows, 2 threads). A CPU with AVX512-BF16 or AMX
does the same matmul in bfloat16 about 3x faster; but a float32 SAE's readouts must stay its
float32 numbers (they are compared with SAELens'), so the bfloat16 product only *screens*:

1. `M = bf16(x) @ bf16(W)` (fp32 accumulation, rounded once to bfloat16), `P~ = M + b` in float32.
2. Every entry's error has a bound: `|P_j - P~_j| <= s * (|x| r_j + |x - bf16(x)| w_j
   + c (|P~_j| + |b_j|))`, where `r_j` is the norm of column j of `W - bf16(W)` (plus float32
   accumulation's own error), `w_j` that of `bf16(W)`, `c` the output rounding (2^-8), and `s = 2`
   a safety factor. It is Cauchy-Schwarz on each column, so it holds for any input; `U = P~ + bound`
   is an upper bound on every true pre-activation.
3. The `m = n + margin` largest `U` are candidates; their exact values come from their own
   float32 encoder columns.
4. Certificate: if the n-th largest exact value exceeds the (m+1)-th largest `U`, which bounds
   every feature outside the candidates, the top n of the candidates are the top n of P. Rows where
   that fails try again with four times the candidates, then are encoded in full, in float32.

So the answer is what the float32 encode gives (up to float32 rounding order and the order of exact
ties) for any finite input in float32's normal range; a row with an inf or NaN fails the
certificate and is encoded in full. It assumes the bfloat16 product accumulates in float32 and
rounds once (oneDNN's and ATen's bfloat16 GEMMs on CPU do; AVX512-BF16 and AMX flush denormals,
which matters only for values near 1e-38).
Steps 1-4 run in C, one pass per row, where the kernel is built (`rudder.core.screen_kernel`), else
as torch ops. `RUDDER_SAE_SCREEN=0` turns screening off (for comparisons).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from rudder.core import screen_kernel

MARGIN = 16
"""Candidates beyond n. On the default SAE and 512 tokens of model text, every row certified with
16 (with 8, 9% of rows at n = 32 would be encoded again in full)."""
SAFETY = 2.0
_U = 2.0**-8  # bfloat16's unit roundoff (8 significant bits)
_C = 1.02 * _U  # the bfloat16 product's one rounding, and float32's in adding the bias


def enabled() -> bool:
    return os.environ.get("RUDDER_SAE_SCREEN", "1") != "0"


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: where a bfloat16 matmul beats a float32 one on this CPU."""
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


@dataclass(frozen=True)
class Screen:
    """What the screen keeps per encoder: built once per frozen SAE, rebuilt if its weights are
    replaced or written in place (through the parameters; a write through `.data` is not seen)."""

    sources: tuple[Tensor, Tensor]  # the W and b it was built from (kept: their storage cannot be reused)
    versions: tuple[int, int]
    w_lo: Tensor  # (d, F) bfloat16
    w_packed: Tensor | None  # w_lo prepacked for oneDNN's bfloat16 linear, where torch has it
    w_t: Tensor  # (F, d) float32: the candidates' columns, gathered as rows
    per_norm: Tensor  # (2, F): SAFETY * (r_j, w_j), the error per unit of |x| and of |x - bf16(x)|
    per_bias: Tensor  # (F,): SAFETY * c * |b_j|

    @staticmethod
    def build(W: Tensor, b: Tensor) -> Screen:
        W, b = W.detach(), b.detach()
        w_lo = W.to(torch.bfloat16)
        lo = w_lo.float()
        w = lo.norm(dim=0)
        acc = 1.01 * W.shape[0] * 2.0**-24  # float32 summation over d terms, per unit of |x| |bf16(W_j)|
        r = (W - lo).norm(dim=0) + acc * (1 + _U) * w
        return Screen(sources=(W, b), versions=_versions(W, b), w_lo=w_lo, w_packed=_packed(w_lo),
                      w_t=W.t().contiguous(), per_norm=SAFETY * torch.stack([r, w]), per_bias=SAFETY * _C * b.abs())

    def product(self, x_lo: Tensor) -> Tensor:
        """`x_lo (N, d) @ w_lo`, `(N, F)` bfloat16, float32 accumulation rounded once: through the
        prepacked weight where there is one (torch.mm reorders the 5 MB weight on every call: inside
        vLLM's worker that was 1.2 ms of a 2.8 ms steered step on a 2-core Xeon with AMX), else torch.mm."""
        if self.w_packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x_lo, self.w_packed, None, "none", [], "")
        return torch.mm(x_lo, self.w_lo)

    def fits(self, W: Tensor, b: Tensor) -> bool:
        """Built from these weights, as they are now."""
        return all(s.data_ptr() == t.data_ptr() and s.shape == t.shape for s, t in zip(self.sources, (W, b))) \
            and self.versions == _versions(W, b)


def _packed(w_lo: Tensor) -> Tensor | None:
    """`w_lo` reordered once into oneDNN's blocked layout for its bfloat16 linear (what inductor's
    weight prepacking does); None where this torch has no oneDNN or the op fails."""
    if w_lo.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    probe = torch.randn(2, w_lo.shape[0], generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w_lo.t().contiguous(), 32)
        got = torch.ops.mkldnn._linear_pointwise(probe, packed, None, "none", [], "")
    except (RuntimeError, AttributeError):
        return None
    want = torch.mm(probe, w_lo)
    # the same product, each rounded once from float32 sums (their order aside): within 2^-7 of the
    # sum of magnitudes, what the screen's bound allows for
    slack = 2.0**-7 * (probe.float().abs() @ w_lo.float().abs())
    if got.dtype != torch.bfloat16 or got.shape != want.shape or not got.is_contiguous() \
            or not bool(((got.float() - want.float()).abs() <= slack).all()):
        return None
    return packed


def _versions(W: Tensor, b: Tensor) -> tuple[int, int]:
    return W._version, b._version


def warm() -> None:
    """Build the C kernel now (`screen_kernel`), not in the first step that screens."""
    if screen_kernel.enabled():
        screen_kernel.library()


def usable(W: Tensor, b: Tensor, x: Tensor) -> bool:
    """Screening applies: eager (not compiling or tracing, no autocast), a frozen float32 encoder on
    the CPU (an SAE being trained is not screened), no inference tensors (their writes are not
    tracked), 2-d rows, a CPU with fast bfloat16, not turned off."""
    return (not torch.compiler.is_compiling() and not torch.jit.is_tracing() and _FAST_BF16 and enabled()
            and not torch.is_autocast_enabled("cpu")
            and W.dtype == torch.float32 and W.device.type == "cpu" and not (W.requires_grad or b.requires_grad)
            and not (W.is_inference() or b.is_inference())
            and x.dim() == 2 and x.shape[0] > 0)


CHUNK_ELEMENTS = 1 << 23
"""The candidates' float32 columns gathered at once (32 MB): a long prefill is screened in chunks of rows."""


def top_pre_acts(screen: Screen, x: Tensor, b: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The n largest of `x @ W + b` per row of `x (N, d)` (float32), values and ids `(N, n)`,
    largest first, as the float32 encode gives them (see the module docstring). Where the candidates
    would be a large part of the dictionary (n above a quarter of it), the plain float32 encode."""
    F, d = screen.w_t.shape
    m = n + MARGIN
    if 4 * m > F:
        return torch.addmm(b, x, screen.w_t.t()).topk(n, dim=-1)
    rows = max(1, CHUNK_ELEMENTS // (4 * m * d))  # room for the wider second round too
    if x.shape[0] > rows:
        parts = [_top_pre_acts(screen, part, b, n, m) for part in x.split(rows)]
        return torch.cat([v for v, _ in parts]), torch.cat([i for _, i in parts])
    return _top_pre_acts(screen, x, b, n, m)


def _bounds(screen: Screen, x: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The screened pre-activations `(N, F)`, each feature's bound on its error, and whether each row
    is finite (an inf or NaN in x makes its bounds meaningless)."""
    x_lo = x.to(torch.bfloat16)
    approx = torch.add(b, screen.product(x_lo))  # float32 (N, F); |M_j| <= |approx_j| + |b_j|
    norms = torch.stack([x.norm(dim=-1), (x - x_lo.float()).norm(dim=-1)], dim=1)  # (N, 2)
    slack = torch.addmm(screen.per_bias, norms, screen.per_norm)  # every feature's bound on its error
    slack.add_(approx.abs(), alpha=SAFETY * _C)
    return approx, slack, norms.isfinite().all(dim=1)


def _top_pre_acts(screen: Screen, x: Tensor, b: Tensor, n: int, m: int) -> tuple[Tensor, Tensor]:
    values, ids, failed = _round(screen, x, b, n, m)
    if bool(failed.any()):  # another feature might beat the n-th: four times the candidates, then in full
        rows = failed.nonzero().squeeze(-1)
        wide = min(4 * m, screen.w_t.shape[0] - 1)
        v, i, still = _round(screen, x[rows], b, n, wide)
        if bool(still.any()):
            again = still.nonzero().squeeze(-1)
            full = torch.addmm(b, x[rows[again]], screen.w_t.t()).topk(n, dim=-1)
            v, i = v.index_copy(0, again, full.values), i.index_copy(0, again, full.indices)
        values, ids = values.index_copy(0, rows, v), ids.index_copy(0, rows, i)
    return values, ids


def _round(screen: Screen, x: Tensor, b: Tensor, n: int, m: int) -> tuple[Tensor, Tensor, Tensor]:
    """One round: the top n of the m candidates, and per row whether the certificate failed
    (`_certified`), in C where the kernel is built (`rudder.core.screen_kernel`), else as torch ops."""
    found = screen_kernel.top(screen, x, b, n, m, SAFETY * _C)
    if found is not None:
        return found
    approx, slack, _ = _bounds(screen, x, b)
    return _certified(screen, x, b, slack.add_(approx), m, n)  # the upper bound on every pre-activation


def pre_acts_at(w_t: Tensor, b: Tensor, x: Tensor, ids: Tensor) -> Tensor:
    """`x (N, d) @ W + b` at features `ids (N, m)` only, each row from its own m columns of W (the rows
    of `w_t (F, d)`): `(N, m)`, in C where the kernel is built."""
    found = screen_kernel.dots_at(w_t, b, x, ids)
    if found is not None:
        return found
    flat = ids.reshape(-1)
    cols = w_t.index_select(0, flat).view(*ids.shape, w_t.shape[1])  # (N, m, d); faster than w_t[ids]
    # einsum, not bmm (N, m, d) @ (N, d, 1): ATen's batched matrix-vector product is ~4x slower here
    return torch.einsum("nd,nmd->nm", x, cols).add_(b.index_select(0, flat).view_as(ids))


def _certified(screen: Screen, x: Tensor, b: Tensor, upper: Tensor, m: int, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """The top n of the m features with the largest upper bounds, from their float32 columns, and per
    row whether the certificate failed (the n-th is not above every other feature's bound)."""
    top = upper.topk(m + 1, dim=-1)  # candidates: the m that could be largest; the next bounds the rest
    ids = top.indices[:, :m]
    exact = pre_acts_at(screen.w_t, b, x, ids)
    values, at = exact.topk(n, dim=-1)
    # not "<=": a NaN bound (an inf in x) must fail the certificate, not pass it
    return values, ids.gather(1, at), ~(values[:, -1] > top.values[:, m])


ALL_ROWS = 64
"""Up to this many rows (a decode step's), a TopK edit's membership test runs on every row in one call
of the C kernel (`topk_active_all`); beyond (a prefill), on the rows whose edited features are above 0."""


def topk_active_all(screen: Screen, x: Tensor, b: Tensor, k: int, feat: Tensor) -> tuple[Tensor, Tensor] | None:
    """`_topk_active_at` on every row of `x (N, d)`, each feature's pre-activation worked out in the
    same call: the activations `(N, M)` and the rows left undecided `(N,)`; None where the C kernel is
    not built (the caller picks the rows above 0 and runs `topk_active_at`)."""
    return screen_kernel.active(screen, x, b, k, feat, SAFETY * _C)


def topk_read(screen: Screen, x: Tensor, b: Tensor, k: int, n: int,
              feat: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """`SAE.topk_read` for the rows `x (N, d)`: the certified top n pre-activations (all above 0) and the
    activations of `feat (N, M)` among the k, in one call of the C kernel; None where it is not built
    or some row needs the general path (`top_pre_acts` and `topk_active_at`)."""
    m = n + MARGIN
    if 4 * m > screen.w_t.shape[0]:
        return None
    return screen_kernel.read(screen, x, b, k, n, m, feat, SAFETY * _C)


def topk_edit(screen: Screen, x: Tensor, b: Tensor, k: int, table, slot: Tensor, pos: Tensor, w_dec: Tensor,
              stream: Tensor) -> Tensor | None:
    """`SAE.topk_edit` for the rows `x (N, d)` (the SAE's input of `stream`): the edited stream from one
    C call after the product; None where it is not built or some row's membership is undecided."""
    return screen_kernel.edit(screen, x, b, k, table, slot, pos, w_dec, stream, SAFETY * _C)


def topk_read_edit(screen: Screen, x: Tensor, b: Tensor, k: int, table, slot: Tensor, pos: Tensor, w_dec: Tensor,
                   stream: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """`SAE.topk_read_edit` for the rows `x (N, d)` (the SAE's input of `stream`): the edited stream and the
    readout's top from one C call after the product; None where it is not built or a row needs the
    general path."""
    m = table.top_k + table.feature.shape[1] + MARGIN
    if 4 * m > screen.w_t.shape[0]:
        return None
    return screen_kernel.read_edit(screen, x, b, k, m, table, slot, pos, w_dec, stream, SAFETY * _C)


def topk_active_at(screen: Screen, x: Tensor, b: Tensor, k: int, feat: Tensor, pre: Tensor) -> tuple[Tensor, Tensor]:
    """Row chunks of `_topk_active_at` (a long prefill holds a few (rows, F) tensors at a time)."""
    rows = max(1, CHUNK_ELEMENTS // screen.w_t.shape[0])
    if x.shape[0] <= rows:
        return _topk_active_at(screen, x, b, k, feat, pre)
    chunks = zip(x.split(rows), feat.split(rows), pre.split(rows))
    parts = [_topk_active_at(screen, xs, b, k, fs, ps) for xs, fs, ps in chunks]
    return torch.cat([a for a, _ in parts]), torch.cat([u for _, u in parts])


def _topk_active_at(screen: Screen, x: Tensor, b: Tensor, k: int, feat: Tensor, pre: Tensor) -> tuple[Tensor, Tensor]:
    """A TopK SAE's activations of the features `feat (N, M)` at the rows `x (N, d)`, given their
    float32 pre-activations `pre (N, M)`: each one ReLU'd if it is among the row's k largest, else 0;
    and which rows the screen could not decide (`(N,)`, for the caller to answer from the top k).
    An edit needs only this, not the top k itself: a feature is surely in when fewer than k others
    can exceed it (their upper bounds), surely out when k others surely do (their lower bounds)."""
    found = screen_kernel.member(screen, x, b, k, feat, pre, SAFETY * _C)
    inside, undecided = found if found is not None else _member(screen, x, b, k, feat, pre)
    return torch.where(inside, torch.relu(pre), torch.zeros_like(pre)), undecided


def _member(screen: Screen, x: Tensor, b: Tensor, k: int, feat: Tensor, pre: Tensor) -> tuple[Tensor, Tensor]:
    """The membership test as torch ops (where the C kernel is not built)."""
    approx, slack, finite = _bounds(screen, x, b)
    upper, lower = approx + slack, approx.sub_(slack)
    del slack
    undecided = ~finite
    inside = torch.zeros_like(feat, dtype=torch.bool)
    for m in range(feat.shape[1]):
        p, f = pre[:, m, None], feat[:, m, None]
        # others above (int32 counts: a bool sum would widen every (N, F) comparison to int64)
        maybe = (upper > p).sum(1, dtype=torch.int32) - (upper.gather(1, f) > p).squeeze(1).int()
        surely = (lower > p).sum(1, dtype=torch.int32) - (lower.gather(1, f) > p).squeeze(1).int()
        inside[:, m] = maybe < k
        undecided |= (maybe >= k) & (surely < k)
    return inside, undecided


_FAST_BF16 = cpu_has_fast_bf16()
