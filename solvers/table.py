"""Predictor tables: the learned per-step numbers of an EPD solver (docs/authors-code.md §2).

A :class:`PredictorTable` holds, for each of the ``N-1`` steps of its grid and each of its K points, the
position ``r`` in (0, 1), the simplex weight ``w``, and optionally the direction scale ``c`` and time scale
``a`` (``None`` when disabled), plus the exact sigma grid it was fitted on and metadata.

Files: our tables are data-only pickles (plain dicts, lists, numbers and strings) read by an unpickler that
allows no globals at all, or the same dict as JSON. The authors' release pickles are read by the code-free
reader of :mod:`solvers.official`. ``python -m solvers.table show PATH [--json]`` prints any of them.
"""

from __future__ import annotations

import json
import pickle
import sys
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from safeio import UnsafePickleError, atomic_write
from safeio.limits import MAX_TABLE_BYTES, LimitError, check_size, check_structure
from safeio.unpickle import restricted_load

from .official import OfficialSnapshot, read_official
from .schedules import ScheduleSpec, discrete_sigmas, flowmatch_sigmas, make_sigmas

__all__ = ["PredictorTable", "TableError", "UnsafePickleError", "load_table", "save_table", "uniform_table",
           "table_from_official", "describe", "format_rows", "FORMAT"]

FORMAT = "epd-solver/predictor-table"
VERSION = 1
#: Direction and time scales must lie in [1/MAX_SCALE, MAX_SCALE]. Trained tables stay within [0.6, 1.5] (the
#: authors' half-widths are at most 0.5); a scale of 1e300 passes no sanity check and only gives black images.
MAX_SCALE = 10.0
#: Grid points of a table read from the authors' format: released tables have 3..11; a grid is computed from
#: this number before any row is read, so ``num_steps = 1e9`` must not reach the grid code.
MAX_GRID_POINTS = 10_000


class TableError(ValueError):
    """A table file or field is invalid; the message names the file and the field."""


