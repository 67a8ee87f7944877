"""Codebook models: fine-tune a causal LM with codebook bottlenecks (Tamkin, Taufeeque & Goodman 2023).

    rudder train codebook --model DIR --out OUT --set codebook_at=[attn_preproj] --set k=1

At each chosen site the activation is replaced by the mean of its k best codes
(`rudder.core.codebook.Codebook`, the layer the server runs). Gradients pass the
bottleneck straight through to the model; the codes learn by one of two objectives:

    aeloss   codes get the task gradient through the bottleneck's output, plus
             the reconstruction MSE ‖y − x‖² (the reference's default)
    vqvae    codes get only the reconstruction MSE; the input gets the commitment
             term β‖x − y‖² (van den Oord et al. 2017)

A commitment term can hold the input near its codes under aeloss too (`commitment`):
when the model trains, nothing else stops a site's activations from drifting in scale,
which cosine scoring does not see (the TokFSM MLP outputs did, and the loss diverged).

The codebook's LayerNorm only scores, so no gradient reaches it through the hard
top-k; it learns from an alignment term, 1 − cos(LN(x), chosen code), so that its
scale and shift do something (the reference's LayerNorm is in no optimizer group).
The model trains jointly at `lr · model_lr_factor` (0 freezes it). Codes that have
not fired since the last replacement are re-drawn from current inputs every
`replace_dead_every` steps, whether or not anything is being logged.

Data: a TokFSM model folder (one holding tokfsm.json) trains on fresh TokFSM
walks; any other model trains on the offline corpus (rudder.training.corpus).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from rudder.core.code_search import CodeIndex
from rudder.core.codebook import Codebook, CodebookConfig, ForcedCodes, save_codebooks
from rudder.core.errors import InvalidArgument
from rudder.core.hf_sites import SiteFn, layout_of, shape_of
from rudder.core.hooks import hooks
from rudder.core.sites import Site
from rudder.training.config import CodebookTrainConfig, warmup_decay

log = logging.getLogger(__name__)

CodebookFn = Callable[[Codebook, Tensor, int], Tensor]
"""fn(codebook, x (B·S, G, d), B) -> what replaces x at the codebook's site"""

METRICS_FILE = "codebook_training.json"


def codebooks_for(model: nn.Module, cfg: CodebookTrainConfig) -> dict[str, Codebook]:
    shape = shape_of(model)
    out = {}
    for cb_id, site in cfg.sites(shape.num_layers):
        heads, d = (shape.num_heads, shape.d_head) if site.per_head else (1, shape.d_model)
        if cfg.k > cfg.num_codes:
            raise InvalidArgument(f"k={cfg.k} exceeds num_codes={cfg.num_codes}")
        out[cb_id] = Codebook(CodebookConfig(cb_id, site.name, num_codes=cfg.num_codes, k=cfg.k, d_code=d,
                                             num_heads=heads))
    return out


# ---------------------------------------------------------------- the bottleneck in training


@dataclass
class SnapStats:
    """What the bottlenecks saw in one forward: loss terms and code counts."""

    loss: Tensor | float = 0.0
    sq_error: float = 0.0  # Σ over tokens of ‖y − x‖², summed over groups
    tokens: int = 0
    counts: dict[str, Tensor] = field(default_factory=dict)  # id -> (G, N) activations


