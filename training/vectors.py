"""`rudder train vector`: a steering vector for a concept, calibrated under a fluency budget.

    rudder train vector --concept cats --words 'cats?|kittens?|kitty' --out vectors/cats

    v = SteeringVector.load("vectors/cats")                       # then, with the client SDK:
    client.generate(..., interventions=[rc.direction(v.strength, vector=v.vector.tolist(), site=v.site)])

1. Examples: the model answers EXAMPLE_INSTRUCTIONS asked to mention the concept, and plainly;
   a pair is kept where the first is on the concept and the second is not (or `examples` gives
   the pairs as JSON lines).
2. The direction: `method` over each example's mean activation at `site` (rudder.core.vectors),
   or, for `trained`, a vector trained with the model (`train_vector`: the LM objective of
   AxBench's ReFT-r1 for a rank-1 steering vector: the positive answers made likely given the
   plain instructions, with the vector added at `site` on the prompt's positions).
3. Calibration: answers to CALIBRATION_INSTRUCTIONS at each strength (alpha = strength x the site's
   mean activation norm / 10, on every position; a trained vector's strengths default to 0.75-2x
   the norm it was trained to), scored by the unsteered model; the strength with
   the best success within the fluency budget is kept, and the whole curve is written with it.

Everything runs in this process: the model behind an in-process Rudder server (reference
backend) for the answers, and the plain model for activations and log-probs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import torch
from torch import Tensor
from tqdm import tqdm

from rudder import client as rc
from rudder.core.default_model import MODEL_NAME, default_model_dir
from rudder.core.errors import InvalidArgument
from rudder.core.sae import SAE
from rudder.core.vectors import SteeringVector, build, check_sae_site, pick_strength, top_features, write_gguf
from rudder.training.concepts import (
    CALIBRATION_INSTRUCTIONS,
    EXAMPLE_INSTRUCTIONS,
    Concept,
    Example,
    Judge,
    answer_all,
    ask,
    client_generator,
    score,
    summary,
    sweep,
    write_examples,
)
from rudder.training.config import DEFAULT_STRENGTHS, VectorTrainConfig
from rudder.training.lm import HookedLM


def read_pairs(path) -> list[Example]:
    """JSON lines of {"positive", "negative"[, "instruction"]} (a trained vector learns the positive
    as the answer to the instruction; without one, as plain text)."""
    if not path.is_file():
        raise InvalidArgument(f"examples file {path} does not exist; give JSON lines of positive/negative pairs")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out.append(Example(str(row.get("instruction", "")), str(row["positive"]), str(row["negative"])))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise InvalidArgument(f"{path}:{n}: expected a JSON object with 'positive' and 'negative' texts") from None
    if not out:
        raise InvalidArgument(f"{path} holds no example pairs; give one JSON line per pair")
    return out


def train_vector(lm: HookedLM, site: str, examples: Sequence[Example], steps: int = 40, lr: float = 0.3,
                 batch_size: int = 8, seed: int = 0, scope: str = "prompt", objective: str = "lm",
                 beta: float = 2.0) -> Tensor:
    """A steering vector v trained with the frozen model: v is added at `site` and trained (Adam,
    from zero) to make each positive answer likely given its plain instruction, mean cross-entropy
    over the answer's tokens (AxBench's LM objective for a rank-1 intervention, as ReFT-r1 without
    its detection half). `scope`: "prompt" adds v at the prompt's positions only, so it learns
    what the request to mention the concept did to the prompt, and the answer's own positions
    stay unedited (far more fluent here, docs/steering.md); "all" adds it everywhere.
    `objective` "preference" adds a SimPO-style term, as RePS does: -log sigmoid(beta x (the
    positive's mean log-prob per token - its plain answer's)), both under the steered model.
    Returns v unnormalised: its norm is the strength it was trained at."""
    if not examples:
        raise InvalidArgument("a trained vector needs positive examples; give at least one pair")
    if steps < 1 or not lr > 0:
        raise InvalidArgument(f"training a vector needs steps >= 1 and lr > 0, got steps={steps}, lr={lr}")
    if scope not in ("prompt", "all"):
        raise InvalidArgument(f"a trained vector acts on the prompt or on all positions, not {scope!r}")
    if scope == "prompt" and not all(e.instruction for e in examples):
        raise InvalidArgument("a prompt-scoped vector learns from answers to instructions; give each example an "
                              "\"instruction\", or train it on every position (--set scope=all)")
    if objective not in ("lm", "preference"):
        raise InvalidArgument(f"a trained vector's objective is lm or preference, not {objective!r}")
    tok, judge = lm.tokenizer, Judge(lm)
    seqs = []  # (prompt ids, positive ids, negative ids)
    for e in examples:
        if e.instruction:
            seqs.append((judge.prompt_ids(e.instruction),
                         list(e.positive_ids or tok(e.positive, add_special_tokens=False).input_ids),
                         list(tok(e.negative, add_special_tokens=False).input_ids)))
        else:  # plain text: every token after the first is learned
            ids, neg = tok(e.positive).input_ids, tok(e.negative).input_ids
            seqs.append((ids[:1], ids[1:], neg[1:]))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    v = torch.zeros(lm.shape.d_model, device=lm.device, requires_grad=True)
    opt = torch.optim.Adam([v], lr=lr)
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc=f"vector at {site}", unit="step")
    for _ in bar:
        batch = [seqs[j] for j in torch.randperm(len(seqs), generator=g)[:batch_size].tolist()]
        rows = [(p, a) for p, a, _ in batch]
        if objective == "preference":  # the plain answers too, to the same prompts
            rows += [(p, n) for p, _, n in batch]
        width = max(len(p) + len(a) for p, a in rows)
        ids = torch.full((len(rows), width), pad)
        target = torch.full((len(rows), width), -100)
        where = torch.ones(len(rows), width, 1, device=lm.device)
        for r, (p, a) in enumerate(rows):  # right-padded: causal attention never sees the padding
            ids[r, :len(p) + len(a)] = torch.tensor(p + a)
            target[r, len(p):len(p) + len(a)] = torch.tensor(a)
            if scope == "prompt":
                where[r, len(p):] = 0
        on = where[:, 1:]  # lm.run hands the replacement positions 1.. (the first is the attention sink)
        logits, _ = lm.run(ids, replace={site: lambda x, on=on: x + on * v})
        target = target[:, 1:].to(lm.device)
        tok_lp = -torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), target, reduction="none")
        mask = target != -100
        b = len(batch)
        loss = -tok_lp[:b][mask[:b]].mean()  # the LM objective: the positives' tokens
        if objective == "preference":  # SimPO-style, as RePS: the positive preferred to the plain answer
            mean_lp = (tok_lp * mask).sum(1) / mask.sum(1).clamp_min(1)
            loss = loss - torch.nn.functional.logsigmoid(beta * (mean_lp[:b] - mean_lp[b:])).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", norm=f"{v.norm().item():.1f}")
    return v.detach().cpu()


TRAINED_STRENGTHS = (0.75, 1.0, 1.25, 1.5, 2.0)
"""a trained vector's swept strengths, as multiples of the norm it was trained to"""


