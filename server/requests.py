"""Turn API messages into engine requests, checking everything at the edge.

Every check raises a domain error with a message a person can act on; the
service maps it to a gRPC status. Nothing invalid reaches an engine.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

from rudder.core.artifacts import Artifacts
from rudder.core.errors import InvalidArgument, NotFound, OutOfRange, ResourceExhausted, RudderError
from rudder.core.hf_sites import ModelShape
from rudder.core.sites import Site
from rudder.core.steering import (
    CodeEdit,
    DirectionEdit,
    FeatureEdit,
    Gate,
    Op,
    ReadoutSpec,
    Scope,
    SteeringSpec,
    When,
)
from rudder.server.backends.base import Sampling
from rudder.v1 import steering_pb2 as pb


@dataclass(frozen=True)
class Limits:
    """Per-request limits; beyond them a request gets RESOURCE_EXHAUSTED."""

    max_tokens: int = 2048
    max_prompt_tokens: int = 4096
    max_interventions: int = 64
    max_readout_top_k: int = 256
    max_feature_ids: int = 256
    max_stop: int = 16
    """stop strings a request may give (each at most MAX_STOP_CHARS characters)"""
    max_logprobs: int = 20
    """top alternatives a request may ask per token (OpenAI's and vLLM's default bound)"""
    max_logit_bias: int = 300
    """tokens a request's logit_bias may name (OpenAI's bound)"""
    context: int | None = None
    """the engine's context in tokens (prompt plus output), where it has one"""

    def within(self, context: int | None) -> Limits:
        """These limits under a model context of `context` tokens (prompt plus output): a longer
        prompt is OUT_OF_RANGE, and a request's output stops at the context (stop reason LENGTH)."""
        return self if context is None else dataclasses.replace(self, context=context)

    def output_tokens(self, max_tokens: int, prompt_len: int) -> int:
        """`max_tokens`, cut so that prompt and output fit the context."""
        return max_tokens if self.context is None else max(1, min(max_tokens, self.context - prompt_len))


# Edits past this magnitude are refused: SAE activations and residual norms are in the tens or
# hundreds, and a value near float16's range (65,504) overflows the stream.
MAX_MAGNITUDE = 1e4


DEFAULT_MAX_TOKENS = 64
MAX_STOP_CHARS = 256
MAX_TEMPERATURE = 2.0  # as vLLM and OpenAI's API allow
GREEDY_BELOW = 1e-5  # temperatures under this sample greedily (vLLM's _SAMPLING_EPS)

_SCOPES = {
    pb.Scope.KIND_UNSPECIFIED: "all", pb.Scope.ALL: "all", pb.Scope.PROMPT: "prompt",
    pb.Scope.GENERATED: "generated", pb.Scope.RANGE: "range",
}
_OPS = {"clamp": Op.CLAMP, "add": Op.ADD, "scale": Op.SCALE, "ablate": Op.ABLATE}


def _finite(value: float, what: str) -> float:
    if not math.isfinite(value):
        raise InvalidArgument(f"{what} must be a finite number, got {value}")
    return value


def _bounded(value: float, what: str) -> float:
    """A finite value of magnitude at most MAX_MAGNITUDE (an edit's value, strength or alpha)."""
    if abs(_finite(value, what)) > MAX_MAGNITUDE:
        raise InvalidArgument(f"{what}={value:g} is past this server's bound of {MAX_MAGNITUDE:g} in magnitude "
                              f"(larger edits overflow half-precision activations)")
    return value


def parse_scope(scope: pb.Scope, where: str) -> Scope:
    if scope.kind not in _SCOPES:
        raise InvalidArgument(f"{where}: unknown scope kind {scope.kind}; use ALL, PROMPT, GENERATED or RANGE")
    kind = _SCOPES[scope.kind]
    if kind != "range":
        if scope.start or scope.end:
            raise InvalidArgument(f"{where}: start/end are only for a RANGE scope")
        return Scope(kind)
    if scope.start < 0 or scope.end < 0 or (scope.end and scope.end <= scope.start):
        raise InvalidArgument(
            f"{where}: RANGE scope needs 0 <= start < end (end 0 = open), got start={scope.start} end={scope.end}"
        )
    return Scope("range", scope.start, scope.end or None)


