"""Held-out validation of a Stage-1 run and its comparison with the best handcrafted solver (docs/distill/recipe.md).

Validation trajectory ``j`` starts from the noise of seed ``VALIDATION_SEED_BASE + j`` = 2^30 + j: never a training
seed (those are >= 2^31, :data:`training.distill.trainer.TRAIN_SEED_BASE`) and never a benchmark seed (the
benchmarks count up from 0). Its condition is drawn like a training trajectory's, from its own id
(``VALIDATION_ID_BASE + j``). The target is not the teacher but a *converged reference* at the grid's last sigma:

* ``reference.solver: reference``: the adaptive float64 Dormand-Prince solve at ``rtol`` (exact models);
* any registry solver: ``steps`` steps of it on the logSNR grid in float64, checked against ``steps / 2``
  (:func:`solvers.evaluate.fine_reference`), as the benchmark does for networks.

The error of a table is ``RMSE = sqrt(mean over trajectories and elements of (x_N - x_ref)^2)``, the benchmark's.
:func:`compare_with_baselines` runs every registry baseline on every candidate grid at the table's sequential NFE
and at its total evaluations, on the same trajectories, and keeps the best per NFE (:func:`solvers.evaluate.summarize`).
References are cached on disk: every run of a recipe search scores against the same one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from solvers.evaluate import (baseline_jobs, baseline_rows, cached_states, condition_rows, fine_reference, same_sigma,
                              summarize, table_row, unique_sigmas)
from solvers.core import seeded_noise
from solvers.reference import reference_solution
from solvers.schedules import ScheduleSpec, default_rho

__all__ = ["VALIDATION_SEED_BASE", "VALIDATION_ID_BASE", "ValidationSet", "build_validation", "candidate_schedules",
           "compare_with_baselines", "comparison_lines"]

VALIDATION_SEED_BASE = 1 << 30
VALIDATION_ID_BASE = 1 << 40          # condition draws of validation trajectories (training ids count from 0)


@dataclass
class ValidationSet:
    """Fixed held-out trajectories: initial noise, conditions, and reference states ``{sigma_end: [n, ...]}``
    (float64, CPU) at the ends of the grids they serve."""

    noise: torch.Tensor
    cond: Any
    sigma_start: float
    states: dict
    report: dict
    flow: bool = False
    batch: int = 256

    def __len__(self) -> int:
        return int(self.noise.shape[0])

    @torch.no_grad()
    def rmse(self, denoiser: Any, table: Any) -> float:
        """The table's endpoint RMSE to the reference (sampled with :func:`solvers.epd.sample_epd`)."""
        return float(table_row(denoiser, self.noise, self.states, "table", table, batch=self.batch, flow=self.flow,
                               cond=self.cond)["rmse"])

    def covers(self, sigma_end: float) -> bool:
        """Whether the set has a reference state at ``sigma_end``."""
        return any(same_sigma(sigma_end, known) for known in self.states)


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _reference_states(denoiser: Any, noise: torch.Tensor, cond: Any, start: float, ends: list[float],
                      reference: dict, flow: bool, batch: int) -> tuple[dict, dict]:
    if reference["solver"] == "reference":
        if flow:
            raise ValueError("validation.reference.solver=reference (adaptive, VE) does not apply to flow-matching "
                             "models; choose a registry solver (e.g. euler) with validation.reference.steps")
        states: dict = {}
        report: dict = {}
        for lo in range(0, len(noise), batch):
            solved = reference_solution(denoiser, noise[lo:lo + batch].double() * start, start, ends,
                                        condition_rows(cond, lo, lo + batch), rtol=float(reference["rtol"]))
            for end, state in solved.states.items():
                states.setdefault(float(end), []).append(state.double().cpu())
            part = solved.as_dict()
            report = {**part, "evals": report.get("evals", 0) + part["evals"],
                      "check_rmse_diff": max(report.get("check_rmse_diff", 0.0), part["check_rmse_diff"]),
                      "check_max_abs_diff": max(report.get("check_max_abs_diff", 0.0), part["check_max_abs_diff"])}
        return {end: torch.cat(parts) for end, parts in states.items()}, report
    return fine_reference(denoiser, noise, start, ends, solver=reference["solver"], steps=int(reference["steps"]),
                          batch=batch, cond=cond, flow=flow)


def build_validation(denoiser: Any, *, num: int, shape: tuple, dtype: torch.dtype, device: torch.device,
                     sigma_start: float, ends: list[float], conditions: Callable[[torch.Tensor], Any],
                     reference: dict, key: dict, cache_dir: str | Path | None, flow: bool = False,
                     batch: int = 256) -> ValidationSet:
    """The validation set of a run (module docstring); the reference is read from ``cache_dir`` when a run with
    the same ``key`` (model, conditions), start, ends and reference settings made it before."""
    ids = torch.arange(num)
    noise = seeded_noise([VALIDATION_SEED_BASE + int(i) for i in ids], shape, dtype, device)
    cond = conditions(ids + VALIDATION_ID_BASE)
    ends = unique_sigmas(ends)
    full = {**key, "num": num, "start": f"{sigma_start:.10g}", "ends": sorted(f"{e:.10g}" for e in ends),
            "reference": reference, "flow": flow, "dtype": str(dtype), "seed_base": VALIDATION_SEED_BASE}
    path = None if not cache_dir else Path(cache_dir) / f"validation-{_digest(full)}.pt"
    states, report = cached_states(path, lambda: _reference_states(denoiser, noise, cond, sigma_start, ends,
                                                                   reference, flow, batch))
    return ValidationSet(noise, cond, float(sigma_start), states, report, flow, batch)


