"""Exact-reference benchmark of ODE solvers on the embedded analytic models.

    python -m solvers.bench --model gmm --solvers ipndm,dpmpp3m,unipc,dpm2,heun,euler \
        --nfe 3,4,5,6,7,8,10 --num-samples 2000 --json OUT.json [--table NAME=PATH ...] [--seed S]

For every solver and NFE (the papers' parallel-NFE convention: sequential evaluations), it integrates the
same noise as the reference, a float64 adaptive solve whose own accuracy is checked and reported, and
measures the RMSE to that exact endpoint, the Frechet distance to the data set in data space, the sequential
and total evaluations actually made, and wall time. It prints a markdown table and writes a JSON file and a
PNG plot of error vs NFE. References are cached under ``.cache/bench`` (keyed by every input).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .core import EvalCounter, seeded_noise
from .epd import sample_epd
from .reference import reference_solution
from .registry import get_solver, steps_for_nfe
from .schedules import ScheduleSpec, default_rho, make_sigmas
from .table import load_table

__all__ = ["frechet_distance", "run_benchmark", "main"]


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)`` between two sample sets (rows)."""
    a, b = np.asarray(a, np.float64).reshape(len(a), -1), np.asarray(b, np.float64).reshape(len(b), -1)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    vals, vecs = np.linalg.eigh(cov_a)
    root_a = (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T
    inner = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(np.clip(inner, 0, None)).sum())


def _reference(model: Any, noise: torch.Tensor, sigma_max: float, ends: list[float], key: dict,
               rtol: float, cache_dir: Path | None) -> tuple[dict, dict]:
    digest = hashlib.sha256(json.dumps({**key, "rtol": rtol, "ends": sorted(ends)}, sort_keys=True).encode()).hexdigest()[:16]
    path = None if cache_dir is None else cache_dir / f"reference-{digest}.pt"
    if path is not None and path.is_file():
        saved = torch.load(path, weights_only=True)
        return {float(k): v for k, v in saved["states"].items()}, json.loads(saved["report"])
    report = reference_solution(model, noise.double() * sigma_max, sigma_max, ends, rtol=rtol)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"states": {str(k): v for k, v in report.states.items()}, "report": json.dumps(report.as_dict())}, tmp)
        tmp.replace(path)
    return report.states, report.as_dict()


def run_benchmark(model_name: str, solvers: list[str], nfes: list[int], num_samples: int = 2000, seed: int = 0,
                  tables: dict[str, str] | None = None, schedule: ScheduleSpec | None = None, afs: bool = False,
                  rtol: float = 1e-7, batch: int = 1000, cache_dir: Path | None = Path(".cache/bench"),
                  progress: bool = True) -> dict:
    """Run every (solver, NFE) and every table on the same noise; see the module docstring."""
    from backends.analytic import load_digits_data, make_analytic  # the CLI composes solvers with a backend

    model = make_analytic(model_name)
    base = schedule or ScheduleSpec(kind="polynomial", num_steps=2, sigma_min=model.sigma_min,
                                    sigma_max=model.sigma_max, rho=7.0)
    loaded = {name: load_table(path) for name, path in (tables or {}).items()}
    for name, table in loaded.items():
        if abs(float(table.sigmas[0]) - base.sigma_max) > 1e-9 * base.sigma_max:
            raise ValueError(f"table {name} starts at sigma={table.sigmas[0]}, the benchmark at {base.sigma_max}")
    ends: list[float] = []
    for end in [float(base.sigma_min)] + [float(t.sigmas[-1]) for t in loaded.values()]:
        if all(abs(end - e) > 1e-9 * e for e in ends):  # grids reach sigma_min up to rounding
            ends.append(end)
    noise = seeded_noise(range(seed, seed + num_samples), model.shape, torch.float64)
    key = {"model": model_name, "seed": seed, "num_samples": num_samples, "sigma_max": base.sigma_max}
    t0 = time.perf_counter()
    states, ref_report = _reference(model, noise, base.sigma_max, ends, key, rtol, cache_dir)
    ref_report["seconds"] = round(time.perf_counter() - t0, 2)
    data, _ = load_digits_data()
    data = data.reshape(len(data), -1).numpy()
    ref_report["fd_to_data"] = {str(s): frechet_distance(states[s].reshape(num_samples, -1).numpy(), data) for s in ends}

    def measure(run: Any, sigma_end: float) -> dict:
        counter = EvalCounter(model, batch_size=1)
        outputs, start = [], time.perf_counter()
        for chunk in noise.split(batch):
            counter.batch_size = chunk.shape[0]
            calls, items = counter.calls, counter.items
            outputs.append(run(counter, chunk))
            seq, tot = counter.calls - calls, (counter.items - items) // chunk.shape[0]
        seconds = time.perf_counter() - start
        out = torch.cat(outputs)
        matches = [s for s in states if abs(s - sigma_end) <= 1e-9 * sigma_end]
        if not matches:
            raise KeyError(f"no reference state at sigma={sigma_end}")
        err = out - states[matches[0]]
        return {"rmse": float(err.pow(2).mean().sqrt()), "max_abs": float(err.abs().max()),
                "fd": frechet_distance(out.reshape(num_samples, -1).numpy(), data),
                "sequential_evals": seq, "total_evals": tot, "seconds": round(seconds, 3)}

    results = []
    jobs = [(s, n) for s in solvers for n in nfes]
    try:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(jobs) + len(loaded), disable=not progress, desc=f"bench {model_name}")
    except ImportError:  # pragma: no cover
        bar = None
    for solver_name, nfe in jobs:
        solver = get_solver(solver_name)
        steps, use_afs = steps_for_nfe(solver_name, nfe, afs=afs)
        sigmas = make_sigmas(ScheduleSpec(**{**base.to_dict(), "num_steps": steps + 1}))
        row = measure(lambda den, z: solver(den, z * sigmas[0], sigmas, afs=use_afs), float(sigmas[-1]))
        results.append({"solver": solver_name, "nfe": row["sequential_evals"], "afs": use_afs, "steps": steps, **row})
        if bar is not None:
            bar.update()
    for name, table in loaded.items():
        row = measure(lambda den, z: sample_epd(den, z * float(table.sigmas[0]), table), float(table.sigmas[-1]))
        results.append({"solver": name, "nfe": row["sequential_evals"], "afs": table.afs,
                        "steps": table.num_steps - 1, "table": table.source, **row})
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return {"model": model_name, "num_samples": num_samples, "seed": seed,
            "schedule": base.to_dict(), "reference": ref_report, "results": results,
            "machine": _machine()}


