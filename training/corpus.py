"""Real English text that works offline, shipped with every Python installation.

Two sources, read deterministically and never imported as code:

- the docstrings of the standard library (source files in sorted order, parsed with
  `ast`; module, class and function docstrings of at least `min_chars` characters);
- `pydoc_data.topics`, the Python Language Reference's sections as `help()` shows them.

On CPython 3.11 that is about 2,200 docstrings (1.2 M characters) and 79 reference
sections (0.46 M characters): ~390 k tokens with the default model's tokenizer.
Nothing is downloaded, so CI and air-gapped machines train on the same text.
"""

from __future__ import annotations

import ast
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def stdlib_docstrings(min_chars: int = 200) -> Iterator[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if rel[0] in ("site-packages", "test", "idlelib", "lib2to3") or "tests" in rel:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    yield doc


def reference_topics() -> Iterator[str]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name]


def documents(min_chars: int = 200) -> Iterator[str]:
    yield from stdlib_docstrings(min_chars)
    yield from reference_topics()


def token_windows(tokenizer, context: int, max_tokens: int | None = None, min_chars: int = 200) -> list[list[int]]:
    """Pack the corpus into windows of `context` tokens, up to `max_tokens` in all (None: everything)."""
    windows, buf = [], []
    for doc in documents(min_chars):
        buf.extend(tokenizer(doc + "\n\n").input_ids)
        while len(buf) >= context:
            windows.append(buf[:context])
            buf = buf[context:]
            if max_tokens is not None and len(windows) * context >= max_tokens:
                return windows
    return windows


@dataclass
class Split:
    train: list[list[int]]
    eval: list[list[int]]


def train_eval_split(tokenizer, context: int, eval_tokens: int, max_tokens: int | None = None) -> Split:
    """The corpus' windows; every k-th window (spread over it) is held out until `eval_tokens` are."""
    windows = token_windows(tokenizer, context, max_tokens)
    n_eval = min(-(-eval_tokens // context), len(windows) // 2) if eval_tokens else 0
    if n_eval == 0:
        return Split(windows, [])
    stride = len(windows) // n_eval
    held = set(range(stride - 1, len(windows), stride)[:n_eval])
    return Split([w for i, w in enumerate(windows) if i not in held], [windows[i] for i in sorted(held)])
