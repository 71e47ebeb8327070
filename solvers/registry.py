"""One registry, name -> solver, used by every CLI and trainer.

Each entry knows how to run on a grid and how many evaluations it costs, so tools can plan a grid for a
target NFE and report honest counts (see :class:`solvers.core.EvalCount`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Callable

import numpy as np
import torch

from .baselines import sample_dpm2, sample_dpmpp, sample_euler, sample_heun, sample_ipndm, sample_unipc
from .core import EvalCount

__all__ = ["SolverSpec", "SOLVERS", "ALIASES", "SUB_STEP_OPTIONS", "get_solver", "solver_names", "eval_count",
           "steps_for_nfe"]


# The options of the authors' sub-stepped heun/dpm (docs/authors-code.md §4, §9.5) and their neutral values.
SUB_STEP_OPTIONS = {"inner_steps": 2, "inner_dtype": "float32", "afs_every_step": False}


@dataclass(frozen=True)
class SolverSpec:
    """A registered baseline solver: ``fn(denoiser, x, sigmas, cond, **kwargs)``. ``sub_stepped`` solvers take
    the authors' ``inner_steps``/``inner_dtype``/``afs_every_step`` options (:data:`SUB_STEP_OPTIONS`)."""

    name: str
    fn: Callable[..., torch.Tensor]
    evals_per_step: int
    description: str
    kwargs: dict = field(default_factory=dict)
    sub_stepped: bool = False

    def __call__(self, denoiser: Any, x: torch.Tensor, sigmas: Any, cond: Any = None, **kwargs: Any) -> torch.Tensor:
        return self.fn(denoiser, x, sigmas, cond, **{**self.kwargs, **kwargs})

    def with_options(self, **options: Any) -> "SolverSpec":
        """This solver with sub-step options fixed (those at their neutral value are dropped); ValueError for an
        option this solver does not take or a bad value."""
        unknown = sorted(set(options) - set(SUB_STEP_OPTIONS))
        if unknown:
            raise ValueError(f"unknown solver option(s) {', '.join(unknown)}; known: {', '.join(SUB_STEP_OPTIONS)}")
        merged = {k: v for k, v in {**self.kwargs, **options}.items()
                  if k not in SUB_STEP_OPTIONS or v != SUB_STEP_OPTIONS[k]}
        chosen = [k for k in merged if k in SUB_STEP_OPTIONS]
        if chosen and not self.sub_stepped:
            takers = ", ".join(n for n, s in SOLVERS.items() if s.sub_stepped)
            raise ValueError(f"{', '.join(chosen)} apply to the authors' sub-stepped solvers ({takers}), not {self.name}")
        inner = merged.get("inner_steps", 2)
        if isinstance(inner, bool) or not isinstance(inner, (int, float)) or int(inner) != inner or inner < 2:
            raise ValueError(f"inner_steps must be an integer >= 2 (2 keeps each interval whole; got {inner!r})")
        if merged.get("inner_dtype", "float32") not in ("float32", "float64"):
            raise ValueError(f"inner_dtype must be 'float32' or 'float64' (got {merged['inner_dtype']!r})")
        if "inner_steps" in merged:
            merged["inner_steps"] = int(inner)
        return replace(self, kwargs=merged)

    def option(self, key: str) -> Any:
        """A sub-step option's value (its neutral value when not set)."""
        return self.kwargs.get(key, SUB_STEP_OPTIONS[key])

    @property
    def label(self) -> str:
        """The name with the non-neutral sub-step options, e.g. ``heun-inner3-afs-every-step`` (output folders)."""
        parts = [self.name]
        if self.option("inner_steps") != 2:
            parts.append(f"inner{int(self.option('inner_steps'))}")
            if self.option("inner_dtype") != "float32":
                parts.append(self.option("inner_dtype"))
        if self.option("afs_every_step"):
            parts.append("afs-every-step")
        return "-".join(parts)


