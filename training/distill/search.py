"""Recipe search for Stage 1 (docs/distill/recipe.md): short runs of a few recipes, the best one on the held-out
validation trajectories trained to the full budget.

Candidates are the product of ``search.schedules`` (grid kind and rho; ``auto``: time-uniform, polynomial rho 7,
logSNR, and the model's discrete grid when it has one, or its flow-matching grid), ``search.loss_steps`` (the loss
on every step or on the last one), ``search.scales`` (half-width of the direction and time scales) and
``search.lr``; everything else is the config's. AFS is not searched: at a given grid size it changes the NFE by
one, so it is fixed by the NFE asked for. Each candidate is an ordinary run of ``search.kimg`` thousand
trajectories (``auto``: ``total_kimg / (2 x candidates)``, so all of them together cost half a full run), scored
by its best validation RMSE. Candidates of one grid share the teacher cache, and the winner's full run starts
with the trajectories its short run cached; every run shares one validation reference.

The search folder holds ``config.yaml``, ``candidates/<nn>-<label>/`` (short runs), ``final/`` (the chosen recipe,
full budget), ``search.json`` (every candidate's score and time, the choice, the final comparison), ``search.png``
and ``table.pkl``/``table.json``. A killed search resumes with ``--resume <folder>``: finished runs are kept,
an interrupted one continues from its checkpoint. With ``search.keep_existing``, an ``export`` file that already
exists and scores better on the same validation trajectories is kept, and ``search.json`` says so, with the kept table's own comparison (``existing-comparison.json``).
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from solvers.evaluate import same_sigma
from solvers.schedules import default_rho
from solvers.table import PredictorTable, load_table, save_table
from safeio import atomic_text

from .config import validate
from .trainer import Distiller
from .validation import candidate_schedules, comparison_lines

__all__ = ["Candidate", "search_candidates", "run_search"]


@dataclass(frozen=True)
class Candidate:
    """One recipe: a label for folders and plots and the config overrides (dotted keys) that make it."""

    label: str
    overrides: dict


def search_candidates(config: DictConfig, backend: Any) -> list[Candidate]:
    """The search's recipes for ``backend`` (module docstring), in a fixed order."""
    search = config.search
    sched = config.schedule
    specs = candidate_schedules(list(search.schedules), 1.0, 2.0,   # the range is the config's, not set here
                                discrete=backend.alphas_cumprod is not None, flow=backend.flow)
    out = []
    for spec, steps, scale, lr in itertools.product(specs, list(search.loss_steps), list(search.scales),
                                                    list(search.lr)):
        grid = {"kind": spec.kind, "rho": spec.rho}
        shown_rho = spec.kind == "polynomial" or (spec.kind != "discrete" and spec.rho != default_rho(spec.kind))
        label = f"{spec.kind}{f'{spec.rho:g}' if shown_rho else ''}-{steps}"
        if len(search.scales) > 1:
            label += f"-s{float(scale):g}"
        if len(search.lr) > 1:
            label += f"-lr{float(lr):g}"
        overrides = {"schedule.kind": grid["kind"], "schedule.rho": float(grid["rho"]), "loss.steps": steps,
                     "student.scale_dir": float(scale), "student.scale_time": float(scale), "optim.lr": float(lr)}
        if spec.kind in ("discrete", "flowmatch") and sched.kind != spec.kind:
            overrides["schedule.variant"] = "correct"
        out.append(Candidate(label, overrides))
    return out


def _sub_config(config: DictConfig, overrides: dict, **settings: Any) -> DictConfig:
    sub = config.copy()
    for key, value in {**overrides, **settings}.items():
        OmegaConf.update(sub, key, value, merge=False)
    validate(sub)
    return sub


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _run(config: DictConfig, folder: Path, backend: Any, owned: bool, progress: bool) -> tuple[PredictorTable, dict, float]:
    """One ordinary run in ``folder`` (resumed when it has a checkpoint); returns (table, summary, seconds)."""
    folder.mkdir(parents=True, exist_ok=True)
    done = _read(folder / "summary.json")
    if done is not None and (folder / "table.pkl").is_file():
        return load_table(folder / "table.pkl"), done, float(done.get("wall_seconds") or 0.0)
    atomic_text(folder / "config.yaml", OmegaConf.to_yaml(config))
    start = time.perf_counter()
    distiller = Distiller(config, folder, backend=backend, progress=progress, backend_from_config=owned)
    table = distiller.run()
    seconds = time.perf_counter() - start
    summary = _read(folder / "summary.json") or {}
    summary["wall_seconds"] = round(seconds, 3)
    atomic_text(folder / "summary.json", json.dumps(summary, indent=1))
    return table, summary, seconds


def _score_existing(final: Distiller, path: Path) -> dict:
    """The validation RMSE of an already exported table (the one a search may replace), or why it has none."""
    try:
        existing = load_table(path)
    except Exception as err:   # an unreadable file is not kept
        return {"path": str(path), "error": f"unreadable: {err}"}
    if not same_sigma(float(existing.sigmas[0]), float(final.sigmas[0])):
        return {"path": str(path), "error": "starts at another sigma_max"}
    if existing.eval_count().sequential != final.table_eval_count().sequential:
        return {"path": str(path), "error": "another NFE"}
    validation = final.validation_set(float(existing.sigmas[-1]))
    assert validation is not None
    return {"path": str(path), "val_rmse": validation.rmse(final.backend, existing)}


