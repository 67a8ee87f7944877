"""Real English text that works offline: named sources, read deterministically.

| source   | what                                                                 | where it comes from |
| -------- | -------------------------------------------------------------------- | ------------------- |
| stdlib   | the standard library's docstrings (>= `min_chars`) and `pydoc_data.topics` | every Python install |
| wordnet  | every WordNet 3.0 synset as "lemma, lemma: gloss; examples"          | Debian `wordnet-base` |
| fortunes | quotations, jokes and verse, one per document                       | Debian `fortunes`, `fortunes-min` |

`stdlib` is the default: it needs nothing installed, so tests and CI read it everywhere
(it differs a little between Python versions). The varied sources (everyday words and
themes) are what the default SAE was trained on; install them with
`apt-get install wordnet-base fortunes fortunes-min`. `describe(sources)` records each
source's package version for an artifact's metadata.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from rudder.core.errors import InvalidArgument

WORDNET_DIR = Path("/usr/share/wordnet")
FORTUNES_DIR = Path("/usr/share/games/fortunes")


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


def stdlib(min_chars: int = 200) -> Iterator[str]:
    yield from stdlib_docstrings(min_chars)
    yield from reference_topics()


def wordnet_synset(line: str) -> str | None:
    """One line of a WordNet `data.*` file as text: "cat, true cat: feline mammal ...".

    The line is `offset lexfile pos n_words(hex) word lex_id ... | gloss`; license lines start with spaces.
    """
    if line.startswith(" ") or " | " not in line:
        return None
    head, gloss = line.split(" | ", 1)
    fields = head.split()
    n_words = int(fields[3], 16)
    words = [re.sub(r"\(.*\)$", "", w).replace("_", " ") for w in fields[4:4 + 2 * n_words:2]]
    return f"{', '.join(words)}: {gloss.strip()}"


def wordnet(group: int = 40) -> Iterator[str]:
    """Synsets of nouns, verbs, adjectives and adverbs, `group` per document (one per line)."""
    for pos in ("noun", "verb", "adj", "adv"):
        lines = [s for s in map(wordnet_synset, (WORDNET_DIR / f"data.{pos}").read_text(encoding="latin-1")
                                .splitlines()) if s]
        for i in range(0, len(lines), group):
            yield "\n".join(lines[i:i + group])


def fortunes() -> Iterator[str]:
    """Every fortune of every (inoffensive) file, in sorted file order; `%` separates them."""
    for path in sorted(p for p in FORTUNES_DIR.iterdir() if p.is_file() and not p.suffix):
        for text in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            text = text.strip().strip("%").strip()
            if len(text) >= 20:
                yield text


@dataclass(frozen=True)
class Source:
    read: Callable[[], Iterable[str]]
    needs: tuple[Path, ...] = ()
    """a file of each package the source reads"""
    packages: tuple[str, ...] = ()


SOURCES: dict[str, Source] = {
    "stdlib": Source(stdlib),
    "wordnet": Source(wordnet, (WORDNET_DIR / "data.noun",), ("wordnet-base",)),
    "fortunes": Source(fortunes, (FORTUNES_DIR / "fortunes", FORTUNES_DIR / "people"), ("fortunes", "fortunes-min")),
}
DEFAULT_SOURCES = ("stdlib",)


def check_sources(sources: Iterable[str]) -> list[str]:
    """The sources, each known and installed, or an error that says what to install."""
    out = []
    for name in sources:
        if name not in SOURCES:
            raise InvalidArgument(f"unknown corpus source {name!r}; known: {', '.join(SOURCES)}")
        src = SOURCES[name]
        missing = [str(p) for p in src.needs if not p.exists()]
        if missing:
            raise InvalidArgument(f"corpus source {name!r} needs {', '.join(missing)}: "
                                  f"apt-get install {' '.join(src.packages)}")
        out.append(name)
    return out


def describe(sources: Iterable[str]) -> dict[str, str]:
    """Each source with its provenance (Debian package versions, or the Python version)."""
    import platform

    out = {}
    for name in sources:
        pkgs = SOURCES[name].packages
        if not pkgs:
            out[name] = f"Python {platform.python_version()} standard library"
        elif shutil.which("dpkg-query"):
            res = subprocess.run(["dpkg-query", "-W", "-f", "${Package}=${Version} ", *pkgs],
                                 capture_output=True, text=True)
            out[name] = res.stdout.strip() or ", ".join(pkgs)
        else:
            out[name] = ", ".join(pkgs)
    return out


def documents(sources: Iterable[str] = DEFAULT_SOURCES) -> Iterator[str]:
    for name in check_sources(sources):
        yield from SOURCES[name].read()


def token_windows(tokenizer, context: int, max_tokens: int | None = None,
                  sources: Iterable[str] = DEFAULT_SOURCES) -> list[list[int]]:
    """Pack the corpus into windows of `context` tokens, up to `max_tokens` in all (None: everything).

    With several sources, their windows interleave (round-robin), so a `max_tokens` cap
    takes from each."""
    per_source = [_pack(tokenizer, SOURCES[name].read(), context) for name in check_sources(sources)]
    windows: list[list[int]] = []
    for row in _round_robin(per_source):
        windows.append(row)
        if max_tokens is not None and len(windows) * context >= max_tokens:
            break
    return windows


def _pack(tokenizer, docs: Iterable[str], context: int) -> Iterator[list[int]]:
    buf: list[int] = []
    for doc in docs:
        buf.extend(tokenizer(doc + "\n\n").input_ids)
        while len(buf) >= context:
            yield buf[:context]
            buf = buf[context:]


def _round_robin(iterators: list[Iterator[list[int]]]) -> Iterator[list[int]]:
    live = list(iterators)
    while live:
        for it in list(live):
            try:
                yield next(it)
            except StopIteration:
                live.remove(it)


@dataclass
class Split:
    train: list[list[int]]
    eval: list[list[int]]


def train_eval_split(tokenizer, context: int, eval_tokens: int, max_tokens: int | None = None,
                     sources: Iterable[str] = DEFAULT_SOURCES) -> Split:
    """The corpus' windows; every k-th window (spread over it) is held out until `eval_tokens` are."""
    windows = token_windows(tokenizer, context, max_tokens, sources)
    n_eval = min(-(-eval_tokens // context), len(windows) // 2) if eval_tokens else 0
    if n_eval == 0:
        return Split(windows, [])
    stride = len(windows) // n_eval
    held = set(range(stride - 1, len(windows), stride)[:n_eval])
    return Split([w for i, w in enumerate(windows) if i not in held], [windows[i] for i in sorted(held)])
