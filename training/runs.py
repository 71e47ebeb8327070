"""What the Stage-1 and Stage-2 trainers share: YAML configs with ``inherit:`` and overrides, run folders,
atomic writes, JSON-lines logs that a resumed run truncates, and the torchrun process group."""

from __future__ import annotations

import fcntl
import io
import json
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from solvers.table import atomic_write

__all__ = ["ConfigError", "compose_config", "new_run_dir", "discard_run_on_failure", "atomic_torch_save", "atomic_text", "truncate_log",
           "init_distributed", "append_jsonl", "open_run", "rank_and_world", "rank_device"]


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
    try:
        if path is not None:
            config = OmegaConf.merge(config, _read(Path(path)))
        overrides = list(overrides)
        if overrides:
            config = OmegaConf.merge(config, OmegaConf.from_dotlist(overrides))
    except ConfigError:
        raise
    except Exception as err:  # omegaconf's own errors name the key
        raise ConfigError(f"{path or 'overrides'}: {err}") from None
    return config


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


def atomic_torch_save(obj: Any, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, buffer.getvalue())


def atomic_text(path: Path, text: str) -> None:
    atomic_write(path, text.encode())


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


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (0 and 1 outside torch.distributed)."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_device(name: str = "auto") -> torch.device:
    """``auto``: this rank's GPU (``cuda:$LOCAL_RANK``) when CUDA is available, else the CPU; or ``name``."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_distributed() -> None:
    """Join the torchrun process group: NCCL for CUDA tensors and gloo for CPU ones on a GPU machine (small
    CPU-side state such as the RDPO policy is reduced through gloo), gloo on CPU; a no-op for one process."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend="cpu:gloo,cuda:nccl")
    else:
        dist.init_process_group(backend="gloo")


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
