"""TokFSM, the finite-state-machine dataset of Codebook Features (Tamkin et al. 2023, §4).

A fixed random graph: `num_states` states, each with `num_edges` distinct successors,
all equally likely. A state is written as its zero-padded decimal digits, one token
per digit (100 states: "00".."99"); a sequence is BOS followed by 128 tokens (64
states) of a random walk from a uniformly random start. The tokenizer has the ten
digits (ids 0-9) and BOS (id 10), so vocab_size is 11 as in the paper's model.

    fsm = TokFSM.build()                       # 100 states x 10 edges, seed 42
    ids = fsm.sample(128, generator)           # (128, 129) token ids, BOS first
    fsm.transition_accuracy(states)            # fraction of valid consecutive transitions

The model is the paper's small GPT-NeoX (hidden 128, 4 layers, 4 heads, MLP 512),
trained here from scratch: `rudder train tokfsm --out DIR`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from torch import Tensor, nn
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

from rudder.training.config import TokFSMTrainConfig, warmup_decay

BOS = 10
DIGITS = 10
FSM_FILE = "tokfsm.json"


@dataclass(frozen=True)
class TokFSM:
    successors: np.ndarray  # (num_states, num_edges), each row distinct states
    seed: int = 42

    @classmethod
    def build(cls, num_states: int = 100, num_edges: int = 10, seed: int = 42) -> TokFSM:
        rng = np.random.default_rng(seed)
        succ = np.stack([rng.choice(num_states, size=num_edges, replace=False) for _ in range(num_states)])
        return cls(np.sort(succ, axis=1), seed)

    @property
    def num_states(self) -> int:
        return self.successors.shape[0]

    @property
    def num_edges(self) -> int:
        return self.successors.shape[1]

    @property
    def digits(self) -> int:
        return len(str(self.num_states - 1))

    @property
    def transitions(self) -> np.ndarray:
        """(num_states, num_states) boolean: transitions[s, t] when t is a successor of s."""
        m = np.zeros((self.num_states, self.num_states), dtype=bool)
        np.put_along_axis(m, self.successors, True, axis=1)
        return m

    def state_text(self, state: int) -> str:
        return str(state).zfill(self.digits)

    def walk(self, n: int, states: int, generator: torch.Generator, start: Tensor | None = None) -> Tensor:
        """(n, states) random walks; `start` (n,) fixes the first state."""
        succ = torch.from_numpy(self.successors)
        out = torch.empty(n, states, dtype=torch.long)
        out[:, 0] = torch.randint(self.num_states, (n,), generator=generator) if start is None else start
        for i in range(1, states):
            pick = torch.randint(self.num_edges, (n,), generator=generator)
            out[:, i] = succ[out[:, i - 1], pick]
        return out

    def encode(self, states: Tensor) -> Tensor:
        """(n, s) states -> (n, 1 + s·digits) token ids, BOS first."""
        powers = 10 ** torch.arange(self.digits - 1, -1, -1)
        digits = (states[..., None] // powers) % 10  # (n, s, digits)
        bos = torch.full((states.shape[0], 1), BOS, dtype=torch.long)
        return torch.cat([bos, digits.flatten(1)], dim=1)

    def decode(self, ids: Tensor) -> Tensor:
        """(n, 1 + s·digits) ids (BOS first) -> (n, s) states; a non-digit gives state -1."""
        body = ids[:, 1:]
        body = body[:, : body.shape[1] // self.digits * self.digits].reshape(ids.shape[0], -1, self.digits)
        powers = 10 ** torch.arange(self.digits - 1, -1, -1)
        states = (body * powers).sum(-1)
        return torch.where((body < DIGITS).all(-1), states, torch.full_like(states, -1))

    def sample(self, n: int, generator: torch.Generator, tokens: int = 128) -> Tensor:
        return self.encode(self.walk(n, tokens // self.digits, generator))

    def valid_transitions(self, states: Tensor) -> Tensor:
        """(n, s-1) boolean: consecutive states (a, b) where b is a successor of a (never for state -1)."""
        a, b = states[:, :-1], states[:, 1:]
        return torch.from_numpy(self.transitions)[a.clamp(min=0), b.clamp(min=0)] & (a >= 0) & (b >= 0)

    def transition_accuracy(self, states: Tensor) -> float:
        """Fraction of consecutive state pairs (a, b) where b is a successor of a."""
        return self.valid_transitions(states).float().mean().item()

    def save(self, folder: Path) -> None:
        (folder / FSM_FILE).write_text(json.dumps({"seed": self.seed, "successors": self.successors.tolist()}))

    @classmethod
    def load(cls, folder: str | Path) -> TokFSM:
        raw = json.loads((Path(folder) / FSM_FILE).read_text())
        return cls(np.array(raw["successors"]), raw["seed"])


def make_tokenizer() -> PreTrainedTokenizerFast:
    """One token per digit, BOS prepended; anything but a digit is an unknown token."""
    vocab = {str(d): d for d in range(DIGITS)} | {"<bos>": BOS, "<unk>": BOS + 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", unk_token="<unk>", pad_token="<bos>")


def make_model(seed: int = 0, hidden: int = 128, layers: int = 4, heads: int = 4, mlp: int = 512) -> GPTNeoXForCausalLM:
    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(
        vocab_size=BOS + 2, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=mlp, max_position_embeddings=256, rotary_pct=1.0, use_parallel_residual=False,
        bos_token_id=BOS, eos_token_id=None, pad_token_id=BOS, tie_word_embeddings=False,
    )
    return GPTNeoXForCausalLM(cfg)


# ---------------------------------------------------------------- metrics


@torch.no_grad()
def generate_walks(model: nn.Module, fsm: TokFSM, start: Tensor, new_states: int, greedy: bool) -> Tensor:
    """Continue BOS + each start state for `new_states` states; returns the ids (n, 1 + (1 + new_states)·digits)."""
    ids = fsm.encode(start[:, None]).to(next(model.parameters()).device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_states * fsm.digits,
                         min_new_tokens=new_states * fsm.digits, do_sample=not greedy, top_k=None, top_p=1.0,
                         temperature=1.0, pad_token_id=BOS, bad_words_ids=[[BOS], [BOS + 1]])
    return out.cpu()


def walk_errors(fsm: TokFSM, ids: Tensor) -> dict[str, float | None]:
    """How generated walks (n, L) go wrong: the share with no invalid transition, and, after a walk's
    first invalid transition, the share of valid ones when the walk is read one digit later (a walk
    that slipped a digit continues validly out of phase, and every later pair counts as an error)."""
    ok = fsm.valid_transitions(fsm.decode(ids))
    shifted = fsm.valid_transitions(fsm.decode(torch.cat([ids[:, :1], ids[:, 2:]], dim=1)))  # drop the first digit
    first_error = (~ok).int().argmax(1)
    after = torch.arange(shifted.shape[1])[None] > first_error[:, None]  # shifted pair j starts inside state j+1
    after &= ~ok.all(1, keepdim=True)
    return {"walks_without_error": ok.all(1).float().mean().item(),
            "valid_out_of_phase_after_first_error": shifted[after].float().mean().item() if after.any() else None}


@torch.no_grad()
def next_state_probs(model: nn.Module, fsm: TokFSM, prefixes: Tensor) -> Tensor:
    """P(next state | prefix) for each prefix (n, L) of ids ending on a state boundary: (n, num_states).

    Two-digit states only: P(d1 d2) = P(d1 | prefix) · P(d2 | prefix, d1)."""
    if fsm.digits != 2:
        raise ValueError("next_state_probs handles two-digit states")
    n = prefixes.shape[0]
    device = next(model.parameters()).device
    first = torch.arange(DIGITS).repeat(n)
    extended = torch.cat([prefixes.repeat_interleave(DIGITS, 0), first[:, None]], dim=1).to(device)
    probs = model(extended).logits[:, -2:, :DIGITS].float().softmax(-1).cpu()  # (n·10, 2, 10)
    p1 = probs[:, 0].reshape(n, DIGITS, DIGITS)[:, 0]  # P(d1 | prefix), same for every extension
    p2 = probs[:, 1].reshape(n, DIGITS, DIGITS)  # P(d2 | prefix, d1)
    return (p1[:, :, None] * p2).reshape(n, fsm.num_states)


def first_transition_accuracy(model: nn.Module, fsm: TokFSM) -> float:
    """For every state, the share of its true successors among the model's top num_edges next states."""
    states = torch.arange(fsm.num_states)
    top = next_state_probs(model, fsm, fsm.encode(states[:, None])).topk(fsm.num_edges, dim=-1).indices
    truth = torch.from_numpy(fsm.transitions)
    return truth.gather(1, top).float().mean().item()


