"""Feature metadata: what a feature (or code) of an SAE or codebook stands for.

Written by the trainers next to the artifact (`feature_metadata.json`: an SAE's folder,
or `<codebook model>/<codebook id>/`) and read by the server for feature search.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from rudder.core.errors import InvalidArgument

FEATURE_METADATA = "feature_metadata.json"
OUTPUT_SCORES = "output_scores.safetensors"
"""per-feature output scores and logit-lens tokens (rudder.analysis.output_scores)"""


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


def load_output_scores(folder: Path) -> tuple[Tensor, Tensor] | None:
    """(scores, logit-lens tokens) cached in the SAE folder, or None."""
    path = folder / OUTPUT_SCORES
    if not path.exists():
        return None
    from safetensors.torch import load_file

    t = load_file(str(path))
    return t["score"], t["logit_lens_top"].long()


def rank_by_effect(scores: Tensor, top: Tensor, decode: Callable[[int], str], says: str,
                   limit: int | None = None) -> list[tuple[int, float, list[str]]]:
    """Features whose logit-lens tokens include one matching the regex `says` (the token's text,
    stripped, matched whole and case-insensitive), best output score first: (id, score, matching tokens)."""
    try:
        pattern = re.compile(rf"(?i)(?:{says})")
    except re.error as e:
        raise InvalidArgument(f"says={says!r} does not compile: {e}") from e
    texts: dict[int, str] = {}
    hits = []
    for feature in torch.argsort(scores, descending=True).tolist():
        words = []
        for t in top[feature].tolist():
            if t not in texts:
                texts[t] = decode(t).strip()
            if texts[t] and pattern.fullmatch(texts[t]):
                words.append(texts[t])
        if words:
            hits.append((feature, float(scores[feature]), words))
            if limit is not None and len(hits) == limit:
                break
    return hits
