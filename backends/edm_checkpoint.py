"""Code-free reading of NVIDIA's EDM network pickles, and a pickle-free safetensors format for them.

NVIDIA's files (``edm-cifar10-32x32-uncond-vp.pkl``, ...) are ``pickle.dump`` of a dict such as
``{'ema': <network>, 'loss_fn': ..., 'augment_pipe': ..., 'dataset_kwargs': {...}}`` written with
``torch_utils.persistence``: every custom module, nested layers included, pickles as a call
``torch_utils.persistence._reconstruct_persistent_obj(meta)`` whose ``meta`` holds the module's whole source
(``module_src``), its ``class_name`` and its ``state`` (the ``nn.Module.__dict__``: ``_parameters``,
``_buffers``, ``_modules``, ``_init_args``/``_init_kwargs``, ...). Loading them normally executes that source.

This reader never imports or executes anything a pickle names (docs/authors-code.md §2.4-2.5; the unpickler of
:mod:`safeio.unpickle` with a wider whitelist): persistent objects become inert
:class:`~safeio.PersistentRecord`s, tensors numpy arrays, ``torch.nn`` containers and activations
inert stubs, numpy scalars plain numbers; any other global is refused with
:class:`~safeio.UnsafePickleError` before it is called. The network is then rebuilt from the top-level
record's ``class_name`` and ``init_kwargs`` with our classes (:mod:`backends.edm_networks`), its parameters and
buffers collected by walking the nested ``_modules`` records, and loaded strictly.

Converted files (:func:`save_edm`) are safetensors with the constructor recorded as JSON in the header, so they
load without any pickle::

    python -m backends.edm_checkpoint convert edm-cifar10-32x32-uncond-vp.pkl edm-cifar10-32x32-uncond-vp.safetensors
    python -m backends.edm_checkpoint show edm-cifar10-32x32-uncond-vp.safetensors
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from safeio.limits import MAX_NETWORK_BYTES, LimitError, check_size, check_structure
from safeio.unpickle import (BASE_GLOBALS, InertStub, PersistentRecord, UnsafePickleError, inert_class,
                              restricted_load)

from .edm_networks import PRECOND_CLASSES, build_precond

__all__ = ["CheckpointError", "EDMCheckpoint", "read_edm_pickle", "network_from_checkpoint", "save_edm", "load_edm",
           "FORMAT"]

FORMAT = "epd-solver/edm-network"


class CheckpointError(ValueError):
    """A network file is not what it should be (unknown class, missing or unexpected tensors, bad header)."""


# --- safe stand-ins for the few non-torch globals these pickles use ---------------------------------------------
class _DType:
    """``numpy.dtype(spec, align, copy)`` for plain numeric kinds; the byte order comes from the BUILD state."""

    def __init__(self, spec: Any, align: Any = False, copy: Any = False):
        try:
            dtype = np.dtype(str(spec))
        except TypeError:
            dtype = None
        if dtype is None or dtype.kind not in "biufc" or dtype.hasobject:
            raise UnsafePickleError(f"refusing numpy dtype {spec!r}: only plain numeric dtypes are read")
        self.dtype = dtype

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(state[1])


def _numpy_scalar(dtype: Any, data: Any) -> Any:
    """``numpy.core.multiarray.scalar``: a number stored as raw bytes, returned as a plain Python number."""
    if not isinstance(dtype, _DType) or not isinstance(data, bytes) or len(data) != dtype.dtype.itemsize:
        raise UnsafePickleError("refusing a numpy scalar that is not a plain number")
    return np.frombuffer(data, dtype=dtype.dtype)[0].item()


class _NDArray:
    """``numpy.core.multiarray._reconstruct(ndarray, ...)`` + BUILD: a numeric array kept in ``.array``."""

    def __init__(self, *_: Any):
        self.array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        _version, shape, dtype, fortran, raw = state
        if not isinstance(dtype, _DType) or not isinstance(raw, bytes):
            raise UnsafePickleError("refusing a numpy array that is not plain numeric data")
        self.array = np.frombuffer(raw, dtype=dtype.dtype).reshape(shape, order="F" if fortran else "C").copy()


class _EasyDict(dict):
    """``dnnlib.util.EasyDict``: read as a plain dict."""


def _rebuild_parameter_with_state(data: Any, *_: Any) -> Any:
    return data


_TORCH_MODULES = {
    "torch.nn.modules.container": ("ModuleDict", "ModuleList", "Sequential", "ParameterDict", "ParameterList"),
    "torch.nn.modules.activation": ("SiLU", "ReLU", "GELU", "Sigmoid", "Softmax", "Tanh", "LeakyReLU"),
    "torch.nn.modules.dropout": ("Dropout",),
    "torch.nn.modules.linear": ("Identity",),
}

_NETWORK_GLOBALS: dict[tuple[str, str], Any] = {
    **BASE_GLOBALS,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    **{(module, name): inert_class(module, name) for module, names in _TORCH_MODULES.items() for name in names},
    **{(module, "scalar"): _numpy_scalar for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(module, "_reconstruct"): _NDArray for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    ("numpy", "ndarray"): _NDArray,
    ("numpy", "dtype"): _DType,
    ("dnnlib.util", "EasyDict"): _EasyDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
}


def _plain(value: Any) -> Any:
    """Recorded constructor arguments as JSON-able data (tuples to lists, dict subclasses to dicts)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise CheckpointError(f"a recorded constructor argument is a {type(value).__name__}, not plain data")


