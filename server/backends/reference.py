"""The reference backend: a transformers model with torch hooks at the sites.

It runs anywhere (CPU or CUDA) and is the oracle the other backends are tested
against. Requests that arrive together are batched in waves: one worker thread
takes up to `max_batch` waiting requests, prefills them left-padded, and decodes
them step by step with a shared KV cache, dropping rows as they finish. New
requests wait for the next wave (the vLLM backend batches continuously).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache

from rudder.core.artifacts import Artifacts, has_codebooks
from rudder.core.errors import ArtifactError, InvalidArgument
from rudder.core.hf_sites import context_of, family_error, hook_site, shape_of
from rudder.core.sites import Site
from rudder.core.steering import StepTables, build_tables
from rudder.server.backends.base import EngineRequest, HfTokenizing, Sampling, TokenEvent
from rudder.server.backends.sequence import Sequence, eos_ids
from rudder.server.backends.step import GateState, Span, StepRecorder, row_index, table_specs

log = logging.getLogger(__name__)

_END = object()  # end of a request's event stream


@dataclass(eq=False)
class _Handle:
    request: EngineRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    queued_at: float = field(default_factory=time.monotonic)
    queue_s: float | None = None  # set when its wave starts; sent on its first event

    def push(self, item) -> None:
        if isinstance(item, TokenEvent) and self.queue_s is not None:
            item.queue_s, self.queue_s = self.queue_s, None
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


@dataclass(eq=False)
class _Row:
    """A request being decoded in the current wave."""

    handle: _Handle
    slot: int  # -1: the request neither steers nor reads
    seq: Sequence
    generator: torch.Generator | None
    last_token: int = 0
    gates: GateState | None = None  # its conditions and guards, where it has any


def penalize(logits: Tensor, s: Sampling, prompt_ids, output_ids) -> Tensor:
    """vLLM's penalties on `logits (V,)`: repetition over the prompt's and output's tokens (a positive
    logit divided by it, a negative one multiplied), then frequency (times each output token's
    count) and presence (once per output token) subtracted, as OpenAI's API defines them."""
    vocab, device = logits.numel(), logits.device
    if s.repetition_penalty != 1.0:
        seen = torch.zeros(vocab, dtype=torch.bool, device=device)
        for ids in (prompt_ids, output_ids):
            if len(ids):
                ids = torch.as_tensor(ids, device=device)
                seen[ids[ids < vocab]] = True
        penalty = torch.where(seen, torch.tensor(s.repetition_penalty, dtype=torch.float32, device=device), 1.0)
        logits = logits * torch.where(logits > 0, 1.0 / penalty, penalty)
    if output_ids and (s.frequency_penalty or s.presence_penalty):
        counts = torch.bincount(torch.as_tensor(output_ids, device=device), minlength=vocab)[:vocab]
        logits = logits - s.frequency_penalty * counts - s.presence_penalty * (counts > 0)
    return logits


