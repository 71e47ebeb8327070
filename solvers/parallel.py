"""Sharding the K parallel points of an EPD step across processes (one GPU each).

An EPD step needs ``D`` at the current point (sequential) and at K intermediate points that are independent
of each other. On a compute-bound backbone (SD3 or FLUX at 1024 px) one GPU pays K times for the second
evaluation. With P processes, rank ``p`` evaluates the points ``k = p, p + P, p + 2P, ...``, forms its partial
sum ``sum_{k in p} w_k c_k d_k`` and an all-reduce adds the partial sums, so every rank ends the step with the
same ``x_next`` at the cost of one evaluation of ``ceil(K / P)`` points plus one all-reduce of the state.

Every rank evaluates the current point itself (it is needed to reach the intermediate points), so the ranks
must hold the same model and start from the same noise; they then stay equal to within the reduction's
rounding. This module only needs ``torch.distributed``; the solvers take any object with the two methods of
:class:`PointShard`.
"""

from __future__ import annotations

from typing import Protocol

import torch

__all__ = ["PointShard", "DistributedPoints", "local_points"]


class PointShard(Protocol):
    """Which of the K points this process evaluates, and how partial sums are combined."""

    def local(self, num_points: int) -> slice: ...

    def reduce(self, partial: torch.Tensor) -> torch.Tensor: ...


def local_points(num_points: int, rank: int, world: int) -> slice:
    """Round-robin share of the K points for ``rank`` of ``world``, as a slice (indexing with it makes views,
    not index tensors that would have to be copied to the GPU). Empty when ``rank >= K``."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"bad rank {rank} of world {world}")
    return slice(rank, max(num_points, rank), world)


class DistributedPoints:
    """:class:`PointShard` over an initialised ``torch.distributed`` process group (NCCL on GPUs, gloo on CPU).

    ``reduce`` is an in-place SUM all-reduce; it is asynchronous on the GPU (no host synchronisation), so the
    sampling loop keeps queueing work.
    """

    def __init__(self, group: object | None = None):
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("parallel points across processes need an initialised torch.distributed group "
                               "(run under torchrun)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)

    def local(self, num_points: int) -> slice:
        return local_points(num_points, self.rank, self.world)

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        partial = partial.contiguous()
        dist.all_reduce(partial, op=dist.ReduceOp.SUM, group=self.group)
        return partial
