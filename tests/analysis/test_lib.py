"""LIB against known answers (Bushnaq et al. 2024)."""

import torch

from rudder.analysis.lib import interaction_graph, lib_basis, pca_basis

D = torch.float64


def test_a_relu_layer_feeding_a_rank_5_readout_has_5_lib_features_where_pca_has_64():
    g = torch.Generator().manual_seed(0)
    w1 = torch.randn(64, 80, generator=g, dtype=D)
    readout = torch.randn(10, 5, generator=g, dtype=D) @ torch.randn(5, 64, generator=g, dtype=D)  # rank 5
    x = torch.randn(2000, 80, generator=g, dtype=D)
    hidden = torch.relu(x @ w1.T)
    out_basis = pca_basis(hidden @ readout.T)
    assert out_basis.C.shape[0] == 5
    lib = lib_basis(hidden, lambda h: readout @ h, out_basis)
    assert lib.C.shape[0] == 5
    assert pca_basis(hidden).C.shape[0] == 64
    torch.testing.assert_close(lib.C @ lib.C_pinv, torch.eye(5, dtype=D))


def test_lib_features_are_uncorrelated_with_second_moments_lambda():
    g = torch.Generator().manual_seed(1)
    w1, w2 = torch.randn(12, 6, generator=g, dtype=D), torch.randn(4, 12, generator=g, dtype=D)
    x = torch.randn(3000, 6, generator=g, dtype=D) @ torch.randn(6, 6, generator=g, dtype=D)
    graph = interaction_graph(x, [lambda v: torch.tanh(w1 @ v), lambda h: w2 @ torch.relu(h)])
    acts = x
    for basis, fn in zip(graph.bases[:-1], [lambda v: torch.tanh(w1 @ v), None]):
        feats = acts @ basis.C.T
        torch.testing.assert_close(feats.T @ feats / len(feats), torch.diag(basis.Lambda), atol=1e-8, rtol=1e-6)
        if fn is not None:
            acts = torch.vmap(fn)(acts)


def test_a_linear_networks_edges_are_diagonal():
    g = torch.Generator().manual_seed(2)
    a1, a2 = torch.randn(8, 8, generator=g, dtype=D), torch.randn(8, 8, generator=g, dtype=D)
    x = torch.randn(4000, 8, generator=g, dtype=D) * torch.linspace(0.5, 3, 8, dtype=D)
    graph = interaction_graph(x, [lambda v: a1 @ v, lambda v: a2 @ v])
    for e in graph.edges:
        assert e.shape == (8, 8)
        off = e - torch.diag(torch.diagonal(e))
        assert off.abs().max() < 1e-8 * e.abs().max(), e
    pca = interaction_graph(x, [lambda v: a1 @ v, lambda v: a2 @ v], method="pca")
    off = pca.edges[0] - torch.diag(torch.diagonal(pca.edges[0]))
    assert off.abs().max() > 1e-3 * pca.edges[0].abs().max()  # PCA's graph is not diagonal


def test_lib_of_a_models_mlp_is_written_as_an_artifact(tmp_path):
    from safetensors.torch import load_file

    from rudder.analysis.lib import analyze_mlp
    from rudder.training.corpus import train_eval_split
    from rudder.training.lm import HookedLM
    from tests.tiny import make_model

    lm = HookedLM.load(make_model(tmp_path / "m", layers=2))
    windows = train_eval_split(lm.tokenizer, 32, eval_tokens=32 * 40, max_tokens=32 * 200).eval
    summary = analyze_mlp(lm, 1, windows, tokens=600, out=tmp_path / "lib")
    assert summary["pca"]["features"]["mlp_hidden"] == 128  # every neuron direction has variance
    assert summary["lib"]["features"]["mlp_out"] == summary["pca"]["features"]["mlp_out"] <= 64
    assert summary["lib"]["features"]["mlp_hidden"] <= 64  # the output projection reads at most 64 directions
    t = load_file(tmp_path / "lib" / "lib.safetensors")
    c, c_pinv = t["lib.mlp_hidden.C"].double(), t["lib.mlp_hidden.C_pinv"].double()
    torch.testing.assert_close(c @ c_pinv, torch.eye(c.shape[0], dtype=D), atol=1e-4, rtol=1e-4)
    assert t["lib.edges.mlp_in->mlp_hidden"].shape == (summary["lib"]["features"]["mlp_in"],
                                                        summary["lib"]["features"]["mlp_hidden"])
