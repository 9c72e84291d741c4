"""Scale-out plumbing of training: rank and world size, the process group, the device per process.

The same :func:`.training.train` call runs on one CPU, one GPU or under ``torchrun`` (one process
per CPU group / GPU, ``DistributedDataParallel``). This file holds what differs between those
cases. Phase 2 of issue 13 moves it to ``trained/distributed.py``.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from ..core.inputs import resolve_device

__all__ = ["Distributed", "training_device"]


class Distributed:
    """Rank / world size, and the process group if this call had to create it (torchrun)."""

    def __init__(self, device: torch.device):
        import torch.distributed as dist

        self.dist = dist
        self.owned = False
        if dist.is_available() and dist.is_initialized():
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
        elif dist.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            self.owned = True
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
        else:
            self.rank, self.world = 0, 1
        self.enabled = self.world > 1
        self.backend = dist.get_backend() if self.enabled else None

    def sum(self, values: Sequence[float], device: torch.device) -> list[float]:
        """Sum of ``values`` over all processes (identical result on every rank)."""
        if not self.enabled:
            return [float(v) for v in values]
        on = device if self.backend == "nccl" else torch.device("cpu")
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=on)
        self.dist.all_reduce(t)
        return t.tolist()

    def close(self) -> None:
        if self.owned and self.dist.is_initialized():
            self.dist.destroy_process_group()


def training_device(device: Any) -> torch.device:
    """The device of this process: under torchrun "auto"/"cuda" mean the GPU of LOCAL_RANK."""
    dev = resolve_device(device)
    local_rank = os.environ.get("LOCAL_RANK")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(local_rank) if local_rank is not None else 0)
        if dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s): start at most that many "
                "processes per machine (torchrun --nproc_per_node)."
            )
    return dev