def train_snap(cb: Codebook, x: Tensor, cfg: CodebookTrainConfig, stats: SnapStats) -> Tensor:
    """x (T, G, d) -> the bottleneck's output, with straight-through gradients to x.

    The forward value is exactly `cb.snap(x)`; only the gradients differ from serving."""
    y, ids = cb.snap(x)
    x_const = x.detach()
    mse = (y - x_const).pow(2).sum(-1).mean(0).sum()  # per token, summed over the groups' codebooks
    if cfg.loss == "aeloss":
        out = y + (x - x_const)  # value y; the task gradient reaches x (straight through) and the codes
    else:
        out = x + (y - x).detach()  # value y; the task gradient reaches x only
    beta = cfg.commitment if cfg.commitment is not None else (0.25 if cfg.loss == "vqvae" else 0.0)
    stats.loss = stats.loss + mse
    if beta:
        stats.loss = stats.loss + beta * (x - y.detach()).pow(2).sum(-1).mean(0).sum()
    if cfg.ln_align:
        xn = F.layer_norm(x_const, (cb.cfg.d_code,), eps=cb.cfg.ln_eps) * cb.ln_weight + cb.ln_bias
        chosen = cb.codes.detach()[torch.arange(cb.cfg.num_heads, device=x.device)[None, :], ids[..., 0]]  # best code
        stats.loss = stats.loss + cfg.ln_align * (1 - F.cosine_similarity(xn, chosen, dim=-1)).mean()
    with torch.no_grad():
        stats.sq_error += (y - x_const).pow(2).sum().item()
        stats.tokens += x.shape[0]
        flat = ids.permute(1, 0, 2).reshape(cb.cfg.num_heads, -1)  # (G, T·k)
        counts = torch.zeros(cb.cfg.num_heads, cb.cfg.num_codes, dtype=torch.long, device=x.device)
        counts.scatter_add_(1, flat, torch.ones_like(flat))
        stats.counts[cb.cfg.id] = stats.counts.get(cb.cfg.id, 0) + counts
    return out


def codebook_fns(codebooks: dict[str, Codebook], fn: CodebookFn) -> dict[str, SiteFn]:
    """Site hooks (for `rudder.core.hooks.hooks`) that run `fn(cb, x (B·S, G, d), B) -> y` for every
    codebook at its site; codebooks sharing a site run in turn, each on the one before's output."""
    at: dict[str, list[Codebook]] = {}
    for cb in codebooks.values():
        at.setdefault(Site.parse(cb.cfg.site).name, []).append(cb)

    def make(cbs: list[Codebook]) -> SiteFn:
        def hook(name: str, x: Tensor) -> Tensor:
            b, s, width = x.shape
            for cb in cbs:
                y = fn(cb, x.reshape(b * s, cb.cfg.num_heads, cb.cfg.d_code), b)
                x = y.reshape(b, s, width).to(x.dtype)
            return x
        return hook

    return {site: make(cbs) for site, cbs in at.items()}


def bottlenecks(model: nn.Module, codebooks: dict[str, Codebook], cfg: CodebookTrainConfig, stats: SnapStats):
    """The codebooks as training bottlenecks: straight-through gradients, loss terms into `stats`."""
    return hooks(model, codebook_fns(codebooks, lambda cb, x, b: train_snap(cb, x, cfg, stats)))


def snapping(model: nn.Module, codebooks: dict[str, Codebook], record: dict[str, Tensor] | None = None,
             forced: dict[str, list[ForcedCodes]] | None = None):
    """The codebooks as served (`Codebook.snap`, forced codes included); active ids (B, S, G, k) into `record`."""

    def fn(cb: Codebook, x: Tensor, b: int) -> Tensor:
        y, ids = cb.snap(x, (forced or {}).get(cb.cfg.id, ()))
        if record is not None:
            record[cb.cfg.id] = ids.reshape(b, -1, *ids.shape[1:])
        return y

    return hooks(model, codebook_fns(codebooks, fn))


@torch.no_grad()
def code_index(model: nn.Module, codebooks: dict[str, Codebook], ids: Tensor, batch: int = 64) -> CodeIndex:
    """The active codes of every codebook at every position of `ids` (N, L)."""
    parts: dict[str, list[Tensor]] = {k: [] for k in codebooks}
    device = next(model.parameters()).device
    for i in range(0, ids.shape[0], batch):
        record: dict[str, Tensor] = {}
        with snapping(model, codebooks, record):
            model(ids[i:i + batch].to(device))
        for k in codebooks:
            parts[k].append(record[k].to("cpu", torch.int32))
    return CodeIndex(ids, {k: torch.cat(v) for k, v in parts.items()})


# ---------------------------------------------------------------- initialisation