def _frozen(values: Any, name: str, source: str) -> np.ndarray | None:
    if values is None:
        return None
    try:
        given = np.asarray(values.detach().cpu() if hasattr(values, "detach") else values)
    except (TypeError, ValueError) as err:
        raise TableError(f"{source}: field '{name}' is not a numeric array ({err})") from None
    if given.dtype.kind not in "fiu":    # strings, booleans and objects are not numbers, even "0.5" or True
        raise TableError(f"{source}: field '{name}' must hold numbers (got {given.dtype} values)")
    arr = np.array(given, dtype=np.float64)
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True, eq=False)
class PredictorTable:
    """An EPD predictor table (frozen; arrays are read-only float64).

    positions/weights/dir_scales/time_scales: ``[N-1, K]``; sigmas: ``[N]`` decreasing, > 0.
    solver: ``"epd"`` or ``"ipndm"`` (the EPD-Plugin, with ``max_order``). ``afs``: analytic first step;
    ``fcn``: unscaled directions on the last step. ``metadata``: backend, backend_config, guidance_type,
    guidance_rate, schedule (a :class:`ScheduleSpec` dict), teacher, M, dataset, alpha, created, source, ...
    """

    positions: np.ndarray
    weights: np.ndarray
    sigmas: np.ndarray
    dir_scales: np.ndarray | None = None
    time_scales: np.ndarray | None = None
    solver: str = "epd"
    afs: bool = False
    fcn: bool = False
    max_order: int | None = None
    metadata: dict = field(default_factory=dict)
    source: str = "<memory>"

    def __post_init__(self) -> None:
        for name in ("positions", "weights", "sigmas", "dir_scales", "time_scales"):
            object.__setattr__(self, name, _frozen(getattr(self, name), name, self.source))
        self.validate()

    # -- shape -------------------------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        """Number of grid points N (the authors' ``num_steps``); there are N-1 solver steps."""
        return int(self.sigmas.shape[0])

    @property
    def num_points(self) -> int:
        return int(self.positions.shape[-1])

    def eval_count(self, denoise_to_zero: bool = False):
        from .registry import eval_count

        return eval_count("epd", self.sigmas, afs=self.afs, num_points=self.num_points,
                          denoise_to_zero=denoise_to_zero)

    @property
    def intermediate_sigmas(self) -> np.ndarray:
        """``t_n^r t_c^(1-r)`` per step and point (unscaled)."""
        t_c, t_n = self.sigmas[:-1, None], self.sigmas[1:, None]
        return t_n ** self.positions * t_c ** (1 - self.positions)

    # -- checks --------------------------------------------------------------------------------------------
    def validate(self) -> None:
        src = self.source

        def fail(name: str, why: str) -> None:
            raise TableError(f"{src}: field '{name}' {why}")

        if self.solver not in ("epd", "ipndm"):
            fail("solver", f"must be 'epd' or 'ipndm' (got {self.solver!r})")
        for flag in ("afs", "fcn"):
            if not isinstance(getattr(self, flag), (bool, np.bool_)):
                fail(flag, f"must be true or false (got {getattr(self, flag)!r})")
        order = self.max_order
        if order is not None and (isinstance(order, (bool, np.bool_)) or not isinstance(order, (int, np.integer))):
            fail("max_order", f"must be an integer or null (got {order!r})")
        if self.solver == "ipndm" and not (order and 1 <= int(order) <= 4):
            fail("max_order", f"must be 1..4 for the iPNDM plugin (got {order!r})")
        if not isinstance(self.metadata, dict):
            fail("metadata", f"must be a mapping (got {type(self.metadata).__name__})")
        sig = self.sigmas
        if sig.ndim != 1 or sig.shape[0] < 2:
            fail("sigmas", f"must be a 1-D grid of at least 2 points (shape {sig.shape})")
        if not np.all(np.isfinite(sig)) or np.any(sig <= 0):
            fail("sigmas", "must be finite and > 0 (EPD steps cannot end at sigma = 0)")
        if np.any(np.diff(sig) >= 0):
            fail("sigmas", "must decrease strictly")
        rows = sig.shape[0] - 1
        shape = self.positions.shape
        if len(shape) != 2 or shape[0] != rows or shape[1] < 1:
            fail("positions", f"must have shape [N-1={rows}, K] for a grid of {rows + 1} points (got {shape})")
        for name in ("positions", "weights", "dir_scales", "time_scales"):
            arr = getattr(self, name)
            if arr is None:
                continue
            if arr.shape != shape:
                fail(name, f"has shape {arr.shape}, expected {shape} like 'positions'")
            if not np.all(np.isfinite(arr)):
                fail(name, "contains NaN or inf")
        if np.any((self.positions <= 0) | (self.positions >= 1)):
            fail("positions", "must lie strictly inside (0, 1)")
        if np.any(self.weights < 0) or np.max(np.abs(self.weights.sum(-1) - 1)) > 1e-6:
            fail("weights", "must be on the simplex (>= 0, each row summing to 1)")
        for name in ("dir_scales", "time_scales"):
            arr = getattr(self, name)
            if arr is not None and np.any(arr <= 0):
                fail(name, "must be > 0")
            if arr is not None and np.any((arr < 1 / MAX_SCALE) | (arr > MAX_SCALE)):
                fail(name, f"must lie in [{1 / MAX_SCALE:g}, {MAX_SCALE:g}] (got {arr.min():.3g} .. {arr.max():.3g})")

    # -- conversion ----------------------------------------------------------------------------------------
    @property
    def schedule(self) -> ScheduleSpec | None:
        spec = self.metadata.get("schedule")
        return ScheduleSpec.from_dict(spec) if isinstance(spec, dict) else None

    def to_dict(self) -> dict:
        def lst(a: np.ndarray | None) -> Any:
            return None if a is None else a.tolist()

        counts = self.eval_count()
        return {"format": FORMAT, "version": VERSION, "num_steps": self.num_steps, "num_points": self.num_points,
                "nfe": {"sequential": counts.sequential, "total": counts.total},  # informational, derived
                "solver": self.solver, "afs": bool(self.afs), "fcn": bool(self.fcn),
                "max_order": None if self.max_order is None else int(self.max_order),
                "positions": lst(self.positions), "weights": lst(self.weights),
                "dir_scales": lst(self.dir_scales), "time_scales": lst(self.time_scales),
                "sigmas": lst(self.sigmas), "metadata": _plain(self.metadata, "metadata")}

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>") -> "PredictorTable":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise TableError(f"{source}: not an EPD predictor table (missing format={FORMAT!r})")
        version = data.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise TableError(f"{source}: field 'version' must be a format version 1..{VERSION} (got {version!r})")
        if version > VERSION:
            raise TableError(f"{source}: table format version {version} is newer than this code ({VERSION})")
        missing = [k for k in ("positions", "weights", "sigmas") if data.get(k) is None]
        if missing:
            raise TableError(f"{source}: missing field(s) {', '.join(missing)}")
        metadata = data.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise TableError(f"{source}: field 'metadata' must be a mapping (got {type(metadata).__name__})")
        solver = data.get("solver", "epd")
        if not isinstance(solver, str):
            raise TableError(f"{source}: field 'solver' must be 'epd' or 'ipndm' (got {solver!r})")
        return cls(positions=data["positions"], weights=data["weights"], sigmas=data["sigmas"],
                   dir_scales=data.get("dir_scales"), time_scales=data.get("time_scales"),
                   solver=solver, afs=data.get("afs", False), fcn=data.get("fcn", False),
                   max_order=data.get("max_order"), metadata=dict(metadata or {}), source=source)

    def with_metadata(self, **updates: Any) -> "PredictorTable":
        return replace(self, metadata={**self.metadata, **updates})


