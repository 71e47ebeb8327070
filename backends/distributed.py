"""The torchrun process group, joined and left one way by every entry point (sampling, benchmarks, trainers).

Under torchrun (``WORLD_SIZE > 1``) each process takes the GPU ``cuda:$LOCAL_RANK`` and joins one group with
NCCL for CUDA tensors and gloo for CPU tensors (the RDPO policy and small host-side counts are reduced on the
CPU); without CUDA the group is gloo only. A single process joins nothing.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["join_process_group", "leave_process_group", "rank_and_world", "rank_device", "barrier"]


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of the joined group, ``(0, 1)`` without one."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_device(name: str | None = "auto") -> torch.device:
    """``auto`` (or None): this rank's GPU (``cuda:$LOCAL_RANK``) when CUDA is available, else the CPU; or ``name``."""
    if name not in (None, "auto"):
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def join_process_group() -> tuple[int, int, torch.device | None]:
    """Join the torchrun group (once; later calls return the same answer): ``(rank, world, this rank's device)``,
    or ``(0, 1, None)`` for a single process, which leaves the choice of device to the caller."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not dist.is_initialized():
        return 0, 1, None
    device = rank_device("auto")
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group(backend="cpu:gloo,cuda:nccl")
        else:
            dist.init_process_group(backend="gloo")
    return dist.get_rank(), dist.get_world_size(), device


def leave_process_group() -> None:
    """Leave the group if one was joined (a no-op otherwise)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (a no-op for a single process)."""
    if dist.is_initialized():
        dist.barrier()
