"""What every engine backend takes and gives: requests in, token events out."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

from rudder.core.steering import CodeReadout, Readout, SaeReadout, SteeringSpec
from rudder.server.artifacts import Artifacts
from rudder.core.hf_sites import ModelShape


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass(eq=False)
class EngineRequest:
    prompt_ids: list[int]
    sampling: Sampling = Sampling()
    steering: SteeringSpec = SteeringSpec()
    trace: bool = False
    """prefill only: one event per prompt token with its readouts, nothing generated"""


@dataclass
class TokenReadout:
    """One source's readout at one token position, already cut to what the request asked."""

    source: str
    top_ids: list[int] = field(default_factory=list)
    top_values: list[float] = field(default_factory=list)
    selected_ids: list[int] = field(default_factory=list)
    selected_values: list[float] = field(default_factory=list)
    codes: list[list[int]] | None = None  # per head, best first


@dataclass
class TokenEvent:
    token_id: int
    position: int
    text: str = ""
    logprob: float = 0.0
    is_prompt: bool = False
    readouts: list[TokenReadout] = field(default_factory=list)
    finish: str | None = None  # "length" | "eos" | "stop" on the last event
    queue_s: float | None = None  # on the first event, where the engine knows it: time queued before running


class HfTokenizing:
    """Prompt and token text with a Hugging Face tokenizer (`self.tokenizer`), shared by the backends."""

    def tokenize(self, text: str | None = None, chat: list[dict[str, str]] | None = None) -> list[int]:
        if chat is not None:
            return list(self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                                           return_dict=False))
        return list(self.tokenizer(text).input_ids)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])


class Engine(Protocol):
    name: str
    shape: ModelShape
    artifacts: Artifacts

    def tokenize(self, text: str | None = None, chat: list[dict[str, str]] | None = None) -> list[int]: ...

    def generate(self, request: EngineRequest) -> AsyncIterator[TokenEvent]:
        """Stream the request's events; closing the iterator cancels the request."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    on_hook_step: Callable[[float], None] | None
    """called with the seconds spent in steering hooks, once per step that had steering work"""

    def running_requests(self) -> int:
        """Requests in the engine, waiting or running."""
        ...

    def waiting_requests(self) -> int:
        """Requests not yet running."""
        ...

    async def load_sae(self, spec: str) -> str:
        """Attach an SAE (`[NAME=]PATH`) at run time; return its id."""
        ...

    async def unload_sae(self, sae_id: str) -> None: ...


class ReadoutRouter:
    """Turns one step's readout tensors (keyed by token row) into per-request `TokenReadout`s.

    Everything is copied to the host once per step (one `.tolist()` per tensor).
    """

    def __init__(self, readouts: list[Readout]):
        self.by_row: dict[int, list[tuple[Readout, int]]] = {}
        self._host: dict[int, dict[str, list]] = {}
        for n, r in enumerate(readouts):
            if isinstance(r, SaeReadout):
                self._host[n] = {"top_ids": r.top_ids.tolist(), "top_values": r.top_values.tolist(),
                                 "selected_values": r.selected_values.tolist(), "selected_ids": r.selected_ids.tolist()}
            else:
                self._host[n] = {"ids": r.ids.tolist()}
            for i, row in enumerate(r.rows.tolist()):
                self.by_row.setdefault(row, []).append((n, i))
        self._readouts = readouts

    def for_row(self, row: int, spec: SteeringSpec) -> list[TokenReadout]:
        out = []
        wanted = spec.readouts
        ids = set(wanted.feature_ids)
        for n, i in self.by_row.get(row, ()):
            r, h = self._readouts[n], self._host[n]
            if isinstance(r, CodeReadout):
                if r.source in wanted.codebooks:
                    out.append(TokenReadout(r.source, codes=h["ids"][i]))
            elif r.source in wanted.saes:
                k = wanted.top_k
                sel = [(f, v) for f, v in zip(h["selected_ids"], h["selected_values"][i]) if f in ids]
                out.append(TokenReadout(
                    r.source, top_ids=h["top_ids"][i][:k], top_values=h["top_values"][i][:k],
                    selected_ids=[f for f, _ in sel], selected_values=[v for _, v in sel],
                ))
        return out