def sample(logits: Tensor, s: Sampling, generator: torch.Generator | None, prompt_ids=(),
           output_ids=()) -> tuple[int, float, list[tuple[int, float]]]:
    """One token from `logits (V,)`, as vLLM's V1 sampler chooses it: logit_bias, then the penalties,
    then greedy, or temperature, min_p, top-k, top-p and a draw. The logprob, and the `s.logprobs`
    likeliest alternatives, are under the unmodified distribution (vLLM's default `raw_logprobs`)."""
    raw = logits.float()
    logprobs = torch.log_softmax(raw, dim=-1)
    top = []
    if s.logprobs:
        values, ids = logprobs.topk(min(s.logprobs, logprobs.numel()))
        top = list(zip(ids.tolist(), values.tolist()))
    processed = raw
    if s.logit_bias:
        processed = processed.clone()
        for token, bias in s.logit_bias:
            processed[token] += bias
    if s.penalized:
        processed = penalize(processed, s, prompt_ids, output_ids)
    if s.temperature <= 0:
        token = int(processed.argmax())
        return token, float(logprobs[token]), top
    scaled = processed / s.temperature
    if s.min_p > 0:
        probs = scaled.softmax(-1)
        scaled = scaled.masked_fill(probs < probs.max() * s.min_p, float("-inf"))
    if s.top_k > 0:
        kth = scaled.topk(min(s.top_k, scaled.numel())).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = scaled.sort(descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > s.top_p  # keep the smallest prefix reaching top_p
        scaled = scaled.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    token = int(torch.multinomial(scaled.softmax(-1), 1, generator=generator))
    return token, float(logprobs[token]), top


class ReferenceEngine(HfTokenizing):
    name = "reference"

    def check_site(self, site: str) -> None:
        """Every site: a hook is installed when a request first steers there."""

    def __init__(self, model_dir: str | Path, saes: list[str] = (), device: str = "cpu",
                 dtype: torch.dtype = torch.float32, max_batch: int = 32, batch_wait_s: float = 0.01):
        self.model_dir = Path(model_dir)
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        error = family_error(AutoConfig.from_pretrained(self.model_dir).model_type, vllm=False)
        if error:  # before the weights load: a family without a site layout, naming those with one
            raise ArtifactError(error)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=dtype).to(self.device).eval()
        self.shape = shape_of(self.model)
        self.max_model_len = context_of(self.model.config)
        self.artifacts = Artifacts()
        if has_codebooks(self.model_dir):
            self.artifacts.add_codebooks(self.model_dir, self.shape, self.device, dtype)
        for spec in saes:
            self.artifacts.add_sae(spec, self.shape, self.device, model=self.model)
        self._refresh()
        self._step_artifacts, self._tables_for = self._attached[0], None  # what the current wave's tables are of
        self._hooks: dict[str, object] = {}
        for site in self._step_artifacts:
            self._ensure_hook(site)
        self.eos_ids = eos_ids(self.tokenizer, self.model_dir)
        self.pad_id = next((t for t in (self.tokenizer.pad_token_id, *self.eos_ids) if t is not None), 0)
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self._step: StepRecorder | None = None
        self._pending: queue.Queue[_Handle | None] = queue.Queue()
        self._active = 0
        self._thread: threading.Thread | None = None
        self.on_hook_step = None
        self._hold = threading.Condition()  # pause/resume: the worker waits here before each step
        self._held = False
        self._stepping = False  # the worker is inside a step (between its forward and the next)

    # ------------------------------------------------------------ set-up

    def _ensure_hook(self, site: str) -> None:
        if site not in self._hooks:
            self._hooks[site] = hook_site(self.model, Site.parse(site, self.shape.num_layers), self._on_site)

    def _on_site(self, site: str, x: Tensor) -> Tensor:
        return self._step.steer(site, x, self._step_artifacts.get(site))

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="rudder-reference-engine", daemon=True)
            self._thread.start()

    def healthy(self) -> bool:
        """The engine's thread is alive (a wave's failure fails its requests, not the thread)."""
        return self._thread is None or self._thread.is_alive()

    async def stop(self) -> None:
        if self._thread is not None:
            await self.resume()  # a paused wave must run to its end for the thread to stop
            self._pending.put(None)
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    async def pause(self) -> None:
        def hold() -> None:
            with self._hold:
                self._held = True
                while self._stepping:  # the step under way finishes and pushes its events first
                    self._hold.wait()

        await asyncio.to_thread(hold)

    async def resume(self) -> None:
        with self._hold:
            self._held = False
            self._hold.notify_all()

    def _step_boundary(self, stepping: bool) -> None:
        """The worker between two steps: wait while paused, then mark whether a step is under way."""
        with self._hold:
            self._stepping = False
            self._hold.notify_all()
            while stepping and self._held:
                self._hold.wait()
            self._stepping = stepping

    async def load_sae(self, spec: str) -> str:
        attached = self.artifacts.add_sae(spec, self.shape, self.device, model=self.model)
        for site in attached.sites:
            self._ensure_hook(site.name)
        self._refresh()
        return attached.id

    def _refresh(self) -> None:
        """Snapshots of the artifacts for the worker thread, in one assignment: it sees the old or the
        new, never a dict mid-change; a wave rebuilds its tables when they change."""
        self._attached = (self.artifacts.by_site(), self.artifacts.sae_modules(), self.artifacts.generations())

    async def unload_sae(self, sae_id: str) -> None:
        self.artifacts.remove_sae(sae_id)
        self._refresh()

    def running_requests(self) -> int:
        return self._active + self._pending.qsize()

    def waiting_requests(self) -> int:
        return self._pending.qsize()

    async def generate(self, request: EngineRequest) -> AsyncIterator[TokenEvent]:
        handle = _Handle(request, asyncio.get_running_loop())
        self._pending.put(handle)
        try:
            while True:
                item = await handle.events.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            handle.cancelled = True  # the worker drops it at its next step

    # ------------------------------------------------------------ worker

    def _loop(self) -> None:
        while True:
            first = self._pending.get()
            if first is None:
                return
            wave = [first]
            deadline = time.monotonic() + self.batch_wait_s
            while len(wave) < self.max_batch:
                try:
                    nxt = self._pending.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    self._pending.put(None)
                    break
                wave.append(nxt)
            wave = [h for h in wave if not h.cancelled]
            if not wave:
                continue
            started = time.monotonic()
            for h in wave:
                h.queue_s = started - h.queued_at
            self._active = len(wave)
            try:
                with torch.inference_mode():
                    self._run_wave(wave)
            except Exception as e:  # a bug or OOM fails this wave's requests, not the server
                log.exception("wave of %d requests failed", len(wave))
                for h in wave:
                    h.push(e)
            finally:
                self._active = 0
                self._step = None
                self._step_boundary(stepping=False)

    def _forward(self, step: StepRecorder, **inputs) -> tuple[Tensor, dict, set[int]]:
        """Logits of each row's last position `(B, V)`, the step's readouts by token row (and, for
        gates, `step.gate_values(row)` after this), and the slots whose steering overflowed."""
        self._step_boundary(stepping=True)
        self._step = step
        logits = self.model(**inputs, use_cache=True, logits_to_keep=1).logits[:, -1]
        if self.on_hook_step is not None and not (step.tables.empty and not self._step_artifacts):
            self.on_hook_step(step.hook_s)
        return logits, {row: readouts for row, (_, _, readouts) in step.routed().items()}, step.broken_slots()

    def _tables(self, specs: list, prompt_lens: list[int]) -> StepTables:
        """The wave's tables from the artifacts attached now (kept for the hooks of its steps)."""
        self._step_artifacts, saes, generations = attached = self._attached
        self._tables_for = attached
        tables = build_tables([s if s.active else None for s in specs], prompt_lens, self.device, saes, generations)
        for site in tables.directions:
            self._ensure_hook(site)
        return tables

    def _run_wave(self, wave: list[_Handle]) -> None:
        reqs = [h.request for h in wave]
        prompt_lens = [len(r.prompt_ids) for r in reqs]
        specs = [r.steering for r in reqs]
        gates = [GateState(s, p) if GateState.needed(s) else None for s, p in zip(specs, prompt_lens)]
        tables = self._tables(table_specs(specs, gates), prompt_lens)

        # Prefill, left-padded: row b*L + t is token t - (L - P_b) of request b.
        b_size, length = len(reqs), max(prompt_lens)
        ids = torch.full((b_size, length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((b_size, length), dtype=torch.long)
        for b, r in enumerate(reqs):
            ids[b, length - prompt_lens[b]:] = torch.tensor(r.prompt_ids)
            mask[b, length - prompt_lens[b]:] = 1
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        spans = [Span(b, b * length + length - p, (b + 1) * length, 0, p, s)
                 for b, (p, s) in enumerate(zip(prompt_lens, specs)) if s.active]
        step = StepRecorder(tables, row_index(positions.reshape(-1), spans, self.device), specs)
        cache = DynamicCache()
        logits, readouts, broken = self._forward(step, input_ids=ids.to(self.device),
                                                 attention_mask=mask.to(self.device),
                                                 position_ids=positions.to(self.device), past_key_values=cache)

        states: list[_Row | None] = []
        for b, (h, r) in enumerate(zip(wave, reqs)):
            seq = Sequence(r, self.tokenizer, self.eos_ids)
            if seq.reads_prompt:
                first = b * length + length - prompt_lens[b]
                try:
                    for t in range(prompt_lens[b]):
                        hit = (gates[b].observe(t, step.gate_values(first + t))
                               if gates[b] is not None and seq.guards_prompt_row(t) and b not in broken else None)
                        for event in seq.prompt_row(t, readouts.get(first + t, []), hit, broken=b in broken):
                            h.push(event)
                        if seq.finish:
                            break
                except InvalidArgument as e:  # the prompt's steering overflowed: no prompt event goes out
                    h.push(e)
                    states.append(None)
                    continue
            if seq.prompt_done:
                h.push(_END)
                states.append(None)
                continue
            gen = torch.Generator().manual_seed(r.sampling.seed) if r.sampling.seed is not None else None
            states.append(_Row(h, b if specs[b].active else -1, seq, gen, gates=gates[b]))
        alive = self._emit(states, logits, step, readouts, [b * length + length - 1 for b in range(b_size)], broken)
        self._decode(states, alive, cache, mask, tables, specs, prompt_lens, gates)

    def _decode(self, states: list[_Row | None], alive: list[bool], cache: DynamicCache, mask: Tensor,
                tables: StepTables, specs: list, prompt_lens: list[int], gates: list[GateState | None]) -> None:
        """Decode one token per live request per step; cache row i belongs to states[i]."""
        opened = [g.version if g else 0 for g in gates]
        while True:
            keep = [i for i, ok in enumerate(alive) if ok]
            if not keep:
                return
            now = [g.version if g else 0 for g in gates]
            if self._attached is not self._tables_for or now != opened:  # an SAE (un)loaded, or a gate opened
                tables, opened = self._tables(table_specs(specs, gates), prompt_lens), now
            if len(keep) < len(states):
                cache.batch_select_indices(torch.tensor(keep, device=self.device))
                mask, states = mask[keep], [states[i] for i in keep]
            n = len(states)
            ids = torch.tensor([[s.last_token] for s in states])
            mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype)], dim=1)
            positions = torch.tensor([[s.seq.prompt_len + s.seq.generated - 1] for s in states])
            spans = [Span(s.slot, i, i + 1, s.seq.prompt_len + s.seq.generated - 1, s.seq.prompt_len,
                          specs[s.slot]) for i, s in enumerate(states) if s.slot >= 0]
            step = StepRecorder(tables, row_index(positions.reshape(-1), spans, self.device), specs)
            logits, readouts, broken = self._forward(step, input_ids=ids.to(self.device),
                                                     attention_mask=mask.to(self.device),
                                                     position_ids=positions.to(self.device), past_key_values=cache)
            alive = self._emit(states, logits, step, readouts, list(range(n)), broken)

    def _emit(self, states: list[_Row | None], logits: Tensor, step: StepRecorder, readouts: dict, rows: list[int],
              broken: set[int]) -> list[bool]:
        """Sample each live request's next token and stream it; return which requests go on. A request
        whose steering overflowed, or whose logits cannot be sampled, ends alone with its error."""
        alive = []
        for s, row_logits, row in zip(states, logits, rows):
            if s is None or s.handle.cancelled:
                alive.append(False)
                continue
            hit = None
            if s.gates is not None and s.slot not in broken:  # decided after the step, before sampling
                hit = s.gates.observe(s.seq.row_position, step.gate_values(row))
            try:
                ended = s.seq.ends_at_row(readouts.get(row, []), hit, broken=s.slot in broken)
                if ended is None:
                    token, logprob, top = sample(row_logits, s.seq.request.sampling, s.generator,
                                                 s.seq.request.prompt_ids, s.seq.output_ids)
            except Exception as e:  # noqa: BLE001 - this request's failure, not the wave's
                if not isinstance(e, InvalidArgument):
                    log.exception("sampling failed for one request")
                s.handle.push(e)
                alive.append(False)
                continue
            if ended is not None:
                s.handle.push(ended)
                s.handle.push(_END)
                alive.append(False)
                continue
            s.last_token = token
            event = s.seq.token(token, logprob, readouts.get(row, []), top=top)
            s.handle.push(event)
            if event.finish:
                s.handle.push(_END)
            alive.append(event.finish is None)
        return alive
