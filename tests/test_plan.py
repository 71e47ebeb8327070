"""The step plan (solvers/plan.py): the per-step rules of EPD decided once, for every table form."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from solvers.epd import sample_epd
from solvers.plan import StepPlan, TableRows, plugin_order
from solvers.schedules import polynomial_sigmas
from solvers.table import PredictorTable
from training.distill.params import TableParameters


def table(afs=False, fcn=False, solver="epd", max_order=None, steps=4, k=2):
    rng = np.random.default_rng(3)
    w = rng.random((steps, k)) + 0.1
    return PredictorTable(positions=rng.uniform(0.1, 0.9, (steps, k)), weights=w / w.sum(-1, keepdims=True),
                          sigmas=polynomial_sigmas(steps + 1, 0.002, 80.0).numpy(),
                          dir_scales=rng.uniform(0.95, 1.05, (steps, k)), time_scales=rng.uniform(0.9, 1.1, (steps, k)),
                          solver=solver, max_order=max_order, afs=afs, fcn=fcn)


def test_afs_only_on_step_zero_and_fcn_only_on_the_last_step():
    plan = StepPlan.from_table(table(afs=True, fcn=True))
    steps = [plan.step(i) for i in range(plan.num_steps)]
    assert [s.analytic for s in steps] == [True, False, False, False]
    assert [s.rows.dir_scales is None for s in steps] == [False, False, False, True]
    assert all(s.rows.time_scales is not None for s in steps)   # fcn leaves the time scales alone
    np.testing.assert_array_equal(steps[1].rows.positions, plan.rows.positions[1])
    assert (steps[2].sigma_cur, steps[2].sigma_next) == (plan.sigmas[2], plan.sigmas[3])
    off = StepPlan.from_table(table(afs=True, fcn=False), afs=False)
    assert not off.step(0).analytic and off.step(off.num_steps - 1).rows.dir_scales is not None
    with pytest.raises(IndexError):
        plan.step(plan.num_steps)


def test_plugin_order_rule():
    assert plugin_order("epd", None) == 0 and plugin_order("epd", 3) == 0
    assert plugin_order("ipndm", None) == 4 and plugin_order("ipndm", 2) == 2
    assert StepPlan.from_table(table(solver="ipndm", max_order=3)).step(1).plugin_order == 3
    with pytest.raises(ValueError, match="unknown EPD solver"):
        plugin_order("heun", None)


def test_replacing_rows_keeps_grid_and_flags():
    start = table(afs=True, fcn=True, solver="ipndm", max_order=2)
    per_image = TableRows(*(np.stack([v, v]).transpose(1, 0, 2) for v in
                            (start.positions, start.weights, start.dir_scales, start.time_scales)))
    plan = StepPlan.from_table(start, rows=per_image)
    assert (plan.afs, plan.fcn, plan.plugin_order) == (True, True, 2)
    assert plan.step(0).rows.positions.shape == (2, 2)
    x = torch.randn(2, 3, dtype=torch.float64) * 80.0
    denoiser = lambda z, sigma, cond=None: z / (1 + sigma.view(-1, 1) ** 2)  # noqa: E731
    # Two identical per-image tables give the one-table result.
    torch.testing.assert_close(sample_epd(denoiser, x, plan), sample_epd(denoiser, x, start), rtol=1e-12, atol=1e-12)


def test_trainer_rows_as_a_callable_match_the_exported_table():
    """The Stage-1 trainer steps with params.row (differentiable); its plan and the exported table's plan give
    the same trajectory, so the trainer optimises exactly the sampler users run."""
    start = table(afs=True, fcn=True)
    params = TableParameters(*start.positions.shape, scale_dir=0.05, scale_time=0.1, init=start)
    exported = params.to_table(start.sigmas, afs=True, fcn=True)
    trained = StepPlan(start.sigmas, params.row, afs=True, fcn=True)
    x = torch.randn(3, 5, dtype=torch.float64) * 80.0
    denoiser = lambda z, sigma, cond=None: 0.5 * z / (1 + sigma.view(-1, 1) ** 2)  # noqa: E731
    with torch.no_grad():
        torch.testing.assert_close(sample_epd(denoiser, x, trained), sample_epd(denoiser, x, exported),
                                   rtol=1e-12, atol=1e-12)
    assert trained.step(trained.num_steps - 1).rows.dir_scales is None
    assert trained.step(0).rows.positions.requires_grad
