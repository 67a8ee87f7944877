"""Which SAE features make the model *say* something: output scores (Arad, Mueller and Belinkov,
"SAEs Are Good for Steering – If You Select the Right Features", EMNLP 2025).

A feature's logit-lens tokens are the top-k tokens of its decoder row read through the final
norm and the unembedding. Its output score: boost the feature at the last token of a neutral
prompt (add `amp` times the largest feature activation there, times its decoder row) and read
the next-token distribution: (1 - best rank of a logit-lens token / vocab) x the largest
probability of one. Features that only *read* a word score low; features that steer score high.

    rudder analyze output-scores --sae models/default-saes/resid15     # ~1 min on 2 cores, cached
    rudder features resid15 --says 'cats?|kittens?'                     # ranked by output score

The scores and logit-lens tokens are cached next to the SAE (`output_scores.safetensors`, with
the prompt, amp and k in its metadata), so a search is instant once computed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from rudder.core.errors import InvalidArgument
from rudder.core.feature_metadata import OUTPUT_SCORES

NEUTRAL_PROMPT = "From my experience,"  # the paper's
AMP = 10.0
TOP_K = 20


def final_norm(model: torch.nn.Module) -> torch.nn.Module:
    """The norm before the unembedding, for the families Rudder serves."""
    for path in ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm"):
        module = model
        try:
            for part in path.split("."):
                module = getattr(module, part)
            return module
        except AttributeError:
            continue
    raise InvalidArgument(f"{type(model).__name__}: no final norm found (model.norm, transformer.ln_f, "
                          "gpt_neox.final_layer_norm)")


@torch.no_grad()
def logit_lens_top(model: torch.nn.Module, w_dec: Tensor, k: int = TOP_K, chunk: int = 256) -> Tensor:
    """(d_sae, k) token ids each decoder row promotes most, read through the final norm and unembedding."""
    norm, unembed = final_norm(model), model.get_output_embeddings()
    return torch.cat([unembed(norm(rows.float())).topk(k, dim=-1).indices for rows in w_dec.split(chunk)])


@torch.no_grad()
def output_scores(lm, sae, prompt: str = NEUTRAL_PROMPT, amp: float = AMP, k: int = TOP_K, batch: int = 64,
                  progress: Callable[[int, int], None] | None = None) -> tuple[Tensor, Tensor]:
    """(scores (d_sae,), logit-lens tokens (d_sae, k)) of every feature of `sae` on the model of `lm`
    (a rudder.training.lm.HookedLM), at the SAE's own site."""
    site = sae.cfg.hook_name
    write = sae.cfg.hook_name_out or site  # a transcoder writes at its output site
    w_dec = sae.W_dec.detach().float()
    top = logit_lens_top(lm.model, w_dec, k)
    ids = lm.tokenizer(prompt, return_tensors="pt").input_ids
    if ids.shape[1] < 2:
        raise InvalidArgument(f"the neutral prompt {prompt!r} must be at least two tokens")
    _, acts = lm.run(ids, capture=[site])
    boost = amp * sae.encode(acts[site][0, -1:].float()).max().item()
    scores = torch.empty(len(w_dec))
    vocab = None
    for start in range(0, len(w_dec), batch):
        feats = torch.arange(start, min(start + batch, len(w_dec)))
        delta = boost * w_dec[feats]  # (b, d)

        def add(x: Tensor, delta=delta) -> Tensor:
            x = x.clone()
            x[:, -1] += delta.to(x.dtype)
            return x

        logits, _ = lm.run(ids.expand(len(feats), -1), replace={write: add})
        probs = logits[:, -1].softmax(-1)  # (b, V)
        vocab = probs.shape[-1]
        p_top = probs.gather(1, top[feats])  # (b, k)
        best_rank = (probs[:, None, :] > p_top[:, :, None]).sum(-1).min(1).values  # (b,)
        scores[feats] = (1 - best_rank.float() / vocab) * p_top.max(1).values
        if progress:
            progress(int(feats[-1]) + 1, len(w_dec))
    return scores, top


def save_output_scores(folder: Path, scores: Tensor, top: Tensor, prompt: str, amp: float) -> Path:
    from safetensors.torch import save_file

    from rudder.core.fileio import replace_file

    meta = {"prompt": prompt, "amp": str(amp), "k": str(top.shape[1]), "method": "Arad et al. 2025 output score"}
    return replace_file(folder / OUTPUT_SCORES, lambda p: save_file(
        {"score": scores.contiguous(), "logit_lens_top": top.to(torch.int32).contiguous()}, str(p), metadata=meta))


def run(cfg) -> Path:
    """`rudder analyze output-scores`: score every feature, cache the scores in the SAE folder."""
    import time

    from tqdm import tqdm

    from rudder.core.default_model import default_model_dir
    from rudder.core.sae import SAE
    from rudder.training.lm import HookedLM

    lm = HookedLM.load(cfg.model or default_model_dir())
    sae = SAE.load(cfg.sae)
    t0 = time.perf_counter()
    with tqdm(total=sae.cfg.d_sae, desc="output scores", unit="feature") as bar:
        scores, top = output_scores(lm, sae, cfg.prompt, cfg.amp, cfg.k,
                                    progress=lambda done, total: bar.update(done - bar.n))
    path = save_output_scores(Path(cfg.sae), scores, top, cfg.prompt, cfg.amp)
    best = torch.argsort(scores, descending=True)[:5].tolist()
    print(f"wrote {path} ({time.perf_counter() - t0:.0f} s); highest: "
          + ", ".join(f"{f} ({scores[f]:.3f}: {lm.tokenizer.decode(top[f][:3])!r})" for f in best))
    return path
