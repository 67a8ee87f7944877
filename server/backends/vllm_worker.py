"""Rudder inside vLLM's workers: a steering op at each declared site, compiled with the model.

vLLM starts its workers with `worker_cls` = `SteeringWorker` (made at import from the
platform's own worker class). After vLLM loads the model, and before the first forward
pass (where torch.compile traces it), `load_model` puts a call to the custom op
`rudder::steer` at every declared site: after a decoder layer (`hook_resid_post` of it,
`hook_resid_pre` of the next), around the MLP (`mlp.hook_in`, `hook_mlp_out`), before `o_proj`
(`attn.hook_z`), before layer 0 (`blocks.0.hook_resid_pre`). To the compiler the op is one
opaque node, so vLLM keeps its compilation (on CUDA the op is a splitting op and the
pieces between are captured in CUDA graphs). Nothing in vLLM is patched.

Each forward step:
1. a pre-hook on the top-level model (which vLLM does not compile) maps token rows to
   requests from the runner's batch state (`input_batch.req_ids`, `query_start_loc`) and
   `positions`, and builds the shared steering tables for the requests that steer or read
   (cached while the batch's requests stay the same) into a `StepRecorder`;
2. the op at each site calls `StepRecorder.steer`, i.e. the shared `steer_site`;
3. a post-hook sends the step's readouts, cut per request, over a local Unix socket as one typed
   `channel.StepRecord` (from the first rank only: with tensor parallelism every rank steers the
   same full stream).

vLLM's internals (the runner's batch state, the platform's worker class) are read through
`vllm_compat` only.

Positions come from vLLM itself, so a request recomputed after preemption is steered
exactly as the first time, and readouts are keyed by (request, position).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn

from rudder.core.artifacts import Artifacts
from rudder.core.errors import ArtifactError
from rudder.core.hf_sites import LAYOUTS, VLLM_FAMILIES, Layout, ModelShape
from rudder.core.sites import Site
from rudder.core.steering import SteeringSpec, StepTables, build_tables, spec_from_wire
from rudder.server.backends import channel, vllm_compat
from rudder.server.backends.step import GateState, Span, StepRecorder, row_index, table_specs
from rudder.server.backends.vllm_compat import need

log = logging.getLogger(__name__)

EXTRA_ARGS_KEY = "rudder"  # in SamplingParams.extra_args: the request's steering (spec_to_wire)
CONFIG_KEY = "rudder"  # in vLLM's additional_config: {"sites": [...]}, part of vLLM's compile-cache key

_STEERER: _Steerer | None = None  # this process's steerer: what the op calls


@torch.library.custom_op("rudder::steer", mutates_args=("out",))
def steer_op(x: Tensor, residual: Tensor | None, site: int, out: Tensor) -> None:
    """Write the activation at declared site number `site`, steered, into `out`: `x` (+ `residual`
    after a decoder layer, whose output is the pair), all `(N, d)`. `out` is allocated by the caller,
    inside the compiled graph, as vLLM's attention op does: so with CUDA graphs the pieces after the
    op read the address they were captured with."""
    stream = x if residual is None else x + residual
    out.copy_(stream if _STEERER is None else _STEERER.site(site, stream))


@steer_op.register_fake
def _(x: Tensor, residual: Tensor | None, site: int, out: Tensor) -> None:
    return None


def steer(x: Tensor, residual: Tensor | None, site: int) -> Tensor:
    """The op as the wrappers call it: a new `(N, d)` tensor."""
    out = torch.empty_like(x)
    torch.ops.rudder.steer(x, residual, site, out)
    return out


# ---------------------------------------------------------------- placing the op


class _Before(nn.Module):
    """`module` with the op on its input: layer 0 (the embeddings) or o_proj (attn.hook_z)."""

    def __init__(self, module: nn.Module, site: int, hidden_arg: int):
        super().__init__()
        self.inner, self.site, self.hidden_arg = module, site, hidden_arg

    def forward(self, *args, **kwargs):
        args = list(args)
        if len(args) > self.hidden_arg:
            args[self.hidden_arg] = steer(args[self.hidden_arg], None, self.site)
        else:
            kwargs["hidden_states"] = steer(kwargs["hidden_states"], None, self.site)
        return self.inner(*args, **kwargs)


class _AfterLayer(nn.Module):
    """A decoder layer with the op on the residual stream after it. Where vLLM fuses the residual add
    (`fused_residual`), layers return (mlp_out, residual) and the stream is their sum: it goes on as
    (steered stream, zeros), which the next layer's fused add-norm turns back into the stream."""

    def __init__(self, layer: nn.Module, sites: list[int], fused_residual: bool):
        super().__init__()
        self.inner, self.sites, self.fused_residual = layer, sites, fused_residual

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        hidden, residual = out if self.fused_residual else (out, None)
        stream = steer(hidden, residual, self.sites[0])
        for site in self.sites[1:]:  # e.g. resid_post of this layer and resid_pre of the next
            stream = steer(stream, None, site)
        return (stream, torch.zeros_like(residual)) if self.fused_residual else stream


