"""Reproduce a cell (or a table) of the EPD-Solver++ paper (TPAMI): sample, score with five reward models, compare.

    python scripts/reproduce_tpami.py --backbone sd15 --method epd --model_path weights/stable-diffusion-v1-5
    python scripts/reproduce_tpami.py --backbone sd3_1024 --method ddim-28,heun-14 --model_path weights/sd3-medium
    torchrun --standalone --nproc_per_node=8 scripts/reproduce_tpami.py --backbone sd3_512 --all
    python -m scripts.reproduce_tpami --backbone sd15 --all --dry-run          # the plan only

One cell = (backbone, method row). The backbones are the paper's three tables: ``sd15`` (SD1.5, 512 px),
``sd3_512`` and ``sd3_1024`` (SD3-Medium). ``epd`` runs the authors' released ``<model>-best.pkl`` table
(``--release distilled|start`` or ``--table`` for another); every other row runs the baseline solver of our
registry with the paper's step count and grid kind, so the cell's sequential NFE is the paper's (Para.) NFE
(:func:`plan_cell`; docs/reproduce_tpami.md says where a row cannot be mapped exactly). Images come from
``sample.py``'s ``prepare``/``write_samples`` in this process at the paper's resolution (``--upscale 1``), with
the released tables' guidance (7.5 for SD1.5, 4.5 for SD3), one seed per prompt of the authors' prompt list
(``src/prompts/test.txt``, seeds 0-999, docs/authors-code.md §8.4). Under torchrun every rank samples its
round-robin share; seeds whose PNG and JSON sidecar exist are skipped, so an interrupted run resumes. After a
barrier, rank 0 checks that every seed's image belongs to this cell (solver, NFE, table, grid, guidance,
prompt, size), scores them with each chosen reward head (HPSv2.1, PickScore, ImageReward, CLIP, Aesthetic,
through :mod:`training.rewards.score_cli`), prints ``ours X | paper Y`` per metric and writes
``<outdir>/<backbone>/<cell>/scores.json`` atomically (``--no-score``: images only, ``generation.json``).
Missing reward weights stop the run before sampling with one message naming the file, unless that metric is
left out (``--metrics`` / ``--skip-metrics``). The paper's numbers are data: docs/tpami_tables.json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from backends import canonical_backend  # noqa: E402
from backends.prompts import read_prompts  # noqa: E402
from safeio.cli import ArgumentParser, entry_point  # noqa: E402
from scripts import reproduce_common as common  # noqa: E402
from scripts.reproduce_common import image_path  # noqa: E402
from solvers.core import parse_seeds  # noqa: E402
from solvers.registry import get_solver  # noqa: E402
from solvers.table import PredictorTable, load_table  # noqa: E402

__all__ = ["METRICS", "BACKBONES", "PROMPT_SETS", "Backbone", "PaperRow", "Cell", "paper_data", "paper_rows",
           "cell_key", "default_tables_dir", "release_table", "plan_cell", "image_path", "sample_argv",
           "missing_weights", "build_parser", "prepare_run", "run_cell", "main"]

PAPER_JSON = ROOT / "docs" / "tpami_tables.json"
TABLES_ENV = "EPD_TPAMI_TABLES"
#: The five metric columns of the paper, by reward-head name (training/rewards/registry.py), in column order.
METRICS = ("hps", "pickscore", "imagereward", "clip", "aesthetic")
RELEASES = ("best", "distilled", "start")
#: Named prompt lists (local files; nothing is downloaded): src/prompts/README.md says where to get them.
PROMPT_SETS = {"test": ROOT / "src" / "prompts" / "test.txt",
               "hpsv2": ROOT / "src" / "prompts" / "hpsv2_benchmark.txt"}


@dataclass(frozen=True)
class Backbone:
    """A table of the paper: the model, how sample.py reaches it, and the released table's settings."""

    key: str
    backend: str            # sample.py --backend for the baselines (the tables record their own)
    resolution: int         # pixels
    guidance: float         # CFG scale of the released tables (docs/authors-code.md §5.1, §5.3)
    release: str            # stem of the released tables: <release>-{best,distilled,start}.pkl
    model_env: str          # where the backend looks for a local model without --model_path
    default_grid: str       # the backend's own grid kind (what the EPD table was fitted on)


BACKBONES: dict[str, Backbone] = {b.key: b for b in [
    Backbone("sd15", "sd15", 512, 7.5, "sd15", "SD15_MODEL_PATH", "discrete"),
    Backbone("sd3_512", "sd3", 512, 4.5, "sd3-512", "SD3_MODEL_PATH", "flowmatch"),
    Backbone("sd3_1024", "sd3", 1024, 4.5, "sd3-1024", "SD3_MODEL_PATH", "flowmatch"),
]}

