"""Exact-reference benchmark of ODE solvers on the embedded analytic models (and the embedded digits network).

    python -m bench.exact --model gmm --solvers ipndm,dpmpp3m,unipc,dpm2,heun,euler         --nfe 3,4,5,6,7,8,10 --num-samples 2000 --json OUT.json [--table NAME=PATH ...] [--seed S]         [--schedule KIND [--rho R] | --schedules polynomial,logsnr,time_uniform]
    python -m bench.exact --model digits_edm [--model-path FILE] [--device cuda] [--ref-steps 256] ...

For every solver and NFE (the papers' parallel-NFE convention: sequential evaluations), it integrates the
same noise as the reference, a float64 adaptive solve whose own accuracy is checked and reported, and
measures the RMSE to that exact endpoint, the Frechet distance to the data set in data space, the sequential
and total evaluations actually made, and wall time. It prints a markdown table and writes a JSON file and a
PNG plot of error vs NFE. References are cached under ``.cache/bench`` (keyed by every input; the reference
does not depend on the schedule, only on the sigma where the grids end).

Schedules: ``--schedule KIND`` (default polynomial) runs every baseline on one grid kind, with ``--rho``
(default :func:`solvers.schedules.default_rho`). ``--schedules A,B,...`` runs every baseline at every NFE on
every listed kind (each with its default rho; ``--rho`` is refused there) and overrides ``--schedule``. Each
(solver, NFE) is then summarised by its best schedule, the one with the lowest RMSE (ties: the first listed),
so learned tables are compared against each baseline on its best schedule. EPD tables (``--table``) always run
on their own grid, at their own NFE.

JSON report keys: ``model``, ``num_samples``, ``seed``, ``schedule`` (the first schedule's full spec, as
before), ``schedules`` (every schedule's full spec), ``reference``, ``machine``, and

* ``results``: every row run, for every schedule: ``solver``, ``nfe`` (sequential evaluations), ``afs``,
  ``steps``, ``schedule`` (``{"kind", "rho"}``; a table's own schedule from its metadata, or null),
  ``best`` (true on the row kept for its (solver, NFE): the lowest RMSE over schedules; always true for a
  table), ``rmse``, ``max_abs``, ``fd``, ``sequential_evals``, ``total_evals``, ``seconds``; table rows also
  carry ``table`` (the file).
* ``summary``: ``best_baseline``, a list with, per baseline NFE, the best handcrafted row
  ``{"nfe", "solver", "schedule", "rmse"}``; and ``tables``, per table name,
  ``{"nfe", "total_evals", "rmse", "best_baseline_same_nfe", "best_baseline_same_total"}``, where each
  ``best_baseline_*`` is ``{"nfe", "solver", "schedule", "rmse", "ratio"}`` (``ratio`` = table RMSE / that
  baseline's RMSE, below 1 when the table wins) or null when no baseline ran at that NFE. "Same total" is the
  baseline at NFE = the table's total evaluations (its K parallel points counted one by one): the error at
  equal total evaluations.

``--model digits_edm`` benchmarks the trained digits network (:mod:`backends.digits_edm`, 16x16, unconditional:
label -1), where no exact solution exists: the reference is a fine fixed-step solve on the same network
(``--ref-solver``, default DPM-Solver++(3M), with ``--ref-steps`` steps on the logSNR grid, float64 state),
checked against the same solve with half the steps (``check_*`` in the report, as for the adaptive reference);
FD is to the 1797 digits at 16x16. Network runs use ``--device`` (default CUDA when available).

The markdown shows the best-schedule value per solver and NFE, tagged with the schedule (``poly``, ``logsnr``,
``uni``) when several were run, a "best handcrafted at NFE n" line per NFE and one comparison line per table."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from backends.registry import check_table_backend
from safeio.cli import ArgumentParser, entry_point
from solvers.core import seeded_noise
from solvers.evaluate import (CONVERGED_SHARE, REF_SOLVER, REF_STEPS, baseline_jobs, baseline_rows, best_rows,
                              cached_states, fine_reference, reference_converged,
                              same_sigma, summarize, table_row, unique_sigmas)
from solvers.frechet import sample_frechet_distance
from solvers.reference import reference_solution
from solvers.registry import get_solver
from solvers.schedules import ScheduleSpec, default_rho
from solvers.table import load_table

__all__ = ["run_benchmark", "bench_model", "bench_schedules", "markdown", "plot", "main", "BENCH_MODELS",
           "BENCH_SCHEDULES", "NETWORK_MODELS"]

BENCH_SCHEDULES = ("polynomial", "logsnr", "time_uniform", "discrete")
BENCH_MODELS = ("gmm", "digits", "digits_edm", "digits_ddpm")
NETWORK_MODELS = ("digits_edm", "digits_ddpm")
SCHEDULE_TAGS = {"polynomial": "poly", "logsnr": "logsnr", "time_uniform": "uni", "discrete": "disc"}


def _reference(model: Any, noise: torch.Tensor, sigma_max: float, ends: list[float], key: dict,
               rtol: float, cache_dir: Path | None) -> tuple[dict, dict]:
    digest = hashlib.sha256(json.dumps({**key, "rtol": rtol, "ends": sorted(ends)}, sort_keys=True).encode()).hexdigest()[:16]

    def compute() -> tuple[dict, dict]:
        report = reference_solution(model, noise.double() * sigma_max, sigma_max, ends, rtol=rtol)
        return report.states, report.as_dict()

    return cached_states(None if cache_dir is None else cache_dir / f"reference-{digest}.pt", compute)


def _network_reference(model: Any, noise: torch.Tensor, sigma_max: float, ends: list[float], key: dict,
                       solver: str, steps: int, batch: int, cache_dir: Path | None) -> tuple[dict, dict]:
    key = {**key, "network": model.describe(), "solver": solver, "steps": steps, "ends": sorted(ends)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return cached_states(None if cache_dir is None else cache_dir / f"reference-{digest}.pt",
                         lambda: fine_reference(model, noise, sigma_max, ends, solver, steps, batch, flow=model.flow))


def bench_model(name: str, **options: Any) -> tuple[Any, np.ndarray | None]:
    """The model and its data set as rows ``[n, D]`` (float64) for the Frechet distance: the analytic models,
    the digits networks (``model_path``/``device`` options), or any backend by registered name or
    ``package.module:factory`` with its loader options (no data set: the distance is not measured)."""
    options = {k: v for k, v in options.items() if v is not None}
    if name not in BENCH_MODELS:
        from backends import load_backend

        model = load_backend(name, **options)
        if model.prediction_type != "exact" and torch.device(model.device).type == "cuda":
            torch.backends.cudnn.allow_tf32 = False       # as below: the reference must be a float32 solve
            torch.backends.cuda.matmul.allow_tf32 = False
        return model, None
    if name in NETWORK_MODELS:
        from backends.digits_edm import digits_images, load_digits_ddpm, load_digits_edm

        loader = load_digits_ddpm if name == "digits_ddpm" else load_digits_edm
        model = loader(options.get("model_path"), device=options.get("device"), dtype="float32")
        if torch.device(model.device).type == "cuda":
            # The reference must be a float32 solve: TF32 convolutions (cuDNN's default) perturb every
            # evaluation by ~1e-3 relative, which the fine solve would report as non-convergence.
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        images, _ = digits_images(int(model.shape[-1]))
        return model, images.reshape(len(images), -1).double().numpy()
    from backends.analytic import load_digits_data, make_analytic

    data, _ = load_digits_data()
    return make_analytic(name), data.reshape(len(data), -1).numpy()


def bench_schedules(kinds: list[str], sigma_min: float, sigma_max: float, rho: float | None = None) -> list[ScheduleSpec]:
    """One spec per kind on the model's range; ``rho`` (single kind only) overrides ``default_rho(kind)``."""
    if rho is not None and len(kinds) != 1:
        raise ValueError("rho can only be set for a single schedule (each of several uses its default_rho)")
    return [ScheduleSpec(kind=kind, num_steps=2, sigma_min=sigma_min, sigma_max=sigma_max,
                         rho=default_rho(kind) if rho is None else rho) for kind in kinds]


