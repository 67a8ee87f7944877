"""The vLLM backend: vLLM's V1 `AsyncLLM`, compiled as vLLM compiles it, with Rudder's
steering op at the declared sites of its model.

    rudder serve --backend vllm [--sae PATH ...] [--steer-sites SITE ...] [-- VLLM_ENGINE_FLAGS]

Requests are batched continuously by vLLM. Each request's steering is checked in
this process (`RequestParser`) and sent with it in `SamplingParams.extra_args`;
the worker (`vllm_worker.SteeringWorker`, vLLM's `worker_cls`) applies it through the
op with the same `steer_site` the reference backend uses, and pushes each step's
readouts back over a local Unix socket (`channel`), keyed by (request, position). A token is
streamed with the readout of the row that produced it, as in the reference backend.

Prefix caching stays on, salted: requests with the same steering share cached
KV blocks, requests whose steering differs never do, and a request that wants
prompt readouts gets a salt of its own, so every prompt row passes the op.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer

from rudder.core.artifacts import Artifacts, has_codebooks
from rudder.core.errors import (
    ArtifactError,
    FailedPrecondition,
    ReadoutMissing,
    Unavailable,
)
from rudder.core.hf_sites import ModelShape, family_error
from rudder.core.sites import Site
from rudder.core.steering import SteeringSpec, spec_to_wire
from rudder.server.backends import channel, vllm_compat
from rudder.server.backends.base import EngineRequest, GuardHit, HfTokenizing, TokenEvent, TokenReadout
from rudder.server.backends.sequence import Sequence, eos_ids
from rudder.server.backends.vllm_worker import CONFIG_KEY, EXTRA_ARGS_KEY, FRONT_END_ENV

log = logging.getLogger(__name__)

READOUT_WAIT_S = 10.0  # the worker sends a step's rows before the step's tokens: a wait this long is a fault
# vLLM's finish reasons as Rudder's: "stop" is an EOS or stop token id (Rudder passes no stop strings).
_FINISH = {"stop": "eos", "length": "length"}


class _Rows:
    """Per steering or reading request: what the worker sent of each of its sampled rows (readouts,
    and whether the steering overflowed there), by position."""

    def __init__(self, poll: Callable[[], None] | None = None):
        self._poll = poll  # reads the channel (`channel.Receiver.poll`)
        self.by_position: dict[int, tuple[list[TokenReadout], bool]] = {}
        self.hits: dict[int, GuardHit] = {}  # a guard that fired, by the position it read above at
        self.arrived = asyncio.Event()
        self.error: Exception | None = None

    def fail(self, error: Exception) -> None:
        self.error = error
        self.arrived.set()

    async def row(self, position: int) -> tuple[list[TokenReadout], GuardHit | None, bool]:
        """The record of the row at `position`: its readouts, the guard that fired there, whether its
        steering overflowed (the request's `Sequence` decides what each means). Raises if it never came."""
        if position not in self.by_position and self.error is None and self._poll is not None:
            self._poll()  # the worker sent the step's record before vLLM's output of it: it is there to read
        try:
            while position not in self.by_position and self.error is None:
                self.arrived.clear()
                await asyncio.wait_for(self.arrived.wait(), READOUT_WAIT_S)
        except TimeoutError:
            raise ReadoutMissing(f"the steering worker's record of token position {position} did not arrive "
                                 f"within {READOUT_WAIT_S:.0f}s; retry the request") from None
        if self.error is not None:
            raise self.error
        readouts, broken = self.by_position[position]
        return readouts, self.hits.get(position), broken


def _model_view(model_dir: Path) -> Path:
    """vLLM loads every *.safetensors in a folder; a codebook model's folder also holds its
    codebooks and its code index. Give vLLM a folder of links to everything but those (at a
    path fixed per model, so that vLLM's compile cache, keyed on the config, is reused); links
    a view kept from before to files now left out, or gone, are removed."""
    from rudder.core.code_search import INDEX_FILE
    from rudder.core.codebook import CONFIG_FILE, WEIGHTS_FILE
    from rudder.core.default_model import cache_dir

    left_out = {CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE}
    digest = hashlib.sha256(str(model_dir.resolve()).encode()).hexdigest()[:16]
    view = cache_dir() / "vllm-model-views" / digest  # the user's own cache, not a shared /tmp
    view.mkdir(parents=True, exist_ok=True)
    for link in view.iterdir():
        if link.is_symlink() and (link.name in left_out or not link.exists()):
            link.unlink()
    for p in model_dir.iterdir():
        link = view / p.name
        if p.name not in left_out and not link.is_symlink():
            link.symlink_to(p.resolve())
    return view


class VllmEngine(HfTokenizing):
    name = "vllm"

    def __init__(self, model_dir: str | Path, saes: list[str] = (), dtype: str | None = "float32",
                 max_num_seqs: int | None = 64, max_model_len: int | None = 2048, enable_prefix_caching: bool = True,
                 gpu_memory_utilization: float | None = 0.8, steer_sites: list[str] = (), vllm_args: list[str] = (),
                 **engine_kwargs):
        """`steer_sites`: sites to place the steering op at besides those of the artifacts (for
        directions, and SAEs loaded later); `vllm_args`: vLLM's own engine flags; `engine_kwargs`:
        more `AsyncEngineArgs` fields (tests)."""
        vllm_compat.check_vllm()
        self.model_dir = Path(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.shape = ModelShape.from_config(AutoConfig.from_pretrained(self.model_dir))
        error = family_error(self.shape.architecture, vllm=True)
        if error:
            raise ArtifactError(error)
        # Configs checked here (names, widths) so a bad artifact fails before vLLM starts; the workers
        # hold the SAEs' weights.
        self.artifacts = Artifacts()
        cpu, torch_dtype = torch.device("cpu"), torch.float32  # front-end copies: validation and metadata only
        if has_codebooks(self.model_dir):
            self.artifacts.add_codebooks(self.model_dir, self.shape, cpu, torch_dtype)
        for spec in saes:
            self.artifacts.add_sae(spec, self.shape, cpu, weights=False)
        model = _model_view(self.model_dir) if has_codebooks(self.model_dir) else self.model_dir
        defaults = {k: v for k, v in dict(dtype=dtype, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                                          enable_prefix_caching=enable_prefix_caching,
                                          gpu_memory_utilization=gpu_memory_utilization).items() if v is not None}
        self.args = vllm_compat.engine_args(model, self.model_dir, defaults, list(vllm_args), engine_kwargs)
        self.steer_sites = sorted({s.name for a in self.artifacts.saes.values() for s in a.sites}
                                  | {cb.site.name for cb in self.artifacts.codebooks.values()}
                                  | {Site.parse(s, self.shape.num_layers).name for s in steer_sites})
        self._check_sites(self.steer_sites)
        self.args.worker_cls = f"{__package__}.vllm_worker.SteeringWorker"
        self.args.additional_config = {CONFIG_KEY: {"sites": self.steer_sites}}
        if torch.cuda.is_available():
            vllm_compat.keep_cuda_graphs(self.args, "rudder::steer")
        self.max_model_len: int | None = None  # known once started
        self.eos_ids = eos_ids(self.tokenizer, self.model_dir)
        self.llm = None
        self._rows: dict[str, _Rows] = {}
        self.bad_messages = 0  # worker messages the receiver could not read
        self._running = 0
        self.recomputed_rows = 0  # readout rows seen twice: requests preempted and recomputed
        self._waiting = 0  # submitted, no output yet
        self.on_hook_step = None

    def _check_sites(self, sites: list[str]) -> None:
        if self.args.pipeline_parallel_size > 1:
            raise ArtifactError(f"Rudder's vLLM backend does not support pipeline parallelism "
                                f"(pipeline_parallel_size={self.args.pipeline_parallel_size}): a site's rows and "
                                f"readouts would live on another stage; use tensor parallelism")
        if self.args.tensor_parallel_size > 1 and any(Site.parse(s).per_head for s in sites):
            raise ArtifactError(
                f"{', '.join(s for s in sites if Site.parse(s).per_head)}: attn.hook_z sites cannot be steered "
                f"with tensor parallelism (each rank holds a slice of the heads); serve with "
                f"tensor_parallel_size=1 or steer residual-stream or MLP sites")

    def check_site(self, site: str) -> None:
        """Refuse a site the op was not placed at (it is placed before vLLM compiles the model)."""
        if site not in self.steer_sites:
            raise FailedPrecondition(
                f"site {site} was not declared at start-up; declared: {', '.join(self.steer_sites) or 'none'}. "
                f"Restart with --steer-sites {site} (rudder serve) to steer there")

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self.llm is not None:
            return
        vllm_compat.set_engine_env(FRONT_END_ENV)
        self._socket_dir = tempfile.mkdtemp(prefix="rudder-readouts-")  # mode 0700: only this user connects
        address = f"{self._socket_dir}/readouts"
        self._channel = channel.Receiver(address, self._handle, asyncio.get_running_loop())
        self._channel.ended.add_done_callback(self._channel_ended)
        self.llm = vllm_compat.async_llm(self.args)
        self.max_model_len = self.llm.model_config.max_model_len
        codebooks = str(self.model_dir) if has_codebooks(self.model_dir) else None
        attached = [(f"{a.id}={a.path}", a.generation) for a in self.artifacts.saes.values()]
        info = await self.llm.collective_rpc("rudder_setup", args=(address, attached, codebooks))
        log.info("vLLM workers ready: %s", info[0])

    async def stop(self) -> None:
        if self.llm is None:
            return
        self.llm.shutdown()
        self.llm = None
        self._channel.close()
        shutil.rmtree(self._socket_dir, ignore_errors=True)

    async def pause(self) -> None:
        await self.llm.pause_generation(mode="keep", clear_cache=False)

    async def resume(self) -> None:
        await self.llm.resume_generation()

    def healthy(self) -> bool:
        """False once vLLM's engine has died (its core process gone or failed), or the readout receiver
        has: it will not serve again."""
        return self.llm is not None and not self.llm.errored and not self._channel.ended.done()

    def _channel_ended(self, ended: asyncio.Future) -> None:
        """The channel from the workers (whose step records `_handle` routes to the requests' `_Rows`)
        failed or closed (the engine stopped): every waiting request fails at once, and the backend is
        no longer healthy."""
        if ended.cancelled():
            return
        if (e := ended.exception()) is None:
            failure = "the steering worker closed the readout channel (vLLM's engine stopped)"
        else:
            log.error("the readout channel from vLLM's workers failed: %s", e)
            failure = f"the readout channel from vLLM's workers failed ({e})"
        for rows in self._rows.values():
            rows.fail(Unavailable(f"{failure}; retry the request"))

    def _handle(self, message: bytes) -> None:
        """One message from the workers. One that cannot be read is logged and counted, and the requests
        its header names (when it can be read that far) fail with UNAVAILABLE; the others go on."""
        try:
            record = channel.decode(message)
        except channel.ChannelError as e:
            self.bad_messages += 1
            log.error("a steering worker message was refused: %s (requests: %s)", e, ", ".join(e.requests) or "unknown")
            for request in e.requests:
                if (box := self._rows.get(request)) is not None:
                    box.fail(e)
            return
        self._route(record)

    def _route(self, record: channel.StepRecord) -> None:
        if self.on_hook_step is not None:
            self.on_hook_step(record.hook_s)
        touched = set()
        for row in record.rows:
            box = self._rows.get(row.request)
            if box is None:  # a request that already ended
                continue
            if row.position in box.by_position:  # recomputed after preemption: keep the first
                self.recomputed_rows += 1
            else:
                box.by_position[row.position] = (row.readouts, row.broken)
                if row.hit is not None:
                    box.hits[row.position] = row.hit
            touched.add(box)
        for box in touched:
            box.arrived.set()

    async def load_sae(self, spec: str) -> str:
        """Attach an SAE at run time (`[NAME=]PATH`), in this process and in every worker."""
        attached = self.artifacts.add_sae(spec, self.shape, torch.device("cpu"), weights=False)
        try:
            for site in attached.sites:
                self.check_site(site.name)
            self._check_sites([site.name for site in attached.sites])
            resolved = f"{attached.id}={attached.path}"  # a release is fetched once, here
            await self.llm.collective_rpc("rudder_load_sae", args=(resolved, attached.generation))
        except Exception:
            self.artifacts.remove_sae(attached.id)
            raise
        return attached.id

    async def unload_sae(self, sae_id: str) -> None:
        """Detach an SAE; the workers stop applying it at their next step (the service ends the requests
        that use it), and the prefix cache is emptied of blocks steered with it."""
        self.artifacts.remove_sae(sae_id)
        await self.llm.collective_rpc("rudder_unload", args=(sae_id,))
        if not await self.llm.reset_prefix_cache():  # hygiene: a reload's new generation changes the salt anyway
            log.info("prefix cache not reset after unloading %s (blocks in use); its blocks age out", sae_id)

    def running_requests(self) -> int:
        return self._running

    def waiting_requests(self) -> int:
        """Requests with no output yet (queued, or in their first prefill)."""
        return self._waiting

    # ------------------------------------------------------------ requests

    @staticmethod
    def _salt(spec: SteeringSpec, payload: dict | None, prompt_len: int) -> str | None:
        """Requests share cached KV blocks only when every row's steering is the same: the same edits
        of the same artifact generations, at the same absolute positions (a PROMPT or GENERATED scope
        ends or starts at the prompt's length, so then the length is part of the salt). Prompt
        readouts need every prompt row computed, so such a request shares with nobody."""
        if spec.readouts.include_prompt:
            return uuid.uuid4().hex
        if not spec.steers:
            return None
        edits = {k: v for k, v in payload.items() if k not in ("readouts", "generations")}
        edited = spec.edited_saes()
        edits["generations"] = [[i, g] for i, g in spec.generations if i in edited]  # not those only read
        scopes = [e.scope.kind for e in (*spec.features, *spec.directions, *spec.codes)]
        if "prompt" in scopes or "generated" in scopes:
            edits["prompt_len"] = prompt_len
        return hashlib.sha256(json.dumps(edits, sort_keys=True).encode()).hexdigest()[:32]

    async def generate(self, request: EngineRequest) -> AsyncIterator[TokenEvent]:
        spec, s = request.steering, request.sampling
        payload = spec_to_wire(spec) if spec.active else None
        req_id = uuid.uuid4().hex  # the worker sends it back with the request's rows (channel.REQUEST_ID_KEY)
        params = vllm_compat.sampling_params(
            max_tokens=1 if request.trace else s.max_tokens, temperature=s.temperature, top_p=s.top_p,
            top_k=s.top_k if s.top_k > 0 else 0, seed=s.seed, ignore_eos=s.ignore_eos, logprobs=s.logprobs,
            presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty,
            repetition_penalty=s.repetition_penalty, min_p=s.min_p, logit_bias=dict(s.logit_bias) or None,
            extra_args={EXTRA_ARGS_KEY: payload, channel.REQUEST_ID_KEY: req_id} if payload else None)
        prompt = {"prompt_token_ids": list(request.prompt_ids)}
        salt = self._salt(spec, payload, len(request.prompt_ids))
        if salt:
            prompt["cache_salt"] = salt
        box = _Rows(self._channel.poll) if spec.active else None
        if box is not None:
            self._rows[req_id] = box
        seq = Sequence(request, self.tokenizer, self.eos_ids)
        stream = self.llm.generate(prompt, params, request_id=req_id)
        first = True
        self._running += 1
        self._waiting += 1
        try:
            async for out in vllm_compat.outputs(stream):
                queue_s = None
                if first:
                    first = False
                    self._waiting -= 1
                    queue_s = vllm_compat.queue_seconds(out)
                    if seq.reads_prompt:
                        for t in range(seq.prompt_len):
                            for event in seq.prompt_row(t, *(await box.row(t) if box else ([], None, False))):
                                event.queue_s, queue_s = queue_s, None
                                yield event
                            if seq.finish:
                                break
                    if seq.prompt_done:
                        return
                completion = out.outputs[0]
                last = len(completion.token_ids) - 1
                for j, token in enumerate(completion.token_ids):
                    logprob, top = vllm_compat.token_logprobs(completion, j, token, s.logprobs)
                    readouts, hit, broken = await box.row(seq.row_position) if box else ([], None, False)
                    ended = seq.ends_at_row(readouts, hit, broken)
                    if ended is not None:  # a guard fired where this token was chosen: it is withheld
                        yield ended
                        return
                    engine_finish = _FINISH.get(completion.finish_reason) if j == last else None
                    event = seq.token(token, logprob, readouts, engine_finish, top)
                    event.queue_s, queue_s = queue_s, None
                    yield event
                    if seq.finish:
                        return
                if out.finished:  # vLLM ended it (aborted) without a token Rudder could end it on
                    raise Unavailable(f"the engine ended the request ({completion.finish_reason}) after "
                                      f"{seq.generated} tokens")
        finally:
            self._running -= 1
            self._waiting -= first
            self._rows.pop(req_id, None)
            await stream.aclose()  # vLLM aborts a request whose stream is closed early
            if self.llm is not None and not self.llm.errored and seq.finish not in ("eos", "length"):
                await self.llm.abort(req_id)  # cancelled, or ended by a stop string: vLLM would go on