# Paper method name -> (cell-name stem, our registry solver); EPD-Solver runs a table.
_METHODS = {"DDIM": ("ddim", "euler"), "iPNDM": ("ipndm", "ipndm"), "iPNDM-3M": ("ipndm3m", "ipndm3"),
            "Heun": ("heun", "heun"), "DPM-Solver-2": ("dpm2", "dpm2"), "EPD-Solver": ("epd", None)}
# Paper schedule name -> our grid kind; "Uniform" is uniform in the discrete model time, the SD1.5 grid of the
# authors' code and of the released table (docs/authors-code.md §3.1).
_SCHEDULES = {"Uniform": "discrete", "Polynomial": "polynomial", "LogSNR": "logsnr"}
_GRID_WORDS = {"discrete": "uniform discrete-time grid", "polynomial": "polynomial grid (rho 7)",
               "logsnr": "logSNR grid", "flowmatch": "flow-matching grid"}


@dataclass(frozen=True)
class PaperRow:
    """One row of a paper table (docs/tpami_tables.json)."""

    backbone: str
    key: str                 # our name of the row, e.g. heun-10-uniform
    setting: str
    nfe: int
    method: str
    steps: int
    schedule: str | None
    scores: dict

    @property
    def label(self) -> str:
        inside = f"{self.steps}, {self.schedule}" if self.schedule else f"{self.steps}"
        return f"{self.method} ({inside})"


# -- the paper's numbers -----------------------------------------------------------------------------------------
@lru_cache(maxsize=4)
def _read_json(path: str) -> dict:
    return json.loads(Path(path).read_text())


def paper_data(path: Path = PAPER_JSON) -> dict:
    return _read_json(str(path))


def cell_key(method: str, steps: int, schedule: str | None, ambiguous: bool) -> str:
    """``epd``, or ``<method>-<steps>`` with ``-<schedule>`` where the table has the same method and steps on
    two grids (SD1.5: ``heun-10-polynomial`` / ``heun-10-uniform``)."""
    if method not in _METHODS:
        raise ValueError(f"docs/tpami_tables.json: unknown method {method!r}; known: {', '.join(_METHODS)}")
    stem = _METHODS[method][0]
    if stem == "epd":
        return "epd"
    return f"{stem}-{steps}" + (f"-{schedule.lower()}" if ambiguous and schedule else "")


def paper_rows(path: Path = PAPER_JSON) -> dict[str, dict[str, PaperRow]]:
    """``{backbone: {cell key: PaperRow}}`` in the paper's row order."""
    out: dict[str, dict[str, PaperRow]] = {}
    for backbone, block in paper_data(path)["backbones"].items():
        rows = block["rows"]
        pairs = [(r["method"], r["steps"]) for r in rows]
        out[backbone] = {}
        for r in rows:
            key = cell_key(r["method"], r["steps"], r["schedule"], pairs.count((r["method"], r["steps"])) > 1)
            if key in out[backbone]:
                raise ValueError(f"docs/tpami_tables.json: two {backbone} rows are named {key!r}")
            out[backbone][key] = PaperRow(backbone, key, r["setting"], int(r["nfe"]), r["method"], int(r["steps"]),
                                          r["schedule"], dict(r["scores"]))
    return out


def _row(backbone: str, method: str) -> PaperRow:
    rows = paper_rows()
    if backbone not in rows:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {', '.join(rows)}")
    if method not in rows[backbone]:
        raise ValueError(f"no cell {method!r} for {backbone}; choose one of {', '.join(rows[backbone])} (a comma "
                         "list, or all)")
    return rows[backbone][method]


# -- released tables ---------------------------------------------------------------------------------------------
def default_tables_dir() -> Path | None:
    """``$EPD_TPAMI_TABLES``, else the first of ``<repo>/exps/tpami`` and ``<repo>/../shared/official/tpami`` that
    exists (the authors' ``exps/<model>/*.pkl`` files, flattened, kept beside the checkout)."""
    return common.find_tables_dir(TABLES_ENV, "tpami")


