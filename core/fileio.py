"""Atomic folder writes: an artifact is either the old one, the new one, or absent."""

from __future__ import annotations

import shutil
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
