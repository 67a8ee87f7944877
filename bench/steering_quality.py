"""Does steering land? A judge-free, AxBench-shaped benchmark on the default model.

    .venv/bin/python bench/steering_quality.py [--topics cats,dogs,...] [--sites 6,10] [--strengths 2,3,4]
                                               [--temperature 0.6] [--scope generated] [--quick]

For each topic, every arm answers the same instructions, twice each (temperature 0.6, fixed seeds,
48 tokens):
- prompt: the instruction plus "Mention {topic} in your answer." (the field's bar);
- feature_regex: today's recipe, the shipped SAE's feature found by a regex over its top examples,
  clamped on generated tokens at a multiple of its max activation;
- feature_output: the feature with the best output score among those whose logit-lens tokens are
  the topic's words (Arad et al. 2025; `rudder analyze output-scores`), clamped the same way;
- diffmean / pca_diff: a steering vector built from examples the model writes itself (asked to
  mention the topic vs plain answers, two samples per instruction), added at the residual stream
  after each layer of `--sites` with alpha a multiple of that site's mean activation norm / 10
  (the calibration picks the site and the strength);
- trained: a vector trained on the same positives so the model writes them given the plain
  instructions, added at the prompt's positions (rudder.training.vectors.train_vector), alpha a
  multiple of its trained norm;
- best+prompt: the best steering arm (by calibration success) together with the prompt.
The instructions are split in half: each steered arm's strength is calibrated on the first half
(the highest success whose fluency drop is within the budget, rudder.core.vectors.pick_strength)
and reported on the second. Measures (rudder.training.concepts): on topic (a word classifier),
fluency drop (mean log-prob per token under the unsteered model, below the unsteered answers'),
repeated trigrams, success (on topic, drop within budget, <= 10% repeated trigrams), and a
relevance proxy (log-prob of the answer given its own instruction minus given another's).

Prints a table; writes bench/results/steering_quality.json and docs/img/steering_quality.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from rudder import client as rc
from rudder.core.default_model import MODEL_NAME, default_model_dir
from rudder.core.vectors import METHODS, pick_strength
from rudder.server.app import BackgroundServer
from rudder.server.backends.reference import ReferenceEngine
from rudder.training.concepts import (
    CALIBRATION_INSTRUCTIONS,
    EXAMPLE_INSTRUCTIONS,
    MENTION,
    REPORT_INSTRUCTIONS,
    SAMPLES,
    Concept,
    Judge,
    answer_all,
    ask,
    client_generator,
    score,
    summary,
    sweep,
    write_examples,
)
from rudder.training.lm import HookedLM
from rudder.training.vectors import TRAINED_STRENGTHS, make_vector

sys.path.insert(0, str(Path(__file__).resolve().parent))
from topic_steering import SHIPPED, TOPICS, search_regex  # noqa: E402  (the classifier and feature search)

ROOT = Path(__file__).resolve().parents[1]

def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--topics", default=",".join(TOPICS), help=f"comma-separated, of: {', '.join(TOPICS)}")
    ap.add_argument("--sites", default="10", help="layers whose hook_resid_post the vectors are tried at")
    ap.add_argument("--strengths", default="2,3,4",
                    help="diffmean/pca_diff alphas, multiples of the site mean activation norm / 10")
    ap.add_argument("--trained-strengths", default=",".join(f"{x:g}" for x in TRAINED_STRENGTHS),
                    help="trained-vector alphas, multiples of the norm it was trained to")
    ap.add_argument("--feature-strengths", default="2,4", help="clamps, multiples of the feature's max activation")
    ap.add_argument("--max-batch", type=int, default=128,
                    help="the reference backend's batch (every strength at once)")
    ap.add_argument("--scope", default="all", choices=["all", "generated"],
                    help="positions diffmean/pca_diff act on (the trained vector: the prompt's, where it was trained)")
    ap.add_argument("--temperature", type=float, default=0.6, help="sampling temperature of every answer")
    ap.add_argument("--steps", type=int, default=40, help="training steps of the trained vector")
    ap.add_argument("--objective", default="lm", choices=["lm", "preference"], help="the trained vector's loss")
    ap.add_argument("--budget", type=float, default=1.0, help="fluency drop allowed, nats per token")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--samples", type=int, default=SAMPLES,
                    help="answers per instruction (and strength): 12 instructions x 2 a half by default")
    ap.add_argument("--concurrency", type=int, default=128)
    ap.add_argument("--summarize", action="store_true",
                    help="only recompute the headlines (best, calibrated) of the JSON at --out")
    ap.add_argument("--quick", action="store_true", help="8 instructions and 16 examples (a smoke run)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/steering_quality.json")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs/img/steering_quality.png")
    args = ap.parse_args()
    args.topics = [t.strip() for t in args.topics.split(",") if t.strip()]
    if unknown := [t for t in args.topics if t not in TOPICS]:
        ap.error(f"unknown topic {unknown[0]}; choose from {', '.join(TOPICS)}")
    for name in ("strengths", "trained_strengths", "feature_strengths"):
        try:
            setattr(args, name, [float(x) for x in getattr(args, name).split(",")])
        except ValueError:
            ap.error(f"--{name.replace('_', '-')} takes numbers separated by commas")
        if any(not math.isfinite(x) or x <= 0 for x in getattr(args, name)):
            ap.error(f"--{name.replace('_', '-')} must be finite and positive")
    try:
        args.sites = [f"blocks.{int(x)}.hook_resid_post" for x in args.sites.split(",")]
    except ValueError:
        ap.error("--sites takes layer numbers separated by commas, e.g. 6,10")
    if args.samples < 1:
        ap.error(f"--samples is the answers per instruction: >= 1, got {args.samples}")
    if not args.budget > 0:
        ap.error(f"--budget is the fluency drop allowed, in nats per token: > 0, got {args.budget}")
    return args


def resummarize(path: Path) -> None:
    """--summarize: recompute the headlines of a finished run's JSON (no generation)."""
    results = json.loads(path.read_text())
    for row in results["topics"].values():
        if "calibrated_pick" not in row and "best" in row:  # a run from before both headlines were written
            row["calibrated_pick"] = row["best"]["method"]
        headline(row)
    results["meets_target"] = summarize(results)
    print_table(results)
    path.write_text(json.dumps(results, indent=2))
    print(f"rewrote the headlines of {path}")