def run_benchmark(model_name: str, solvers: list[str], nfes: list[int], num_samples: int = 2000, seed: int = 0,
                  tables: dict[str, str] | None = None, schedule: ScheduleSpec | None = None, afs: bool = False,
                  rtol: float = 1e-7, batch: int = 1000, cache_dir: Path | None = Path(".cache/bench"),
                  progress: bool = True, schedules: list[ScheduleSpec] | None = None,
                  model_options: dict | None = None, ref_solver: str = REF_SOLVER, ref_steps: int = REF_STEPS,
                  model: Any = None) -> dict:
    """Run every (solver, NFE, schedule) and every table on the same noise; see the module docstring.

    ``schedules`` (several grids, each baseline run on all) replaces ``schedule`` (one grid); with neither, the
    polynomial grid with rho 7 on the model's range. ``model_options`` (``model_path``, ``device``),
    ``ref_solver`` and ``ref_steps`` apply to every model without an exact solution. ``model``: the already
    loaded ``bench_model(model_name, **model_options)``, reused instead of loading it again.
    """
    model, data = model if model is not None else bench_model(model_name, **(model_options or {}))
    network = model.prediction_type != "exact"     # no exact solution: a fine fixed-step reference
    place = model.device if network else torch.device("cpu")
    if schedule is not None and schedules:
        raise ValueError("give either schedule or schedules, not both")
    specs = list(schedules) if schedules else [schedule or bench_schedules(["polynomial"], model.sigma_min, model.sigma_max)[0]]
    base = specs[0]
    for spec in specs:
        if not same_sigma(float(spec.sigma_max), float(base.sigma_max)):
            raise ValueError(f"schedule {spec.kind} starts at sigma={spec.sigma_max}, the benchmark at {base.sigma_max}")
    loaded = {name: load_table(path) for name, path in (tables or {}).items()}
    for name, table in loaded.items():
        if name in solvers:
            raise ValueError(f"table name {name!r} is also a baseline solver name; rename the table")
        if abs(float(table.sigmas[0]) - base.sigma_max) > 1e-9 * base.sigma_max:
            raise ValueError(f"table {name} starts at sigma={table.sigmas[0]}, the benchmark at {base.sigma_max}")
    if any(spec.kind == "discrete" for spec in specs) and model.alphas_cumprod is None:
        raise ValueError(f"the discrete grid needs a discrete-time model; {model_name} has no alphas_cumprod")
    jobs = baseline_jobs(solvers, nfes, specs, afs, model.alphas_cumprod)
    # Every grid ends at the schedules' sigma_min up to rounding: the nominal ends come first, so the reference
    # (and its cache key) stays the same; an end that really differs gets its own reference state.
    ends = unique_sigmas([float(spec.sigma_min) for spec in specs] + [float(job.sigmas[-1]) for job in jobs]
                          + [float(t.sigmas[-1]) for t in loaded.values()])
    noise = seeded_noise(range(seed, seed + num_samples), model.shape, torch.float64, device=place)
    key = {"model": model_name, "seed": seed, "num_samples": num_samples, "sigma_max": base.sigma_max}
    t0 = time.perf_counter()
    if network:
        states, ref_report = _network_reference(model, noise, base.sigma_max, ends, key, ref_solver, ref_steps,
                                                batch, cache_dir)
    else:
        states, ref_report = _reference(model, noise, base.sigma_max, ends, key, rtol, cache_dir)
    ref_report["seconds"] = round(time.perf_counter() - t0, 2)
    ref_report["fd_to_data"] = None if data is None else {
        str(s): sample_frechet_distance(states[s].reshape(num_samples, -1).numpy(), data) for s in ends}

    bar = tqdm(total=len(jobs) + len(loaded), disable=not progress, desc=f"bench {model_name}")
    results = baseline_rows(model, noise, states, jobs, batch=batch, data=data, flow=model.flow,
                            on_row=lambda _: bar.update())
    results += [table_row(model, noise, states, name, table, batch=batch, data=data, flow=model.flow,
                          on_row=lambda _: bar.update())
                for name, table in loaded.items()]
    bar.close()
    for row in best_rows(results):
        row["best"] = True
    if network:
        smallest = min(row["rmse"] for row in results) if results else float("inf")
        ref_report["converged"] = reference_converged(ref_report["check_rmse_diff"], smallest)
        ref_report["network"] = model.describe()
    return {"model": model_name, "num_samples": num_samples, "seed": seed,
            "schedule": base.to_dict(), "schedules": [spec.to_dict() for spec in specs], "reference": ref_report,
            "results": results, "summary": summarize(results), "machine": _machine()}


