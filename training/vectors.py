"""`rudder train vector`: a steering vector for a concept, calibrated under a fluency budget.

    rudder train vector --concept cats --words 'cats?|kittens?|kitty' --out vectors/cats

    v = SteeringVector.load("vectors/cats")                       # then, with the client SDK:
    client.generate(..., interventions=[rc.direction(v.strength, vector=v.vector.tolist(), site=v.site)])

1. Examples: the model answers EXAMPLE_INSTRUCTIONS asked to mention the concept, and plainly;
   a pair is kept where the first is on the concept and the second is not (or `examples` gives
   the pairs as JSON lines).
2. The direction: `method` over each example's mean activation at `site` (rudder.core.vectors).
3. Calibration: answers to CALIBRATION_INSTRUCTIONS at each strength (alpha = strength x the site's
   mean activation norm / 10, on every position), scored by the unsteered model; the strength with
   the best success within the fluency budget is kept, and the whole curve is written with it.

Everything runs in this process: the model behind an in-process Rudder server (reference
backend) for the answers, and the plain model for activations and log-probs.
"""

from __future__ import annotations

import json
import time

from rudder import client as rc
from rudder.core.default_model import default_model_dir
from rudder.core.errors import InvalidArgument
from rudder.core.vectors import SteeringVector, build, pick_strength, write_gguf
from rudder.training.concepts import (
    CALIBRATION_INSTRUCTIONS,
    EXAMPLE_INSTRUCTIONS,
    Concept,
    Judge,
    answer_all,
    client_generator,
    score,
    summary,
    sweep,
    write_examples,
)
from rudder.training.config import VectorTrainConfig
from rudder.training.lm import HookedLM


def read_pairs(path) -> tuple[list[str], list[str]]:
    if not path.is_file():
        raise InvalidArgument(f"examples file {path} does not exist; give JSON lines of positive/negative pairs")
    pos, neg = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            pos.append(str(row["positive"]))
            neg.append(str(row["negative"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise InvalidArgument(f"{path}:{n}: expected a JSON object with 'positive' and 'negative' texts") from None
    if not pos:
        raise InvalidArgument(f"{path} holds no example pairs; give one JSON line per pair")
    return pos, neg


def run(cfg: VectorTrainConfig) -> SteeringVector:
    from rudder.server.app import BackgroundServer
    from rudder.server.backends.reference import ReferenceEngine

    given = read_pairs(cfg.examples) if cfg.examples is not None else None  # a bad file fails before any load
    model = cfg.model or str(default_model_dir())
    lm = HookedLM.load(model)
    lm.site(cfg.site)  # a layer the model lacks fails here
    judge = Judge(lm)
    concept = Concept(cfg.concept, cfg.words or cfg.concept)
    t0 = time.perf_counter()
    with BackgroundServer(ReferenceEngine(model), "vector") as srv, rc.Client(srv.address, timeout=1800) as c:
        gen = client_generator(c, cfg.max_tokens)
        if given is not None:
            pos, neg = given
        else:
            print(f"==> the model writes examples for {concept.name!r} ({cfg.num_examples} instructions x 2)",
                  flush=True)
            pos, neg = write_examples(gen, concept, EXAMPLE_INSTRUCTIONS[:cfg.num_examples])
        t_examples = time.perf_counter() - t0
        vector = build(cfg.method, judge.text_activations(pos, cfg.site), judge.text_activations(neg, cfg.site))
        site_norm = judge.site_norm(neg, cfg.site)
        print(f"==> {cfg.method} vector at {cfg.site} from {len(pos)} pairs; site norm {site_norm:.1f}", flush=True)
        curve, chosen = [], None
        if cfg.calibrate:
            base = answer_all(gen, [(i, k, []) for k, i in enumerate(CALIBRATION_INSTRUCTIONS)])
            base_lp = summary(score(judge, concept, base, CALIBRATION_INSTRUCTIONS), 0.0, cfg.budget)["mean_logprob"]
            alphas = [s * site_norm / 10 for s in cfg.strengths]  # the curve is kept in the site's units
            values = vector.tolist()

            def at(alpha):
                return [rc.direction(alpha, vector=values, site=cfg.site)]

            print(f"==> calibrating on {len(CALIBRATION_INSTRUCTIONS)} instructions, budget {cfg.budget} nats/token",
                  flush=True)
            curve, _ = sweep(gen, judge, concept, CALIBRATION_INSTRUCTIONS, at, alphas, base_lp, cfg.budget)
            chosen = pick_strength(curve, cfg.budget)
            if chosen is None:
                print(f"    no strength kept the fluency drop within {cfg.budget} nats/token; the vector is saved "
                      "uncalibrated: try smaller --strengths or another --site", flush=True)
    out = SteeringVector(cfg.site, vector, cfg.method, strength=chosen.strength if chosen else None,
                         site_norm=site_norm, model=str(model), budget=cfg.budget, calibration=curve,
                         provenance={"concept": concept.name, "words": concept.words, "pairs": len(pos),
                                     "examples": str(cfg.examples) if cfg.examples else "written by the model",
                                     "examples_s": round(t_examples, 1),
                                     "seconds": round(time.perf_counter() - t0, 1)})
    out.save(cfg.out)
    if cfg.gguf is not None:
        write_gguf(out, cfg.gguf, lm.shape.architecture)
        print(f"==> {cfg.gguf}: a llama.cpp control vector (llama-cli --control-vector {cfg.gguf})")
    if chosen:
        print(f"==> {cfg.out}: alpha {chosen.strength:.2f} ({chosen.on_topic:.0%} on topic, success "
              f"{chosen.success:.0%}, fluency drop {chosen.fluency_drop:.2f} nats/token)")
    else:
        print(f"==> {cfg.out}")
    return out
