"""Incremental detokenisation with stop strings, for backends that sample themselves."""

from __future__ import annotations


class IncrementalDetokenizer:
    """Feeds generated token ids, returns the new text of each; finds stop strings.

    Decoding the whole suffix each time keeps multi-byte characters and merged
    spaces right; text ending in an incomplete character is held back.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already returned
        self.stopped = False

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.stop:
            # Search from just before the new text so a stop string split across tokens is found.
            start = max(0, self.emitted - max(len(s) for s in self.stop))
            hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.stopped = True
                end = min(hits)
                new = text[self.emitted:end] if end > self.emitted else ""
                self.emitted = max(self.emitted, end)
                return new
        if text.endswith("\ufffd"):
            return ""
        # Hold back a tail that could still grow into a stop string.
        safe = len(text) - max((n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        new = text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return new

    def flush(self) -> str:
        """The held-back tail, once the sequence ended for another reason than a stop string."""
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        new, self.emitted = text[self.emitted:], len(text)
        return new
