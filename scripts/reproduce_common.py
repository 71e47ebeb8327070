"""What the paper-reproduction scripts share: a cell's solver label and NFE, the in-process sampling of a cell
under torchrun, the rank-0 check that every seed's image and sidecar belong to the cell, and the report lines.

Used by ``scripts/reproduce_iccv.py`` (FID table) and ``scripts/reproduce_tpami.py`` (reward tables); the
sidecars are the JSON files ``sample.py`` writes beside each PNG (docs/reproduce_iccv.md, docs/reproduce_tpami.md).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import sample  # noqa: E402
from backends.distributed import join_process_group, leave_process_group  # noqa: E402
from safeio import atomic_write  # noqa: E402
from solvers.registry import eval_count, get_solver  # noqa: E402
from solvers.table import PredictorTable, TableError, UnsafePickleError  # noqa: E402

__all__ = ["ROOT", "solver_label", "evaluation_counts", "SolverCell", "model_device_flags", "find_tables_dir",
           "image_path", "list_arg", "write_json", "sample_cell", "check_sidecars", "stamp_result", "images_record",
           "versus_paper", "run_cells"]


def solver_label(table: PredictorTable | None, solver: str | None) -> str:
    """The solver label ``sample.py`` writes into a sidecar: ``epd``/``epd_plugin`` for a table, else the
    registry's canonical name of ``solver``."""
    if table is not None:
        return "epd" if table.solver == "epd" else "epd_plugin"
    return get_solver(solver).name


def evaluation_counts(table: PredictorTable | None, solver: str | None, steps: int,
                      afs: bool = False) -> tuple[int, int]:
    """``(sequential, total)`` network evaluations per image, from the table's or the registry solver's own
    accounting on a grid of ``steps + 1`` points without a terminal zero."""
    if table is not None:
        c = table.eval_count()
    else:
        c = eval_count(solver, np.ones(steps + 1), afs=afs)
    return c.sequential, c.total


class SolverCell:
    """What a cell with a ``table`` (or a registry ``solver`` at ``steps``, ``afs`` where it has one) says about
    itself; mixed into the scripts' ``Cell`` dataclasses."""

    table: PredictorTable | None
    solver: str | None
    steps: int

    @property
    def label(self) -> str:
        """The solver label sample.py writes into the sidecars."""
        return solver_label(self.table, self.solver)

    def counts(self) -> tuple[int, int]:
        """(sequential, total) evaluations per image, from the solvers' own accounting."""
        return evaluation_counts(self.table, self.solver, self.steps, bool(getattr(self, "afs", False)))


def model_device_flags(model_path: str | None, device: str | None) -> list[str]:
    """``--model_path`` and ``--device`` for sample.py, each only when given."""
    return (["--model_path", model_path] if model_path else []) + (["--device", device] if device else [])


def find_tables_dir(env: str, name: str) -> Path | None:
    """``$env``, else the first of ``<repo>/exps/<name>`` and ``<repo>/../shared/official/<name>`` that exists."""
    value = os.environ.get(env)
    if value:
        return Path(value)
    for candidate in (ROOT / "exps" / name, ROOT.parent / "shared" / "official" / name):
        if candidate.is_dir():
            return candidate
    return None


def image_path(images: Path, seed: int) -> Path:
    """Where sample.py writes a seed's image (per-1000 sub-folders)."""
    return images / f"{seed - seed % 1000:06d}" / f"{seed:06d}.png"