def candidate_schedules(kinds: list, sigma_min: float, sigma_max: float, *, discrete: bool, flow: bool,
                        shift: float | None = None, mu: float | None = None) -> list[ScheduleSpec]:
    """Grid specs on ``[sigma_min, sigma_max]`` from a list of kinds (``"polynomial"``, or ``{kind, rho}``);
    ``"auto"`` means time_uniform, polynomial (rho 7) and logsnr for VE models, plus the model's ``discrete``
    grid when it has one; ``flowmatch`` (the model's shift) for flow-matching models."""
    items: list = []
    for kind in kinds:
        if kind == "auto":
            items += (["flowmatch"] if flow else ["time_uniform", "polynomial", "logsnr"] + (["discrete"] if discrete else []))
        else:
            items.append(kind)
    specs = []
    for item in items:
        data = dict(item) if not isinstance(item, str) else {"kind": item}
        kind = data["kind"]
        if kind == "discrete" and not discrete:
            continue                        # a model without a discrete schedule has no such grid
        rho = float(data.get("rho", default_rho(kind) if kind != "discrete" else 1.0))
        spec = ScheduleSpec(kind=kind, num_steps=2, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho,
                            shift=shift if kind == "flowmatch" else None, mu=mu if kind == "flowmatch" else None)
        if spec not in specs:
            specs.append(spec)
    return specs


def compare_with_baselines(denoiser: Any, validation: ValidationSet, table: Any, schedules: list[ScheduleSpec],
                           solvers: list[str], *, alphas_cumprod: Any = None,
                           progress: Callable[[dict], None] | None = None) -> dict:
    """The table and every baseline (each on every grid of ``schedules``, at the table's sequential NFE and at its
    total evaluations) on the validation trajectories. Returns ``{"results": rows, "summary": ...}`` with the
    table's row named ``"table"`` (:func:`solvers.evaluate.summarize`)."""
    counts = table.eval_count()
    nfes = sorted({int(counts.sequential), int(counts.total)})
    specs = [replace(spec, sigma_min=float(table.sigmas[-1]), sigma_max=float(table.sigmas[0])) for spec in schedules]
    jobs = baseline_jobs(list(solvers), nfes, specs, False, alphas_cumprod)
    if not all(validation.covers(float(job.sigmas[-1])) for job in jobs):
        raise ValueError("a baseline grid ends where the validation set has no reference state")
    rows = baseline_rows(denoiser, validation.noise, validation.states, jobs, batch=validation.batch,
                         flow=validation.flow, cond=validation.cond, on_row=progress)
    rows.append(table_row(denoiser, validation.noise, validation.states, "table", table, batch=validation.batch,
                          flow=validation.flow, cond=validation.cond))
    summary = summarize(rows)
    return {"results": rows, "summary": summary, "nfe": {"sequential": counts.sequential, "total": counts.total},
            "num_trajectories": len(validation), "reference": validation.report}


def _label(entry: dict) -> str:
    spec = entry.get("schedule") or {}
    kind = spec.get("kind", "?")
    rho = spec.get("rho")
    grid = f"{kind}" + (f" rho {rho:g}" if kind == "polynomial" and rho is not None else "")
    return f"{entry['solver']} ({grid})"


def comparison_lines(comparison: dict) -> list[str]:
    """Plain sentences: whether the table beats the best handcrafted solver at its NFE (and by how much), and
    the same at equal total evaluations."""
    table = comparison["summary"]["tables"]["table"]
    lines = []
    for key, what in (("best_baseline_same_nfe", f"at the same NFE ({table['nfe']})"),
                      ("best_baseline_same_total", f"at equal total evaluations ({table['total_evals']})")):
        entry = table.get(key)
        if entry is None:
            lines.append(f"no baseline ran {what}")
            continue
        ratio = entry["ratio"]
        if ratio is not None and ratio < 1:
            verdict = f"the table WINS {what}: RMSE {table['rmse']:.4g} vs {entry['rmse']:.4g} for {_label(entry)}"
            verdict += f" ({ratio:.3g}x)"
        else:
            verdict = (f"the table LOSES {what}: RMSE {table['rmse']:.4g} vs {entry['rmse']:.4g} for "
                       f"{_label(entry)} ({'inf' if ratio is None else f'{ratio:.3g}'}x, worse)")
        lines.append(verdict)
    return lines