def invalid_next_state_mass(model: nn.Module, fsm: TokFSM, ids: Tensor, every: int = 8) -> float:
    """Teacher-forced: the mean probability the model gives to non-successors as the next state, at every
    `every`-th state boundary of held-out walks (n, L)."""
    states = fsm.decode(ids)
    mass = []
    for i in range(every - 1, states.shape[1] - 1, every):
        probs = next_state_probs(model, fsm, ids[:, : 1 + fsm.digits * (i + 1)])
        mass.append((probs * ~torch.from_numpy(fsm.transitions)[states[:, i]]).sum(-1))
    return torch.cat(mass).mean().item()


def evaluate(model: nn.Module, fsm: TokFSM, n: int = 256, new_states: int = 63, seed: int = 1) -> dict[str, float]:
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(fsm.num_states, (n,), generator=g)
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    sampled = generate_walks(model, fsm, start, new_states, greedy=False)
    greedy = generate_walks(model, fsm, start, new_states, greedy=True)
    mass = invalid_next_state_mass(model, fsm, fsm.sample(64, g))  # next_state_probs runs without grad
    out = {
        "transition_accuracy_sampled": fsm.transition_accuracy(fsm.decode(sampled)),
        "transition_accuracy_greedy": fsm.transition_accuracy(fsm.decode(greedy)),
        "first_transition_accuracy": first_transition_accuracy(model, fsm),
        "invalid_next_state_mass": mass,
        **{f"sampled_{k}": v for k, v in walk_errors(fsm, sampled).items()},
    }
    model.train(was_training)
    return out