class _After(nn.Module):
    """A module with the op on its output (the MLP's contribution to the stream: hook_mlp_out)."""

    def __init__(self, module: nn.Module, site: int):
        super().__init__()
        self.inner, self.site = module, site

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        if isinstance(out, tuple):
            return (steer(out[0], None, self.site), *out[1:])
        return steer(out, None, self.site)


def _wrap(block: nn.Module, path: str, wrapper) -> None:
    """Replace the module at `path` inside `block` by `wrapper(module)`."""
    parent, _, name = path.rpartition(".")
    owner = need(block, parent) if parent else block
    setattr(owner, name, wrapper(need(owner, name)))


def place_ops(model: nn.Module, sites: list[str], num_layers: int, layout: Layout = LAYOUTS["llama"]) -> None:
    """Wrap the modules at `sites` (their index in the list is the op's `site` argument), found by the
    family's `layout` (the same paths as the Hugging Face model's): the modules inside a layer first,
    then the layers; after a layer, its own resid_post runs before the next layer's resid_pre, as in
    the reference backend."""
    if layout.vllm is None:
        raise ArtifactError(f"the vLLM backend does not serve this family; it serves {', '.join(VLLM_FAMILIES)}")
    layers = need(model, layout.vllm.layers or layout.layers)
    parsed = [(i, Site.parse(name, num_layers)) for i, name in enumerate(sites)]
    for i, site in parsed:
        if site.kind == "hook_mlp_out":
            _wrap(layers[site.layer], layout.mlp_contribution or layout.mlp, lambda m, i=i: _After(m, i))
        elif site.kind == "attn.hook_z":
            _wrap(layers[site.layer], layout.out_proj, lambda m, i=i: _Before(m, i, hidden_arg=0))
        elif site.kind == "mlp.hook_in":
            _wrap(layers[site.layer], layout.mlp, lambda m, i=i: _Before(m, i, hidden_arg=0))
        elif site.kind not in ("hook_resid_pre", "hook_resid_post"):
            raise ArtifactError(f"site {sites[i]} is not supported by the vLLM backend")
    for i, site in parsed:
        if site.kind == "hook_resid_pre" and site.layer == 0:
            layers[0] = _Before(layers[0], i, hidden_arg=layout.vllm.hidden_arg)
    after: dict[int, list[tuple[int, int]]] = {}
    for i, site in parsed:
        if site.kind == "hook_resid_post":
            after.setdefault(site.layer, []).append((0, i))
        elif site.kind == "hook_resid_pre" and site.layer > 0:
            after.setdefault(site.layer - 1, []).append((1, i))
    for layer, ids in after.items():
        layers[layer] = _AfterLayer(layers[layer], [i for _, i in sorted(ids)], layout.vllm.fused_residual)


# ---------------------------------------------------------------- the steerer