def main() -> None:
    args = parse_args()
    if args.summarize:
        return resummarize(args.out)
    cal = CALIBRATION_INSTRUCTIONS[:4] if args.quick else CALIBRATION_INSTRUCTIONS
    rep = REPORT_INSTRUCTIONS[:4] if args.quick else REPORT_INSTRUCTIONS
    examples = EXAMPLE_INSTRUCTIONS[:16] if args.quick else EXAMPLE_INSTRUCTIONS
    t0 = time.perf_counter()
    # every strength's answers in one wave: wait a quarter second for the last of them to arrive
    engine = ReferenceEngine(default_model_dir(), saes=[str(SHIPPED)], max_batch=args.max_batch, batch_wait_s=0.25)
    judge = Judge(HookedLM.load(default_model_dir()))
    sae = SHIPPED.name
    scope = rc.scope(args.scope)
    results: dict = {"topics": {}}
    with BackgroundServer(engine, MODEL_NAME) as srv, rc.Client(srv.address, timeout=1800) as c:
        gen = client_generator(c, args.max_tokens, args.temperature)
        # the unsteered answers: the fluency reference of each half, and every topic's baseline
        base = {name: answer_all(gen, ask(part, [], args.samples), args.concurrency)
                for name, part in (("cal", cal), ("rep", rep))}
        for topic in args.topics:
            concept = Concept(topic, TOPICS[topic][1])
            row = run_topic(args, gen, judge, c, concept, sae, scope, cal, rep, examples, base)
            results["topics"][topic] = row
    results.update({
        "date": time.strftime("%Y-%m-%d"), "model": MODEL_NAME, "sae": str(SHIPPED.relative_to(ROOT)),
        "sites": args.sites, "scope": args.scope, "budget": args.budget, "temperature": args.temperature,
        "trained_strengths": args.trained_strengths, "steps": args.steps, "objective": args.objective,
        "max_tokens": args.max_tokens, "samples": args.samples, "strengths": args.strengths,
        "feature_strengths": args.feature_strengths,
        "instructions": {"calibrate": cal, "report": rep}, "example_instructions": examples,
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "seconds": time.perf_counter() - t0})
    results["meets_target"] = summarize(results)
    print_table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    plot(results, args.plot)
    print(f"wrote {args.out} and {args.plot}")


