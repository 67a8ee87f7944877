"""Train sparse autoencoders: local, end-to-end (e2e) and e2e + downstream (e2e_ds).

    rudder train sae --config sae.yaml [--set objective=e2e] [--out PATH]
    torchrun --nproc-per-node N --no-python rudder train sae --config sae.yaml     # data-parallel

- local (Towards Monosemanticity): activations are streamed from the model through a
  shuffle buffer; loss = MSE(x̂, x) + sparsity.
- e2e (Braun et al. 2024): the SAE output replaces the activation in the model;
  loss = KL(original ‖ spliced outputs) + sparsity.
- e2e_ds: as e2e, plus the MSE between the spliced and original activations at later layers.

ReLU SAEs keep unit-norm decoder rows (the gradient's component along each row is removed,
then rows are renormalised) and have dead features resampled; TopK SAEs get the AuxK loss.
Activations are scaled so E‖x‖² = d_in while training; the scale is folded into the
weights at export, so the artifact takes raw activations. See `training.config` for every
option and the loss conventions.

Checkpoints (SAEs, optimizer, schedule, data position) go to `<out>.ckpt/` every
`checkpoint_every_steps`; a run started again with the same config resumes from there.
The artifact (SAELens folder, eval metrics in its metadata, `feature_metadata.json`)
appears atomically at the end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from rudder.core.default_model import ensure_default_model
from rudder.core.errors import InvalidArgument, TrainingError
from rudder.core.feature_metadata import FEATURE_METADATA
from rudder.core.fileio import replace_file
from rudder.core.sae import ACTIVATIONS, SAE, SAEConfig
from rudder.core.sites import Site
from rudder.training.config import SaeTrainConfig, default_lr, warmup_decay
from rudder.training.corpus import check_sources, describe, train_eval_split
from rudder.training.distributed import World
from rudder.training.evaluate import evaluate_sae, feature_metadata, kl_per_token
from rudder.training.lm import HookedLM, check_model_folder, sink_rows

log = logging.getLogger(__name__)

LM_BATCH_WINDOWS = 16
"""sequences per model forward when streaming activations (local objective)"""


# ---------------------------------------------------------------- the trainable SAE


class TrainingSae(nn.Module):
    """A core SAE trained on activations multiplied by `scale`; `export()` folds the scale back."""

    def __init__(self, cfg: SAEConfig, scale: float = 1.0):
        super().__init__()
        self.sae = SAE(cfg)
        self.register_buffer("scale", torch.tensor(float(scale)))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (normalised) → reconstruction, features, pre-activations.

        TopK runs sparse where it can, as OpenAI's kernels do: the encoder's matmul runs without a
        graph, and its gradient flows only through the k chosen pre-activations (`gather_pre`); the
        decode sums the k active decoder rows (`embedding_bag`). So the backward costs k·d a token,
        not d_sae·d, and the values and gradients are the dense path's (a test checks both). The
        pre-activations returned are then detached: use `gather_pre` to train through them."""
        if self.sae.cfg.architecture == "topk":
            with torch.no_grad():
                pre = self.sae.pre_acts(x)
            ids = pre.topk(self.sae.cfg.k, dim=-1).indices
            acts = torch.relu(self.gather_pre(x, pre, ids))
            f = torch.zeros_like(pre).scatter(-1, ids, acts)
            recon = F.embedding_bag(ids, self.sae.W_dec, per_sample_weights=acts, mode="sum") + self.sae.b_dec
            return recon, f, pre
        pre = self.sae.pre_acts(x)
        f = ACTIVATIONS[self.sae.cfg.architecture](self.sae, pre)
        return self.sae.decode(f), f, pre

    def gather_pre(self, x: Tensor, pre: Tensor, ids: Tensor) -> Tensor:
        """`pre.gather(-1, ids)` with the gradients of `sae.pre_acts(x)` at those entries: to the
        encoder's columns and biases, and to x (through b_dec, and upstream in e2e training)."""
        return _GatherPre.apply(self.sae._input(x), self.sae.W_enc, self.sae.b_enc, pre, ids)

    @torch.no_grad()
    def initialise(self, x: Tensor, generator: torch.Generator) -> None:
        """Random unit decoder rows, the encoder their transpose, b_dec at the data's median.

        TopK takes the transpose as is (Gao et al. 2024, A.1; sparsify does the same), so its first
        reconstructions already have the data's scale; the standard SAE's encoder starts at 0.1 of
        it, so the L1 penalty does not meet large activations from the first step."""
        w = torch.randn(self.sae.W_dec.shape, generator=generator).to(x.device)
        self.sae.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
        self.sae.W_enc.copy_((1.0 if self.sae.cfg.architecture == "topk" else 0.1) * self.sae.W_dec.T)
        self.sae.b_enc.zero_()
        self.sae.b_dec.copy_(x.median(dim=0).values)

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        self.sae.W_dec /= self.sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        w, g = self.sae.W_dec, self.sae.W_dec.grad
        if g is not None:
            g -= (g * w).sum(1, keepdim=True) * w

    @torch.no_grad()
    def export(self, metadata: dict) -> SAE:
        """The SAE on raw activations: x·s in, x̂·s out ⇒ W_enc·s, b_dec/s, W_dec/s."""
        s = self.scale.item()
        cfg = SAEConfig(**{**self.sae.cfg.__dict__, "metadata": {**self.sae.cfg.metadata, **metadata}})
        out = SAE(cfg)
        out.load_state_dict(self.sae.state_dict())
        out.W_enc.mul_(s)
        out.b_dec.div_(s)
        out.W_dec.div_(s)
        return out.cpu().requires_grad_(False)


