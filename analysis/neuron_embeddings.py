"""Neuron embeddings (Foote 2024): how many distinct things one neuron (or SAE feature) responds to.

For a unit with input weights w (an MLP neuron's row of the input projection, or an SAE
feature's encoder column) and its inputs x (the MLP's input after its LayerNorm, or the
SAE's input):

1. its max-activating examples: every token whose activation is at least `fraction`
   of the unit's maximum;
2. each example embedded as x ⊙ w — which input directions drove the unit there;
3. a graph joining examples whose embeddings have cosine similarity >= `threshold`;
4. its connected components are the unit's distinct behaviours; the number of
   components holding at least `min_share` of the examples is its polysemanticity.

Cosines and the top-fraction rule make the score invariant to rescaling w or x.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Polysemanticity:
    score: int  # components with at least min_share of the examples
    examples: int
    component_sizes: list[int]  # largest first


def components(adjacency: Tensor) -> list[list[int]]:
    """Connected components of an undirected graph given as a boolean (n, n) matrix."""
    n = adjacency.shape[0]
    seen = torch.zeros(n, dtype=torch.bool)
    out = []
    for start in range(n):
        if seen[start]:
            continue
        frontier = torch.zeros(n, dtype=torch.bool)
        frontier[start] = True
        members = frontier.clone()
        while frontier.any():
            frontier = adjacency[frontier].any(0) & ~members
            members |= frontier
        seen |= members
        out.append(members.nonzero().flatten().tolist())
    return sorted(out, key=len, reverse=True)


def polysemanticity(inputs: Tensor, weights: Tensor, activations: Tensor, fraction: float = 0.5,
                    threshold: float = 0.5, min_share: float = 0.05, max_examples: int = 512) -> Polysemanticity:
    """inputs (T, d) the unit's inputs, weights (d,) its input weights, activations (T,) its activations."""
    top = activations.max()
    if top <= 0:
        return Polysemanticity(0, 0, [])
    idx = (activations >= fraction * top).nonzero().flatten()
    idx = idx[activations[idx].argsort(descending=True)][:max_examples]
    emb = F.normalize(inputs[idx] * weights, dim=-1)
    adjacency = emb @ emb.T >= threshold
    comps = components(adjacency)
    sizes = [len(c) for c in comps]
    need = max(1, int(min_share * len(idx) + 0.999999))
    return Polysemanticity(sum(s >= need for s in sizes), len(idx), sizes)
