"""Real English text that works offline: the docstrings of Python's standard library.

Every Python installation ships it, so nothing is downloaded. Extraction is
deterministic: source files in sorted order, parsed with `ast` (nothing is
imported), module/class/function docstrings of at least `min_chars` characters.
"""

from __future__ import annotations

import ast
import sysconfig
from collections.abc import Iterator
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


def token_windows(tokenizer, context: int, max_tokens: int, min_chars: int = 200) -> list[list[int]]:
    """Pack the corpus into windows of `context` tokens, up to `max_tokens` in all."""
    windows, buf = [], []
    for doc in stdlib_docstrings(min_chars):
        buf.extend(tokenizer(doc + "\n\n").input_ids)
        while len(buf) >= context:
            windows.append(buf[:context])
            buf = buf[context:]
            if len(windows) * context >= max_tokens:
                return windows
    return windows
