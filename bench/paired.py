"""Paired ratios for interleaved benchmark rounds (one helper for every bench that interleaves)."""

from __future__ import annotations

import statistics


def paired(row: list[float], ref: list[float]) -> dict[str, float]:
    """Round by round, `row` over `ref` measured in the same round: the median ratio, and the lowest
    and highest. The machine's drift moves both rows of a round together, so their ratio is steadier
    than a ratio of two best-ofs."""
    ratios = sorted(a / b for a, b in zip(row, ref, strict=True))
    return {"median": round(statistics.median(ratios), 3), "min": round(ratios[0], 3), "max": round(ratios[-1], 3)}
