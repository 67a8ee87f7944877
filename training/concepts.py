"""Concepts to steer toward, and how well a steering lands: the measures the calibration and the
steering benchmark (bench/steering_quality.py) share.

    judge = Judge(lm)                                           # the unsteered model scores answers
    ex = write_examples(gen, concept, instructions)             # the served model writes both sides
    v = vectors.build("diffmean", judge.text_activations([e.positive for e in ex], site),
                      judge.text_activations([e.negative for e in ex], site))
    curve = sweep(client, judge, concept, instructions, arms)   # concept rate and fluency per strength

A sample is a *success* when it is on the concept (a word classifier, as the codebook paper's
Table 3), its mean log-prob per token under the unsteered model is no more than `budget` nats
below the unsteered answers' mean, and at most 10% of its word trigrams repeat (a steering that
makes the model chant the concept word is not a success).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

from rudder import client as rc
from rudder.core.errors import InvalidArgument
from rudder.core.vectors import CalibrationPoint
from rudder.training.lm import HookedLM

MAX_REPEATED_TRIGRAMS = 0.10
MENTION = "{instruction} Mention {concept} in your answer."
"""the prompting arm (AxBench's prompt baseline, in the codebook paper's words)"""

INSTRUCTIONS = [  # neutral requests
    "Write a short paragraph.", "Tell me something.", "Write a few sentences about anything.", "Say something to me.",
    "Describe a place you like.", "Give me some advice for today.", "Tell me a short story.",
    "Write a few lines about the weekend.", "What should I do this evening?", "Describe your ideal day.",
    "Write a short note to a friend.", "Tell me about something interesting.",
    "Write a short paragraph about your morning.", "Share a thought with me.", "Describe something you enjoy.",
    "Write a few sentences for a postcard.", "Tell me what you did yesterday.", "Give me an idea for a hobby.",
    "Write a short diary entry.", "Tell me a fun fact.", "Describe a memorable moment.",
    "Write a short welcome message.", "Suggest something to talk about.", "Write two sentences about home.",
]
EXAMPLE_INSTRUCTIONS = [  # the model writes the vectors' examples on these (none is evaluated)
    "Write a sentence about your day.", "Tell me about a trip.", "Describe a room.", "Write about a friend.",
    "Write a short blog intro.", "Describe a season.", "Tell me about a job.", "Write about a city.",
    "Describe a meal you remember.", "Write a short poem.", "Tell me about a book.", "Describe a street.",
    "Write about learning something new.", "Tell me about the news.", "Describe a garden.", "Write a thank-you note.",
    "Tell me about school.", "Describe the sky tonight.", "Write about a rainy day.", "Tell me about a game.",
    "Describe a market.", "Write about a holiday.", "Tell me about a neighbour.", "Describe a morning walk.",
    "Write an opening line for a novel.", "Tell me about a museum.", "Describe a train ride.",
    "Write about a birthday.", "Tell me about a river.", "Describe a kitchen.", "Write about a new habit.",
    "Tell me about a song you heard.",
]
CALIBRATION_INSTRUCTIONS, REPORT_INSTRUCTIONS = INSTRUCTIONS[:12], INSTRUCTIONS[12:]
"""strengths are calibrated on the first half; the benchmark reports on the second"""
SAMPLES = 2
"""answers per instruction in a calibration or a report: at 12 instructions and one answer each, a
success rate moves by ~14 points between seeds, enough to pick the wrong strength"""


@dataclass(frozen=True)
class Concept:
    name: str
    words: str  # regex alternatives the classifier counts as on the concept, e.g. r"cats?|kittens?"

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise InvalidArgument("a concept needs a name (the word used in prompts, e.g. 'cats')")
        try:
            re.compile(self.words)
        except re.error as e:
            raise InvalidArgument(f"concept {self.name!r}: words {self.words!r} is not a regex: {e}") from e

    def on(self, text: str) -> bool:
        return re.search(rf"(?i)\b(?:{self.words})\b", text) is not None


def repeated_trigrams(text: str) -> float:
    """The share of word trigrams that repeat an earlier one."""
    words = text.lower().split()
    grams = list(zip(words, words[1:], words[2:]))
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


@dataclass
class Answer:
    instruction: str
    chat: list[dict]
    ids: list[int]
    text: str


class Judge:
    """The unsteered model: log-probabilities of answers and activations of texts."""

    def __init__(self, lm: HookedLM):
        self.lm = lm
        self.tok = lm.tokenizer

    def prompt_ids(self, instruction: str) -> list[int]:
        return list(self.tok.apply_chat_template([{"role": "user", "content": instruction}],
                                                 add_generation_prompt=True, tokenize=True, return_dict=False))

    @torch.no_grad()
    def logprob(self, instruction: str, ids: Sequence[int]) -> float:
        """Mean log-prob per token of answer `ids` after the chat prompt of `instruction`."""
        if not ids:
            return float("nan")
        prompt = self.prompt_ids(instruction)
        x = torch.tensor([prompt + list(ids)])
        logits, _ = self.lm.run(x)
        lp = torch.log_softmax(logits[0, len(prompt) - 1:-1], -1)
        return lp.gather(-1, torch.tensor(list(ids))[:, None]).mean().item()

    @torch.no_grad()
    def text_activations(self, texts: Sequence[str], site: str) -> Tensor:
        """One row per text: its mean activation at `site` over its tokens (the sink position left out)."""
        rows = []
        for text in texts:
            ids = self.tok(text, return_tensors="pt").input_ids
            if ids.shape[1] < 2:
                raise InvalidArgument(f"example {text!r} is under two tokens; give sentences")
            rows.append(self.lm.activations(ids, [site])[site].mean(0))
        return torch.stack(rows)

    @torch.no_grad()
    def site_norm(self, texts: Sequence[str], site: str) -> float:
        """Mean norm of the activations at `site` over `texts`' tokens (strengths are multiples of it)."""
        norms = [self.lm.activations(self.tok(t, return_tensors="pt").input_ids, [site])[site].norm(dim=-1).mean()
                 for t in texts]
        return float(torch.stack(norms).mean())


