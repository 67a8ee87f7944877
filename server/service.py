"""The `rudder.v1.Steering` servicer: thin methods over an engine."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import re
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path

from rudder.core import code_search, sae_sources
from rudder.core.errors import (
    AtCapacity,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ReadoutMissing,
    Unavailable,
)
from rudder.core.feature_metadata import rank_by_effect
from rudder.core.sites import all_sites
from rudder.core.steering import SteeringSpec
from rudder.server.backends.base import Engine, EngineRequest, TokenEvent, TokenReadout
from rudder.server.metrics import Metrics
from rudder.server.requests import Limits, RequestParser
from rudder.v1 import steering_pb2 as pb
from rudder.v1 import steering_pb2_grpc as pb_grpc

_STOP = {"length": pb.LENGTH, "eos": pb.EOS, "stop": pb.STOP_STRING, "guard": pb.GUARD}
_DONE = object()


def readout_to_pb(r: TokenReadout) -> pb.Readout:
    msg = pb.Readout(source=r.source)
    if r.codes is not None:
        msg.codes.extend(pb.CodeGroup(head=h, codes=c) for h, c in enumerate(r.codes))
    else:
        msg.top.ids.extend(r.top_ids)
        msg.top.values.extend(r.top_values)
        msg.selected.ids.extend(r.selected_ids)
        msg.selected.values.extend(r.selected_values)
    return msg


def vector_info(name: str, v) -> pb.VectorInfo:
    return pb.VectorInfo(name=name, site=v.site, method=v.method, alpha=v.strength, budget=v.budget or 0.0,
                         scope=v.scope,
                         concept=str(v.provenance.get("concept", "")),
                         features=[pb.VectorFeature(sae=f["sae"], feature=f["feature"], cosine=f["cosine"])
                                   for f in v.features])


def sae_info(a) -> pb.SaeInfo:
    return pb.SaeInfo(id=a.id, site=a.site.name, d_in=a.cfg.d_in, d_sae=a.cfg.d_sae,
                      architecture=a.cfg.architecture, has_feature_metadata=a.features is not None,
                      site_out=a.site_out.name if a.site_out else "")


def token_to_pb(ev: TokenEvent) -> pb.Token:
    return pb.Token(id=ev.token_id, text=ev.text, logprob=ev.logprob, position=ev.position, is_prompt=ev.is_prompt)


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
    """A Generate or Trace being served, and what it steers and reads."""

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


class SteeringService(pb_grpc.SteeringServicer):
    def __init__(self, engine: Engine, model_name: str, limits: Limits = Limits(), max_concurrent: int = 256,
                 allow_admin: bool = False, metrics: Metrics | None = None, artifact_set: Path | None = None):
        self.engine = engine
        self.allow_admin = allow_admin
        self.artifact_set = artifact_set  # the file the SAEs follow: LoadSae / UnloadSae are refused
        self.metrics = metrics or Metrics()
        self.model_name = model_name
        self.parser = RequestParser(engine.shape, engine.artifacts, limits, engine.check_site)
        self.max_concurrent = max_concurrent
        self.in_flight = 0
        self.dead: str | None = None  # why the server no longer serves (its engine died)
        self._index_texts: dict[int, list[list[str]]] = {}  # code search: the token texts of each code index
        # a search by effect reads ~20 logit-lens tokens of every feature: decode each token once per server
        self._token_text = functools.lru_cache(maxsize=None)(self.engine.token_text)

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

    def _admit(self) -> None:
        if self.dead:
            raise Unavailable(self.dead)
        if self.in_flight >= self.max_concurrent:
            raise AtCapacity(
                f"the server is at its limit of {self.max_concurrent} concurrent requests; retry with backoff"
            )

    async def Generate(self, request: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateResponse]:
        steering = self.parser.steering(request.interventions, request.readouts, request.guards)
        sampling = self.parser.sampling(request.sampling)
        ids = await asyncio.to_thread(self.parser.prompt, request, self.engine.tokenize)  # off the event loop
        self._admit()
        # prompt and output fit the context: past it, the stream ends with stop reason LENGTH
        sampling = dataclasses.replace(sampling, max_tokens=self.parser.limits.output_tokens(sampling.max_tokens,
                                                                                              len(ids)))
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
                    msg = pb.GenerateResponse(token=token_to_pb(ev), baseline=is_baseline,
                                              readouts=[readout_to_pb(r) for r in ev.readouts])
                    if ev.queue_s is not None:
                        m.request_queue_time.observe(ev.queue_s)
                    if ev.guard is not None:
                        msg.guard.CopyFrom(pb.GuardHit(index=ev.guard.index, position=ev.guard.position,
                                                       value=ev.guard.value))
                    elif not ev.is_prompt:
                        generated[is_baseline] += 1
                        now = time.monotonic()
                        if is_baseline in last:
                            m.inter_token_latency.observe(now - last[is_baseline])
                        elif not is_baseline:
                            m.time_to_first_token.observe(now - received)
                        last[is_baseline] = now
                        m.generation_tokens.inc()
                    m.readout_rows.inc(len(ev.readouts))
                    if ev.finish:
                        msg.stop_reason = _STOP[ev.finish]
                        msg.usage.prompt_tokens = len(ids)
                        msg.usage.completion_tokens = generated[is_baseline]
                        finished[is_baseline] = ev.finish
                    yield msg
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

    async def Trace(self, request: pb.TraceRequest, context) -> pb.TraceResponse:
        steering = self.parser.steering(request.interventions, request.readouts)
        ids = await asyncio.to_thread(self.parser.prompt, request, self.engine.tokenize)
        self._admit()
        self._count_admitted(steering, len(ids))
        call = self._enter(steering)
        try:
            out = pb.TraceResponse()
            async with aclosing(self.engine.generate(EngineRequest(ids, steering=steering, trace=True))) as events:
                async for ev in events:
                    call.check(self.engine.artifacts)
                    out.tokens.add(token=token_to_pb(ev), readouts=[readout_to_pb(r) for r in ev.readouts])
                    self.metrics.readout_rows.inc(len(ev.readouts))
            return out
        except ReadoutMissing:
            self.metrics.readouts_missing.inc()
            raise
        finally:
            self._leave()

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context) -> pb.ModelInfo:
        s, arts = self.engine.shape, self.engine.artifacts
        return pb.ModelInfo(
            name=self.model_name, architecture=s.architecture, num_layers=s.num_layers, d_model=s.d_model,
            num_heads=s.num_heads, vocab_size=s.vocab_size, backend=self.engine.name,
            sites=all_sites(s.num_layers),
            saes=[sae_info(a) for a in arts.saes.values()],
            codebooks=[pb.CodebookInfo(id=c.id, site=c.site.name, num_codes=c.codebook.cfg.num_codes,
                                       k=c.codebook.cfg.k, num_heads=c.codebook.cfg.num_heads,
                                       d_code=c.codebook.cfg.d_code)
                       for c in arts.codebooks.values()],
            vectors=[vector_info(n, v) for n, v in arts.vectors.items()],
        )

    async def ListFeatures(self, request: pb.ListFeaturesRequest, context) -> pb.ListFeaturesResponse:
        sources = self.engine.artifacts.sources()
        if request.source not in sources:
            raise NotFound(
                f"unknown SAE or codebook {request.source!r}; loaded: {', '.join(sorted(sources)) or 'none'}"
            )
        if request.limit < 0 or request.offset < 0:
            raise InvalidArgument("limit and offset must be >= 0")
        try:
            pattern = re.compile(request.regex) if request.regex else None
        except re.error as e:
            raise InvalidArgument(f"regex {request.regex!r} does not compile: {e}") from e
        source = sources[request.source]
        if request.says:
            return await asyncio.to_thread(self._by_effect, request)
        if pattern is not None and getattr(source, "index_ids", None) is not None:
            hits = await asyncio.to_thread(self._code_search, source, pattern, request.min_precision,
                                           request.min_recall)
            page = hits[request.offset:request.offset + (request.limit or 20)]
            return pb.ListFeaturesResponse(total=len(hits), features=page)
        features = source.features
        if features is None:
            raise FailedPrecondition(
                f"{request.source!r} has no feature metadata; write feature_metadata.json beside the artifact"
                + (" (or a code index, for code search)" if request.source in self.engine.artifacts.codebooks else "")
            )
        label = request.label.lower()
        hits = [f for f in features
                if (not label or label in f.label.lower())
                and (pattern is None or any(pattern.search(x) for x in f.top_examples))]
        page = hits[request.offset:request.offset + (request.limit or 20)]
        return pb.ListFeaturesResponse(
            total=len(hits),
            features=[pb.FeatureSummary(id=f.id, label=f.label, density=f.density, top_examples=f.top_examples,
                                        head=f.head, max_activation=f.max_activation)
                      for f in page],
        )

    def _by_effect(self, request: pb.ListFeaturesRequest) -> pb.ListFeaturesResponse:
        """SAE features whose logit-lens tokens match `says`, best output score first."""
        source = self.engine.artifacts.saes.get(request.source)
        if source is None:
            raise InvalidArgument(f"{request.source!r} is a codebook: `says` ranks SAE features by output score")
        if source.output_scores is None:
            raise FailedPrecondition(f"{request.source!r} has no output scores; run `rudder analyze output-scores "
                                     f"--sae {source.path}` and load it again")
        scores, top = source.output_scores
        end = request.offset + (request.limit or 20)
        hits = rank_by_effect(scores, top, self._token_text, request.says)
        meta = {f.id: f for f in source.features or []}
        out = []
        for fid, score, words in hits[request.offset:end]:
            f = meta.get(fid)
            out.append(pb.FeatureSummary(id=fid, output_score=score, says_tokens=words,
                                         **({"label": f.label, "density": f.density, "top_examples": f.top_examples,
                                             "max_activation": f.max_activation} if f else {})))
        return pb.ListFeaturesResponse(total=len(hits), features=out)

    def _code_search(self, cb, pattern: re.Pattern, min_precision: float, min_recall: float) -> list:
        """Codebook Features' code search over the codebook's index of held-out tokens."""
        key = cb.index_tokens.data_ptr()  # a model's codebooks share one index: decode its tokens once
        if key not in self._index_texts:
            self._index_texts[key] = [[self.engine.token_text(t) for t in row] for row in cb.index_tokens.tolist()]
        texts = self._index_texts[key]
        labels = code_search.regex_labels(texts, pattern)
        positions = cb.index_ids.shape[0] * cb.index_ids.shape[1]
        return [pb.FeatureSummary(id=h.code, head=h.head, precision=h.precision, recall=h.recall,
                                  density=h.count / positions)
                for h in code_search.search(cb.index_ids, labels, cb.codebook.cfg.num_codes,
                                            min_precision, min_recall)]

    def _admin(self, what: str) -> None:
        if self.artifact_set is not None and what in ("LoadSae", "UnloadSae"):
            raise FailedPrecondition(f"this server's SAEs follow the artifact set {self.artifact_set}: edit that "
                                     "file (every replica reconciles within seconds); LoadSae and UnloadSae are "
                                     "off in this mode")
        if not self.allow_admin:
            raise PermissionDenied(f"{what} is an admin call; start the server with --allow-admin to allow it")

    async def LoadSae(self, request: pb.LoadSaeRequest, context) -> pb.SaeInfo:
        self._admin("LoadSae")
        if not request.path:
            raise InvalidArgument("LoadSae needs `path`: an SAELens-format folder on the server, or "
                                  "saelens:RELEASE/SAE_ID")
        if request.id and ("=" in request.id or not request.id.strip()):
            raise InvalidArgument(f"SAE id {request.id!r} must be a non-blank name without '='")
        sae_id = request.id or (sae_sources.default_id(request.path) if sae_sources.is_release(request.path) else "")
        path = await asyncio.to_thread(sae_sources.resolve, request.path)  # a release may download: off the loop
        spec = f"{sae_id}={path}" if sae_id else str(path)
        sae_id = await self.engine.load_sae(spec)
        return sae_info(self.engine.artifacts.saes[sae_id])

    async def LoadVector(self, request: pb.LoadVectorRequest, context) -> pb.VectorInfo:
        self._admin("LoadVector")
        if not request.path:
            raise InvalidArgument("LoadVector needs `path`: a vector folder (rudder train vector) or FILE.gguf[@LAYER] "
                                  "on the server")
        if "=" in request.name or (request.name and not request.name.strip()):
            raise InvalidArgument(f"vector name {request.name!r} must be a non-blank name without '='")
        spec = f"{request.name}={request.path}" if request.name else request.path
        # on the loop (a vector file is a few KB), so two loads of one name cannot both pass the check;
        # the vLLM backend steers only the sites it was started with
        name, vector = self.engine.artifacts.add_vector(spec, self.engine.shape, self.engine.check_site)
        return vector_info(name, vector)

    async def UnloadVector(self, request: pb.UnloadVectorRequest, context) -> pb.UnloadVectorResponse:
        self._admin("UnloadVector")
        vectors = self.engine.artifacts.vectors
        if request.name not in vectors:
            raise NotFound(f"unknown steering vector {request.name!r}; loaded: {', '.join(sorted(vectors)) or 'none'}")
        del vectors[request.name]  # running requests resolved it into a direction when they started
        return pb.UnloadVectorResponse()

    async def UnloadSae(self, request: pb.UnloadSaeRequest, context) -> pb.UnloadSaeResponse:
        self._admin("UnloadSae")
        await self.engine.unload_sae(request.id)  # calls that use it end at their next token (_Call.check)
        return pb.UnloadSaeResponse()
