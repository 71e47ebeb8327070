"""Stage-1 distillation settings: defaults, YAML files with ``inherit:``, ``key=value`` overrides, checks.

Every setting has a default here (the authors' ``train.py`` defaults where they exist, docs/authors-code.md §6.1); a
YAML file overrides some of them and may ``inherit:`` another file (a path relative to itself, or a list of them, merged
in order). ``--override a.b=value`` (omegaconf dotlist syntax) comes last. The resolved config is written into the run
folder, so a run is reproducible from its folder alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, OmegaConf

from training.runs import ConfigError, compose_config

__all__ = ["DEFAULTS", "ConfigError", "load_config", "validate", "PIXEL_DATASETS"]

# Datasets the authors' last-step-only rule applies to (docs/authors-code.md §6.3, 9.24).
PIXEL_DATASETS = ("cifar10", "ffhq", "afhqv2", "imagenet64")

DEFAULTS: dict[str, Any] = {
    "name": "distill",
    "dataset": None,                  # metadata; selects the authors' loss-step rule (docs/authors-code.md §9.24)
    "backend": {"name": "gmm"},       # passed to backends.load_backend(name, **rest)
    "guidance": {"type": None, "rate": 1.0},
    "conditions": {                   # what each trajectory is conditioned on
        "prompt_file": None,          # one prompt per line (or a CSV column, see prompt_column)
        "prompt_column": None,
        "num_classes": 0,             # > 0: random class labels 0..n-1 (class-conditional models)
    },
    "schedule": {"kind": "polynomial", "rho": 7.0, "sigma_min": None, "sigma_max": None,
                 "variant": "correct", "shift": None, "mu": None},
    "student": {
        "solver": "epd",              # epd | ipndm (the EPD-Plugin)
        "num_steps": 4,               # N grid points, N-1 steps
        "num_points": 2,              # K
        "afs": True,
        "scale_dir": 0.01,            # half-width of the direction-scale range; 0 disables (docs/authors-code.md §2.2)
        "scale_time": 0.0,
        "fcn": False,
        "max_order": 3,               # plugin only
        "init": "uniform",            # uniform | random (the authors' N(0,1)) | path to a table
        "init_positions": [0.335, 0.665],
    },
    "teacher": {
        "solver": "heun",             # a registry solver, or "reference" (adaptive, for exact models)
        "M": 1,                       # intermediate teacher steps per student interval
        "grid": "same",               # same: the student's grid family refined M-fold | log: each interval split
                                      # uniformly in log sigma (both keep the student's points)
        "inner_steps": 2,             # the authors' refinement (docs/authors-code.md §4, §6.2): every teacher interval
                                      # split again by a polynomial rho-7 grid of this many points; 2: no split,
                                      # 3: their ICCV heun/dpm teachers (2 sub-steps each)
        "inner_dtype": "float32",     # float32: the inner grid as their get_schedule computes it | float64
        "rtol": 1.0e-6,               # reference teacher only
        "cache": None,                # folder for cached teacher trajectories (null: no cache)
        "precompute": 0,              # > 0: before training, solve the teacher for every iteration's trajectories
                                      # this many at a time into the cache (one large batch per solve; needs cache)
    },
    "loss": {
        "steps": "auto",              # auto (authors' rule) | all | last
        "backprop": "trajectory",     # trajectory (authors: BPTT through the student) | step (detach per step)
        "alpha": 10.0,                # weight of the final-step feature loss (docs/authors-code.md §6.3)
        "features": "data",           # data | inception | lpips
        "features_path": None,        # local weights for inception / lpips backbones
        "final": "features",          # features (authors: replaces the data loss) | features+data
    },
    "optim": {"lr": 5.0e-3, "betas": [0.9, 0.999], "eps": 1.0e-8, "cosine": False, "eta_min": 0.01},
    "batch": 512,                     # trajectories per iteration, all ranks together
    "batch_gpu": None,                # per-rank micro-batch (gradient accumulation); null = no split
    "total_kimg": 10.0,               # thousands of trajectories in total
    "seed": 0,
    "dtype": "auto",                  # auto (backend's state dtype) | float32 | float64
    "device": "auto",
    "outdir": "exps",
    "export": None,                   # also write the final table here (e.g. exps/gmm/epd-nfe5.pkl)
    "checkpoint_every": 25,           # iterations
    "snapshot_tables": False,         # also keep a table file per checkpoint
    "plot": True,                     # draw table.png at the end (search candidates skip it)
    "validation": {                   # held-out trajectories scored during training (training/distill/validation.py)
        "num": 256,                   # trajectories (seeds 2^30 + j); 0 turns validation off
        "every": 25,                  # iterations between scores (and at the end)
        "batch": 256,                 # trajectories per call
        "reference": {"solver": "auto",   # auto: the adaptive solve for exact models, else dpmpp3m
                      "steps": 256, "rtol": 1.0e-7},
        "select": "best",             # best (the lowest validation error) | last: which parameters become the table
        "patience": 0,                # stop after this many scores without improvement (0: never)
        "cache": ".cache/validation", # reference states, shared by runs and search candidates (null: none)
    },
    "compare": {                      # at the end: the table against every handcrafted solver on the validation set
        "enabled": True,
        "solvers": ["ipndm", "dpmpp3m", "dpmpp2m", "unipc", "euler", "heun", "dpm2"],
        "schedules": ["auto"],        # auto: time_uniform, polynomial rho 7, logsnr (+ discrete / flowmatch)
    },
    "search": {                       # recipe search (training/distill/search.py): candidates x short runs
        "enabled": False,
        "kimg": "auto",               # each candidate's budget in kimg; auto: total_kimg / (2 x candidates)
        "schedules": ["auto"],        # grid kinds tried (as compare.schedules)
        "loss_steps": ["all", "last"],
        "scales": [0.2],              # student.scale_dir = student.scale_time = each value
        "lr": [0.1],
        "keep_existing": True,        # keep an existing export file when it scores better on validation
    },
}

_CHOICES = {
    "student.solver": ("epd", "ipndm"),
    "loss.steps": ("auto", "all", "last"),
    "loss.backprop": ("trajectory", "step"),
    "loss.features": ("data", "inception", "lpips"),
    "loss.final": ("features", "features+data"),
    "dtype": ("auto", "float32", "float64"),
    "schedule.kind": ("polynomial", "logsnr", "time_uniform", "discrete", "flowmatch"),
    "validation.select": ("best", "last"),
    "teacher.grid": ("same", "log"),
    "teacher.inner_dtype": ("float32", "float64"),
}
_SCHEDULE_KINDS = ("polynomial", "logsnr", "time_uniform", "discrete", "flowmatch")


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> DictConfig:
    """Defaults <- YAML file (with its ``inherit`` chain) <- ``key=value`` overrides; then :func:`validate`."""
    config = compose_config(DEFAULTS, path, overrides, open_sections=("backend",))
    validate(config)
    return config


def validate(config: DictConfig) -> None:
    """Check types and ranges, with messages that name the setting."""

    def get(key: str) -> Any:
        return OmegaConf.select(config, key)

    def fail(key: str, why: str) -> None:
        raise ConfigError(f"setting '{key}' {why} (got {get(key)!r})")

    for key, allowed in _CHOICES.items():
        if get(key) not in allowed:
            fail(key, f"must be one of {', '.join(allowed)}")
    student = config.student
    if int(student.num_steps) < 2:
        fail("student.num_steps", "must be >= 2 (N grid points give N-1 steps)")
    if int(student.num_points) < 1:
        fail("student.num_points", "must be >= 1")
    for key in ("student.scale_dir", "student.scale_time"):
        if not 0 <= float(get(key)) < 1:
            fail(key, "must lie in [0, 1) (it is the half-width of the scale range around 1)")
    if student.solver == "ipndm" and not 1 <= int(student.max_order) <= 4:
        fail("student.max_order", "must be 1..4 for the iPNDM plugin")
    if isinstance(student.init, str) and student.init not in ("uniform", "random") and not Path(student.init).is_file():
        fail("student.init", "must be 'uniform', 'random' or an existing table file")
    if len(student.init_positions) != int(student.num_points):
        fail("student.init_positions", f"needs one position per point (num_points = {student.num_points})")
    if not all(0 < float(r) < 1 for r in student.init_positions):
        fail("student.init_positions", "must lie in (0, 1)")
    if config.teacher.solver != "reference":
        from solvers.registry import get_solver

        try:
            get_solver(config.teacher.solver)
        except KeyError as err:
            raise ConfigError(f"setting 'teacher.solver': {err.args[0]}; or 'reference'") from None
    if int(config.teacher.M) < 0:
        fail("teacher.M", "must be >= 0")
    inner = float(config.teacher.inner_steps)
    if not (inner >= 2 and inner < 2 ** 31 and inner == int(inner)):     # also refuses nan and inf
        fail("teacher.inner_steps", "must be an integer >= 2 (2: no inner split; 3: the authors' ICCV teachers)")
    if inner > 2 and config.teacher.solver == "reference":
        fail("teacher.inner_steps", "splits the grid of a fixed-step teacher; the reference solver is adaptive "
                                    "(use 2)")
    if int(config.teacher.precompute) < 0:
        fail("teacher.precompute", "must be >= 0 (0: the teacher runs batch by batch)")
    if int(config.teacher.precompute) > 0 and not config.teacher.cache:
        fail("teacher.precompute", "needs teacher.cache (the precomputed trajectories are kept there)")
    if float(config.loss.alpha) < 0:
        fail("loss.alpha", "must be >= 0")
    if float(config.optim.lr) <= 0:
        fail("optim.lr", "must be > 0")
    if int(config.batch) < 1:
        fail("batch", "must be >= 1")
    if config.batch_gpu is not None and int(config.batch_gpu) < 1:
        fail("batch_gpu", "must be >= 1 or null")
    if float(config.total_kimg) <= 0:
        fail("total_kimg", "must be > 0")
    if int(config.checkpoint_every) < 1:
        fail("checkpoint_every", "must be >= 1")
    val = config.validation
    if int(val.num) < 0:
        fail("validation.num", "must be >= 0 (0 turns validation off)")
    for key in ("validation.every", "validation.batch", "validation.reference.steps"):
        if int(get(key)) < 1:
            fail(key, "must be >= 1")
    if int(val.patience) < 0:
        fail("validation.patience", "must be >= 0")
    if val.reference.solver not in ("auto", "reference"):
        from solvers.registry import get_solver

        try:
            get_solver(val.reference.solver)
        except KeyError as err:
            raise ConfigError(f"setting 'validation.reference.solver': {err.args[0]}; or 'auto' or 'reference'") from None
    for section in ("compare.schedules", "search.schedules"):
        for item in get(section):
            kind = item if isinstance(item, str) else OmegaConf.select(item, "kind")
            if kind not in ("auto",) + _SCHEDULE_KINDS:
                fail(section, f"lists grid kinds: auto or {', '.join(_SCHEDULE_KINDS)} (or {{kind, rho}})")
    if config.compare.enabled or config.search.enabled:
        from solvers.registry import get_solver

        for name in config.compare.solvers:
            try:
                get_solver(name)
            except KeyError as err:
                raise ConfigError(f"setting 'compare.solvers': {err.args[0]}") from None
    search = config.search
    if search.enabled:
        if int(val.num) < 1:
            fail("validation.num", "must be >= 1 for a recipe search (candidates are ranked on validation)")
        if search.kimg != "auto" and float(search.kimg) <= 0:
            fail("search.kimg", "must be > 0 or auto")
        for key, allowed in (("search.loss_steps", ("all", "last")),):
            values = list(get(key))
            if not values or any(v not in allowed for v in values):
                fail(key, f"must be a non-empty list of {', '.join(map(str, allowed))}")
        if not list(search.scales) or any(not 0 <= float(v) < 1 for v in search.scales):
            fail("search.scales", "must be a non-empty list of values in [0, 1)")
        if not list(search.lr) or any(float(v) <= 0 for v in search.lr):
            fail("search.lr", "must be a non-empty list of values > 0")
