"""Polysemanticity of MLP neurons against SAE features at one place in a model, side by side.

    rudder analyze polysemanticity --sae PATH [--units 200] [--tokens 16384]

The SAE's features are scored on the SAE's own inputs (x − b_dec, embedded with their
encoder columns). The neurons are those of the MLP that reads the SAE's site: for
`blocks.L.hook_resid_post` (= the residual entering layer L+1), the MLP of layer L+1; for
`hook_resid_pre` or `hook_mlp_out` of layer L, the MLP of layer L. A neuron's input is the
MLP's input (after its LayerNorm), its input weights the gate (Llama) or input projection
row, and its activation the value its output projection reads. Units that never fire on
the tokens are left out (their score is 0). Text: held-out windows of the offline corpus.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch
from torch import Tensor

from rudder.analysis.config import PolysemanticityConfig
from rudder.analysis.neuron_embeddings import polysemanticity
from rudder.core.hf_sites import block_part, layout_of
from rudder.core.sae import SAE
from rudder.core.sites import Site


@torch.no_grad()
def collect(lm, sae: SAE, windows: list[list[int]], batch: int = 8) -> dict[str, Tensor]:
    """SAE inputs and feature activations; MLP inputs and neuron activations (sink positions left out)."""
    site = Site.parse(sae.cfg.hook_name)
    mlp_layer = site.layer + 1 if site.kind == "hook_resid_post" else site.layer
    if mlp_layer >= lm.shape.num_layers:
        raise ValueError(f"no MLP reads {site.name}: it is the model's last residual")
    arch = lm.shape.architecture
    mlp = block_part(lm.model, mlp_layer, "mlp")
    layout = layout_of(lm.model)
    got: dict[str, list[Tensor]] = {"mlp_in": [], "neurons": []}
    h1 = mlp.register_forward_pre_hook(lambda m, a: got["mlp_in"].append(a[0][:, 1:].flatten(0, 1).float()))
    h2 = getattr(mlp, layout.mlp_out).register_forward_pre_hook(
        lambda m, a: got["neurons"].append(a[0][:, 1:].flatten(0, 1).float()))
    sae_in, feats = [], []
    try:
        for i in range(0, len(windows), batch):
            ids = torch.tensor(windows[i:i + batch])
            _, acts = lm.run(ids, capture=[site.name])
            x = acts[site.name].flatten(0, 1)
            sae_in.append(x - sae.b_dec if sae.cfg.apply_b_dec_to_input else x)
            feats.append(sae.encode(x))
    finally:
        h1.remove()
        h2.remove()
    w_in = getattr(mlp, layout.mlp_in).weight
    if arch == "gpt2":  # Conv1D stores (in, out)
        w_in = w_in.T
    return {"mlp_in": torch.cat(got["mlp_in"]), "neurons": torch.cat(got["neurons"]), "w_in": w_in.float(),
            "sae_in": torch.cat(sae_in), "features": torch.cat(feats), "w_enc": sae.W_enc.T.float(),
            "mlp_layer": torch.tensor(mlp_layer)}


def score(inputs: Tensor, weights: Tensor, acts: Tensor, units: int, seed: int, **kw) -> list[int]:
    alive = (acts.max(0).values > 0).nonzero().flatten()
    pick = alive[torch.randperm(len(alive), generator=torch.Generator().manual_seed(seed))[:units]]
    return [polysemanticity(inputs, weights[u], acts[:, u], **kw).score for u in pick.tolist()]


def summary(scores: list[int]) -> dict[str, float]:
    return {"units": len(scores), "mean": statistics.fmean(scores), "median": statistics.median(scores),
            "monosemantic_share": sum(s == 1 for s in scores) / len(scores),
            "max": max(scores)}


def run(cfg: PolysemanticityConfig) -> dict:
    """`rudder analyze polysemanticity`: scores of neurons and of SAE features, printed as a table."""
    from rudder.core.artifacts import load_sae_for
    from rudder.core.default_model import ensure_default_model
    from rudder.training.corpus import train_eval_split
    from rudder.training.lm import HookedLM

    torch.manual_seed(0)
    lm = HookedLM.load(cfg.model or ensure_default_model())
    sae = load_sae_for(lm.model, cfg.sae)  # as the server attaches it
    windows = train_eval_split(lm.tokenizer, 128, eval_tokens=cfg.tokens).eval
    data = collect(lm, sae, windows)
    kw = {"fraction": cfg.fraction, "threshold": cfg.threshold}
    neurons = score(data["mlp_in"], data["w_in"], data["neurons"], cfg.units, 0, **kw)
    features = score(data["sae_in"], data["w_enc"], data["features"], cfg.units, 1, **kw)
    result = {"sae": str(cfg.sae), "site": sae.cfg.hook_name, "mlp_layer": int(data["mlp_layer"]),
              "tokens": int(data["features"].shape[0]), **kw,
              "neurons": summary(neurons), "sae_features": summary(features),
              "neuron_scores": neurons, "feature_scores": features}
    print(f"polysemanticity (Foote 2024) on {result['tokens']} held-out tokens; examples >= {cfg.fraction} x max, "
          f"cosine >= {cfg.threshold}")
    print(f"{'units':<44} {'scored':>6} {'mean':>6} {'median':>6} {'score 1':>8} {'max':>4}")
    for name, s in ((f"MLP neurons, layer {result['mlp_layer']}", result["neurons"]),
                    (f"SAE features, {result['site']}", result["sae_features"])):
        print(f"{name:<44} {s['units']:>6} {s['mean']:>6.2f} {s['median']:>6.1f} {s['monosemantic_share']:>7.0%} "
              f"{s['max']:>4}")
    if cfg.out:
        Path(cfg.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {cfg.out}")
    return result
