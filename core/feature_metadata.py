"""Feature metadata: what a feature (or code) of an SAE or codebook stands for.

Written by the trainers next to the artifact (`feature_metadata.json`: an SAE's folder,
or `<codebook model>/<codebook id>/`) and read by the server for feature search.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

FEATURE_METADATA = "feature_metadata.json"


@dataclass
class FeatureMeta:
    id: int
    label: str = ""
    density: float = 0.0
    top_examples: list[str] = field(default_factory=list)
    max_activation: float = 0.0
    head: int = 0


def read_feature_metadata(folder: Path) -> list[FeatureMeta] | None:
    """The features described in `folder`, or None if it has no metadata file."""
    path = folder / FEATURE_METADATA
    if not path.exists():
        return None
    return [FeatureMeta(**f) for f in json.loads(path.read_text())["features"]]
