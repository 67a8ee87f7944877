"""The rank-0-to-all broadcast a resumed run uses: rank 0's nested state arrives whole on every
rank, each tensor sent by itself (the structure pickled, never the weights)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rudder.training.distributed import World


def state() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"step": 7, "saes": {"a": {"W": torch.randn(3, 4, generator=g), "b": torch.zeros(4)}},
            "optimizer": {"state": {0: {"exp_avg": torch.randn(3, generator=g), "step": torch.tensor(5.0)}},
                          "param_groups": [{"lr": 0.1, "params": [0]}]},
            "fired": torch.tensor([True, False]), "rng": torch.Generator().manual_seed(3).get_state(),
            "pair": (torch.arange(3), "x"), "empty": torch.empty(0, 2)}


def _rank(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        got = World(rank, 2).broadcast_state(state() if rank == 0 else {"not": "this"})
        torch.save(got, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_broadcast_state_gives_every_rank_rank_0s_structure_and_tensors(tmp_path):
    mp.start_processes(_rank, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, start_method="spawn")
    want = state()
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert got.keys() == want.keys() and got["step"] == 7 and got["pair"][1] == "x"
        assert got["optimizer"]["param_groups"] == want["optimizer"]["param_groups"]
        torch.testing.assert_close(got["saes"]["a"]["W"], want["saes"]["a"]["W"])
        torch.testing.assert_close(got["optimizer"]["state"][0]["exp_avg"], want["optimizer"]["state"][0]["exp_avg"])
        assert got["fired"].tolist() == [True, False] and got["rng"].dtype == torch.uint8
        assert torch.equal(got["rng"], want["rng"]) and got["pair"][0].tolist() == [0, 1, 2]
        assert got["empty"].shape == (0, 2)


def test_one_process_gets_its_own_object_back():
    obj = state()
    assert World(0, 1).broadcast_state(obj) is obj