def _plain(value: Any, where: str) -> Any:
    """Check that metadata are plain data (so the file stays data-only)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    raise TableError(f"{where} holds a {type(value).__name__}; tables store plain data only")


class _DataOnlyUnpickler(pickle.Unpickler):
    """Allows no globals and no persistent ids: only containers, numbers, strings can come out."""

    def __init__(self, stream: Any, source: str):
        super().__init__(stream)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        raise _NeedsGlobals(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"refusing to load {self.source}: unexpected persistent id. Nothing was executed.")


class _NeedsGlobals(pickle.UnpicklingError):
    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")


def save_table(table: PredictorTable, path: str | Path) -> Path:
    """Write atomically: ``.json`` as JSON, anything else as a data-only pickle (protocol 4)."""
    path = Path(path)
    data = table.to_dict()
    if path.suffix == ".json":
        payload = json.dumps(data, indent=1).encode()
    else:
        payload = pickle.dumps(data, protocol=4)
    atomic_write(path, payload)
    return path


# Errors that already say what is wrong with the file, in our words.
_OURS = (UnsafePickleError, TableError, LimitError)


def load_table(path: str | Path) -> PredictorTable:
    """Read a table: ours (data-only pickle or JSON) or an authors' release pickle (code-free reader).

    A pickle that names any global outside the authors' known format is refused with
    :class:`UnsafePickleError` before anything from it is called.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no predictor table at {path}")
    check_size(path.stat().st_size, MAX_TABLE_BYTES, str(path), "predictor table")
    raw = path.read_bytes()
    if path.suffix == ".json":
        try:
            data = json.loads(raw)
        except ValueError as err:        # JSONDecodeError, UnicodeDecodeError, an integer of 10^5 digits
            raise TableError(f"{path}: invalid JSON ({err})") from None
        except RecursionError:
            raise LimitError(f"refusing {path}: its JSON nests deeper than the parser can follow") from None
        check_structure(data, str(path))
        return PredictorTable.from_dict(data, str(path))
    try:
        data = restricted_load(raw, str(path), unpickler=_DataOnlyUnpickler)
    except _NeedsGlobals:
        try:
            return table_from_official(read_official(path))
        except _OURS:
            raise
        except Exception as err:  # noqa: BLE001 - whatever a crafted file makes the reader trip on is a bad file
            raise TableError(f"{path}: not a readable predictor table ({type(err).__name__}: {err})") from None
    except _OURS:
        raise
    except Exception as err:  # noqa: BLE001 - junk bytes reach the C unpickler's many error types
        raise TableError(f"{path}: not a readable pickle ({type(err).__name__}: {err})") from None
    return PredictorTable.from_dict(data, str(path))