SOLVERS: dict[str, SolverSpec] = {
    spec.name: spec
    for spec in [
        SolverSpec("euler", sample_euler, 1, "Euler in sigma = DDIM (eta 0) = flow Euler"),
        SolverSpec("heun", sample_heun, 2, "Heun / EDM second order (last step to 0 is Euler)", sub_stepped=True),
        SolverSpec("dpm2", sample_dpm2, 2, "DPM-Solver-2, geometric midpoint (k-diffusion dpm_2)", sub_stepped=True),
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


def get_solver(name: str | SolverSpec) -> SolverSpec:
    """The registered solver ``name`` (or an alias); a :class:`SolverSpec` (e.g. one with options) is returned as is."""
    if isinstance(name, SolverSpec):
        return name
    key = ALIASES.get(name.lower(), name.lower())
    if key not in SOLVERS:
        hint = "; EPD runs from a predictor table (solvers.epd.sample_epd)" if key.startswith("epd") else ""
        raise KeyError(f"unknown solver {name!r}; choose one of {', '.join(sorted(SOLVERS))} "
                       f"(aliases: {', '.join(sorted(ALIASES))}){hint}")
    return SOLVERS[key]


def _configured(name: str | SolverSpec, inner_steps: int | None, afs_every_step: bool | None) -> SolverSpec:
    """``name``'s spec with the explicitly given sub-step options over the spec's own."""
    spec = get_solver(name)
    given = {k: v for k, v in (("inner_steps", inner_steps), ("afs_every_step", afs_every_step)) if v is not None}
    return spec.with_options(**given) if given else spec


def eval_count(name: str | SolverSpec, sigmas: Any, *, afs: bool = False, num_points: int = 2,
               denoise_to_zero: bool = False, inner_steps: int | None = None,
               afs_every_step: bool | None = None) -> EvalCount:
    """Evaluations per image of ``name`` on ``sigmas`` without running it (``epd``/``epd_plugin`` need K).

    Sub-step options (given here or carried by a :class:`SolverSpec`): ``inner_steps`` k makes each grid step
    ``k - 1`` two-evaluation sub-steps; with ``afs`` and ``afs_every_step`` every grid step saves one evaluation,
    otherwise AFS saves one per run (docs/authors-code.md §4, §9.5). A (sub-)step to sigma = 0 costs one.
    """
    grid = np.asarray(sigmas, dtype=np.float64)
    steps = len(grid) - 1
    to_zero = int(grid[-1] == 0)
    if name in ("epd", "epd_plugin"):
        extra = int(denoise_to_zero) - int(afs)
        return EvalCount(2 * steps + extra, (1 + num_points) * steps + extra)
    spec = _configured(name, inner_steps, afs_every_step)
    saved = (steps if spec.option("afs_every_step") else 1) if afs else 0
    per_step = spec.evals_per_step * (int(spec.option("inner_steps")) - 1)
    n = per_step * steps - (to_zero if spec.evals_per_step == 2 else 0) - saved + int(denoise_to_zero)
    return EvalCount(n, n)


def steps_for_nfe(name: str | SolverSpec, nfe: int, *, afs: bool = False, inner_steps: int | None = None,
                  afs_every_step: bool | None = None) -> tuple[int, bool]:
    """Number of steps and AFS flag that give exactly ``nfe`` sequential evaluations (no terminal zero).

    Two-evaluation solvers reach an odd NFE with AFS (the convention of the EPD/AMED papers). With sub-steps
    (``inner_steps`` k) a step costs ``2(k - 1)``, one less with ``afs`` and ``afs_every_step``; an NFE that no
    step count reaches raises ValueError.
    """
    if name in ("epd", "epd_plugin"):
        return (nfe + 1) // 2, nfe % 2 == 1
    spec = _configured(name, inner_steps, afs_every_step)
    per_step = spec.evals_per_step * (int(spec.option("inner_steps")) - 1)
    if per_step == 1:
        return (nfe + 1, True) if afs else (nfe, False)
    if afs and spec.option("afs_every_step"):
        if nfe % (per_step - 1):
            raise ValueError(f"NFE {nfe} is not a multiple of {per_step - 1}, the cost of a {spec.label} step with AFS")
        return nfe // (per_step - 1), True
    steps = -(-nfe // per_step)
    short = steps * per_step - nfe
    if short > 1:
        raise ValueError(f"NFE {nfe} is not reachable with {spec.label} ({per_step} evaluations a step, one fewer "
                         "with AFS)")
    return steps, short == 1