def release_table(backbone: str, release: str = "best", tables_dir: Path | None = None) -> Path:
    """``<tables_dir>/<sd15|sd3-512|sd3-1024>-<release>.pkl``."""
    if release not in RELEASES:
        raise ValueError(f"--release {release!r}: choose one of {', '.join(RELEASES)}")
    folder = tables_dir if tables_dir is not None else default_tables_dir()
    if folder is None or not Path(folder).is_dir():
        raise FileNotFoundError(f"no folder of released TPAMI tables (looked for ${TABLES_ENV}, "
                                f"{ROOT / 'exps/tpami'}, {ROOT.parent / 'shared/official/tpami'}); give "
                                "--tables-dir or --table")
    path = Path(folder) / f"{BACKBONES[backbone].release}-{release}.pkl"
    if not path.is_file():
        raise FileNotFoundError(f"no released table {path}; give --tables-dir or --table")
    return path


# -- a cell's plan -----------------------------------------------------------------------------------------------
@dataclass
class Cell(common.SolverCell):
    backbone: Backbone
    row: PaperRow
    table: PredictorTable | None = None
    table_path: Path | None = None
    release: str | None = None
    solver: str | None = None       # registry name (baselines)
    steps: int = 0                  # solver steps: a grid of steps + 1 points, no terminal zero
    schedule: str | None = None     # sample.py --schedule: "default" (the backend's own grid) or a kind
    grid: str | None = None         # the grid kind that schedule builds (discrete, polynomial, logsnr, flowmatch)
    grid_variant: str = "official"
    notes: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """The cell's folder: the row key, with the table variant for EPD runs of another table."""
        if self.table is None or self.release == "best":
            return self.row.key
        return f"epd-{self.release}" if self.release else f"epd-table-{Path(self.table_path).stem}"

    def describe(self) -> dict:
        seq, total = self.counts()
        out: dict[str, Any] = {"backbone": self.backbone.key, "cell": self.row.key, "folder": self.name,
                               "paper_row": {"setting": self.row.setting, "method": self.row.label,
                                             "nfe": self.row.nfe},
                               "nfe_sequential": seq, "nfe_total": total, "notes": list(self.notes)}
        if self.table is not None:
            meta = self.table.metadata
            out["table"] = {"path": str(self.table_path), "release": self.release, "sha256": meta.get("sha256"),
                            "solver": self.table.solver, "grid_points": self.table.num_steps,
                            "steps": self.table.num_steps - 1, "afs": self.table.afs,
                            "num_points": self.table.num_points, "backend": meta.get("backend")}
        else:
            out["solver"] = {"name": self.solver, "steps": self.steps, "grid_points": self.steps + 1,
                             "grid": self.grid, "grid_variant": self.grid_variant}
        return out


def _notes(backbone: Backbone, row: PaperRow, solver: str | None, grid: str | None) -> list[str]:
    """Where our configuration of a row is a choice rather than the paper's statement."""
    notes = []
    if solver == "ipndm":
        notes.append("iPNDM order up to 4: the paper gives no order; 4 is the authors' default max_order "
                     "(docs/authors-code.md §4)")
    if solver is not None and row.schedule is None:
        if backbone.default_grid == "discrete":
            notes.append("grid not stated: the model's uniform discrete-time grid, as the EPD row and the "
                         "authors' SD1.5 code use (docs/authors-code.md §3.1)")
        else:
            notes.append("grid not stated: the flow-matching grid of the model's scheduler (shift 3), the only "
                         "grid of the authors' SD3 code (docs/authors-code.md §3.1, §9.9)")
    if solver == "dpm2":
        notes.append("DPM-Solver-2 with one geometric midpoint per step, the EPD-Solver++ dpm2/dpm (inner_steps 2) "
                     "update (docs/authors-code.md §4)")
    if grid == "polynomial":
        notes.append("polynomial grid with rho 7 over the model's sigma range (docs/authors-code.md §3.1, §3.2)")
    if solver is None:
        notes.append("the paper's EPD-Solver row; the released best table is the Stage-2 (RDPO) result "
                     "(docs/authors-code.md §2.3)")
    return notes