def _module_state(obj: Any) -> dict | None:
    if isinstance(obj, PersistentRecord):
        return obj.state
    if isinstance(obj, InertStub) and isinstance(obj.state, dict):
        return obj.state
    return None


def _collect_tensors(record: Any, prefix: str, out: dict[str, np.ndarray]) -> None:
    state = _module_state(record)
    if state is None:
        raise CheckpointError(f"submodule {prefix.rstrip('.') or '<root>'} is a {type(record).__name__}, "
                              "not a module record")
    transient = set(state.get("_non_persistent_buffers_set") or ())
    for kind in ("_parameters", "_buffers"):
        for name, value in (state.get(kind) or {}).items():
            if value is None or (kind == "_buffers" and name in transient):
                continue
            if not isinstance(value, np.ndarray):
                raise CheckpointError(f"{prefix}{name} is a {type(value).__name__}, not a tensor")
            out[prefix + name] = value
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            _collect_tensors(child, f"{prefix}{name}.", out)


@dataclass
class EDMCheckpoint:
    """A network read from an EDM pickle as data: what to build and the tensors to load.

    ``class_name``/``init_args``/``init_kwargs``: the recorded constructor call of the top-level network;
    ``state_dict``: flat ``name -> array`` (parameters and persistent buffers, nested modules walked);
    ``entries``: the pickle's top-level keys; ``attributes``: the network's public plain attributes.
    """

    path: Path
    sha256: str
    class_name: str
    init_args: list
    init_kwargs: dict
    state_dict: dict[str, np.ndarray]
    entries: list[str] = field(default_factory=list)
    attributes: dict = field(default_factory=dict)

    def config(self) -> dict:
        """Constructor and provenance, as :func:`save_edm` records them."""
        return {"class_name": self.class_name, "init_args": self.init_args, "init_kwargs": self.init_kwargs,
                "source": {"path": self.path.name, "sha256": self.sha256, "format": "NVIDIA EDM pickle"}}


def read_edm_pickle(path: str | Path, key: str = "ema") -> EDMCheckpoint:
    """Read ``path`` (an NVIDIA EDM network pickle) without executing anything it names; ``key`` selects the
    network in the snapshot dict (``ema`` in NVIDIA's files). A bare pickled network is accepted too."""
    path = Path(path)
    check_size(path.stat().st_size, MAX_NETWORK_BYTES, str(path), "EDM network")
    data = path.read_bytes()
    try:
        obj = restricted_load(data, str(path), _NETWORK_GLOBALS, "NVIDIA's EDM network pickle format")
    except (UnsafePickleError, LimitError):
        raise
    except Exception as err:  # noqa: BLE001 - truncated, empty or junk files trip the unpickler in many ways
        raise CheckpointError(f"{path}: not a readable EDM network pickle ({type(err).__name__}: {err})") from None
    entries = [str(k) for k in obj] if isinstance(obj, dict) else []
    record = obj.get(key) if isinstance(obj, dict) else obj
    if not isinstance(record, PersistentRecord):
        found = f"entries {entries}" if entries else f"a {type(obj).__name__}"
        raise CheckpointError(f"{path}: no persistent network under {key!r} (found {found})")
    if record.class_name not in PRECOND_CLASSES:
        raise CheckpointError(f"{path}: the network is a {record.class_name!r}; this reader rebuilds "
                              f"{', '.join(PRECOND_CLASSES)}")
    state = record.state
    init_kwargs = _plain(dict(state.get("_init_kwargs") or {}))
    init_args = _plain(list(state.get("_init_args") or []))
    model_type = init_kwargs.get("model_type", PRECOND_CLASSES[record.class_name].default_model_type)
    inner = (state.get("_modules") or {}).get("model")
    if isinstance(inner, PersistentRecord) and inner.class_name != model_type:
        raise CheckpointError(f"{path}: the inner network is a {inner.class_name!r} but model_type says "
                              f"{model_type!r}")
    tensors: dict[str, np.ndarray] = OrderedDict()
    _collect_tensors(record, "", tensors)
    attributes = {k: v for k, v in state.items()
                  if not k.startswith("_") and isinstance(v, (bool, int, float, str, type(None)))}
    return EDMCheckpoint(path, hashlib.sha256(data).hexdigest(), record.class_name, init_args, init_kwargs,
                         dict(tensors), entries, attributes)


