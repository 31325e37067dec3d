"""torchrun / DistributedDataParallel helpers: the process group, its timeout, and sharding a list of
work items over the ranks with the results gathered back in the original order.

Rank 0 logs and writes checkpoints; every rank trains on its own batches and validates its share of the
validation scans (:func:`shard`, :func:`gather_shards`). The same code runs one node (``torchrun
--nproc-per-node N``) or several (``torchrun --nnodes M --node-rank K --rdzv-backend c10d ...``): only the
global ``RANK`` / ``WORLD_SIZE`` matter here, ``LOCAL_RANK`` picks the GPU.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str, timeout_min: float = 30.0) -> DistInfo:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1): NCCL on GPU, gloo on CPU.

    ``timeout_min`` (``train.dist_timeout_min``): how long a collective (a barrier, the gradient
    all-reduce, the validation gather) waits for the slowest rank before the run fails. It must cover the
    longest stretch one rank can spend alone: a checkpoint write on rank 0, or a rank's share of a
    validation pass when the shares are uneven.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo",
                                timeout=timedelta(minutes=timeout_min))
    if device_type == "cuda":
        torch.cuda.set_device(local)
    return DistInfo(rank, world, local)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def shard(items: Sequence[T], info: DistInfo) -> list[T]:
    """This rank's share of ``items``: every ``world_size``-th item from index ``rank`` (``items[rank::W]``).

    Round-robin rather than contiguous blocks: neighbouring items (often scans of one site or size) spread
    over the ranks, and the shares differ in length by at most one.
    """
    return list(items[info.rank::info.world_size])


def gather_shards(local: list[Any], info: DistInfo) -> list[Any]:
    """The results of every rank's :func:`shard`, on every rank, in the order of the unsharded items.

    ``local`` holds this rank's results, one per item of its share, in order. Item ``i`` of the full list
    was rank ``i % W``'s item ``i // W``. Objects travel pickled (``all_gather_object``): keep them small
    (scores and counts, not volumes). The call waits for the slowest rank.
    """
    if not info.enabled:
        return list(local)
    per_rank: list[list[Any]] = [[] for _ in range(info.world_size)]
    dist.all_gather_object(per_rank, local)
    total = sum(len(p) for p in per_rank)
    return [per_rank[i % info.world_size][i // info.world_size] for i in range(total)]
