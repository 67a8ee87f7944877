"""The steering math: one pure-torch implementation that every backend calls.

A backend flattens each hook site's activation to token rows `x (N, d)` and
describes the rows with a `RowIndex`: which request slot each row belongs to
(-1: padding or a request nobody steers) and its token position. Each request's
edits are turned once into small per-slot tables (`StepTables`); at every step a
row's slot gathers its ops from them, so steered and unsteered requests share a
batch and an unsteered row is never written.

Per site, in order:
1. codebooks (part of the model, always on): snap every row, forcing codes;
2. SAE edits on f = encode(x):  x' = x + (f' − f) W_dec   (reconstruction error kept);
3. direction adds:              x' = x + α v.
Readouts (SAE top-k and selected features of f', active code ids) come back as
tensors keyed by row, for the backend to route to requests.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import IntEnum

import msgspec
import torch
from torch import Tensor

from rudder.core import screen_kernel, screened_topk
from rudder.core.codebook import Codebook, ForcedCodes
from rudder.core.sae import SAE, active_at
from rudder.core.sites import Site

OPEN_END = 2**31 - 1


class Op(IntEnum):
    NONE = 0
    CLAMP = 1
    ADD = 2
    SCALE = 3
    ABLATE = 4


# ---------------------------------------------------------------- request specs


@dataclass(frozen=True)
class Scope:
    """Token positions an edit acts on: all | prompt | generated | range [start, end)."""

    kind: str = "all"
    start: int = 0
    end: int | None = None

    def bounds(self, prompt_len: int) -> tuple[int, int]:
        if self.kind == "prompt":
            return 0, prompt_len
        if self.kind == "generated":
            return prompt_len, OPEN_END
        if self.kind == "range":
            return self.start, OPEN_END if self.end is None else self.end
        return 0, OPEN_END


@dataclass(frozen=True)
class Gate:
    """Feature `feature` of SAE `sae` read above `above`: a condition's gate, or a guard. It is read
    as a readout of the feature reads it (at the SAE's site, this request's edits there written in)."""

    sae: str
    feature: int
    above: float


@dataclass(frozen=True)
class When:
    """An edit that waits for `gate`: once it first reads above its threshold at position p, the edit
    acts at generated positions from p + 1 on (for `tokens` positions, if given), within its scope."""

    gate: Gate
    tokens: int | None = None

    def bounds(self, opened_at: int, prompt_len: int) -> tuple[int, int]:
        start = max(opened_at + 1, prompt_len)
        return start, OPEN_END if self.tokens is None else start + self.tokens


@dataclass(frozen=True)
class FeatureEdit:
    sae: str
    feature: int
    op: Op
    value: float = 0.0
    scope: Scope = Scope()
    when: When | None = None


@dataclass(frozen=True)
class DirectionEdit:
    """x' = x + alpha v at `site`; v is given as values or by an SAE feature (its decoder row).

    A feature direction stays symbolic, (sae, feature), until `build_tables` resolves it
    where the SAE lives, so it crosses processes as two fields, not d floats."""

    site: str
    vector: tuple[float, ...] | None = None  # (d,); a tensor given here is stored as floats
    alpha: float = 1.0
    scope: Scope = Scope()
    sae: str | None = None
    feature: int | None = None
    when: When | None = None

    def __post_init__(self) -> None:
        if isinstance(self.vector, Tensor):
            object.__setattr__(self, "vector", tuple(self.vector.detach().float().cpu().tolist()))
        if (self.vector is None) == (self.sae is None or self.feature is None):
            raise ValueError(f"a direction needs values or (sae, feature), exactly one: {self}")


@dataclass(frozen=True)
class CodeEdit:
    codebook: str
    head: int
    code: int
    strength: float = 1.0
    scope: Scope = Scope()
    when: When | None = None


@dataclass(frozen=True)
class ReadoutSpec:
    saes: tuple[str, ...] = ()
    codebooks: tuple[str, ...] = ()
    top_k: int = 0
    feature_ids: tuple[int, ...] = ()
    include_prompt: bool = False

    @property
    def empty(self) -> bool:
        return not self.saes and not self.codebooks


@dataclass(frozen=True)
class SteeringSpec:
    """Everything one request asks of the hooks."""

    features: tuple[FeatureEdit, ...] = ()
    directions: tuple[DirectionEdit, ...] = ()
    codes: tuple[CodeEdit, ...] = ()
    readouts: ReadoutSpec = ReadoutSpec()
    generations: tuple[tuple[str, int], ...] = ()
    """(SAE id, generation) of each SAE the spec names, as validated: an SAE unloaded and loaded
    again under the same id is another generation, and the spec's edits of the old one are dropped"""
    guards: tuple[Gate, ...] = ()
    """stop the sequence at the first position where one of these reads above its threshold"""

    def edited_saes(self) -> set[str]:
        """Every SAE the spec edits a feature of or takes a direction from."""
        return {e.sae for e in self.features} | {e.sae for e in self.directions if e.sae is not None}

    def sae_ids(self) -> set[str]:
        """Every SAE the spec edits, reads, takes a direction from or watches (gates and guards)."""
        return self.edited_saes() | set(self.readouts.saes) | {g.sae for g in self.gates()}

    def edits(self) -> tuple:
        return (*self.features, *self.directions, *self.codes)

    def gates(self) -> tuple[Gate, ...]:
        """The gates read at every step: those of edits still waiting for theirs, and the guards."""
        return self._gates

    @functools.cached_property
    def _gates(self) -> tuple[Gate, ...]:  # asked at every step: worked out once per spec
        out = dict.fromkeys(e.when.gate for e in self.edits() if e.when is not None)
        out.update(dict.fromkeys(self.guards))
        return tuple(out)

    def opened(self, opened_at: Mapping[Gate, int], prompt_len: int) -> SteeringSpec:
        """This spec with each edit whose gate opened (at `opened_at[gate]`) made unconditional over
        the positions its condition and its scope both allow; edits still waiting stay as they are
        (`build_tables` leaves them out, and reads their gates)."""
        if not opened_at:
            return self

        def resolve(edits):
            out = []
            for e in edits:
                if e.when is None or e.when.gate not in opened_at:
                    out.append(e)
                    continue
                lo, hi = e.scope.bounds(prompt_len)
                g_lo, g_hi = e.when.bounds(opened_at[e.when.gate], prompt_len)
                lo, hi = max(lo, g_lo), min(hi, g_hi)
                if lo < hi:
                    out.append(replace(e, when=None, scope=Scope("range", lo, None if hi == OPEN_END else hi)))
            return tuple(out)

        return replace(self, features=resolve(self.features), directions=resolve(self.directions),
                       codes=resolve(self.codes))

    def current(self, generations: Mapping[str, int]) -> SteeringSpec:
        """This spec without what names an SAE that is gone or of another generation than validated."""
        mine = dict(self.generations)
        stale = {i for i in self.sae_ids() if i in mine and generations.get(i) != mine[i]}
        if not stale:
            return self
        def live(e) -> bool:
            return getattr(e, "sae", None) not in stale and (e.when is None or e.when.gate.sae not in stale)

        return SteeringSpec(
            features=tuple(e for e in self.features if live(e)),
            directions=tuple(e for e in self.directions if live(e)),
            codes=tuple(e for e in self.codes if live(e)),
            readouts=replace(self.readouts, saes=tuple(i for i in self.readouts.saes if i not in stale)),
            generations=tuple((i, g) for i, g in self.generations if i not in stale),
            guards=tuple(g for g in self.guards if g.sae not in stale),
        )

    @property
    def steers(self) -> bool:
        return bool(self.features or self.directions or self.codes)

    @property
    def active(self) -> bool:
        """Whether the hooks have anything to do for this request: it steers, reads or watches a gate."""
        return self.steers or not self.readouts.empty or bool(self.guards)


