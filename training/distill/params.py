"""The trainable form of a predictor table (docs/authors-code.md §2.1-2.2).

Four raw tensors ``[N-1, K]`` map to the effective rows a solver uses:

    r = sigmoid(r_params)                    positions in (0, 1)
    w = softmax(weight_s)                    weights on the simplex
    c = 2 sigmoid(p_dir / 2) s_d + 1 - s_d   direction scales in (1 - s_d, 1 + s_d), only when s_d > 0
    a = 2 sigmoid(p_time / 2) s_t + 1 - s_t  time scales in (1 - s_t, 1 + s_t), only when s_t > 0

``init="random"`` draws every raw value from N(0, 1) as the authors do (unsorted positions, random weights,
docs/authors-code.md §9.19); ``"uniform"`` starts from fixed positions and equal weights (scales 1); a table starts from
its own values through the inverse maps.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from solvers.plan import TableRows
from solvers.table import PredictorTable

__all__ = ["TableParameters"]

_CLAMP = 1e-6


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, _CLAMP, 1 - _CLAMP)
    return np.log(p) - np.log1p(-p)


def _scale_raw(scale: np.ndarray | None, half_width: float, shape: tuple) -> np.ndarray:
    """Inverse of ``2 sigmoid(p/2) R + 1 - R`` (the authors' export map, clamped)."""
    if scale is None or half_width <= 0:
        return np.zeros(shape)
    return 2 * _logit((np.asarray(scale) - (1 - half_width)) / (2 * half_width))


class TableParameters(nn.Module):
    """Raw table parameters and their effective rows; ``row(n)`` is differentiable."""

    def __init__(self, num_rows: int, num_points: int = 2, *, scale_dir: float = 0.0, scale_time: float = 0.0,
                 init: str | PredictorTable = "uniform", init_positions: Sequence[float] | None = None,
                 generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64):
        super().__init__()
        self.scale_dir, self.scale_time = float(scale_dir), float(scale_time)
        shape = (int(num_rows), int(num_points))
        if isinstance(init, PredictorTable):
            raw = self._raw_from_table(init, shape)
        elif init == "random":
            raw = {name: torch.randn(shape, generator=generator, dtype=torch.float64).numpy()
                   for name in ("r_params", "weight_s", "scale_dir_params", "scale_time_params")}
        elif init == "uniform":
            pos = np.asarray(init_positions if init_positions is not None
                             else np.arange(1, shape[1] + 1) / (shape[1] + 1), dtype=np.float64)
            raw = {"r_params": np.tile(_logit(pos), (shape[0], 1)), "weight_s": np.zeros(shape),
                   "scale_dir_params": np.zeros(shape), "scale_time_params": np.zeros(shape)}
        else:
            raise ValueError(f"unknown init {init!r}: use 'uniform', 'random' or a PredictorTable")
        for name, value in raw.items():
            self.register_parameter(name, nn.Parameter(torch.as_tensor(np.asarray(value), dtype=dtype).clone()))

    def _raw_from_table(self, table: PredictorTable, shape: tuple) -> dict:
        if table.positions.shape != shape:
            raise ValueError(f"{table.source}: table rows {table.positions.shape} do not match the run {shape}")
        return {"r_params": _logit(table.positions), "weight_s": np.log(np.clip(table.weights, 1e-12, None)),
                "scale_dir_params": _scale_raw(table.dir_scales, self.scale_dir, shape),
                "scale_time_params": _scale_raw(table.time_scales, self.scale_time, shape)}

    @property
    def num_rows(self) -> int:
        return int(self.r_params.shape[0])

    @staticmethod
    def _scale(raw: torch.Tensor, half_width: float) -> torch.Tensor | None:
        return None if half_width <= 0 else 2 * torch.sigmoid(0.5 * raw) * half_width + (1 - half_width)

    def row(self, n: int) -> TableRows:
        """Effective rows of step ``n`` (``[K]``): ``sigmoid(r)``, ``softmax(w)`` and the scale maps."""
        return TableRows(torch.sigmoid(self.r_params[n]), torch.softmax(self.weight_s[n], dim=-1),
                         self._scale(self.scale_dir_params[n], self.scale_dir),
                         self._scale(self.scale_time_params[n], self.scale_time))

    @torch.no_grad()
    def effective(self) -> dict[str, np.ndarray | None]:
        """All rows as float64 arrays ``[N-1, K]`` (scales ``None`` when disabled)."""
        rows = [self.row(n) for n in range(self.num_rows)]
        keys = ("positions", "weights", "dir_scales", "time_scales")
        return {key: None if getattr(rows[0], key) is None
                else torch.stack([getattr(r, key) for r in rows]).double().cpu().numpy() for key in keys}

    def to_table(self, sigmas: Any, *, solver: str = "epd", afs: bool = False, fcn: bool = False,
                 max_order: int | None = None, metadata: dict | None = None) -> PredictorTable:
        """A frozen :class:`PredictorTable` with the current effective values."""
        values = self.effective()
        return PredictorTable(positions=values["positions"], weights=values["weights"],
                              dir_scales=values["dir_scales"], time_scales=values["time_scales"],
                              sigmas=np.asarray(sigmas, dtype=np.float64), solver=solver, afs=afs, fcn=fcn,
                              max_order=max_order if solver == "ipndm" else None, metadata=dict(metadata or {}))