class _Steerer:
    """Artifacts, per-step tables and readouts of one worker process."""

    def __init__(self, runner, sites: list[str], sends_readouts: bool):
        self.runner = runner
        self.model: nn.Module = runner.get_model()
        vllm_compat.check_runner(runner)
        self.shape = ModelShape.from_config(vllm_compat.hf_config(runner))
        self.sites = sites
        self.device = next(self.model.parameters()).device
        self.dtype = next(self.model.parameters()).dtype
        self.artifacts = Artifacts()
        self.by_site = {}
        self.always_on = False
        self.sends_readouts = sends_readouts
        self.socket = None
        self._specs: dict[str, SteeringSpec | None] = {}
        self._gates: dict[str, GateState] = {}  # requests with conditions or guards
        self._broken: set[str] = set()  # requests whose steering overflowed (sticky: reported on every row)
        self.step_spans: list[Span] = []
        self._layout = None  # the last step's requests and rows, where it was a decode step
        self._rows = None  # its RowIndex
        self._reported: list[tuple[str, int, int]] = []  # its reported rows: (Rudder's request id, row, slot)
        self._requests: list[str] = []  # its requests, by Rudder's ids
        self._table_key = None
        self._tables: StepTables | None = None
        self.step: StepRecorder | None = None
        self.step_req_ids: list[str] = []  # per slot of the current step: Rudder's request ids
        self._ours: dict[str, str] = {}  # vLLM's request id -> Rudder's (from the request's extra_args)
        place_ops(self.model, sites, self.shape.num_layers, LAYOUTS[self.shape.architecture])
        self.model.register_forward_pre_hook(self._begin, with_kwargs=True)
        self.model.register_forward_hook(self._end)

    def connect(self, readout_address: str) -> None:
        if self.sends_readouts:
            self.socket = channel.Sender(readout_address)

    # ------------------------------------------------------------ artifacts

    def load_sae(self, spec: str, generation: int) -> str:
        attached = self.artifacts.add_sae(spec, self.shape, self.device, generation=generation, model=self.model,
                                          vllm=True)
        for site in attached.sites:
            self._check_declared(site.name)
        self._refresh()
        return attached.id

    def load_codebooks(self, folder: str) -> None:
        from pathlib import Path

        self.artifacts.add_codebooks(Path(folder), self.shape, self.device, self.dtype)
        for cb in self.artifacts.codebooks.values():
            self._check_declared(cb.site.name)
        self._refresh()

    def _check_declared(self, site: str) -> None:
        if site not in self.sites:
            raise ArtifactError(f"site {site} was not declared when vLLM started; declared: {', '.join(self.sites)}")

    def unload(self, source: str) -> None:
        if source in self.artifacts.saes:
            self.artifacts.remove_sae(source)
        self._refresh()

    def _refresh(self) -> None:
        self.by_site = self.artifacts.by_site()
        self.always_on = bool(self.artifacts.codebooks)  # a codebook model snaps every row
        self._table_key = None

    def site(self, index: int, x: Tensor) -> Tensor:
        """The op's body at declared site number `index`."""
        step = self.step
        if step is None:
            return x
        name = self.sites[index]
        return step.steer(name, x, self.by_site.get(name))

    # ------------------------------------------------------------ per step

    def _spec(self, req_id: str) -> SteeringSpec | None:
        if req_id not in self._specs:
            extra = vllm_compat.extra_args(self.runner, req_id)
            raw = extra.get(EXTRA_ARGS_KEY)
            self._specs[req_id] = spec_from_wire(raw) if raw else None
            if raw:
                ours = extra.get(channel.REQUEST_ID_KEY)
                if ours is None:  # not sent by Rudder's front end: its rows reach nobody
                    log.error("request %s steers without %r in its extra_args; its readouts will not reach it",
                              req_id, channel.REQUEST_ID_KEY)
                self._ours[req_id] = str(ours or req_id)
        return self._specs[req_id]

    def _begin(self, module, args, kwargs) -> None:
        self.step = None
        batch = vllm_compat.batch(self.runner)
        if batch is None:
            return
        positions = kwargs.get("positions", args[1] if len(args) > 1 else None)
        qsl = batch.query_start
        if positions is None or positions.dim() != 1 or qsl[-1] > positions.shape[0]:
            return  # not a plain token batch (a dummy run); nothing of ours to do
        known = vllm_compat.held_requests(self.runner)  # scheduled this step or not
        if len(self._specs) > len(known):  # some have finished: forget them (every cached one is known)
            for stale in [r for r in self._specs if r not in known]:
                del self._specs[stale]
                self._gates.pop(stale, None)
                self._ours.pop(stale, None)
            self._broken &= set(self._specs)
        used = [(i, r, s) for i, r in enumerate(batch.req_ids) if (s := self._spec(r)) is not None]
        if not used and not self.always_on:
            return
        for i, r, s in used:
            if r not in self._gates and GateState.needed(s):
                self._gates[r] = GateState(s, batch.num_prompt_tokens[i])
        key = tuple((r, self._gates[r].version if r in self._gates else 0) for _, r, _ in used)
        if not used:
            self._tables, self._table_key = StepTables(), key
        elif key != self._table_key:  # another batch, or a gate opened
            prompt_lens = [batch.num_prompt_tokens[i] for i, _, _ in used]
            self._tables = build_tables(table_specs([s for _, _, s in used], [self._gates.get(r) for _, r, _ in used]),
                                        prompt_lens, self.device, self.artifacts.sae_modules(),
                                        self.artifacts.generations())
            self._table_key = key
        # a decode step of the same requests at the same places in the batch, in the same rows, as the
        # last (most steps) has the same spans, rows and reported rows: only the positions are new
        decoding = all(batch.num_computed_tokens[i] >= batch.num_prompt_tokens[i] for i, _, _ in used)
        layout = (key, tuple(i for i, _, _ in used), tuple(qsl), positions.shape[0]) if decoding else None
        if layout is None or layout != self._layout:
            self.step_spans = [Span(slot, qsl[i], qsl[i + 1], batch.num_computed_tokens[i], batch.num_prompt_tokens[i],
                                    spec) for slot, (i, _, spec) in enumerate(used)]  # host-side: no device sync
            self._rows = row_index(positions, self.step_spans, self.device)
            self.step_req_ids = [r for _, r, _ in used]
            self._reported = [(self._ours[self.step_req_ids[span.slot]], row, span.slot)
                              for span in self.step_spans for row in span.reported_rows()]
            self._requests = sorted({self._ours[r] for r in self.step_req_ids})
            self._layout = layout
            rows = self._rows
        else:
            rows = replace(self._rows, position=positions.to(device=self.device, dtype=torch.long))
        self.step = StepRecorder(self._tables, rows, [s for _, _, s in used])

    def _end(self, module, args, output) -> None:
        """Send the step's record (server.backends.channel) of every steering or reading request's rows
        that get a token (or a prompt readout), readouts possibly empty (an SAE unloaded), so the front
        end never waits for a row that will not come."""
        step, self.step = self.step, None
        if step is None:
            return
        ids = self.step_req_ids
        gated = [span for span in self.step_spans if ids[span.slot] in self._gates]
        if self.socket is None and not gated:  # another tensor-parallel rank: the first reports
            return
        routed = step.routed()
        positions = step.host_rows[1]
        hits = {}
        for span in gated:  # every rank decides its gates alike, so that their tables agree
            gates = self._gates[ids[span.slot]]
            for row in span.reported_rows():
                if hit := gates.observe(positions[row], step.gate_values(row)):
                    hits[row] = hit
                    break
        if self.socket is None:
            return
        self._broken |= {ids[slot] for slot in step.broken_slots()}
        broken = self._broken
        rows = [channel.Row(ours, positions[row], routed[row][2] if row in routed else [], ids[slot] in broken,
                            hits.get(row)) for ours, row, slot in self._reported]
        self.socket.send(channel.encode(channel.StepRecord(requests=self._requests, hook_s=step.hook_s, rows=rows)))


