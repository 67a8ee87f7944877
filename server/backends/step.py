"""One forward step's steering, shared by the reference hooks and the vLLM worker.

A backend describes where each request's token rows sit in the step (`Span`s),
`row_index` turns that into the `RowIndex` the steering math reads, and a
`StepRecorder` runs every site hook of the step through `steer_site`, keeping
the readouts and the time spent. After the step, `StepRecorder.routed` cuts the
readouts per token row, already trimmed to what each request asked for.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from rudder.core.errors import InvalidArgument
from rudder.core.steering import (
    CodeReadout,
    Gate,
    Readout,
    RowIndex,
    SaeReadout,
    SiteArtifacts,
    SteeringSpec,
    StepTables,
    steer_site,
)
from rudder.server.backends.base import GuardHit, TokenReadout


def broken_steering(position: int) -> InvalidArgument:
    """The error a request gets when its steering overflowed the stream (the row went on unsteered)."""
    return InvalidArgument(f"the steering made the activations non-finite by token position {position} (an "
                           f"overflow in the model's dtype); use smaller values, scales or alphas")


@dataclass(frozen=True)
class Span:
    """One steering request's token rows [start, end) in a step."""

    slot: int  # its row in the step's tables
    start: int
    end: int
    computed: int  # its tokens already in the KV cache before this step
    prompt_len: int
    spec: SteeringSpec

    def sampled_row(self) -> int | None:
        """The row whose logits give its next token: the last, once the prompt is computed (None
        for a chunk of a long prompt: its next token is not sampled this step)."""
        if self.start < self.end and self.computed + (self.end - self.start) >= self.prompt_len:
            return self.end - 1
        return None

    def reported_rows(self) -> range:
        """Rows the backend reports on after the step (readouts, possibly none, and overflow): the read
        rows, or else the sampled row, so a request hears of every token it gets."""
        return self._rows[1]

    def read_rows(self) -> range:
        """Rows whose readouts it gets: every row when it asked for prompt readouts (or is a
        trace), else only the sampled row, if it asked for readouts at all."""
        return self._rows[0]

    @functools.cached_property
    def _rows(self) -> tuple[range, range]:  # read and reported, worked out once: both are asked every step
        sampled = self.sampled_row()
        if self.start == self.end:
            read = range(0)
        elif self.spec.readouts.include_prompt:  # a trace sets it, readouts asked for or not: a row per prompt token
            read = range(self.start, self.end)
        elif (self.spec.readouts.empty and not self.spec.gates()) or sampled is None:
            read = range(0)
        else:
            read = range(sampled, sampled + 1)
        return read, read if read or sampled is None else range(sampled, sampled + 1)


class GateState:
    """One request's conditions and guards, decided on the host after each step from the step's
    readouts, the same way on every backend (no synchronisation inside the forward pass):
    `observe` each read row in position order, then build the next step's tables from `spec`."""

    def __init__(self, spec: SteeringSpec, prompt_len: int):
        self.base, self.prompt_len = spec, prompt_len
        self.spec = spec  # the edits whose gates opened made unconditional
        self.opened: dict[Gate, int] = {}
        self.version = 0  # bumps when a gate opens: the tables are built again

    @staticmethod
    def needed(spec: SteeringSpec | None) -> bool:
        return spec is not None and bool(spec.gates())

    def observe(self, position: int, values: dict[tuple[str, int], float]) -> GuardHit | None:
        """The readout values of the request's row at `position`: open the gates that read above their
        thresholds there; the first guard that does, if any."""
        newly = {g: position for g in self.spec.gates()
                 if g not in self.opened and values.get((g.sae, g.feature), float("-inf")) > g.above}
        for i, g in enumerate(self.base.guards):
            v = values.get((g.sae, g.feature))
            if v is not None and v > g.above:
                return GuardHit(i, position, v)
        if newly:
            self.opened.update(newly)
            self.spec = self.base.opened(self.opened, self.prompt_len)
            self.version += 1
        return None


def table_specs(specs: list[SteeringSpec | None], gates: list[GateState | None]) -> list[SteeringSpec | None]:
    """What each slot's tables are built from: its spec, or with gates, the edits whose gates opened resolved."""
    return [g.spec if g is not None else s for s, g in zip(specs, gates)]


def row_index(positions: Tensor, spans: list[Span], device: torch.device | str) -> RowIndex:
    """`positions (N,)`: every row's token position; rows outside every span are left alone."""
    n = positions.shape[0]
    slot = np.full(n, -1, dtype=np.int64)  # filled on the host with numpy: a torch op per span cost ~10 us each
    read = np.zeros(n, dtype=np.bool_)
    for s in spans:
        slot[s.start:s.end] = s.slot
        rows = s.read_rows()
        read[rows.start:rows.stop] = True
    return RowIndex(torch.from_numpy(slot).to(device), positions.to(device=device, dtype=torch.long),
                    torch.from_numpy(read).to(device), every_row_read=n > 0 and bool(read.all()))


def finite_rows(t: Tensor) -> Tensor:
    """`(N,)` bool: the rows of `t (N, d)` without an inf or NaN. inf·0 and NaN·0 are NaN and a finite
    value·0 is ±0, so a row's sum of t·0 is 0 exactly when the row is finite (on a CPU 5x faster than
    `isfinite(t).all(-1)`, whose kernel is not vectorised)."""
    return (t * 0).sum(dim=-1) == 0