class RequestParser:
    def __init__(self, shape: ModelShape, artifacts: Artifacts, limits: Limits = Limits(),
                 check_site: Callable[[str], None] | None = None):
        """`check_site(name)` raises for a site the engine cannot steer (the vLLM backend places
        its op at the sites declared at start-up)."""
        self.shape = shape
        self.artifacts = artifacts
        self.limits = limits
        self.check_site = check_site

    # ------------------------------------------------------------ pieces

    def _sae(self, sae_id: str, where: str):
        if not sae_id:
            raise InvalidArgument(f"{where}: no SAE named; loaded SAEs: {self._names(self.artifacts.saes)}")
        if sae_id not in self.artifacts.saes:
            raise NotFound(f"{where}: unknown SAE {sae_id!r}; loaded SAEs: {self._names(self.artifacts.saes)}")
        return self.artifacts.saes[sae_id]

    @staticmethod
    def _names(d: dict) -> str:
        return ", ".join(sorted(d)) or "none (start the server with --sae PATH)"

    def _feature(self, sae_id: str, feature: int, where: str) -> int:
        d_sae = self._sae(sae_id, where).cfg.d_sae
        if not 0 <= feature < d_sae:
            raise InvalidArgument(f"{where}: feature {feature} is out of range for SAE {sae_id!r} (0..{d_sae - 1})")
        return feature

    def _feature_edit(self, m: pb.FeatureIntervention, scope: Scope, where: str) -> FeatureEdit:
        self._feature(m.sae, m.feature, where)
        which = m.WhichOneof("op")
        if which is None:
            raise InvalidArgument(f"{where}: say what to do with the feature: clamp, add, scale or ablate")
        value = 0.0 if which == "ablate" else _bounded(getattr(m, which), f"{where}: {which}")
        return FeatureEdit(m.sae, m.feature, _OPS[which], value, scope)

    def _direction_edit(self, m: pb.DirectionIntervention, scope: Scope, where: str,
                        own_scope: bool = False) -> DirectionEdit:
        """`own_scope`: the request gave no scope, so a named vector's own applies."""
        which = m.WhichOneof("direction")
        if which is None:
            raise InvalidArgument(f"{where}: give a direction: sae_feature, vector or steering_vector")
        if which == "steering_vector":
            return self._named_vector_edit(m, scope, where, own_scope)
        alpha = _bounded(m.alpha, f"{where}: alpha")
        if which == "sae_feature":
            sae_id, feature = m.sae_feature.sae, m.sae_feature.feature
            attached = self._sae(sae_id, where)
            self._feature(sae_id, feature, where)
            # a decoder row lives where the SAE writes: a transcoder's output site, else its own site
            site = Site.parse(m.site or (attached.site_out or attached.site).name, self.shape.num_layers)
            self._check_direction_site(site, attached.cfg.width_out, where)
            return DirectionEdit(site.name, alpha=alpha, scope=scope, sae=sae_id, feature=feature)
        if not m.site:
            raise InvalidArgument(f"{where}: a vector direction needs a site, e.g. blocks.10.hook_resid_post")
        return self._vector_edit(Site.parse(m.site, self.shape.num_layers), list(m.vector.values), alpha, scope, where)

    def _vector_edit(self, site: Site, values: list[float], alpha: float, scope: Scope, where: str) -> DirectionEdit:
        self._check_direction_site(site, len(values), where)
        if not all(math.isfinite(v) for v in values):
            raise InvalidArgument(f"{where}: the direction vector has non-finite values")
        norm = math.sqrt(math.fsum(v * v for v in values))
        if norm * abs(alpha) > MAX_MAGNITUDE:
            raise InvalidArgument(f"{where}: the direction's norm ({norm:g}) times |alpha| is past this server's "
                                  f"bound of {MAX_MAGNITUDE:g} (larger edits overflow half-precision activations)")
        return DirectionEdit(site.name, tuple(values), alpha, scope)

    def _named_vector_edit(self, m: pb.DirectionIntervention, scope: Scope, where: str,
                           own_scope: bool) -> DirectionEdit:
        """A loaded steering vector, by name: at its own site, at its calibrated alpha and over its own
        scope (a trained vector: the prompt) unless the request gives them.
        It becomes the same edit as the vector given inline, so both backends and the prefix-cache salt see
        one kind of direction."""
        vectors = self.artifacts.vectors
        name = m.steering_vector
        if name not in vectors:
            raise NotFound(f"{where}: unknown steering vector {name!r}; loaded: "
                           f"{', '.join(sorted(vectors)) or 'none (start the server with --vector PATH)'}")
        v = vectors[name]
        if m.site and Site.parse(m.site, self.shape.num_layers).name != Site.parse(v.site).name:
            raise InvalidArgument(f"{where}: steering vector {name!r} was built at {v.site}, not {m.site}; "
                                  "leave the site out")
        if m.HasField("alpha"):
            alpha = _bounded(m.alpha, f"{where}: alpha")
        elif v.strength is not None:
            alpha = v.strength
        else:
            raise InvalidArgument(f"{where}: steering vector {name!r} was not calibrated; give an alpha")
        if own_scope:
            scope = Scope(v.scope)
        return self._vector_edit(Site.parse(v.site, self.shape.num_layers), v.vector.tolist(), alpha, scope, where)

    def _check_direction_site(self, site: Site, got: int, where: str) -> None:
        """A direction of `got` values fits `site`, and the engine can steer there."""
        width = self.shape.site_dim(site)
        if got != width:
            raise InvalidArgument(f"{where}: the direction has {got} values but {site.name} is {width} wide")
        if self.check_site is not None:
            try:
                self.check_site(site.name)
            except RudderError as e:
                raise type(e)(f"{where}: {e}") from None

    def _code_edit(self, m: pb.CodeIntervention, scope: Scope, where: str) -> CodeEdit:
        if m.codebook not in self.artifacts.codebooks:
            raise NotFound(f"{where}: unknown codebook {m.codebook!r}; loaded: {self._names(self.artifacts.codebooks)}")
        cfg = self.artifacts.codebooks[m.codebook].codebook.cfg
        if not 0 <= m.head < cfg.num_heads:
            raise InvalidArgument(
                f"{where}: head {m.head} is out of range for codebook {m.codebook!r} (0..{cfg.num_heads - 1})"
            )
        if not 0 <= m.code < cfg.num_codes:
            raise InvalidArgument(
                f"{where}: code {m.code} is out of range for codebook {m.codebook!r} (0..{cfg.num_codes - 1})"
            )
        strength = _bounded(m.strength, f"{where}: strength") if m.HasField("strength") else 1.0
        return CodeEdit(m.codebook, m.head, m.code, strength, scope)

    def gate(self, g: pb.FeatureGate, where: str) -> Gate:
        self._feature(g.sae, g.feature, where)
        return Gate(g.sae, g.feature, _bounded(g.above, f"{where}: above"))

    def _when(self, iv: pb.Intervention, where: str) -> When | None:
        if not iv.HasField("when"):
            return None
        if not iv.when.HasField("gate"):
            raise InvalidArgument(f"{where}.when: a condition needs a gate (sae, feature, above)")
        if iv.when.HasField("tokens") and iv.when.tokens < 1:
            raise InvalidArgument(f"{where}.when.tokens must be at least 1 (leave it out: to the end), "
                                  f"got {iv.when.tokens}")
        return When(self.gate(iv.when.gate, f"{where}.when.gate"),
                    iv.when.tokens if iv.when.HasField("tokens") else None)

    def steering(self, interventions, readouts: pb.ReadoutRequest, guards=()) -> SteeringSpec:
        if len(interventions) + len(guards) > self.limits.max_interventions:
            raise ResourceExhausted(
                f"{len(interventions)} interventions and {len(guards)} guards are more than this server's "
                f"limit of {self.limits.max_interventions}"
            )
        features, directions, codes = [], [], []
        for i, iv in enumerate(interventions):
            where = f"interventions[{i}]"
            scope = parse_scope(iv.scope, where)
            which = iv.WhichOneof("kind")
            if which == "feature":
                edit = self._feature_edit(iv.feature, scope, where)
            elif which == "direction":
                edit = self._direction_edit(iv.direction, scope, where, own_scope=not iv.HasField("scope"))
            elif which == "code":
                edit = self._code_edit(iv.code, scope, where)
            else:
                raise InvalidArgument(f"{where}: empty intervention; set feature, direction or code")
            when = self._when(iv, where)
            if when is not None:
                edit = dataclasses.replace(edit, when=when)
            {"feature": features, "direction": directions, "code": codes}[which].append(edit)
        per_head: dict[tuple[str, int], int] = {}
        for c in codes:
            per_head[(c.codebook, c.head)] = per_head.get((c.codebook, c.head), 0) + 1
            if per_head[(c.codebook, c.head)] > self.artifacts.codebooks[c.codebook].codebook.cfg.k:
                raise InvalidArgument(f"codebook {c.codebook!r} head {c.head}: more forced codes than its k")
        spec = SteeringSpec(tuple(features), tuple(directions), tuple(codes), self.readouts(readouts),
                            guards=tuple(self.gate(g, f"guards[{i}]") for i, g in enumerate(guards)))
        saes = self.artifacts.saes
        return dataclasses.replace(spec, generations=tuple(sorted((i, saes[i].generation) for i in spec.sae_ids())))

    def readouts(self, r: pb.ReadoutRequest) -> ReadoutSpec:
        for sae_id in r.saes:
            self._sae(sae_id, "readouts")
        for cb in r.codebooks:
            if cb not in self.artifacts.codebooks:
                raise NotFound(f"readouts: unknown codebook {cb!r}; loaded: {self._names(self.artifacts.codebooks)}")
        if r.top_k < 0:
            raise InvalidArgument(f"readouts.top_k must be >= 0, got {r.top_k}")
        if r.top_k > self.limits.max_readout_top_k:
            raise ResourceExhausted(
                f"readouts.top_k={r.top_k} is over this server's limit of {self.limits.max_readout_top_k}"
            )
        if len(r.feature_ids) > self.limits.max_feature_ids:
            raise ResourceExhausted(
                f"{len(r.feature_ids)} readout feature_ids is over the limit of {self.limits.max_feature_ids}"
            )
        if (r.top_k or r.feature_ids) and not r.saes:
            raise InvalidArgument("readouts: top_k and feature_ids need at least one SAE in readouts.saes")
        for f in r.feature_ids:
            for sae_id in r.saes:
                self._feature(sae_id, f, "readouts.feature_ids")
        return ReadoutSpec(tuple(r.saes), tuple(r.codebooks), r.top_k, tuple(r.feature_ids), r.include_prompt)

    def sampling(self, s: pb.SamplingParams) -> Sampling:
        max_tokens = s.max_tokens if s.HasField("max_tokens") else DEFAULT_MAX_TOKENS
        if max_tokens < 1:
            raise InvalidArgument(f"sampling.max_tokens must be at least 1, got {max_tokens}")
        if max_tokens > self.limits.max_tokens:
            raise ResourceExhausted(
                f"sampling.max_tokens={max_tokens} is over this server's limit of {self.limits.max_tokens}"
            )
        temperature = _finite(s.temperature, "sampling.temperature") if s.HasField("temperature") else 0.0
        top_p = _finite(s.top_p, "sampling.top_p") if s.HasField("top_p") else 1.0
        top_k = s.top_k if s.HasField("top_k") else 0
        if not 0 <= temperature <= MAX_TEMPERATURE:
            raise InvalidArgument(f"sampling.temperature must be in [0, {MAX_TEMPERATURE:g}] (0 = greedy), "
                                  f"got {temperature}")
        if temperature < GREEDY_BELOW:  # as vLLM does: dividing logits by ~0 would overflow to inf
            temperature = 0.0
        if not 0 < top_p <= 1:
            raise InvalidArgument(f"sampling.top_p must be in (0, 1], got {top_p}")
        if top_k < 0:
            raise InvalidArgument(f"sampling.top_k must be >= 0 (0 = off), got {top_k}")
        if len(s.stop) > self.limits.max_stop:
            raise ResourceExhausted(f"sampling.stop has {len(s.stop)} strings, over this server's limit of "
                                    f"{self.limits.max_stop}")
        if any(not x or len(x) > MAX_STOP_CHARS for x in s.stop):
            raise InvalidArgument(f"sampling.stop: each stop string must be 1 to {MAX_STOP_CHARS} characters")
        return Sampling(max_tokens, temperature, top_p, top_k, s.seed if s.HasField("seed") else None,
                        tuple(s.stop), s.ignore_eos, **self._penalties(s))

    def _penalties(self, s: pb.SamplingParams) -> dict:
        """Penalties, min_p, logit_bias and logprobs, in the ranges vLLM and OpenAI's API accept."""
        out = {}
        for name, low, high, open_low in (("presence_penalty", -2.0, 2.0, False),
                                          ("frequency_penalty", -2.0, 2.0, False),
                                          ("repetition_penalty", 0.0, math.inf, True), ("min_p", 0.0, 1.0, False)):
            if s.HasField(name):
                value = _finite(getattr(s, name), f"sampling.{name}")
                if not (low < value if open_low else low <= value) or value > high:
                    raise InvalidArgument(f"sampling.{name} must be in {'(' if open_low else '['}{low:g}, {high:g}], "
                                          f"got {value:g}")
                out[name] = value
        if len(s.logit_bias) > self.limits.max_logit_bias:
            raise ResourceExhausted(f"sampling.logit_bias names {len(s.logit_bias)} tokens, over this server's limit "
                                    f"of {self.limits.max_logit_bias}")
        for token, bias in s.logit_bias.items():
            if not 0 <= token < self.shape.vocab_size:
                raise InvalidArgument(f"sampling.logit_bias: token id {token} is not in this model's vocabulary "
                                      f"(0 to {self.shape.vocab_size - 1})")
            if not -100 <= _finite(bias, f"sampling.logit_bias[{token}]") <= 100:
                raise InvalidArgument(f"sampling.logit_bias[{token}] must be in [-100, 100], got {bias:g}")
        if s.logit_bias:
            out["logit_bias"] = tuple(sorted(s.logit_bias.items()))
        if not 0 <= s.logprobs <= self.limits.max_logprobs:
            raise InvalidArgument(f"sampling.logprobs must be 0 to {self.limits.max_logprobs} (top alternatives per "
                                  f"token), got {s.logprobs}")
        out["logprobs"] = s.logprobs
        return out

    def prompt(self, request, tokenize) -> list[int]:
        which = request.WhichOneof("input")
        if which == "prompt":
            if not request.prompt.strip():
                raise InvalidArgument("the prompt is empty; send some text in `prompt` or messages in `chat`")
            ids = tokenize(text=request.prompt)
        elif which == "chat":
            if not request.chat.messages:
                raise InvalidArgument("chat has no messages")
            for i, m in enumerate(request.chat.messages):
                if m.role not in ("system", "user", "assistant"):
                    raise InvalidArgument(f"chat.messages[{i}].role must be system, user or assistant, got {m.role!r}")
            ids = tokenize(chat=[{"role": m.role, "content": m.content} for m in request.chat.messages])
        else:
            raise InvalidArgument("the request has no input: set `prompt` or `chat`")
        if not ids:
            raise InvalidArgument("the prompt tokenizes to nothing")
        context = self.limits.context
        if context is not None and len(ids) >= context:
            raise OutOfRange(f"the prompt is {len(ids)} tokens; this model's context is {context} tokens "
                             f"(prompt plus output): shorten the prompt")
        if len(ids) > self.limits.max_prompt_tokens:
            raise ResourceExhausted(
                f"the prompt is {len(ids)} tokens, over this server's limit of {self.limits.max_prompt_tokens}"
            )
        return ids
