"""Data-parallel training with torchrun (DDP); a single process when not launched by it.

    torchrun --nproc-per-node 4 --no-python rudder train sae --config sae.yaml

Every rank runs the frozen model on its own share of the sequences; gradients are
averaged as DDP does (`SaeTrainer._sync_grads`). For the local objective the ranks gather
their activations into one process's shuffle buffer (`rudder.training.sae.Gathered`), so N
ranks train what one process would. Rank 0 alone prints progress and writes checkpoints and
artifacts, and hands its checkpoint to the others when a run resumes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class _Slot:
    """Where a tensor sat in a broadcast structure."""
    index: int
    shape: tuple
    dtype: torch.dtype


def _tree_map(fn, x, leaf: type):
    """`x` (dicts, lists, tuples) with every `leaf` instance replaced by fn(leaf), depth first."""
    if isinstance(x, leaf):
        return fn(x)
    if isinstance(x, dict):
        return {k: _tree_map(fn, v, leaf) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_tree_map(fn, v, leaf) for v in x)
    return x


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    device: str = "cpu"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @classmethod
    def from_env(cls, device: str) -> World:
        """Join the process group torchrun describes in the environment, if any."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size == 1:
            return cls(device=device)
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), device)

    def any(self, mask: torch.Tensor) -> torch.Tensor:
        """Elementwise OR of a bool tensor over ranks."""
        if not self.distributed:
            return mask
        t = mask.to(torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.bool()

    def mean(self, value: float) -> float:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.size

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.broadcast(t, src=0)
        return t

    def broadcast_object(self, obj):
        """Rank 0's `obj` on every rank (pickled; tensors come back on the CPU)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast_state(self, obj):
        """Rank 0's `obj` (dicts, lists and tuples holding tensors, as a checkpoint) on every rank:
        the structure is pickled, each tensor sent by itself with `dist.broadcast` (on the device
        the backend needs), so a large SAE's weights and Adam moments are never one pickle."""
        if not self.distributed:
            return obj
        tensors: list[torch.Tensor] = []

        def strip(t: torch.Tensor) -> _Slot:
            tensors.append(t)
            return _Slot(len(tensors) - 1, tuple(t.shape), t.dtype)

        skeleton = self.broadcast_object(_tree_map(strip, obj, torch.Tensor) if self.main else None)
        slots: list[_Slot] = []
        _tree_map(slots.append, skeleton, _Slot)  # every rank: the slots, in rank 0's order
        received = {}
        for slot in slots:
            t = (tensors[slot.index] if self.main else torch.empty(slot.shape, dtype=slot.dtype)).to(self.device)
            dist.broadcast(t, src=0)
            received[slot.index] = t.cpu()
        return _tree_map(lambda slot: received[slot.index], skeleton, _Slot)

    def all_gather_object(self, obj) -> list:
        """Every rank's `obj`, in rank order."""
        if not self.distributed:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def all_gather_rows(self, rows: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Every rank's `rows` (site -> (n_rank, d), n differing by rank), in rank order."""
        if not self.distributed:
            return [rows]
        names = sorted(rows)
        n = torch.tensor([len(rows[names[0]])], device=self.device)
        counts = [torch.zeros_like(n) for _ in range(self.size)]
        dist.all_gather(counts, n)
        most = int(max(counts).item())
        out: list[dict[str, torch.Tensor]] = [{} for _ in range(self.size)]
        for name in names:
            x = rows[name].to(self.device)
            padded = torch.cat([x, x.new_zeros(most - len(x), *x.shape[1:])])
            parts = [torch.empty_like(padded) for _ in range(self.size)]
            dist.all_gather(parts, padded)
            for r, (part, c) in enumerate(zip(parts, counts)):
                out[r][name] = part[:int(c.item())]
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()
