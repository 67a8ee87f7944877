"""The `rudder.v1.Steering` servicer: thin methods over the generation core and the engine."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path

from rudder.core import code_search, sae_sources
from rudder.core.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from rudder.core.feature_metadata import rank_by_effect
from rudder.core.sites import all_sites
from rudder.server.generation import GenerationCore
from rudder.server.wire import readout_to_pb, response_to_pb, token_to_pb
from rudder.v1 import steering_pb2 as pb
from rudder.v1 import steering_pb2_grpc as pb_grpc


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


class SteeringService(pb_grpc.SteeringServicer):
    """The gRPC servicer: generations and traces through the shared `GenerationCore`, artifacts and
    feature search over the engine. Authentication, counting and the error map are the interceptor's
    (server.app, over server.policy)."""

    def __init__(self, core: GenerationCore, allow_admin: bool = False, artifact_set: Path | None = None):
        self.core = core
        self.engine = core.engine
        self.model_name = core.model_name
        self.allow_admin = allow_admin
        self.artifact_set = artifact_set  # the file the SAEs follow: LoadSae / UnloadSae are refused
        self._index_texts: dict[int, list[list[str]]] = {}  # code search: the token texts of each code index

    async def Generate(self, request: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateResponse]:
        async with aclosing(self.core.generate(request)) as events:
            async for event in events:
                yield response_to_pb(event)

    async def Trace(self, request: pb.TraceRequest, context) -> pb.TraceResponse:
        out = pb.TraceResponse()
        async with aclosing(self.core.trace(request)) as events:
            async for ev in events:
                out.tokens.add(token=token_to_pb(ev), readouts=[readout_to_pb(r) for r in ev.readouts])
        return out

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
        hits = rank_by_effect(scores, top, self.core.token_text, request.says)  # ~20 logit-lens tokens a feature
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
