"""Train a local SAE (ReLU + L1, unit-norm decoder; Towards Monosemanticity) at one site.

    rudder train sae --site blocks.15.hook_resid_post --d-sae 4608 --tokens 60000 --out PATH

Activations are collected once from the model over the offline corpus
(`training.corpus`), then the SAE trains on them shuffled. The artifact is a
SAELens folder plus `feature_metadata.json` (density, top activating examples)
for feature search. This is the small trainer the default demo uses; the
end-to-end objectives build on the same SAE module.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from rudder.core.sae import SAE, SAEConfig
from rudder.core.sites import Site
from rudder.core.hf_sites import hook_site, shape_of
from rudder.training.corpus import token_windows

log = logging.getLogger(__name__)


@dataclass
class LocalSaeConfig:
    model: str
    """Hugging Face causal LM folder"""
    site: str = "blocks.15.hook_resid_post"
    d_sae: int = 4608
    tokens: int = 60_000
    """training tokens collected from the corpus"""
    context: int = 128
    epochs: int = 4
    batch_size: int = 1024
    lr: float = 1e-3
    l1_coefficient: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.d_sae < 1:
            raise ValueError(f"d_sae must be at least 1, got {self.d_sae}")
        if self.tokens < self.context:
            raise ValueError(f"tokens ({self.tokens}) must cover at least one context ({self.context})")


@torch.no_grad()
def collect_activations(model, site: Site, windows: list[list[int]], batch: int = 8) -> Tensor:
    """Run the corpus through the model and keep the site's activations, (n_tokens, d)."""
    out: list[Tensor] = []

    class _Stop(Exception):
        pass

    def grab(name: str, x: Tensor) -> Tensor:
        # The first position of a window is an attention sink with outsized norms: leave it out.
        out.append(x[:, 1:].reshape(-1, x.shape[-1]).float().clone())
        raise _Stop  # nothing after the site is needed

    handle = hook_site(model, site, grab)
    try:
        for i in tqdm(range(0, len(windows), batch), desc=f"activations at {site.name}", unit="batch"):
            try:
                model(torch.tensor(windows[i:i + batch]))
            except _Stop:
                pass
    finally:
        handle.remove()
    return torch.cat(out)


def train(cfg: LocalSaeConfig, acts: Tensor, hook_name: str, model_name: str) -> SAE:
    torch.manual_seed(cfg.seed)
    d_in = acts.shape[1]
    # Scale so the mean squared norm is d_in; folded back into the weights at the end.
    scale = (d_in / acts.pow(2).sum(-1).mean()).sqrt()
    x_all = acts * scale
    sae = SAE(SAEConfig(d_in=d_in, d_sae=cfg.d_sae, hook_name=hook_name, model_name=model_name,
                        metadata={"objective": "local", "l1_coefficient": cfg.l1_coefficient,
                                  "training_tokens": len(acts) * cfg.epochs}))
    with torch.no_grad():
        w = torch.randn(cfg.d_sae, d_in)
        sae.W_dec.copy_(w / w.norm(dim=1, keepdim=True) * 0.1)
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_dec.copy_(x_all.median(dim=0).values)
    sae.requires_grad_(True)
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr)
    steps = cfg.epochs * (len(x_all) // cfg.batch_size)
    bar = tqdm(total=steps, desc="training SAE", unit="step")
    for _ in range(cfg.epochs):
        for idx in torch.randperm(len(x_all)).split(cfg.batch_size):
            if len(idx) < cfg.batch_size:
                continue
            x = x_all[idx]
            f = sae.encode(x)
            mse = (sae.decode(f) - x).pow(2).sum(-1).mean()
            l1 = (f * sae.W_dec.norm(dim=1)).sum(-1).mean()
            loss = mse + cfg.l1_coefficient * l1
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)
            bar.update()
            bar.set_postfix(mse=f"{mse.item():.3f}", l0=f"{(f > 0).float().sum(-1).mean().item():.1f}")
    bar.close()
    with torch.no_grad():  # fold the input scaling into the weights: the artifact takes raw activations
        sae.W_enc.mul_(scale)
        sae.b_dec.div_(scale)
        sae.W_dec.div_(scale)
    return sae.requires_grad_(False)


@torch.no_grad()
def feature_metadata(sae: SAE, acts: Tensor, windows: list[list[int]], tokenizer, top: int = 5,
                     span: int = 12) -> list[dict]:
    """Density and top activating examples (text around the token) of every feature."""
    context = len(windows[0]) - 1  # activations leave out each window's first position
    best_v = torch.full((top, sae.cfg.d_sae), -1.0)
    best_i = torch.zeros((top, sae.cfg.d_sae), dtype=torch.long)
    fired = torch.zeros(sae.cfg.d_sae)
    for start in range(0, len(acts), 4096):
        f = sae.encode(acts[start:start + 4096])
        fired += (f > 0).sum(0)
        v, i = torch.cat([best_v, f]).topk(top, dim=0)
        idx = torch.cat([best_i, torch.arange(start, start + len(f))[:, None].expand_as(f)])
        best_v, best_i = v, idx.gather(0, i)
    flat = [t for w in windows for t in w[1:]]
    out = []
    for j in range(sae.cfg.d_sae):
        examples = []
        for v, i in zip(best_v[:, j].tolist(), best_i[:, j].tolist()):
            if v <= 0:
                continue
            lo = max(i - span, (i // context) * context)
            examples.append(tokenizer.decode(flat[lo:i]) + "[[" + tokenizer.decode(flat[i:i + 1]) + "]]")
        out.append({"id": j, "label": "", "density": fired[j].item() / len(acts), "top_examples": examples})
    return out


def run(cfg: LocalSaeConfig, out: Path) -> SAE:
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32).eval()
    site = Site.parse(cfg.site, shape_of(model).num_layers)
    windows = token_windows(tokenizer, cfg.context, cfg.tokens)
    acts = collect_activations(model, site, windows)
    sae = train(cfg, acts, site.name, Path(cfg.model).name)
    with torch.no_grad():
        f = sae.encode(acts)
        recon = sae.decode(f)
        l0 = (f > 0).float().sum(-1).mean().item()
        ev = 1 - (recon - acts).pow(2).sum() / (acts - acts.mean(0)).pow(2).sum()
    sae.cfg.metadata.update({"config": asdict(cfg), "l0": l0, "explained_variance": ev.item()})
    sae.save(out)
    meta = feature_metadata(sae, acts, windows, tokenizer)
    (out / "feature_metadata.json").write_text(json.dumps({"features": meta}))
    print(f"SAE at {out}: L0 {l0:.1f}, explained variance {ev.item():.3f}, "
          f"dead {sum(m['density'] == 0 for m in meta)}/{len(meta)}")
    return sae
