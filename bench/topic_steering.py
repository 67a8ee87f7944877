"""Topic steering with the default SAE, measured as Table 3 of the codebook paper measures it.

    .venv/bin/python bench/topic_steering.py [--topics cats,dogs,birds,food,music,space]
                                             [--samples 40] [--strengths 4,6,8] [--sae DIR]

For each topic: the feature is found by a search over the SAE's feature metadata (the
feature with the most top examples whose activating token is one of the topic's words;
ties go to the rarer feature), then clamped on generated tokens to `strength` times its
max activation on held-out text (several strengths: steering trades against fluency).
`samples` chat answers (temperature 1, seeds 0..n-1, neutral prompts) are generated at
each strength and without the clamp. A word classifier marks an answer on-topic when it
mentions one of the topic's words.
Fluency: the mean log-probability per token of each answer under the unsteered model,
and the share of repeated word trigrams. Everything runs through the real gRPC server
(reference backend, in-process) and the client SDK.

Prints a table and writes bench/results/topic_steering.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from rudder import client as rc
from rudder.core.default_model import MODEL_NAME, default_model_dir
from rudder.server.app import BackgroundServer
from rudder.server.backends.reference import ReferenceEngine
from rudder.training.concepts import Concept, repeated_trigrams

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models/default-saes/resid15"

# topic -> (words the feature search accepts as the activating token, words the classifier counts)
TOPICS: dict[str, tuple[str, str]] = {
    "cats": ("cat|cats|kitten|kittens", r"cats?|kittens?|kitty|kitties|felines?|meows?|purr\w*"),
    "dogs": ("dog|dogs|puppy|puppies", r"dogs?|pupp(?:y|ies)|canines?|bark\w*|woof"),
    "birds": ("bird|birds", r"birds?|feathers?|wings?|nests?|sparrows?|eagles?|parrots?|owls?|robins?|chirp\w*"),
    "food": ("food|foods", r"foods?|meals?|eat|eats|eating|ate|delicious|cook\w*|dish(?:es)?|recipes?|dinner|lunch"
                           r"|breakfast|bread|fruits?|vegetables?|tast(?:e|y|es|ing)|restaurants?"),
    "music": ("music|musical", r"music\w*|songs?|sing|sings|singing|singers?|sang|sung|melod\w*|guitar\w*|piano\w*"
                               r"|bands?|concerts?|rhythm\w*|tunes?"),
    "space": ("moon|moons|planet|planets|comet|comets|celestial|star|stars|galaxy|sun",
              r"space|planets?|stars?|galax\w*|universe|astronauts?|orbit\w*|moons?|nasa|rockets?|cosmos|cosmic"
              r"|solar|comets?|celestial|astronom\w*"),
}
PROMPTS = [
    "Write a short paragraph.",
    "Tell me something.",
    "Write a few sentences about anything.",
    "Say something to me.",
]


def search_regex(topic: str) -> str:
    """Over top examples: the activating token (marked [[ ]]) is one of the topic's words."""
    return rf"(?i)\[\[ ?(?:{TOPICS[topic][0]})\]\]"


def on_topic(topic: str, text: str) -> bool:
    return Concept(topic, TOPICS[topic][1]).on(text)


def pick_feature(client: rc.Client, sae: str, topic: str):
    feature, total = client.best_feature(sae, search_regex(topic))
    if feature is None:
        raise SystemExit(f"error: no feature of {sae} has a top example whose activating token is one of "
                         f"{TOPICS[topic][0]!r}; try another topic")
    return feature, total


def sample(client: rc.Client, sae: str, feature: int, value: float | None, seed: int, max_tokens: int) -> dict:
    """One answer at temperature 1; `value` None: unsteered."""
    chat = [{"role": "user", "content": PROMPTS[seed % len(PROMPTS)]}]
    ops = [] if value is None else [rc.clamp(sae, feature, value, scope=rc.scope("generated"))]
    tokens = list(client.generate(chat=chat, max_tokens=max_tokens, temperature=1.0, seed=seed, interventions=ops))
    return {"chat": chat, "tokens": tokens}


def summarise(scorer: Scorer, topic: str, runs: list[dict]) -> dict:
    texts = ["".join(t.text for t in r["tokens"]) for r in runs]
    lps = [mean_logprob(scorer, r["chat"], [t.id for t in r["tokens"]]) for r in runs if r["tokens"]]
    return {"on_topic": sum(on_topic(topic, x) for x in texts) / len(texts),
            "mean_logprob_unsteered": sum(lps) / len(lps),
            "repeated_trigrams": sum(map(repeated_trigrams, texts)) / len(texts),
            "examples": texts[:3]}


class Scorer:
    """The plain model (no steering hooks), for log-probabilities under the unsteered model."""

    def __init__(self, engine: ReferenceEngine):
        from transformers import AutoModelForCausalLM

        self.engine = engine
        self.model = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32).eval()


