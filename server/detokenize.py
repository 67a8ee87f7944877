"""Incremental detokenisation with stop strings, linear in the sequence's length.

Each token costs O(its text + the longest stop string): the tokenizer's own
`DecodeStream` turns ids into new text (holding back an incomplete UTF-8
character), and only a tail that could still grow into a stop string is kept.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from tokenizers.decoders import DecodeStream

log = logging.getLogger(__name__)
WINDOW = 6  # tokens of context the fallback decodes a new token with


class IncrementalDetokenizer:
    """Feeds generated token ids, returns the new text of each; finds stop strings.

    `step(token_id)` gives the text a token adds (None or "" while a character is
    incomplete). Text that could be the start of a stop string is held back, so a
    stop string is never streamed, even split across tokens.
    """

    def __init__(self, step: Callable[[int], str | None], stop: tuple[str, ...] = ()):
        self._step = step
        self.stop = tuple(s for s in stop if s)
        self._held = ""  # decoded, not yet returned: a suffix that is a proper prefix of a stop string
        self.stopped = False

    @classmethod
    def for_tokenizer(cls, tokenizer, stop: tuple[str, ...] = ()) -> IncrementalDetokenizer:
        """For a Hugging Face tokenizer; special tokens give no text."""
        return cls(_TokenizerStep(tokenizer), stop)

    def add(self, token_id: int) -> str:
        text = self._held + (self._step(token_id) or "")
        if not self.stop:
            self._held = ""
            return text
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return text[:min(hits)]
        # The held-back tail is short, so a stop string can only start inside `text`.
        keep = max((n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        self._held = text[len(text) - keep:]
        return text[:len(text) - keep]

    def flush(self) -> str:
        """The held-back tail, once the sequence ended for another reason than a stop string."""
        out, self._held = ("" if self.stopped else self._held), ""
        return out


class _TokenizerStep:
    """A token's new text: tokenizers' `DecodeStream` where the tokenizer has a Rust backend.

    Without one, or if `DecodeStream` refuses a sequence, a short window is decoded instead
    (the new token with a few before it, minus the text of those few), which is linear too."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.shown = 0  # ids whose text has been returned
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.stream = DecodeStream(skip_special_tokens=True) if backend is not None else None
        self.backend = backend

    def __call__(self, token_id: int) -> str | None:
        self.ids.append(token_id)
        if self.stream is not None:
            try:
                text = self.stream.step(self.backend, token_id)
            except Exception as e:  # tokenizers raises for decoders whose text is not prefix-stable
                log.warning("streaming decode failed (%s); decoding by window from here", e)
                self.stream = None
                self.shown = len(self.ids) - 1
            else:
                if text:
                    self.shown = len(self.ids)
                return text
        return self._window()

    def _window(self) -> str | None:
        start = max(0, self.shown - WINDOW)
        before = self.tokenizer.decode(self.ids[start:self.shown], skip_special_tokens=True)
        full = self.tokenizer.decode(self.ids[start:], skip_special_tokens=True)
        if full.endswith("\ufffd") or len(full) <= len(before):  # an incomplete character: wait
            return None
        self.shown = len(self.ids)
        return full[len(before):]