@torch.no_grad()
def site_activations(model: nn.Module, ids: Tensor, codebooks: dict[str, Codebook]) -> dict[str, Tensor]:
    """(T, G, d) activations at each codebook's site, from the model without bottlenecks."""
    acts: dict[str, Tensor] = {}

    def grab(cb: Codebook, x: Tensor, b: int) -> Tensor:
        acts[cb.cfg.id] = x.float()
        return x

    with hooks(model, codebook_fns(codebooks, grab)):
        model(ids)
    return acts


def kmeans(x: Tensor, n: int, iters: int, generator: torch.Generator) -> Tensor:
    """Lloyd's k-means on rows of x (T, d) from a k-means++ start; empty clusters keep their centre."""
    centres = x[torch.randint(x.shape[0], (1,), generator=generator)]
    nearest = torch.cdist(x, centres).squeeze(1) ** 2
    for _ in range(n - 1):  # k-means++: the next centre is drawn with probability ∝ squared distance
        pick = torch.multinomial(nearest + 1e-12, 1, generator=generator)
        centres = torch.cat([centres, x[pick]])
        nearest = torch.minimum(nearest, torch.cdist(x, x[pick]).squeeze(1) ** 2)
    for _ in range(iters):
        assign = torch.cdist(x, centres).argmin(dim=1)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        sizes = torch.bincount(assign, minlength=n).unsqueeze(1)
        centres = torch.where(sizes > 0, sums / sizes.clamp(min=1), centres)
    return centres


@torch.no_grad()
def initialise(codebooks: dict[str, Codebook], acts: dict[str, Tensor], how: str, generator: torch.Generator) -> None:
    for cb_id, cb in codebooks.items():
        x = acts[cb_id]
        if how == "random":
            cb.codes.normal_(generator=generator).mul_(x.norm(dim=-1).mean() / cb.cfg.d_code**0.5)
            continue
        if x.shape[0] < cb.cfg.num_codes:
            raise InvalidArgument(f"codebook init needs at least num_codes={cb.cfg.num_codes} token rows, "
                                  f"got {x.shape[0]}: raise batch")
        for g in range(cb.cfg.num_heads):
            rows = x[:, g]
            cb.codes[g] = (kmeans(rows, cb.cfg.num_codes, 10, generator) if how == "kmeans"
                           else rows[torch.randperm(rows.shape[0], generator=generator)[:cb.cfg.num_codes]])


def existing_codebooks(folder: Path, wanted: dict[str, Codebook]) -> tuple[dict[str, Codebook], list[str]]:
    """The config's codebooks, taken from `folder` where it has them; also the ids it lacks (still to initialise)."""
    from rudder.core.codebook import CONFIG_FILE, load_codebooks

    if not (folder / CONFIG_FILE).exists():
        raise InvalidArgument(f"init=existing: {folder} holds no codebooks ({CONFIG_FILE} is missing)")
    found = {cb.cfg.id: cb.requires_grad_(True) for cb in load_codebooks(folder)}
    for cb_id, cb in wanted.items():
        have = found.get(cb_id)
        if have is not None and (have.cfg.site, have.cfg.num_codes, have.cfg.k, have.cfg.num_heads) != (
                cb.cfg.site, cb.cfg.num_codes, cb.cfg.k, cb.cfg.num_heads):
            raise InvalidArgument(f"init=existing: codebook {cb_id!r} in {folder} does not match the config "
                                  f"(num_codes, k)")
    missing = [k for k in wanted if k not in found]
    if len(missing) == len(wanted):
        raise InvalidArgument(f"init=existing: {folder} holds none of the codebooks the config asks for "
                              f"({', '.join(wanted)})")
    return {k: found.get(k, wanted[k]) for k in wanted}, missing


