"""Real English text that works offline: named sources, read deterministically.

| source   | what                                                                 | where it comes from |
| -------- | -------------------------------------------------------------------- | ------------------- |
| stdlib   | the standard library's docstrings (>= `min_chars`) and `pydoc_data.topics` | every Python install |
| wordnet  | every WordNet 3.0 synset as "lemma, lemma: gloss; examples"          | Debian `wordnet-base` |
| fortunes | quotations, jokes and verse, one per document                       | Debian `fortunes`, `fortunes-min` |

`stdlib` is the default: it needs nothing installed, so tests and CI read it everywhere
(it differs a little between Python versions). The varied sources (everyday words and
themes) are what the default SAE was trained on; install them with
`apt-get install wordnet-base fortunes fortunes-min`.

Any other entry is the user's own data (`DataSource`; a plain string is its path, format by suffix):

| format   | what                                                       | read with |
| -------- | ---------------------------------------------------------- | --------- |
| text     | a file or glob (`data/*.txt`), a document per file         | open(), 1 MB at a time |
| jsonl    | JSON lines, the text in `column` (default "text")          | json, line by line |
| parquet  | the text in `column`                                       | pyarrow, batch by batch |
| hf_disk  | a dataset saved with `save_to_disk` (`split` of a dict)    | datasets.load_from_disk |
| hf       | `hf:NAME`: `load_dataset(NAME, split=split)`, offline from its cache | datasets |
| tokens   | token ids: `.npy` (1-D, or a row per sequence), raw `.bin` (`dtype`) | numpy memmap |

A `column` of lists of ids (`input_ids`, as SAELens' pre-tokenized datasets) is read as tokens.
Each is read as a stream, in file order (reading does not grow with the source; the trainers pack
the windows to a temporary file and read them back as drawn, so their memory does not either). Text is tokenized as the
tokenizer does by default (SmolLM2's adds no BOS; SAELens prepends one to each context), with a
blank line after each document; token ids are used as given, and an id outside the model's
vocabulary is an error. `describe(sources)` records each source's provenance for an artifact's metadata:
package versions, or a file's size and SHA-256, or a dataset's fingerprint.
"""

from __future__ import annotations

import ast
import glob
import json
import re
import shutil
import subprocess
import sysconfig
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from rudder.core.errors import InvalidArgument
from rudder.core.fileio import sha256_files

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


class DataSource(BaseModel):
    """The user's own data (the table above). In a config: `corpus: [{path: data.jsonl, column: body}]`,
    or just the path: `corpus: [data/*.txt]`."""

    model_config = ConfigDict(extra="forbid")
    path: str = Field(..., description="file, glob, dataset folder, or hf:NAME")
    format: Literal["auto", "text", "jsonl", "parquet", "hf_disk", "hf", "tokens"] = Field(
        "auto", description="auto: by the path (.txt/.md or a glob: text, .jsonl, .parquet, .npy/.bin: tokens, "
                            "a saved dataset folder: hf_disk, hf:NAME: hf)")
    column: str = Field("text", description="the text column (jsonl, parquet, datasets); input_ids: token ids")
    split: str = Field("train", description="the split of a DatasetDict or of load_dataset")
    dtype: Literal["uint16", "uint32", "int32", "int64"] = Field("uint16", description="the ids of a raw .bin")

    @property
    def name(self) -> str:
        return self.path

    def kind(self) -> str:
        if self.format != "auto":
            return self.format
        if self.path.startswith("hf:"):
            return "hf"
        path = Path(self.path)
        if path.is_dir():
            return "hf_disk"
        suffix = path.suffix.lower()
        return {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".npy": "tokens",
                ".bin": "tokens"}.get(suffix, "text")

    def files(self) -> list[Path]:
        return [Path(p) for p in sorted(glob.glob(self.path))] if glob.has_magic(self.path) else [Path(self.path)]


Spec = str | DataSource
"""a corpus entry: a built-in source's name, a path (a DataSource with every default), or a DataSource"""


def as_source(spec: Spec) -> str | DataSource:
    """A built-in's name stays a name; any other string is the path of a DataSource."""
    if isinstance(spec, DataSource) or spec in SOURCES:
        return spec
    return DataSource(path=spec)


