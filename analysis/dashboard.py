"""Feature dashboards: one static HTML page per SAE or codebook (no JavaScript, no network).

    rudder dashboard --sae PATH --out DIR [--features 12,40] [--max-features 200]
    rudder dashboard --model CODEBOOK_MODEL --codebook attn_preproj.1 --out DIR [--features 3:831]

For each feature: its density, a histogram of its non-zero activations, its top
activating examples and samples from activation quantiles (each a window of tokens,
shaded by the feature's activation, the peak token boxed), and its top and bottom
logit effects (its decoder row through the unembedding, the final norm's scale folded
in). A code's activation is its similarity score where it is active, and its logit
effects are its vector through its head's slice of the output projection. Text:
held-out windows of the offline corpus. Open DIR/index.html in a browser;
`index.html#feature-ID` shows that feature alone.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from rudder.analysis.config import DashboardConfig
from rudder.core.sae import SAE

SPAN = 10  # tokens either side of an example's peak


@dataclass
class FeatureView:
    id: int
    title: str
    density: float
    max_activation: float
    histogram: list[int]
    bin_edges: list[float]
    top: list[tuple[list[str], list[float], int]]  # (tokens, activations, peak index)
    quantiles: list[tuple[str, list[tuple[list[str], list[float], int]]]]
    logits_up: list[tuple[str, float]]
    logits_down: list[tuple[str, float]]


def _window(tokens: list[str], acts: Tensor, seq_len: int, flat: int) -> tuple[list[str], list[float], int]:
    seq, pos = divmod(flat, seq_len)
    lo, hi = max(0, pos - SPAN), min(seq_len, pos + SPAN + 1)
    base = seq * seq_len
    return tokens[base + lo:base + hi], acts[base + lo:base + hi].tolist(), pos - lo


def feature_views(tokens: list[str], seq_len: int, feats: Tensor, logit_effects: Tensor, vocab: list[str],
                  ids: list[int], top: int = 8, per_quantile: int = 3, bins: int = 20,
                  titles: dict[int, str] | None = None) -> list[FeatureView]:
    """tokens: text of every token (N·seq_len), feats (N·seq_len, units) activations (0: inactive),
    logit_effects (units, vocab)."""
    out = []
    g = torch.Generator().manual_seed(0)
    for i in ids:
        a = feats[:, i]
        on = a > 0
        vmax = float(a.max())
        hist, edges = (torch.histogram(a[on].float(), bins=bins) if on.any()
                       else (torch.zeros(bins), torch.zeros(bins + 1)))
        order = a.argsort(descending=True)
        tops = [_window(tokens, a, seq_len, int(j)) for j in order[:top] if a[j] > 0]
        quantiles = []
        if on.sum() > top:
            nz = on.nonzero().flatten()
            sorted_nz = nz[a[nz].argsort()]
            for q_lo, q_hi in ((0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 0.95)):
                lo = int(q_lo * len(sorted_nz))
                part = sorted_nz[lo:max(int(q_hi * len(sorted_nz)), lo + 1)]
                pick = part[torch.randperm(len(part), generator=g)[:per_quantile]]
                quantiles.append((f"{q_lo:.0%}–{q_hi:.0%} of non-zero activations",
                                  [_window(tokens, a, seq_len, int(j)) for j in pick]))
        eff = logit_effects[i]
        k = min(10, eff.shape[0] // 2)  # small vocabularies: no token in both lists
        up, down = eff.topk(k), (-eff).topk(k)
        out.append(FeatureView(
            i, (titles or {}).get(i, f"Feature {i}"), float(on.float().mean()), vmax, hist.long().tolist(),
            edges.tolist(), tops, quantiles,
            [(vocab[t], float(v)) for v, t in zip(up.values, up.indices)],
            [(vocab[t], -float(v)) for v, t in zip(down.values, down.indices)]))
    return out


# ---------------------------------------------------------------- HTML

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }
section { border-top: 1px solid #ccc; padding: 1em 0; }
h2 { margin: 0 0 .3em; font-size: 18px; }
.meta { color: #555; margin-bottom: .5em; }
.ex { font-family: ui-monospace, monospace; white-space: pre-wrap; margin: .15em 0; }
.tok { border-radius: 2px; }
.peak { outline: 2px solid #c40; }
.cols { display: flex; gap: 3em; flex-wrap: wrap; }
table.logits td { padding: 0 .6em 0 0; font-family: ui-monospace, monospace; }
.up { color: #060; } .down { color: #a00; }
nav a { margin-right: .6em; }
body:has(section:target) section:not(:target) { display: none; }  /* #feature-ID shows that feature alone */
"""


def _tok(t: str) -> str:
    return html.escape(t.replace("\n", "⏎"))


