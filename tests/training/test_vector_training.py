"""`rudder train vector` on a tiny model: the vector is the method's math over the model's own
activations, calibration writes its curve, and bad input is one line."""

from __future__ import annotations

import json

import pytest
import torch

from rudder.cli import main
from rudder.core.errors import InvalidArgument
from rudder.core.vectors import SteeringVector, diffmean
from rudder.training.concepts import Answer, Concept, Example, Judge, ask, repeated_trigrams, sweep
from rudder.training.lm import HookedLM
from rudder.training.vectors import train_vector

SITE = "blocks.1.hook_resid_post"
PAIRS = [("the cat sat on the mat with a kitten", "the car drove on the road with a truck"),
         ("my cat purrs and the kittens play", "my phone rings and the bells chime"),
         ("a cat chased a mouse at night", "a bus passed a stop at noon")]


@pytest.fixture
def pairs_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps({"positive": p, "negative": n}) for p, n in PAIRS) + "\n")
    return path


def test_train_vector_is_diffmean_over_the_models_activations_and_records_its_calibration(tiny_dir, tmp_path,
                                                                                         pairs_file):
    out = tmp_path / "cats"
    assert main(["train", "vector", "--model", str(tiny_dir), "--concept", "cats", "--words", "cats?|kittens?",
                 "--site", SITE, "--method", "diffmean", "--examples", str(pairs_file), "--out", str(out),
                 "--set", "strengths=[1,4]", "--set", "max_tokens=8", "--set", f"gguf={tmp_path / 'cats.gguf'}"]) == 0
    v = SteeringVector.load(out, d_model=64)
    from rudder.core.vectors import read_gguf
    exported = read_gguf(tmp_path / "cats.gguf", 64, "llama")
    assert exported.site == SITE
    torch.testing.assert_close(exported.vector, v.vector)
    judge = Judge(HookedLM.load(tiny_dir))
    by_hand = diffmean(judge.text_activations([p for p, _ in PAIRS], SITE),
                       judge.text_activations([n for _, n in PAIRS], SITE))
    torch.testing.assert_close(v.vector, by_hand / by_hand.norm())
    assert (v.site, v.method, v.provenance["pairs"], v.budget) == (SITE, "diffmean", 3, 1.0)
    unit = v.site_norm / 10
    assert [p.strength for p in v.calibration] == pytest.approx([1 * unit, 4 * unit])
    assert v.strength is None or v.strength in [p.strength for p in v.calibration]


def _answer_loss(lm: HookedLM, examples: list[Example], v: torch.Tensor, scope: str = "all",
                 objective: str = "lm", beta: float = 2.0) -> torch.Tensor:
    """By hand: v added to the layer's output at every position after the first (or at the
    prompt's only), through a plain PyTorch hook; the mean cross-entropy of each answer's tokens
    given its chat prompt; for "preference", minus the mean log-sigmoid of beta x (the positive's
    mean log-prob per token - the negative's), one example at a time."""
    judge, tok = Judge(lm), lm.tokenizer
    layer = int(SITE.split(".")[1])
    end = [0]

    def add(module, args, out):
        hidden = out[0] if isinstance(out, tuple) else out
        stop = end[0] if scope == "prompt" else hidden.shape[1]
        hidden = torch.cat([hidden[:, :1], hidden[:, 1:stop] + v, hidden[:, stop:]], dim=1)
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    def nll(prompt, answer):  # summed over the answer's tokens
        end[0] = len(prompt)
        logits = lm.model(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1:-1]
        return torch.nn.functional.cross_entropy(logits, torch.tensor(answer), reduction="sum")

    handle = lm.model.model.layers[layer].register_forward_hook(add)
    try:
        total, count, prefer = 0.0, 0, 0.0
        for e in examples:
            prompt = judge.prompt_ids(e.instruction)
            answer, plain = (tok(t, add_special_tokens=False).input_ids for t in (e.positive, e.negative))
            pos = nll(prompt, answer)
            total, count = total + pos, count + len(answer)
            if objective == "preference":
                margin = -pos / len(answer) + nll(prompt, plain) / len(plain)
                prefer = prefer - torch.nn.functional.logsigmoid(beta * margin) / len(examples)
        return total / count + prefer
    finally:
        handle.remove()


@pytest.mark.parametrize("scope,objective", [("prompt", "lm"), ("all", "lm"), ("prompt", "preference")])
def test_a_trained_vector_takes_adams_first_step_down_the_hand_computed_gradient(tiny_dir, scope, objective):
    lm = HookedLM.load(tiny_dir)
    examples = [Example(f"Tell me something, {k}.", p, n) for k, (p, n) in enumerate(PAIRS)]
    v0 = torch.zeros(lm.shape.d_model, requires_grad=True)
    _answer_loss(lm, examples, v0, scope, objective).backward()
    one_step = train_vector(lm, SITE, examples, steps=1, lr=0.05, batch_size=len(examples), scope=scope,
                            objective=objective)
    # Adam's first step from zero is lr x sign(gradient), element-wise
    torch.testing.assert_close(one_step, -0.05 * torch.sign(v0.grad), atol=1e-4, rtol=0)
    trained = train_vector(lm, SITE, examples, steps=30, lr=0.05, scope=scope, objective=objective)
    with torch.no_grad():
        zero = _answer_loss(lm, examples, torch.zeros_like(trained), scope, objective)
        assert _answer_loss(lm, examples, trained, scope, objective) < zero - 0.05


