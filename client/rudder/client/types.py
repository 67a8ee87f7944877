"""Typed results, and builders for the request messages."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from rudder.v1 import steering_pb2 as pb

_STOP_NAMES = {pb.LENGTH: "length", pb.EOS: "eos", pb.STOP_STRING: "stop", pb.GUARD: "guard"}


@dataclass
class Readout:
    source: str
    top: list[tuple[int, float]] = field(default_factory=list)  # (feature, value), largest first
    selected: dict[int, float] = field(default_factory=dict)
    codes: list[list[int]] | None = None  # codebooks: active codes per head

    @classmethod
    def from_pb(cls, r: pb.Readout) -> Readout:
        return cls(
            source=r.source,
            top=list(zip(r.top.ids, r.top.values)),
            selected=dict(zip(r.selected.ids, r.selected.values)),
            codes=[list(g.codes) for g in r.codes] if r.codes else None,
        )


@dataclass
class Token:
    id: int
    text: str
    logprob: float
    position: int
    is_prompt: bool = False
    baseline: bool = False
    readouts: list[Readout] = field(default_factory=list)
    stop_reason: str | None = None  # on the last token of a sequence: length | eos | stop | guard
    prompt_tokens: int = 0
    completion_tokens: int = 0
    guard: tuple[int, int, float] | None = None
    """with stop_reason "guard": (which guard, the position it fired at, the feature's value); this
    last message withholds the guarded token (id -1, no text)"""
    top_logprobs: list[tuple[int, str, float]] = field(default_factory=list)
    """with `logprobs=N`: the N likeliest tokens here as (id, text, logprob), likeliest first"""

    @classmethod
    def from_pb(cls, token: pb.Token, readouts, baseline: bool = False, stop_reason: int = 0,
                usage: pb.Usage | None = None, guard: pb.GuardHit | None = None) -> Token:
        return cls(
            id=token.id, text=token.text, logprob=token.logprob, position=token.position,
            is_prompt=token.is_prompt, baseline=baseline, readouts=[Readout.from_pb(r) for r in readouts],
            stop_reason=_STOP_NAMES.get(stop_reason),
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            guard=(guard.index, guard.position, guard.value) if guard is not None else None,
            top_logprobs=[(a.id, a.text, a.logprob) for a in token.top_logprobs],
        )

    def readout(self, source: str) -> Readout | None:
        return next((r for r in self.readouts if r.source == source), None)


# ---------------------------------------------------------------- builders


def scope(kind: str = "all", start: int = 0, end: int = 0) -> pb.Scope:
    """all | prompt | generated | range (positions [start, end), end 0 = open)."""
    kinds = {"all": pb.Scope.ALL, "prompt": pb.Scope.PROMPT, "generated": pb.Scope.GENERATED, "range": pb.Scope.RANGE}
    if kind not in kinds:
        raise ValueError(f"scope kind must be one of {', '.join(kinds)}, got {kind!r}")
    return pb.Scope(kind=kinds[kind], start=start, end=end)


def _feature(sae: str, feature: int, scope_: pb.Scope | None, **op) -> pb.Intervention:
    return pb.Intervention(scope=scope_, feature=pb.FeatureIntervention(sae=sae, feature=feature, **op))


def clamp(sae: str, feature: int, value: float, scope: pb.Scope | None = None) -> pb.Intervention:
    return _feature(sae, feature, scope, clamp=value)


def add(sae: str, feature: int, delta: float, scope: pb.Scope | None = None) -> pb.Intervention:
    return _feature(sae, feature, scope, add=delta)


def scale(sae: str, feature: int, factor: float, scope: pb.Scope | None = None) -> pb.Intervention:
    return _feature(sae, feature, scope, scale=factor)


def ablate(sae: str, feature: int, scope: pb.Scope | None = None) -> pb.Intervention:
    return _feature(sae, feature, scope, ablate=True)


def direction(alpha: float, *, sae: str | None = None, feature: int | None = None,
              vector: Sequence[float] | None = None, site: str = "", scope: pb.Scope | None = None) -> pb.Intervention:
    """x += alpha * v, with v the decoder row of (sae, feature) or `vector` at `site`."""
    if (vector is None) == (sae is None):
        raise ValueError("give either sae+feature or vector")
    d = pb.DirectionIntervention(site=site, alpha=alpha)
    if vector is not None:
        d.vector.values.extend(vector)
    else:
        d.sae_feature.sae, d.sae_feature.feature = sae, feature
    return pb.Intervention(scope=scope, direction=d)


def steer(vector: str, alpha: float | None = None, scope: pb.Scope | None = None) -> pb.Intervention:
    """Steer with a steering vector loaded on the server (`rudder serve --vector`), by name: at its own
    site, at the strength it was calibrated at unless `alpha` is given (ModelInfo.vectors lists them)."""
    d = pb.DirectionIntervention(steering_vector=vector)
    if alpha is not None:
        d.alpha = alpha
    return pb.Intervention(scope=scope, direction=d)


def activate_code(codebook: str, code: int, head: int = 0, strength: float = 1.0,
                  scope: pb.Scope | None = None) -> pb.Intervention:
    return pb.Intervention(scope=scope, code=pb.CodeIntervention(codebook=codebook, head=head, code=code,
                                                                 strength=strength))


def gate(sae: str, feature: int, above: float) -> pb.FeatureGate:
    """Feature `feature` of SAE `sae` read above `above` (for `when` and `guards`)."""
    return pb.FeatureGate(sae=sae, feature=feature, above=above)


def when(intervention: pb.Intervention, sae: str, feature: int, above: float,
         tokens: int | None = None) -> pb.Intervention:
    """`intervention`, waiting for feature `feature` of `sae` to read above `above`: it then acts on the
    generated tokens after the one where it first did (for `tokens` tokens, if given)."""
    out = pb.Intervention()
    out.CopyFrom(intervention)
    out.when.gate.CopyFrom(gate(sae, feature, above))
    if tokens is not None:
        out.when.tokens = tokens
    return out


def guard(sae: str, feature: int, above: float) -> pb.FeatureGate:
    """Stop the generation (stop reason "guard") as soon as feature `feature` of `sae` reads above `above`."""
    return gate(sae, feature, above)


def readouts(saes: Sequence[str] = (), codebooks: Sequence[str] = (), top_k: int = 0,
             feature_ids: Sequence[int] = (), include_prompt: bool = False) -> pb.ReadoutRequest:
    return pb.ReadoutRequest(saes=saes, codebooks=codebooks, top_k=top_k, feature_ids=feature_ids,
                             include_prompt=include_prompt)
