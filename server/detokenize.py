"""Incremental detokenisation with stop strings, linear in the sequence's length.

Each token costs O(its text + the longest stop string): the tokenizer's own
`DecodeStream` turns ids into new text (holding back an incomplete UTF-8
character), and only a tail that could still grow into a stop string is kept.
"""

from __future__ import annotations

from collections.abc import Callable

from tokenizers.decoders import DecodeStream


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
        """For a Hugging Face fast tokenizer; special tokens give no text."""
        stream, backend = DecodeStream(skip_special_tokens=True), tokenizer.backend_tokenizer
        return cls(lambda token_id: stream.step(backend, token_id), stop)

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
