"""Figure 4 of Codebook Features: how much of a state patching its codes carries, as a normalised JSD.

    rudder analyze tokfsm-codes MODEL_DIR --jsd

The protocol of the reference (taufeeque9/codebook-features: `fsm_utils.patch_in_codes_var_pos`,
`tutorials/tokfsm.ipynb`):
- Source S_b: run "<bos> S_b" and keep, for each codebook to be patched, its codes at the last
  position (S_b's last digit), and P_b, the next-token distribution there.
- Target S_a != S_b: the sequence "<bos> [history] S_a" (the history a valid random walk into S_a, or
  none); the patched codebooks' codes at S_a's last digit are overwritten with S_b's (at that one
  position only) and Q is the next-token distribution there.
- JSD(Q, P_b), summed over a != b and divided by N - 1, averaged over b; divided by the same with
  nothing patched (Q = P_a), so that "none" is 1 and 0 means the patch carries the whole state.

Conditions, as in the paper's figure: the layer-0 attention codebook (all its heads), the layer-1 MLP
codebook, every attention codebook, every MLP codebook, all of them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rudder.core.codebook import Codebook, ForcedCodes
from rudder.training.codebook import snapping
from rudder.training.tokfsm import TokFSM

# Figure 4 of the reference notebook, read off its plot (none first)
REFERENCE = {"none": 1.0, "layer-0 attention": 0.86, "layer-1 MLP": 0.71, "all attention": 0.57, "all MLP": 0.26,
             "all attention + MLP": 0.0}


def conditions(codebooks: dict[str, Codebook]) -> dict[str, tuple[str, ...]]:
    """Figure 4's conditions as codebook ids of this model (codebooks named `attn_preproj.L` / `mlp.L`);
    a condition the model has no codebook for is left out."""
    attn = tuple(sorted(c for c in codebooks if c.startswith("attn_preproj.")))
    mlp = tuple(sorted(c for c in codebooks if c.startswith("mlp.")))
    wanted = {"none": (), "layer-0 attention": ("attn_preproj.0",), "layer-1 MLP": ("mlp.1",),
              "all attention": attn, "all MLP": mlp, "all attention + MLP": attn + mlp}
    return {name: ids for name, ids in wanted.items() if name == "none" or (ids and set(ids) <= set(codebooks))}


def jsd(p: Tensor, q: Tensor) -> Tensor:
    """Jensen-Shannon divergence (nats) between distributions along the last dimension."""
    m = 0.5 * (p + q)
    kl = lambda a: (torch.special.xlogy(a, a) - torch.special.xlogy(a, m)).sum(-1)  # noqa: E731
    return 0.5 * kl(p) + 0.5 * kl(q)


def targets(fsm: TokFSM, history: int, generator: torch.Generator) -> Tensor:
    """(N, 1 + (history + 1) digits) ids: row a is "<bos> [a valid walk of `history` states into a] a"."""
    n = fsm.num_states
    rows: dict[int, Tensor] = {}
    for _ in range(100):
        walks = fsm.walk(20 * n, history + 1, generator)
        for walk in walks:
            rows.setdefault(int(walk[-1]), walk)
        if len(rows) == n:
            return fsm.encode(torch.stack([rows[a] for a in range(n)]))
    raise RuntimeError(f"no random walk of {history + 1} states reached states {sorted(set(range(n)) - set(rows))}")


@torch.no_grad()
def patching_jsd(model, codebooks: dict[str, Codebook], fsm: TokFSM, history: int = 0, seed: int = 0
                 ) -> dict[str, float]:
    """Figure 4's normalised JSD of each condition, with targets preceded by `history` states. The patch
    touches the last position only, so every target's prefix runs once (its KV cache is reused)."""
    import copy

    n = fsm.num_states
    record: dict[str, Tensor] = {}
    with snapping(model, codebooks, record):
        p_source = model(fsm.encode(torch.arange(n)[:, None])).logits[:, -1].float().softmax(-1)  # (N, V)
    source_codes = {cb: ids[:, -1] for cb, ids in record.items()}  # (N, G, k) at S_b's last digit
    ids = targets(fsm, history, torch.Generator().manual_seed(seed))
    with snapping(model, codebooks):
        prefix = model(ids[:, :-1], use_cache=True).past_key_values
        p_target = model(ids[:, -1:], past_key_values=copy.deepcopy(prefix)).logits[:, -1].float().softmax(-1)
    others = ~torch.eye(n, dtype=torch.bool)  # others[b, a]: a != b
    raw: dict[str, float] = {}
    for name, patched in conditions(codebooks).items():
        total = 0.0
        for b in range(n):
            a = others[b].nonzero().squeeze(-1)  # the targets
            if not patched:
                total += jsd(p_target[a], p_source[b]).mean().item()
                continue
            rows = torch.arange(len(a))  # S_a's last digit: the one new token of each target
            forced = {}
            for cb in patched:
                codes = source_codes[cb][b]  # (G, k): S_b's codes, every head
                g, k = codes.shape
                forced[cb] = [ForcedCodes(rows.repeat_interleave(g), torch.arange(g).repeat(len(a)),
                                          codes[:, j].repeat(len(a)), torch.ones(len(a) * g)) for j in range(k)]
            cache = copy.deepcopy(prefix)
            cache.batch_select_indices(a)
            with snapping(model, codebooks, forced=forced):
                q = model(ids[a, -1:], past_key_values=cache).logits[:, -1].float().softmax(-1)
            total += jsd(q, p_source[b]).mean().item()
        raw[name] = total / n
    return {name: value / raw["none"] for name, value in raw.items()} | {"none_jsd_nats": raw["none"]}


