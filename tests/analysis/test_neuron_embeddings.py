"""Neuron embeddings against known answers (Foote 2024)."""

import pytest
import torch

from rudder.analysis.neuron_embeddings import components, polysemanticity


def make_neuron(directions: int, d: int = 32, n: int = 600, seed: int = 0):
    """A ReLU neuron whose weights are the sum of `directions` orthogonal directions with disjoint
    supports, and inputs that each carry one of them (plus noise)."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.zeros(directions, d)
    block = d // directions
    for i in range(directions):
        dirs[i, i * block:(i + 1) * block] = torch.randn(block, generator=g).abs() + 0.5
    w = dirs.sum(0)
    which = torch.randint(directions, (n,), generator=g)
    x = dirs[which] * (1 + torch.rand(n, 1, generator=g)) + 0.05 * torch.randn(n, d, generator=g)
    return x, w


@pytest.mark.parametrize("directions", [1, 2, 3])
def test_a_neuron_built_from_k_orthogonal_directions_scores_k(directions):
    x, w = make_neuron(directions)
    act = torch.relu(x @ w)
    assert polysemanticity(x, w, act).score == directions


@pytest.mark.parametrize("w_scale,x_scale", [(10.0, 1.0), (1.0, 0.01), (0.3, 7.0)])
def test_the_score_does_not_change_when_weights_or_inputs_are_rescaled(w_scale, x_scale):
    x, w = make_neuron(2)
    base = polysemanticity(x, w, torch.relu(x @ w))
    scaled = polysemanticity(x * x_scale, w * w_scale, torch.relu((x * x_scale) @ (w * w_scale)))
    assert scaled == base and base.score == 2


def test_components_of_a_graph():
    adj = torch.zeros(6, 6, dtype=torch.bool)
    for a, b in [(0, 1), (1, 2), (3, 4)]:
        adj[a, b] = adj[b, a] = True
    adj |= torch.eye(6, dtype=torch.bool)
    assert components(adj) == [[0, 1, 2], [3, 4], [5]]


def test_a_dead_unit_scores_zero():
    x, w = make_neuron(1)
    assert polysemanticity(x, w, torch.zeros(len(x))).score == 0