PIECE = 1 << 20  # characters of a text file read at a time


class Piece(str):
    """A piece of a text file that the file continues after (packing adds no document break)."""


def _read_text(files: Sequence[Path]) -> Iterator[str]:
    for path in files:
        with path.open(encoding="utf-8", errors="replace") as f:
            piece = f.read(PIECE)
            while piece:
                piece += f.readline() if len(piece) == PIECE else ""  # end a piece at a line end
                following = f.read(PIECE)
                yield Piece(piece) if following else piece
                piece = following


def _no_column(where: str, column: str, have: str) -> InvalidArgument:
    return InvalidArgument(f"{where}: no column {column!r} (it has: {have}); set the source's column")


def _read_jsonl(src: DataSource, files: Sequence[Path]) -> Iterator[str]:
    for path in files:
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InvalidArgument(f"{path}:{n}: not JSON ({e.msg}); give one JSON object per line") from None
                if not isinstance(row, dict) or src.column not in row:
                    keys = ", ".join(row) if isinstance(row, dict) else type(row).__name__
                    raise _no_column(f"{path}:{n}", src.column, keys)
                value = row[src.column]
                if value is not None:  # a null row is skipped
                    yield value if isinstance(value, list) else str(value)


def _read_parquet(src: DataSource, files: Sequence[Path]) -> Iterator[str | list[int]]:
    import pyarrow.parquet as pq

    for path in files:
        f = pq.ParquetFile(path)
        if src.column not in f.schema_arrow.names:
            raise _no_column(str(path), src.column, ", ".join(f.schema_arrow.names))
        for batch in f.iter_batches(batch_size=1024, columns=[src.column]):
            yield from (v for v in batch.column(0).to_pylist() if v is not None)


def _dataset(src: DataSource):
    import datasets

    if src.kind() == "hf":
        try:
            return datasets.load_dataset(src.path.removeprefix("hf:"), split=src.split)
        except Exception as e:  # the hub, the cache and the builders raise many kinds
            raise InvalidArgument(f"datasets.load_dataset({src.path.removeprefix('hf:')!r}, split={src.split!r}) "
                                  f"failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}; offline, "
                                  "it must be in the datasets cache (or save it with save_to_disk and give "
                                  "the folder)") from None
    try:
        ds = datasets.load_from_disk(src.path)
    except FileNotFoundError:
        raise InvalidArgument(f"{src.path} is not a dataset saved with save_to_disk; give its folder") from None
    if isinstance(ds, datasets.DatasetDict):
        if src.split not in ds:
            raise InvalidArgument(f"{src.path} has no split {src.split!r} (it has: {', '.join(ds)}); set split")
        ds = ds[src.split]
    return ds


def _read_dataset(src: DataSource) -> Iterator[str | list[int]]:
    ds = _dataset(src)
    if src.column not in ds.column_names:
        raise _no_column(src.path, src.column, ", ".join(ds.column_names))
    for batch in ds.select_columns([src.column]).iter(batch_size=1024):  # memory-mapped Arrow: flat memory
        yield from (v for v in batch[src.column] if v is not None)


TOKEN_PIECE = 1 << 16  # ids of a 1-D token array handed to packing at a time


def _read_tokens(src: DataSource, files: Sequence[Path]) -> Iterator[list[int]]:
    for path in files:
        arr = np.load(path, mmap_mode="r") if path.suffix == ".npy" else np.memmap(path, dtype=src.dtype, mode="r")
        if arr.ndim == 1:
            for i in range(0, len(arr), TOKEN_PIECE):
                yield arr[i:i + TOKEN_PIECE].tolist()
        else:
            for row in arr:
                yield row.tolist()


def read(spec: Spec) -> Iterator[str | list[int]]:
    """A source's documents in order: text, or lists of token ids (pre-tokenized sources)."""
    src = as_source(spec)
    if isinstance(src, str):
        yield from SOURCES[src].read()
        return
    kind = src.kind()
    if kind in ("hf", "hf_disk"):
        yield from _read_dataset(src)
        return
    files = src.files()
    yield from {"text": lambda: _read_text(files), "jsonl": lambda: _read_jsonl(src, files),
                "parquet": lambda: _read_parquet(src, files), "tokens": lambda: _read_tokens(src, files)}[kind]()


