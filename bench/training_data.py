"""Training on your own data: resident memory against the source's size, and the activation
cache's speed against running the model.

    .venv/bin/python bench/training_data.py [--sizes 20,200] [--tokens 65536] [--repeats 2]

1. Memory: a JSONL file of N MB (English-like sentences made from the stdlib corpus) is given to
   `rudder train sae --corpus FILE` (a short run on the default model, TopK, the whole file read
   and packed); the peak resident memory of the process (polled with psutil) and the tokens packed.
2. Speed: `rudder cache activations` once, then the same SAE config trained from the model and
   from the cache, interleaved `--repeats` times; tokens/s of the training loop (the model's
   forward included where it runs), best of the repeats and the spread.

Prints a table; writes bench/results/training_data.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
SITE = "blocks.15.hook_resid_post"
SAE = ["--site", SITE, "--architecture", "topk", "--set", "d_sae=4608", "--set", "k=32", "--set", "context=128",
       "--set", "batch_tokens=2048", "--set", "eval_tokens=2048", "--set", "buffer_tokens=16384"]


def write_jsonl(path: Path, megabytes: int) -> None:
    from rudder.training.corpus import stdlib

    docs = [d for d, _ in zip(stdlib(), range(400))]
    rng = random.Random(0)
    with path.open("w") as f:
        while f.tell() < megabytes * 1_000_000:
            f.write(json.dumps({"text": rng.choice(docs)}) + "\n")


def peak_rss(cmd: list[str]) -> tuple[float, float, str]:
    """Run `cmd`; its peak resident memory (MB, with its children) and seconds."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ps, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, sum(p.memory_info().rss for p in [ps, *ps.children(recursive=True)]))
        except psutil.Error:
            pass
        time.sleep(0.05)
    out = proc.stdout.read()
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{out[-3000:]}")
    return peak / 1e6, time.perf_counter() - t0, out


def rudder(*args: str) -> list[str]:
    return [sys.executable, "-m", "rudder.cli", *args]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="20,200", help="JSONL sizes in MB")
    ap.add_argument("--tokens", type=int, default=65536, help="training tokens of the speed runs")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--parts", default="memory,speed",
                    help="memory (peak RSS, not timing-sensitive), speed, or both; a part not run keeps its figures "
                         "from --out")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/training_data.json")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    if not parts or parts - {"memory", "speed"}:
        ap.error(f"--parts takes memory and/or speed, got {args.parts}")
    kept = json.loads(args.out.read_text()) if args.out.exists() else {}
    results: dict = {"memory": kept.get("memory", []) if "memory" not in parts else [],
                     "speed": kept.get("speed", {}) if "speed" not in parts else {},
                     "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                     "date": time.strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for mb in (int(x) for x in args.sizes.split(",") if "memory" in parts):
            data = tmp / f"d{mb}.jsonl"
            write_jsonl(data, mb)
            rss, seconds, out = peak_rss(rudder("train", "sae", "--corpus", str(data), "--tokens", "4096",
                                                *SAE, "--out", str(tmp / f"sae{mb}")))
            meta = json.loads((tmp / f"sae{mb}" / "cfg.json").read_text())["metadata"]
            row = {"megabytes": data.stat().st_size / 1e6, "peak_rss_mb": rss, "seconds": seconds,
                   "sha256": meta["corpus"][str(data)]["sha256"]}
            print(f"{row['megabytes']:6.0f} MB JSONL: peak RSS {rss:,.0f} MB, {seconds:.0f} s", flush=True)
            results["memory"].append(row)
            data.unlink()

        if "speed" in parts:
            measure_speed(args, tmp, results)
    print_results(results, args)


def measure_speed(args: argparse.Namespace, tmp: Path, results: dict) -> None:
    """A cache written once, then the same SAE trained from the model and from it, interleaved."""
    cache = tmp / "cache"
    speed = ["--tokens", str(args.tokens), *SAE]
    _, seconds, _ = peak_rss(rudder("cache", "activations", *speed, "--out", str(cache)))
    results["speed"]["cache_write_s"] = seconds
    runs: dict[str, list[float]] = {"model": [], "cache": []}
    for r in range(args.repeats):
        for source in ("model", "cache"):
            extra = ["--set", f"activations={cache}"] if source == "cache" else []
            out = tmp / f"{source}{r}"
            peak_rss(rudder("train", "sae", *speed, *extra, "--out", str(out)))
            tps = json.loads((out / "cfg.json").read_text())["metadata"]["train_tokens_per_second"]
            runs[source].append(tps)
            print(f"from the {source}: {tps:,.0f} tokens/s", flush=True)
    results["speed"].update({f"{k}_tokens_per_second": v for k, v in runs.items()})
    best = {k: max(v) for k, v in runs.items()}
    results["speed"]["speedup"] = best["cache"] / best["model"]


def print_results(results: dict, args: argparse.Namespace) -> None:
    print(f"\ntorch {results['threads']} threads on {results['cpu_count']} cores")
    print("| JSONL | peak RSS | seconds |\n| --- | --- | --- |")
    for row in results["memory"]:
        print(f"| {row['megabytes']:.0f} MB | {row['peak_rss_mb']:,.0f} MB | {row['seconds']:.0f} |")
    sp = results["speed"]
    if sp:
        runs = {k: sp[f"{k}_tokens_per_second"] for k in ("model", "cache")}
        spread = {k: f"{min(v):,.0f}-{max(v):,.0f}" for k, v in runs.items()}
        print(f"\nSAE training tokens/s, best of {len(runs['model'])}: from the model {max(runs['model']):,.0f} "
              f"({spread['model']}), from the cache {max(runs['cache']):,.0f} ({spread['cache']}): "
              f"{sp['speedup']:.1f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
