"""What the exact-reference benchmark (:mod:`bench.exact`) and the distillation's validation share: measuring a
solver or table against reference endpoints on the same noise, and the references themselves.

* :func:`measure`: RMSE (and optionally the Frechet distance to a data set) of ``run``'s endpoints against the
  reference states, with the evaluations counted, not planned;
* :func:`fine_reference`: the reference of a model without an exact solution, a fine fixed-step solve checked
  against half as many steps; :func:`reference_converged` says whether it is good enough;
* :func:`baseline_jobs` / :func:`baseline_rows` / :func:`table_row`: every (solver, NFE, grid) and every table;
  :func:`summarize`: the best baseline per NFE and each table's standing against it;
* :func:`cached_states`: reference states kept on disk under a key of everything they depend on.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch

from .core import EvalCounter
from .epd import sample_epd
from .frechet import sample_frechet_distance
from .registry import get_solver, steps_for_nfe
from .schedules import ScheduleSpec, make_sigmas
from safeio import atomic_write

__all__ = ["REF_SOLVER", "REF_STEPS", "CONVERGED_SHARE", "same_sigma", "unique_sigmas",
           "cached_states", "fine_reference", "reference_converged", "BaselineJob", "baseline_jobs", "schedule_label",
           "condition_rows", "measure", "baseline_rows", "table_row", "best_rows", "summarize"]

REF_SOLVER, REF_STEPS = "dpmpp3m", 256          # the network models' reference (checked against REF_STEPS / 2)

def same_sigma(a: float, b: float) -> bool:
    """Two grid ends are the same noise level up to rounding (grids reach sigma_min up to a few ulps)."""
    return abs(a - b) <= 1e-9 * max(abs(a), abs(b))


def unique_sigmas(values: list[float]) -> list[float]:
    """``values`` without near-duplicates (``same_sigma``), first occurrences kept, in order."""
    out: list[float] = []
    for value in values:
        if not any(same_sigma(float(value), kept) for kept in out):
            out.append(float(value))
    return out


def cached_states(path: Path | None, compute: Callable[[], tuple[dict, dict]]) -> tuple[dict, dict]:
    """Reference states ``{sigma: tensor}`` and their report from ``path`` when it exists, else ``compute()``d and
    written there atomically (two processes filling the cache at once never see half a file); ``path`` None: no
    cache. Read with ``weights_only=True``: a cache file is data."""
    if path is not None and path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        return {float(k): v for k, v in saved["states"].items()}, json.loads(saved["report"])
    states, report = compute()
    if path is not None:
        buffer = io.BytesIO()
        torch.save({"states": {str(k): v for k, v in states.items()}, "report": json.dumps(report)}, buffer)
        atomic_write(path, buffer.getvalue())
    return states, report


def fine_reference(model: Any, noise: torch.Tensor, sigma_max: float, ends: list[float], solver: str = REF_SOLVER,
                   steps: int = REF_STEPS, batch: int = 1000, cond: Any = None,
                   flow: bool = False) -> tuple[dict, dict]:
    """Reference endpoints of a model without an exact solution: ``solver`` with ``steps`` steps on the logSNR
    grid from ``sigma_max`` to each end (float64 state, ``noise`` on the model's device; flow matching: the
    noise itself, on a grid uniform in sigma), and the same with ``steps // 2`` steps as the convergence check.
    Returns ``({end: state (CPU, float64)}, report)``."""
    from .schedules import logsnr_sigmas

    run = get_solver(solver)
    extra = {"flow": True} if flow else {}
    states, coarse = {}, {}
    for end in ends:
        fine_out, coarse_out = [], []
        for lo in range(0, len(noise), batch):
            x = noise[lo:lo + batch].double() * (1.0 if flow else sigma_max)
            c = condition_rows(cond, lo, lo + batch)
            for n, out in ((steps, fine_out), (steps // 2, coarse_out)):
                sigmas = (torch.linspace(sigma_max, float(end), n + 1, dtype=torch.float64) if flow
                          else logsnr_sigmas(n + 1, float(end), sigma_max).double())
                with torch.no_grad():
                    out.append(run(model, x, sigmas, c, **extra).double().cpu())
        states[float(end)], coarse[float(end)] = torch.cat(fine_out), torch.cat(coarse_out)
    diffs = [states[s] - coarse[s] for s in states]
    per_step = get_solver(solver).evals_per_step
    report = {"method": f"{solver}, {steps} steps on the logSNR grid, float64 state", "solver": solver,
              "steps": steps, "check_steps": steps // 2, "evals": per_step * (steps + steps // 2) * len(ends),
              "check_max_abs_diff": max(float(d.abs().max()) for d in diffs),
              "check_rmse_diff": max(float(d.pow(2).mean().sqrt()) for d in diffs), "sigma_ends": sorted(states)}
    return states, report


# With a solver of order p >= 1 in its asymptotic range, |x_N - x_2N| ~ (2^p - 1) |x_2N - x_exact|, so the check
# difference bounds the reference's own error; below this share of the smallest measured RMSE, no reported
# error moves by more than that share.
CONVERGED_SHARE = 0.02


def reference_converged(check_rmse_diff: float, smallest_rmse: float) -> bool:
    """Is the fine reference accurate enough for the smallest error it is used to measure?"""
    return bool(check_rmse_diff < CONVERGED_SHARE * smallest_rmse)


class BaselineJob(NamedTuple):
    """One baseline run: a solver at one NFE on one schedule's grid."""

    solver: str
    steps: int
    afs: bool
    schedule: ScheduleSpec
    sigmas: torch.Tensor


