"""Codebook models against their base models in the reference backend, as a throughput ratio.

    .venv/bin/python bench/codebook_models.py [--tokens 32] [--threads 2]

Two models, each served twice by the reference engine in one run: with its codebooks
(always on) and as the plain base model (the same weights without codebooks.json).
- TokFSM: the shipped codebook model (models/tokfsm-codebook: at each of 4 layers, 4 heads
  of attention codebooks and an MLP codebook, 1000 codes each, k=1), 128 new tokens per stream.
- SmolLM2-135M (the default model) with attention codebooks at all 30 layers (9 heads
  x 1000 codes of 64 dims, k=1; untrained codes: the cost is the same).
Prints a table and writes bench/results/codebook_models.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from reference_backend import run  # noqa: E402

from rudder.core.codebook import (  # noqa: E402
    CONFIG_FILE,
    WEIGHTS_FILE,
    Codebook,
    CodebookConfig,
    load_codebooks,
    save_codebooks,
)
from rudder.core.default_model import ensure_default_model  # noqa: E402
from rudder.core.steering import ReadoutSpec, SteeringSpec  # noqa: E402
from rudder.server.backends.reference import ReferenceEngine  # noqa: E402

TOKFSM = Path(__file__).parent.parent / "models" / "tokfsm-codebook"


def without_codebooks(folder: Path, tmp: Path) -> Path:
    base = tmp / (folder.name + "-base")
    shutil.copytree(folder, base, ignore=shutil.ignore_patterns(CONFIG_FILE, WEIGHTS_FILE, "code_index.*"))
    return base


def smollm_codebook_model(tmp: Path) -> tuple[Path, Path]:
    """The default model's folder linked file by file, plus codebooks: (codebook model, base)."""
    src = ensure_default_model()
    folder = tmp / "smollm-codebook"
    folder.mkdir()
    for f in src.iterdir():
        (folder / f.name).symlink_to(f)
    torch.manual_seed(0)
    save_codebooks([Codebook(CodebookConfig(f"attn_preproj.{layer}", f"blocks.{layer}.attn.hook_z", num_codes=1000, k=1,
                                            d_code=64, num_heads=9)) for layer in range(30)], folder)
    return folder, src


def measure(model: Path, prompts_of, streams: int, tokens: int, repeats: int, spec: SteeringSpec) -> float:
    engine = ReferenceEngine(model)
    prompts = prompts_of(engine)
    asyncio.run(run(engine, 2, 2, SteeringSpec(), prompts))  # warm-up
    best = max(asyncio.run(run(engine, streams, tokens, spec, prompts)) for _ in range(repeats))
    asyncio.run(engine.stop())
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fsm_prompts = lambda e: [e.tokenize(s) for s in ("42", "0719", "88", "1234")]  # noqa: E731
        chat_prompts = lambda e: None  # noqa: E731
        cases = []
        if TOKFSM.exists():
            books = [cb.cfg.id for cb in load_codebooks(TOKFSM)]
            cases.append((f"TokFSM {len(books)} codebooks, 1000 codes", TOKFSM, without_codebooks(TOKFSM, tmp),
                          fsm_prompts, 4 * args.tokens, books))
        cb_model, base = smollm_codebook_model(tmp)
        cases.append(("SmolLM2-135M 30x9 heads, 1000 codes", cb_model, base, chat_prompts, args.tokens,
                      [f"attn_preproj.{layer}" for layer in range(30)]))
        for name, model, base, prompts, tokens, books in cases:
            plain = measure(base, prompts, args.streams, tokens, args.repeats, SteeringSpec())
            snapped = measure(model, prompts, args.streams, tokens, args.repeats, SteeringSpec())
            read = measure(model, prompts, args.streams, tokens, args.repeats,
                           SteeringSpec(readouts=ReadoutSpec(codebooks=tuple(books))))
            rows.append({"model": name, "tokens_per_stream": tokens, "base_tok_per_s": plain,
                         "codebook_tok_per_s": snapped, "ratio": snapped / plain,
                         "codebook_with_readout_tok_per_s": read, "readout_ratio": read / plain})
    print(f"reference backend, fp32, {args.streams} concurrent streams, greedy, torch threads {args.threads} "
          f"on {os.cpu_count()} cores")
    print(f"{'model':<38} {'base tok/s':>10} {'codebooks':>10} {'ratio':>7} {'+ code readout':>15} {'ratio':>7}")
    for r in rows:
        print(f"{r['model']:<38} {r['base_tok_per_s']:>10.1f} {r['codebook_tok_per_s']:>10.1f} {r['ratio']:>6.3f}x "
              f"{r['codebook_with_readout_tok_per_s']:>15.1f} {r['readout_ratio']:>6.3f}x")
    out = Path(__file__).parent / "results" / "codebook_models.json"
    out.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                               "threads": args.threads, "streams": args.streams, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
