"""Baseline ODE solvers over the denoiser interface (docs/authors-code.md §4), in k-diffusion's shape:
``sample_x(denoiser, x, sigmas, cond=None, *, afs=False, flow=False, callback=None, disable=True) -> x``.

``sigmas`` is the full grid (it may end in 0); ``x`` the initial state ``noise * sigmas[0]``. All solvers
use ``d = (x - D)/sigma``, the ODE direction in VE coordinates and, for flow-matching states
``x = (1 - sigma) x0 + sigma eps``, the velocity. The exponential integrators (DPM-Solver++, UniPC) are the VP
updates with ``alpha = 1`` (VE) or ``alpha = 1 - sigma`` (``flow=True``, as diffusers' flow-sigma schedulers),
``lambda = log(alpha / sigma)``. ``afs=True`` replaces the first denoiser evaluation by the analytic estimate
(docs/authors-code.md §1.3), saving one evaluation.

Heun and DPM-Solver-2 also take the options of the authors' sub-stepped samplers (docs/authors-code.md §4):
``inner_steps`` splits every grid interval by an inner polynomial rho-7 grid of that many points
(:func:`solvers.schedules.refine_grid`; 2, the default, keeps intervals whole; 3 is their ICCV ``heun`` and ``dpm``),
and ``afs_every_step=True`` reproduces their loop-index bug (docs/authors-code.md §9.5): with ``afs`` the first
direction of **every** grid step is analytic, not only the first of the run.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from tqdm.auto import trange

from .core import Callback, Denoiser, analytic_denoised, as_tensor, direction, sigma_batch
from .epd import adams_bashforth
from .schedules import refine_grid

__all__ = [
    "sample_euler",
    "sample_heun",
    "sample_dpm2",
    "sample_ipndm",
    "sample_dpmpp",
    "sample_unipc",
]


class _Evaluator:
    """Calls the denoiser, answering the very first call analytically when AFS is on (``afs`` is the pending
    analytic answer: set again, it answers the next call too)."""

    def __init__(self, denoiser: Denoiser, cond: Any, afs: bool, flow: bool):
        self.denoiser, self.cond, self.afs, self.flow = denoiser, cond, afs, flow

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if self.afs:
            self.afs = False
            return analytic_denoised(x, sigma, self.flow)
        return self.denoiser(x, sigma_batch(sigma, x), self.cond)


def _grid(sigmas: Any, x: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """The grid on ``x``'s device, and its values as Python floats for the loop's branches (read once here,
    so deciding e.g. "is this the step to 0" never makes the host wait for the device)."""
    host = torch.as_tensor(sigmas.detach() if isinstance(sigmas, torch.Tensor) else sigmas, dtype=torch.float64).cpu()
    if host.ndim != 1 or len(host) < 2:
        raise ValueError("sigmas must be a 1-D grid with at least two points")
    levels = host.tolist()
    if any(b >= a for a, b in zip(levels, levels[1:])) or any(s <= 0 for s in levels[:-1]):
        raise ValueError("sigmas must decrease strictly and be positive (a final 0 is allowed)")
    return as_tensor(sigmas, x), levels


def _report(callback: Callback | None, i: int, x: torch.Tensor, sigmas: torch.Tensor, denoised: torch.Tensor) -> None:
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigmas[i], "sigma_next": sigmas[i + 1], "denoised": denoised})


def sample_euler(denoiser: Denoiser, x: torch.Tensor, sigmas: Any, cond: Any = None, *, afs: bool = False,
                 flow: bool = False, callback: Callback | None = None, disable: bool = True) -> torch.Tensor:
    """Euler in sigma: ``x <- x + (t_n - t_c) d(x, t_c)``; DDIM (eta = 0) in these coordinates, flow Euler for
    flow matching. 1 evaluation per step."""
    sigmas, levels = _grid(sigmas, x)
    evaluate = _Evaluator(denoiser, cond, afs, flow)
    for i in trange(len(sigmas) - 1, disable=disable, desc="euler", leave=False):
        denoised = evaluate(x, sigmas[i])
        x = x + (sigmas[i + 1] - sigmas[i]) * direction(x, denoised, sigmas[i])
        _report(callback, i, x, sigmas, denoised)
    return x


def _sub_stepped(second_stage: Callable[..., torch.Tensor], desc: str, denoiser: Denoiser, x: torch.Tensor,
                 sigmas: Any, cond: Any, inner_steps: int, inner_dtype: str, afs: bool, afs_every_step: bool,
                 flow: bool, callback: Callback | None, disable: bool) -> torch.Tensor:
    """The loop the two-stage solvers share: per grid step, its ``inner_steps - 1`` sub-steps (s, e) of the inner
    rho-7 grid, each ``d = d(x, s)`` then ``x <- second_stage(x, d, s, e, to_zero, evaluate)``. AFS answers the
    run's first evaluation, or with ``afs_every_step`` the first of every grid step (docs/authors-code.md §9.5).
    The callback reports grid steps (``sigma``/``sigma_next`` of the outer grid, the first sub-step's output)."""
    sigmas, levels = _grid(sigmas, x)
    per = int(inner_steps) - 1
    fine, fine_levels = (sigmas, levels) if per == 1 else _grid(refine_grid(levels, inner_steps, dtype=inner_dtype), x)
    evaluate = _Evaluator(denoiser, cond, afs, flow)
    for i in trange(len(levels) - 1, disable=disable, desc=desc, leave=False):
        if afs_every_step:
            evaluate.afs = afs
        first = None
        for j in range(i * per, (i + 1) * per):
            t_c, t_n = fine[j], fine[j + 1]
            denoised = evaluate(x, t_c)
            first = denoised if first is None else first
            x = second_stage(x, direction(x, denoised, t_c), t_c, t_n, fine_levels[j + 1] == 0, evaluate)
        _report(callback, i, x, sigmas, first)
    return x


def _check_sub_steps(inner_steps: int, inner_dtype: str) -> None:
    if isinstance(inner_steps, bool) or int(inner_steps) != inner_steps or inner_steps < 2:
        raise ValueError(f"inner_steps must be an integer >= 2 (2 keeps each interval whole; got {inner_steps!r})")
    if inner_dtype not in ("float32", "float64"):
        raise ValueError(f"inner_dtype must be 'float32' or 'float64' (got {inner_dtype!r})")


def sample_heun(denoiser: Denoiser, x: torch.Tensor, sigmas: Any, cond: Any = None, *, inner_steps: int = 2,
                inner_dtype: str = "float32", afs: bool = False, afs_every_step: bool = False, flow: bool = False,
                callback: Callback | None = None, disable: bool = True) -> torch.Tensor:
    """Heun / explicit trapezoid (EDM Alg. 1): Euler predictor, then ``x <- x + h (d + d') / 2`` with ``d'`` at
    the predicted point; a step to sigma = 0 stays Euler. 2 evaluations per (sub-)step; ``inner_steps = 3`` with
    ``afs_every_step`` is the authors' ICCV ``heun`` with AFS (module docstring)."""
    _check_sub_steps(inner_steps, inner_dtype)

    def trapezoid(x, d, t_c, t_n, to_zero, evaluate):
        x_pred = x + (t_n - t_c) * d
        if to_zero:
            return x_pred
        d_pred = direction(x_pred, evaluate(x_pred, t_n), t_n)
        return x + (t_n - t_c) * 0.5 * (d + d_pred)

    return _sub_stepped(trapezoid, "heun", denoiser, x, sigmas, cond, inner_steps, inner_dtype, afs, afs_every_step,
                        flow, callback, disable)


def sample_dpm2(denoiser: Denoiser, x: torch.Tensor, sigmas: Any, cond: Any = None, *, r: float = 0.5,
                inner_steps: int = 2, inner_dtype: str = "float32", afs: bool = False, afs_every_step: bool = False,
                flow: bool = False, callback: Callback | None = None, disable: bool = True) -> torch.Tensor:
    """DPM-Solver-2 (noise-prediction form, docs/authors-code.md §4 ``dpm2``): ``m = t_n^r t_c^{1-r}``, ``x_m = x + (m -
    t_c) d``, ``x <- x + (t_n - t_c) [d(x_m, m)/(2r) + (1 - 1/(2r)) d]``; with r = 1/2 the geometric midpoint, as in
    k-diffusion's ``sample_dpm_2``. A step to sigma = 0 is Euler. 2 evaluations per (sub-)step; ``inner_steps = 3``
    is the authors' ICCV ``dpm`` (module docstring)."""
    _check_sub_steps(inner_steps, inner_dtype)

    def midpoint(x, d, t_c, t_n, to_zero, evaluate):
        if to_zero:
            return x + (t_n - t_c) * d
        t_m = t_n ** r * t_c ** (1 - r)
        x_m = x + (t_m - t_c) * d
        d_m = direction(x_m, evaluate(x_m, t_m), t_m)
        return x + (t_n - t_c) * (d_m / (2 * r) + (1 - 1 / (2 * r)) * d)

    return _sub_stepped(midpoint, "dpm2", denoiser, x, sigmas, cond, inner_steps, inner_dtype, afs, afs_every_step,
                        flow, callback, disable)


def sample_ipndm(denoiser: Denoiser, x: torch.Tensor, sigmas: Any, cond: Any = None, *, max_order: int = 4,
                 afs: bool = False, flow: bool = False, callback: Callback | None = None,
                 disable: bool = True) -> torch.Tensor:
    """Improved PNDM (docs/authors-code.md §4): ``x <- x + (t_n - t_c) AB_p(d_c, history)`` with the fixed equal-step
    Adams- Bashforth coefficients of order ``p = min(max_order, steps so far + 1)``. 1 evaluation per step."""
    sigmas, levels = _grid(sigmas, x)
    evaluate = _Evaluator(denoiser, cond, afs, flow)
    history: list[torch.Tensor] = []
    for i in trange(len(sigmas) - 1, disable=disable, desc="ipndm", leave=False):
        denoised = evaluate(x, sigmas[i])
        d = direction(x, denoised, sigmas[i])
        x = x + (sigmas[i + 1] - sigmas[i]) * adams_bashforth(d, history, max_order)
        if max_order > 1:
            history = (history + [d])[-(max_order - 1):]
        _report(callback, i, x, sigmas, denoised)
    return x


def _lambda(sigma: torch.Tensor, flow: bool = False) -> torch.Tensor:
    """Half log-SNR ``log(alpha / sigma)``: ``alpha = 1`` for VE states, ``alpha = 1 - sigma`` for flow matching."""
    return torch.log(_alpha(sigma, flow) / sigma)


def _alpha(sigma: torch.Tensor, flow: bool) -> torch.Tensor:
    return 1 - sigma if flow else torch.ones_like(sigma)


def _history_start(sigma_first: float, flow: bool) -> int:
    """Index of the first grid point whose output may serve as history of a multistep method: a flow grid
    starting at sigma = 1 has lambda = -inf there, where the output carries no weight (h = inf) and would only
    turn finite-difference coefficients into inf/inf."""
    return int(flow and sigma_first >= 1.0)


def _order_cap(num_steps: int, order: int, lower_order_final: bool, i: int, sigma_next: float) -> int:
    """Order cap near the end, as diffusers' DPMSolverMultistepScheduler decides it."""
    if sigma_next == 0 or (lower_order_final and num_steps < 15 and i == num_steps - 1):
        return 1
    if lower_order_final and num_steps < 15 and i == num_steps - 2:
        return min(order, 2)
    return order


def sample_dpmpp(denoiser: Denoiser, x: torch.Tensor, sigmas: Any, cond: Any = None, *, order: int = 2,
                 lower_order_final: bool = True, afs: bool = False, flow: bool = False,
                 callback: Callback | None = None, disable: bool = True) -> torch.Tensor:
    """Multistep DPM-Solver++ (Lu et al. 2022, data prediction; 2M with the "midpoint" form, 3M).

    With ``h = lambda_n - lambda_c``, ``r_0 = h_0/h``, ``r_1 = h_1/h`` and the last three outputs m0, m1, m2:
      1st: ``x_n = (t_n/t_c) x - a_n expm1(-h) m0``     (``a_n`` = alpha at t_n: 1, or 1 - t_n for flow)
      2M:  ``... - a_n expm1(-h) m0 - 0.5 a_n expm1(-h) D1``,  ``D1 = (m0 - m1)/r0``
      3M:  ``... - a_n expm1(-h) m0 + a_n (expm1(-h)/h + 1) D1 - a_n ((expm1(-h) + h)/h^2 - 0.5) D2`` with
           ``D1 = D1_0 + r0/(r0+r1) (D1_0 - D1_1)``, ``D2 = (D1_0 - D1_1)/(r0 + r1)``.
    Warm-up uses lower orders; ``lower_order_final`` lowers the last steps' order when there are fewer than
    15 steps, and a step to sigma = 0 is always first order (as diffusers does). 1 evaluation per step.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"DPM-Solver++ order must be 1, 2 or 3 (got {order})")
    sigmas, levels = _grid(sigmas, x)
    num_steps = len(sigmas) - 1
    evaluate = _Evaluator(denoiser, cond, afs, flow)
    outputs: list[torch.Tensor] = []
    start = _history_start(levels[0], flow)
    for i in trange(num_steps, disable=disable, desc=f"dpmpp{order}m", leave=False):
        t_c, t_n = sigmas[i], sigmas[i + 1]
        denoised = evaluate(x, t_c)
        outputs = (outputs + [denoised])[-3:]
        step_order = min(_order_cap(num_steps, order, lower_order_final, i, levels[i + 1]), len(outputs),
                         max(1, i + 1 - start))
        h = _lambda(t_n, flow) - _lambda(t_c, flow)
        phi = torch.expm1(-h)
        alpha_n = _alpha(t_n, flow)
        x_next = (t_n / t_c) * x - alpha_n * phi * denoised
        if step_order >= 2:
            h0 = _lambda(t_c, flow) - _lambda(sigmas[i - 1], flow)
            d1_0 = (outputs[-1] - outputs[-2]) / (h0 / h)
            if step_order == 2:
                x_next = x_next - 0.5 * alpha_n * phi * d1_0
            else:
                h1 = _lambda(sigmas[i - 1], flow) - _lambda(sigmas[i - 2], flow)
                r0, r1 = h0 / h, h1 / h
                d1_1 = (outputs[-2] - outputs[-3]) / r1
                d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x_next = x_next + alpha_n * ((phi / h + 1) * d1 - ((phi + h) / h ** 2 - 0.5) * d2)
        x = x_next
        _report(callback, i, x, sigmas, denoised)
    return x


def _unipc_coefficients(h: torch.Tensor, rks: list[torch.Tensor], order: int) -> tuple[torch.Tensor, torch.Tensor]:
    """UniPC-bh2 linear system (Zhao et al. 2023, Alg. 2/3): ``R[i] = r^i``, ``b[i] = i! phi_{i+1}(-h)/B(h)``
    with ``B(h) = expm1(-h)`` (data prediction, hh = -h)."""
    hh = -h
    h_phi_1 = torch.expm1(hh)
    b_h = h_phi_1
    rks_t = torch.stack(rks + [torch.ones_like(h)])
    rows, rhs = [], []
    h_phi_k = h_phi_1 / hh - 1
    factorial = 1
    for i in range(1, order + 1):
        rows.append(rks_t ** (i - 1))
        rhs.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return torch.stack(rows), torch.stack(rhs)


def _solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a^-1 b`` without the singularity check that makes ``torch.linalg.solve`` wait for the GPU (the UniPC
    systems are Vandermonde matrices of distinct ratios, never singular)."""
    return torch.linalg.solve_ex(a, b)[0]


def sample_unipc(denoiser: Denoiser, x: torch.Tensor, sigmas: Any, cond: Any = None, *, order: int = 2,
                 lower_order_final: bool = True, use_corrector: bool = True, afs: bool = False, flow: bool = False,
                 callback: Callback | None = None, disable: bool = True) -> torch.Tensor:
    """UniPC with the bh2 variant (Zhao et al. 2023), data prediction, multistep predictor UniP-p and the
    corrector UniC applied with each new evaluation (so it costs no extra evaluation; none after the last
    step). ``lower_order_final`` caps the order by the number of remaining steps. 1 evaluation per step.

    Predictor: ``x_n = (t_n/t_c) x - a_n expm1(-h) m0 - a_n B(h) sum_k rho_k D_k``, ``D_k = (m_{-k} - m0)/r_k``;
    corrector: the same from the previous point, adding ``rho_last (m_new - m0)``.
    """
    if order < 1:
        raise ValueError(f"UniPC order must be >= 1 (got {order})")
    sigmas, levels = _grid(sigmas, x)
    num_steps = len(sigmas) - 1
    evaluate = _Evaluator(denoiser, cond, afs, flow)
    outputs: list[torch.Tensor] = []     # data predictions at sigmas[i - len + 1 .. i]
    start = _history_start(levels[0], flow)
    last_x: torch.Tensor | None = None
    last_order = 0

    def differences(i_base: int, step_order: int, h: torch.Tensor):
        """Scaled differences to older outputs; ``outputs[-1]`` is the output at ``sigmas[i_base]``."""
        rks, diffs = [], []
        m0 = outputs[-1]
        for k in range(1, step_order):
            rk = (_lambda(sigmas[i_base - k], flow) - _lambda(sigmas[i_base], flow)) / h
            rks.append(rk)
            diffs.append((outputs[-(k + 1)] - m0) / rk)
        return rks, diffs

    for i in trange(num_steps, disable=disable, desc="unipc", leave=False):
        denoised = evaluate(x, sigmas[i])
        if use_corrector and last_x is not None:
            # Corrector for the step sigmas[i-1] -> sigmas[i], using the fresh output at sigmas[i].
            t_prev, t_cur = sigmas[i - 1], sigmas[i]
            h = _lambda(t_cur, flow) - _lambda(t_prev, flow)
            rks, diffs = differences(i - 1, last_order, h)
            m0 = outputs[-1]
            if last_order == 1:
                rhos = torch.full((1,), 0.5, dtype=x.dtype, device=x.device)
            else:
                big_r, b = _unipc_coefficients(h, rks, last_order)
                rhos = _solve(big_r, b)
            res = sum((rho * dk for rho, dk in zip(rhos[:-1], diffs)), torch.zeros_like(x))
            b_h = _alpha(t_cur, flow) * torch.expm1(-h)
            x = (t_cur / t_prev) * last_x - b_h * m0 - b_h * (res + rhos[-1] * (denoised - m0))
        outputs = (outputs + [denoised])[-order:]
        step_order = min(order, num_steps - i) if lower_order_final else order
        step_order = min(step_order, len(outputs), max(1, i + 1 - start))
        t_c, t_n = sigmas[i], sigmas[i + 1]
        if levels[i + 1] == 0:
            step_order = 1  # h is infinite on a step to sigma = 0; only the first-order update is defined
        h = _lambda(t_n, flow) - _lambda(t_c, flow)
        b_h = _alpha(t_n, flow) * torch.expm1(-h)
        x_next = (t_n / t_c) * x - b_h * denoised
        if step_order >= 2:
            rks, diffs = differences(i, step_order, h)
            if step_order == 2:
                rhos_p = torch.full((1,), 0.5, dtype=x.dtype, device=x.device)
            else:
                big_r, b = _unipc_coefficients(h, rks, step_order)
                rhos_p = _solve(big_r[:-1, :-1], b[:-1])
            x_next = x_next - b_h * sum((rho * dk for rho, dk in zip(rhos_p, diffs)), torch.zeros_like(x))
        last_x, last_order = x, step_order
        x = x_next
        _report(callback, i, x, sigmas, denoised)
    return x
