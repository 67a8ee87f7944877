"""The TokFSM codebook results of Codebook Features §4: codes for states, and steering with them.

    rudder analyze tokfsm-codes MODEL_DIR        # prints the table, writes tokfsm_codes.json

- State codes. The model has read state S at the position of S's last digit. For
  every codebook, head and code: precision = P(state is S | code fires there) and
  recall = P(code fires | state is S), on held-out walks (the code index). The best
  code of S is the most precise code with recall >= `min_recall`.
- Steering. Prompts are walks that end in some state T; codes of S are forced at the
  prompt's last position (where the next state is predicted) and the model continues
  greedily (over the whole vocabulary, as the server does) for one state. Success: the
  new state is a successor of S. Three ways, from one code to all of them:
    best code    S's best code alone;
    every head   S's best code in every (codebook, head) with recall >= `set_recall`;
    own codes    the codes S itself activates (the prompt "<bos> S", its last digit) in
                 every codebook and head: the paper's intervention, which patches in the
                 codes of the target state's own forward pass (reference tutorial, tokfsm);
                 and the same at every digit of the prompt's last state (codes of S's first
                 digit forced on T's first digit).
  One forced code per head, as k=1 allows. The same prompts without codes give the
  unsteered rate. Also reported: how often the first generated digit begins a successor
  of S (the next token alone, where the reference measures its interventions); and the
  written rate, the same prompts with their last state's digits replaced by S and no code
  forced: what the model does when the prompt really ends in S. With S's own codes forced in
  every codebook at both digits, the residual stream there differs from that prompt's only by
  the two digits' token embeddings. Each rate is also given per prompt length (`by_prompt_states`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor
from transformers import AutoModelForCausalLM

from rudder.core.code_search import CodeIndex
from rudder.core.codebook import Codebook, ForcedCodes, load_codebooks
from rudder.core.feature_metadata import FEATURE_METADATA
from rudder.training.codebook import code_index, snapping
from rudder.training.tokfsm import TokFSM

RESULTS_FILE = "tokfsm_codes.json"
LISTS = ("state_codes", "state_code_sets", "own_code_sets")  # per-state lists in RESULTS_FILE, not printed


@dataclass(frozen=True)
class StateCode:
    state: int
    codebook: str
    head: int
    code: int
    precision: float
    recall: float
    offset: int = 0  # where it is forced: the prompt's last position + offset (-1: the digit before)


def state_at(fsm: TokFSM, ids: Tensor) -> Tensor:
    """(N, L) the state read so far at each position where a state's last digit sits, else -1."""
    out = torch.full(ids.shape, -1, dtype=torch.long)
    states = fsm.decode(ids)  # (N, S)
    last = 1 + fsm.digits * torch.arange(1, states.shape[1] + 1) - 1  # position of each state's last digit
    out[:, last] = states
    return out


def state_code_table(fsm: TokFSM, index: CodeIndex, codebooks: dict[str, Codebook]) -> dict[str, Tensor]:
    """Per codebook: precision and recall (num_states, G, num_codes) of every code for every state."""
    labels = state_at(fsm, index.tokens)
    mask = labels >= 0
    per_state = torch.bincount(labels[mask], minlength=fsm.num_states).clamp(min=1)  # (S,)
    out = {}
    for cb_id, ids in index.ids.items():
        cb = codebooks[cb_id].cfg
        groups, k = ids.shape[2], ids.shape[3]
        flat = ids.reshape(-1, groups, k)  # (P, G, k)
        count = torch.zeros(groups, cb.num_codes)
        for g in range(groups):
            count[g] = torch.bincount(flat[:, g].reshape(-1), minlength=cb.num_codes).float()
        sel = flat[mask.reshape(-1)]  # (P', G, k) at labelled positions
        st = labels[mask]  # (P',)
        hits = torch.zeros(fsm.num_states, groups, cb.num_codes)
        for g in range(groups):
            idx = st[:, None].expand(-1, k) * cb.num_codes + sel[:, g]
            hits[:, g] = torch.bincount(idx.reshape(-1), minlength=fsm.num_states * cb.num_codes
                                        ).reshape(fsm.num_states, cb.num_codes).float()
        out[cb_id + ".precision"] = hits / count.clamp(min=1)[None]
        out[cb_id + ".recall"] = hits / per_state[:, None, None]
    return out


def head_state_codes(fsm: TokFSM, table: dict[str, Tensor], min_recall: float) -> list[list[StateCode]]:
    """For every state, its most precise code in each (codebook, head) with recall >= min_recall."""
    out: list[list[StateCode]] = [[] for _ in range(fsm.num_states)]
    for key in sorted(k for k in table if k.endswith(".precision")):
        cb_id = key.removesuffix(".precision")
        precision, recall = table[key], table[cb_id + ".recall"]
        eligible = torch.where(recall >= min_recall, precision, torch.full_like(precision, -1.0))
        best = eligible.max(dim=-1)  # (S, G)
        for s in range(fsm.num_states):
            for g in range(precision.shape[1]):
                if best.values[s, g] >= 0:
                    c = int(best.indices[s, g])
                    out[s].append(StateCode(s, cb_id, g, c, float(precision[s, g, c]), float(recall[s, g, c])))
    return out