def uniform_table(sigmas: Any, num_points: int = 2, positions: Any = None, schedule: ScheduleSpec | None = None,
                  afs: bool = False, name: str = "uniform-start", **metadata: Any) -> PredictorTable:
    """A hand-made start table: the same positions on every step (default evenly spaced, e.g. the authors'
    (0.335, 0.665) for K = 2 is ``positions=(0.335, 0.665)``) and equal weights."""
    sig = np.asarray(sigmas, dtype=np.float64)
    rows = sig.shape[0] - 1
    pos = (np.arange(1, num_points + 1) / (num_points + 1)) if positions is None else np.asarray(positions, float)
    if pos.shape != (num_points,):
        raise TableError(f"uniform table: field 'positions' has {pos.size} value(s) but num_points is {num_points}")
    meta = {"name": name, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": "hand-made (not trained)", **metadata}
    if schedule is not None:
        meta["schedule"] = schedule.to_dict()
    return PredictorTable(positions=np.tile(pos, (rows, 1)), weights=np.full((rows, len(pos)), 1.0 / len(pos)),
                          sigmas=sig, afs=afs, metadata=meta)


# -- the authors' tables --------------------------------------------------------------------------------
def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _official_scale(params: np.ndarray, half_width: float) -> np.ndarray:
    """``2 sigmoid(p/2) R + (1 - R)`` (docs/authors-code.md §2.2), a factor in (1 - R, 1 + R)."""
    return 2.0 * _sigmoid(0.5 * params) * half_width + (1.0 - half_width)


def _official_grid(snapshot: OfficialSnapshot, kwargs: dict, attrs: dict) -> tuple[np.ndarray, ScheduleSpec, str]:
    n = int(kwargs["num_steps"])
    kind = kwargs.get("schedule_type")
    rho = float(kwargs.get("schedule_rho") or 1.0)
    backend = kwargs.get("backend") or attrs.get("backend") or "edm"
    if snapshot.t_steps is not None:
        sig = snapshot.t_steps
        spec = ScheduleSpec(kind=kind or "time_uniform", num_steps=n, sigma_min=float(sig[-1]),
                            sigma_max=float(sig[0]), rho=rho, variant="official")
        return sig, spec, "loss_fn.t_steps recorded in the file"
    if kind == "discrete":
        spec = ScheduleSpec(kind="discrete", num_steps=n, sigma_min=None, sigma_max=None, rho=rho, variant="official",
                            extra={"alphas_cumprod": "sd15"})
        return discrete_sigmas(n, rho=rho, variant="official").numpy(), spec, \
            "recomputed: SD1.5 discrete grid, authors' variant"
    if kind == "flowmatch":
        # The flow grid ignores rho (docs/authors-code.md §3.1), but the spec records the file's schedule_rho.
        config = dict(kwargs.get("backend_config") or {})
        if backend == "flux":
            mu = float(attrs.get("flowmatch_mu") or config.get("flowmatch_mu") or 1.15)
            spec = ScheduleSpec(kind="flowmatch", num_steps=n, sigma_min=None, sigma_max=1.0, rho=rho, mu=mu,
                                variant="official")
        else:
            shift = float(config.get("flowmatch_shift") or attrs.get("flowmatch_shift") or 3.0) if backend != "sd3" \
                else 3.0
            spec = ScheduleSpec(kind="flowmatch", num_steps=n, sigma_min=None, sigma_max=1.0, rho=rho, shift=shift,
                                variant="official")
        return flowmatch_sigmas(n, spec.shift, spec.mu, variant="official").numpy(), spec, \
            f"recomputed: {backend} flow-matching grid, authors' variant (diffusers set_timesteps, zero dropped)"
    sigma_min = float(attrs.get("sigma_min") or 0.002)
    sigma_max = float(attrs.get("sigma_max") or 80.0)
    spec = ScheduleSpec(kind=kind or "polynomial", num_steps=n, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho,
                        variant="official")
    return make_sigmas(spec).numpy(), spec, "recomputed from the file's schedule settings"


# ICCV tables record no backend, only their dataset_name: the pixel data sets ran NVIDIA's EDM networks, LSUN the
# CompVis latent model (docs/authors-code.md §5.1-5.2). The pixel tables get backend_config {"dataset": name},
# which picks the data set's network in backends.edm.
_ICCV_PIXEL_DATASETS = ("cifar10", "ffhq", "afhqv2", "imagenet64")
_ICCV_BACKENDS = {"lsun_bedroom_ldm": "lsun_ldm"}


def _official_backend(kwargs: dict) -> tuple[str, dict]:
    config = dict(kwargs.get("backend_config") or {})
    if kwargs.get("backend"):
        return str(kwargs["backend"]), config
    dataset = kwargs.get("dataset_name")
    if dataset in _ICCV_PIXEL_DATASETS and not config:
        config = {"dataset": dataset}
    return _ICCV_BACKENDS.get(dataset, "edm"), config


def table_from_official(snapshot: OfficialSnapshot) -> PredictorTable:
    """Effective table of an authors' predictor: ``r = sigmoid(r_params)``, ``w = softmax(weight_s)``, scales
    only where their flag (= half-width) is nonzero (docs/authors-code.md §2.2); the grid from the file or
    its settings."""
    kwargs, params, attrs = snapshot.init_kwargs, snapshot.parameters, snapshot.attributes
    src = str(snapshot.path)
    for needed in ("r_params", "weight_s"):
        if needed not in params:
            raise TableError(f"{src}: predictor has no parameter '{needed}'")
    if "num_steps" not in kwargs:
        raise TableError(f"{src}: predictor records no num_steps")
    n = kwargs["num_steps"]
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 2 <= n <= MAX_GRID_POINTS:
        raise TableError(f"{src}: num_steps must be an integer in 2..{MAX_GRID_POINTS} (got {n!r})")
    r_raw = params["r_params"].astype(np.float64)
    if r_raw.ndim != 2 or r_raw.shape[0] != n - 1:
        raise TableError(f"{src}: r_params has shape {r_raw.shape}, but num_steps {n} needs {n - 1} rows")
    k = kwargs.get("num_points", r_raw.shape[1])
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k != r_raw.shape[1]:
        raise TableError(f"{src}: num_points {k!r} does not match r_params' {r_raw.shape[1]} columns")
    w_raw = params["weight_s"].astype(np.float64)
    w = np.exp(w_raw - w_raw.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)
    scale_dir, scale_time = float(kwargs.get("scale_dir") or 0), float(kwargs.get("scale_time") or 0)
    dir_scales = _official_scale(params["scale_dir_params"].astype(np.float64), scale_dir) if scale_dir else None
    time_scales = _official_scale(params["scale_time_params"].astype(np.float64), scale_time) if scale_time else None
    sigmas, spec, grid_source = _official_grid(snapshot, kwargs, attrs)
    extra_attrs = {k: v for k, v in attrs.items() if k not in kwargs and k != "training"}
    backend, backend_config = _official_backend(kwargs)
    metadata = {
        "source": "official release (read without executing its embedded code)", "path": src,
        "sha256": snapshot.sha256, "backend": backend,
        "backend_config": backend_config, "dataset": kwargs.get("dataset_name"),
        "guidance_type": kwargs.get("guidance_type"), "guidance_rate": kwargs.get("guidance_rate"),
        "teacher": kwargs.get("sampler_tea"), "M": kwargs.get("M"), "alpha": kwargs.get("alpha"),
        "scale_dir_range": scale_dir, "scale_time_range": scale_time, "schedule": spec.to_dict(),
        "grid_source": grid_source, "init_kwargs": _plain(kwargs, "init_kwargs"),
        "extra_attributes": _plain(extra_attrs, "attributes"),
    }
    solver = kwargs.get("sampler_stu", "epd")
    return PredictorTable(positions=_sigmoid(r_raw), weights=w, sigmas=sigmas, dir_scales=dir_scales,
                          time_scales=time_scales, solver=solver, afs=bool(kwargs.get("afs", False)),
                          fcn=bool(kwargs.get("fcn", False)),
                          max_order=int(kwargs.get("max_order") or 3) if solver == "ipndm" else None,
                          metadata=metadata, source=src)


# -- describing tables (the CLI: tools/table_cli.py) -------------------------------------------------------------------------------------------------
def describe(table: PredictorTable) -> dict:
    counts = table.eval_count()
    return {"path": table.source, "num_steps": table.num_steps, "num_points": table.num_points,
            "solver": table.solver, "afs": table.afs, "fcn": table.fcn, "max_order": table.max_order,
            "nfe": {"sequential": counts.sequential, "total": counts.total},
            "r": table.positions.tolist(), "weights": table.weights.tolist(),
            "scale_dir": None if table.dir_scales is None else table.dir_scales.tolist(),
            "scale_time": None if table.time_scales is None else table.time_scales.tolist(),
            "sigmas": table.sigmas.tolist(), "metadata": table.metadata}


def format_rows(rows: list | None) -> str:
    if rows is None:
        return "  null (disabled)"
    return "\n".join(f"  [{i:2d}] " + "  ".join(f"{v:.6f}" for v in row) for i, row in enumerate(rows))


if __name__ == "__main__":      # ``python -m solvers.table``: the CLI lives in tools/table_cli.py (it knows backends)
    from tools.table_cli import main

    sys.exit(main())
