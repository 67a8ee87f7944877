"""The Local Interaction Basis (Bushnaq et al. 2024; reference code ApolloResearch/rib).

For a chain of per-token functions between sites, f_{l+1} = F_l(f_l), ending in an
output whose basis is its PCA rotation, LIB works backwards from the output. At site l:

    G  = E[f fᵀ] = U D Uᵀ          Gram matrix; directions with D ≈ 0 are dropped
    f' = D^{-1/2} Uᵀ f               whitened: E[f' f'ᵀ] = I
    J  = ∂f̂_{l+1} / ∂f'             per data point, through F_l and the next basis C_{l+1}
    M  = E[Jᵀ J] = V Λ Vᵀ           directions f̂_{l+1} does not depend on get Λ ≈ 0: dropped
    f̂  = Λ^{1/2} Vᵀ f'               the LIB features:  C = Λ^{1/2} Vᵀ D^{-1/2} Uᵀ,  C⁺ = U D^{1/2} V Λ^{-1/2}

so E[f̂ f̂ᵀ] = Λ. Edges between consecutive bases are gradient × input, squared and
averaged over the data: E_ij = E[(∂f̂_{l+1,j}/∂f̂_{l,i} · f̂_{l,i})²]. The PCA baseline
keeps C = Uᵀ (all directions with non-zero variance) at every site.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import jacrev, vmap

from rudder.analysis.config import LibConfig

Fn = Callable[[Tensor], Tensor]
"""A per-token function from one site's activations (d_l,) to the next site's (d_{l+1},)."""


@dataclass
class Basis:
    C: Tensor  # (k, d): activations -> features
    C_pinv: Tensor  # (d, k): features -> activations
    Lambda: Tensor  # (k,): E[f̂²] of each feature, descending


def eig_desc(m: Tensor) -> tuple[Tensor, Tensor]:
    vals, vecs = torch.linalg.eigh(m)
    return vals.flip(0), vecs.flip(1)


def kept(vals: Tensor, rtol: float) -> Tensor:
    return vals > rtol * vals.max().clamp(min=torch.finfo(vals.dtype).tiny)


def pca_basis(acts: Tensor, rtol: float = 1e-6) -> Basis:
    """Rotation onto the principal directions with non-zero variance (no whitening)."""
    gram = acts.T @ acts / acts.shape[0]
    vals, vecs = eig_desc(gram)
    keep = kept(vals, rtol)
    return Basis(vecs[:, keep].T, vecs[:, keep], vals[keep])


def lib_basis(acts: Tensor, fn: Fn, next_basis: Basis, rtol: float = 1e-6, batch: int = 256) -> Basis:
    """The LIB basis at a site, from its activations (N, d) and the function to the next site."""
    gram = acts.T @ acts / acts.shape[0]
    d_vals, u = eig_desc(gram)
    keep = kept(d_vals, rtol)
    u, d_vals = u[:, keep], d_vals[keep]
    to_prime = u * d_vals.sqrt()  # f = U D^{1/2} f'
    h = lambda f: next_basis.C @ fn(f)  # noqa: E731  the next site's features as a function of f
    m = torch.zeros(len(d_vals), len(d_vals), dtype=acts.dtype)
    for i in range(0, acts.shape[0], batch):
        jac = vmap(jacrev(h))(acts[i:i + batch]) @ to_prime  # (B, k_next, r)
        m += torch.einsum("bki,bkj->ij", jac, jac)
    lam, v = eig_desc(m / acts.shape[0])
    keep = kept(lam, rtol)
    lam, v = lam[keep], v[:, keep]
    c = (lam.sqrt()[:, None] * v.T) @ (u / d_vals.sqrt()).T
    c_pinv = to_prime @ v / lam.sqrt()
    return Basis(c, c_pinv, lam)


def edges(acts: Tensor, fn: Fn, basis: Basis, next_basis: Basis, batch: int = 256) -> Tensor:
    """E_ij = E[(∂f̂_{l+1,j}/∂f̂_{l,i} · f̂_{l,i})²]: (k_l, k_{l+1})."""
    h = lambda f: next_basis.C @ fn(f)  # noqa: E731
    total = torch.zeros(basis.C.shape[0], next_basis.C.shape[0], dtype=acts.dtype)
    for i in range(0, acts.shape[0], batch):
        f = acts[i:i + batch]
        grad = vmap(jacrev(h))(f) @ basis.C_pinv  # (B, k_next, k): ∂f̂_{l+1}/∂f̂_l
        feats = f @ basis.C.T  # (B, k)
        total += ((grad * feats[:, None, :]) ** 2).sum(0).T
    return total / acts.shape[0]


@dataclass
class Graph:
    bases: list[Basis]  # one per site, the last is the output's PCA basis
    edges: list[Tensor]  # between site l and l+1


def interaction_graph(inputs: Tensor, fns: Sequence[Fn], method: str = "lib", rtol: float = 1e-6) -> Graph:
    """LIB (or PCA) bases at every site of the chain inputs -> fns[0] -> ... -> output, and its edges."""
    acts = [inputs]
    with torch.no_grad():
        for fn in fns:
            acts.append(vmap(fn)(acts[-1]))
    bases: list[Basis] = [pca_basis(acts[-1], rtol)]
    for layer in reversed(range(len(fns))):
        bases.insert(0, lib_basis(acts[layer], fns[layer], bases[0], rtol) if method == "lib"
                     else pca_basis(acts[layer], rtol))
    return Graph(bases, [edges(acts[i], fns[i], bases[i], bases[i + 1]) for i in range(len(fns))])


# ---------------------------------------------------------------- on a Hugging Face model's MLP

SITES = ("mlp_in", "mlp_hidden", "mlp_out")


def mlp_chain(mlp: torch.nn.Module, out_proj: str) -> list[Fn]:
    """An MLP split at its output projection: input (after the norm) -> hidden neurons -> output."""
    proj = getattr(mlp, out_proj)

    def to_hidden(x: Tensor) -> Tensor:
        setattr(mlp, out_proj, torch.nn.Identity())
        try:
            return mlp(x[None])[0]
        finally:
            setattr(mlp, out_proj, proj)

    return [to_hidden, lambda h: proj(h[None])[0]]


def save_graph(graph_lib: Graph, graph_pca: Graph, out, meta: dict) -> None:
    """`lib.safetensors` (C, C_pinv, Lambda per site and edges, for LIB and PCA) and `lib.json`."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    summary = {"sites": list(SITES), **meta}
    for name, g in (("lib", graph_lib), ("pca", graph_pca)):
        for site, b in zip(SITES, g.bases):
            tensors |= {f"{name}.{site}.C": b.C, f"{name}.{site}.C_pinv": b.C_pinv, f"{name}.{site}.Lambda": b.Lambda}
        for (a, b), e in zip(zip(SITES, SITES[1:]), g.edges):
            tensors[f"{name}.edges.{a}->{b}"] = e
        summary[name] = {"features": {site: int(b.C.shape[0]) for site, b in zip(SITES, g.bases)},
                         "edges_for_90pct": [int(edge_count(e, 0.9)) for e in g.edges]}
    save_file({k: v.float().contiguous() for k, v in tensors.items()}, out / "lib.safetensors")
    (out / "lib.json").write_text(json.dumps(summary, indent=2))


