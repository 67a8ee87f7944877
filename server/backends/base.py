"""What every engine backend takes and gives: requests in, token events out."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

import msgspec

from rudder.core.artifacts import Artifacts
from rudder.core.hf_sites import ModelShape
from rudder.core.steering import SteeringSpec


@dataclass(frozen=True)
class Sampling:
    """How a request's tokens are chosen and when it stops (validated in `requests.RequestParser`)."""

    max_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # 1: off
    top_k: int = 0  # 0: off
    seed: int | None = None  # per-request generator; None: the engine's
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one, never streamed
    ignore_eos: bool = False
    presence_penalty: float = 0.0  # vLLM's (and OpenAI's) penalties; 0, 0, 1: off
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0  # 0: off
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) added to the logits
    logprobs: int = 0  # top alternatives returned per generated token

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


@dataclass(eq=False)
class EngineRequest:
    prompt_ids: list[int]
    sampling: Sampling = Sampling()
    steering: SteeringSpec = SteeringSpec()
    trace: bool = False
    """prefill only: one event per prompt token with its readouts, nothing generated"""

    def __post_init__(self) -> None:
        if self.trace and not self.steering.readouts.include_prompt:  # a trace reads every prompt row
            readouts = dataclasses.replace(self.steering.readouts, include_prompt=True)
            self.steering = dataclasses.replace(self.steering, readouts=readouts)


class TokenReadout(msgspec.Struct, array_like=True):
    """One source's readout at one token position, already cut to what the request asked. A msgspec
    struct: made for every read row of every step in the worker, sent over the channel, read back
    in the front end (made, encoded and decoded in C)."""

    source: str
    top_ids: list[int] = []
    top_values: list[float] = []
    selected_ids: list[int] = []
    selected_values: list[float] = []
    codes: list[list[int]] | None = None  # per head, best first


@dataclass(frozen=True)
class GuardHit:
    """A guard that fired: which of the request's guards, where, and the feature's value there."""

    index: int
    position: int
    value: float


@dataclass(frozen=True)
class Alternative:
    """A likely token at a generated position, with its logprob (as `TokenEvent.logprob` is measured)."""

    id: int
    logprob: float
    text: str = ""


@dataclass
class TokenEvent:
    token_id: int
    position: int
    text: str = ""
    logprob: float = 0.0
    is_prompt: bool = False
    readouts: list[TokenReadout] = field(default_factory=list)
    finish: str | None = None  # "length" | "eos" | "stop" | "guard" on the last event
    guard: GuardHit | None = None  # with finish "guard" (the event withholds its token: token_id -1)
    queue_s: float | None = None  # on the first event, where the engine knows it: time queued before running
    top_logprobs: list[Alternative] = field(default_factory=list)  # sampling.logprobs of them, likeliest first


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
    max_model_len: int | None
    """tokens of context (prompt plus output), once started; None: no limit of the engine's own"""
    shape: ModelShape
    artifacts: Artifacts

    def tokenize(self, text: str | None = None, chat: list[dict[str, str]] | None = None) -> list[int]: ...

    def generate(self, request: EngineRequest) -> AsyncIterator[TokenEvent]:
        """Stream the request's events; closing the iterator cancels the request."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def pause(self) -> None:
        """Hold generation at a step boundary: once this returns no step runs until `resume`; requests in
        flight keep their state and new ones queue (vLLM's `pause_generation(mode="keep")`). Tests use it
        to act on requests at a known point instead of racing them."""
        ...

    async def resume(self) -> None:
        """Let a paused engine step again."""
        ...

    def healthy(self) -> bool:
        """False once the engine has died and will not serve again (the server then stops)."""
        ...

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

    def check_site(self, site: str) -> None:
        """Raise a domain error for a site this engine cannot steer."""
        ...
