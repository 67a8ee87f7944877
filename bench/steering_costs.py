"""What steering by name and finding features by effect cost, on the default model (reference backend).

    .venv/bin/python bench/steering_costs.py [--requests 16] [--tokens 32] [--repeats 5]

- By name: a vector served by name (`rudder serve --vector`) against the same vector sent inline
  with every request. Each round sends `--requests` concurrent requests steered one way, then the
  other (interleaved rounds); best and spread of the wall time per round.
- Feature search by effect: ListFeatures ranked by output score for each benchmark topic's words
  over the shipped SAE (`rudder features resid15 --says ...`), once the scores are cached.

Prints both and writes bench/results/steering_costs.json. (What building, training and calibrating
a vector cost is in bench/results/steering_quality.json, per topic.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from rudder import client as rc
from rudder.core.default_model import MODEL_NAME, default_model_dir
from rudder.core.vectors import SteeringVector
from rudder.server.app import BackgroundServer
from rudder.server.backends.reference import ReferenceEngine

sys.path.insert(0, str(Path(__file__).resolve().parent))
from topic_steering import SHIPPED, TOPICS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SITE = "blocks.10.hook_resid_post"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/steering_costs.json")
    args = ap.parse_args()
    engine = ReferenceEngine(default_model_dir(), saes=[str(SHIPPED)])
    v = torch.randn(engine.shape.d_model, generator=torch.Generator().manual_seed(0))
    vector = SteeringVector(SITE, v / v.norm(), "diffmean", strength=30.0)
    with tempfile.TemporaryDirectory() as tmp:
        engine.artifacts.add_vector(f"concept={vector.save(Path(tmp) / 'concept')}", engine.shape)
    ways = {"inline direction": [rc.direction(30.0, vector=vector.vector.tolist(), site=SITE)],
            "by name": [rc.steer("concept")]}
    times: dict[str, list[float]] = {w: [] for w in ways}
    with BackgroundServer(engine, MODEL_NAME) as srv, rc.Client(srv.address, timeout=600) as c, \
            ThreadPoolExecutor(args.requests) as pool:
        def request(k: int, interventions) -> list[int]:
            return [t.id for t in c.generate(f"Tell me about item {k}.", max_tokens=args.tokens, ignore_eos=True,
                                             seed=k, interventions=interventions)]

        same = request(0, ways["inline direction"]) == request(0, ways["by name"])
        for _ in range(args.repeats):
            for way, interventions in ways.items():
                t0 = time.perf_counter()
                list(pool.map(request, range(args.requests), [interventions] * args.requests))
                times[way].append(time.perf_counter() - t0)
        search: dict[str, list[float]] = {}
        for _ in range(args.repeats):
            for topic, (_, words) in TOPICS.items():
                t0 = time.perf_counter()
                c.best_feature_by_effect(SHIPPED.name, words)
                search.setdefault(topic, []).append(time.perf_counter() - t0)
    # the one place the two ways differ: the front end's parse of the request (plus the 576 floats on
    # the wire); timed alone, as it is too small to see end to end on a shared machine
    from rudder.server.requests import RequestParser

    parser = RequestParser(engine.shape, engine.artifacts)
    parse: dict[str, float] = {}
    for _ in range(args.repeats):
        for way, interventions in ways.items():
            message = [iv.SerializeToString() for iv in interventions]
            t0 = time.perf_counter()
            for _ in range(200):  # what the server does: decode the message, then parse it
                ivs = [type(interventions[0]).FromString(m) for m in message]
                parser.steering(ivs, rc.readouts())
            parse[way] = min(parse.get(way, math.inf), (time.perf_counter() - t0) / 200)
    rows = {w: {"best_s": min(t), "spread_s": max(t) - min(t), "runs_s": t, "parse_us": parse[w] * 1e6}
            for w, t in times.items()}
    ratio = rows["by name"]["best_s"] / rows["inline direction"]["best_s"]
    print(f"{args.requests} concurrent requests x {args.tokens} tokens, best of {args.repeats} interleaved rounds; "
          f"torch {torch.get_num_threads()} threads on {os.cpu_count()} cores")
    for w, r in rows.items():
        print(f"  {w:<17} {r['best_s']:.3f} s  (spread {r['spread_s']:.3f} s); request parse {r['parse_us']:.0f} us")
    print(f"  by name / inline: {ratio:.3f}x; same tokens: {same}")
    search_rows = {t: {"best_s": min(x), "first_s": x[0]} for t, x in search.items()}
    print(f"feature search by effect over {SHIPPED.name} (first call, then best of {args.repeats}):")
    for t, r in search_rows.items():
        print(f"  {t:<7} {r['first_s'] * 1000:7.1f} ms, then {r['best_s'] * 1000:6.1f} ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "model": MODEL_NAME, "backend": "reference",
                                    "requests": args.requests, "tokens": args.tokens, "repeats": args.repeats,
                                    "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                                    "rows": rows, "ratio": ratio, "same_tokens": same,
                                    "feature_search": search_rows}, indent=2))


if __name__ == "__main__":
    main()
