"""Cold start of the residual Dirichlet policy from a predictor table (docs/authors-code.md §7.1).

A table row's positions ``0 < r_1 < ... < r_K < 1`` become K+1 simplex *segments*
``s = diff([0, r_1, ..., r_K, 1])`` (inverse ``r_k = sum_{j<=k} s_j``); its weights ``w`` already lie on the
K-simplex. Each row is turned into two Dirichlet distributions, ``Dir(alpha_pos)`` over the segments and
``Dir(alpha_w)`` over the weights, centred on the table with a concentration ``c``:

* ``"mean"`` (the authors'): ``alpha = c * s`` so that the Dirichlet MEAN ``alpha / sum(alpha)`` is the table.
  With a small ``c`` (the shipped configs use 10-20 and ``alpha`` of about 3 per segment) the samples spread
  widely and the Dirichlet MODE ``(alpha - 1) / (sum(alpha) - n)`` lies away from the table (it is only defined
  when every ``alpha > 1`` and is pushed towards the larger components).
* ``"mode"`` (our option): ``alpha = 1 + c * s`` so that the MODE is the table exactly
  (``(alpha_i - 1) / (sum(alpha) - n) = c s_i / c = s_i``); the mean is then ``(1 + c s) / (n + c)``.

Rows with a segment or a weight ``<= eps`` are degenerate for a Dirichlet and are replaced by the uniform
simplex (segments and weights both), as the authors do; the replaced rows are recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from solvers.table import PredictorTable

__all__ = ["SanitizedRows", "ColdStart", "sanitize_rows", "positions_to_segments", "segments_to_positions",
           "cold_start", "PARAMETERISATIONS"]

PARAMETERISATIONS = ("mean", "mode")


@dataclass(frozen=True)
class SanitizedRows:
    """Output of :func:`sanitize_rows` (float64 arrays of the input's shape; ``changed`` counts changed rows)."""

    positions: np.ndarray
    weights: np.ndarray
    dir_scales: np.ndarray | None
    time_scales: np.ndarray | None
    changed: int


def _as_rows(values: Any, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray | None:
    if values is None:
        return None
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    arr = np.array(values, dtype=np.float64)  # a copy: inputs are never modified
    if arr.ndim < 1 or arr.shape[-1] < 1:
        raise ValueError(f"sanitize_rows: '{name}' must have shape [..., K] with K >= 1 (got {arr.shape})")
    if shape is not None and arr.shape != shape:
        raise ValueError(f"sanitize_rows: '{name}' has shape {arr.shape}, expected {shape} like 'positions'")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"sanitize_rows: '{name}' contains NaN or inf")
    return arr


def sanitize_rows(positions: Any, weights: Any, dir_scales: Any = None, time_scales: Any = None,
                  eps: float = 1e-6) -> SanitizedRows:
    """Sort and clip table rows (docs/authors-code.md §7.1 step 2, the authors' ``_sanitize_table_arrays``).

    Each row's positions are sorted ascending, with its weights and scales permuted the same way; then, left to
    right, ``r_k <- clip(r_k, r_{k-1} + eps, 1 - eps (K - k + 1))`` with ``r_0 = 0`` (k = 1..K), which gives
    ``0 < r_1 < ... < r_K < 1`` with gaps of at least ``eps``. Shapes ``[..., K]``; numpy float64 in and out;
    ``changed`` is the number of rows whose order or values changed.
    """
    pos = _as_rows(positions, "positions")
    shape = pos.shape
    num_points = shape[-1]
    if not (eps > 0 and eps * (num_points + 1) < 1):
        raise ValueError(f"sanitize_rows: eps must be > 0 and eps * (K + 1) < 1 (eps={eps}, K={num_points})")
    arrays = {"weights": _as_rows(weights, "weights", shape), "dir_scales": _as_rows(dir_scales, "dir_scales", shape),
              "time_scales": _as_rows(time_scales, "time_scales", shape)}
    flat = pos.reshape(-1, num_points)
    order = np.argsort(flat, axis=-1, kind="stable")
    sorted_pos = np.take_along_axis(flat, order, axis=-1)
    clipped = sorted_pos.copy()
    previous = np.zeros(flat.shape[0])
    for k in range(num_points):  # k is 0-based: the upper bound is 1 - eps (K - k)
        clipped[:, k] = np.minimum(np.maximum(clipped[:, k], previous + eps), 1.0 - eps * (num_points - k))
        previous = clipped[:, k]
    if not (np.all(clipped > 0) and np.all(clipped < 1) and np.all(np.diff(clipped, axis=-1) > 0)):
        raise ValueError("sanitize_rows: could not make the positions strictly increasing inside (0, 1)")
    changed = np.any(order != np.arange(num_points), axis=-1) | np.any(clipped != flat, axis=-1)
    out = {name: None if arr is None else np.take_along_axis(arr.reshape(-1, num_points), order, axis=-1).reshape(shape)
           for name, arr in arrays.items()}
    return SanitizedRows(positions=clipped.reshape(shape), weights=out["weights"], dir_scales=out["dir_scales"],
                         time_scales=out["time_scales"], changed=int(changed.sum()))


def positions_to_segments(positions: Any) -> Any:
    """``s = diff([0, r_1, ..., r_K, 1])``: ``[..., K]`` -> ``[..., K+1]`` (torch in, torch out; else numpy)."""
    if isinstance(positions, torch.Tensor):
        zero = torch.zeros_like(positions[..., :1])
        return torch.diff(torch.cat([zero, positions, zero + 1], dim=-1), dim=-1)
    pos = np.asarray(positions, dtype=np.float64)
    zero = np.zeros_like(pos[..., :1])
    return np.diff(np.concatenate([zero, pos, zero + 1], axis=-1), axis=-1)


def segments_to_positions(segments: Any) -> Any:
    """``r_k = sum_{j<=k} s_j`` (the first K partial sums): ``[..., K+1]`` -> ``[..., K]``."""
    if isinstance(segments, torch.Tensor):
        return torch.cumsum(segments, dim=-1)[..., :-1]
    return np.cumsum(np.asarray(segments, dtype=np.float64), axis=-1)[..., :-1]


@dataclass(frozen=True)
class ColdStart:
    """Dirichlet start parameters of a table (docs/authors-code.md §7.1).

    ``alpha_pos [N-1, K+1]`` (segments), ``alpha_weight [N-1, K]``; ``dir_scales``/``time_scales [N-1, K]`` the
    start values of the scales (None when the table has none). ``table`` is the start table the alphas
    represent: sanitized, weights renormalised after clipping at eps, replaced rows uniform; metadata kept.
    """

    alpha_pos: np.ndarray
    alpha_weight: np.ndarray
    dir_scales: np.ndarray | None
    time_scales: np.ndarray | None
    table: PredictorTable
    concentration: float
    parameterisation: str
    replaced_rows: tuple[int, ...]
    sanitized_rows: int

    @property
    def num_rows(self) -> int:
        return int(self.alpha_weight.shape[0])

    @property
    def num_points(self) -> int:
        return int(self.alpha_weight.shape[1])


def _readonly(arr: np.ndarray | None) -> np.ndarray | None:
    if arr is not None:
        arr.setflags(write=False)
    return arr


def cold_start(table: PredictorTable, concentration: float = 200.0, parameterisation: str = "mean",
               eps: float = 1e-6) -> ColdStart:
    """Dirichlet parameters centred on ``table``.

    Steps: :func:`sanitize_rows`; ``s = positions_to_segments(r)``; ``w <- max(w, eps) / sum``; rows with any
    ``s <= eps`` or ``w <= eps`` (up to a relative 1e-6, so a gap clipped to exactly eps counts despite
    rounding) become uniform (``s = 1/(K+1)``, ``w = 1/K``); then, with ``s`` and ``w``
    renormalised, ``alpha = c s`` and ``alpha_w = c w`` ("mean") or ``alpha = 1 + c s`` and ``alpha_w = 1 + c w``
    ("mode"). Example: FLUX start r = (0.335, 0.665), w = (0.5, 0.5), c = 10, "mean" ->
    ``alpha_pos = (3.35, 3.30, 3.35)``, ``alpha_w = (5, 5)``.
    """
    if not isinstance(table, PredictorTable):
        raise ValueError(f"cold_start: expected a PredictorTable (got {type(table).__name__})")
    try:
        concentration = float(concentration)
    except (TypeError, ValueError):
        raise ValueError(f"cold_start: concentration must be a number (got {concentration!r})") from None
    if not (np.isfinite(concentration) and concentration > 0):
        raise ValueError(f"cold_start: concentration must be finite and > 0 (got {concentration})")
    if parameterisation not in PARAMETERISATIONS:
        raise ValueError(f"cold_start: parameterisation must be one of {PARAMETERISATIONS} (got {parameterisation!r})")
    if table.positions.ndim != 2 or table.num_points < 1:
        raise ValueError(f"cold_start: the table needs K >= 1 points per step (positions {table.positions.shape})")
    if not (eps > 0 and eps * (table.num_points + 1) < 1):
        raise ValueError(f"cold_start: eps must be > 0 and eps * (K + 1) < 1 (eps={eps})")

    clean = sanitize_rows(table.positions, table.weights, table.dir_scales, table.time_scales, eps=eps)
    num_points = table.num_points
    segments = positions_to_segments(clean.positions)
    weights = np.maximum(clean.weights, eps)
    weights = weights / weights.sum(-1, keepdims=True)
    floor = eps * (1 + 1e-6)  # "<= eps" up to rounding, so segments clipped to the eps gap always count
    bad = np.any(segments <= floor, axis=-1) | np.any(weights <= floor, axis=-1)
    segments[bad] = 1.0 / (num_points + 1)
    weights[bad] = 1.0 / num_points
    segments = segments / segments.sum(-1, keepdims=True)
    weights = weights / weights.sum(-1, keepdims=True)
    offset = 1.0 if parameterisation == "mode" else 0.0
    alpha_pos = offset + concentration * segments
    alpha_weight = offset + concentration * weights

    positions = segments_to_positions(segments)
    start = replace(table, positions=positions, weights=weights, dir_scales=clean.dir_scales,
                    time_scales=clean.time_scales, metadata=dict(table.metadata))
    return ColdStart(alpha_pos=_readonly(alpha_pos), alpha_weight=_readonly(alpha_weight),
                     dir_scales=start.dir_scales, time_scales=start.time_scales, table=start,
                     concentration=concentration, parameterisation=parameterisation,
                     replaced_rows=tuple(int(i) for i in np.flatnonzero(bad)), sanitized_rows=clean.changed)
