"""Our solvers in k-diffusion's calling convention, for UIs that call ``k_diffusion.sampling.sample_*``
(ComfyUI, Forge, A1111). See docs/backends/k_diffusion.md.

    fn(model, x, sigmas, extra_args=None, callback=None, disable=None, **options) -> x

* ``model(x, sigma * s_in, **extra_args)`` returns the denoised estimate ``x0`` in VE/EDM coordinates
  (``x = x0 + sigma eps``), ``sigma * s_in`` being the noise level repeated to a ``[B]`` tensor;
* ``sigmas``: a decreasing 1-D grid, usually ending in 0; ``x``: the start ``noise * sigmas[0]``;
* ``callback({"x", "i", "sigma", "sigma_hat", "denoised"})`` once per step, ``x`` being the state at which
  ``denoised`` was evaluated and ``sigma_hat = sigma`` (our solvers add no churn);
* ``disable``: switches the tqdm bar off (``None``: tqdm's default, off when stderr is not a terminal).

Baselines run on exactly the given ``sigmas`` (a final 0 included, which they handle: the step to 0 is first
order). EPD runs on its table's own grid (:func:`sample_epd` states the rule). Like k-diffusion, every call runs
under ``torch.no_grad()``. This module does not import k-diffusion.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

from .core import Callback, Denoiser, sigma_batch
from .epd import sample_epd as _native_epd
from .registry import get_solver
from .table import load_table

__all__ = ["KModel", "KSampler", "ExtraArgs", "KDenoiser", "epd_grid_steps", "sample_euler", "sample_heun",
           "sample_dpm_2", "sample_dpmpp_2m", "sample_dpmpp_3m", "sample_unipc", "sample_ipndm", "sample_epd",
           "SAMPLERS"]

KModel = Callable[..., torch.Tensor]      # model(x, sigma[B], **extra_args) -> denoised
KSampler = Callable[..., torch.Tensor]    # fn(model, x, sigmas, extra_args, callback, disable, **options) -> x

# A float32 copy of a table's float64 grid is within 6e-8 of it; any grid built another way is much further off.
_GRID_RTOL = 1e-6


class ExtraArgs:
    """``extra_args`` carried as our solvers' ``cond``.

    EPD evaluates its K points in one batch of ``B*K`` rows ordered ``b*K + k``; :meth:`repeat_interleave`
    (called there through :func:`solvers.core.repeat_condition`) repeats the per-sample entries to match:
    the tensors whose first dimension is the batch size ``B``. Everything else (numbers, dicts such as
    ComfyUI's ``model_options``, lists, tensors of another length) passes through unchanged.
    """

    def __init__(self, kwargs: Mapping[str, Any] | None, batch: int):
        self.kwargs: dict[str, Any] = dict(kwargs or {})
        self.batch = int(batch)

    def repeat_interleave(self, repeats: int) -> "ExtraArgs":
        def repeat(value: Any) -> Any:
            per_sample = isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == self.batch
            return value.repeat_interleave(repeats, dim=0) if per_sample else value
        return ExtraArgs({key: repeat(value) for key, value in self.kwargs.items()}, self.batch * repeats)


class KDenoiser:
    """Our ``denoiser(x, sigma, cond)`` over a k-diffusion ``model``:
    ``D = model(x, sigma * ones[B], **cond.kwargs)`` (``cond`` an :class:`ExtraArgs` or ``None``)."""

    def __init__(self, model: KModel):
        self.model = model

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: ExtraArgs | None = None) -> torch.Tensor:
        kwargs = {} if cond is None else cond.kwargs
        return self.model(x, sigma_batch(sigma, x).contiguous(), **kwargs)


class _Report:
    """Turns our solvers' per-step reports ``{"i", "x" (after the step), "sigma", ...}`` into k-diffusion's
    callback dict (``x`` before the step, where ``denoised`` was evaluated) and advances the bar."""

    def __init__(self, x: torch.Tensor, callback: Callable[[dict], Any] | None, bar: tqdm):
        self.x, self.callback, self.bar = x, callback, bar

    def __call__(self, info: dict) -> None:
        if self.callback is not None:
            self.callback({"x": self.x, "i": info["i"], "sigma": info["sigma"], "sigma_hat": info["sigma"],
                           "denoised": info["denoised"]})
        self.x = info["x"]
        self.bar.update(1)


def _run(solve: Callable[[Denoiser, Any, Callback], torch.Tensor], model: KModel, x: torch.Tensor,
         extra_args: Mapping[str, Any] | None, callback: Callable[[dict], Any] | None, disable: bool | None,
         steps: int, desc: str) -> torch.Tensor:
    """The one wrapping rule: ``solve(denoiser, cond, report)`` runs one of our solvers with the adapted
    model, ``extra_args`` as ``cond`` and the callback/bar adapter as its callback."""
    with torch.no_grad(), tqdm(total=steps, disable=disable, desc=desc) as bar:
        return solve(KDenoiser(model), ExtraArgs(extra_args, x.shape[0]), _Report(x, callback, bar))


def _baseline(k_name: str, solver: str) -> KSampler:
    """``sample_<k_name>`` running the registry's ``solver`` on exactly the given ``sigmas``."""
    spec = get_solver(solver)

    def sampler(model: KModel, x: torch.Tensor, sigmas: Any, extra_args: Mapping[str, Any] | None = None,
                callback: Callable[[dict], Any] | None = None, disable: bool | None = None,
                **options: Any) -> torch.Tensor:
        return _run(lambda denoiser, cond, report: spec(denoiser, x, sigmas, cond, callback=report, **options),
                    model, x, extra_args, callback, disable, len(sigmas) - 1, k_name)

    sampler.__name__ = sampler.__qualname__ = f"sample_{k_name}"
    sampler.__module__ = __name__
    sampler.__doc__ = (f"{spec.description} (registry ``{spec.name}``) in the k-diffusion convention, on exactly "
                       f"``sigmas``; ``options`` (``afs``, ``flow``, ...) go to :func:`solvers.registry.get_solver`"
                       f"``({spec.name!r})``. docs/backends/k_diffusion.md.")
    return sampler


sample_euler = _baseline("euler", "euler")
sample_heun = _baseline("heun", "heun")
sample_dpm_2 = _baseline("dpm_2", "dpm2")
sample_dpmpp_2m = _baseline("dpmpp_2m", "dpmpp2m")
sample_dpmpp_3m = _baseline("dpmpp_3m", "dpmpp3m")
sample_unipc = _baseline("unipc", "unipc")
sample_ipndm = _baseline("ipndm", "ipndm")


def _host_grid(values: Any) -> np.ndarray:
    return np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values,
                      dtype=np.float64).reshape(-1)