def _check_names_and_shapes(net: torch.nn.Module, tensors: dict[str, Any], source: str) -> dict:
    """The network's tensors and the stored ones have the same names and shapes (CheckpointError otherwise)."""
    expected = net.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        def names(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")

        parts = ([f"missing {len(missing)}: {names(missing)}"] if missing else []) + \
                ([f"unexpected {len(unexpected)}: {names(unexpected)}"] if unexpected else [])
        raise CheckpointError(f"{source}: the tensors do not match the rebuilt {type(net).__name__} "
                              f"({'; '.join(parts)})")
    for name, value in tensors.items():
        if tuple(np.shape(value)) != tuple(expected[name].shape):
            raise CheckpointError(f"{source}: {name} has shape {tuple(np.shape(value))}, the rebuilt network expects "
                                  f"{tuple(expected[name].shape)}")
    return expected


def _load_strict(net: torch.nn.Module, tensors: dict[str, Any], source: str) -> None:
    _check_names_and_shapes(net, tensors, source)
    converted = {name: value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))
                 for name, value in tensors.items()}
    net.load_state_dict(converted, strict=True)


def _build_checked(class_name: str, init_args: Any, init_kwargs: Any, tensors: dict[str, Any],
                   source: str) -> torch.nn.Module:
    """The recorded network, built only after its layout on the meta device (no memory) matched the stored
    tensors' names and shapes: the constructor arguments are untrusted. Loaded strictly, eval, no gradients."""
    try:
        _check_names_and_shapes(build_precond(class_name, init_args or [], init_kwargs or {}, device="meta"),
                                tensors, source)
        net = build_precond(class_name, init_args or [], init_kwargs or {})
    except CheckpointError:
        raise
    except (ValueError, TypeError, RuntimeError) as err:
        raise CheckpointError(f"{source}: {err}") from None
    _load_strict(net, tensors, source)
    return net.eval().requires_grad_(False)


def network_from_checkpoint(checkpoint: EDMCheckpoint) -> torch.nn.Module:
    """Rebuild the network a checkpoint records and load its tensors strictly (eval mode, no gradients)."""
    return _build_checked(checkpoint.class_name, checkpoint.init_args, checkpoint.init_kwargs, checkpoint.state_dict,
                          str(checkpoint.path))


def save_edm(net: torch.nn.Module, path: str | Path, source: dict | None = None) -> Path:
    """Write a network of :mod:`backends.edm_networks` as safetensors; the header's ``config`` JSON records the
    class and constructor keywords (``net.init_kwargs``), ``source`` its provenance. Written atomically."""
    from safetensors.torch import save

    from safeio import atomic_write

    class_name = type(net).__name__
    if class_name not in PRECOND_CLASSES or not hasattr(net, "init_kwargs"):
        raise CheckpointError(f"save_edm takes a network of backends.edm_networks ({', '.join(PRECOND_CLASSES)}), "
                              f"not a {class_name}")
    config = {"class_name": class_name, "init_args": [], "init_kwargs": _plain(net.init_kwargs),
              "source": _plain(source or {})}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
    path = Path(path)
    atomic_write(path, save(tensors, metadata={"format": FORMAT, "version": "1", "config": json.dumps(config)}))
    return path


def _read_safetensors(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as err:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    if header.get("format") != FORMAT or "config" not in header:
        raise CheckpointError(f"{path}: not an EDM network written by save_edm (header format "
                              f"{header.get('format')!r}; convert NVIDIA's .pkl with "
                              "`python -m backends.edm_checkpoint convert IN.pkl OUT.safetensors`)")
    if header.get("version") != "1":
        raise CheckpointError(f"{path}: format version {header.get('version')!r} is not one this reader knows (1); "
                              "a newer release of this code may read it")
    try:
        config = json.loads(header["config"])
    except (json.JSONDecodeError, RecursionError) as err:
        raise CheckpointError(f"{path}: invalid config JSON in the header ({type(err).__name__})") from None
    check_structure(config, str(path))
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: the header's config is a {type(config).__name__}, not a mapping")
    return config, tensors


def load_edm(path: str | Path, key: str = "ema") -> tuple[torch.nn.Module, dict]:
    """Load a network from NVIDIA's ``.pkl`` (code-free reader) or our ``.safetensors``.

    Returns ``(network, config)``: the network on the CPU in eval mode without gradients, and its recorded
    ``class_name`` / ``init_args`` / ``init_kwargs`` / ``source`` (file name, sha256, format).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no EDM network file at {path}")
    if path.suffix == ".safetensors":
        check_size(path.stat().st_size, MAX_NETWORK_BYTES, str(path), "EDM network")
        config, tensors = _read_safetensors(path)
        return _build_checked(config.get("class_name", "?"), config.get("init_args"), config.get("init_kwargs"),
                              tensors, str(path)), config
    checkpoint = read_edm_pickle(path, key)
    return network_from_checkpoint(checkpoint), checkpoint.config()


if __name__ == "__main__":     # ``python -m backends.edm_checkpoint``: the CLI lives in tools/edm_cli.py
    from tools.edm_cli import main

    sys.exit(main())