@torch.no_grad()
def replace_dead(codebooks: dict[str, Codebook], counts: dict[str, Tensor], acts: dict[str, Tensor],
                 generator: torch.Generator) -> int:
    """Codes with zero count become random current inputs (plus a little noise); returns how many."""
    replaced = 0
    for cb_id, cb in codebooks.items():
        dead = counts[cb_id] == 0  # (G, N)
        for g in range(cb.cfg.num_heads):
            idx = dead[g].nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            rows = acts[cb_id][:, g]
            pick = rows[torch.randint(rows.shape[0], (idx.numel(),), generator=generator).to(rows.device)]
            noise = (torch.randn(pick.shape, generator=generator).to(pick.device) * 0.01
                     * pick.norm(dim=-1, keepdim=True) / pick.shape[-1] ** 0.5)
            cb.codes[g, idx] = pick + noise
            replaced += idx.numel()
    return replaced


# ---------------------------------------------------------------- data


class Batches:
    """Training sequences: fresh TokFSM walks, or windows of the offline corpus."""

    def __init__(self, folder: Path, tokenizer, cfg: CodebookTrainConfig):
        from rudder.training.tokfsm import FSM_FILE, TokFSM

        self.g = torch.Generator().manual_seed(cfg.seed)
        self.batch = cfg.batch
        self.fsm = TokFSM.load(folder) if (folder / FSM_FILE).exists() else None
        if self.fsm is None:
            from rudder.training.corpus import train_eval_split

            split = train_eval_split(tokenizer, cfg.context, eval_tokens=cfg.eval_sequences * cfg.context,
                                     max_tokens=cfg.corpus_tokens, sources=cfg.corpus)
            self.train = split.train  # on disk; rows read as drawn
            self.eval = torch.tensor(split.eval)

    def next(self) -> Tensor:
        if self.fsm is not None:
            return self.fsm.sample(self.batch, self.g)
        return self.train[torch.randint(len(self.train), (self.batch,), generator=self.g).tolist()]

    def held_out(self, n: int) -> Tensor:
        if self.fsm is not None:
            return self.fsm.sample(n, torch.Generator().manual_seed(10_007))
        return self.eval[:n]


# ---------------------------------------------------------------- evaluation