def plan_cell(backbone: str, method: str, *, table: str | Path | None = None, tables_dir: Path | None = None,
              release: str = "best", grid_variant: str = "official") -> Cell:
    """What runs for a cell: the released table (``epd``) or a baseline solver whose steps and grid are the
    paper's, checked to run at the paper's NFE. Raises ValueError/FileNotFoundError with one clear message."""
    row = _row(backbone, method)
    b = BACKBONES[backbone]
    solver = _METHODS[row.method][1]
    if solver is None:
        path = Path(table) if table is not None else release_table(backbone, release, tables_dir)
        loaded = load_table(path)
        recorded = canonical_backend(loaded.metadata["backend"]) if loaded.metadata.get("backend") else None
        if recorded != canonical_backend(b.backend):
            raise ValueError(f"{path}: a table for {loaded.metadata.get('backend')!r}, not for {backbone} "
                             f"({b.backend})")
        got = loaded.eval_count().sequential
        if got != row.nfe:
            raise ValueError(f"{path}: the table runs at NFE {got}, not the paper's {row.nfe} for {backbone} epd")
        warnings = []
        if table is None and release != "best":
            warnings.append(f"the paper's EPD-Solver row is the released best table; this cell runs the {release} "
                            "one")
        elif table is not None:
            warnings.append(f"the paper's EPD-Solver row is the released best table; this cell runs {path}")
        return Cell(b, row, table=loaded, table_path=path, release=None if table is not None else release,
                    notes=tuple(_notes(b, row, None, None)), warnings=tuple(warnings))
    if table is not None:
        raise ValueError(f"--table applies to the epd cell, not to the baseline {method}")
    grid = _SCHEDULES[row.schedule] if row.schedule else b.default_grid
    if row.schedule == "Uniform" and b.default_grid != "discrete":
        raise ValueError(f"{backbone} {method}: a 'Uniform' grid is defined for the discrete-time SD1.5 only")
    schedule = "default" if grid == b.default_grid else grid
    name = get_solver(solver).name
    cell = Cell(b, row, solver=name, steps=row.steps, schedule=schedule, grid=grid, grid_variant=grid_variant,
                notes=tuple(_notes(b, row, name, grid)))
    if cell.counts()[0] != row.nfe:
        raise ValueError(f"{backbone} {method}: {name} with {row.steps} steps runs at NFE {cell.counts()[0]}, "
                         f"not the paper's {row.nfe}")
    return cell


def sample_argv(cell: Cell, images: Path, seeds: str, batch: int, prompt_file: Path, *, guidance: float,
                resolution: int, model_path: str | None = None, device: str | None = None,
                extra: list[str] | None = None) -> list[str]:
    """The ``sample.py`` arguments of a cell: native-size PNGs, the prompt list by position, the cell's
    guidance (through ``--backend-config``) and resolution."""
    argv = ["--seeds", seeds, "--batch", str(batch), "--outdir", str(images), "--upscale", "1",
            "--prompt-file", str(prompt_file), "--resolution", str(resolution),
            "--backend-config", json.dumps({"guidance": guidance})]
    if cell.table is not None:
        argv += ["--predictor_path", str(cell.table_path)]
    else:
        argv += ["--backend", cell.backbone.backend, "--solver", cell.solver, "--steps", str(cell.steps),
                 "--schedule", cell.schedule, "--grid-variant", cell.grid_variant]
    argv += common.model_device_flags(model_path, device)
    return argv + list(extra or [])


# -- the images of a cell ----------------------------------------------------------------------------------------
def _check_images(cell: Cell, images: Path, seeds: Any, prompts: list[str], guidance: float,
                  resolution: int) -> tuple[list[Path], list[str]]:
    """Every seed's image, each made by this cell (solver, NFE, table, one grid, guidance, prompt, size)."""
    from PIL import Image

    used: list[str] = []

    def belongs(i: int, p: Path, meta: dict) -> None:
        """Guidance, prompt (by position) and size of one image, beyond the shared checks."""
        if meta.get("guidance") is None or abs(float(meta["guidance"]) - guidance) > 1e-9:
            raise ValueError(f"{p} was sampled with guidance {meta.get('guidance')}, not {guidance}; use a fresh "
                             "--outdir")
        want = prompts[i % len(prompts)]
        if meta.get("prompt") != want:
            raise ValueError(f"{p} was sampled for the prompt {str(meta.get('prompt'))[:60]!r}, not line "
                             f"{i % len(prompts) + 1} of the prompt file ({want[:60]!r}); use a fresh --outdir")
        with Image.open(p) as image:
            if image.size != (resolution, resolution):
                raise ValueError(f"{p} is {image.size[0]} x {image.size[1]} px, not {resolution} x {resolution}; "
                                 "use a fresh --outdir")
        used.append(want)

    paths = common.check_sidecars(images, seeds, cell.label, cell.counts()[0], cell.table_path,
                           "a changed --grid-variant?", belongs)
    return paths, used