def make_vector(lm: HookedLM, method: str, site: str, examples: Sequence[Example],
                **train) -> tuple[Tensor, float, float]:
    """A unit direction at `site` by `method`; its natural unit of strength (the site's mean
    activation norm / 10 for directions from activations, the trained norm for a trained vector);
    and the site's mean activation norm over the negatives."""
    judge = Judge(lm)
    site_norm = judge.site_norm([e.negative for e in examples[:16]], site)
    if method == "trained":
        v = train_vector(lm, site, examples, **train)
        return v / v.norm().clamp_min(1e-12), float(v.norm()), site_norm
    pos = judge.text_activations([e.positive for e in examples], site)
    neg = judge.text_activations([e.negative for e in examples], site)
    return build(method, pos, neg), site_norm / 10, site_norm


def run(cfg: VectorTrainConfig, serve: Callable[[str], AbstractContextManager[str]]) -> SteeringVector:
    """`serve(model)`: a Rudder server on that model for the run's generations, as a context that gives its
    address (`rudder train vector` starts one on the reference backend; training imports no server)."""
    given = read_pairs(cfg.examples) if cfg.examples is not None else None  # a bad file fails before any load
    model = cfg.model or str(default_model_dir())
    lm = HookedLM.load(model)
    lm.site(cfg.site)  # a layer the model lacks fails here
    scope = cfg.scope or ("prompt" if cfg.method == "trained" else "all")
    if given is not None and scope == "prompt" and not all(e.instruction for e in given):
        raise InvalidArgument(f"{cfg.examples}: a prompt-scoped vector learns from answers to instructions; give "
                              "each line an \"instruction\", or --set scope=all")
    sae = SAE.load(cfg.sae) if cfg.sae is not None else None
    if sae is not None:
        check_sae_site(sae, cfg.site, cfg.sae.name)
    judge = Judge(lm)
    concept = Concept(cfg.concept, cfg.words or cfg.concept)
    t0 = time.perf_counter()
    with serve(model) as address, rc.Client(address, timeout=1800) as c:
        gen = client_generator(c, cfg.max_tokens, cfg.temperature)
        if given is not None:
            examples = given
        else:
            print(f"==> the model writes examples for {concept.name!r} ({cfg.num_examples} instructions, "
                  "2 samples each, asked to mention it and plainly)",
                  flush=True)
            examples = write_examples(gen, concept, EXAMPLE_INSTRUCTIONS[:cfg.num_examples])
        t_examples = time.perf_counter() - t0
        train = ({"steps": cfg.steps, "lr": cfg.lr, "scope": scope, "objective": cfg.objective}
                 if cfg.method == "trained" else {})
        vector, unit, site_norm = make_vector(lm, cfg.method, cfg.site, examples, **train)
        print(f"==> {cfg.method} vector at {cfg.site} from {len(examples)} pairs; site norm {site_norm:.1f}",
              flush=True)
        curve, chosen = [], None
        if cfg.calibrate:
            base = answer_all(gen, ask(CALIBRATION_INSTRUCTIONS, [], cfg.samples))
            base_lp = summary(score(judge, concept, base, CALIBRATION_INSTRUCTIONS), 0.0, cfg.budget)["mean_logprob"]
            strengths = cfg.strengths or (TRAINED_STRENGTHS if cfg.method == "trained" else DEFAULT_STRENGTHS)
            alphas = [s * unit for s in strengths]  # the curve is kept in the site's units
            values = vector.tolist()

            def at(alpha):
                return [rc.direction(alpha, vector=values, site=cfg.site, scope=rc.scope(scope))]

            print(f"==> calibrating on {len(CALIBRATION_INSTRUCTIONS)} instructions x {cfg.samples} answers, "
                  f"budget {cfg.budget} nats/token", flush=True)
            curve, _ = sweep(gen, judge, concept, CALIBRATION_INSTRUCTIONS, at, alphas, base_lp, cfg.budget,
                             samples=cfg.samples)
            chosen = pick_strength(curve, cfg.budget)
            if chosen is None:
                print(f"    no strength kept the fluency drop within {cfg.budget} nats/token; the vector is saved "
                      "uncalibrated: try smaller --strengths or another --site", flush=True)
    features = []
    if sae is not None:
        features = top_features(vector, cfg.site, sae, cfg.sae.name)
        print("==> its top features in " + cfg.sae.name + ": "
              + ", ".join(f"{f['feature']} ({f['cosine']:.2f})" for f in features[:5]), flush=True)
    out = SteeringVector(cfg.site, vector, cfg.method, features=features, scope=scope,
                         strength=chosen.strength if chosen else None,
                         site_norm=site_norm, model=cfg.model or MODEL_NAME, budget=cfg.budget, calibration=curve,
                         provenance={"concept": concept.name, "words": concept.words, "pairs": len(examples),
                                     "temperature": cfg.temperature, **({"objective": cfg.objective,
                                                                         "steps": cfg.steps, "lr": cfg.lr}
                                                                        if cfg.method == "trained" else {}),
                                     "examples": str(cfg.examples) if cfg.examples else "written by the model",
                                     "examples_s": round(t_examples, 1),
                                     "seconds": round(time.perf_counter() - t0, 1)})
    out.save(cfg.out)
    if cfg.gguf is not None:
        write_gguf(out, cfg.gguf, lm.shape.architecture)
        print(f"==> {cfg.gguf}: a llama.cpp control vector (llama-cli --control-vector {cfg.gguf})")
        if scope != "all":
            print(f"    note: llama.cpp adds a control vector at every position; this one was calibrated on the "
                  f"{scope} only", flush=True)
    if chosen:
        print(f"==> {cfg.out}: alpha {chosen.strength:.2f} ({chosen.on_topic:.0%} on topic, success "
              f"{chosen.success:.0%}, fluency drop {chosen.fluency_drop:.2f} nats/token)")
    else:
        print(f"==> {cfg.out}")
    return out