def _machine() -> dict:
    import os
    import platform

    return {"platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def _baseline_schedules(results: list[dict]) -> set[tuple]:
    """The (kind, rho) pairs the baselines ran on."""
    return {(s["kind"], s["rho"]) for r in results if "table" not in r and (s := r.get("schedule"))}


def _schedule_tagger(results: list[dict]) -> Callable[[dict], str]:
    """``row -> " (poly)"`` etc. when baselines ran on several schedules (rho added if a kind repeats), else ``""``."""
    labels = _baseline_schedules(results)
    if len(labels) < 2:
        return lambda row: ""
    with_rho = len({kind for kind, _ in labels}) < len(labels)

    def tag(row: dict) -> str:
        spec = row.get("schedule")
        if "table" in row or not spec:
            return ""
        name = SCHEDULE_TAGS.get(spec["kind"], spec["kind"])
        return f" ({name}, rho {spec['rho']:g})" if with_rho else f" ({name})"

    return tag


def _comparison_lines(summary: dict, tag: Callable[[dict], str]) -> list[str]:
    def vs(entry: dict | None) -> str:
        if entry is None:
            return "not run"
        ratio = "" if entry.get("ratio") is None else f", ratio {entry['ratio']:.3g}"
        return f"{entry['solver']} {entry['rmse']:.4g}{tag(entry)}{ratio}"

    lines = [f"- best handcrafted at NFE {e['nfe']}: {vs(e)}" for e in summary["best_baseline"]]
    for name, t in summary["tables"].items():
        lines.append(f"- table {name} (NFE {t['nfe']}, {t['total_evals']} total evaluations): RMSE {t['rmse']:.4g}; "
                     f"best handcrafted at NFE {t['nfe']}: {vs(t['best_baseline_same_nfe'])}; "
                     f"at equal total evaluations (NFE {t['total_evals']}): {vs(t['best_baseline_same_total'])}")
    if summary["tables"]:
        lines.append("(ratio = table RMSE / handcrafted RMSE; below 1, the table is better)")
    return lines + [""]


def markdown(report: dict) -> str:
    """Two markdown tables (RMSE to the exact endpoint, then FD to the data) with solvers as rows, each cell the
    solver's best schedule at that NFE (tagged when several were run), then the best-handcrafted comparisons."""
    results = report["results"]
    kept = best_rows(results)
    tag = _schedule_tagger(results)
    solvers = list(dict.fromkeys(r["solver"] for r in results))
    nfes = sorted({r["nfe"] for r in kept})
    cell = {(r["solver"], r["nfe"]): r for r in kept}
    note = "; best schedule per solver and NFE, by RMSE" if len(_baseline_schedules(results)) > 1 else ""
    lines = []
    exact = "steps" not in report["reference"]   # network models have a fine-solve reference, not an exact one
    endpoint = "RMSE to the exact ODE endpoint" if exact else "RMSE to the reference ODE endpoint (fine solve)"
    measured_fd = report["reference"].get("fd_to_data") is not None
    for metric, title in (("rmse", endpoint), ("fd", "Frechet distance to the data"))[:2 if measured_fd else 1]:
        lines.append(f"**{report['model']}: {title}** ({report['num_samples']} samples, seed {report['seed']}{note})\n")
        lines.append("| solver | " + " | ".join(f"NFE {n}" for n in nfes) + " |")
        lines.append("|---|" + "---|" * len(nfes))
        for solver in solvers:
            vals = [f"{cell[(solver, n)][metric]:.4g}{tag(cell[(solver, n)])}" if (solver, n) in cell else "" for n in nfes]
            lines.append(f"| {solver} | " + " | ".join(vals) + " |")
        lines.append("")
    lines += _comparison_lines(summarize(results), tag)
    ref = report["reference"]
    if "steps" in ref:   # a network model: fine fixed-step reference
        lines.append(f"Reference: {ref['method']}; check against {ref['check_steps']} steps: max |diff| "
                     f"{ref['check_max_abs_diff']:.2e}, RMSE diff {ref['check_rmse_diff']:.2e}"
                     f"{' (below' if ref.get('converged', True) else ' (NOT below'} {CONVERGED_SHARE:.0%} of the smallest RMSE"
                     f"{')' if ref.get('converged', True) else ': not converged)'}; "
                     + _fd_note(ref))
        return "\n".join(lines)
    lines.append(f"Reference: {ref['method']}, rtol {ref['rtol']:.0e}; check against rtol {ref['check_rtol']:.0e}: "
                 f"max |diff| {ref['check_max_abs_diff']:.2e}, RMSE diff {ref['check_rmse_diff']:.2e}; "
                 + _fd_note(ref))
    return "\n".join(lines)


def _fd_note(ref: dict) -> str:
    if ref.get("fd_to_data") is None:
        return "no data set, so no Frechet distance"
    return "FD(reference, data) = " + ", ".join(f"{float(v):.4g} at sigma {k}" for k, v in ref["fd_to_data"].items())


def plot(report: dict, path: Path) -> None:
    """Error vs NFE: baselines at their best schedule per NFE (lines), tables as stars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_fd = report["reference"].get("fd_to_data") is not None
    fig, axes = plt.subplots(1, 2 if with_fd else 1, figsize=(11 if with_fd else 5.6, 4.2), squeeze=False)
    axes = list(axes[0])
    by_solver: dict[str, list] = {}
    for r in best_rows(report["results"]):
        by_solver.setdefault(r["solver"], []).append(r)
    for solver, rows in by_solver.items():
        rows = sorted(rows, key=lambda r: r["nfe"])
        style = "o-" if "table" not in rows[0] else "*"
        for ax, metric in zip(axes, ("rmse", "fd")):
            ax.plot([r["nfe"] for r in rows], [r[metric] for r in rows], style, label=solver, markersize=8 if style == "*" else 4)
    exact = "steps" not in report["reference"]
    if with_fd:
        fd_floor = min(float(v) for v in report["reference"]["fd_to_data"].values())
        axes[1].axhline(fd_floor, color="grey", ls="--", lw=1, label="exact ODE" if exact else "reference ODE")
    several = len(_baseline_schedules(report["results"])) > 1
    for ax, title in zip(axes, ("RMSE to exact endpoint" if exact else "RMSE to reference endpoint",
                                "Frechet distance to data")):
        ax.set_yscale("log")
        ax.set_xlabel("NFE (sequential evaluations)")
        ax.set_title(f"{report['model']}: {title}" + (" (best schedule)" if several else ""))
        ax.grid(alpha=0.3, which="both")
    axes[-1].legend(fontsize=8, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _csv(text: str, cast: Any) -> list:
    return [cast(v.strip()) for v in text.split(",") if v.strip()]


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m bench.exact", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gmm",
                        help=f"{', '.join(BENCH_MODELS)} (with their data sets), any registered backend, or your "
                             "own as package.module:factory (docs/backends/own_model.md)")
    parser.add_argument("--model-path", help="network models: the weights (digits networks: default the committed one)")
    parser.add_argument("--device", help="network models: cuda or cpu (default: cuda when available)")
    parser.add_argument("--backend-config", help="JSON object of further loader options for --model")
    parser.add_argument("--ref-solver", default=REF_SOLVER, help="network models: the fine reference solver")
    parser.add_argument("--ref-steps", type=int, default=REF_STEPS,
                        help="network models: steps of the fine reference (checked against half as many)")
    parser.add_argument("--solvers", default="ipndm,dpmpp3m,unipc,dpm2,heun,euler")
    parser.add_argument("--nfe", default="3,4,5,6,7,8,10")
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0, help="first noise seed (sample j uses seed S + j)")
    parser.add_argument("--table", action="append", default=[], metavar="NAME=PATH",
                        help="an EPD table to run at its own NFE and grid (repeatable)")
    parser.add_argument("--force-backend", action="store_true",
                        help="benchmark a --table fitted for another model on --model anyway")
    parser.add_argument("--schedule", default="polynomial", choices=list(BENCH_SCHEDULES))
    parser.add_argument("--schedules", metavar="KIND,KIND,...",
                        help="run every baseline on each of these schedules and keep the best per solver and NFE "
                             f"(any of {','.join(BENCH_SCHEDULES)}; overrides --schedule; each uses its default rho)")
    parser.add_argument("--rho", type=float, help="schedule rho (default 7 for polynomial, 1 otherwise; single schedule only)")
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
    kinds = list(dict.fromkeys(_csv(args.schedules, str))) if args.schedules is not None else [args.schedule]
    unknown = [k for k in kinds if k not in BENCH_SCHEDULES]
    if unknown or not kinds:
        parser.error(f"--schedules takes a comma list of {', '.join(BENCH_SCHEDULES)} (got {args.schedules!r})")
    if args.rho is not None and len(kinds) > 1:
        parser.error("--rho applies to a single schedule; with --schedules each kind uses its default rho")
    try:
        nfes, batch = _csv(args.nfe, int), int(args.batch)
    except ValueError:
        parser.error(f"--nfe takes a comma list of integers (got {args.nfe!r})")
    if not nfes or min(nfes) < 1 or batch < 1 or args.num_samples < 1:
        parser.error("--nfe values, --batch and --num-samples must be >= 1")
    for name in _csv(args.solvers, str):
        try:
            get_solver(name)
        except (KeyError, ValueError) as err:
            parser.error(f"--solvers: {err.args[0]}")
    for name, path in tables.items():
        warning = check_table_backend(load_table(path).metadata.get("backend"), args.model, f"--table {name}={path}",
                                      force=args.force_backend)
        if warning:
            print(warning, file=sys.stderr)
    options = {"model_path": args.model_path, "device": args.device}
    if args.backend_config:
        try:
            extra = json.loads(args.backend_config)
        except json.JSONDecodeError as err:
            parser.error(f"--backend-config is not valid JSON: {err}")
        if not isinstance(extra, dict):
            parser.error("--backend-config must be a JSON object")
        options.update(extra)
    if args.model in ("gmm", "digits") and any(v is not None for v in options.values()):
        parser.error("--model-path, --device and --backend-config apply to network models, not the analytic ones")
    loaded = bench_model(args.model, **options)
    model = loaded[0]
    if "discrete" in kinds and model.alphas_cumprod is None:
        parser.error(f"--schedules discrete needs a discrete-time model (its alphas_cumprod); {args.model} has none")
    specs = bench_schedules(kinds, model.sigma_min, model.sigma_max, args.rho)
    report = run_benchmark(args.model, _csv(args.solvers, str), _csv(args.nfe, int), args.num_samples, args.seed,
                           tables, None, args.afs, args.rtol, args.batch,
                           None if args.no_cache else Path(".cache/bench"), schedules=specs, model_options=options,
                           ref_solver=args.ref_solver, ref_steps=args.ref_steps, model=loaded)
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
