"""The per-sequence pipeline every backend shares: token events, text, and when a sequence ends.

A backend samples (or lets its engine sample) and hands each token to its
request's `Sequence`; the `Sequence` decodes the text, decides the finish
(EOS, stop string, max_tokens, or the engine's own reason) and builds the event.
"""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import AutoConfig, GenerationConfig

from rudder.server.backends.base import Alternative, EngineRequest, GuardHit, TokenEvent, TokenReadout
from rudder.server.backends.step import broken_steering
from rudder.server.detokenize import IncrementalDetokenizer

log = logging.getLogger(__name__)

FINISH_REASONS = ("eos", "stop", "length")


def eos_ids(tokenizer, model_dir: str | Path) -> frozenset[int]:
    """The ids that end a sequence: the generation config's `eos_token_id` (an int or a list;
    config.json's where there is no generation_config.json) and the tokenizer's EOS, as vLLM
    stops on both."""
    try:
        eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
    except OSError:  # no generation_config.json
        eos = GenerationConfig.from_model_config(AutoConfig.from_pretrained(model_dir)).eos_token_id
    ids = {eos} if isinstance(eos, int) else set(eos or ())
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


class Sequence:
    """One request's events, the same on every backend."""

    def __init__(self, request: EngineRequest, tokenizer, eos: frozenset[int]):
        self.request = request
        self.prompt_len = len(request.prompt_ids)
        self.generated = 0
        self.output_ids: list[int] = []  # generated so far (the reference backend's penalties read them)
        self.finish: str | None = None
        self._tokenizer = tokenizer
        self._eos = frozenset() if request.sampling.ignore_eos else eos
        self._detok = IncrementalDetokenizer.for_tokenizer(tokenizer, request.sampling.stop)

    @property
    def reads_prompt(self) -> bool:
        """Whether an event goes out for every prompt token (a trace, or prompt readouts asked for)."""
        return self.request.steering.readouts.include_prompt  # a trace sets it (EngineRequest)

    def prompt_event(self, t: int, readouts: list[TokenReadout]) -> TokenEvent:
        token = self.request.prompt_ids[t]
        return TokenEvent(token, t, self._tokenizer.decode([token]), is_prompt=True, readouts=readouts)

    # The per-row rules every backend follows. A backend that reads the prompt calls `prompt_row` for
    # each prompt row in order, and stops once `prompt_done`; then, for each row that chooses a token
    # (at `row_position`), `ends_at_row` first, and `token` only when that returns None.

    def guards_prompt_row(self, t: int) -> bool:
        """Whether a guard firing at prompt row `t` ends the sequence there: before the last prompt row
        (the last row chooses the first token, and its guard is `ends_at_row`'s), and not in a trace."""
        return t < self.prompt_len - 1 and not self.request.trace

    def prompt_row(self, t: int, readouts: list[TokenReadout], hit: GuardHit | None = None,
                   broken: bool = False) -> list[TokenEvent]:
        """The events of prompt row `t`: its prompt event, and the guarded end when `hit` (a guard that
        fired there, where `guards_prompt_row(t)`). A row whose steering overflowed raises instead:
        no event goes out for an overflowed prompt."""
        if broken:
            raise broken_steering(t)
        events = [self.prompt_event(t, readouts)]
        if hit is not None and self.guards_prompt_row(t):
            events.append(self.guarded(hit, readouts))
        return events

    @property
    def prompt_done(self) -> bool:
        """Whether the prompt's events are the last: a trace, or a guard fired in the prompt."""
        return self.request.trace or self.finish is not None

    @property
    def row_position(self) -> int:
        """The position of the row whose logits choose the next token."""
        return self.prompt_len + self.generated - 1

    def ends_at_row(self, readouts: list[TokenReadout], hit: GuardHit | None = None,
                    broken: bool = False) -> TokenEvent | None:
        """Before a token is taken from the row at `row_position`: raises if the row's steering
        overflowed; the guarded end (withholding the token) if a guard fired there; None: go on."""
        if broken:
            raise broken_steering(self.row_position)
        return self.guarded(hit, readouts) if hit is not None else None

    def guarded(self, hit: GuardHit, readouts: list[TokenReadout]) -> TokenEvent:
        """The last event of a sequence a guard stopped: the token the guarded position chose is
        withheld (id -1, no text), the readouts are the guarded position's."""
        if self.finish is not None:
            raise RuntimeError(f"a guard after the sequence finished ({self.finish})")
        self.finish = "guard"
        return TokenEvent(-1, self.prompt_len + self.generated, "", readouts=readouts, finish="guard", guard=hit)

    def token(self, token_id: int, logprob: float, readouts: list[TokenReadout],
              engine_finish: str | None = None, top: list[tuple[int, float]] = ()) -> TokenEvent:
        """The event for the next generated token, with `finish` set when the sequence ends at it.

        `engine_finish` is the engine's own reason for stopping here (one of FINISH_REASONS),
        honoured when Rudder's checks did not already end the sequence: an EOS the engine knows
        of, or the context length. `top`: the likeliest (id, logprob) pairs, when the request asks for them."""
        if self.finish is not None:
            raise RuntimeError(f"a token after the sequence finished ({self.finish})")
        if engine_finish is not None and engine_finish not in FINISH_REASONS:
            raise ValueError(f"unknown finish reason {engine_finish!r}")
        self.generated += 1
        self.output_ids.append(token_id)
        is_eos = token_id in self._eos
        text = "" if is_eos else self._detok.add(token_id)
        finish = ("eos" if is_eos else "stop" if self._detok.stopped
                  else "length" if self.generated >= self.request.sampling.max_tokens else engine_finish)
        if finish in ("eos", "length"):
            text += self._detok.flush()
        self.finish = finish
        alternatives = [Alternative(i, lp, self._tokenizer.decode([i])) for i, lp in top]
        return TokenEvent(token_id, self.prompt_len + self.generated - 1, text, logprob, readouts=readouts,
                          finish=finish, top_logprobs=alternatives)