class _GatherPre(torch.autograd.Function):
    """pre[b, ids[b, j]] for pre = xin @ W_enc + b_enc computed outside the graph; the backward
    touches only the gathered entries (a sparse matmul and an embedding_bag): k·d work a row
    instead of two dense matmuls' d_sae·d."""

    @staticmethod
    def forward(ctx, xin: Tensor, w_enc: Tensor, b_enc: Tensor, pre: Tensor, ids: Tensor) -> Tensor:
        ctx.save_for_backward(xin, w_enc, ids)
        return pre.gather(-1, ids)

    @staticmethod
    def backward(ctx, g: Tensor):
        xin, w_enc, ids = ctx.saved_tensors
        g_x = g_w = g_b = None
        if ctx.needs_input_grad[0]:  # Σ_j g[b, j] · W_enc[:, ids[b, j]]
            g_x = F.embedding_bag(ids, w_enc.t().contiguous(), per_sample_weights=g, mode="sum")
        if ctx.needs_input_grad[1]:  # Gᵀ·xin, G the (rows, d_sae) sparse matrix of g at ids
            rows = torch.arange(ids.shape[0], device=ids.device).repeat_interleave(ids.shape[1])
            gt = torch.sparse_coo_tensor(torch.stack([ids.reshape(-1), rows]), g.reshape(-1),
                                         (w_enc.shape[1], ids.shape[0]), check_invariants=False)
            g_w = torch.sparse.mm(gt, xin).t()
        if ctx.needs_input_grad[2]:
            g_b = g.new_zeros(w_enc.shape[1]).index_add_(0, ids.reshape(-1), g.reshape(-1))
        return g_x, g_w, g_b, None, None


