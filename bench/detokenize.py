"""Per-token cost of streaming detokenisation as a sequence grows: Rudder's detokenizer
(tokenizers' DecodeStream + a bounded stop-string tail) against re-decoding the whole
sequence at every token (what Rudder did before, and what a naive server does).

    .venv/bin/python bench/detokenize.py [--tokens 2000] [--repeats 5]

Prints a table of microseconds per token by position bucket and writes
bench/results/detokenize.json. One thread; best of `--repeats` interleaved runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from transformers import AutoTokenizer

from rudder.core.default_model import default_model_dir
from rudder.server.detokenize import IncrementalDetokenizer

STOP = ("\n\nUser:", "</answer>")
BUCKETS = [(10, 20), (100, 120), (500, 520), (1000, 1020), (1980, 2000)]


def redecode_costs(tokenizer, ids: list[int]) -> list[float]:
    """The old way: decode the whole generated sequence again for every new token."""
    costs, seen = [], 0
    for n in range(1, len(ids) + 1):
        t0 = time.perf_counter()
        text = tokenizer.decode(ids[:n], skip_special_tokens=True)
        _ = text[seen:]
        seen = len(text)
        costs.append(time.perf_counter() - t0)
    return costs


def stream_costs(tokenizer, ids: list[int]) -> list[float]:
    d = IncrementalDetokenizer.for_tokenizer(tokenizer, STOP)
    costs = []
    for i in ids:
        t0 = time.perf_counter()
        d.add(i)
        costs.append(time.perf_counter() - t0)
    return costs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    text = Path(__file__).read_text() + "\n" + "Ünïcödé, 東京, emoji 😀 and more. " * 200
    ids = (tokenizer(text).input_ids * 4)[:args.tokens]
    best: dict[str, list[float]] = {}
    for _ in range(args.repeats):  # interleaved
        for name, fn in (("rudder", stream_costs), ("redecode", redecode_costs)):
            costs = fn(tokenizer, ids)
            best[name] = costs if name not in best else [min(a, b) for a, b in zip(best[name], costs)]
    rows = []
    for lo, hi in BUCKETS:
        if hi > len(ids):
            continue
        row = {"tokens": f"{lo}-{hi}"}
        for name, costs in best.items():
            row[f"{name}_us"] = round(1e6 * sum(costs[lo:hi]) / (hi - lo), 2)
        rows.append(row)
    print(f"{'tokens':>10} {'rudder us/token':>16} {'re-decode us/token':>19}")
    for r in rows:
        print(f"{r['tokens']:>10} {r['rudder_us']:>16} {r['redecode_us']:>19}")
    out = {"bench": "detokenize", "tokenizer": "SmolLM2-135M-Instruct",
           "cpu": platform.processor() or platform.machine(),
           "cores": os.cpu_count(), "threads": 1, "repeats": args.repeats, "stop_strings": list(STOP),
           "measure": "best per token over repeats, mean over the bucket", "rows": rows}
    path = Path(__file__).parent / "results" / "detokenize.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