def run_topic(args, gen, judge, c, concept, sae, scope, cal, rep, examples, base) -> dict:
    budget = args.budget
    base_scored = {h: score(judge, concept, base[h], part) for h, part in (("cal", cal), ("rep", rep))}
    base_lp = {h: summary(s, 0.0, budget)["mean_logprob"] for h, s in base_scored.items()}
    row: dict = {"baseline": summary(base_scored["rep"], base_lp["rep"], budget), "arms": {}, "costs": {}}
    print(f"{concept.name}: baseline {row['baseline']['on_topic']:.0%} on topic", flush=True)

    # the model writes the examples: mention-the-topic answers vs plain ones, two samples per instruction
    t = time.perf_counter()
    pairs = write_examples(gen, concept, examples, concurrency=args.concurrency)
    row["costs"]["examples_s"] = time.perf_counter() - t
    row["examples"] = len(pairs)
    arms = {}
    for site in args.sites:
        for m in METHODS:
            t = time.perf_counter()
            trained = m == "trained"
            train = {"steps": args.steps, "objective": args.objective} if trained else {}
            v, unit, _ = make_vector(judge.lm, m, site, pairs, **train)
            row["costs"][f"{m}@{site.split('.')[1]}_s"] = time.perf_counter() - t
            values = v.tolist()
            row.setdefault("units", {})[f"{m}@{site.split('.')[1]}"] = unit  # alpha = strength x unit
            where = rc.scope("prompt") if trained else scope  # a trained vector acts where it was trained
            arms[f"{m}@{site.split('.')[1]}"] = (
                lambda s, values=values, site=site, unit=unit, where=where: [
                    rc.direction(s * unit, vector=values, site=site, scope=where)],
                args.trained_strengths if trained else args.strengths)

    feature, matches = c.best_feature(sae, search_regex(concept.name))
    if feature is not None:
        arms["feature_regex"] = (lambda s: [rc.clamp(sae, feature.id, s * feature.max_activation,
                                                     scope=rc.scope("generated"))], args.feature_strengths)
        row["feature"] = {"id": feature.id, "matches": matches, "max_activation": feature.max_activation}
    # the feature that makes the model say the topic's words (output score, Arad et al. 2025)
    effect, candidates = c.best_feature_by_effect(sae, concept.words)
    if effect is not None and effect.max_activation > 0:
        arms["feature_output"] = (lambda s: [rc.clamp(sae, effect.id, s * effect.max_activation,
                                                      scope=rc.scope("generated"))], args.feature_strengths)
        row["feature_output"] = {"id": effect.id, "candidates": candidates, "output_score": effect.output_score,
                                 "says": list(effect.says_tokens), "max_activation": effect.max_activation}

    def calibrate(name, at, strengths, prompt=lambda i: i):
        t = time.perf_counter()
        curve, rows = sweep(gen, judge, concept, cal, at, strengths, base_lp["cal"], budget, prompt=prompt,
                            concurrency=args.concurrency, progress=lambda m: print(f"  [{name}]{m}", flush=True),
                            samples=args.samples)
        chosen = pick_strength(curve, budget)
        row["costs"][f"calibrate_{name}_s"] = time.perf_counter() - t
        return curve, rows, chosen

    def report(name, at, strength, prompt=lambda i: i):
        jobs = ask(rep, at(strength) if strength is not None else [], args.samples, prompt=prompt)
        return summary(score(judge, concept, answer_all(gen, jobs, args.concurrency), rep), base_lp["rep"], budget)

    mention_prompt = lambda i: MENTION.format(instruction=i, concept=concept.name)  # noqa: E731
    row["arms"]["prompt"] = report("prompt", None, None, mention_prompt)
    best, best_cal = None, (-1.0, 0.0)
    picked: dict[str, tuple] = {}  # method -> (calibration key, candidate name, chosen, rows)
    for name, (at, strengths) in arms.items():
        curve, rows, chosen = calibrate(name, at, strengths)
        method = name.split("@")[0]
        key = (chosen.success, -chosen.fluency_drop) if chosen else (-1.0, 0.0)
        if method not in picked or key > picked[method][0]:
            picked[method] = (key, name, chosen, rows)
        row.setdefault("calibration", {})[name] = rows
    for method, (key, name, chosen, rows) in picked.items():
        at = arms[name][0]
        arm = {"candidate": name, "strength": chosen.strength if chosen else None, "calibration": rows}
        arm.update(report(method, at, chosen.strength) if chosen else {"success": 0.0, "on_topic": 0.0})
        row["arms"][method] = arm
        if chosen and key > best_cal:
            best, best_cal = name, key
    if best is not None:
        at, strengths = arms[best]
        curve, rows, chosen = calibrate(f"{best}+prompt", at, strengths, mention_prompt)
        arm = {"steering": best, "calibration": rows, "strength": chosen.strength if chosen else None}
        arm.update(report("best+prompt", at, chosen.strength, mention_prompt) if chosen else {"success": 0.0})
        row["arms"]["best+prompt"] = arm
        row["calibrated_pick"] = best
    headline(row)
    print(f"{concept.name}: " + ", ".join(f"{k} {v.get('success', 0):.0%}" for k, v in row["arms"].items()), flush=True)
    return row