def _machine() -> dict:
    import os
    import platform

    return {"platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def markdown(report: dict) -> str:
    """Two markdown tables (RMSE to the exact endpoint, then FD to the data) with solvers as rows."""
    rows = sorted({r["solver"] for r in report["results"]}, key=lambda s: [r["solver"] for r in report["results"]].index(s))
    nfes = sorted({r["nfe"] for r in report["results"]})
    cell = {(r["solver"], r["nfe"]): r for r in report["results"]}
    lines = []
    for metric, title in (("rmse", "RMSE to the exact ODE endpoint"), ("fd", "Frechet distance to the data")):
        lines.append(f"**{report['model']}: {title}** ({report['num_samples']} samples, seed {report['seed']})\n")
        lines.append("| solver | " + " | ".join(f"NFE {n}" for n in nfes) + " |")
        lines.append("|---|" + "---|" * len(nfes))
        for solver in rows:
            vals = [f"{cell[(solver, n)][metric]:.4g}" if (solver, n) in cell else "" for n in nfes]
            lines.append(f"| {solver} | " + " | ".join(vals) + " |")
        lines.append("")
    ref = report["reference"]
    lines.append(f"Reference: {ref['method']}, rtol {ref['rtol']:.0e}; check against rtol {ref['check_rtol']:.0e}: "
                 f"max |diff| {ref['check_max_abs_diff']:.2e}, RMSE diff {ref['check_rmse_diff']:.2e}; "
                 f"FD(reference, data) = " + ", ".join(f"{float(v):.4g} at sigma {k}" for k, v in ref["fd_to_data"].items()))
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    by_solver: dict[str, list] = {}
    for r in report["results"]:
        by_solver.setdefault(r["solver"], []).append(r)
    for solver, rows in by_solver.items():
        rows = sorted(rows, key=lambda r: r["nfe"])
        style = "o-" if "table" not in rows[0] else "*"
        for ax, metric in zip(axes, ("rmse", "fd")):
            ax.plot([r["nfe"] for r in rows], [r[metric] for r in rows], style, label=solver, markersize=8 if style == "*" else 4)
    fd_floor = min(float(v) for v in report["reference"]["fd_to_data"].values())
    axes[1].axhline(fd_floor, color="grey", ls="--", lw=1, label="exact ODE")
    for ax, title in zip(axes, ("RMSE to exact endpoint", "Frechet distance to data")):
        ax.set_yscale("log")
        ax.set_xlabel("NFE (sequential evaluations)")
        ax.set_title(f"{report['model']}: {title}")
        ax.grid(alpha=0.3, which="both")
    axes[1].legend(fontsize=8, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _csv(text: str, cast: Any) -> list:
    return [cast(v) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m solvers.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gmm", choices=["gmm", "digits"])
    parser.add_argument("--solvers", default="ipndm,dpmpp3m,unipc,dpm2,heun,euler")
    parser.add_argument("--nfe", default="3,4,5,6,7,8,10")
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0, help="first noise seed (sample j uses seed S + j)")
    parser.add_argument("--table", action="append", default=[], metavar="NAME=PATH",
                        help="an EPD table to run at its own NFE and grid (repeatable)")
    parser.add_argument("--schedule", default="polynomial", choices=["polynomial", "logsnr", "time_uniform"])
    parser.add_argument("--rho", type=float, help="schedule rho (default 7 for polynomial, 1 for time_uniform)")
    parser.add_argument("--afs", action="store_true", help="one-evaluation solvers also use AFS (one more step)")
    parser.add_argument("--rtol", type=float, default=1e-7, help="reference tolerance (checked against rtol/100)")
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--json", type=Path, help="write the full report here")
    parser.add_argument("--plot", type=Path, help="PNG plot path (default: next to --json)")
    parser.add_argument("--no-cache", action="store_true")
    args = parser.parse_args(argv)
    tables = {}
    for item in args.table:
        name, sep, path = item.partition("=")
        if not sep:
            parser.error(f"--table expects NAME=PATH (got {item!r})")
        tables[name] = path
    from backends.analytic import make_analytic

    model = make_analytic(args.model)
    rho = args.rho if args.rho is not None else default_rho(args.schedule)
    schedule = ScheduleSpec(kind=args.schedule, num_steps=2, sigma_min=model.sigma_min, sigma_max=model.sigma_max, rho=rho)
    report = run_benchmark(args.model, _csv(args.solvers, str), _csv(args.nfe, int), args.num_samples, args.seed,
                           tables, schedule, args.afs, args.rtol, args.batch,
                           None if args.no_cache else Path(".cache/bench"))
    print(markdown(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(args.json)
        print(f"wrote {args.json}")
    plot_path = args.plot or (args.json.with_suffix(".png") if args.json else None)
    if plot_path:
        plot(report, plot_path)
        print(f"wrote {plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
