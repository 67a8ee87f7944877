"""Atomic writes: an artifact (a folder or one file) is either the old one, the new one, or absent."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path


def replace_dir(staging: Path, target: Path) -> None:
    """Move the finished folder `staging` to `target`, replacing what was there."""
    if target.exists():
        backup = target.with_name(f".{target.name}.old")
        shutil.rmtree(backup, ignore_errors=True)
        target.rename(backup)
        staging.rename(target)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        staging.rename(target)


def replace_file(target: Path, write: Callable[[Path], object]) -> Path:
    """`write(tmp)` a file next to `target`, then rename it over `target` (a reader never sees half a file)."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def sha256_files(files: Sequence[Path], h=None) -> str:
    """SHA-256 over the files' bytes, in the order given (read 4 MiB at a time)."""
    h = h or hashlib.sha256()
    for path in files:
        with Path(path).open("rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()