def baseline_jobs(solvers: list[str], nfes: list[int], schedules: list[ScheduleSpec], afs: bool,
                  alphas_cumprod: Any = None) -> list[BaselineJob]:
    """Every (solver, NFE, schedule): the grid with as many steps as give that NFE (:func:`steps_for_nfe`);
    ``alphas_cumprod`` builds ``discrete`` grids (the model's own schedule)."""
    jobs = []
    for name in solvers:
        for nfe in nfes:
            steps, use_afs = steps_for_nfe(name, nfe, afs=afs)
            jobs += [BaselineJob(name, steps, use_afs, spec, make_sigmas(replace(spec, num_steps=steps + 1), alphas_cumprod))
                     for spec in schedules]
    return jobs


def schedule_label(spec: ScheduleSpec | None) -> dict | None:
    if spec is None:
        return None
    return {"kind": spec.kind, "rho": None if spec.rho is None else float(spec.rho)}


def condition_rows(cond: Any, lo: int, hi: int) -> Any:
    """Rows ``lo:hi`` of a condition (None, a tensor of labels, or a prompt condition with ``select``)."""
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):      # tensors have a select() of their own, with another meaning
        return cond[lo:hi]
    return cond.select(slice(lo, hi)) if hasattr(cond, "select") else cond[lo:hi]


def measure(model: Any, noise: torch.Tensor, states: dict, run: Callable, sigma_end: float, *, batch: int = 1000,
            data: np.ndarray | None = None, cond: Any = None) -> dict:
    """Run ``run(denoiser, noise_chunk, cond_chunk) -> endpoint`` on ``noise`` (and the matching rows of
    ``cond``) in chunks of ``batch`` and compare it with the
    reference state at ``sigma_end`` (``states``: ``{sigma: [n, ...] float64 CPU}``): RMSE over every element,
    largest absolute error, Frechet distance to ``data`` (rows; None: not measured), sequential and total
    evaluations per image (counted, not planned) and wall time."""
    counter = EvalCounter(model, batch_size=1)
    outputs, start = [], time.perf_counter()
    seq = tot = 0
    for lo in range(0, len(noise), batch):
        chunk = noise[lo:lo + batch]
        counter.batch_size = chunk.shape[0]
        calls, items = counter.calls, counter.items
        with torch.no_grad():
            outputs.append(run(counter, chunk, condition_rows(cond, lo, lo + batch)).cpu())
        seq, tot = counter.calls - calls, (counter.items - items) // chunk.shape[0]
    seconds = time.perf_counter() - start
    out = torch.cat(outputs).double()
    matches = [s for s in states if same_sigma(s, sigma_end)]
    if not matches:
        raise KeyError(f"no reference state at sigma={sigma_end}")
    err = out - states[matches[0]]
    fd = None if data is None else sample_frechet_distance(out.reshape(len(out), -1).numpy(), data)
    return {"rmse": float(err.pow(2).mean().sqrt()), "max_abs": float(err.abs().max()), "fd": fd,
            "sequential_evals": seq, "total_evals": tot, "seconds": round(seconds, 3)}