# ---------------------------------------------------------------- the worker class


FRONT_END_ENV = "RUDDER_FRONTEND_PID"
"""set by the front end before it starts vLLM: the engine's processes inherit it and watch that pid"""


def _alive_since(pid: int) -> str | None:
    """The process's start time (/proc/PID/stat field 22), or None once it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in "ZX" else fields[19]


def watch_front_end(interval: float = 1.0) -> None:
    """In an engine process: once the front end that started the engine is gone (SIGKILL, the OOM
    killer), end the engine rather than leave it orphaned, holding its memory: kill this process's
    parent if it is not the front end (vLLM's EngineCore; its other workers follow it), then exit.
    Needs Linux's /proc; elsewhere nothing is watched."""
    pid = int(os.environ.get(FRONT_END_ENV) or 0)
    born = _alive_since(pid) if pid else None
    if born is None:
        return

    def watch() -> None:
        while _alive_since(pid) == born:
            time.sleep(interval)
        parent = os.getppid()
        log.error("the Rudder front end (pid %d) is gone: ending its engine (pid %d and %d)", pid, parent, os.getpid())
        if parent not in (1, pid):
            try:
                os.kill(parent, signal.SIGKILL)
            except OSError:
                pass
        os._exit(1)

    threading.Thread(target=watch, name="rudder-front-end-watch", daemon=True).start()


class _SteeringMixin:
    """Put first in the bases of vLLM's worker class: places the ops after the model loads and
    answers `collective_rpc("rudder_...")`."""

    def load_model(self, *args, **kwargs) -> None:
        global _STEERER
        super().load_model(*args, **kwargs)
        settings, pp = vllm_compat.worker_settings(self, CONFIG_KEY)
        sites = settings.get("sites", [])
        if pp > 1:
            raise ArtifactError(f"Rudder's vLLM backend does not support pipeline parallelism "
                                f"(pipeline_parallel_size={pp}); use tensor parallelism")
        _STEERER = _Steerer(self.model_runner, sites, sends_readouts=self.rank == 0)
        watch_front_end()

    def rudder_setup(self, readout_address: str, saes: list[tuple[str, int]], codebooks: str | None) -> dict:
        _STEERER.connect(readout_address)
        if codebooks:
            _STEERER.load_codebooks(codebooks)
        loaded = [_STEERER.load_sae(spec, generation) for spec, generation in saes]
        return {"saes": loaded, "dtype": str(_STEERER.dtype), "device": str(_STEERER.device),
                "sites": _STEERER.sites}

    def rudder_load_sae(self, spec: str, generation: int) -> str:
        return _STEERER.load_sae(spec, generation)

    def rudder_unload(self, source: str) -> None:
        _STEERER.unload(source)


def __getattr__(name: str):
    """`SteeringWorker` (vLLM's `worker_cls`) is made on first use, on the platform's worker class,
    so that importing this module needs no vLLM."""
    if name == "SteeringWorker":
        cls = type("SteeringWorker", (_SteeringMixin, vllm_compat.platform_worker()), {"__module__": __name__})
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