RESULTS_FILE = "tokfsm_jsd.json"
HISTORIES = (0, 62)  # states before the target: none, and as long as training walks allow (63 in 128 tokens)


def run(folder, out_json=None, out_png=None) -> dict:
    """`rudder analyze tokfsm-codes MODEL --jsd`: Figure 4 for each history length; the numbers into
    MODEL/tokfsm_jsd.json (and `out_json`), the bars beside the reference's into `out_png`."""
    import json
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from rudder.core.codebook import load_codebooks

    folder = Path(folder)
    fsm = TokFSM.load(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    codebooks = {cb.cfg.id: cb for cb in load_codebooks(folder)}
    result = {"model": folder.name, "codebooks": {c.cfg.id: {"num_codes": c.cfg.num_codes, "k": c.cfg.k}
                                                  for c in codebooks.values()},
              "reference": REFERENCE, "histories": {}}
    for history in HISTORIES:
        result["histories"][str(history)] = patching_jsd(model, codebooks, fsm, history)
    text = json.dumps(result, indent=2)
    for path in (folder / RESULTS_FILE, out_json):
        if path is not None:
            Path(path).write_text(text + "\n")
    print(f"{'condition':<22}{'reference':>10}" + "".join(f"{f'history {h}':>12}" for h in HISTORIES))
    for name, ref in REFERENCE.items():
        got = [result["histories"][str(h)].get(name) for h in HISTORIES]
        print(f"{name:<22}{ref:>10.2f}" + "".join(f"{'-' if g is None else f'{g:.2f}':>12}" for g in got))
    if out_png is not None:
        plot(result, out_png)
    return result


def plot(result: dict, path) -> None:
    """Grouped bars: the reference's Figure 4 and ours, per condition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(REFERENCE)
    series = {"reference (paper)": [REFERENCE[n] for n in names]}
    for h, values in result["histories"].items():
        series[f"Rudder, {h} states of history"] = [values.get(n, float("nan")) for n in names]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series.items()):
        ax.bar([x + i * width for x in range(len(names))], values, width, label=label)
    ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(names))], names, rotation=15)
    ax.set_ylabel("normalised JSD (none = 1)")
    ax.set_title(f"TokFSM: patching a state's codes ({result['model']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