# ---------------------------------------------------------------- training the base model


CURVE_FILE = "tokfsm_curve.json"
CHECKPOINT_FILE = "checkpoint.pt"
PAPER_STATE_ACCURACY = 0.9677  # Table 1, no codebook


def train_base(out: Path, steps: int = 1000, batch: int = 128, lr: float = 1e-3, warmup: int = 100,
               seed: int = 0, fsm: TokFSM | None = None, log_every: int = 50, schedule: str = "cosine",
               eval_every: int = 0, resume: bool = False, device: str = "cpu") -> dict[str, float]:
    """Train the paper's TokFSM model from scratch and save it (with tokenizer and FSM) to `out`.

    With `eval_every`, every so many steps the state accuracy of sampled walks goes into the learning
    curve (`out/tokfsm_curve.json`, with tokens seen) and a checkpoint is written; `resume` continues
    from it, so a long run can stop and go on (a constant schedule lets it go on past `steps`)."""
    from tqdm import tqdm

    from rudder.training.codebook import lm_loss

    fsm = fsm or TokFSM.build()
    model = make_model(seed).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_decay(s, steps, warmup, schedule))
    g = torch.Generator().manual_seed(seed)
    first, curve, seconds = 0, [], 0.0
    checkpoint = out / CHECKPOINT_FILE
    if resume:
        if not checkpoint.exists():
            raise FileNotFoundError(f"--resume: no {checkpoint}; run once with --eval-every N to write one")
        state = torch.load(checkpoint, weights_only=False, map_location="cpu")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        g.set_state(state["generator"])
        first, curve, seconds, fsm = state["step"], state["curve"], state["seconds"], TokFSM(**state["fsm"])
    model.train()
    start = time.perf_counter() - seconds
    bar = tqdm(range(first, steps), desc="tokfsm base", unit="step", initial=first, total=steps)
    loss = torch.tensor(float("nan"))
    for step in bar:
        ids = fsm.sample(batch, g).to(device)
        loss, _ = lm_loss(model(ids).logits, ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if eval_every and ((step + 1) % eval_every == 0 or step == steps - 1):
            point = {"step": step + 1, "tokens": (step + 1) * batch * ids.shape[1], "loss": loss.item(),
                     "seconds": round(time.perf_counter() - start, 1),
                     "state_accuracy": evaluate(model, fsm, n=128)["transition_accuracy_sampled"]}
            curve.append(point)
            bar.write(f"step {point['step']}: {point['tokens']:,} tokens, state accuracy {point['state_accuracy']:.4f}")
            out.mkdir(parents=True, exist_ok=True)
            staging = checkpoint.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "generator": g.get_state(), "step": step + 1, "curve": curve, "fsm": fsm.__dict__,
                        "seconds": time.perf_counter() - start}, staging)
            staging.replace(checkpoint)  # a run killed mid-save keeps the last checkpoint
            (out / CURVE_FILE).write_text(json.dumps({"batch": batch, "lr": lr, "schedule": schedule, "curve": curve,
                                                      "projection": project(curve)}, indent=2))
    final_loss = loss.item() if first < steps or not curve else curve[-1]["loss"]  # a resume with no steps left
    metrics = {"steps": steps, "batch": batch, "train_seconds": round(time.perf_counter() - start, 1),
               "final_loss": final_loss, "loss_floor": _loss_floor(fsm)}
    metrics |= evaluate(model, fsm)
    save_model(model.cpu(), fsm, out, metrics)
    return metrics