def _example(tokens: list[str], acts: list[float], peak: int, vmax: float) -> str:
    spans = []
    for j, (t, v) in enumerate(zip(tokens, acts)):
        alpha = 0.0 if vmax <= 0 else max(0.0, min(1.0, v / vmax))
        cls = "tok peak" if j == peak else "tok"
        spans.append(f'<span class="{cls}" style="background: rgba(255,140,0,{alpha:.2f})" '
                     f'title="{v:.3f}">{_tok(t)}</span>')
    return f'<div class="ex">{"".join(spans)}</div>'


def _histogram(view: FeatureView, width: int = 320, height: int = 80) -> str:
    if not any(view.histogram):
        return "<p>never active on these tokens</p>"
    top = max(view.histogram)
    w = width / len(view.histogram)
    bars = "".join(f'<rect x="{k * w:.1f}" y="{height - h / top * height:.1f}" width="{w - 1:.1f}" '
                   f'height="{h / top * height:.1f}" fill="#e80"/>' for k, h in enumerate(view.histogram))
    return (f'<svg width="{width}" height="{height + 16}" role="img" aria-label="activation histogram">{bars}'
            f'<text x="0" y="{height + 14}" font-size="11">{view.bin_edges[0]:.2f}</text>'
            f'<text x="{width}" y="{height + 14}" font-size="11" text-anchor="end">{view.bin_edges[-1]:.2f}</text>'
            '</svg>')


def _logits(rows: list[tuple[str, float]], cls: str) -> str:
    return "".join(f'<tr><td class="{cls}">{v:+.3f}</td><td>{_tok(t)!s}</td></tr>' for t, v in rows)


def render(title: str, views: list[FeatureView]) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             "<nav>" + "".join(f'<a href="#feature-{v.id}">{v.id}</a>' for v in views) + "</nav>"]
    for v in views:
        parts.append(f'<section id="feature-{v.id}"><h2>{html.escape(v.title)}</h2>'
                     f'<div class="meta">density {v.density:.4%} · max activation {v.max_activation:.3f}</div>'
                     f'<div class="cols"><div><h3>Activations</h3>{_histogram(v)}</div>'
                     f'<div><h3>Logit effects</h3><table class="logits">{_logits(v.logits_up, "up")}'
                     f'<tr><td>&nbsp;</td></tr>{_logits(v.logits_down, "down")}</table></div></div>'
                     f'<h3>Top activating examples</h3>'
                     + "".join(_example(t, a, p, v.max_activation) for t, a, p in v.top))
        for label, examples in v.quantiles:
            parts.append(f"<h4>{html.escape(label)}</h4>"
                         + "".join(_example(t, a, p, v.max_activation) for t, a, p in examples))
        parts.append("</section>")
    parts.append("</body></html>")
    return "".join(parts)


# ---------------------------------------------------------------- from an SAE on its model


@torch.no_grad()
def sae_dashboard(lm, sae: SAE, windows: list[list[int]], out: Path, ids: list[int] | None = None,
                  max_features: int = 200, batch: int = 8) -> Path:
    site = sae.cfg.hook_name
    feats, texts = [], []
    for i in range(0, len(windows), batch):
        chunk = torch.tensor(windows[i:i + batch])
        acts = lm.activations(chunk, [site])[site]  # (B·(S−1), d): the sink position left out
        feats.append(sae.encode(acts))
        texts += [lm.tokenizer.decode([t]) for row in chunk[:, 1:].tolist() for t in row]
    feats = torch.cat(feats)
    seq_len = len(windows[0]) - 1
    if ids is None:
        alive = (feats > 0).float().mean(0)
        ids = sorted(alive.argsort(descending=True)[:max_features].tolist())
    unembed, scale = _unembed(lm)
    effects = (sae.W_dec.float() * scale) @ unembed.T  # (d_sae, vocab)
    vocab = [lm.tokenizer.decode([t]) for t in range(unembed.shape[0])]
    views = feature_views(texts, seq_len, feats, effects, vocab, ids)
    out.mkdir(parents=True, exist_ok=True)
    page = out / "index.html"
    page.write_text(render(f"{site} · {sae.cfg.d_sae} features", views))
    return page


# ---------------------------------------------------------------- from a codebook model


def _unembed(lm) -> tuple[Tensor, Tensor | float]:
    unembed = lm.model.get_output_embeddings().weight.float()  # (vocab, d)
    inner = getattr(lm.model, "model", None) or getattr(lm.model, "gpt_neox", None) or lm.model.transformer
    norm = next((getattr(inner, n) for n in ("norm", "final_layer_norm", "ln_f") if hasattr(inner, n)), None)
    return unembed, (norm.weight.float() if norm is not None and getattr(norm, "weight", None) is not None else 1.0)