def list_arg(value: str, everything: Sequence[str], what: str, allowed: Iterable[str] | None = None) -> list[str]:
    """A ``--what`` comma list (``all``: ``everything``); with ``allowed``, every item must be one of them."""
    items = list(everything) if value == "all" else [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise ValueError(f"empty --{what}")
    if allowed is not None:
        allowed = list(allowed)
        unknown = [v for v in items if v not in allowed]
        if unknown:
            raise ValueError(f"--{what} {unknown[0]!r}: choose from {', '.join(allowed)} (a comma list, or all)")
    return items


def write_json(path: Path, data: Any) -> None:
    """``data`` as indented JSON, written atomically."""
    atomic_write(path, (json.dumps(data, indent=1, default=str) + "\n").encode())


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def sample_cell(argv: list[str], where: str, images: Path, seeds: Iterable[int], rank: int, world: int,
                device: Any, header: str, free_memory: bool = False) -> tuple[int, float]:
    """Sample a cell in this process (every rank its round-robin share through ``sample.prepare`` /
    ``sample.write_samples``; seeds with a PNG and sidecar are skipped) between two barriers. Returns
    ``(images that existed before, sampling seconds)``; rank 0 prints ``header`` and the sample.py flags.
    ``free_memory`` drops the model and the CUDA cache afterwards (reward heads load next)."""
    import torch

    before = sum(1 for s in seeds if image_path(images, s).is_file()
                 and image_path(images, s).with_suffix(".json").is_file())
    _barrier(world)             # every rank has counted before any writes
    if rank == 0:
        print(f"{header}; sample.py {' '.join(shlex.quote(a) for a in argv)}")
    start = time.perf_counter()
    options = sample.build_parser().parse_args(argv)
    try:
        job = sample.prepare(options, rank, world, torch.device(options.device) if options.device else device)
    except (KeyError, NotImplementedError, TableError, UnsafePickleError) as err:
        raise ValueError(f"{where}: {err}") from err
    sample.write_samples(job)
    if free_memory:
        import gc

        del job
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    _barrier(world)
    return before, time.perf_counter() - start


def check_sidecars(images: Path, seeds: Iterable[int], label: str, sequential: int, table_path: Path | None,
                   grid_hint: str, check: Callable[[int, Path, dict], None] | None = None) -> list[Path]:
    """Every seed's PNG and sidecar exist, and each sidecar records this cell: solver ``label`` at ``sequential``
    NFE, the table ``table_path`` (if any), and one grid for all images; ``check(i, path, sidecar)`` adds a
    script's own tests per image. Raises FileNotFoundError/ValueError naming the first misfit."""
    paths = [image_path(images, s) for s in seeds]
    missing = [p for p in paths if not (p.is_file() and p.with_suffix(".json").is_file())]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(paths)} images are missing after sampling "
                                f"(first: {missing[0]})")
    grid = None
    for i, p in enumerate(paths):
        meta = json.loads(p.with_suffix(".json").read_text())
        made = (meta.get("solver"), (meta.get("nfe") or {}).get("sequential"))
        if made != (label, sequential):
            raise ValueError(f"{p} was made by {made[0]} at NFE {made[1]}, not by this cell ({label} at NFE "
                             f"{sequential}); use a fresh --outdir")
        if table_path is not None and Path((meta.get("table") or {}).get("path") or "").resolve() != \
                Path(table_path).resolve():
            raise ValueError(f"{p} was made with the table {(meta.get('table') or {}).get('path')}, not "
                             f"{table_path}; use a fresh --outdir")
        grid = meta.get("sigmas") if grid is None else grid
        if meta.get("sigmas") != grid:
            raise ValueError(f"{p} was sampled on another grid than {paths[0]} ({grid_hint}); use a fresh --outdir")
        if check is not None:
            check(i, p, meta)
    return paths


def stamp_result(result: dict, warnings: list[str]) -> dict:
    """Add the run's warnings, its UTC creation time and the command line to ``result``."""
    result["warnings"] = warnings
    result["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    result["command"] = sys.argv
    return result


def images_record(images: Path, paths: list[Path], seeds_text: str, before: int) -> dict:
    """The ``images`` entry of a result: folder, count, seeds, and how many were reused or generated now."""
    return {"dir": str(images), "count": len(paths), "seeds": seeds_text, "reused": before,
            "generated_this_run": len(paths) - before}


def versus_paper(ours: str, paper: str, context: str) -> str:
    """The report line ``ours X | paper Y (context)``."""
    return f"ours {ours} | paper {paper} ({context})"


def run_cells(cells: list, run_one: Callable[[Any, int, int, Any], Any]) -> tuple[int, list] | None:
    """Join the process group (torchrun or one process), ``run_one(cell, rank, world, device)`` for each cell,
    leave it. Returns ``(rank, results)``, or None after printing ``error:`` for a failed cell (the others'
    results are on disk)."""
    rank, world, device = join_process_group()
    results = []
    try:
        for cell in cells:
            results.append(run_one(cell, rank, world, device))
    except RuntimeError as err:      # the entry point's decorator takes the other errors
        print(f"error: {err}", file=sys.stderr)
        return None
    finally:
        leave_process_group()
    return rank, results

