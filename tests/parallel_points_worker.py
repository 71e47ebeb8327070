"""Worker for tests/test_parallel_points.py: under torchrun (gloo), sample with the K points split across the
ranks and save rank 0's result. Also importable: :func:`case` builds the same problem in one process."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backends import make_analytic  # noqa: E402
from solvers.core import seeded_noise  # noqa: E402
from solvers.schedules import polynomial_sigmas  # noqa: E402
from solvers.table import PredictorTable  # noqa: E402


def case(num_points: int, plugin: bool) -> tuple:
    """A digits problem with a random K-point table carrying both scale tables (and the iPNDM plugin)."""
    backend = make_analytic("digits", guidance=2.0)
    rng = np.random.default_rng(num_points)
    sigmas = polynomial_sigmas(6, 0.002, 80.0).numpy()
    rows = len(sigmas) - 1
    weights = rng.uniform(0.2, 1.0, (rows, num_points))
    table = PredictorTable(positions=rng.uniform(0.05, 0.95, (rows, num_points)),
                           weights=weights / weights.sum(1, keepdims=True), sigmas=sigmas,
                           dir_scales=rng.uniform(0.9, 1.1, (rows, num_points)),
                           time_scales=rng.uniform(0.9, 1.1, (rows, num_points)), afs=True,
                           solver="ipndm" if plugin else "epd", max_order=3 if plugin else None)
    noise = seeded_noise([3, 5, 7], tuple(backend.shape), torch.float64)
    cond = backend.encode_prompts(["1", "4", ""])
    return backend, table, noise * float(sigmas[0]), cond


def main(out: str, num_points: int, plugin: bool) -> None:
    import torch.distributed as dist

    from solvers.epd import sample_epd
    from solvers.parallel import DistributedPoints

    dist.init_process_group("gloo")
    backend, table, x, cond = case(num_points, plugin)
    result = sample_epd(backend, x, table, cond, shard=DistributedPoints())
    if dist.get_rank() == 0:
        torch.save(result, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3] == "plugin")
