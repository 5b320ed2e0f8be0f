"""Data-parallel fine-tuning and a shared export when launched by `torchrun` (issue #23).

    torchrun --nproc_per_node N -m encoders_torch.extract ... --batch-size B

Every process holds the whole encoder + head. Fine-tuning draws the very batches of global size
`B × N` a single process with `--batch-size B×N` draws (one NumPy generator seeded alike everywhere);
rank `r` computes the `r`-th contiguous part of each (`World.shard`), and torch's
`DistributedDataParallel` sums the gradients across processes (gloo on CPU, nccl on CUDA). Each rank's
loss is scaled by its share of the global batch, so the summed gradient is the one of the global
batch's mean loss even when the batch does not split evenly. Validation, model selection and the
written adapter are rank 0's; the others receive its score and wait. The export hands the chunks of
each split round-robin to the ranks, which write their chunk files; rank 0 merges them into the store.

Why DDP and not `accelerate`: the training loop already owns its batching, focal loss, clipping,
checkpoints and resume; what data parallelism adds to it is one gradient all-reduce per step, a
shard of each batch and a few collectives, which `torch.distributed` gives directly and testably on
CPU with gloo. `accelerate` would wrap the same DDP behind its own launcher, config file and
dataloader and sampler, and its sampler does not reproduce the single-process batches by
construction, which the equivalence with a single-process run rests on.

Dropout draws other masks in other processes, so only with dropout 0 (LoRA and head) does a run over
N processes reproduce the single-process one to rounding.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

_TIMEOUT = datetime.timedelta(hours=2)  # a rank may wait this long for rank 0's validation or export


@dataclasses.dataclass(frozen=True)
class World:
    """This process's rank among `size` processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that validates, selects, logs and writes."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def shard(self, batch: np.ndarray) -> np.ndarray:
        """This rank's contiguous part of a global batch (sizes differ by at most one; may be empty)."""
        return np.array_split(batch, self.size)[self.rank]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (any picklable object)."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of `values` over the ranks (float64)."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """`model` inside DistributedDataParallel when distributed (rank 0's weights broadcast), else itself."""
        if not self.distributed:
            return model
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def launched() -> bool:
    """Started by torchrun (or another launcher that sets WORLD_SIZE) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device) -> tuple[World, torch.device]:
    """Joins the process group torchrun set up: (this process's World, its device).

    Without torchrun: `World()` and `device` unchanged. Under torchrun on CUDA each process takes the
    GPU of its LOCAL_RANK and uses nccl; on CPU gloo.
    """
    if not launched():
        return World(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=_TIMEOUT)
    return World(dist.get_rank(), dist.get_world_size()), device


def shutdown() -> None:
    """Leaves the process group if this process joined one (after a last barrier, so that no rank quits
    while another still talks to it)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
