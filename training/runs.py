"""What the Stage-1 and Stage-2 trainers share: YAML configs with ``inherit:`` and overrides, run folders,
JSON-lines logs that a resumed run truncates, and one training loop (:class:`TrainingLoop`: resume, progress
bar, log, checkpoint, early stop, final export)."""

from __future__ import annotations

import fcntl
import json
import re
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from backends.distributed import rank_and_world
from safeio import atomic_text, atomic_torch_save

__all__ = ["TRAIN_SEED_BASE", "ConfigError", "compose_config", "new_run_dir", "discard_run_on_failure",
           "truncate_log", "append_jsonl", "open_run", "TrainingLoop"]


class ConfigError(ValueError):
    """A setting is invalid; the message names it."""


def _read(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'inherit' loop through {' -> '.join(str(p) for p in seen)}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    node = OmegaConf.load(path)
    parents = node.pop("inherit", None)
    if parents is None:
        return node
    merged = OmegaConf.create({})
    for parent in [parents] if isinstance(parents, str) else list(parents):
        merged = OmegaConf.merge(merged, _read(path.parent / parent, seen + (path,)))
    return OmegaConf.merge(merged, node)


def compose_config(defaults: Mapping[str, Any], path: str | Path | None = None, overrides: Iterable[str] = (),
                   open_sections: Iterable[str] = ()) -> DictConfig:
    """Defaults <- YAML file (with its ``inherit`` chain, paths relative to each file) <- ``key=value`` overrides.

    Struct mode makes a misspelt key an error; ``open_sections`` (e.g. ``backend``) accept any key, since
    their options belong to someone else (a backend's loader, a reward head).
    """
    config = OmegaConf.create(dict(defaults))
    OmegaConf.set_struct(config, True)
    for section in open_sections:
        OmegaConf.set_struct(OmegaConf.select(config, section), False)
    overrides = list(overrides)
    for item in overrides:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise ConfigError(f"override {item!r} is not of the form key=value")
    try:
        if path is not None:
            config = OmegaConf.merge(config, _read(Path(path)))
        kinds = OmegaConf.create(dict(defaults))
        _check_kinds(kinds, config, str(path or "the config"))
        if overrides:
            config = OmegaConf.merge(config, OmegaConf.from_dotlist(overrides))
            _check_kinds(kinds, config, "overrides")
    except ConfigError:
        raise
    except Exception as err:  # omegaconf's own errors name the key
        raise ConfigError(f"{path or 'overrides'}: {err}") from None
    return config


def _check_kinds(defaults: DictConfig, config: DictConfig, where: str, prefix: str = "") -> None:
    """A setting whose default is a number, flag or string must not become a list or mapping (and a mapping
    not a scalar): ``batch=[1,2]`` is refused here, by name, instead of failing later inside a trainer."""
    for key in defaults:
        if key not in config:
            continue
        default, value = defaults._get_node(key), config._get_node(key)
        name = f"{prefix}{key}"
        if isinstance(default, DictConfig):
            if isinstance(value, DictConfig):
                _check_kinds(default, value, where, f"{name}.")
            elif not OmegaConf.is_missing(config, key) and config[key] is not None:
                raise ConfigError(f"{where}: {name} must be a mapping (got {config[key]!r})")
        elif OmegaConf.is_config(value) and not OmegaConf.is_config(default) and defaults[key] is not None:
            raise ConfigError(f"{where}: {name} must be a single value like its default {defaults[key]!r}")
        elif not OmegaConf.is_config(value) and not OmegaConf.is_missing(config, key):
            _check_scalar(defaults[key], config[key], f"{where}: {name}")


def _check_scalar(default: Any, value: Any, name: str) -> None:
    """A number stays a number and a flag a flag: ``batch=abc`` is refused by name here, not by int() later."""
    if value is None or default is None or isinstance(default, str):
        return
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false (got {value!r})")
        return
    # Numbers stay numbers; an integer default may take a float (total_kimg: 20 by default, 0.5 for a smoke run).
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{name} must be a number like its default {default!r} (got {value!r})")
    try:
        float(value)
    except ValueError:
        raise ConfigError(f"{name} must be a number like its default {default!r} (got {value!r})") from None


def new_run_dir(outdir: str | Path, name: str) -> Path:
    """``<outdir>/<id:05d>-<name>`` with the next free id (the authors' numbering)."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "run"
    # Runs starting together (a sweep, several shells) must not take the same id: list and claim under a lock.
    with open(outdir / ".run-ids.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ids = [int(m.group(1)) for p in outdir.iterdir() if (m := re.match(r"(\d{5})-", p.name))]
        path = outdir / f"{max(ids, default=0) + 1:05d}-{safe}"
        path.mkdir()
    return path


def append_jsonl(path: Path, record: Mapping[str, Any]) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def truncate_log(path: Path, key: str, upto: int) -> None:
    """Keep the lines of a JSON-lines log with ``record[key] <= upto`` (a resumed run writes the rest again);
    a line cut by a kill ends the kept part."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get(key, 0) <= upto:
                kept.append(line)
        except json.JSONDecodeError:
            break
    atomic_text(path, "".join(f"{line}\n" for line in kept))


# Training trajectories draw their noise from seeds >= 2^31: benchmark and sampling seeds start at 0 and the
# held-out validation seeds at 2^30, so no training noise is ever scored.
TRAIN_SEED_BASE = 1 << 31


@contextmanager
def discard_run_on_failure(folder: Path, fresh: bool) -> Iterator[None]:
    """A run that fails while it is being set up leaves no folder behind: on an exception, a ``fresh`` folder
    holding only the ``config.yaml`` that :func:`open_run` wrote is removed (rank 0) before re-raising."""
    try:
        yield
    except BaseException:
        rank, _ = rank_and_world()
        if fresh and rank == 0 and folder.is_dir() and {p.name for p in folder.iterdir()} <= {"config.yaml"}:
            for item in folder.iterdir():
                item.unlink()
            folder.rmdir()
        raise


def open_run(config: DictConfig | str | Path | None, overrides: list[str] | None, resume: str | Path | None,
             run_dir: str | Path | None, load: Callable[..., DictConfig],
             where: Callable[[DictConfig], tuple[str, str]]) -> tuple[DictConfig, Path]:
    """The run folder and config of a training job, on every rank.

    ``resume``: an existing folder, whose saved ``config.yaml`` is used (with ``overrides``). Otherwise the config
    (an object, or a YAML path for ``load(path, overrides)``) gets a new folder ``where(config) = (outdir, name)``
    (or ``run_dir``), created by rank 0, which writes the resolved config there and tells the other ranks.
    """
    rank, _ = rank_and_world()
    if resume is not None:
        folder = Path(resume)
        if not (folder / "config.yaml").is_file():
            raise FileNotFoundError(f"{folder} is not a run folder (no config.yaml)")
        return load(folder / "config.yaml", overrides or []), folder
    if not isinstance(config, DictConfig):
        config = load(config, overrides or [])
    chosen = None
    if rank == 0:
        chosen = Path(run_dir) if run_dir is not None else new_run_dir(*where(config))
        chosen.mkdir(parents=True, exist_ok=True)
        atomic_text(chosen / "config.yaml", OmegaConf.to_yaml(config))
    if dist.is_initialized():
        shared = [str(chosen) if chosen is not None else None]
        dist.broadcast_object_list(shared, src=0)
        chosen = Path(shared[0])
    assert chosen is not None
    return config, chosen


class TrainingLoop:
    """The loop both trainers run (Stage-1 :class:`training.distill.trainer.Distiller`, Stage-2
    :class:`training.ppo.trainer.RDPOTrainer`): resume from ``checkpoint.pt``, then per iteration train, score,
    show progress, append the JSON-lines log, checkpoint, and stop early or at ``stop_after``; at the end the
    trainer writes its tables.

    A subclass sets ``run_dir``, ``rank``, ``progress``, ``stop_after``, ``iterations`` (the total) and
    ``start_iteration`` and implements :meth:`checkpoint_state`, :meth:`restore`, :meth:`train_iteration`,
    :meth:`finish` and ``table()``; the other hooks have defaults. Resuming a finished run returns
    :meth:`existing_result` and writes nothing. ``log_key`` names the counter in its logs,
    whose lines past a checkpoint a resumed run drops (``logs``) and writes again.
    """

    log_key = "iteration"
    logs: tuple[str, ...] = ("log.jsonl",)
    desc = "train"
    unit = "it"

    run_dir: Path
    rank: int
    progress: bool
    stop_after: int | None
    iterations: int
    start_iteration: int

    # -- hooks ---------------------------------------------------------------------------------------------
    def checkpoint_state(self, done: int) -> dict:
        """What ``checkpoint.pt`` holds after ``done`` iterations (tensors, numbers, strings: weights-only)."""
        raise NotImplementedError

    def restore(self, saved: dict) -> int:
        """Load a checkpoint's state; returns the number of iterations it had done."""
        raise NotImplementedError

    def train_iteration(self, iteration: int) -> dict:
        """One iteration; returns its log record."""
        raise NotImplementedError

    def finish(self, seconds: float, record: dict) -> Any:
        """Write the run's results after the last iteration (every rank calls it); returns the final table."""
        raise NotImplementedError

    def table(self) -> Any:
        raise NotImplementedError

    def existing_result(self) -> Any:
        """The results a finished run already wrote (its final table), or None if they are not all there."""
        return None

    def before_loop(self, resumed: bool) -> None:
        """Work before the first iteration of this launch (a precomputed teacher, a first evaluation)."""

    def score(self, done: int, record: dict) -> bool:
        """Evaluate after iteration ``done`` (adding to ``record``); True stops the run early."""
        return False

    def postfix(self, record: dict) -> dict:
        """What the progress bar shows of a record."""
        return {}

    def logs_record(self, done: int) -> bool:
        return True

    def checkpoints_after(self, done: int) -> bool:
        return True

    # -- the loop --------------------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoint.pt"

    def save_checkpoint(self, done: int) -> None:
        if self.rank == 0:
            atomic_torch_save(self.checkpoint_state(done), self.checkpoint_path)

    def load_checkpoint(self, map_location: Any = "cpu") -> bool:
        """Restore from ``checkpoint.pt`` if present and drop the log lines written after it."""
        if not self.checkpoint_path.is_file():
            return False
        try:
            saved = torch.load(self.checkpoint_path, map_location=map_location, weights_only=True)
        except Exception as err:  # noqa: BLE001 - a truncated or foreign file: say which and what to do
            raise ValueError(f"{self.checkpoint_path} is damaged or not a checkpoint of this trainer "
                             f"({type(err).__name__}); remove it to restart the run from scratch") from None
        self.start_iteration = self.restore(saved)
        if self.rank == 0:
            for name in self.logs:
                truncate_log(self.run_dir / name, self.log_key, self.start_iteration)
        return True

    def run(self) -> Any:
        """Train (resuming from ``checkpoint.pt`` if present) and write the results; a run stopped by
        ``stop_after`` returns the current table and writes nothing final (a later launch resumes it)."""
        resumed = self.load_checkpoint()
        if resumed and self.start_iteration >= self.iterations:
            existing = self.existing_result()
            if existing is not None:      # a finished run: resuming it again must not rewrite its results
                return existing
        self.before_loop(resumed)
        bar = tqdm(total=self.iterations, initial=self.start_iteration, disable=not self.progress or self.rank != 0,
                   desc=self.desc, unit=self.unit)
        start = time.perf_counter()
        record: dict = {}
        for iteration in range(self.start_iteration, self.iterations):
            tick = time.perf_counter()
            record = self.train_iteration(iteration)
            record["seconds"] = round(time.perf_counter() - tick, 4)
            record["time"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            done = iteration + 1
            stop = self.score(done, record)
            bar.set_postfix(**self.postfix(record))
            bar.update()
            if self.rank == 0 and self.logs_record(done):
                append_jsonl(self.run_dir / self.logs[0], record)
            if self.checkpoints_after(done) or done == self.iterations or stop:
                self.save_checkpoint(done)
            if stop:
                break
            if self.stop_after is not None and self.stop_after <= done < self.iterations:
                bar.close()
                return self.table()
        bar.close()
        return self.finish(time.perf_counter() - start, record)