def baseline_rows(model: Any, noise: torch.Tensor, states: dict, jobs: list["BaselineJob"], *, batch: int = 1000,
                  data: np.ndarray | None = None, flow: bool = False, cond: Any = None,
                  on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """One result row per baseline job (:func:`baseline_jobs`), each started from ``noise * sigma_0`` (flow:
    the noise itself) and measured by :func:`measure`."""
    rows = []
    for job in jobs:
        solver = get_solver(job.solver)
        scale = 1.0 if flow else job.sigmas[0]
        extra = {"flow": True} if flow else {}
        row = measure(model, noise, states,
                      lambda den, z, c: solver(den, z * scale, job.sigmas, c, afs=job.afs, **extra),
                      float(job.sigmas[-1]), batch=batch, data=data, cond=cond)
        rows.append({"solver": job.solver, "nfe": row["sequential_evals"], "afs": job.afs, "steps": job.steps,
                     "schedule": schedule_label(job.schedule), "best": False, **row})
        if on_row is not None:
            on_row(rows[-1])
    return rows


def table_row(model: Any, noise: torch.Tensor, states: dict, name: str, table: Any, *, batch: int = 1000,
              data: np.ndarray | None = None, flow: bool = False, cond: Any = None,
              on_row: Callable[[dict], None] | None = None) -> dict:
    """The result row of an EPD table run on its own grid (as :func:`baseline_rows`)."""
    scale = 1.0 if flow else float(table.sigmas[0])
    row = measure(model, noise, states, lambda den, z, c: sample_epd(den, z * scale, table, c, flow=flow),
                  float(table.sigmas[-1]), batch=batch, data=data, cond=cond)
    row = {"solver": name, "nfe": row["sequential_evals"], "afs": table.afs, "steps": table.num_steps - 1,
           "schedule": schedule_label(table.schedule), "best": False, "table": getattr(table, "source", None) or name,
           **row}
    if on_row is not None:
        on_row(row)
    return row


# -- best schedule and comparisons ---------------------------------------------------------------------------
def best_rows(results: list[dict]) -> list[dict]:
    """The row kept per (solver, NFE): the lowest RMSE over schedules (the first on ties); table rows as they are.

    Returns the row objects themselves (no copies), in order of first appearance.
    """
    best: dict[tuple, dict] = {}
    for row in results:
        key = (row["solver"], row["nfe"])
        if key not in best or row["rmse"] < best[key]["rmse"]:
            best[key] = row
    return list(best.values())


def _baseline_entry(row: dict, table_rmse: float | None = None) -> dict:
    entry = {"nfe": row["nfe"], "solver": row["solver"], "schedule": row.get("schedule"), "rmse": row["rmse"]}
    if table_rmse is not None:
        entry["ratio"] = table_rmse / row["rmse"] if row["rmse"] > 0 else None
    return entry


def summarize(results: list[dict]) -> dict:
    """Best handcrafted row per NFE, and each table against the best handcrafted one at its sequential NFE and at
    NFE = its total evaluations (null where no baseline ran at that NFE); see the module docstring."""
    rows = best_rows(results)
    per_nfe: dict[int, dict] = {}
    for row in rows:
        if "table" not in row and (row["nfe"] not in per_nfe or row["rmse"] < per_nfe[row["nfe"]]["rmse"]):
            per_nfe[row["nfe"]] = row

    def against(table_row: dict, nfe: int) -> dict | None:
        return _baseline_entry(per_nfe[nfe], table_row["rmse"]) if nfe in per_nfe else None

    return {"best_baseline": [_baseline_entry(per_nfe[n]) for n in sorted(per_nfe)],
            "tables": {row["solver"]: {"nfe": row["nfe"], "total_evals": row["total_evals"], "rmse": row["rmse"],
                                       "best_baseline_same_nfe": against(row, row["nfe"]),
                                       "best_baseline_same_total": against(row, row["total_evals"])}
                       for row in rows if "table" in row}}