def project(curve: list[dict], target: float = PAPER_STATE_ACCURACY, last: int = 4) -> dict | None:
    """Tokens to reach `target` state accuracy: where the curve first reached it, else a projection
    from a power law of the error (1 - accuracy) against tokens fitted to the curve's last points:
    error = a * tokens^b."""
    reached = next((p for p in curve if p["state_accuracy"] >= target), None)
    if reached is not None:
        return {"target": target, "reached_at_tokens": reached["tokens"], "reached_at_step": reached["step"]}
    points = [(p["tokens"], 1 - p["state_accuracy"]) for p in curve[-last:] if p["state_accuracy"] < 1]
    if len(points) < 2:
        return None
    x = np.log([t for t, _ in points])
    y = np.log([e for _, e in points])
    b, a = np.polyfit(x, y, 1)
    if b >= 0:
        return {"target": target, "slope": float(b), "tokens": None, "note": "the error is not falling"}
    return {"target": target, "slope": float(b), "tokens": float(np.exp((np.log(1 - target) - a) / b))}


def _loss_floor(fsm: TokFSM, tokens: int = 128) -> float:
    """Mean per-token cross-entropy of a perfect model: the first state is uniform, then each
    state carries ln(num_edges) spread over its digits."""
    states = tokens // fsm.digits
    return (math.log(fsm.num_states) + (states - 1) * math.log(fsm.num_edges)) / tokens


def save_model(model: nn.Module, fsm: TokFSM, out: Path, metrics: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    make_tokenizer().save_pretrained(out)
    fsm.save(out)
    (out / "tokfsm_metrics.json").write_text(json.dumps(metrics, indent=2))


def run(cfg: TokFSMTrainConfig) -> dict[str, float]:
    """`rudder train tokfsm`."""
    metrics = train_base(cfg.out, cfg.steps, cfg.batch, cfg.lr, seed=cfg.seed, schedule=cfg.schedule,
                         eval_every=cfg.eval_every, resume=cfg.resume, device=cfg.device)
    print(json.dumps(metrics, indent=2))
    return metrics


def model_metrics(folder: Path) -> dict[str, float]:
    """`rudder analyze tokfsm MODEL`: the TokFSM metrics of a model folder, its codebooks on."""
    from contextlib import nullcontext

    from transformers import AutoModelForCausalLM

    from rudder.core.codebook import CONFIG_FILE, load_codebooks
    from rudder.training.codebook import snapping

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    codebooks = {cb.cfg.id: cb for cb in load_codebooks(folder)} if (folder / CONFIG_FILE).exists() else {}
    with snapping(model, codebooks) if codebooks else nullcontext():
        return evaluate(model, TokFSM.load(folder))
