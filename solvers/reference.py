"""High-accuracy reference solutions of the probability-flow ODE, for exact error measurements.

The ODE is integrated in ``s = log sigma``, where it reads ``dx/ds = x - D(x, e^s)`` and stays smooth from
sigma_max down to sigma_min, with an adaptive Dormand-Prince 5(4) method in float64. The step is shared by
the batch and controlled by the worst sample's error, so every sample meets the tolerance.
:func:`reference_solution` solves twice (``rtol`` and ``rtol/100``) and reports the difference, so a caller
knows how far the reference itself can be trusted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .core import Denoiser, sigma_batch

__all__ = ["solve_ode", "reference_solution", "ReferenceReport"]

_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)


def solve_ode(denoiser: Denoiser, x: torch.Tensor, sigma_start: float, sigma_ends: Sequence[float],
              cond: Any = None, rtol: float = 1e-8, atol: float = 1e-8, max_evals: int = 200_000) -> dict:
    """Integrate from ``sigma_start`` down to each sigma in ``sigma_ends`` (decreasing order not required).

    Returns ``{"states": {sigma_end: x}, "evals": n, "steps": n}``. States are float64.
    """
    x = x.double()
    targets = sorted({float(s) for s in sigma_ends}, reverse=True)
    if any(not (0 < s <= sigma_start) for s in targets):
        raise ValueError("reference end points must lie in (0, sigma_start]")

    def rhs(state: torch.Tensor, log_sigma: float) -> torch.Tensor:
        return state - denoiser(state, sigma_batch(math.exp(log_sigma), state), cond)

    out: dict[float, torch.Tensor] = {}
    s, evals, steps = math.log(sigma_start), 0, 0
    h = -0.01
    k1 = rhs(x, s)
    evals += 1
    for target in targets:
        s_end = math.log(target)
        while s > s_end + 1e-14:
            h = max(h, s_end - s)  # h < 0: never step past the target
            ks = [k1]
            for i in range(1, 7):
                inc = sum(a * k for a, k in zip(_A[i], ks))
                ks.append(rhs(x + h * inc, s + _C[i] * h))
            evals += 6
            x5 = x + h * sum(b * k for b, k in zip(_B5, ks))
            err = h * sum((b5 - b4) * k for b5, b4, k in zip(_B5, _B4, ks))
            scale = atol + rtol * torch.maximum(x.abs(), x5.abs())
            per_sample = (err / scale).flatten(1).pow(2).mean(1).sqrt()
            ratio = float(per_sample.max())
            if ratio <= 1.0:
                x, s, k1 = x5, s + h, ks[6]  # FSAL: the last stage is the next first stage
                steps += 1
            h = h * min(5.0, max(0.2, 0.9 * max(ratio, 1e-10) ** -0.2))
            if evals > max_evals:
                raise RuntimeError(f"reference solve exceeded {max_evals} evaluations; loosen rtol")
        out[target] = x.clone()
    return {"states": out, "evals": evals, "steps": steps}


@dataclass
class ReferenceReport:
    states: dict            # sigma_end -> float64 state at rtol
    rtol: float
    evals: int
    check_rtol: float
    check_max_abs_diff: float
    check_rmse_diff: float

    def as_dict(self) -> dict:
        return {"method": "adaptive Dormand-Prince 5(4) in log sigma, float64", "rtol": self.rtol,
                "evals": self.evals, "check_rtol": self.check_rtol, "check_max_abs_diff": self.check_max_abs_diff,
                "check_rmse_diff": self.check_rmse_diff, "sigma_ends": sorted(self.states)}


def reference_solution(denoiser: Denoiser, x: torch.Tensor, sigma_start: float, sigma_ends: Sequence[float],
                       cond: Any = None, rtol: float = 1e-8) -> ReferenceReport:
    """Solve at ``rtol`` and again at ``rtol / 100``; keep the tighter one, report their difference."""
    loose = solve_ode(denoiser, x, sigma_start, sigma_ends, cond, rtol=rtol, atol=rtol)
    tight = solve_ode(denoiser, x, sigma_start, sigma_ends, cond, rtol=rtol / 100, atol=rtol / 100)
    diffs = [tight["states"][s] - loose["states"][s] for s in tight["states"]]
    max_abs = max(float(d.abs().max()) for d in diffs)
    rmse = max(float(d.pow(2).mean().sqrt()) for d in diffs)
    return ReferenceReport(tight["states"], rtol / 100, loose["evals"] + tight["evals"], rtol, max_abs, rmse)
