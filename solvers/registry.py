"""One registry, name -> solver, used by every CLI and trainer.

Each entry knows how to run on a grid and how many evaluations it costs, so tools can plan a grid for a
target NFE and report honest counts (see :class:`solvers.core.EvalCount`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import numpy as np
import torch

from .baselines import sample_dpm2, sample_dpmpp, sample_euler, sample_heun, sample_ipndm, sample_unipc
from .core import EvalCount

__all__ = ["SolverSpec", "SOLVERS", "ALIASES", "get_solver", "solver_names", "eval_count", "steps_for_nfe"]


@dataclass(frozen=True)
class SolverSpec:
    """A registered baseline solver: ``fn(denoiser, x, sigmas, cond, **kwargs)``."""

    name: str
    fn: Callable[..., torch.Tensor]
    evals_per_step: int
    description: str
    kwargs: dict = field(default_factory=dict)

    def __call__(self, denoiser: Any, x: torch.Tensor, sigmas: Any, cond: Any = None, **kwargs: Any) -> torch.Tensor:
        return self.fn(denoiser, x, sigmas, cond, **{**self.kwargs, **kwargs})


SOLVERS: dict[str, SolverSpec] = {
    spec.name: spec
    for spec in [
        SolverSpec("euler", sample_euler, 1, "Euler in sigma = DDIM (eta 0) = flow Euler"),
        SolverSpec("heun", sample_heun, 2, "Heun / EDM second order (last step to 0 is Euler)"),
        SolverSpec("dpm2", sample_dpm2, 2, "DPM-Solver-2, geometric midpoint (k-diffusion dpm_2)"),
        SolverSpec("dpmpp2m", partial(sample_dpmpp, order=2), 1, "DPM-Solver++(2M), data prediction"),
        SolverSpec("dpmpp3m", partial(sample_dpmpp, order=3), 1, "DPM-Solver++(3M), data prediction"),
        SolverSpec("unipc", partial(sample_unipc, order=2), 1, "UniPC-bh2, order 2, with corrector"),
        SolverSpec("unipc3", partial(sample_unipc, order=3), 1, "UniPC-bh2, order 3, with corrector"),
        SolverSpec("ipndm", partial(sample_ipndm, max_order=4), 1, "improved PNDM, order up to 4"),
        SolverSpec("ipndm1", partial(sample_ipndm, max_order=1), 1, "iPNDM order 1 (= Euler)"),
        SolverSpec("ipndm2", partial(sample_ipndm, max_order=2), 1, "iPNDM order up to 2"),
        SolverSpec("ipndm3", partial(sample_ipndm, max_order=3), 1, "iPNDM order up to 3"),
    ]
}

# The authors' names (docs/authors-code.md §4 registry and teacher choices) and common synonyms.
ALIASES = {"ddim": "euler", "edm": "heun", "dpm": "dpm2", "dpmpp": "dpmpp2m", "dpmpp_2m": "dpmpp2m",
           "dpmpp_3m": "dpmpp3m", "unipc2": "unipc", "ipndm4": "ipndm"}


def solver_names() -> list[str]:
    return sorted(SOLVERS) + ["epd", "epd_plugin"]


def get_solver(name: str) -> SolverSpec:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in SOLVERS:
        hint = "; EPD runs from a predictor table (solvers.epd.sample_epd)" if key.startswith("epd") else ""
        raise KeyError(f"unknown solver {name!r}; choose one of {', '.join(sorted(SOLVERS))} "
                       f"(aliases: {', '.join(sorted(ALIASES))}){hint}")
    return SOLVERS[key]


def eval_count(name: str, sigmas: Any, *, afs: bool = False, num_points: int = 2,
               denoise_to_zero: bool = False) -> EvalCount:
    """Evaluations per image of ``name`` on ``sigmas`` without running it (``epd``/``epd_plugin`` need K)."""
    grid = np.asarray(sigmas, dtype=np.float64)
    steps = len(grid) - 1
    to_zero = int(grid[-1] == 0)
    extra = int(denoise_to_zero) - int(afs)
    if name in ("epd", "epd_plugin"):
        return EvalCount(2 * steps + extra, (1 + num_points) * steps + extra)
    spec = get_solver(name)
    n = spec.evals_per_step * steps - (to_zero if spec.evals_per_step == 2 else 0) + extra
    return EvalCount(n, n)


def steps_for_nfe(name: str, nfe: int, *, afs: bool = False) -> tuple[int, bool]:
    """Number of steps and AFS flag that give exactly ``nfe`` sequential evaluations (no terminal zero).

    Two-evaluation solvers reach an odd NFE with AFS (the convention of the EPD/AMED papers).
    """
    per_step = 2 if name in ("epd", "epd_plugin") else get_solver(name).evals_per_step
    if per_step == 1:
        return (nfe + 1, True) if afs else (nfe, False)
    return (nfe + 1) // 2, nfe % 2 == 1