def check_sources(sources: Iterable[Spec]) -> list[str | DataSource]:
    """The sources, each known and readable, or an error that says what to do: a built-in not
    installed, a file or glob that matches nothing, a column a file lacks, an empty source."""
    out: list[str | DataSource] = []
    for spec in sources:
        src = as_source(spec)
        if isinstance(src, str):
            missing = [str(p) for p in SOURCES[src].needs if not p.exists()]
            if missing:
                raise InvalidArgument(f"corpus source {src!r} needs {', '.join(missing)}: "
                                      f"apt-get install {' '.join(SOURCES[src].packages)}")
        else:
            kind = src.kind()
            if kind not in ("hf", "hf_disk"):
                files = src.files()
                if not files or not all(f.is_file() for f in files):
                    raise InvalidArgument(
                        f"corpus source {src.path!r} is not a built-in ({', '.join(SOURCES)}) nor an existing "
                        "file, glob, dataset folder or hf:NAME; check the path")
            try:
                next(read(src))  # the first document: a missing column, a bad file, an empty source fail here
            except StopIteration:
                raise InvalidArgument(f"corpus source {src.path!r} holds no {'rows' if kind != 'text' else 'text'}; "
                                      "give a non-empty one") from None
        out.append(src)
    return out


def describe(sources: Iterable[Spec]) -> dict[str, str | dict]:
    """Each source with its provenance: Debian package versions or the Python version for the
    built-ins; format, files, bytes and SHA-256 for files; the fingerprint for datasets."""
    import platform

    out: dict[str, str | dict] = {}
    for spec in sources:
        src = as_source(spec)
        if isinstance(src, DataSource):
            info: dict = {"format": src.kind(), "column": src.column}
            if src.kind() in ("hf", "hf_disk"):
                ds = _dataset(src)
                info.update(split=src.split, rows=len(ds), fingerprint=ds._fingerprint)
            else:
                files = src.files()
                info.update(files=len(files), bytes=sum(f.stat().st_size for f in files), sha256=sha256_files(files))
            out[src.path] = info
            continue
        pkgs = SOURCES[src].packages
        if not pkgs:
            out[src] = f"Python {platform.python_version()} standard library"
        elif shutil.which("dpkg-query"):
            res = subprocess.run(["dpkg-query", "-W", "-f", "${Package}=${Version} ", *pkgs],
                                 capture_output=True, text=True)
            out[src] = res.stdout.strip() or ", ".join(pkgs)
        else:
            out[src] = ", ".join(pkgs)
    return out


def documents(sources: Iterable[Spec] = DEFAULT_SOURCES) -> Iterator[str | list[int]]:
    for src in check_sources(sources):
        yield from read(src)


def iter_windows(tokenizer, context: int, max_tokens: int | None = None,
                 sources: Iterable[Spec] = DEFAULT_SOURCES) -> Iterator[list[int]]:
    """Pack the corpus into windows of `context` tokens, up to `max_tokens` in all (None: everything).

    With several sources, their windows interleave (round-robin), so a `max_tokens` cap
    takes from each."""
    per_source = [_pack(tokenizer, read(src), context, src) for src in check_sources(sources)]
    n = 0
    for row in _round_robin(per_source):
        yield row
        n += 1
        if max_tokens is not None and n * context >= max_tokens:
            return


def token_windows(tokenizer, context: int, max_tokens: int | None = None,
                  sources: Iterable[Spec] = DEFAULT_SOURCES) -> list[list[int]]:
    return list(iter_windows(tokenizer, context, max_tokens, sources))


