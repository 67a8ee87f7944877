"""A TopK SAE whose latents are split across ranks, for dictionaries too large for one device.

Rank r of N holds latents [r·d/N, (r+1)·d/N): its columns of W_enc and b_enc and its rows of
W_dec; b_dec is on every rank. The pattern of OpenAI's `sharded_topk` (Gao et al. 2024) with
Megatron's two collectives:

    x − b_dec ──copy──▶ pre_r = (x − b_dec) W_enc,r + b_enc,r ──local top-k──▶ candidates_r
    all-gather every rank's candidate values; the global top-k among them (a global top-k
    latent is always in its own rank's local top-k) marks which of rank r's are kept
    f_r = ReLU(kept candidates_r) ──▶ f_r W_dec,r ──reduce──▶ Σ_r (+ b_dec) = x̂ on every rank

`copy` is the identity forward and an all-reduce of the gradient backward (every rank's encoder
reads x); `reduce` is an all-reduce forward and the identity backward (the loss on x̂ is the same
on every rank). The forward, and the gradients of every shard, equal the unsharded SAE's (a test
checks it on 2 gloo ranks).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from rudder.core.errors import InvalidArgument
from rudder.core.sae import SAE
from rudder.training.distributed import World


class _Copy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad


class _Reduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        x = x.contiguous()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


class ShardedTopK(nn.Module):
    def __init__(self, d_in: int, d_sae: int, k: int, world: World):
        super().__init__()
        if d_sae % world.size:
            raise InvalidArgument(f"latent sharding splits d_sae evenly: {d_sae} latents over {world.size} ranks; "
                                  "choose a multiple of the rank count")
        if not 0 < k <= d_sae:
            raise InvalidArgument(f"a TopK SAE needs 0 < k <= d_sae, got k={k}, d_sae={d_sae}")
        self.world, self.k = world, k
        self.d_local = d_sae // world.size
        self.offset = world.rank * self.d_local
        self.W_enc = nn.Parameter(torch.zeros(d_in, self.d_local))
        self.b_enc = nn.Parameter(torch.zeros(self.d_local))
        self.W_dec = nn.Parameter(torch.zeros(self.d_local, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    @classmethod
    def from_sae(cls, sae: SAE, world: World) -> ShardedTopK:
        """This rank's shard of a whole TopK SAE."""
        m = cls(sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.k, world)
        mine = slice(m.offset, m.offset + m.d_local)
        with torch.no_grad():
            m.W_enc.copy_(sae.W_enc[:, mine])
            m.b_enc.copy_(sae.b_enc[mine])
            m.W_dec.copy_(sae.W_dec[mine])
            m.b_dec.copy_(sae.b_dec)
        return m

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x → the reconstruction (whole, on every rank), this rank's latents and pre-activations."""
        distributed = self.world.distributed
        centred = _Copy.apply(x - self.b_dec) if distributed else x - self.b_dec
        pre = centred @ self.W_enc + self.b_enc
        values, ids = pre.topk(min(self.k, self.d_local), dim=-1)
        if distributed:
            every = [torch.empty_like(values) for _ in range(self.world.size)]
            dist.all_gather(every, values.detach().contiguous())
            candidates = torch.cat(every, dim=-1)  # (n, size·k_local), rank-major
        else:
            candidates = values.detach()
        chosen = torch.zeros_like(candidates, dtype=torch.bool)
        chosen.scatter_(-1, candidates.topk(self.k, dim=-1).indices, True)
        width = values.shape[-1]
        kept = chosen[:, self.world.rank * width:(self.world.rank + 1) * width]
        f = torch.zeros_like(pre).scatter(-1, ids, torch.relu(values) * kept)
        partial = f @ self.W_dec
        recon = (_Reduce.apply(partial) if distributed else partial) + self.b_dec
        return recon, f, pre
