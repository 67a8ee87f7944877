"""Latent-sharded TopK on 2 gloo ranks equals the unsharded SAE: reconstruction, latents and every
parameter's gradient."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rudder.core.errors import InvalidArgument
from rudder.core.sae import SAE, SAEConfig
from rudder.training.distributed import World
from rudder.training.sharded import ShardedTopK

D_IN, D_SAE, K, ROWS = 12, 32, 5, 40


def whole_sae() -> SAE:
    g = torch.Generator().manual_seed(0)
    sae = SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, hook_name="blocks.0.hook_resid_post", architecture="topk", k=K))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return sae


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(ROWS, D_IN, generator=g), torch.randn(ROWS, D_SAE, generator=g)


def loss(recon: torch.Tensor, x: torch.Tensor, f: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """MSE, plus a term on the latents themselves so the encoder's gradient is checked too."""
    return (recon - x).pow(2).mean() + (f * weights).sum() / len(f)


def _rank(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        world = World(rank, 2)
        m = ShardedTopK.from_sae(whole_sae(), world)
        x, w = data()
        recon, f, _ = m(x)
        loss(recon, x, f, w[:, m.offset:m.offset + m.d_local]).backward()
        torch.save({"recon": recon.detach(), "f": f.detach(),
                    "grads": {n: p.grad for n, p in m.named_parameters()}}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_latent_shards_compute_the_whole_saes_forward_and_gradients(tmp_path):
    mp.start_processes(_rank, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, start_method="spawn")
    sae = whole_sae()
    x, w = data()
    pre = sae.pre_acts(x)
    values, ids = pre.topk(K, dim=-1)
    f = torch.zeros_like(pre).scatter(-1, ids, torch.relu(values))
    recon = sae.decode(f)
    loss(recon, x, f, w).backward()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    half = D_SAE // 2
    assert (f > 0).sum(-1).max() <= K
    for r, got in enumerate(ranks):
        mine = slice(r * half, (r + 1) * half)
        torch.testing.assert_close(got["recon"], recon.detach())
        torch.testing.assert_close(got["f"], f.detach()[:, mine])
        torch.testing.assert_close(got["grads"]["W_enc"], sae.W_enc.grad[:, mine])
        torch.testing.assert_close(got["grads"]["b_enc"], sae.b_enc.grad[mine])
        torch.testing.assert_close(got["grads"]["W_dec"], sae.W_dec.grad[mine])
        torch.testing.assert_close(got["grads"]["b_dec"], sae.b_dec.grad)


def test_one_rank_is_the_whole_topk_sae_and_an_uneven_split_is_refused():
    sae = whole_sae()
    x, _ = data()
    recon, f, _ = ShardedTopK.from_sae(sae, World())(x)
    torch.testing.assert_close(recon, sae(x))
    torch.testing.assert_close(f, sae.encode(x))
    with pytest.raises(InvalidArgument, match="splits d_sae evenly: 30 latents over 4 ranks"):
        ShardedTopK(D_IN, 30, K, World(0, 4))
