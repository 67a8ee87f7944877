"""SAE evaluation as SAELens and e2e_sae report it, and feature metadata for search.

On held-out sequences, for the SAE on raw activations (as served, except that sink
positions pass through splices and zero-ablation unchanged; see below):

    l0                  mean number of active features per token
    alive, dead         features that fired at least once over the eval tokens, and the rest
    explained_variance  1 − Σ‖x − x̂‖² / Σ‖x − x̄‖²
    mse                 mean over elements of (x̂ − x)²
    ce_clean            next-token cross-entropy of the original model
    ce_spliced          ... with x̂ in place of x at the site
    ce_zero_ablated     ... with 0 in place of x
    ce_increase         ce_spliced − ce_clean
    kl                  KL(p_clean ‖ p_spliced), mean over tokens
    ce_loss_score       (ce_zero_ablated − ce_spliced) / (ce_zero_ablated − ce_clean)   (SAELens)

Sequences' first (sink) position, and any later sink (`lm.sink_rows`), is left as it
is and out of every average, and the cross-entropy counts the predictions made at
positions 1.. (the ones the site can change).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rudder.core.sae import SAE
from rudder.training.lm import HookedLM, sink_rows


def _ce(logits: Tensor, ids: Tensor) -> Tensor:
    """Summed next-token cross-entropy over positions 1..seq−2."""
    pred = logits[:, 1:-1].float()
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), ids[:, 2:].reshape(-1), reduction="sum")


def kl_per_token(clean: Tensor, new: Tensor) -> Tensor:
    """KL(p_clean ‖ p_new) at positions 1.. (those a site can change), (batch, seq−1).
    The e2e objective's loss and the evaluation's KL both use this one definition."""
    a = F.log_softmax(clean[:, 1:].float(), -1)
    b = F.log_softmax(new[:, 1:].float(), -1)
    return (a.exp() * (a - b)).sum(-1)


@torch.no_grad()
def evaluate_sae(lm: HookedLM, sae: SAE, windows: list[list[int]], batch: int = 2) -> dict[str, float]:
    """The metrics above over `windows`, `batch` windows at a time (each pass holds a few
    batch × seq × vocab float32 tensors: 50 MB apiece at 2 × 128 × 49k, so memory stays small)."""
    site = sae.cfg.hook_name
    sums = dict(ce_clean=0.0, ce_spliced=0.0, ce_zero=0.0, kl=0.0, err=0.0, l0=0.0)
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=lm.device)
    xs, x2s, n_tok, n_pred = 0.0, 0.0, 0, 0
    sae = sae.to(lm.device)
    stats: dict[str, Tensor] = {}

    def splice(x: Tensor) -> Tensor:
        f = sae.encode(x.float())
        recon = sae.decode(f)
        keep = ~sink_rows(x)  # run() passes sinks through; they stay out of the averages
        stats["f"], stats["x"], stats["recon"], stats["keep"] = f[keep], x.float()[keep], recon[keep], keep
        return recon

    for i in range(0, len(windows), batch):
        ids = torch.tensor(windows[i:i + batch], device=lm.device)
        clean, _ = lm.run(ids)
        spliced, _ = lm.run(ids, replace={site: splice})
        zero, _ = lm.run(ids, replace={site: torch.zeros_like})
        f, x, recon = stats["f"], stats["x"], stats["recon"]
        sums["ce_clean"] += _ce(clean, ids).item()
        sums["ce_spliced"] += _ce(spliced, ids).item()
        sums["ce_zero"] += _ce(zero, ids).item()
        sums["kl"] += kl_per_token(clean, spliced)[stats["keep"]].sum().item()
        sums["err"] += (recon - x).pow(2).sum().item()
        sums["l0"] += (f > 0).sum().item()
        fired |= (f > 0).any(0)
        xs_batch = x.reshape(-1, x.shape[-1]).double()
        xs = xs + xs_batch.sum(0)
        x2s += xs_batch.pow(2).sum().item()
        n_tok += xs_batch.shape[0]
        n_pred += ids.shape[0] * (ids.shape[1] - 2)
    if n_tok == 0:
        return {}
    total_var = x2s - (xs.pow(2).sum() / n_tok).item()  # Σ‖x − x̄‖²
    ce_clean, ce_spliced, ce_zero = (sums[k] / n_pred for k in ("ce_clean", "ce_spliced", "ce_zero"))
    alive = int(fired.sum())
    return {
        "eval_tokens": n_tok,
        "l0": sums["l0"] / n_tok,
        "alive": alive,
        "dead": sae.cfg.d_sae - alive,
        "explained_variance": 1 - sums["err"] / total_var,
        "mse": sums["err"] / (n_tok * sae.cfg.d_in),
        "ce_clean": ce_clean,
        "ce_spliced": ce_spliced,
        "ce_zero_ablated": ce_zero,
        "ce_increase": ce_spliced - ce_clean,
        "kl": sums["kl"] / n_tok,
        "ce_loss_score": (ce_zero - ce_spliced) / (ce_zero - ce_clean) if ce_zero != ce_clean else float("nan"),
    }


@torch.no_grad()
def feature_metadata(lm: HookedLM, sae: SAE, windows: list[list[int]], top: int = 5, span: int = 12,
                     batch: int = 8) -> list[dict]:
    """Density and top activating examples (the text before the token, the token in [[ ]])."""
    d = sae.cfg.d_sae
    best_v = torch.full((top, d), -1.0)
    best_i = torch.zeros((top, d), dtype=torch.long)
    fired = torch.zeros(d)
    n = 0
    for i in range(0, len(windows), batch):
        ids = torch.tensor(windows[i:i + batch])
        x = lm.activations(ids, [sae.cfg.hook_name])[sae.cfg.hook_name]  # (B·(S−1), d)
        f = sae.encode(x.to(sae.W_enc.device)).cpu()
        f[sink_rows(x.reshape(len(ids), -1, x.shape[-1])).reshape(-1).cpu()] = 0.0  # sinks are no examples
        fired += (f > 0).sum(0)
        v, j = torch.cat([best_v, f]).topk(top, dim=0)
        idx = torch.cat([best_i, torch.arange(n, n + len(f))[:, None].expand_as(f)])
        best_v, best_i = v, idx.gather(0, j)
        n += len(f)
    per_window = len(windows[0]) - 1 if windows else 1  # activations leave out each window's first position
    flat = [t for w in windows for t in w[1:]]
    decode = lm.tokenizer.decode
    out = []
    for feature in range(d):
        examples = []
        for v, i in zip(best_v[:, feature].tolist(), best_i[:, feature].tolist()):
            if v <= 0:
                continue
            lo = max(i - span, (i // per_window) * per_window)
            examples.append(decode(flat[lo:i]) + "[[" + decode(flat[i:i + 1]) + "]]")
        out.append({"id": feature, "label": "", "density": fired[feature].item() / max(n, 1),
                    "max_activation": max(best_v[0, feature].item(), 0.0), "top_examples": examples})
    return out