def lm_loss(logits: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    """Mean next-token cross-entropy and next-token accuracy."""
    logits = logits[:, :-1].float()
    target = ids[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
    return ce, (logits.argmax(-1) == target).float().mean()


@torch.no_grad()
def evaluate(model: nn.Module, codebooks: dict[str, Codebook], cfg: CodebookTrainConfig, ids: Tensor,
             batch: int = 64) -> dict[str, float]:
    """Perplexity, next-token accuracy, reconstruction MSE and dead-code fraction on held-out ids."""
    model.eval()
    stats = SnapStats()
    ce = acc = 0.0
    device = next(model.parameters()).device
    for i in range(0, ids.shape[0], batch):
        chunk = ids[i:i + batch].to(device)
        with bottlenecks(model, codebooks, cfg, stats):
            c, a = lm_loss(model(chunk).logits, chunk)
        ce += c.item() * chunk.shape[0]
        acc += a.item() * chunk.shape[0]
    model.train()
    total = sum(cb.cfg.num_heads * cb.cfg.num_codes for cb in codebooks.values())
    dead = sum(int((stats.counts[k] == 0).sum()) for k in codebooks)
    groups = sum(cb.cfg.num_heads for cb in codebooks.values())
    return {
        "perplexity": math.exp(ce / ids.shape[0]),
        "next_token_accuracy": acc / ids.shape[0],
        "reconstruction_mse": stats.sq_error / max(stats.tokens * groups, 1),
        "dead_code_fraction": dead / total if total else 0.0,
    }


# ---------------------------------------------------------------- the trainer


def train(cfg: CodebookTrainConfig) -> dict[str, float]:
    from tqdm import tqdm

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    folder = Path(cfg.model)
    if not (folder / "config.json").exists():
        raise InvalidArgument(f"model {folder} is not a Hugging Face model folder (no config.json)")
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    layout_of(model)
    codebooks = codebooks_for(model, cfg)
    data = Batches(folder, tokenizer, cfg)
    g = torch.Generator().manual_seed(cfg.seed + 1)

    first = data.next()
    if cfg.init == "existing":
        codebooks, fresh = existing_codebooks(folder, codebooks)
        if fresh:  # sampled from the activations the existing codebooks leave downstream
            with snapping(model, {k: v for k, v in codebooks.items() if k not in fresh}):
                acts = site_activations(model, first, {k: codebooks[k] for k in fresh})
            initialise({k: codebooks[k] for k in fresh}, acts, "sample", g)
    else:
        initialise(codebooks, site_activations(model, first, codebooks), cfg.init, g)
    device = torch.device(cfg.device)  # initialised on the CPU (its generator), trained on the device
    model.to(device)
    for cb in codebooks.values():
        cb.to(device)
    eval_ids = data.held_out(cfg.eval_sequences)
    base = evaluate(model, {}, cfg, eval_ids)

    code_params = [p for cb in codebooks.values() for p in (cb.codes,)]
    ln_params = [p for cb in codebooks.values() for p in (cb.ln_weight, cb.ln_bias)]
    groups = [{"params": code_params, "weight_decay": cfg.weight_decay},
              {"params": ln_params, "weight_decay": 0.0}]
    if cfg.model_lr_factor > 0:
        groups.append({"params": list(model.parameters()), "lr": cfg.lr * cfg.model_lr_factor, "weight_decay": 0.0})
    else:
        model.requires_grad_(False)
    opt = torch.optim.AdamW(groups, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_decay(s, cfg.steps, cfg.warmup_steps, cfg.lr_schedule, cfg.min_lr_factor))

    model.train()
    since_replace: dict[str, Tensor] = {}
    replaced_total = 0
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="codebook", unit="step")
    for step in bar:
        ids = (first if step == 0 else data.next()).to(device)
        stats = SnapStats()
        with bottlenecks(model, codebooks, cfg, stats):
            ce, acc = lm_loss(model(ids).logits, ids)
        loss = ce + stats.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for grp in groups for p in grp["params"]], 1.0)
        opt.step()
        sched.step()
        for k, c in stats.counts.items():
            since_replace[k] = since_replace.get(k, 0) + c
        if (cfg.replace_dead_every and (step + 1) % cfg.replace_dead_every == 0
                and step + 1 <= cfg.replace_dead_until * cfg.steps):
            replaced_total += replace_dead(codebooks, since_replace, site_activations(model, ids, codebooks), g)
            since_replace = {}
        if step % 10 == 0:
            bar.set_postfix(ce=f"{ce.item():.3f}", acc=f"{acc.item():.3f}",
                            mse=f"{stats.sq_error / max(stats.tokens, 1):.3g}")

    metrics = {"train_seconds": round(time.perf_counter() - start, 1), "codes_replaced": replaced_total}
    metrics |= {f"base_{k}": v for k, v in base.items() if k in ("perplexity", "next_token_accuracy")}
    metrics |= evaluate(model, codebooks, cfg, eval_ids)
    if data.fsm is not None:
        from rudder.training import tokfsm

        with snapping(model, codebooks):
            metrics |= tokfsm.evaluate(model, data.fsm)
    model.eval()
    index = code_index(model, codebooks, eval_ids)
    save(model, tokenizer, codebooks, cfg, metrics, data.fsm)
    index.save(cfg.out)
    return metrics


def save(model: nn.Module, tokenizer, codebooks: dict[str, Codebook], cfg: CodebookTrainConfig,
         metrics: dict, fsm=None) -> Path:
    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if fsm is not None:
        fsm.save(out)
    save_codebooks(list(codebooks.values()), out)
    record = {"config": cfg.model_dump(mode="json"), "metrics": metrics}
    previous = Path(cfg.model) / METRICS_FILE
    if cfg.init == "existing" and previous.exists():  # a continued run keeps the record of the runs before it
        before = json.loads(previous.read_text())
        record["earlier"] = before.pop("earlier", []) + [before]
    (out / METRICS_FILE).write_text(json.dumps(record, indent=2))
    return out


def run(cfg: CodebookTrainConfig) -> dict[str, float]:
    metrics = train(cfg)
    print(json.dumps(metrics, indent=2))
    print(f"codebook model written to {cfg.out}")
    return metrics
