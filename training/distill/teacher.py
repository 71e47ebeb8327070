"""Teacher trajectories for Stage-1 distillation (docs/authors-code.md §6.2), with an on-disk cache.

The teacher integrates the same noise as the student on a finer grid of the **same family**: with ``M``
intermediate steps per student interval it uses ``(M + 1)(N - 1) + 1`` points. Every family we build is
parameterised by ``u = i/(N-1)``, so the student's points are exactly the teacher's points ``(M + 1) n``
(nested grids); the fine grid is checked for that and snapped onto the student's values. A student grid
without a known family is subdivided uniformly in ``log sigma``. The states at the student's points are what
the student is trained to reach. ``solver="reference"`` uses the adaptive float64 solver instead (exact
models: the teacher's own error then vanishes).

``inner_steps`` k > 2 adds the authors' refinement on top (docs/authors-code.md §4, §6.2): their ICCV ``heun`` and
``dpm`` teachers split every teacher interval again by a polynomial rho-7 grid of k points
(:func:`solvers.schedules.refine_grid`, float32 as theirs or float64), so the teacher steps over
``(M + 1)(k - 1)(N - 1) + 1`` points and student point n is fine point ``(M + 1)(k - 1) n``. The released ICCV runs
used k = 3 (``configs/distill/{cifar10,ffhq,imagenet64,lsun_bedroom_ldm}.yaml``).

Trajectories depend only on the noise seeds and conditions, so they are cached per batch under a key that
hashes everything they depend on; a second run (another learning rate, loss, ...) reuses them.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from solvers.reference import solve_ode
from solvers.registry import get_solver
from solvers.schedules import ScheduleSpec, make_sigmas, refine_grid
from safeio import atomic_write

__all__ = ["teacher_grid", "teacher_stride", "teacher_states", "TeacherCache"]


def teacher_grid(student_sigmas: Any, M: int, schedule: ScheduleSpec | None = None, alphas_cumprod: Any = None,
                 *, inner_steps: int = 2, inner_dtype: str = "float32") -> torch.Tensor:
    """The ``(M+1)(N-1)+1``-point teacher grid whose every ``(M+1)``-th point is a student point; with
    ``inner_steps`` k > 2 each of its intervals is split again by the authors' inner rho-7 grid
    (:func:`solvers.schedules.refine_grid`), giving ``(M+1)(k-1)(N-1)+1`` points, every ``(M+1)(k-1)``-th a
    student point."""
    return refine_grid(_refined_family(student_sigmas, M, schedule, alphas_cumprod), inner_steps, dtype=inner_dtype)


def teacher_stride(M: int, inner_steps: int = 2) -> int:
    """Teacher steps per student step: student point n is teacher point ``stride * n``."""
    return (int(M) + 1) * (int(inner_steps) - 1)


def _refined_family(student_sigmas: Any, M: int, schedule: ScheduleSpec | None, alphas_cumprod: Any) -> torch.Tensor:
    """The student's grid refined M-fold within its family (or in log sigma), the student's points kept."""
    student = torch.as_tensor(np.asarray(student_sigmas, dtype=np.float64))
    if M == 0:
        return student.clone()
    n_fine = (M + 1) * (len(student) - 1) + 1
    if schedule is not None:
        spec = ScheduleSpec.from_dict({**schedule.to_dict(), "num_steps": n_fine})
        fine = make_sigmas(spec, alphas_cumprod=alphas_cumprod).double()
        coarse = fine[:: M + 1]
        if len(coarse) == len(student) and bool(torch.allclose(coarse, student, rtol=1e-5, atol=0)):
            fine = fine.clone()
            fine[:: M + 1] = student  # snap: the student's grid is the one that counts
            return fine
    log_s = student.log()
    frac = torch.arange(1, M + 1, dtype=torch.float64) / (M + 1)
    parts = [torch.exp(log_s[i] + frac * (log_s[i + 1] - log_s[i])) for i in range(len(student) - 1)]
    fine = torch.empty(n_fine, dtype=torch.float64)
    fine[:: M + 1] = student
    for i, part in enumerate(parts):
        fine[i * (M + 1) + 1: (i + 1) * (M + 1)] = part
    return fine


@torch.no_grad()
def teacher_states(denoiser: Any, x_start: torch.Tensor, student_sigmas: Any, cond: Any = None, *,
                   solver: str = "heun", M: int = 1, schedule: ScheduleSpec | None = None,
                   alphas_cumprod: Any = None, rtol: float = 1e-6, flow: bool = False, inner_steps: int = 2,
                   inner_dtype: str = "float32") -> torch.Tensor:
    """States ``[N-1, B, ...]`` of the teacher at the student's points ``sigma_1 .. sigma_{N-1}``.

    ``x_start`` is the initial state at ``sigma_0`` (noise times sigma_0, or the noise for flow matching).
    The teacher never uses AFS (docs/authors-code.md §6.2), so the authors' every-step AFS bug (§9.5) never
    reaches it; ``solver`` runs plainly on :func:`teacher_grid` (with ``inner_steps``, the authors' sub-steps).
    """
    student = np.asarray(student_sigmas, dtype=np.float64)
    if solver == "reference":
        solved = solve_ode(denoiser, x_start, float(student[0]), student[1:].tolist(), cond, rtol=rtol, atol=rtol)
        states = [solved["states"][float(s)] for s in student[1:]]
        return torch.stack(states).to(x_start.dtype)
    fine = teacher_grid(student, M, schedule, alphas_cumprod, inner_steps=inner_steps, inner_dtype=inner_dtype)
    stride = teacher_stride(M, inner_steps)
    keep = {stride * (n + 1) - 1: n for n in range(len(student) - 1)}  # callback index i = state after step i
    states: list[torch.Tensor | None] = [None] * (len(student) - 1)

    def collect(info: dict) -> None:
        if info["i"] in keep:
            states[keep[info["i"]]] = info["x"]

    get_solver(solver)(denoiser, x_start, fine, cond, flow=flow, callback=collect)
    return torch.stack(states)  # type: ignore[arg-type]


class TeacherCache:
    """Teacher trajectories on disk: ``<root>/<key>/<batch>.pt``, written atomically, read with
    ``weights_only=True``. ``key`` hashes the backend, grid, teacher and condition settings."""

    def __init__(self, root: str | Path, key: dict):
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.folder = Path(root) / digest
        self.folder.mkdir(parents=True, exist_ok=True)
        info = self.folder / "key.json"
        if not info.exists():
            atomic_write(info, json.dumps(key, indent=1, sort_keys=True, default=str).encode())
        self.hits = 0
        self.misses = 0

    def _path(self, ids: torch.Tensor) -> Path:
        first, count = int(ids[0]), int(ids.numel())
        contiguous = bool(torch.equal(ids, torch.arange(first, first + count, dtype=ids.dtype)))
        name = f"{first:012d}-{count}" if contiguous else hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:20]
        return self.folder / f"{name}.pt"

    def has(self, ids: torch.Tensor) -> bool:
        """Whether a batch's file exists (not whether it reads back; :meth:`get` checks that)."""
        return self._path(ids).is_file()

    def get(self, ids: torch.Tensor) -> torch.Tensor | None:
        path = self._path(ids)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a truncated file from a crash long ago: recompute
            self.misses += 1
            return None
        if not torch.equal(saved["ids"], ids):
            self.misses += 1
            return None
        self.hits += 1
        return saved["states"]

    def put(self, ids: torch.Tensor, states: torch.Tensor) -> None:
        buffer = io.BytesIO()
        torch.save({"ids": ids.clone(), "states": states.detach().cpu()}, buffer)
        atomic_write(self._path(ids), buffer.getvalue())