ARMS = ("prompt", "feature_regex", "feature_output", "diffmean", "pca_diff", "trained", "best+prompt")
STEERING = ("feature_regex", "feature_output", "diffmean", "pca_diff", "trained")


def _headline_of(row: dict, name: str, arm: dict) -> dict:
    return {"method": arm.get("candidate", name), "strength": arm["strength"], "on_topic": arm["on_topic"],
            "success": arm["success"], "fluency_drop": arm.get("fluency_drop"),
            "baseline_on_topic": row["baseline"]["on_topic"]}


def meets(h: dict | None, budget: float) -> bool:
    """The issue's target for one topic: success >= 50% at >= 60% on topic, baseline <= 10%, drop in budget."""
    return bool(h) and h["success"] >= 0.5 and h["on_topic"] >= 0.6 and h["baseline_on_topic"] <= 0.1 \
        and h["fluency_drop"] is not None and h["fluency_drop"] <= budget


def headline(row: dict) -> None:
    """Two headlines per topic, both on the report half with each arm at its calibrated strength:
    `best`, the steering arm (not prompting) with the highest success there (ties: on topic), as
    AxBench reads its held-out table; and `calibrated`, the arm the calibration half picked, which
    is what a user gets who never sees the report half. Both are written, so neither hides the other."""
    arms = {n: a for n, a in row["arms"].items() if n in STEERING and a.get("strength") is not None and "on_topic" in a}
    if arms:
        name = max(arms, key=lambda n: (arms[n]["success"], arms[n]["on_topic"]))
        row["best"] = _headline_of(row, name, arms[name])
    pick = row.get("calibrated_pick")
    if pick and pick.split("@")[0] in arms:
        row["calibrated"] = _headline_of(row, pick, arms[pick.split("@")[0]])


def summarize(results: dict) -> dict:
    """How many topics reach the target, by either headline."""
    budget = results["budget"]
    return {k: sum(meets(r.get(k), budget) for r in results["topics"].values()) for k in ("best", "calibrated")}


def print_table(results: dict) -> None:
    print(f"\nsuccess (on topic) per arm on the report half; budget {results['budget']} nats/token; "
          f"torch {results['threads']} threads on {results['cpu_count']} cores; {results['seconds']:.0f} s")
    print(f"{'topic':<7} {'base':>5} " + " ".join(f"{a:>16}" for a in ARMS) + "   best steering")
    for topic, r in results["topics"].items():
        cells = []
        for a in ARMS:
            x = r["arms"].get(a)
            cells.append(f"{x['success']:5.0%} ({x['on_topic']:4.0%})" if x and "on_topic" in x else f"{'-':>11}")
        best, pick = r.get("best", {}), r.get("calibrated", {})
        print(f"{topic:<7} {r['baseline']['on_topic']:5.0%} " + " ".join(f"{x:>16}" for x in cells)
              + f"   {best.get('method', '-')} @ {best.get('strength', '-')}"
              + f" (calibration picked {pick.get('method', '-')} @ {pick.get('strength', '-')})")
    m = results.get("meets_target", {})
    print(f"topics at the target: best steering arm {m.get('best')} of {len(results['topics'])}; "
          f"the arm calibration picked {m.get('calibrated')} of {len(results['topics'])}")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    topics = list(results["topics"])
    fig, axes = plt.subplots(1, len(topics), figsize=(3.2 * len(topics), 3.2), sharey=True, squeeze=False)
    for ax, topic in zip(axes[0], topics):
        for name, arm in results["topics"][topic]["arms"].items():
            if "calibration" not in arm:
                continue
            pts = list(arm["calibration"].values())
            ax.plot([p["fluency_drop"] for p in pts], [p["on_topic"] for p in pts], marker="o", label=name)
        p = results["topics"][topic]["arms"]["prompt"]
        ax.scatter([p["fluency_drop"]], [p["on_topic"]], marker="*", s=120, color="k", label="prompt", zorder=3)
        ax.axvline(results["budget"], color="grey", ls="--", lw=0.8)
        ax.set_title(topic)
        ax.set_xlabel("fluency drop (nats/token)")
    axes[0][0].set_ylabel("on topic (calibration half)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
