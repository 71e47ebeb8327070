"""The step plan: every per-step rule of the EPD sampler, decided in one place (docs/authors-code.md §1.1, §4).

A predictor table reaches the sampler in several guises: a frozen :class:`solvers.table.PredictorTable`, the
differentiable rows of a table being distilled (``training.distill.params``), or one table per image sampled
by the RDPO policy. Each is turned into a :class:`StepPlan` (the grid, the rows, and the table's flags), and
``plan.step(i)`` hands out what step ``i`` runs with, after applying the rules that depend on the step:

* AFS: step 0 uses the analytic direction instead of a network call, when the table says so (§1.3);
* ``fcn``: the last step uses unscaled directions (``dir_scales`` dropped, §1.1);
* the EPD-Plugin on iPNDM peeks along the Adams-Bashforth direction of order ``max_order`` (default 4, §4);
  plain EPD has ``plugin_order = 0``.

:func:`solvers.epd.sample_epd`, the Stage-1 trainer and the RDPO rollouts all read their steps from a plan.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np
import torch

from .core import as_tensor

__all__ = ["TableRows", "Step", "StepPlan", "plugin_order"]


@dataclass(frozen=True)
class TableRows:
    """The learned numbers of an EPD table: positions ``r``, simplex weights ``w``, direction scales ``c`` and
    time scales ``a`` (``None`` when the table has none).

    Shapes: ``[N-1, K]`` for one table, ``[N-1, B, K]`` for one table per image; one step's rows (indexing by
    the step) are ``[K]`` or ``[B, K]``. Values may be arrays, tensors, or tensors carrying autograd graphs.
    """

    positions: Any
    weights: Any
    dir_scales: Any = None
    time_scales: Any = None

    def map(self, fn: Callable[[Any], Any]) -> "TableRows":
        """``fn`` applied to every present array (e.g. ``lambda v: v.to(device)``)."""
        return TableRows(*(None if v is None else fn(v)
                           for v in (self.positions, self.weights, self.dir_scales, self.time_scales)))

    def __getitem__(self, step: int) -> "TableRows":
        return self.map(lambda v: v[step])

    def like(self, x: torch.Tensor) -> "TableRows":
        """The rows as tensors of ``x``'s dtype and device."""
        return self.map(lambda v: as_tensor(v, x))

    @property
    def num_points(self) -> int:
        return int(np.shape(self.positions)[-1])


def plugin_order(solver: str, max_order: int | None) -> int:
    """The Adams-Bashforth order the peeks use: 0 for plain EPD, ``max_order`` (default 4) for ``ipndm`` (§4)."""
    if solver == "epd":
        return 0
    if solver != "ipndm":
        raise ValueError(f"unknown EPD solver {solver!r}: use 'epd' or 'ipndm' (the EPD-Plugin)")
    return int(max_order or 4)


@dataclass(frozen=True)
class Step:
    """What one EPD step runs with: ``sigma_cur -> sigma_next``, this step's ``rows`` (``[K]`` or ``[B, K]``,
    scales already dropped where the table's flags say so), whether it uses the analytic first direction, and
    the plugin's Adams-Bashforth order (0: plain EPD)."""

    index: int
    sigma_cur: Any
    sigma_next: Any
    rows: TableRows
    analytic: bool = False
    plugin_order: int = 0


@dataclass(frozen=True)
class StepPlan:
    """A grid ``sigmas [N]``, the table ``rows`` (a :class:`TableRows` or a function of the step index, e.g. the
    differentiable rows of a table being trained) and the table's flags. ``step(i)`` applies the rules."""

    sigmas: Any
    rows: TableRows | Callable[[int], TableRows]
    afs: bool = False
    fcn: bool = False
    plugin_order: int = 0

    @classmethod
    def from_table(cls, table: Any, *, rows: TableRows | Callable[[int], TableRows] | None = None,
                   afs: bool | None = None) -> "StepPlan":
        """The plan of a table (a :class:`solvers.table.PredictorTable`, a plan, or any object with its fields).

        ``rows`` replaces the table's own rows (RDPO samples one table per image around the start table and
        keeps its grid and flags); ``afs`` overrides the table's flag."""
        if isinstance(table, StepPlan):
            plan = table if rows is None else replace(table, rows=rows)
            return plan if afs is None else replace(plan, afs=bool(afs))
        if rows is None:
            rows = TableRows(table.positions, table.weights, table.dir_scales, table.time_scales)
        return cls(table.sigmas, rows, afs=bool(table.afs if afs is None else afs), fcn=bool(table.fcn),
                   plugin_order=plugin_order(getattr(table, "solver", "epd"), getattr(table, "max_order", None)))

    @property
    def num_steps(self) -> int:
        return int(np.shape(self.sigmas)[0]) - 1

    def rows_of(self, index: int) -> TableRows:
        return self.rows(index) if callable(self.rows) else self.rows[index]

    def like(self, x: torch.Tensor) -> "StepPlan":
        """The grid (and fixed rows) as tensors on ``x``'s device, copied once for the whole run."""
        rows = self.rows if callable(self.rows) else self.rows.like(x)
        return replace(self, sigmas=as_tensor(self.sigmas, x), rows=rows)

    def step(self, index: int) -> Step:
        if not 0 <= index < self.num_steps:
            raise IndexError(f"step {index} outside the plan's {self.num_steps} steps")
        rows = self.rows_of(index)
        if self.fcn and index == self.num_steps - 1:
            rows = replace(rows, dir_scales=None)   # "fcn": unscaled directions on the final step (§1.1)
        return Step(index, self.sigmas[index], self.sigmas[index + 1], rows,
                    analytic=self.afs and index == 0, plugin_order=self.plugin_order)
