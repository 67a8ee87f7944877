"""Rudder inside vLLM's worker: steering hooks on the model, readouts sent out per step.

vLLM mixes `SteeringWorker` into its worker class (`worker_extension_cls`); the
engine process calls its `rudder_*` methods through `collective_rpc`. Nothing in
vLLM is patched: the hooks are ordinary torch module hooks on the model the
runner built, and per-request steering travels in `SamplingParams.extra_args`.

Each forward step:
1. a pre-hook on the whole model maps token rows to requests from the runner's
   batch state (`input_batch.req_ids`, `query_start_loc`) and the `positions`
   argument, and builds the shared steering tables for the requests that steer or
   read (cached while the batch's requests stay the same);
2. a hook at each site calls the shared `steer_site` on the rows;
3. a post-hook cuts the step's readouts per request (`ReadoutRouter`) and pushes
   one message to the engine's process over a local zmq socket.

Positions come from vLLM itself, so a request recomputed after preemption is
steered exactly as the first time, and readouts are keyed by (request, position).
"""

from __future__ import annotations

import logging
import pickle

import torch
from torch import Tensor, nn

from rudder.core.errors import ArtifactError
from rudder.core.hf_sites import ModelShape
from rudder.core.sites import Site
from rudder.core.steering import SteeringSpec, StepTables, build_tables, spec_from_wire
from rudder.server.artifacts import Artifacts
from rudder.server.backends.step import Span, StepRecorder, row_index

log = logging.getLogger(__name__)

EXTRA_ARGS_KEY = "rudder"
VLLM_VERSION = "0.32.0"


def _need(obj, path: str):
    for part in path.split("."):
        if not hasattr(obj, part):
            raise ArtifactError(
                f"vLLM internals changed: {type(obj).__name__} has no {part!r} (from {path!r}); "
                f"Rudder's vLLM backend needs vllm{'-cpu' if not torch.cuda.is_available() else ''}=={VLLM_VERSION}")
        obj = getattr(obj, part)
    return obj