@torch.no_grad()
def codebook_dashboard(lm, codebooks: dict, cb_id: str, windows: list[list[int]], out: Path,
                       codes: list[tuple[int, int]] | None = None, max_codes: int = 200, batch: int = 16) -> Path:
    """One page for codebook `cb_id` of a codebook model (all its codebooks on, as served). A code's
    activation at a token is its similarity score there when it is active, else 0; `codes` are
    (head, code) pairs (default: the most frequent). Anchors: `#feature-{head * num_codes + code}`."""
    from rudder.core.hf_sites import block_part
    from rudder.core.hooks import hooks
    from rudder.core.sites import Site
    from rudder.training.codebook import codebook_fns

    cb = codebooks[cb_id]
    n, heads = cb.cfg.num_codes, cb.cfg.num_heads
    acts, texts = [], []

    def fn(c, x: Tensor, b: int) -> Tensor:
        y, ids = c.snap(x)
        if c is cb:
            scores = c.scores(x)  # (T, G, N)
            a = torch.zeros_like(scores)
            a.scatter_(-1, ids, scores.gather(-1, ids).clamp(min=1e-6))
            acts.append(a.reshape(b, -1, heads * n)[:, 1:].flatten(0, 1))  # sink position left out
        return y

    with hooks(lm.model, codebook_fns(codebooks, fn)):
        for i in range(0, len(windows), batch):
            chunk = torch.tensor(windows[i:i + batch])
            lm.model(chunk)
            texts += [lm.tokenizer.decode([t]) for row in chunk[:, 1:].tolist() for t in row]
    feats = torch.cat(acts)
    if codes is None:
        top = (feats > 0).float().sum(0).argsort(descending=True)[:max_codes]
        ids = sorted(top.tolist())
    else:
        ids = sorted(h * n + c for h, c in codes)
    site = Site.parse(cb.cfg.site)
    unembed, scale = _unembed(lm)
    vectors = cb.codes.detach().float()  # (G, N, d_code)
    if site.per_head:  # through the head's slice of the output projection into the residual stream
        w = block_part(lm.model, site.layer, "out_proj").weight.float()
        w = w if w.shape[1] == heads * cb.cfg.d_code else w.T  # Linear (out, in) or GPT-2's Conv1D (in, out)
        resid = torch.einsum("dgk,gnk->gnd", w.reshape(w.shape[0], heads, cb.cfg.d_code), vectors)
    else:
        resid = vectors
    effects = (resid.reshape(heads * n, -1) * scale) @ unembed.T
    vocab = [lm.tokenizer.decode([t]) for t in range(unembed.shape[0])]
    titles = {i: f"{cb_id} · head {i // n} · code {i % n}" for i in ids}
    views = feature_views(texts, len(windows[0]) - 1, feats, effects, vocab, ids, titles=titles)
    out.mkdir(parents=True, exist_ok=True)
    page = out / "index.html"
    page.write_text(render(f"{cb_id} at {cb.cfg.site} · {heads} x {n} codes, k={cb.cfg.k}", views))
    return page


# ---------------------------------------------------------------- the command


def run(cfg: DashboardConfig) -> Path:
    """`rudder dashboard`: the page for `cfg.sae` on its model, or for codebook `cfg.codebook` of `cfg.model`."""
    from rudder.core.artifacts import load_sae_for
    from rudder.core.codebook import load_codebooks
    from rudder.core.default_model import ensure_default_model
    from rudder.core.errors import InvalidArgument
    from rudder.training.corpus import train_eval_split
    from rudder.training.lm import HookedLM

    model = cfg.model or ensure_default_model()
    lm = HookedLM.load(model)
    if cfg.sae is not None:
        windows = train_eval_split(lm.tokenizer, 128, eval_tokens=cfg.tokens).eval
        return sae_dashboard(lm, load_sae_for(lm.model, cfg.sae), windows, cfg.out,
                             [int(x) for x in cfg.wanted] or None, cfg.max_features)
    codebooks = {cb.cfg.id: cb for cb in load_codebooks(model)}
    if cfg.codebook not in codebooks:
        raise InvalidArgument(f"{model} has no codebook {cfg.codebook!r}; it has {', '.join(codebooks)}")
    if (model / "tokfsm.json").exists():
        from rudder.training.tokfsm import TokFSM

        windows = TokFSM.load(model).sample(max(cfg.tokens // 128, 1), torch.Generator().manual_seed(7)).tolist()
    else:
        windows = train_eval_split(lm.tokenizer, 128, eval_tokens=cfg.tokens).eval
    codes = [tuple(int(v) for v in x.split(":")) for x in cfg.wanted] or None
    return codebook_dashboard(lm, codebooks, cfg.codebook, windows, cfg.out, codes, cfg.max_features)
