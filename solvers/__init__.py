"""Pure-numerics ODE solvers over the denoiser interface (no diffusers, no training code)."""

from .baselines import sample_dpm2, sample_dpmpp, sample_euler, sample_heun, sample_ipndm, sample_unipc
from .core import EvalCount, EvalCounter, analytic_denoised, direction, repeat_condition
from .epd import adams_bashforth, epd_step, sample_epd
from .plan import StepPlan, TableRows
from .registry import SOLVERS, eval_count, get_solver, solver_names, steps_for_nfe
from .schedules import ScheduleSpec, make_sigmas

__all__ = [
    "sample_euler", "sample_heun", "sample_dpm2", "sample_ipndm", "sample_dpmpp", "sample_unipc",
    "sample_epd", "epd_step", "adams_bashforth", "StepPlan", "TableRows",
    "EvalCount", "EvalCounter", "analytic_denoised", "direction", "repeat_condition",
    "SOLVERS", "get_solver", "solver_names", "eval_count", "steps_for_nfe",
    "ScheduleSpec", "make_sigmas",
]