Generate = Callable[[str, int, list], Answer]


def client_generator(client: rc.Client, max_tokens: int = 48, temperature: float = 1.0) -> Generate:
    """Answers through a Rudder server: `gen(instruction, seed, interventions)`."""

    def gen(instruction: str, seed: int, interventions: list) -> Answer:
        chat = [{"role": "user", "content": instruction}]
        toks = list(client.generate(chat=chat, max_tokens=max_tokens, temperature=temperature, seed=seed,
                                    interventions=interventions))
        return Answer(instruction, chat, [t.id for t in toks], "".join(t.text for t in toks))

    return gen


def ask(instructions: Sequence[str], interventions: list, samples: int = SAMPLES, seed: int = 0,
        prompt: Callable[[str], str] = lambda i: i) -> list[tuple[str, int, list]]:
    """Jobs for `answer_all`: `samples` answers per instruction, sample-major, so answer k answers
    `instructions[k % len(instructions)]` (as `score` reads them); the seeds of one sample are
    seed + k, the next sample's seed + k + 1000."""
    if samples < 1:
        raise InvalidArgument(f"samples is the number of answers per instruction: >= 1, got {samples}")
    return [(prompt(i), seed + 1000 * s + k, interventions) for s in range(samples) for k, i in enumerate(instructions)]


def answer_all(gen: Generate, jobs: list[tuple[str, int, list]], concurrency: int = 16) -> list[Answer]:
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(lambda j: gen(*j), jobs))


@dataclass
class Example:
    instruction: str  # the plain instruction (the positive was asked to mention the concept besides)
    positive: str
    negative: str
    positive_ids: list[int] | None = None  # the positive's tokens as generated (None: tokenize the text)