def aux_k_loss(model: TrainingSae, x: Tensor, recon: Tensor, pre: Tensor, dead: Tensor, k_aux: int) -> Tensor:
    """AuxK (Gao et al. 2024): the top-k_aux dead latents reconstruct the residual x − x̂."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return x.new_zeros(())
    ids = pre.detach().masked_fill(~dead, float("-inf")).topk(min(k_aux, n_dead), dim=-1).indices
    values = model.gather_pre(x, pre, ids)
    aux = F.embedding_bag(ids, model.sae.W_dec, per_sample_weights=torch.relu(values), mode="sum")  # k_aux rows
    return F.mse_loss(aux, (x - recon).detach())


# ---------------------------------------------------------------- data


def window_order(n: int, seed: int) -> Iterator[int]:
    """Window indices, a fresh permutation per epoch."""
    epoch = 0
    while True:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        yield from torch.randperm(n, generator=g).tolist()
        epoch += 1


class WindowStream:
    """This rank's share of the training sequences from one order all ranks share, resumable by
    the count of windows drawn from it (all ranks together)."""

    def __init__(self, windows: Tensor, seed: int, world: World, drawn: int = 0):
        self.windows, self.world = windows, world
        self.order = window_order(len(windows), seed)
        self.drawn = 0
        for _ in range(drawn):
            next(self.order)
            self.drawn += 1

    def _draw(self, n: int) -> list[int]:
        self.drawn += n
        return [next(self.order) for _ in range(n)]

    def take(self, n: int) -> Tensor:
        """n windows: of each `size` drawn, the one at this rank (e2e: every rank a micro-batch)."""
        drawn = self._draw(n * self.world.size)
        return self.windows[drawn[self.world.rank::self.world.size]].long()

    def take_block(self, n: int) -> Tensor:
        """n consecutive windows: of the n x `size` drawn, this rank's block, so the ranks' blocks
        in rank order are the windows one process would draw in `size` calls."""
        drawn = self._draw(n * self.world.size)
        return self.windows[drawn[self.world.rank * n:(self.world.rank + 1) * n]].long()


class Gathered:
    """One process's sequence of chunks, drawn by all ranks together: each rank draws its own
    chunk (the model over its block of windows, or its chunks of a cache), the ranks' chunks are
    gathered, and every rank hands them out in rank order. Every rank then holds the data one
    process would, and the shuffle buffer (same seed everywhere) is the same on every rank."""

    def __init__(self, draw: Callable[[], dict[str, Tensor]], world: World):
        self.draw, self.world, self.queue = draw, world, []

    def __call__(self) -> dict[str, Tensor]:
        if not self.queue:
            chunks = [c for c in self.world.all_gather_rows(self.draw()) if len(next(iter(c.values())))]
            if not chunks:  # every rank's source is spent: all raise together
                raise InvalidArgument("the activations ran out on every rank: the cache is shorter than this run; "
                                      "write it with more tokens")
            self.queue.extend(chunks)
        return self.queue.pop(0)


class ActivationBuffer:
    """Streams activations through a shuffle buffer (as SAELens' mixing buffer): fill it, shuffle,
    hand out the first half in batches, keep the rest, refill. Its whole state goes into a
    checkpoint, so a resumed run hands out the batches the uninterrupted one would have."""

    def __init__(self, draw: Callable[[], dict[str, Tensor]], sites: list[str], capacity: int, seed: int,
                 device: str | torch.device = "cpu"):
        """`draw()`: the next chunk of rows per site (the model over the next windows, or a cache)."""
        self.draw, self.sites, self.capacity, self.device = draw, sites, capacity, device
        self.g = torch.Generator().manual_seed(seed)
        self.rows: dict[str, Tensor] = {s: torch.empty(0) for s in sites}  # kept for the next fill
        self.out: dict[str, Tensor] = {s: torch.empty(0) for s in sites}  # being handed out
        self.pos = 0

    def _fill(self) -> None:
        parts: dict[str, list[Tensor]] = {s: [self.rows[s]] if len(self.rows[s]) else [] for s in self.sites}
        have = len(self.rows[self.sites[0]])
        while have < self.capacity:
            acts = self.draw()
            for s in self.sites:
                parts[s].append(acts[s].to(self.device))
            have += len(acts[self.sites[0]])
        perm = torch.randperm(have, generator=self.g).to(self.device)
        self.rows = {s: torch.cat(parts[s])[perm] for s in self.sites}

    def first_fill(self) -> dict[str, Tensor]:
        """The rows of the first fill, before any is handed out: a sample for the normalisation
        scale and the decoder bias that costs no extra forward."""
        self._fill()
        return self.rows

    def next_batch(self, size: int) -> dict[str, Tensor]:
        if self.pos + size > len(self.out[self.sites[0]]):
            self._fill()
            keep = len(self.rows[self.sites[0]]) // 2
            self.out, self.rows = ({s: r[keep:] for s, r in self.rows.items()},
                                   {s: r[:keep] for s, r in self.rows.items()})
            self.pos = 0
        batch = {s: r[self.pos:self.pos + size] for s, r in self.out.items()}
        self.pos += size
        return batch

    def state(self) -> dict:
        return {"rows": {s: r.cpu() for s, r in self.rows.items()}, "out": {s: r.cpu() for s, r in self.out.items()},
                "pos": self.pos, "generator": self.g.get_state()}

    def restore(self, state: dict) -> dict[str, Tensor]:
        """Back to a checkpoint's state; its rows (a sample, as `first_fill`'s)."""
        self.rows = {s: r.to(self.device) for s, r in state["rows"].items()}
        self.out = {s: r.to(self.device) for s, r in state["out"].items()}
        self.pos = state["pos"]
        self.g.set_state(state["generator"])
        return self.rows if len(self.rows[self.sites[0]]) else self.out


# ---------------------------------------------------------------- checkpoints


class Checkpoint:
    def __init__(self, out: Path, cfg: SaeTrainConfig):
        self.path = out.with_name(out.name + ".ckpt") / "checkpoint.pt"
        self.digest = hashlib.sha256(cfg.model_dump_json(exclude={"checkpoint_every_steps", "threads"}).encode()
                                     ).hexdigest()[:16]

    def load(self) -> dict | None:
        if not self.path.exists():
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        if state.get("config_digest") != self.digest:
            raise InvalidArgument(f"the checkpoint {self.path} was made with another config; delete "
                                  f"{self.path.parent} to start over, or train with the config it was made with")
        return state

    def save(self, state: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        replace_file(self.path, lambda tmp: torch.save({**state, "config_digest": self.digest}, tmp))

    def remove(self) -> None:
        if self.path.exists():
            self.path.unlink()
            try:
                self.path.parent.rmdir()
            except OSError:
                pass


# ---------------------------------------------------------------- the run


def check_config(cfg: SaeTrainConfig) -> tuple[int, list[Site]]:
    """Everything that can be checked before the model loads: model folder, sites, output."""
    check_sources(cfg.corpus)
    if cfg.activations is not None and cfg.objective != "local":
        raise InvalidArgument(f"an activation cache feeds the local objective; objective {cfg.objective} runs "
                              "the model (drop `activations`)")
    if cfg.save_activations is not None and (cfg.objective != "local" or len(cfg.sites) != 1):
        raise InvalidArgument("save_activations records the batches of a local run on one site; "
                              f"this run has objective {cfg.objective} and sites {cfg.sites}")
    n_layers = check_model_folder(cfg.model)
    sites = [Site.parse(s, n_layers) for s in cfg.sites]
    for s in cfg.loss.downstream_sites or []:
        Site.parse(s, n_layers)
    if len(set(sites)) != len(sites):
        raise InvalidArgument(f"sites repeat: {cfg.sites}")
    parent = cfg.out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryDirectory(dir=parent).cleanup()
    except OSError as e:
        raise InvalidArgument(f"cannot write the artifact under {parent}: {e.strerror}; choose another --out") from None
    return n_layers, sites


def downstream_sites(cfg: SaeTrainConfig, sites: list[Site], n_layers: int) -> list[str]:
    if cfg.objective != "e2e_ds":
        return []
    if cfg.loss.downstream_sites:
        return list(cfg.loss.downstream_sites)
    last = max(sites)
    first = last.layer + 1 if last.kind == "hook_resid_post" else last.layer  # resid_post of L sees the rest of L
    found = [f"blocks.{layer}.hook_resid_post" for layer in range(first, n_layers)]
    if not found:
        raise InvalidArgument(f"e2e_ds needs a later layer than {last.name}; set loss.downstream_sites")
    return found


def model_dtype(name: str, device: str) -> torch.dtype:
    """`auto`: bfloat16 on a CUDA device that supports it, else float32."""
    if name == "auto":
        cuda = device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda else torch.float32
    return getattr(torch, name)


def lr_lambda(cfg: SaeTrainConfig, total_steps: int):
    warmup = cfg.warmup_tokens // cfg.batch_tokens

    return lambda step: warmup_decay(step, total_steps, warmup, cfg.lr_schedule, cfg.min_lr_factor)


class SaeTrainer:
    def __init__(self, cfg: SaeTrainConfig, world: World | None = None):
        self.given = cfg  # recorded in the artifact: `model: null` stays "the default model", not this machine's path
        if cfg.model is None:
            cfg = cfg.model_copy(update={"model": str(ensure_default_model(download=False))})
        self.cfg = cfg
        self.n_layers, site_objs = check_config(cfg)
        self.sites = [s.name for s in site_objs]
        self.downstream = downstream_sites(cfg, site_objs, self.n_layers)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.world = world or World.from_env(cfg.device)
        self.checkpoint = Checkpoint(cfg.out, cfg)  # its digest: the config, as every rank must share it
        digests = self.world.all_gather_object(self.checkpoint.digest)
        if len(set(digests)) > 1:
            raise InvalidArgument(f"the ranks were given different configs (digests {', '.join(digests)}); "
                                  "give every rank the same config and flags")
        self.lm = HookedLM.load(cfg.model, self.world.device, cfg.autocast, model_dtype(cfg.model_dtype,
                                                                                        self.world.device))
        self.split = train_eval_split(self.lm.tokenizer, cfg.context, cfg.eval_tokens, cfg.corpus_tokens, cfg.corpus)
        if len(self.split.train) == 0:
            raise InvalidArgument(f"the corpus has no window of {cfg.context} tokens; lower `context`")
        self.per_window = cfg.context - 1  # tokens the SAE sees per sequence (the sink is left out)
        self.total_steps = cfg.tokens // cfg.batch_tokens
        self.rank_batch = max(1, cfg.batch_tokens // self.world.size)
        self.micro = min(cfg.micro_batch_tokens or self.rank_batch, self.rank_batch)
        self.accum = max(1, round(self.rank_batch / self.micro))
        if cfg.save_activations is not None and (self.world.size > 1 or self.checkpoint.path.exists()):
            raise InvalidArgument("save_activations records one process's run from its start; run it without "
                                  f"torchrun and delete {self.checkpoint.path.parent} if it exists")
        self.generator = torch.Generator().manual_seed(cfg.seed)

    # ------------------------------------------------------------ set-up

    def _draw(self, stream: WindowStream) -> dict[str, Tensor]:
        """The next chunk of a local run's rows: the model over the stream's next windows."""
        return self.lm.activations(stream.take_block(LM_BATCH_WINDOWS), self.sites, drop_sinks=True)

    def _sample(self, stream: WindowStream, n_windows: int) -> dict[str, Tensor]:
        return self.lm.activations(stream.take(n_windows), self.sites + self.downstream, drop_sinks=True)

    def _build(self, sample: dict[str, Tensor]) -> None:
        cfg, d = self.cfg, self.lm.shape
        self.saes: dict[str, TrainingSae] = {}
        self.scales: dict[str, float] = {}
        for name in self.sites + self.downstream:
            mean_sq = self.world.mean(sample[name].pow(2).sum(-1).mean().item())
            self.scales[name] = math.sqrt(sample[name].shape[-1] / mean_sq)
        for name in self.sites:
            d_in = d.site_dim(Site.parse(name))
            d_sae = cfg.d_sae or int(cfg.expansion_factor * d_in)
            sae_cfg = SAEConfig(d_in=d_in, d_sae=d_sae, hook_name=name, architecture=cfg.architecture,
                                k=cfg.k if cfg.architecture == "topk" else None,
                                model_name=Path(cfg.model).name)
            m = TrainingSae(sae_cfg, self.scales[name]).to(self.world.device)
            m.initialise(sample[name] * self.scales[name], self.generator)
            for p in m.parameters():
                self.world.broadcast(p.data)
            self.saes[name] = m
        self.params = [p for m in self.saes.values() for p in m.parameters()]
        self.lrs = {name: cfg.lr or default_lr(cfg.architecture, m.sae.cfg.d_sae) for name, m in self.saes.items()}
        self.opt = torch.optim.Adam([{"params": list(m.parameters()), "lr": self.lrs[name]}
                                     for name, m in self.saes.items()])
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg, self.total_steps))
        self.since_fired = {s: torch.zeros(m.sae.cfg.d_sae, device=self.world.device)
                            for s, m in self.saes.items()}

    def _resample_steps(self) -> set[int]:
        if self.cfg.architecture != "standard":
            return set()
        dead = self.cfg.dead
        until = int(dead.resample_until * self.total_steps)
        if dead.resample_every_tokens is None:
            return {self.total_steps * i // 8 for i in range(1, 5)} - {0}
        every = max(1, dead.resample_every_tokens // self.cfg.batch_tokens)
        return set(range(every, until + 1, every))

    # ------------------------------------------------------------ losses

    def _local_loss(self, batch: dict[str, Tensor], stats: dict) -> Tensor:
        loss = 0.0
        for name, m in self.saes.items():
            x = batch[name] * self.scales[name]
            recon, f, pre = m(x)
            loss = loss + self._site_terms(name, m, x, recon, f, pre, stats)
        return loss

    def _e2e_loss(self, ids: Tensor, stats: dict) -> Tensor:
        with torch.no_grad():
            clean_logits, clean = self.lm.run(ids, capture=self.downstream)
        site_terms: list[Tensor] = []

        def splice(name: str):
            m, s = self.saes[name], self.scales[name]

            def fn(x_raw: Tensor) -> Tensor:
                x = x_raw.float().reshape(-1, x_raw.shape[-1]) * s
                recon, f, pre = m(x)
                keep = ~sink_rows(x_raw).reshape(-1)  # run() passes sinks through: no loss terms for them
                site_terms.append(self._site_terms(name, m, x[keep], recon[keep], f[keep], pre[keep], stats))
                return (recon / s).reshape(x_raw.shape).to(x_raw.dtype)
            return fn

        logits, new = self.lm.run(ids, capture=self.downstream, replace={n: splice(n) for n in self.sites})
        kl = kl_per_token(clean_logits, logits).mean()
        stats["kl"] = stats.get("kl", 0.0) + kl.item()
        loss = self.cfg.loss.kl * kl + sum(site_terms)
        if self.downstream:
            ds = sum(F.mse_loss(new[p] * self.scales[p], clean[p] * self.scales[p]) for p in self.downstream)
            ds = ds / len(self.downstream)
            stats["ds"] = stats.get("ds", 0.0) + ds.item()
            loss = loss + self.cfg.loss.downstream * ds
        return loss

    def _site_terms(self, name: str, m: TrainingSae, x: Tensor, recon: Tensor, f: Tensor, pre: Tensor,
                    stats: dict) -> Tensor:
        cfg = self.cfg
        mse = F.mse_loss(recon, x)
        loss = cfg.mse_coeff * mse
        if cfg.sparsity_coeff:
            loss = loss + cfg.sparsity_coeff * f.norm(p=cfg.loss.p_norm, dim=-1).mean() / x.shape[-1]
        if cfg.architecture == "topk" and cfg.loss.aux_k:
            dead = self.since_fired[name] >= cfg.dead.window_tokens
            k_aux = cfg.loss.aux_k_size or x.shape[-1] // 2
            loss = loss + cfg.loss.aux_k * aux_k_loss(m, x, recon, pre, dead, k_aux)
        with torch.no_grad():
            active = f > 0
            stats.setdefault("fired", {}).setdefault(name, torch.zeros_like(active[0]))
            stats["fired"][name] |= active.any(0)
            stats["l0"] = stats.get("l0", 0.0) + active.sum(-1).float().mean().item() / len(self.sites)
            stats["mse"] = stats.get("mse", 0.0) + mse.item() / len(self.sites)
            stats["last"] = stats.get("last", {})
            stats["last"][name] = (x.detach(), (recon - x).detach().pow(2).sum(-1))
        return loss

    # ------------------------------------------------------------ maintenance

    def _sync_grads(self) -> None:
        if not self.world.distributed:
            return
        grads = [p.grad for p in self.params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world.size
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    @torch.no_grad()
    def _resample(self, stats: dict) -> int:
        """Towards Monosemanticity: dead features restart at inputs the SAE reconstructs worst."""
        total = 0
        for name, m in self.saes.items():
            dead = (self.since_fired[name] >= self.cfg.dead.window_tokens).nonzero().squeeze(-1)
            n = len(dead)
            if n == 0:
                continue
            x, err = stats["last"][name]
            picks = torch.multinomial(err / err.sum(), n, replacement=True)
            v = self.world.broadcast((x[picks] - m.sae.b_dec).contiguous())
            v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-8)
            alive = self.since_fired[name] < self.cfg.dead.window_tokens
            enc_norm = m.sae.W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0)
            m.sae.W_dec[dead] = v
            m.sae.W_enc[:, dead] = (v * enc_norm * 0.2).T
            m.sae.b_enc[dead] = 0.0
            for p, index in ((m.sae.W_dec, (dead,)), (m.sae.W_enc, (slice(None), dead)), (m.sae.b_enc, (dead,))):
                state = self.opt.state.get(p, {})
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in state:
                        state[key][index] = 0.0
            self.since_fired[name][dead] = 0
            total += n
        return total

    def _state(self, step: int, stream: WindowStream) -> dict:
        return {"step": step, "windows_drawn": stream.drawn,
                "cache_chunks": self.cache.consumed if self.cache is not None else 0,
                **({"buffer": self.buffer.state()} if self.buffer is not None else {}),
                **({"queue": self.gathered.queue} if self.gathered is not None else {}),
                "saes": {n: m.state_dict() for n, m in self.saes.items()},
                "scales": self.scales, "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "since_fired": self.since_fired, "rng": torch.get_rng_state(),
                **({"cuda_rng": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})}

    # ------------------------------------------------------------ main loop

    def train(self) -> dict[str, SAE]:
        cfg, world = self.cfg, self.world
        # rank 0 reads the checkpoint and every rank gets it (or its error): ranks without shared storage agree
        loaded, error = None, None
        if world.main:
            try:
                loaded = self.checkpoint.load()
            except InvalidArgument as e:
                error = str(e)
        if world.broadcast_object(error):
            raise InvalidArgument(error)
        state = world.broadcast_state(loaded)
        start = state["step"] if state else 0
        drawn = state["windows_drawn"] if state else 0
        stream = WindowStream(self.split.train, cfg.seed, world, drawn)
        local = cfg.objective == "local"
        self.cache = None
        if cfg.activations is not None:
            from rudder.training.cache import ActivationCache

            self.cache = ActivationCache(cfg.activations, cfg, self.sites, world.rank, world.size,
                                         state.get("cache_chunks", 0) if state else 0,
                                         {s: self.lm.shape.site_dim(Site.parse(s)) for s in self.sites})
        self.buffer = self.gathered = None
        if local:
            draw = self.cache.take if self.cache is not None else lambda: self._draw(stream)
            if world.distributed:
                draw = self.gathered = Gathered(draw, world)
            capacity = max(cfg.buffer_tokens, 2 * self.micro * world.size)
            self.buffer = buffer = ActivationBuffer(draw, self.sites, capacity, cfg.seed, world.device)
            if state is not None and "buffer" in state:  # the uninterrupted run's buffer and queue
                sample = buffer.restore(state["buffer"])
                if self.gathered is not None:
                    self.gathered.queue = state["queue"]
            else:
                sample = buffer.first_fill()
            mine = slice(world.rank * self.micro, (world.rank + 1) * self.micro)  # this rank's part of a batch

            def next_batch() -> dict[str, Tensor]:
                return {s: rows[mine] for s, rows in buffer.next_batch(self.micro * world.size).items()}
        else:
            # e2e draws no buffer: a separate look at the first windows, so a resumed run sees the same data
            sample = self._sample(WindowStream(self.split.train, cfg.seed, world),
                                  max(1, min(64, 8192 // self.per_window)))
        self._build(sample)
        if state is not None:
            for name, m in self.saes.items():
                m.load_state_dict(state["saes"][name])
            self.scales = state["scales"]
            self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
            self.since_fired = {k: v.to(world.device) for k, v in state["since_fired"].items()}
            torch.set_rng_state(state["rng"])
            if "cuda_rng" in state and torch.cuda.is_available():
                torch.cuda.set_rng_state(state["cuda_rng"])
            if world.main:
                log.info("resuming from %s at step %d of %d", self.checkpoint.path, start, self.total_steps)
        micro_windows = max(1, self.micro // self.per_window)
        resample_at = self._resample_steps()
        bar = tqdm(total=self.total_steps, initial=start, desc=f"SAE {cfg.objective}", unit="step",
                   disable=not world.main, dynamic_ncols=True)
        t0, tokens_done = time.perf_counter(), 0
        recorded: list[Tensor] = []
        for step in range(start, self.total_steps):
            stats: dict = {}
            self.opt.zero_grad(set_to_none=True)
            step_tokens = 0
            for _ in range(self.accum):
                if local:
                    batch = next_batch()
                    if cfg.save_activations is not None:
                        recorded.append(batch[self.sites[0]].cpu())
                    loss = self._local_loss(batch, stats)
                    step_tokens += self.micro
                else:
                    ids = stream.take(micro_windows)
                    loss = self._e2e_loss(ids, stats)
                    step_tokens += micro_windows * self.per_window
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"the loss became {loss.item()} at step {step} (lr {self.sched.get_last_lr()[0]:.2e}): "
                        "lower `lr`, raise `warmup_tokens` or set `max_grad_norm`; nothing was written"
                        + (f"; the last good checkpoint is {self.checkpoint.path}" if start or step else ""))
                (loss / self.accum).backward()
            self._sync_grads()
            for m in self.saes.values():
                if cfg.architecture == "standard":
                    m.remove_parallel_grad()
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
            self.opt.step()
            self.sched.step()
            for name, m in self.saes.items():
                if cfg.architecture == "standard":
                    m.normalise_decoder()
                fired = world.any(stats["fired"][name])
                self.since_fired[name] += step_tokens * world.size
                self.since_fired[name][fired] = 0
            if step + 1 in resample_at:
                n = self._resample(stats)
                if n and world.main:
                    tqdm.write(f"step {step + 1}: resampled {n} dead features")
            tokens_done += step_tokens * world.size
            post = {"loss": f"{loss.item():.4f}", "l0": f"{stats['l0'] / self.accum:.1f}",
                    "mse": f"{stats['mse'] / self.accum:.4f}"}
            if "kl" in stats:
                post["kl"] = f"{stats['kl'] / self.accum:.4f}"
            post["tok/s"] = f"{tokens_done / max(time.perf_counter() - t0, 1e-9):,.0f}"
            bar.set_postfix(post, refresh=False)
            bar.update()
            if world.main and (step + 1) % cfg.checkpoint_every_steps == 0 and step + 1 < self.total_steps:
                self.checkpoint.save(self._state(step + 1, stream))
                if os.environ.get("RUDDER_FAULT_EXIT_AT_STEP") == str(step + 1):
                    os._exit(137)  # fault injection (tests): die as a SIGKILL would, right after a known checkpoint
        bar.close()
        elapsed = time.perf_counter() - t0
        if recorded:
            save_activations(cfg.save_activations, torch.cat(recorded), self.scales[self.sites[0]], self.sites[0])
        self.tokens_per_second = tokens_done / elapsed if elapsed else float("nan")
        meta = {"objective": cfg.objective, "loss": self._loss_meta(), "training_tokens": self.total_steps *
                cfg.batch_tokens, "normalisation_scale": {s: self.scales[s] for s in self.sites}, "lr": self.lrs,
                "train_tokens_per_second": self.tokens_per_second, "world_size": world.size,
                "corpus": describe(cfg.corpus) if world.main else {},  # hashes every file: once
                "config": json.loads(self.given.model_dump_json())}
        return {name: m.export(meta) for name, m in self.saes.items()}

    def _loss_meta(self) -> dict:
        cfg = self.cfg
        out = {"sparsity": cfg.sparsity_coeff, "p_norm": cfg.loss.p_norm, "mse": cfg.mse_coeff}
        if cfg.objective != "local":
            out["kl"] = cfg.loss.kl
        if self.downstream:
            out["downstream"] = cfg.loss.downstream
            out["downstream_sites"] = self.downstream
        if cfg.architecture == "topk":
            out["aux_k"] = cfg.loss.aux_k
        return out

    # ------------------------------------------------------------ export

    def artifact_path(self, site: str) -> Path:
        return self.cfg.out if len(self.sites) == 1 else self.cfg.out / site

    def finish(self, saes: dict[str, SAE]) -> dict[str, dict]:
        """Evaluate, write each artifact atomically with its feature metadata, drop the checkpoint."""
        results = {}
        if self.world.main:
            weights_dtype = getattr(torch, self.cfg.save_dtype)
            for name, sae in saes.items():
                with torch.no_grad():  # evaluate the SAE as it will be read back from disk
                    for p in sae.parameters():
                        p.copy_(p.to(weights_dtype))
                metrics = evaluate_sae(self.lm, sae, self.split.eval) if self.split.eval else {}
                sae.cfg.metadata["eval"] = metrics
                meta = feature_metadata(self.lm, sae, self.split.eval) if self.split.eval else []
                path = sae.save(self.artifact_path(name),
                                extra_files={FEATURE_METADATA: json.dumps({"features": meta})},
                                weights_dtype=weights_dtype)
                results[name] = {"path": str(path), "train_tokens_per_second": self.tokens_per_second, **metrics}
                print(format_metrics(name, path, metrics))
            self.checkpoint.remove()
        self.world.barrier()
        return results


def save_activations(path: Path, acts: Tensor, scale: float, site: str) -> None:
    """The activations a local run trained on, in the order it saw them (raw, float32), and the
    normalisation scale it used: another trainer given this file sees exactly the same data."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"activations": acts.contiguous(), "scale": torch.tensor(scale)}, str(path), metadata={"site": site})
    log.info("wrote %d activations of %s to %s", len(acts), site, path)


def format_metrics(site: str, path: Path, m: dict) -> str:
    if not m:
        return f"SAE at {path} (no eval tokens)"
    return (f"SAE {site} → {path}\n  L0 {m['l0']:.1f} · alive {m['alive']} / dead {m['dead']} · "
            f"explained variance {m['explained_variance']:.3f} · MSE {m['mse']:.4g}\n"
            f"  CE {m['ce_clean']:.4f} → {m['ce_spliced']:.4f} (increase {m['ce_increase']:.4f}; zero-ablated "
            f"{m['ce_zero_ablated']:.4f}) · KL {m['kl']:.4f} · CE loss recovered {m['ce_loss_score']:.3f}")


def run(cfg: SaeTrainConfig) -> dict[str, dict]:
    trainer = SaeTrainer(cfg)
    try:
        return trainer.finish(trainer.train())
    finally:
        trainer.world.close()