def edge_count(e: Tensor, share: float) -> int:
    """How many of the largest edges hold `share` of the total edge weight (a sparsity measure)."""
    w = e.flatten().sort(descending=True).values
    return int((w.cumsum(0) < share * w.sum()).sum()) + 1


def analyze_mlp(lm, layer: int, windows: list[list[int]], tokens: int, out, rtol: float = 1e-6) -> dict:
    """LIB and PCA bases and graphs of layer `layer`'s MLP on held-out tokens, written to `out`."""
    from rudder.core.hf_sites import block_part, layout_of

    mlp = block_part(lm.model, layer, "mlp")
    inputs: list[Tensor] = []
    handle = mlp.register_forward_pre_hook(lambda m, a: inputs.append(a[0][:, 1:].flatten(0, 1).detach().double()))
    try:
        with torch.no_grad():
            for i in range(0, len(windows), 8):
                lm.model(torch.tensor(windows[i:i + 8]))
                if sum(len(x) for x in inputs) >= tokens:
                    break
    finally:
        handle.remove()
    x = torch.cat(inputs)[:tokens]
    mlp.double()
    try:
        fns = mlp_chain(mlp, layout_of(lm.model).mlp_out)
        lib = interaction_graph(x, fns, "lib", rtol)
        pca = interaction_graph(x, fns, "pca", rtol)
    finally:
        mlp.float()
    meta = {"layer": layer, "tokens": int(x.shape[0]), "rtol": rtol}
    save_graph(lib, pca, out, meta)
    import json
    from pathlib import Path

    return json.loads((Path(out) / "lib.json").read_text())


def run(cfg: LibConfig) -> dict:
    """`rudder analyze lib`: `analyze_mlp` on held-out corpus windows; prints the summary."""
    import json

    from rudder.core.default_model import ensure_default_model
    from rudder.training.corpus import train_eval_split
    from rudder.training.lm import HookedLM

    lm = HookedLM.load(cfg.model or ensure_default_model())
    windows = train_eval_split(lm.tokenizer, 128, eval_tokens=cfg.tokens + 128).eval
    summary = analyze_mlp(lm, cfg.layer, windows, cfg.tokens, cfg.out)
    print(json.dumps(summary, indent=2))
    print(f"wrote {cfg.out}/lib.safetensors")
    return summary