def run_search(config: DictConfig, folder: str | Path, *, backend: Any = None,
               progress: bool = True) -> tuple[PredictorTable, Path]:
    """Run (or resume) the recipe search of ``config`` in ``folder``; returns the kept table and the folder."""
    folder = Path(folder)
    owned = backend is None
    if owned:
        backend = Distiller.load_config_backend(config)
    candidates = search_candidates(config, backend)
    kimg = config.search.kimg
    if kimg == "auto":
        kimg = float(config.total_kimg) / (2 * len(candidates))
    kimg = max(float(kimg), int(config.batch) / 1000)   # at least one batch
    state_path = folder / "search.json"
    state = {"name": config.name, "kimg": kimg, "total_kimg": float(config.total_kimg), "candidates": [],
             "chosen": None, "final": None}
    start = time.perf_counter()
    bar = tqdm(candidates, desc=f"search {config.name}", unit="recipe", disable=not progress)
    for index, candidate in enumerate(bar):
        sub = _sub_config(config, candidate.overrides, total_kimg=kimg, export=None, name=f"{config.name}-{candidate.label}",
                          **{"compare.enabled": False, "search.enabled": False, "plot": False})
        _, summary, seconds = _run(sub, folder / "candidates" / f"{index:02d}-{candidate.label}", backend, owned,
                                   progress=False)
        score = (summary.get("validation") or {}).get("best_rmse")
        state["candidates"].append({"label": candidate.label, "overrides": candidate.overrides, "val_rmse": score,
                                    "seconds": round(seconds, 3), "teacher_seconds": summary.get("teacher_seconds")})
        atomic_text(state_path, json.dumps(state, indent=1))
        bar.set_postfix(last=f"{candidate.label} {score if score is None else round(score, 5)}")
    bar.close()
    ranked = [c for c in state["candidates"] if c["val_rmse"] is not None]
    if not ranked:
        raise ValueError(f"recipe search {config.name}: no candidate reached a finite validation error "
                         f"(see {folder / 'candidates'})")
    chosen = min(ranked, key=lambda c: c["val_rmse"])
    state["chosen"] = chosen["label"]
    search_seconds = time.perf_counter() - start
    tqdm.write(f"search {config.name}: chose {chosen['label']} (validation RMSE {chosen['val_rmse']:.4g} after "
               f"{kimg:g} kimg) among {len(ranked)} recipes in {search_seconds:.0f} s; training it to "
               f"{float(config.total_kimg):g} kimg")
    final_config = _sub_config(config, chosen["overrides"], export=None, **{"search.enabled": False})
    final_start = time.perf_counter()
    table, summary, _ = _run(final_config, folder / "final", backend, owned, progress)
    final_seconds = time.perf_counter() - final_start
    comparison = summary.get("comparison") or {}
    state["final"] = {"val_rmse": (summary.get("validation") or {}).get("best_rmse"), "seconds": round(final_seconds, 3),
                      "best_baseline_same_nfe": comparison.get("best_baseline_same_nfe"),
                      "best_baseline_same_total": comparison.get("best_baseline_same_total"),
                      "verdict": summary.get("verdict")}
    kept, export = "search", config.export
    if export and Path(export).is_file() and config.search.keep_existing:
        final = Distiller(final_config, folder / "final", backend=backend, progress=False, backend_from_config=owned)
        state["existing"] = _score_existing(final, Path(export))
        old = state["existing"].get("val_rmse")
        if old is not None and state["final"]["val_rmse"] is not None and old <= state["final"]["val_rmse"]:
            kept, table = "existing", load_table(export)
            comparison = final.compare(table)   # the kept table, too, says whether it beats the handcrafted solvers
            if comparison is not None:
                atomic_text(folder / "existing-comparison.json", json.dumps(comparison, indent=1))
                state["existing"]["verdict"] = comparison_lines(comparison)
    state["kept"] = kept
    total = time.perf_counter() - start
    state["seconds"] = {"total": round(total, 3), "candidates": round(search_seconds, 3),
                        "final": round(final_seconds, 3),
                        "total_over_final": round(total / final_seconds, 3) if final_seconds > 0 else None}
    save_table(table, folder / "table.pkl")
    save_table(table, folder / "table.json")
    if export and kept == "search":
        save_table(table, export)
    atomic_text(state_path, json.dumps(state, indent=1))
    from .plot import plot_search

    plot_search(state, folder / "search.png")
    if kept == "existing":
        tqdm.write(f"search {config.name}: the existing {export} scores {state['existing']['val_rmse']:.4g} on "
                   f"validation, the search's table {state['final']['val_rmse']:.4g}: kept the existing one")
        for line in state["existing"].get("verdict") or []:
            tqdm.write(f"search {config.name}, kept table: {line}")
    return table, folder