def test_train_vector_trained_is_train_vector_on_the_pairs_calibrated_in_multiples_of_its_norm(tiny_dir, tmp_path,
                                                                                               pairs_file):
    out = tmp_path / "cats"
    assert main(["train", "vector", "--model", str(tiny_dir), "--concept", "cats", "--words", "cats?|kittens?",
                 "--site", SITE, "--method", "trained", "--examples", str(pairs_file), "--out", str(out),
                 "--set", "scope=all", "--set", "steps=5", "--set", "strengths=[0.5,1]", "--set", "max_tokens=8"]) == 0
    v = SteeringVector.load(out, d_model=64)
    by_hand = train_vector(HookedLM.load(tiny_dir), SITE, [Example("", p, n) for p, n in PAIRS], steps=5, scope="all")
    torch.testing.assert_close(v.vector, by_hand / by_hand.norm())
    assert (v.method, v.scope) == ("trained", "all")
    assert [p.strength for p in v.calibration] == pytest.approx([0.5 * float(by_hand.norm()), float(by_hand.norm())])


def test_a_trained_vector_refuses_no_examples_or_a_bad_schedule(tiny_dir):
    lm = HookedLM.load(tiny_dir)
    with pytest.raises(InvalidArgument, match="needs positive examples"):
        train_vector(lm, SITE, [])
    with pytest.raises(InvalidArgument, match="steps >= 1 and lr > 0"):
        train_vector(lm, SITE, [Example("", "a cat", "a car")], steps=0)
    with pytest.raises(InvalidArgument, match="give each example an \"instruction\", or train it on every position"):
        train_vector(lm, SITE, [Example("", "a cat", "a car")])
    with pytest.raises(InvalidArgument, match="objective is lm or preference"):
        train_vector(lm, SITE, [Example("", "a cat", "a car")], scope="all", objective="dpo")


@pytest.mark.parametrize("flags,message", [
    (["--site", "blocks.9.hook_resid_post"], "layers 0..2"),
    (["--budget", "0"], "budget"),
    (["--method", "lat"], "method"),
    (["--set", "strengths=[1,nan]"], "strengths must be finite"),
])
def test_bad_settings_are_one_line_errors(tiny_dir, tmp_path, pairs_file, flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "vector", "--model", str(tiny_dir), "--concept", "cats", "--examples", str(pairs_file),
              "--out", str(tmp_path / "v"), *flags])
    assert message in str(e.value) and not (tmp_path / "v").exists()


def test_an_examples_file_without_pairs_is_refused(tiny_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"positive": "only one side"}\n')
    with pytest.raises(SystemExit, match="bad.jsonl:1: expected a JSON object with 'positive' and 'negative'"):
        main(["train", "vector", "--model", str(tiny_dir), "--concept", "cats", "--examples", str(bad),
              "--out", str(tmp_path / "v")])


def test_the_concept_classifier_and_repetition_measure():
    c = Concept("cats", r"cats?|kittens?")
    assert c.on("Two Kittens slept.") and not c.on("The category is wrong.")
    assert repeated_trigrams("a b c a b c a b c") == pytest.approx(1 - 3 / 7)
    assert repeated_trigrams("one two three four") == 0.0


def test_a_sweep_answers_each_instruction_samples_times_and_scores_each_answer_against_its_own():
    """Answer k of a sweep answers instruction k % n (as `score` reads it), each sample with its own
    seed, and a strength's summary covers instructions x samples answers."""
    instructions = ["first?", "second?", "third?"]
    seen = []

    def gen(instruction, seed, interventions):
        seen.append((instruction, seed, interventions[0]))
        on = interventions[0] >= 2 and seed < 1000  # on topic: strong enough, first sample only
        return Answer(instruction, [], [1, 2], f"{'cats' if on else 'dogs'} for {instruction}")

    class FixedJudge:
        def logprob(self, instruction, ids):
            return -1.0 if instruction == "first?" else -2.0

    curve, rows = sweep(gen, FixedJudge(), Concept("cats", "cats"), instructions, lambda s: [s], [1, 2],
                        base_logprob=-1.5, progress=lambda m: None, samples=2)
    assert sorted(seen) == sorted((i, 1000 * s + k, st) for st in (1, 2) for s in (0, 1)
                                  for k, i in enumerate(instructions))
    assert [p.on_topic for p in curve] == [0.0, 0.5] and rows["2"]["n"] == 6
    # relevance: own instruction minus the next one's (first: -1 - -2; second: -2 - -2; third: -2 - -1)
    assert rows["2"]["relevance"] == pytest.approx((1 + 0 - 1) / 3)
    assert ask(instructions, [], samples=1, seed=5) == [("first?", 5, []), ("second?", 6, []), ("third?", 7, [])]
    with pytest.raises(InvalidArgument, match="samples"):
        ask(instructions, [], samples=0)
