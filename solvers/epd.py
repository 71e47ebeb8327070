"""The EPD step and sampler (docs/authors-code.md §1.1), and the EPD-Plugin on iPNDM (docs/authors-code.md §4).

One EPD step from ``t_c`` to ``t_n`` with K learned points (paper eq. for the parallel direction):

    t_k   = t_n^{r_k} t_c^{1 - r_k}                       geometric interpolation, r_k in (0, 1)
    x_k   = x + (t_k - t_c) d_c                            one Euler "peek" along the current direction
    d_k   = (x_k - D(x_k, a_k t_k)) / t_k                  all K evaluated in ONE batched call (B*K)
    x'    = x + (t_n - t_c) sum_k w_k c_k d_k              w on the simplex, c/a direction/time scales

The same code serves VE/EDM/VP and flow-matching backends: for flow ``D = x - sigma v`` so ``d`` is the
velocity (times a_k when a time scale is used, as in the authors' code, docs/authors-code.md §9.4).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import trange

from .core import Callback, Denoiser, analytic_denoised, as_tensor, direction, repeat_condition, sigma_batch
from .parallel import PointShard
from .plan import Step, StepPlan, TableRows

__all__ = ["epd_step", "epd_sampler_step", "adams_bashforth", "sample_epd"]


_ZERO_END = ("an EPD step needs sigma_next > 0 (geometric interpolation to 0 is undefined); end the grid at "
             "sigma_min and use denoise_to_zero instead")

# Adams-Bashforth coefficients for equal steps, newest direction first (iPNDM, docs/authors-code.md §4).
_AB = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def adams_bashforth(d_cur: torch.Tensor, history: Sequence[torch.Tensor], max_order: int) -> torch.Tensor:
    """iPNDM extrapolated direction of order ``p = min(max_order, len(history) + 1)``; history newest last."""
    if not 1 <= max_order <= 4:
        raise ValueError(f"iPNDM max_order must be in 1..4 (got {max_order})")
    order = min(max_order, len(history) + 1)
    coeffs = _AB[order]
    out = coeffs[0] * d_cur
    for c, d_old in zip(coeffs[1:], reversed(history)):
        out = out + c * d_old
    return out


def _row(values: Any, like: torch.Tensor, batch: int, num_points: int) -> torch.Tensor:
    t = as_tensor(values, like)
    if t.ndim == 1:
        t = t.unsqueeze(0)
    return t.expand(batch, num_points)


def epd_step(denoiser: Denoiser, x: torch.Tensor, sigma_cur: float | torch.Tensor, sigma_next: float | torch.Tensor,
             rows: TableRows, cond: Any = None, *, d_cur: torch.Tensor, peek_direction: torch.Tensor | None = None,
             parallel: bool = True, cond_repeated: Any = None, shard: PointShard | None = None) -> torch.Tensor:
    """One EPD step (docs/authors-code.md §1.1). ``rows``: this step's positions/weights/scales, ``[K]`` or
    per-sample ``[B, K]``.

    ``d_cur`` is the direction at ``(x, sigma_cur)``; ``peek_direction`` (default ``d_cur``) is the one used
    to reach the intermediate points (the iPNDM plugin passes its Adams-Bashforth extrapolation).
    ``parallel=True`` evaluates the K points in one ``B*K`` call, ``False`` in K calls; both give the same
    result. ``cond_repeated`` lets a sampler repeat the condition once for all steps.
    ``shard`` (:mod:`solvers.parallel`) evaluates only this process's share of the K points and all-reduces
    the weighted sum; ``cond_repeated`` must then match that share.
    """
    t_c = torch.as_tensor(sigma_cur, dtype=x.dtype, device=x.device)
    t_n = torch.as_tensor(sigma_next, dtype=x.dtype, device=x.device)
    if t_n.device.type == "cpu" and not bool(t_n > 0):   # on a GPU this would stall the queue: sample_epd checks
        raise ValueError(_ZERO_END)
    batch = x.shape[0]
    r = as_tensor(rows.positions, x)
    num_points = r.shape[-1]
    r = _row(r, x, batch, num_points)
    w = _row(rows.weights, x, batch, num_points)
    c = None if rows.dir_scales is None else _row(rows.dir_scales, x, batch, num_points)
    a = None if rows.time_scales is None else _row(rows.time_scales, x, batch, num_points)
    if shard is not None:
        share = shard.local(num_points)
        num_points = len(range(num_points)[share])
        if num_points == 0:   # more processes than points: contribute nothing, but take part in the reduction
            return x + (t_n - t_c) * shard.reduce(torch.zeros_like(x))
        r, w = r[:, share], w[:, share]
        c = None if c is None else c[:, share]
        a = None if a is None else a[:, share]

    t_mid = t_n ** r * t_c ** (1 - r)                                       # [B, K]
    t_eval = t_mid if a is None else a * t_mid
    expand = (1,) * (x.ndim - 1)
    peek = d_cur if peek_direction is None else peek_direction
    x_mid = x.unsqueeze(1) + (t_mid - t_c).view(batch, num_points, *expand) * peek.unsqueeze(1)   # [B, K, ...]

    if parallel:
        if cond_repeated is None:
            cond_repeated = repeat_condition(cond, num_points)
        flat = x_mid.flatten(0, 1)                                          # row b*K + k
        denoised = denoiser(flat, t_eval.flatten(), cond_repeated).view_as(x_mid)
    else:
        denoised = torch.stack([denoiser(x_mid[:, k], t_eval[:, k], cond) for k in range(num_points)], dim=1)
    d_mid = (x_mid - denoised) / t_mid.view(batch, num_points, *expand)
    coef = w if c is None else w * c
    combined = (coef.view(batch, num_points, *expand) * d_mid).sum(dim=1)
    if shard is not None:
        combined = shard.reduce(combined)
    return x + (t_n - t_c) * combined


def epd_sampler_step(denoiser: Denoiser, x: torch.Tensor, step: Step, cond: Any = None, *,
                     history: list[torch.Tensor] | None = None, flow: bool = False, parallel: bool = True,
                     cond_repeated: Any = None,
                     shard: PointShard | None = None) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """One step of a :class:`solvers.plan.StepPlan`, shared by :func:`sample_epd` and both trainers.

    Evaluates the current direction (or the AFS estimate when ``step.analytic``), extrapolates the peek
    direction with Adams-Bashforth when ``step.plugin_order > 0`` (the iPNDM plugin, with ``history`` its past
    directions, newest last), and takes :func:`epd_step`. Returns ``(x_next, denoised, history)``; the history
    is a new list, so callers may keep or drop the old one. Table rows may carry autograd graphs.
    """
    history = list(history or [])
    sigma_cur, order = step.sigma_cur, step.plugin_order
    if step.analytic:
        denoised = analytic_denoised(x, sigma_cur, flow)
    else:
        denoised = denoiser(x, sigma_batch(sigma_cur, x), cond)
    d_cur = direction(x, denoised, sigma_cur)
    peek = adams_bashforth(d_cur, history, order) if order > 0 else None
    x_next = epd_step(denoiser, x, sigma_cur, step.sigma_next, step.rows, cond, d_cur=d_cur, peek_direction=peek,
                      parallel=parallel, cond_repeated=cond_repeated, shard=shard)
    if order > 1:
        history = (history + [d_cur])[-(order - 1):]
    return x_next, denoised, history


def sample_epd(denoiser: Denoiser, x: torch.Tensor, table: Any, cond: Any = None, *,
               parallel: bool = True, afs: bool | None = None, flow: bool = False,
               denoise_to_zero: bool = False, callback: Callback | None = None,
               disable: bool = True, shard: PointShard | None = None) -> torch.Tensor:
    """Integrate from ``table.sigmas[0]`` to ``table.sigmas[-1]`` with EPD (or the iPNDM plugin).

    ``table``: a :class:`solvers.table.PredictorTable` or a :class:`solvers.plan.StepPlan` (one table per
    image: rows ``[N-1, B, K]``). ``x`` is the initial state (``noise * sigmas[0]``; for flow matching
    sigma_0 = 1, so just the noise). The grid is the table's own: a table is only valid on the grid it was
    fitted on. ``afs`` defaults to the table's flag; ``flow`` selects the flow-matching AFS estimate. The
    per-step rules (AFS, ``fcn``, the plugin's order) are the plan's (:mod:`solvers.plan`).
    ``denoise_to_zero`` adds one evaluation ``x <- D(x, sigma_last)``. ``shard`` splits the K points across
    processes (:mod:`solvers.parallel`); every process must pass the same ``x`` and ``cond``.

    The table and grid are moved to ``x``'s device once and checked once, so the loop itself never waits for
    the device (no host synchronisation between network calls).
    """
    plan = StepPlan.from_table(table, afs=afs)
    raw = plan.sigmas
    grid = np.asarray(raw.detach().cpu() if isinstance(raw, torch.Tensor) else raw, dtype=np.float64)
    num_rows = len(grid) - 1
    if num_rows < 1 or not (grid[1:] > 0).all():
        raise ValueError(_ZERO_END if num_rows >= 1 else "the table's grid needs at least two points")
    plan = plan.like(x)
    if not callable(plan.rows) and plan.rows.positions.shape[0] != num_rows:
        raise ValueError(f"table has {plan.rows.positions.shape[0]} rows but its grid has {num_rows} steps")
    num_points = plan.rows_of(0).num_points
    local = num_points if shard is None else len(range(num_points)[shard.local(num_points)])
    cond_repeated = repeat_condition(cond, local) if parallel and local else None
    history: list[torch.Tensor] = []

    for i in trange(num_rows, disable=disable, desc="EPD", leave=False):
        step = plan.step(i)
        x, denoised, history = epd_sampler_step(denoiser, x, step, cond, history=history, flow=flow,
                                                parallel=parallel, cond_repeated=cond_repeated, shard=shard)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": step.sigma_cur, "sigma_next": step.sigma_next, "denoised": denoised})
    if denoise_to_zero:
        x = denoiser(x, sigma_batch(plan.sigmas[-1], x), cond)
    return x