@torch.no_grad()
def mean_logprob(scorer: Scorer, chat: list[dict], tokens: list[int]) -> float:
    """Mean log-probability per token of `tokens` after `chat`, under the unsteered model."""
    prompt = scorer.engine.tokenize(chat=chat)
    ids = torch.tensor([prompt + tokens])
    logits = scorer.model(ids).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens)[:, None]).mean().item()


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--topics", default=",".join(TOPICS), help=f"comma-separated, of: {', '.join(TOPICS)}")
    ap.add_argument("--samples", type=int, default=40, help="answers per topic (the paper: 40)")
    ap.add_argument("--strengths", default="4,6,8",
                    help="clamp values to try, in multiples of the feature's max activation (comma-separated)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--sae", type=Path, default=SHIPPED,
                    help="an SAE folder of the default model with feature_metadata.json")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/topic_steering.json")
    args = ap.parse_args()
    args.topics = [t.strip() for t in args.topics.split(",") if t.strip()]
    unknown = [t for t in args.topics if t not in TOPICS]
    if unknown or not args.topics:
        ap.error(f"unknown topic {', '.join(unknown) or '(none given)'}; choose from {', '.join(TOPICS)} "
                 "(or add one to TOPICS in bench/topic_steering.py)")
    try:
        args.strengths = [float(x) for x in args.strengths.split(",")]
    except ValueError:
        ap.error(f"--strengths takes numbers separated by commas, e.g. 4,6,8; got {args.strengths!r}")
    bad = [x for x in args.strengths if not math.isfinite(x) or x <= 0]
    if bad:
        ap.error(f"--strengths must be finite positive multiples of the max activation, got {bad[0]}")
    if args.samples < 1:
        ap.error(f"--samples must be at least 1, got {args.samples}")
    if not (args.sae / "feature_metadata.json").exists():
        ap.error(f"{args.sae} has no feature_metadata.json, which the feature search reads; "
                 "pass --sae with an SAE trained by `rudder train sae` (it writes one)")
    return args


def run_topic(scorer: Scorer, c: rc.Client, sae: str, topic: str, args) -> dict:
    feature, matches = pick_feature(c, sae, topic)
    print(f"{topic}: feature {feature.id} ({matches} match; max activation {feature.max_activation:.2f}); "
          f"top example {feature.top_examples[0]!r}", flush=True)
    row = {"feature": feature.id, "matching_features": matches, "max_activation": feature.max_activation,
           "top_examples": list(feature.top_examples), "steered": {}}
    for strength in [None, *args.strengths]:
        value = None if strength is None else strength * feature.max_activation
        with ThreadPoolExecutor(args.concurrency) as pool:
            # list() drains the map inside this iteration, so binding value here changes nothing
            runs = list(pool.map(lambda s, value=value: sample(c, sae, feature.id, value, s, args.max_tokens),
                                 range(args.samples)))
        summary = summarise(scorer, topic, runs)
        if strength is None:
            row["baseline"] = summary
        else:
            row["steered"][f"{strength:g}"] = {"clamp": value, **summary}
        print(f"  {'baseline' if strength is None else f'{strength:g} x':>8}: {summary['on_topic']:.0%} on topic, "
              f"e.g. {summary['examples'][0][:100]!r}", flush=True)
    return row


def print_table(results: dict, args, threads: int) -> None:
    print(f"\n{args.samples} answers per topic and strength, temperature 1, {args.max_tokens} tokens; clamp = "
          f"strength x max activation on generated tokens; torch {threads} threads on {os.cpu_count()} cores")
    cols = [f"{x:g}x" for x in args.strengths]
    print(f"{'topic':<7} {'feature':>7} {'baseline':>9} " + " ".join(f"{c:>6}" for c in cols)
          + "   logprob: base " + " ".join(f"{c:>6}" for c in cols))
    for topic, r in results.items():
        st = [r["steered"][f"{x:g}"] for x in args.strengths]
        print(f"{topic:<7} {r['feature']:7d} {r['baseline']['on_topic']:9.0%} "
              + " ".join(f"{x['on_topic']:6.0%}" for x in st)
              + f"   {r['baseline']['mean_logprob_unsteered']:13.2f} "
              + " ".join(f"{x['mean_logprob_unsteered']:6.2f}" for x in st))


def main() -> None:
    args = parse_args()
    threads = torch.get_num_threads()
    engine = ReferenceEngine(default_model_dir(), saes=[str(args.sae)])
    scorer = Scorer(engine)
    results, t0 = {}, time.perf_counter()
    with BackgroundServer(engine, MODEL_NAME) as srv, rc.Client(srv.address, timeout=1800) as c:
        for topic in args.topics:
            results[topic] = run_topic(scorer, c, args.sae.name, topic, args)
    print_table(results, args, threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d"),
        "sae": str(args.sae.relative_to(ROOT) if args.sae.is_relative_to(ROOT) else args.sae),
        "samples": args.samples, "temperature": 1.0, "max_tokens": args.max_tokens, "strengths": args.strengths,
        "prompts": PROMPTS, "classifier": {t: w for t, (_, w) in TOPICS.items()},
        "search": {t: search_regex(t) for t in args.topics}, "threads": threads, "cpu_count": os.cpu_count(),
        "seconds": time.perf_counter() - t0, "topics": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
