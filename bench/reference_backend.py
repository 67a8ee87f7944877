"""Reference backend throughput: 1 and 16 concurrent streams; plain, steered, steered + top-16 readout.

    .venv/bin/python bench/reference_backend.py [--tokens 32] [--threads 2]

Runs the engine in-process on the default model (greedy, ignore EOS) with an SAE
at blocks.15.hook_resid_post (the default trained one if present, else a random
576x9216 SAE: the cost is the same). Prints a table and writes
bench/results/reference_backend.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from rudder.core.default_model import default_sae_dirs, ensure_default_model
from rudder.core.sae import SAE, SAEConfig
from rudder.core.steering import FeatureEdit, Op, ReadoutSpec, SteeringSpec
from rudder.server.backends.base import EngineRequest, Sampling
from rudder.server.backends.reference import ReferenceEngine

PROMPTS = ["Write a short story about a lighthouse keeper.", "Explain how a hash table works.",
           "What is the capital of France?", "List three uses of copper.", "Describe the water cycle.",
           "Why is the sky blue?", "Give advice for a job interview.", "Summarise the plot of Hamlet."]
SITE = "blocks.15.hook_resid_post"


def sae_path(tmp: Path) -> Path:
    for p in default_sae_dirs():
        if json.loads((p / "cfg.json").read_text())["metadata"]["hook_name"] == SITE:
            return p
    sae = SAE(SAEConfig(d_in=576, d_sae=9216, hook_name=SITE))
    torch.nn.init.normal_(sae.W_enc, std=0.04)
    torch.nn.init.normal_(sae.W_dec, std=0.04)
    return sae.save(tmp / "random-sae")


async def run(engine, streams: int, tokens: int, spec: SteeringSpec,
              prompts: list[list[int]] | None = None) -> float:
    """Generated tokens per second over `streams` concurrent requests (default: the chat PROMPTS)."""
    await engine.start()
    prompts = prompts or [engine.tokenize(chat=[{"role": "user", "content": p}]) for p in PROMPTS]
    reqs = [EngineRequest(prompts[i % len(prompts)], Sampling(max_tokens=tokens, ignore_eos=True), spec)
            for i in range(streams)]

    async def one(r):
        return len([ev async for ev in engine.generate(r) if not ev.is_prompt])

    t0 = time.perf_counter()
    counts = await asyncio.gather(*(one(r) for r in reqs))
    return sum(counts) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        sae = sae_path(Path(tmp))
        engine = ReferenceEngine(ensure_default_model(), saes=[f"sae={sae}"])
        d_sae = engine.artifacts.saes["sae"].sae.cfg.d_sae
        configs = {
            "plain": SteeringSpec(),
            "steered": SteeringSpec(features=(FeatureEdit("sae", 1, Op.CLAMP, 5.0),)),
            "steered+top16": SteeringSpec(features=(FeatureEdit("sae", 1, Op.CLAMP, 5.0),),
                                          readouts=ReadoutSpec(saes=("sae",), top_k=16)),
        }
        asyncio.run(run(engine, 4, 4, SteeringSpec()))  # warm-up
        rows = []
        for streams in (1, 16):
            for name, spec in configs.items():
                best = max(asyncio.run(run(engine, streams, args.tokens, spec)) for _ in range(args.repeats))
                rows.append({"streams": streams, "config": name, "tok_per_s": best})
        asyncio.run(engine.stop())
    for r in rows:
        plain = next(x["tok_per_s"] for x in rows if x["streams"] == r["streams"] and x["config"] == "plain")
        r["ratio_vs_plain"] = r["tok_per_s"] / plain
    print(f"reference backend, SmolLM2-135M fp32, {args.tokens} new tokens/stream, greedy, "
          f"torch threads {args.threads} on {os.cpu_count()} cores, SAE {d_sae} features at {SITE}")
    print(f"{'streams':>7}  {'config':<14} {'tok/s':>8}  {'vs plain':>8}")
    for r in rows:
        print(f"{r['streams']:>7}  {r['config']:<14} {r['tok_per_s']:>8.1f}  {r['ratio_vs_plain']:>7.3f}x")
    out = Path(__file__).parent / "results" / "reference_backend.json"
    out.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                               "threads": args.threads, "tokens_per_stream": args.tokens, "d_sae": d_sae,
                               "site": SITE, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
