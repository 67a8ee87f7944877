"""The generation core both doors share: admission, parsing and limits, the unsteered baseline,
stale-artifact checks, usage and metrics, as typed events. No transport here: the gRPC servicer
(server.service) and the OpenAI door (server.openai_door) turn `Event`s into their own messages.

A request arrives as a `GenerateRequest` (the proto is the schema of both doors: the OpenAI door's
`rudder` object is its JSON mapping), is checked by `RequestParser`, admitted against the server's
concurrency limit, and streamed from the engine, merged with its baseline when one is asked for.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from rudder.core.errors import AtCapacity, FailedPrecondition, ReadoutMissing, Unavailable
from rudder.core.steering import SteeringSpec
from rudder.server.backends.base import Engine, EngineRequest, TokenEvent
from rudder.server.metrics import Metrics
from rudder.server.requests import Limits, RequestParser

_DONE = object()


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Event:
    """One token of a generation (or the guard that stopped it), as either door sends it."""

    token: TokenEvent
    baseline: bool = False  # from the unsteered baseline stream
    usage: Usage | None = None  # on the last event of each stream


async def merge(streams: list[tuple[bool, AsyncIterator[TokenEvent]]]) -> AsyncIterator[tuple[bool, TokenEvent]]:
    """Interleave several event streams; closing the result closes them all."""
    if len(streams) == 1:
        flag, it = streams[0]
        async with aclosing(it):
            async for ev in it:
                yield flag, ev
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(flag: bool, it: AsyncIterator[TokenEvent]) -> None:
        try:
            async for ev in it:
                await queue.put((flag, ev))
        except Exception as e:  # handed to the consumer, which raises it
            await queue.put(e)
        finally:
            await queue.put(_DONE)

    tasks = [asyncio.create_task(pump(f, it)) for f, it in streams]
    try:
        done = 0
        while done < len(tasks):
            item = await queue.get()
            if item is _DONE:
                done += 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()


@dataclasses.dataclass(eq=False)
class _Call:
    """A generation or trace being served, and what it steers and reads."""

    spec: SteeringSpec
    seen: int = -1  # `Artifacts.changes` when last found current

    def check(self, artifacts) -> None:
        """FAILED_PRECONDITION once an SAE the call uses is unloaded (or reloaded: another generation).
        Per token, so only an attach or removal since the last check costs more than a comparison."""
        if artifacts.changes == self.seen:
            return
        generations = artifacts.generations()
        gone = sorted(i for i, g in self.spec.generations if generations.get(i) != g)
        if not gone:
            self.seen = artifacts.changes
        else:
            raise FailedPrecondition(f"SAE {', '.join(map(repr, gone))} was unloaded while this request ran; load "
                                     f"it again (LoadSae) and resend the request, or leave it out")


class GenerationCore:
    """Generations and traces over one engine, with the server's limits and metrics."""

    def __init__(self, engine: Engine, model_name: str, limits: Limits = Limits(), max_concurrent: int = 256,
                 metrics: Metrics | None = None):
        self.engine = engine
        self.model_name = model_name
        self.metrics = metrics or Metrics()
        self.parser = RequestParser(engine.shape, engine.artifacts, limits, engine.check_site)
        self.max_concurrent = max_concurrent
        self.in_flight = 0
        self.dead: str | None = None  # why the server no longer serves (its engine died)
        # a token's own text, decoded once per server (feature search by effect, logprobs at the door)
        self.token_text = functools.lru_cache(maxsize=None)(engine.token_text)

    @property
    def limits(self) -> Limits:
        return self.parser.limits

    def follow_context(self) -> None:
        """Prompt and output limits follow the engine's context, once it is started and knows it."""
        self.parser.limits = self.parser.limits.within(self.engine.max_model_len)

    # ------------------------------------------------------------ admission

    def _admit(self) -> None:
        if self.dead:
            raise Unavailable(self.dead)
        if self.in_flight >= self.max_concurrent:
            raise AtCapacity(
                f"the server is at its limit of {self.max_concurrent} concurrent requests; retry with backoff"
            )

    def _count_admitted(self, steering: SteeringSpec, prompt_tokens: int) -> None:
        m = self.metrics
        m.prompt_tokens.inc(prompt_tokens)
        for kind, edits in (("feature", steering.features), ("direction", steering.directions),
                            ("code", steering.codes)):
            if edits:
                m.interventions.labels(kind).inc(len(edits))

    def _enter(self, spec: SteeringSpec) -> _Call:
        self.in_flight += 1
        self.metrics.streams_in_flight.inc()
        return _Call(spec)

    def _leave(self) -> None:
        self.in_flight -= 1
        self.metrics.streams_in_flight.dec()

    # ------------------------------------------------------------ calls

    async def generate(self, request) -> AsyncIterator[Event]:
        """The events of a `GenerateRequest`: its tokens (and its baseline's, when asked for), each
        stream's last event with its finish reason and usage. Bad requests raise a domain error
        before anything runs; closing the iterator cancels the generation."""
        steering = self.parser.steering(request.interventions, request.readouts, request.guards)
        sampling = self.parser.sampling(request.sampling)
        ids = await asyncio.to_thread(self.parser.prompt, request, self.engine.tokenize)  # off the event loop
        self._admit()
        # prompt and output fit the context: past it, the stream ends with stop reason LENGTH
        sampling = dataclasses.replace(sampling, max_tokens=self.limits.output_tokens(sampling.max_tokens, len(ids)))
        received = time.monotonic()
        self._count_admitted(steering, len(ids) * (2 if request.include_baseline else 1))
        streams = [(False, self.engine.generate(EngineRequest(ids, sampling, steering)))]
        if request.include_baseline:
            baseline = SteeringSpec(readouts=steering.readouts, generations=steering.generations)  # no guards
            streams.append((True, self.engine.generate(EngineRequest(ids, sampling, baseline))))
        call = self._enter(steering)
        m = self.metrics
        try:
            generated = {False: 0, True: 0}
            finished: dict[bool, str] = {}  # stop reason per stream
            last: dict[bool, float] = {}
            # aclosing: a call ended here (call.check) closes the engine's streams now, not at garbage collection
            async with aclosing(merge(streams)) as events:
                async for is_baseline, ev in events:
                    call.check(self.engine.artifacts)
                    if ev.queue_s is not None:
                        m.request_queue_time.observe(ev.queue_s)
                    if ev.guard is None and not ev.is_prompt:
                        generated[is_baseline] += 1
                        now = time.monotonic()
                        if is_baseline in last:
                            m.inter_token_latency.observe(now - last[is_baseline])
                        elif not is_baseline:
                            m.time_to_first_token.observe(now - received)
                        last[is_baseline] = now
                        m.generation_tokens.inc()
                    m.readout_rows.inc(len(ev.readouts))
                    usage = None
                    if ev.finish:
                        usage = Usage(len(ids), generated[is_baseline])
                        finished[is_baseline] = ev.finish
                    yield Event(ev, is_baseline, usage)
            if len(finished) != len(streams):  # a backend bug; the client must not take it for a whole answer
                raise Unavailable("the engine ended the generation without a stop reason; retry the request")
            for reason in finished.values():
                m.request_success.labels(reason).inc()
            m.e2e_request_latency.observe(time.monotonic() - received)
        except ReadoutMissing:
            m.readouts_missing.inc()
            raise
        finally:
            self._leave()

    async def trace(self, request) -> AsyncIterator[TokenEvent]:
        """A `TraceRequest`: one event per prompt token with its readouts, nothing generated."""
        steering = self.parser.steering(request.interventions, request.readouts)
        ids = await asyncio.to_thread(self.parser.prompt, request, self.engine.tokenize)
        self._admit()
        self._count_admitted(steering, len(ids))
        call = self._enter(steering)
        try:
            async with aclosing(self.engine.generate(EngineRequest(ids, steering=steering, trace=True))) as events:
                async for ev in events:
                    call.check(self.engine.artifacts)
                    self.metrics.readout_rows.inc(len(ev.readouts))
                    yield ev
        except ReadoutMissing:
            self.metrics.readouts_missing.inc()
            raise
        finally:
            self._leave()