def best_state_codes(fsm: TokFSM, table: dict[str, Tensor], min_recall: float) -> list[StateCode | None]:
    """For every state, its most precise code over all codebooks and heads (recall >= min_recall)."""
    return [max(codes, key=lambda c: (c.precision, c.recall), default=None)
            for codes in head_state_codes(fsm, table, min_recall)]


@torch.no_grad()
def own_codes(model, codebooks: dict[str, Codebook], fsm: TokFSM, table: dict[str, Tensor],
              digits: int = 1) -> list[list[StateCode]]:
    """For every state S, the top code S activates in every (codebook, head) at the last `digits` digits of
    "<bos> S", each to be forced at the same place in the prompt's last state. Precision and recall come
    from the code index, which labels a state at its last digit (0 for codes of earlier digits)."""
    record: dict[str, Tensor] = {}
    with snapping(model, codebooks, record):
        model(fsm.encode(torch.arange(fsm.num_states)[:, None]))
    out: list[list[StateCode]] = [[] for _ in range(fsm.num_states)]
    for offset in range(1 - digits, 1):
        for cb_id in sorted(record):
            top = record[cb_id][:, offset - 1, :, 0]  # (S, G): the best code, as one forced code per head allows
            precision, recall = table[cb_id + ".precision"], table[cb_id + ".recall"]
            for s in range(fsm.num_states):
                for g, c in enumerate(top[s].tolist()):
                    p, r = (float(precision[s, g, c]), float(recall[s, g, c])) if offset == 0 else (0.0, 0.0)
                    out[s].append(StateCode(s, cb_id, g, c, p, r, offset))
    return out


@torch.no_grad()
def continuation(model, codebooks: dict[str, Codebook], fsm: TokFSM, prompts: Tensor,
                 force: list[list[StateCode]] | None, strength: float = 1.0) -> Tensor:
    """(N, digits) greedy tokens after each prompt (N, L), forcing the codes force[i] at prompt i's last position
    (+ each code's offset)."""
    n, length = prompts.shape
    ids = prompts
    for _step in range(fsm.digits):
        forced: dict[str, list[ForcedCodes]] = {}
        if force is not None:
            width = ids.shape[1]
            for cb_id in {f.codebook for fs in force for f in fs}:
                pairs = [(i, f) for i, fs in enumerate(force) for f in fs if f.codebook == cb_id]
                forced[cb_id] = [ForcedCodes(torch.tensor([i * width + length - 1 + f.offset for i, f in pairs]),
                                             torch.tensor([f.head for _, f in pairs]),
                                             torch.tensor([f.code for _, f in pairs]),
                                             torch.full((len(pairs),), strength))]
        with snapping(model, codebooks, forced=forced):
            logits = model(ids).logits[:, -1]  # the whole vocabulary: a non-digit ends the walk (state -1)
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids[:, length:]


def next_state(model, codebooks: dict[str, Codebook], fsm: TokFSM, prompts: Tensor,
               force: list[list[StateCode]] | None, strength: float = 1.0) -> Tensor:
    """Greedy next state after each prompt (N, L) (-1 if not digits), forcing force[i] at prompt i's last position."""
    return state_after(fsm, prompts, continuation(model, codebooks, fsm, prompts, force, strength))


def state_after(fsm: TokFSM, prompts: Tensor, new: Tensor) -> Tensor:
    """The state the new tokens (N, digits) spell (-1 if they are not all digits)."""
    return fsm.decode(torch.cat([prompts[:, :1], new], dim=1))[:, 0]