def _show(grid: np.ndarray) -> str:
    return "[" + ", ".join(f"{value:.6g}" for value in grid) + "]"


def epd_grid_steps(table: Any, sigmas: Any) -> int:
    """Number of EPD steps when ``sigmas`` is asked for, or ValueError if the table cannot run on it.

    Accepted: ``None``, the table's grid, or the table's grid with a trailing 0 (equal to relative 1e-6, so a
    float32 copy passes). The result is always the EPD state at the table's last sigma: our native path
    (``sample.py``) does not denoise to 0, so neither does this one.
    """
    grid = _host_grid(table.sigmas)
    if sigmas is None:
        return len(grid) - 1
    given = _host_grid(sigmas)
    body = given[:-1] if len(given) == len(grid) + 1 and given[-1] == 0 else given
    if body.shape != grid.shape or not np.allclose(body, grid, rtol=_GRID_RTOL, atol=0.0):
        raise ValueError(f"the EPD table {getattr(table, 'source', '<memory>')} was fitted on its own sigma grid "
                         f"and is only valid there: table sigmas {_show(grid)}, given sigmas {_show(given)}; pass "
                         f"sigmas=None or the table's grid (optionally with a trailing 0)")
    return len(grid) - 1


def sample_epd(model: KModel, x: torch.Tensor, sigmas: Any, extra_args: Mapping[str, Any] | None = None,
               callback: Callable[[dict], Any] | None = None, disable: bool | None = None, *,
               table: Any | str | os.PathLike, flow: bool = False, parallel: bool = True) -> torch.Tensor:
    """EPD (:func:`solvers.epd.sample_epd`) in the k-diffusion convention, on the table's own grid.

    ``table``: a :class:`solvers.table.PredictorTable` or a path (:func:`solvers.table.load_table`).
    ``sigmas`` must be ``None`` or the table's grid, optionally with a trailing 0 (:func:`epd_grid_steps`;
    anything else raises ValueError); ``x = noise * table.sigmas[0]``. Returns the state at the table's last
    sigma, as the native path does. ``flow`` selects flow-matching states for the analytic first step.
    ``parallel=False`` evaluates the K points in K calls of batch B instead of one of B*K rows (for models that
    keep per-batch state of their own, such as ComfyUI's inpainting wrapper), equal up to rounding.
    """
    table = load_table(table) if isinstance(table, (str, os.PathLike)) else table
    steps = epd_grid_steps(table, sigmas)
    return _run(lambda denoiser, cond, report: _native_epd(denoiser, x, table, cond, flow=flow, parallel=parallel,
                                                            callback=report),
                model, x, extra_args, callback, disable, steps, "epd")


SAMPLERS: dict[str, KSampler] = {
    "euler": sample_euler, "heun": sample_heun, "dpm_2": sample_dpm_2, "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_3m": sample_dpmpp_3m, "unipc": sample_unipc, "ipndm": sample_ipndm, "epd": sample_epd,
}