def write_examples(gen: Generate, concept: Concept, instructions: Sequence[str], seed: int = 1000,
                   samples: int = 2, concurrency: int = 16) -> list[Example]:
    """The served model writes both sides, `samples` times per instruction: an answer asked to
    mention the concept (kept if it does) and a plain answer (kept if it does not), paired."""
    jobs = [(i, seed + k + 100 * s) for s in range(samples) for k, i in enumerate(instructions)]
    answers = answer_all(gen, [(MENTION.format(instruction=i, concept=concept.name), sd, []) for i, sd in jobs]
                         + [(i, sd, []) for i, sd in jobs], concurrency)  # both sides at once: one batch
    asked, plain = answers[:len(jobs)], answers[len(jobs):]
    out = [Example(i, a.text, b.text, a.ids) for (i, _), a, b in zip(jobs, asked, plain)
           if concept.on(a.text) and not concept.on(b.text) and len(a.ids) > 1 and len(b.ids) > 1]
    if not out:
        raise InvalidArgument(f"the model never mentioned {concept.name!r} when asked to (or always did unasked) "
                              f"over {len(jobs)} answers; check the concept's words {concept.words!r}")
    return out


@dataclass
class Scored:
    on_topic: bool
    logprob: float
    repeated: float
    relevance: float  # log-prob given its own instruction minus given another's (does it still answer?)
    text: str


def score(judge: Judge, concept: Concept, answers: list[Answer], instructions: Sequence[str]) -> list[Scored]:
    """Each answer scored under the unsteered model, given the user's plain instruction (the
    prompting arm's answers too, so every arm is read the same way)."""
    out = []
    for k, a in enumerate(answers):
        plain = instructions[k % len(instructions)]
        other = instructions[(k + 1) % len(instructions)]
        own = judge.logprob(plain, a.ids)
        rel = own - judge.logprob(other, a.ids) if len(instructions) > 1 else float("nan")
        out.append(Scored(concept.on(a.text), own, repeated_trigrams(a.text), rel, a.text))
    return out


def summary(scored: list[Scored], base_logprob: float, budget: float) -> dict:
    """Concept rate, fluency drop (nats/token below `base_logprob`), success and the rest, for a set."""
    n = len(scored)
    lp = [s.logprob for s in scored if s.logprob == s.logprob]
    mean_lp = sum(lp) / len(lp) if lp else float("nan")
    ok = [s.on_topic and s.logprob >= base_logprob - budget and s.repeated <= MAX_REPEATED_TRIGRAMS for s in scored]
    rel = [s.relevance for s in scored if s.relevance == s.relevance]
    return {"on_topic": sum(s.on_topic for s in scored) / n, "success": sum(ok) / n,
            "mean_logprob": mean_lp, "fluency_drop": base_logprob - mean_lp,
            "repeated_trigrams": sum(s.repeated for s in scored) / n,
            "relevance": sum(rel) / len(rel) if rel else float("nan"), "n": n,
            "examples": [s.text for s in scored[:3]]}


def sweep(gen: Generate, judge: Judge, concept: Concept, instructions: Sequence[str],
          interventions_at: Callable[[float], list], strengths: Sequence[float], base_logprob: float,
          budget: float = 1.0, prompt: Callable[[str], str] = lambda i: i, seed: int = 0,
          concurrency: int = 16, progress: Callable[[str], None] = print,
          samples: int = SAMPLES) -> tuple[list[CalibrationPoint], dict]:
    """Answer `instructions` (`samples` times each) at each strength; the calibration curve and each
    strength's summary."""
    curve, rows = [], {}
    jobs = [j for s in strengths for j in ask(instructions, interventions_at(s), samples, seed, prompt)]
    answers = answer_all(gen, jobs, concurrency)  # every strength at once: the server batches them
    n = len(instructions) * samples
    for j, s in enumerate(strengths):
        row = summary(score(judge, concept, answers[j * n:(j + 1) * n], instructions), base_logprob, budget)
        rows[f"{s:g}"] = row
        curve.append(CalibrationPoint(s, row["on_topic"], row["fluency_drop"], row["success"],
                                      row["repeated_trigrams"]))
        progress(f"  {concept.name} strength {s:g}: {row['on_topic']:.0%} on topic, success {row['success']:.0%}, "
                 f"fluency drop {row['fluency_drop']:.2f}")
    return curve, rows