# -- metrics -----------------------------------------------------------------------------------------------------
def _key_values(items: list[str], flag: str, sep: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, found, value = item.partition(sep)
        if not found or key not in METRICS:
            raise ValueError(f"{flag} {item!r}: write METRIC{sep}VALUE with METRIC one of {', '.join(METRICS)}")
        out[key] = value
    return out


def metric_options(items: list[str]) -> dict[str, dict[str, Any]]:
    """``--metric-option METRIC:KEY=VALUE`` (repeatable) -> ``{metric: {key: value}}`` (JSON values)."""
    from training.rewards.score_cli import parse_options

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        metric, found, rest = item.partition(":")
        if not found or metric not in METRICS:
            raise ValueError(f"--metric-option {item!r}: write METRIC:KEY=VALUE with METRIC one of "
                             f"{', '.join(METRICS)}")
        out.setdefault(metric, {}).update(parse_options([rest]))
    return out


def missing_weights(metrics: list[str], cache_dir: str | Path, weights: dict[str, str]) -> list[tuple[str, str, str]]:
    """``(metric, path, message)`` of every weights file the chosen metrics need and do not find (manifest
    defaults under ``cache_dir``, the heads' environment variables, ``--weights METRIC=PATH``)."""
    from training.rewards.pretrained import _candidate, entry, head_entries, resolve

    out = []
    for metric in metrics:
        for position, (name, _option) in enumerate(head_entries(metric)):
            override = weights.get(metric) if position == 0 else None
            try:
                resolve(name, override, root=cache_dir)
            except FileNotFoundError as err:
                out.append((metric, str(_candidate(entry(name), override, cache_dir)[0]), str(err)))
    return out


def _chosen_metrics(args: argparse.Namespace) -> list[str]:
    """``--metrics`` minus ``--skip-metrics`` (none with ``--no-score``)."""
    if args.no_score:
        return []
    chosen = common.list_arg(args.metrics, list(METRICS), "metrics", METRICS)
    skipped = common.list_arg(args.skip_metrics, [], "skip-metrics", METRICS) if args.skip_metrics else []
    metrics = [m for m in chosen if m not in skipped]
    if not metrics:
        raise ValueError("no metric left to score (--metrics minus --skip-metrics); give --no-score to only sample")
    return metrics


def _check_metrics(args: argparse.Namespace) -> list[str]:
    """The metrics to score, with their weights checked before anything is sampled."""
    metrics = _chosen_metrics(args)
    if not metrics:
        return []
    metric_options(args.metric_option)
    weights = _key_values(args.weights, "--weights", "=")
    for metric, path in weights.items():
        if not Path(path).exists():
            raise FileNotFoundError(f"--weights {metric}={path}: no such file or folder")
    missing = missing_weights(metrics, args.cache_dir, weights)
    if len(missing) == 1:
        metric, _, message = missing[0]
        raise FileNotFoundError(f"{message} (or leave the metric out: --skip-metrics {metric})")
    if missing:
        names = sorted({m for m, _, _ in missing}, key=METRICS.index)
        users: dict[str, list[str]] = {}
        for metric, path, _ in missing:
            users.setdefault(path, []).append(metric)
        listed = ", ".join(f"{path} ({', '.join(used)})" for path, used in users.items())
        raise FileNotFoundError(f"reward weights not found: {listed}; `python -m training.rewards.pretrained check "
                                f"--root {args.cache_dir}` says where to get each, or leave the metrics out: "
                                f"--skip-metrics {','.join(names)}")
    return metrics


_HEADS: dict[tuple, Any] = {}


def _head(metric: str, args: argparse.Namespace, device: str) -> tuple[Any, dict]:
    """The reward head of ``metric`` built once per process (a table's cells reuse it)."""
    from training.rewards.score_cli import build_head

    weights = _key_values(args.weights, "--weights", "=").get(metric)
    options = metric_options(args.metric_option).get(metric, {})
    key = (metric, weights, str(args.cache_dir), device, not args.disable_amp, json.dumps(options, sort_keys=True))
    if key not in _HEADS:
        _HEADS[key] = build_head(metric, weights, args.cache_dir, device, not args.disable_amp, options)
    return _HEADS[key]


def _score(paths: list[Path], prompts: list[str], metrics: list[str], args: argparse.Namespace,
           device: str) -> dict[str, dict]:
    from training.rewards.score_cli import HEAD_DEFAULTS, score_images, summarise

    out = {}
    for metric in metrics:
        t0 = time.perf_counter()
        head, info = _head(metric, args, device)
        batch = args.score_batch or HEAD_DEFAULTS.get(metric, {}).get("batch_size", 8)
        scores = score_images(head, paths, prompts, batch)
        out[metric] = {**summarise(scores), "weights": info["weights"], "seconds": time.perf_counter() - t0}
    return out


# -- CLI ---------------------------------------------------------------------------------------------------------
def _epilog() -> str:
    lines = ["cells (--backbone B --method CELL; paper row -> what runs here):"]
    for backbone, rows in paper_rows().items():
        b = BACKBONES[backbone]
        lines.append(f"  {backbone}  ({paper_data()['backbones'][backbone]['label']}, guidance {b.guidance}):")
        for key, row in rows.items():
            solver = _METHODS[row.method][1]
            if solver is None:
                runs = f"released table {b.release}-best.pkl"
            else:
                grid = _SCHEDULES[row.schedule] if row.schedule else b.default_grid
                runs = f"{get_solver(solver).name}, {row.steps} steps, {_GRID_WORDS[grid]}"
            lines.append(f"    {key:<22}{row.label + ', NFE ' + str(row.nfe):<36}{runs}")
    lines.append(f"metrics (--metrics): {', '.join(f'{k} ({v})' for k, v in paper_data()['metrics'].items())}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="scripts/reproduce_tpami.py", description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_epilog())
    parser.add_argument("--backbone", required=True, choices=list(BACKBONES))
    parser.add_argument("--method", help="a cell of the backbone (below), a comma list, or all")
    parser.add_argument("--all", action="store_true", help="every row of the backbone's table (= --method all)")
    parser.add_argument("--model_path", "--model-path", dest="model_path",
                        help="local diffusers folder of the model (SD1.5 also the .ckpt); default "
                             "$SD15_MODEL_PATH / $SD3_MODEL_PATH, then the table's model id in the local "
                             "Hugging Face cache")
    parser.add_argument("--prompt-set", choices=list(PROMPT_SETS),
                        help="test: the authors' src/prompts/test.txt (default); hpsv2: "
                             "src/prompts/hpsv2_benchmark.txt (src/prompts/README.md)")
    parser.add_argument("--prompt-file", type=Path, help="another prompt list (.txt lines or .csv text column)")
    parser.add_argument("--num-images", type=int, help="seeds 0..N-1 (default: one seed per prompt)")
    parser.add_argument("--seeds", help="explicit seeds, e.g. 0-999 (prompts pair with them by position)")
    parser.add_argument("--guidance", type=float, help="CFG scale (default: the released table's, 7.5 / 4.5)")
    parser.add_argument("--resolution", type=int, help="pixels (default: the paper's, 512 / 512 / 1024)")
    parser.add_argument("--batch", type=int, default=16, help="images per batch per process (default 16)")
    parser.add_argument("--outdir", type=Path, default=Path("results/tpami"),
                        help="root; a cell lives in OUTDIR/<backbone>/<cell>/ (images/, scores.json)")
    parser.add_argument("--table", help="run this table in the epd cell instead of the released one")
    parser.add_argument("--release", choices=RELEASES, default="best",
                        help="which released table the epd cell runs (default best, the paper's)")
    parser.add_argument("--tables-dir", type=Path, help=f"folder of the released tables (default ${TABLES_ENV}, "
                        "exps/tpami, then ../shared/official/tpami beside the checkout)")
    parser.add_argument("--grid-variant", choices=("official", "correct"), default="official",
                        help="baseline grids: the authors' (default; the SD3 flow grid shifted twice, "
                             "docs/authors-code.md §9.9) or ours")
    parser.add_argument("--device", help="sampling device (default: cuda, LOCAL_RANK under torchrun)")
    parser.add_argument("--sample-args", default="", help="extra sample.py flags, e.g. \"--use_fp16 False\"")
    parser.add_argument("--metrics", default="all", help=f"comma list of {', '.join(METRICS)}, or all (default)")
    parser.add_argument("--skip-metrics", default="", help="metrics left out (e.g. ones whose weights you lack)")
    parser.add_argument("--weights", action="append", default=[], metavar="METRIC=PATH",
                        help="a metric's main weights file or folder (repeatable; default: the manifest, "
                             "python -m training.rewards.pretrained check)")
    parser.add_argument("--metric-option", action="append", default=[], metavar="METRIC:KEY=VALUE",
                        help="another option of a reward head (repeatable; JSON values)")
    parser.add_argument("--cache-dir", "--weights-dir", dest="cache_dir", default="weights",
                        help="weights root of the reward heads (default weights)")
    parser.add_argument("--score-device", help="default: this rank's GPU, else cpu")
    parser.add_argument("--score-batch", type=int, help="images per head call (default: per head)")
    parser.add_argument("--disable-amp", action="store_true", help="reward heads without autocast")
    parser.add_argument("--no-score", action="store_true", help="only generate the images (generation.json)")
    parser.add_argument("--dry-run", action="store_true", help="print each cell's plan and sample.py flags")
    return parser


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


@dataclass
class _Run:
    """What every cell of one invocation shares."""

    prompt_file: Path
    prompts: list[str]
    seeds: Any
    seeds_text: str
    guidance: float
    resolution: int
    metrics: list[str]
    extra: list[str]


def run_cell(cell: Cell, args: argparse.Namespace, run: _Run, rank: int, world: int, device: Any = None) -> dict | None:
    """Sample (every rank) through ``sample.prepare``/``sample.write_samples``, then score on rank 0. Returns the
    result (rank 0) or None."""
    import torch

    folder = args.outdir / cell.backbone.key / cell.name
    images = folder / "images"
    argv = sample_argv(cell, images, run.seeds_text, args.batch, run.prompt_file, guidance=run.guidance,
                       resolution=run.resolution, model_path=args.model_path, device=args.device, extra=run.extra)
    seq, total = cell.counts()
    # free_memory: the model leaves memory before the reward heads come in
    header = (f"[{cell.backbone.key} {cell.name}] {len(run.seeds)} images, NFE {seq} sequential / {total} total "
              f"(paper: {cell.row.label}, NFE {cell.row.nfe})")
    before, sampled = common.sample_cell(argv, f"{cell.backbone.key} {cell.name}", images, run.seeds, rank, world,
                                         device, header, free_memory=True)
    if rank != 0:
        return None
    paths, prompts = _check_images(cell, images, run.seeds, run.prompts, run.guidance, run.resolution)
    warnings = list(cell.warnings)
    if run.resolution != cell.backbone.resolution:
        warnings.append(f"sampled at {run.resolution} px; the paper's {cell.backbone.key} table is at "
                        f"{cell.backbone.resolution} px")
    if abs(run.guidance - cell.backbone.guidance) > 1e-9:
        warnings.append(f"guidance {run.guidance}; the released {cell.backbone.key} tables use "
                        f"{cell.backbone.guidance}")
    if run.prompt_file.resolve() != PROMPT_SETS["test"].resolve() or len(paths) != len(run.prompts):
        warnings.append(f"{len(paths)} images over {run.prompt_file}; the authors' evaluation samples one image "
                        "per prompt of their 1000-prompt test.txt (seeds 0-999), so compare only like runs")
    for message in warnings:
        print(f"warning: {message}", file=sys.stderr)
    result: dict[str, Any] = {**cell.describe(), "metrics": {}, "skipped_metrics": [m for m in METRICS
                                                                                   if m not in run.metrics]}
    score_device = args.score_device or (str(device) if device is not None else ("cuda" if torch.cuda.is_available()
                                                                                   else "cpu"))
    t0 = time.perf_counter()
    scored = _score(paths, prompts, run.metrics, args, score_device) if run.metrics else {}
    score_seconds = time.perf_counter() - t0
    for metric, stats in scored.items():
        paper = float(cell.row.scores[metric])
        result["metrics"][metric] = {**stats, "paper": paper, "difference": stats["mean"] - paper}
    result["paper"] = {"scores": cell.row.scores, "source": str(PAPER_JSON.relative_to(ROOT))}
    result["guidance"], result["resolution"] = run.guidance, run.resolution
    result["prompts"] = {"file": str(run.prompt_file), "count": len(run.prompts)}
    result["images"] = common.images_record(images, paths, run.seeds_text, before)
    result["model_path"] = args.model_path
    result["score_device"] = score_device if run.metrics else None
    result["timing"] = {"sampling_s": sampled, "scoring_s": score_seconds, "processes": world}
    common.stamp_result(result, warnings)
    # --no-score never overwrites a scored result: it reports the generation separately
    path = folder / ("scores.json" if run.metrics else "generation.json")
    common.write_json(path, result)
    names = paper_data()["metrics"]
    for metric in run.metrics:
        m = result["metrics"][metric]
        context = f"{cell.backbone.key}, {cell.row.label}, NFE {cell.row.nfe}"
        print(f"{metric} ({names[metric]}): " + common.versus_paper(_fmt(m["mean"]), _fmt(m["paper"]), context))
    print(f"result: {path}")
    return result


def _seeds(args: argparse.Namespace, prompts: list[str]) -> tuple[Any, str]:
    if args.seeds:
        seeds = parse_seeds(args.seeds)
        if args.num_images is not None and args.num_images != len(seeds):
            raise ValueError(f"--seeds gives {len(seeds)} images but --num-images says {args.num_images}")
        return seeds, args.seeds
    count = len(prompts) if args.num_images is None else args.num_images
    if count < 1:
        raise ValueError("--num-images must be >= 1")
    return parse_seeds(f"0-{count - 1}"), f"0-{count - 1}"


def prepare_run(args: argparse.Namespace) -> tuple[list[Cell], _Run]:
    """The cells and shared settings of an invocation, every argument checked (reward weights too, except for a
    dry run) before anything loads or samples."""
    rows = paper_rows()[args.backbone]
    if args.all:
        if args.method not in (None, "all"):
            raise ValueError("give --all or --method, not both")
        args.method = "all"
    if args.method is None:
        raise ValueError(f"give --method (one of {', '.join(rows)}; a comma list, or all) or --all")
    methods = common.list_arg(args.method, list(rows), "method", list(rows))
    if args.batch < 1:
        raise ValueError("--batch must be >= 1")
    if args.table and methods != ["epd"]:
        raise ValueError("--table names one table: use it with --method epd alone")
    backbone = BACKBONES[args.backbone]
    if args.prompt_file and args.prompt_set:
        raise ValueError("give --prompt-set or --prompt-file, not both")
    prompt_file = args.prompt_file or PROMPT_SETS[args.prompt_set or "test"]
    if not Path(prompt_file).is_file():
        raise FileNotFoundError(f"prompt file {prompt_file} not found: src/prompts/README.md says where to get the "
                                "authors' test.txt (or the HPSv2 benchmark prompts); or give --prompt-file")
    prompts = read_prompts(prompt_file)
    if not prompts:
        raise ValueError(f"{prompt_file} holds no prompts")
    seeds, seeds_text = _seeds(args, prompts)
    guidance = backbone.guidance if args.guidance is None else args.guidance
    resolution = backbone.resolution if args.resolution is None else args.resolution
    if resolution < 8 or not np.isfinite(guidance):
        raise ValueError("--resolution must be >= 8 and --guidance finite")
    cells = [plan_cell(args.backbone, m, table=args.table, tables_dir=args.tables_dir, release=args.release,
                       grid_variant=args.grid_variant) for m in methods]
    extra = shlex.split(args.sample_args)
    metrics = _chosen_metrics(args) if args.dry_run else _check_metrics(args)
    return cells, _Run(Path(prompt_file), prompts, seeds, seeds_text, guidance, resolution, metrics, extra)


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cells, run = prepare_run(args)
    metrics, seeds, seeds_text = run.metrics, run.seeds, run.seeds_text
    prompt_file, guidance, resolution, extra = run.prompt_file, run.guidance, run.resolution, run.extra
    if args.dry_run:
        for cell in cells:
            folder = args.outdir / cell.backbone.key / cell.name
            missing = missing_weights(metrics, args.cache_dir, _key_values(args.weights, "--weights", "="))
            print(json.dumps({**cell.describe(), "paper": cell.row.scores, "images": len(seeds),
                              "prompt_file": str(prompt_file), "guidance": guidance, "resolution": resolution,
                              "metrics": metrics, "missing_weights": [f"{m}: {p}" for m, p, _ in missing],
                              "sample_py": sample_argv(cell, folder / "images", seeds_text, args.batch,
                                                       Path(prompt_file), guidance=guidance, resolution=resolution,
                                                       model_path=args.model_path, device=args.device,
                                                       extra=extra)}, default=str))
        return 0

    ran = common.run_cells(cells, lambda cell, rank, world, device: run_cell(cell, args, run, rank, world, device))
    if ran is None:
        return 2
    rank, results = ran
    if rank == 0 and len(cells) > 1:
        path = args.outdir / args.backbone / f"summary-{'_'.join(c.name for c in cells)}.json"
        if len(path.name) > 200:
            path = args.outdir / args.backbone / f"summary-{len(cells)}-cells.json"
        common.write_json(path, {"backbone": args.backbone, "cells": results})
        if metrics:
            print(f"{'cell':<22}" + "".join(f"{m + ' ours':>17}{'paper':>9}" for m in metrics))
            for r in results:
                print(f"{r['folder']:<22}" + "".join(f"{_fmt(r['metrics'][m]['mean']):>17}"
                                                      f"{_fmt(r['metrics'][m]['paper']):>9}" for m in metrics))
        print(f"summary: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