class _Steerer:
    def __init__(self, runner, readout_address: str):
        import zmq

        self.runner = runner
        self.model: nn.Module = runner.get_model()
        for path in ("input_batch.req_ids", "input_batch.num_reqs", "input_batch.num_prompt_tokens",
                     "input_batch.num_computed_tokens_cpu", "query_start_loc.np", "requests"):
            _need(runner, path)
        self.layers = _need(self.model, "model.layers")
        self.device = next(self.model.parameters()).device
        self.dtype = next(self.model.parameters()).dtype
        self.shape = ModelShape.from_config(runner.model_config.hf_config)
        self.artifacts = Artifacts()
        self.by_site = {}
        self.always_on = False
        self._site_hooks: dict[str, list] = {}
        self._specs: dict[str, SteeringSpec | None] = {}
        self._table_key = None
        self._tables: StepTables | None = None
        self.step: StepRecorder | None = None
        self.step_req_ids: list[str] = []  # per slot of the current step
        self.socket = zmq.Context.instance().socket(zmq.PUSH)
        self.socket.connect(readout_address)
        self.model.register_forward_pre_hook(self._begin, with_kwargs=True)
        self.model.register_forward_hook(self._end)

    # ------------------------------------------------------------ artifacts and hooks

    def load_sae(self, spec: str) -> str:
        attached = self.artifacts.add_sae(spec, self.shape, self.device, self.dtype)
        self._refresh()
        return attached.id

    def load_codebooks(self, folder: str) -> None:
        from pathlib import Path

        self.artifacts.add_codebooks(Path(folder), self.shape, self.device, self.dtype)
        self._refresh()

    def unload(self, source: str) -> None:
        self.artifacts.saes.pop(source, None)
        self._refresh()

    def _refresh(self) -> None:
        self.by_site = self.artifacts.by_site()
        self.always_on = bool(self.artifacts.codebooks)  # a codebook model snaps every row
        for site in self.by_site:
            self.ensure_hook(site)
        self._table_key = None

    def ensure_hook(self, site_name: str) -> None:
        if site_name in self._site_hooks:
            return
        site = Site.parse(site_name, self.shape.num_layers)
        name = site.name
        if site.kind == "hook_resid_pre" and site.layer == 0:
            def pre(module, args, kwargs):  # (positions, hidden_states, residual=None): the embeddings
                hidden = args[1] if len(args) > 1 else kwargs["hidden_states"]
                new = self._steer(name, hidden)
                if new is hidden:
                    return None
                if len(args) > 1:
                    return (args[0], new, *args[2:]), kwargs
                return args, {**kwargs, "hidden_states": new}
            handle = self.layers[0].register_forward_pre_hook(pre, with_kwargs=True)
        elif site.kind in ("hook_resid_pre", "hook_resid_post"):
            # vLLM's layers return (mlp_out, residual); the stream after the layer is their sum.
            layer = site.layer - 1 if site.kind == "hook_resid_pre" else site.layer

            def post(module, args, output):
                hidden, residual = output
                stream = hidden + residual
                new = self._steer(name, stream)
                return None if new is stream else (new, torch.zeros_like(residual))
            handle = self.layers[layer].register_forward_hook(post)
        elif site.kind == "hook_mlp_out":
            def mlp(module, args, output):
                out = output[0] if isinstance(output, tuple) else output
                new = self._steer(name, out)
                if new is out:
                    return None
                return (new, *output[1:]) if isinstance(output, tuple) else new
            handle = _need(self.layers[site.layer], "mlp").register_forward_hook(mlp)
        elif site.kind == "attn.hook_z":
            def z(module, args):
                new = self._steer(name, args[0])
                return None if new is args[0] else (new, *args[1:])
            handle = _need(self.layers[site.layer], "self_attn.o_proj").register_forward_pre_hook(z)
        else:
            raise ArtifactError(f"site {site_name} is not supported by the vLLM backend")
        self._site_hooks[site_name] = [handle]

    def _steer(self, site: str, x: Tensor) -> Tensor:
        step = self.step
        return x if step is None else step.steer(site, x, self.by_site.get(site))

    # ------------------------------------------------------------ per step

    def _spec(self, req_id: str) -> SteeringSpec | None:
        if req_id not in self._specs:
            state = self.runner.requests.get(req_id)
            extra = getattr(getattr(state, "sampling_params", None), "extra_args", None) or {}
            raw = extra.get(EXTRA_ARGS_KEY)
            self._specs[req_id] = spec_from_wire(raw) if raw else None
        return self._specs[req_id]

    def _begin(self, module, args, kwargs) -> None:
        self.step = None
        batch = self.runner.input_batch
        n_reqs = batch.num_reqs
        if n_reqs == 0:
            return
        positions = kwargs.get("positions", args[1] if len(args) > 1 else None)
        req_ids = list(batch.req_ids[:n_reqs])
        qsl = self.runner.query_start_loc.np[:n_reqs + 1].tolist()
        if positions is None or positions.dim() != 1 or qsl[-1] > positions.shape[0]:
            return  # not a plain token batch (a dummy run); nothing of ours to do
        for stale in set(self._specs) - set(req_ids):
            del self._specs[stale]
        used = [(i, r, s) for i, r in enumerate(req_ids) if (s := self._spec(r)) is not None]
        if not used and not self.always_on:
            return
        key = tuple(r for _, r, _ in used)
        if not used:
            self._tables, self._table_key = StepTables(), key
        elif key != self._table_key:
            prompt_lens = [int(batch.num_prompt_tokens[i]) for i, _, _ in used]
            self._tables = build_tables([s for _, _, s in used], prompt_lens, self.device,
                                        self.artifacts.sae_modules())
            for site in self._tables.directions:
                self.ensure_hook(site)
            self._table_key = key
        spans = [Span(slot, qsl[i], qsl[i + 1], int(batch.num_computed_tokens_cpu[i]),
                      int(batch.num_prompt_tokens[i]), spec)
                 for slot, (i, _, spec) in enumerate(used)]  # host-side bookkeeping: no device sync
        self.step = StepRecorder(self._tables, row_index(positions, spans, self.device), [s for _, _, s in used])
        self.step_req_ids = [r for _, r, _ in used]

    def _end(self, module, args, output) -> None:
        step, self.step = self.step, None
        if step is None:
            return
        rows = [(self.step_req_ids[slot], position, readouts) for slot, position, readouts in step.routed().values()]
        self.socket.send(pickle.dumps((step.hook_s, rows), protocol=pickle.HIGHEST_PROTOCOL))


class SteeringWorker:
    """vLLM's `worker_extension_cls`: methods reached with `collective_rpc("rudder_...")`."""

    def rudder_setup(self, readout_address: str, saes: list[str], codebooks: str | None) -> dict:
        self._rudder = _Steerer(self.model_runner, readout_address)
        if codebooks:
            self._rudder.load_codebooks(codebooks)
        loaded = [self._rudder.load_sae(spec) for spec in saes]
        return {"saes": loaded, "dtype": str(self._rudder.dtype), "device": str(self._rudder.device)}

    def rudder_load_sae(self, spec: str) -> str:
        return self._rudder.load_sae(spec)

    def rudder_unload(self, source: str) -> None:
        self._rudder.unload(source)