def _pack(tokenizer, docs: Iterable[str | list[int]], context: int, src: Spec = "") -> Iterator[list[int]]:
    """Documents joined into `context`-token windows: text tokenized with a blank line after each
    (no special tokens: the tokenizer's own, if it adds any, stay), token ids as given."""
    vocab = len(tokenizer)
    buf: list[int] = []
    for doc in docs:
        if isinstance(doc, str):
            buf.extend(tokenizer(doc if isinstance(doc, Piece) else doc + "\n\n").input_ids)
        else:
            ids = np.asarray(doc)
            if ids.size and (ids.max() >= vocab or ids.min() < 0):
                bad = int(ids.max()) if ids.max() >= vocab else int(ids.min())
                name = src.path if isinstance(src, DataSource) else src
                raise InvalidArgument(f"token id {bad} in {name} is outside the model's vocabulary (0..{vocab - 1}); "
                                      "were these ids made by another tokenizer?")
            buf.extend(ids.tolist())
        start = 0
        while len(buf) - start >= context:  # windows by offset: one copy of the rest per document, not per window
            yield buf[start:start + context]
            start += context
        del buf[:start]


def _round_robin(iterators: list[Iterator[list[int]]]) -> Iterator[list[int]]:
    live = list(iterators)
    while live:
        for it in list(live):
            try:
                yield next(it)
            except StopIteration:
                live.remove(it)


class Windows:
    """Packed token windows kept on disk (an unlinked temporary file of int32 rows) and read on
    demand with `pread`, so a trainer's resident memory does not grow with its source. Indexing by
    an int, a slice, or a sequence / tensor of ints gives an int64 tensor of rows."""

    def __init__(self, context: int, folder: str | Path | None = None):
        import tempfile

        self.context, self.row_bytes = context, 4 * context
        self._file = tempfile.TemporaryFile(dir=folder)  # gone when closed or when the process ends
        self._rows = np.arange(0, dtype=np.int64)  # the file rows this view holds, in order
        self._appended: list[np.ndarray] = []  # joined to _rows when next read: appends stay O(block)

    @property
    def rows(self) -> np.ndarray:
        if self._appended:
            self._rows = np.concatenate([self._rows, *self._appended])
            self._appended.clear()
        return self._rows

    def append(self, block: Sequence[list[int]]) -> None:
        a = np.asarray(block, dtype=np.int32).reshape(-1, self.context)
        self._file.seek(0, 2)
        start = self._file.tell() // self.row_bytes
        self._file.write(a.tobytes())
        self._appended.append(np.arange(start, start + len(a)))

    def view(self, rows: np.ndarray) -> Windows:
        """The same file, these of its rows (indices into this view)."""
        out = object.__new__(Windows)
        out.context, out.row_bytes, out._file = self.context, self.row_bytes, self._file
        out._rows, out._appended = self.rows[rows], []
        return out

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.context)

    def __getitem__(self, index) -> torch.Tensor:
        import os

        if isinstance(index, int):
            return self[[index]][0]
        picked = self.rows[index] if isinstance(index, slice) else self.rows[np.asarray(index, dtype=np.int64)]
        self._file.flush()
        fd = self._file.fileno()
        data = b"".join(os.pread(fd, self.row_bytes, int(r) * self.row_bytes) for r in picked)
        return torch.from_numpy(np.frombuffer(data, dtype=np.int32).reshape(-1, self.context).astype(np.int64))

    def tolist(self) -> list[list[int]]:
        return self[:].tolist()


@dataclass
class Split:
    train: Windows  # on disk: rows read as they are drawn
    eval: list[list[int]]


def train_eval_split(tokenizer, context: int, eval_tokens: int, max_tokens: int | None = None,
                     sources: Iterable[Spec] = DEFAULT_SOURCES) -> Split:
    """The corpus' windows; every k-th window (spread over it) is held out until `eval_tokens` are.
    The windows are packed to a temporary file as they come: memory stays flat however large the
    source (the file takes 4 bytes a token on disk)."""
    windows, block = Windows(context), []
    for row in iter_windows(tokenizer, context, max_tokens, sources):
        block.append(row)
        if len(block) == 4096:
            windows.append(block)
            block = []
    if block:
        windows.append(block)
    n_eval = min(-(-eval_tokens // context), len(windows) // 2) if eval_tokens else 0
    if n_eval == 0:
        return Split(windows, [])
    stride = len(windows) // n_eval
    held = np.arange(stride - 1, len(windows), stride)[:n_eval]
    keep = np.ones(len(windows), dtype=bool)
    keep[held] = False
    return Split(windows.view(np.flatnonzero(keep)), windows[held].tolist())