def steering(model, codebooks: dict[str, Codebook], fsm: TokFSM, codes: list[list[StateCode]],
             trials: int = 20, seed: int = 3, strength: float = 1.0) -> dict[str, float]:
    """codes[s]: the codes forced to steer towards state s (states with none are skipped)."""
    g = torch.Generator().manual_seed(seed)
    targets = [c for c in codes if c]
    firsts = torch.zeros(fsm.num_states, 11, dtype=torch.bool)  # firsts[s, d]: a successor of s starts with d
    firsts[torch.arange(fsm.num_states)[:, None], torch.from_numpy(fsm.successors) // 10 ** (fsm.digits - 1)] = True
    steered = unsteered = natural = first = first_unsteered = written = total = 0
    by_length = {}
    for length in (1, 3, 8, 24):  # prompt lengths in states
        force = [t for t in targets for _ in range(max(trials // 4, 1))]
        prompts = fsm.encode(fsm.walk(len(force), length, g))
        last = fsm.decode(prompts)[:, -1]
        wanted = torch.tensor([f[0].state for f in force])
        as_written = torch.cat([prompts[:, :-fsm.digits], fsm.encode(wanted[:, None])[:, 1:]], dim=1)
        steered_ids = continuation(model, codebooks, fsm, prompts, force, strength)
        plain_ids = continuation(model, codebooks, fsm, prompts, None)
        written_ids = continuation(model, codebooks, fsm, as_written, None)
        ok = lambda a, b: fsm.valid_transitions(torch.stack([a, b], dim=1)).sum().item()  # noqa: E731
        plain = state_after(fsm, prompts, plain_ids)
        hits = ok(wanted, state_after(fsm, prompts, steered_ids))
        hits_written = ok(wanted, state_after(fsm, prompts, written_ids))
        steered += hits
        written += hits_written
        unsteered += ok(wanted, plain)
        natural += ok(last, plain)
        first += firsts[wanted, steered_ids[:, 0].clamp(max=10)].sum().item()  # 10: not a digit
        first_unsteered += firsts[wanted, plain_ids[:, 0].clamp(max=10)].sum().item()
        total += len(force)
        by_length[length] = {"steering_success": hits / len(force), "written_success": hits_written / len(force)}
    return {"steering_success": steered / total, "unsteered_success": unsteered / total,
            "first_digit_success": first / total, "unsteered_first_digit_success": first_unsteered / total,
            "unsteered_follows_prompt": natural / total, "written_success": written / total,
            "by_prompt_states": by_length, "trials": total, "states": len(targets),
            "codes_per_state": sum(len(c) for c in targets) / max(len(targets), 1), "strength": strength}


def write_feature_metadata(folder: Path, fsm: TokFSM, table: dict[str, Tensor], index: CodeIndex,
                           min_recall: float) -> None:
    """Label each codebook's best code for every state ("state 07"), for the server's feature search."""
    for cb_id, ids in index.ids.items():
        best = best_state_codes(fsm, {k: v for k, v in table.items() if k.startswith(cb_id + ".")}, min_recall)
        positions = ids.shape[0] * ids.shape[1]
        feats = []
        for b in (b for b in best if b is not None):
            fired = int((ids[:, :, b.head] == b.code).any(-1).sum())
            feats.append({"id": b.code, "head": b.head, "density": fired / positions,
                          "label": f"state {fsm.state_text(b.state)} "
                                   f"(precision {b.precision:.2f}, recall {b.recall:.2f})",
                          "top_examples": [fsm.state_text(b.state)]})
        (folder / cb_id).mkdir(exist_ok=True)
        (folder / cb_id / FEATURE_METADATA).write_text(json.dumps({"features": feats}, indent=1))


def precision_summary(codes: list[StateCode]) -> dict:
    return {"states_with_code": len(codes),
            "mean_best_precision": sum(b.precision for b in codes) / max(len(codes), 1),
            "mean_best_recall": sum(b.recall for b in codes) / max(len(codes), 1)}


def analyse(folder: str | Path, min_recall: float = 0.5, trials: int = 20, set_recall: float = 0.1) -> dict:
    folder = Path(folder)
    fsm = TokFSM.load(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    codebooks = {cb.cfg.id: cb for cb in load_codebooks(folder)}
    index = CodeIndex.load(folder)
    if index is None:
        index = code_index(model, codebooks, fsm.sample(256, torch.Generator().manual_seed(10_007)))
    table = state_code_table(fsm, index, codebooks)
    best = best_state_codes(fsm, table, min_recall)
    found = [b for b in best if b is not None]
    write_feature_metadata(folder, fsm, table, index, min_recall)
    result = {"min_recall": min_recall, **precision_summary(found)}
    for kind in sorted({cb_id.split(".")[0] for cb_id in codebooks}):  # attn_preproj, mlp: each kind on its own
        of_kind = {k: v for k, v in table.items() if k.split(".")[0] == kind}
        result[f"best_code_{kind}"] = precision_summary([b for b in best_state_codes(fsm, of_kind, min_recall) if b])
    per_head = head_state_codes(fsm, table, set_recall)
    every_digit = own_codes(model, codebooks, fsm, table, digits=fsm.digits)
    own = [[c for c in cs if c.offset == 0] for cs in every_digit]
    result["steering_best_code"] = steering(model, codebooks, fsm, [[b] if b else [] for b in best], trials)
    result["steering_every_head"] = steering(model, codebooks, fsm, per_head, trials) | {"set_recall": set_recall}
    result["steering_own_codes"] = steering(model, codebooks, fsm, own, trials)
    result["steering_own_codes_every_digit"] = steering(model, codebooks, fsm, every_digit, trials)
    result["state_codes"] = [asdict(b) for b in found]
    result["state_code_sets"] = [[asdict(c) for c in cs] for cs in per_head]
    result["own_code_sets"] = [[asdict(c) for c in cs] for cs in own]
    (folder / RESULTS_FILE).write_text(json.dumps(result, indent=2))
    return result


def run(folder: str | Path, min_recall: float = 0.5, trials: int = 20) -> dict:
    """`rudder analyze tokfsm-codes`: `analyse`, then print the figures (the per-state lists stay in the file)."""
    result = analyse(folder, min_recall, trials)
    print(json.dumps({k: v for k, v in result.items() if k not in LISTS}, indent=2))
    return result
