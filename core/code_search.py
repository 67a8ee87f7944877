"""Code search: which codes fire where a pattern holds (Codebook Features §3, the reference's code search).

For a boolean label per token position (a regex match, a TokFSM state, ...) and the
active code ids at every position, each code gets

    precision = P(label | code active)      hits / positions where the code fired
    recall    = P(code active | label)      hits / labelled positions

A regex labels the tokens on which a match ends (the token holding the match's last
character): that is where the model has seen the pattern and the code can say so.

A code index (`code_index.safetensors` beside the codebooks) stores held-out token
ids and, per codebook, their active codes (N, L, G, k); the server searches it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

INDEX_FILE = "code_index.safetensors"


@dataclass(frozen=True)
class CodeHit:
    head: int
    code: int
    precision: float
    recall: float
    count: int  # positions where the code fired


def regex_labels(token_texts: list[list[str]], pattern: re.Pattern) -> Tensor:
    """(N, L) bool: token t is labelled when some match of `pattern` ends inside it, i.e. when the
    text read up to one of its characters ends with a match. Matches may overlap, and a
    pattern anchored at the start (`<bos>(?:\\d\\d)*07`) labels every aligned occurrence."""
    suffix = re.compile(f"(?:{pattern.pattern})\\Z", pattern.flags)
    n, length = len(token_texts), max((len(t) for t in token_texts), default=0)
    out = torch.zeros(n, length, dtype=torch.bool)
    for i, tokens in enumerate(token_texts):
        text = "".join(tokens)
        start = 0
        for t, tok in enumerate(tokens):
            end = start + len(tok)
            out[i, t] = any(suffix.search(text, 0, e) for e in range(start + 1, end + 1))
            start = end
    return out


def precision_recall(ids: Tensor, labels: Tensor, num_codes: int) -> tuple[Tensor, Tensor, Tensor]:
    """ids (N, L, G, k) active codes, labels (N, L) bool -> precision, recall, count, each (G, num_codes)."""
    n, length, groups, k = ids.shape
    flat = ids.long().permute(2, 0, 1, 3).reshape(groups, -1)  # (G, N·L·k)
    lab = labels[:, :, None].expand(n, length, k).reshape(-1).to(torch.long)
    count = torch.zeros(groups, num_codes, dtype=torch.long).scatter_add_(1, flat, torch.ones_like(flat))
    hits = torch.zeros(groups, num_codes, dtype=torch.long).scatter_add_(1, flat, lab.expand(groups, -1).contiguous())
    precision = hits / count.clamp(min=1)
    recall = hits / max(int(labels.sum()), 1)
    return precision, recall, count


def search(ids: Tensor, labels: Tensor, num_codes: int, min_precision: float = 0.0, min_recall: float = 0.0,
           min_count: int = 1) -> list[CodeHit]:
    """Codes that fired at least `min_count` times, best precision first (then recall)."""
    precision, recall, count = precision_recall(ids, labels, num_codes)
    keep = (count >= min_count) & (precision >= min_precision) & (recall >= min_recall)
    hits = [CodeHit(g, c, precision[g, c].item(), recall[g, c].item(), int(count[g, c]))
            for g, c in keep.nonzero().tolist()]
    return sorted(hits, key=lambda h: (-h.precision, -h.recall, h.head, h.code))


@dataclass
class CodeIndex:
    tokens: Tensor  # (N, L) token ids
    ids: dict[str, Tensor]  # codebook id -> (N, L, G, k) active codes

    def save(self, folder: str | Path) -> None:
        def small(t: Tensor) -> Tensor:  # int16 where it fits: the index ships beside the model
            return t.to(torch.int16 if int(t.max()) < 2**15 else torch.int32).contiguous()

        save_file({"tokens": small(self.tokens)} | {f"{k}.ids": small(v) for k, v in self.ids.items()},
                  Path(folder) / INDEX_FILE)

    @classmethod
    def load(cls, folder: str | Path) -> CodeIndex | None:
        path = Path(folder) / INDEX_FILE
        if not path.exists():
            return None
        raw = load_file(path)
        return cls(raw.pop("tokens").long(), {k.removesuffix(".ids"): v.long() for k, v in raw.items()})