def spec_to_wire(spec: SteeringSpec) -> dict:
    """`spec` as JSON-able builtins (msgspec), for another process (vLLM's workers) or a hash."""
    return msgspec.to_builtins(spec)


def spec_from_wire(raw: dict) -> SteeringSpec:
    """The inverse of `spec_to_wire`, type-checked against the dataclasses above."""
    return msgspec.convert(raw, SteeringSpec)


# ---------------------------------------------------------------- per-step tables


@dataclass
class RowIndex:
    """Per token row: its request slot (-1 = leave alone), its token position, and
    whether its readouts are wanted this step (None: every row's)."""

    slot: Tensor  # (N,) long
    position: Tensor  # (N,) long
    read: Tensor | None = None  # (N,) bool
    every_row_read: bool = False  # every row is a slot's and is read (known on the host)


@dataclass
class _OpTable:
    """Ops of every slot for one SAE / codebook / site: column m is each slot's m-th op."""

    start: Tensor  # (S, M)
    end: Tensor  # (S, M)
    valid: Tensor  # (S, M) bool

    def active(self, rows: RowIndex, sel: Tensor) -> tuple[Tensor, Tensor]:
        """Slots of the selected rows, and which of their ops apply at their positions."""
        slot, pos = rows.slot[sel], rows.position[sel, None]
        act = self.valid[slot] & (self.start[slot] <= pos) & (pos < self.end[slot])  # (R, M)
        return slot, act

    def active_all(self, rows: RowIndex) -> tuple[Tensor, Tensor]:
        """`active` for every row, with fixed shapes and no host synchronisation (the in-graph form)."""
        return self.active_of(rows.slot, rows.position)

    def active_of(self, slot: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        """`active_all` for rows of slots `slot (R,)` at positions `pos (R,)`: a row of no slot (-1)
        reads slot 0's ops, all masked off."""
        s, p = slot.clamp(min=0), pos[:, None]
        act = self.valid[s] & (self.start[s] <= p) & (p < self.end[s]) & (slot >= 0)[:, None]
        return s, act  # (R,), (R, M)


@dataclass
class SaeTable(_OpTable):
    feature: Tensor  # (S, M) long
    op: Tensor  # (S, M) long
    value: Tensor  # (S, M)
    reads: Tensor  # (S,) bool: slot reads this SAE out, or watches features of it for its gates
    top_k: int
    selected: Tensor  # (K,) feature ids read for every reading slot
    edits: bool = True  # some slot has an op (known on the host: no device sync to find out)
    any_reads: bool = True  # some slot reads (`reads` has a True; known on the host)
    every_slot_reads: bool = False  # every slot reads this SAE out (known on the host)
    scale: Tensor | None = None
    shift: Tensor | None = None
    """(S, M): each op as f' = f scale + shift (CLAMP: 0, v; ADD: 1, v; SCALE: v, 0; ABLATE: 0, 0), so an
    edit is a few small ops whatever its kind; worked out from `op` and `value` when not given"""
    gates_only: Tensor | None = None
    """(S,) bool: slot reads only its gates' features (no readout of this SAE): an elementwise SAE
    encodes just the `selected` columns for it; None when no slot does (known on the host)"""

    def __post_init__(self) -> None:
        if self.scale is None or self.shift is None:
            self.scale, self.shift = _scale_shift(self.op, self.value)

    @functools.cached_property
    def kernel_buffers(self) -> tuple[Tensor, ...]:
        """valid (as uint8), start, end, feature (int64), scale, shift (float32), contiguous: the tables as
        the C kernel reads them (`screen_kernel.feature_edits`), worked out once per table."""
        longs = (t.contiguous().long() for t in (self.start, self.end, self.feature))
        return self.valid.contiguous().view(torch.uint8), *longs, self.scale.float().contiguous(), \
            self.shift.float().contiguous()


def _scale_shift(op: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
    # SCALE's shift is -0.0: f v + (-0.0) is f v exactly, -0.0 included
    zero, one = torch.zeros_like(value), torch.ones_like(value)
    scale = torch.where(op == int(Op.ADD), one, torch.where(op == int(Op.SCALE), value, zero))
    shift = torch.where((op == int(Op.CLAMP)) | (op == int(Op.ADD)), value,
                        torch.where(op == int(Op.SCALE), -zero, zero))
    return scale, shift


def _apply_op(f: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """f' = f scale + shift, and exactly the shift where the op sets the value (CLAMP, ABLATE: scale 0),
    even where f is not finite (inf 0 is NaN)."""
    return torch.where(scale == 0, shift, f * scale + shift)


@dataclass
class DirectionTable(_OpTable):
    vector: Tensor  # (S, M, d)
    alpha: Tensor  # (S, M)


@dataclass
class CodeTable(_OpTable):
    head: Tensor  # (S, M)
    code: Tensor  # (S, M)
    strength: Tensor  # (S, M)
    reads: Tensor  # (S,) bool


@dataclass
class StepTables:
    saes: dict[str, SaeTable] = field(default_factory=dict)
    directions: dict[str, DirectionTable] = field(default_factory=dict)
    codebooks: dict[str, CodeTable] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not (self.saes or self.directions or self.codebooks)


def _pad(rows: list[list], width: int, fill) -> list[list]:
    return [r + [fill] * (width - len(r)) for r in rows]


def _scope_columns(per_slot: list[list], prompt_lens: list[int], device) -> tuple[Tensor, Tensor, Tensor, int]:
    width = max(1, max(len(edits) for edits in per_slot))
    bounds = [[e.scope.bounds(p) for e in edits] for edits, p in zip(per_slot, prompt_lens)]
    start = torch.tensor(_pad([[b[0] for b in r] for r in bounds], width, 0), device=device)
    end = torch.tensor(_pad([[b[1] for b in r] for r in bounds], width, 0), device=device)
    valid = torch.tensor(_pad([[True] * len(r) for r in per_slot], width, False), device=device)
    return start, end, valid, width


def _direction_vector(e: DirectionEdit, saes: Mapping[str, SAE]) -> Tensor | None:
    if e.vector is not None:
        return torch.tensor(e.vector, dtype=torch.float32)
    sae = saes.get(e.sae)
    return None if sae is None else sae.W_dec[e.feature].detach().float()


def build_tables(
    specs: list[SteeringSpec | None], prompt_lens: list[int], device: torch.device | str = "cpu",
    saes: Mapping[str, SAE] | None = None, generations: Mapping[str, int] | None = None,
) -> StepTables:
    """Turn each slot's request spec into the per-slot tables the hooks gather from.

    `saes` resolves directions given by SAE feature; one whose SAE is gone (unloaded while
    the request ran) is dropped, as its feature edits are. With `generations` (the loaded
    SAEs'), what a spec names of an SAE gone or reloaded since it was validated is dropped."""
    specs = [s or SteeringSpec() for s in specs]
    if generations is not None:
        specs = [s.current(generations) for s in specs]
    tables = StepTables()
    float_kw = {"device": device, "dtype": torch.float32}

    gates = [s.gates() for s in specs]
    sae_ids = ({e.sae for s in specs for e in s.features} | {i for s in specs for i in s.readouts.saes}
               | {g.sae for gs in gates for g in gs})
    for sae_id in sorted(sae_ids):
        per_slot = [[e for e in s.features if e.sae == sae_id and e.when is None] for s in specs]
        start, end, valid, w = _scope_columns(per_slot, prompt_lens, device)
        watched = {g.feature for gs in gates for g in gs if g.sae == sae_id}
        gates_only = [sae_id not in s.readouts.saes and any(g.sae == sae_id for g in gs) for s, gs in zip(specs, gates)]
        reading = [sae_id in s.readouts.saes or g for s, g in zip(specs, gates_only)]
        tables.saes[sae_id] = SaeTable(
            start=start, end=end, valid=valid,
            feature=torch.tensor(_pad([[e.feature for e in r] for r in per_slot], w, 0), device=device),
            op=torch.tensor(_pad([[int(e.op) for e in r] for r in per_slot], w, 0), device=device),
            value=torch.tensor(_pad([[e.value for e in r] for r in per_slot], w, 0.0), **float_kw),
            reads=torch.tensor(reading, device=device),
            top_k=max((s.readouts.top_k for s, r in zip(specs, reading) if r), default=0),
            selected=torch.tensor(
                sorted({i for s, r in zip(specs, reading) if r and sae_id in s.readouts.saes
                        for i in s.readouts.feature_ids} | watched),
                dtype=torch.long, device=device,
            ),
            edits=any(per_slot), any_reads=any(reading),
            every_slot_reads=all(sae_id in s.readouts.saes for s in specs),
            gates_only=torch.tensor(gates_only, device=device) if any(gates_only) else None,
        )

    saes = saes or {}
    vectors = [[(e, _direction_vector(e, saes)) for e in s.directions if e.when is None] for s in specs]
    vectors = [[(e, v) for e, v in r if v is not None] for r in vectors]
    for site in sorted({e.site for r in vectors for e, _ in r}):
        per_slot = [[(e, v) for e, v in r if e.site == site] for r in vectors]
        start, end, valid, w = _scope_columns([[e for e, _ in r] for r in per_slot], prompt_lens, device)
        d = next(v.shape[0] for r in per_slot for _, v in r)
        vec = torch.zeros(len(specs), w, d, **float_kw)
        for i, r in enumerate(per_slot):
            for m, (_, v) in enumerate(r):
                vec[i, m] = v
        tables.directions[site] = DirectionTable(
            start=start, end=end, valid=valid, vector=vec,
            alpha=torch.tensor(_pad([[e.alpha for e, _ in r] for r in per_slot], w, 0.0), **float_kw),
        )

    codebook_ids = {e.codebook for s in specs for e in s.codes} | {i for s in specs for i in s.readouts.codebooks}
    for cb_id in sorted(codebook_ids):
        per_slot = [[e for e in s.codes if e.codebook == cb_id and e.when is None] for s in specs]
        start, end, valid, w = _scope_columns(per_slot, prompt_lens, device)
        tables.codebooks[cb_id] = CodeTable(
            start=start, end=end, valid=valid,
            head=torch.tensor(_pad([[e.head for e in r] for r in per_slot], w, 0), device=device),
            code=torch.tensor(_pad([[e.code for e in r] for r in per_slot], w, 0), device=device),
            strength=torch.tensor(_pad([[e.strength for e in r] for r in per_slot], w, 1.0), **float_kw),
            reads=torch.tensor([cb_id in s.readouts.codebooks for s in specs], device=device),
        )
    return tables


# ---------------------------------------------------------------- readouts


@dataclass
class SaeReadout:
    source: str
    rows: Tensor  # (R,) token rows
    top_ids: Tensor  # (R, k)
    top_values: Tensor  # (R, k)
    selected_ids: Tensor  # (K,)
    selected_values: Tensor  # (R, K)


@dataclass
class CodeReadout:
    source: str
    rows: Tensor  # (R,)
    ids: Tensor  # (R, G, k)


Readout = SaeReadout | CodeReadout


# ---------------------------------------------------------------- the site hook


@dataclass
class SiteArtifacts:
    """What is attached at one site."""

    saes: dict[str, SAE] = field(default_factory=dict)
    codebooks: dict[str, Codebook] = field(default_factory=dict)


def _row_mask(rows: RowIndex, wanted: Tensor) -> Tensor:
    """(N,) bool: rows whose slot is marked in `wanted (S,)`; never a padding or unsteered row. Fixed
    shapes, no host synchronisation (a row of no slot, -1, reads slot 0's mark, masked off)."""
    if wanted.numel() == 0:
        return torch.zeros_like(rows.slot, dtype=torch.bool)
    return wanted[rows.slot.clamp(min=0)] & (rows.slot >= 0)


def _reading(rows: RowIndex, reads: Tensor) -> Tensor:
    hit = _row_mask(rows, reads)
    return hit if rows.read is None else hit & rows.read


def _slot_rows(rows: RowIndex, wanted: Tensor) -> Tensor:
    return _row_mask(rows, wanted).nonzero().squeeze(-1)


def apply_codebook(cb_id: str, cb: Codebook, x: Tensor, table: CodeTable | None, rows: RowIndex,
                   readouts: list[Readout]) -> Tensor:
    g = cb.cfg.num_heads
    xh = x.view(x.shape[0], g, -1)  # (N, G, d)
    forced: list[ForcedCodes] = []
    if table is not None:
        sel = _slot_rows(rows, table.valid.any(dim=1))
        if sel.numel():
            slot, act = table.active(rows, sel)
            for m in range(act.shape[1]):
                on = act[:, m]
                forced.append(ForcedCodes(sel[on], table.head[slot[on], m], table.code[slot[on], m],
                                          table.strength[slot[on], m]))
    y, ids = cb.snap(xh, forced)
    if table is not None:
        read = _reading(rows, table.reads).nonzero().squeeze(-1)
        if read.numel():
            readouts.append(CodeReadout(cb_id, read, ids[read]))
    return y.reshape(x.shape)


def _feature_edits(sae: SAE, x: Tensor, table: SaeTable, slot: Tensor, act: Tensor,
                   f0: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Feature edits on rows `x (R, d)` with slots `slot (R,)` and active ops `act (R, M)`.

    Per op column m: `f0[:, m]`, its feature's activation before any edit (as given, else from
    only the M encoder columns an elementwise SAE needs, or a TopK SAE's k active features);
    `f1[:, m]`, the feature's value after ops 0..m (ops apply in the request's order; two on one feature
    chain); `last[:, m]`, whether column m holds its feature's final value. Fixed shapes, no
    host synchronisation when compiled or on a GPU: the in-graph form of an edit (on a CPU, eager,
    a TopK SAE's f0 encodes only the rows where an edited feature is above 0: `SAE.topk_active_at`)."""
    feat = table.feature[slot]  # (R, M)
    if f0 is None:
        f0 = sae.encode_at(x, feat) if sae.elementwise else sae.topk_active_at(x, feat)  # (R, M)
    scale, shift = table.scale[slot].to(f0.dtype), table.shift[slot].to(f0.dtype)
    if feat.shape[1] == 1:  # one op per slot (the common case): nothing chains
        return f0, torch.where(act, _apply_op(f0, scale, shift), f0), act
    cols: list[Tensor] = []
    for m in range(feat.shape[1]):
        cur = f0[:, m]
        for j in range(m):  # the newest earlier active op on the same feature set its value
            cur = torch.where(act[:, j] & (feat[:, j] == feat[:, m]), cols[j], cur)
        cols.append(torch.where(act[:, m], _apply_op(cur, scale[:, m], shift[:, m]), cur))
    f1 = torch.stack(cols, dim=1)
    later = torch.zeros_like(act)
    for m in range(feat.shape[1]):
        for j in range(m + 1, feat.shape[1]):
            later[:, m] |= act[:, j] & (feat[:, j] == feat[:, m])
    return f0, f1, act & ~later


def _edit_delta(sae: SAE, feat: Tensor, f0: Tensor, f1: Tensor, last: Tensor) -> Tensor:
    """sum over edited features i of (f'_i - f_i) W_dec[i]: `(R, d)`, zero for rows without edits."""
    coef = torch.where(last, f1 - f0, torch.zeros_like(f0))  # (R, M)
    return _scaled_back(sae, torch.einsum("rm,rmd->rd", coef, sae.W_dec[feat]))


def _scaled_back(sae: SAE, delta: Tensor) -> Tensor:
    if sae.in_scale is not None and not sae.cfg.is_transcoder:  # it reads the normalized value: scale back
        delta = delta * sae.in_scale
    return delta


def _edits(sae: SAE, x: Tensor, table: SaeTable, slot: Tensor, pos: Tensor, feat: Tensor | None = None,
           f0: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The feature edits of the rows `x (R, d)` of slots `slot (R,)` (-1: no slot, nothing edited) at token
    positions `pos (R,)`: their edited features `feat (R, M)`, `_feature_edits`' f0, f1 and last, and the
    delta `(R, d_out)` that `_edit_delta` gives. Eager on a CPU, everything after f0 is one C call
    (`screen_kernel.feature_edits`, one pass per row instead of ~25 small ops); elsewhere (a GPU, a
    graph being compiled, no C compiler) the torch ops, with fixed shapes and no host synchronisation."""
    if feat is None:
        feat = table.feature[slot.clamp(min=0)]
    if f0 is None:
        f0 = sae.encode_at(x, feat) if sae.elementwise else sae.topk_active_at(x, feat)  # (R, M)
    done = None if f0.device.type != "cpu" else screen_kernel.feature_edits(table, slot, pos, f0, sae.W_dec)
    if done is not None:
        f1, last, delta = done
        return feat, f0, f1, last, _scaled_back(sae, delta)
    _, f1, last = _feature_edits(sae, x, table, *table.active_of(slot, pos), f0=f0)
    return feat, f0, f1, last, _edit_delta(sae, feat, f0, f1, last)


def sae_delta_all_rows(sae: SAE, x: Tensor, table: SaeTable, rows: RowIndex) -> Tensor:
    """(f' - f) W_dec on every row of `x (N, d_in)`, `(N, d_out)` (zero for rows without active ops),
    with fixed shapes and no host synchronisation, so it compiles whole (torch.compile fullgraph,
    CUDA graphs). For an elementwise SAE it reads only the edited features' encoder columns; a TopK
    SAE's features depend on each other, so it encodes every row (on a CPU, eager: every row where
    an edited feature is above 0, which is not fixed-shape, and a CPU has no device to wait for)."""
    return _edits(sae, x, table, rows.slot, rows.position)[-1]


def sae_edit_all_rows(sae: SAE, x: Tensor, table: SaeTable, rows: RowIndex) -> Tensor:
    """x' = x + (f' - f) W_dec on every row of `x (N, d)`: the in-graph form of an SAE's edits."""
    return x + sae_delta_all_rows(sae, x, table, rows).to(x.dtype)


def apply_sae(sae_id: str, sae: SAE, x: Tensor, table: SaeTable, rows: RowIndex, readouts: list[Readout],
              out: Tensor | None = None) -> Tensor:
    """Read `sae` on the rows `x (N, d_in)` and add its edits, (f' - f) W_dec, to `out (N, d_out)`:
    x itself by default (an SAE: x' comes back), or what a transcoder adds where it writes."""
    out = x if out is None else out
    if table.edits and not table.any_reads and (sae.elementwise or x.shape[0] <= screened_topk.ALL_ROWS):
        # edits, no readout (a steered decode step, say): every row at once, fixed shapes (a TopK SAE
        # encodes rows of no slot too, but its screen reads the whole encoder for any number of rows);
        # on a CPU, eager, a TopK SAE's whole step is one C call after its screen's product
        edited = sae.topk_edit(x, table, rows.slot, rows.position) if out is x and not sae.elementwise else None
        if edited is not None:
            return edited
        return out + _edits(sae, x, table, rows.slot, rows.position)[-1].to(out.dtype)
    every = rows.every_row_read and table.every_slot_reads  # known on the host: no rows to pick out
    if every and out is x and table.edits and table.top_k > 0 and not table.selected.numel() and not sae.elementwise:
        # a TopK decode step where every row reads the top and edits: on a CPU, one C call after the product
        fused = sae.topk_read_edit(x, table, rows.slot, rows.position)
        if fused is not None:
            y, top_values, top_ids = fused
            readouts.append(SaeReadout(source=sae_id, rows=torch.arange(x.shape[0]), top_ids=top_ids,
                                       top_values=top_values, selected_ids=table.selected,
                                       selected_values=top_values.new_zeros(x.shape[0], 0)))
            return y
    read_mask = None if every else _reading(rows, table.reads)
    if table.gates_only is not None and sae.elementwise:  # rows that only watch gates: their columns
        watching = read_mask & _row_mask(rows, table.gates_only)
        read_mask = read_mask & ~watching
        _watch(sae_id, sae, x, table, rows, watching.nonzero().squeeze(-1), readouts)
    if table.edits and sae.elementwise:  # edits from the edited features' columns, on every row
        feat, f0, f1, last, delta = _edits(sae, x, table, rows.slot, rows.position)
        out = out + delta.to(out.dtype)
        reading = torch.arange(x.shape[0], device=x.device) if every else read_mask.nonzero().squeeze(-1)
        if reading.numel():  # readouts are of f' = f(x) with the edits (these f1), not of f(x')
            x_read = x if every else x[reading]
            top = _top_to_read(sae, x_read, table)
            f = sae.encode(x_read) if top is None else None  # (R, d_sae)
            _read(sae_id, table, reading, f, feat[reading], f1[reading], last[reading], readouts, top)
        return out
    # TopK (a feature's value depends on all of them; the only activation that is not elementwise),
    # or reading only: encode the rows that edit or read, once, for both.
    if every:
        sel, reading = torch.arange(x.shape[0], device=x.device), None  # `reading` None: every row
    else:
        editing = _row_mask(rows, table.valid.any(dim=1)) if table.edits else torch.zeros_like(read_mask)
        sel = (editing | read_mask).nonzero().squeeze(-1)
        if sel.numel() == 0:
            return out
        reading = read_mask[sel]
    whole = sel.numel() == x.shape[0]  # every row edits or reads (a decode step): no gather, no scatter
    xs, slot, pos = (x, rows.slot, rows.position) if whole else (x[sel], rows.slot[sel], rows.position[sel])
    feat = table.feature[slot]
    all_read = reading is None or bool(reading.all())
    any_read = all_read or bool(reading.any())
    top = None
    if sae.elementwise:  # reading only
        top = _top_to_read(sae, xs, table)
        f = sae.encode(xs) if top is None else None  # (R, d_sae)
        f0 = sae.encode_at(xs, feat) if f is None else f.gather(1, feat)
    else:  # TopK: rows read out, their k active features; rows that only edit, whether each edited one is among them
        f = None
        if all_read:  # a decode step: where it reads the top only, top and f0 from one screen pass
            fused = sae.topk_read(xs, feat, table.top_k + feat.shape[1]) if table.top_k and \
                not table.selected.numel() else None
            if fused is not None:
                values, ids, f0 = fused  # (R, top_k + M): `_topk_top`'s answer, without the selected
                top = values, ids, values.new_zeros(values.shape[0], 0)
            else:
                values, ids = sae.topk_encode(xs)  # (R, k)
                f0 = active_at(values, ids, feat)
        elif not any_read:
            f0 = sae.topk_active_at(xs, feat)
        else:  # a prefill: one row per request is read out (the one that chooses its first token)
            read, edit = reading.nonzero().squeeze(-1), (~reading).nonzero().squeeze(-1)
            values, ids = sae.topk_encode(xs[read])
            f0 = feat.new_zeros(feat.shape, dtype=values.dtype).index_copy(0, read, active_at(values, ids, feat[read]))
            f0.index_copy_(0, edit, sae.topk_active_at(xs[edit], feat[edit]))
    _, _, f1, last, delta = _edits(sae, xs, table, slot, pos, feat, f0)
    if table.edits:
        delta = delta.to(out.dtype)
        out = out + delta if whole else out.index_add(0, sel, delta)
    if any_read:
        def pick(t: Tensor) -> Tensor:  # the rows read out
            return t if all_read else t[reading]

        if top is not None:
            top = tuple(pick(t) for t in top)
        elif f is not None:
            f = pick(f)
        else:  # the TopK values and ids of the rows read out: their top, else their dense activation
            top = _topk_top(values, ids, table)
            if top is None:
                f = values.new_zeros(ids.shape[0], sae.cfg.d_sae).scatter_(-1, ids, values)
        _read(sae_id, table, pick(sel), f, pick(feat), pick(f1), pick(last), readouts, top)
    return out


def _top_to_read(sae: SAE, x: Tensor, table: SaeTable) -> tuple[Tensor, Tensor, Tensor] | None:
    """What a readout of the rows `x` can show, where the SAE has a screen (`SAE.top_activations`),
    without the dense (R, d_sae) activation: the top `top_k + M` activations, values and ids (M edit
    columns can push at most M features out of the top `top_k`), and the selected features' values
    `(R, K)`, all exact. A readout of selected features only needs just their columns, on any SAE
    this is called for (elementwise). None where there is no screen: the readout reads the whole
    encode."""
    def selected() -> Tensor:
        return sae.encode_at(x, table.selected.expand(x.shape[0], -1))

    if not table.top_k:
        return sae.W_enc.new_zeros(x.shape[0], 0), table.selected.new_zeros(x.shape[0], 0), selected()
    top = sae.top_activations(x, table.top_k + table.feature.shape[1])
    # a row with fewer than n active features would show zeros whose ids are the dense top-k's
    # choice among all the zeros: read such a step from the whole encode
    if top is None or not bool((top[0][:, -1] > 0).all()):
        return None
    return *top, selected()


def _topk_top(values: Tensor, ids: Tensor, table: SaeTable) -> tuple[Tensor, Tensor, Tensor] | None:
    """`_top_to_read`'s answer for a TopK SAE, from its rows' k active features `values, ids (R, k)`
    (largest first), where they hold the top `top_k + M` and those are all above 0: the readout
    without the dense (R, d_sae) activation and its top-k. None where they do not."""
    n = table.top_k + table.feature.shape[1]
    if n > ids.shape[1] or (table.top_k and not bool((values[:, n - 1] > 0).all())):
        return None
    return values, ids, _selected_of(values, ids, table.selected)


def _selected_of(values: Tensor, ids: Tensor, selected: Tensor) -> Tensor:
    """The values `values (R, k)` of features `ids (R, k)` (distinct per row) at the sorted feature ids
    `selected (K,)`: `(R, K)`, 0 where a row does not have one; O(R k log K), no (R, k, K) comparison."""
    K = selected.numel()
    if K == 0:
        return values.new_zeros(values.shape[0], 0)
    pos = torch.searchsorted(selected, ids)
    hit = selected[pos.clamp(max=K - 1)] == ids
    return values.new_zeros(values.shape[0], K + 1).scatter_(1, torch.where(hit, pos, K), values)[:, :K]


def _watch(sae_id: str, sae: SAE, x: Tensor, table: SaeTable, rows: RowIndex, watching: Tensor,
           readouts: list[Readout]) -> None:
    """The gates' features (`table.selected`) at the token rows `watching` of an elementwise SAE, with
    the edits written in, as `_read` gives them, from K + M encoder columns instead of the dictionary."""
    if watching.numel() == 0:
        return
    xs = x[watching]
    ids = table.selected.expand(xs.shape[0], -1)  # (R, K)
    values = sae.encode_at(xs, ids)
    if table.edits:
        slot, act = table.active(rows, watching)
        _, f1, last = _feature_edits(sae, xs, table, slot, act)
        feat = table.feature[slot]
        for m in range(feat.shape[1]):  # in column order: a feature edited twice is written once, last
            hit = last[:, m, None] & (feat[:, m, None] == ids)
            values = torch.where(hit, f1[:, m, None].to(values.dtype), values)
    readouts.append(SaeReadout(source=sae_id, rows=watching, top_ids=ids[:, :0], top_values=values[:, :0],
                               selected_ids=table.selected, selected_values=values))


def _read(sae_id: str, table: SaeTable, rows: Tensor, f: Tensor | None, feat: Tensor, f1: Tensor, last: Tensor,
          readouts: list[Readout], top: tuple[Tensor, Tensor, Tensor] | None = None) -> None:
    """The readout of token `rows`: their activations `f (R, d_sae)` with the edits written in, or the
    same read from `top` (`_top_to_read`: the top values and ids, and the selected features' values)."""
    if top is not None:
        values, ids, selected = top
        for m in range(feat.shape[1] if table.selected.numel() else 0):  # an edited feature among the selected
            hit = last[:, m, None] & (table.selected == feat[:, m, None])
            selected = torch.where(hit, f1[:, m, None], selected)
        best = screen_kernel.edited_top(values, ids, feat, f1, last, table.top_k)
        top_values, top_ids = best if best is not None else _edited_top(values, ids, feat, f1, last, table.top_k)
        readouts.append(SaeReadout(source=sae_id, rows=rows, top_ids=top_ids, top_values=top_values,
                                   selected_ids=table.selected, selected_values=selected))
        return
    r = torch.arange(rows.numel(), device=f.device)
    for m in range(feat.shape[1]):  # column by column: a feature edited twice is written once, last
        f[r, feat[:, m]] = torch.where(last[:, m], f1[:, m], f[r, feat[:, m]])
    k = min(table.top_k, f.shape[-1])
    top = f.topk(k, dim=-1) if k else None
    readouts.append(SaeReadout(
        source=sae_id, rows=rows,
        top_ids=top.indices if top else f.new_zeros((f.shape[0], 0), dtype=torch.long),
        top_values=top.values if top else f.new_zeros((f.shape[0], 0)),
        selected_ids=table.selected, selected_values=f[:, table.selected],
    ))


def _edited_top(values: Tensor, ids: Tensor, feat: Tensor, f1: Tensor, last: Tensor,
                top_k: int) -> tuple[Tensor, Tensor]:
    """The top `top_k` of the rows' top activations `values, ids (R, n)` with their edits written in: each
    edited feature's final value (`f1` where `last`, `(R, M)`) where it sits among them, or beside them (an
    edited feature outside the top can enter it). `screen_kernel.edited_top` in torch ops."""
    outside = last & ~(feat[:, :, None] == ids[:, None, :]).any(-1)
    extra = torch.where(outside, f1, torch.full_like(f1, float("-inf")))
    for m in range(feat.shape[1]):
        values = torch.where(last[:, m, None] & (ids == feat[:, m, None]), f1[:, m, None], values)
    best = torch.cat([values, extra], 1).topk(top_k, dim=-1)
    return best.values, torch.cat([ids, feat], 1).gather(1, best.indices)


def apply_direction(x: Tensor, table: DirectionTable, rows: RowIndex) -> Tensor:
    """x' = x + sum of the active ops' alpha v, on every row at once (the in-graph form)."""
    slot, act = table.active_all(rows)
    coef = act * table.alpha[slot]  # (N, M)
    return x + torch.einsum("nm,nmd->nd", coef, table.vector[slot]).to(x.dtype)


@functools.cache
def _site_name(hook_name: str) -> str:
    return Site.parse(hook_name).name  # e.g. blocks.3.ln2.hook_normalized is blocks.3.mlp.hook_in


def steer_site(site: str, x: Tensor, artifacts: SiteArtifacts | None, tables: StepTables, rows: RowIndex,
               pending: dict[str, Tensor] | None = None) -> tuple[Tensor, list[Readout]]:
    """Apply everything attached at `site` to the token rows `x (N, d)`; return x' and readouts.

    `pending` carries edits across the sites of one forward pass: a transcoder read at an earlier
    site leaves its edits, by the site it writes, and they are added here first (so whatever reads
    this site sees them)."""
    readouts: list[Readout] = []
    if pending and site in pending:
        x = x + pending.pop(site).to(x.dtype)
    if artifacts is not None:
        for cb_id, cb in artifacts.codebooks.items():
            x = apply_codebook(cb_id, cb, x, tables.codebooks.get(cb_id), rows, readouts)
        for sae_id, sae in artifacts.saes.items():
            if sae_id not in tables.saes:
                continue
            table = tables.saes[sae_id]
            if not sae.cfg.is_transcoder:
                x = apply_sae(sae_id, sae, x, table, rows, readouts)
                continue
            if pending is None:
                raise ValueError(f"transcoder {sae_id} at {site}: steer_site needs `pending` to carry its edits")
            target = _site_name(sae.cfg.hook_name_out)
            base = pending.get(target)
            if table.edits and base is None:
                base = x.new_zeros(x.shape[0], sae.cfg.d_out)
            written = apply_sae(sae_id, sae, x, table, rows, readouts, out=base)
            if table.edits:
                pending[target] = written
    if site in tables.directions:
        x = apply_direction(x, tables.directions[site], rows)
    return x, readouts