class ReadoutRouter:
    """Turns one step's readout tensors (keyed by token row) into per-request `TokenReadout`s.

    Everything is copied to the host once per step (one `.tolist()` per tensor).
    """

    def __init__(self, readouts: list[Readout]):
        self._host: list[dict[str, list]] = []
        for r in readouts:
            if isinstance(r, SaeReadout):
                self._host.append({"top_ids": r.top_ids.tolist(), "top_values": r.top_values.tolist(),
                                   "selected_values": r.selected_values.tolist(),
                                   "selected_ids": r.selected_ids.tolist()})
            else:
                self._host.append({"ids": r.ids.tolist()})
        self._rows = [r.rows.tolist() for r in readouts]
        self._readouts = readouts

    @functools.cached_property
    def by_row(self) -> dict[int, list[tuple[int, int]]]:
        """token row -> (readout, its index there) of each readout of that row, in readout order."""
        out: dict[int, list[tuple[int, int]]] = {}
        for n, rows in enumerate(self._rows):
            for i, row in enumerate(rows):
                out.setdefault(row, []).append((n, i))
        return out

    def gate_values(self, row: int) -> dict[tuple[str, int], float]:
        """(SAE, feature) -> value of every feature read as selected at `row` (gates' features among them)."""
        out = {}
        for n, i in self.by_row.get(row, ()):
            r, h = self._readouts[n], self._host[n]
            if isinstance(r, SaeReadout):
                out.update(((r.source, f), v) for f, v in zip(h["selected_ids"], h["selected_values"][i]))
        return out

    def cut(self, slots: list[int], specs: list[SteeringSpec]) -> dict[int, list[TokenReadout]]:
        """token row -> its readouts, cut to what the request of its slot (`slots[row]`, `specs[slot]`)
        asked for: every row read, readouts possibly none (a row that only watched its gates), in
        readout order. One pass per readout over its rows (a decode step's readouts are one row each
        of every request)."""
        out: dict[int, list[TokenReadout]] = {}
        for r, h, rows in zip(self._readouts, self._host, self._rows):
            code = isinstance(r, CodeReadout)
            for i, row in enumerate(rows):
                got = out.setdefault(row, [])
                wanted = specs[slots[row]].readouts
                if code:
                    if r.source in wanted.codebooks:
                        got.append(TokenReadout(r.source, codes=h["ids"][i]))
                    continue
                if r.source not in wanted.saes:
                    continue
                k, sel_ids, sel_values = wanted.top_k, [], []
                if wanted.feature_ids:
                    ids = set(wanted.feature_ids)
                    for f, v in zip(h["selected_ids"], h["selected_values"][i]):
                        if f in ids:
                            sel_ids.append(f)
                            sel_values.append(v)
                got.append(TokenReadout(r.source, top_ids=h["top_ids"][i][:k], top_values=h["top_values"][i][:k],
                                        selected_ids=sel_ids, selected_values=sel_values))
        return out


@dataclass
class StepRecorder:
    """The tables and rows a step's site hooks read, the readouts they produce, the time they take."""

    tables: StepTables
    rows: RowIndex
    specs: list[SteeringSpec]  # per slot
    readouts: list[Readout] = field(default_factory=list)
    hook_s: float = 0.0
    broken: Tensor | None = None
    """(N,) bool: rows the steering made non-finite at some site (they went on unsteered there)"""
    pending: dict[str, Tensor] = field(default_factory=dict)
    """transcoders' edits on their way from the site they read to the site they write (this pass)"""
    router: ReadoutRouter | None = None
    """set by `routed`"""

    def gate_values(self, row: int) -> dict[tuple[str, int], float]:
        return {} if self.router is None else self.router.gate_values(row)

    def steer(self, site: str, x: Tensor, artifacts: SiteArtifacts | None) -> Tensor:
        """Steer the activation `x (..., d)` at `site`; a tensor of the same shape comes back.

        A row the steering made non-finite (an overflow: bounded edits can still overflow a
        bfloat16 or float16 stream) goes on as it came in, so nothing non-finite reaches the
        layers after, the KV cache or other requests; it is marked in `broken` for the backend
        to end its request. Fixed shapes, no host synchronisation."""
        t0 = time.perf_counter()
        flat = x.reshape(-1, x.shape[-1])  # (N, d)
        out, readouts = steer_site(site, flat, artifacts, self.tables, self.rows, self.pending)
        if out is not flat:
            # on a CPU, eager, a step that made nothing non-finite (all but an overflow) stops at one sum
            # (finite exactly when every value is, unless the sum itself overflows: then the exact check
            # below finds nothing to do): the check costs no device synchronisation there
            if flat.device.type != "cpu" or torch.compiler.is_compiling() or not math.isfinite(out.sum()):
                fine = finite_rows(out)
                bad = ~fine & finite_rows(flat)
                out = torch.where(bad[:, None], flat, out)
                self.broken = bad if self.broken is None else self.broken | bad
        self.readouts.extend(readouts)
        self.hook_s += time.perf_counter() - t0
        return x if out is flat else out.view(x.shape)

    @functools.cached_property
    def host_rows(self) -> tuple[list[int], list[int]]:
        """Every row's slot and position on the host (one copy each per step)."""
        return self.rows.slot.tolist(), self.rows.position.tolist()

    def broken_slots(self) -> set[int]:
        """Slots with a row the steering made non-finite this step (one copy to the host)."""
        if self.broken is None:
            return set()
        slots = self.rows.slot[self.broken].tolist()
        return {s for s in slots if s >= 0}

    def routed(self) -> dict[int, tuple[int, int, list[TokenReadout]]]:
        """By token row: its slot, its position and its readouts, cut to what its request asked for
        (`router.gate_values(row)` has every selected feature's value, gates' included)."""
        if not self.readouts:
            return {}
        router = self.router = ReadoutRouter(self.readouts)
        slots, positions = self.host_rows
        cut = router.cut(slots, self.specs)
        return {row: (slots[row], positions[row], cut[row]) for row in sorted(cut)}
