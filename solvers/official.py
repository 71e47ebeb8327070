"""A code-free reader for the authors' released predictor pickles (spec 2.4-2.5).

Their files pickle a ``torch_utils.persistence`` object whose reconstruction ``exec``s embedded source code.
This reader never imports or executes anything a pickle names: ``find_class`` answers from a fixed
whitelist of harmless re-implementations (tensor rebuilders in numpy, a holder for the persistent record,
inert stubs for ``nn.Sigmoid``/``nn.Softmax`` and the sampler functions the ICCV loss object names) and
refuses every other global with :class:`UnsafePickleError` before anything is called.

The machinery is shared: :class:`RestrictedUnpickler` / :func:`restricted_load` take any whitelist, and
:data:`BASE_GLOBALS` (the persistence holder, the tensor rebuilders, ``OrderedDict``) is the part every
``torch_utils.persistence`` pickle needs; :mod:`backends.edm_checkpoint` extends it for NVIDIA's EDM networks.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import struct
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["UnsafePickleError", "PersistentRecord", "OfficialSnapshot", "read_official", "globals_in_pickle",
           "InertStub", "inert_class", "BASE_GLOBALS", "RestrictedUnpickler", "restricted_load"]


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle references something that could run code; nothing was executed."""


# --- numpy stand-ins for torch's tensor reductions ------------------------------------------------------
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


@dataclass
class _StorageType:
    name: str


class _Storage:
    """A storage read from a legacy ``torch.save`` stream: a flat numpy array."""

    def __init__(self, dtype: Any, numel: int):
        self.dtype, self.numel, self.array = dtype, numel, None


def _decode_storage(raw: bytes, dtype: Any) -> np.ndarray:
    if dtype == "bfloat16":  # bf16 is the top half of a float32
        return (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).copy()


class _LegacyStreamUnpickler(pickle.Unpickler):
    def __init__(self, stream: io.BytesIO, storages: dict):
        super().__init__(stream)
        self.storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise UnsafePickleError(f"refusing global {module}.{name} inside a tensor storage stream. "
                                "Nothing was executed.")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise UnsafePickleError(f"unexpected persistent id {pid!r} in a tensor storage stream. "
                                    "Nothing was executed.")
        storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])   # pid[3] is the device: irrelevant here
        if not isinstance(storage_type, _StorageType):
            raise UnsafePickleError(f"unexpected storage type {storage_type!r}")
        if key not in self.storages:
            self.storages[key] = _Storage(_STORAGE_DTYPES[storage_type.name], numel)
        return self.storages[key]


def _load_from_bytes(data: bytes) -> _Storage:
    """Parse a legacy (non-zip) ``torch.save`` stream holding one storage: magic, protocol, sys info, object,
    key list, then per key an int64 element count and the raw little-endian data."""
    stream = io.BytesIO(data)
    storages: dict[str, _Storage] = {}
    for _ in range(3):  # magic number, protocol version, sys info: plain data
        _LegacyStreamUnpickler(stream, storages).load()
    result = _LegacyStreamUnpickler(stream, storages).load()
    keys = _LegacyStreamUnpickler(stream, storages).load()
    for key in keys:
        storage = storages[str(key)]
        (numel,) = struct.unpack("<q", stream.read(8))
        itemsize = 2 if storage.dtype == "bfloat16" else np.dtype(storage.dtype).itemsize
        storage.array = _decode_storage(stream.read(numel * itemsize), storage.dtype)
    if not isinstance(result, _Storage) or result.array is None:
        raise pickle.UnpicklingError("storage stream did not contain a storage")
    return result


def _rebuild_tensor(storage: _Storage, offset: int, size: tuple, stride: tuple, *_: Any) -> np.ndarray:
    if not isinstance(storage, _Storage) or storage.array is None:
        raise UnsafePickleError(f"refusing a tensor built on {type(storage).__name__}, not a storage. "
                                "Nothing was executed.")
    base = storage.array
    offset, size, stride = int(offset), tuple(int(n) for n in size), tuple(int(s) for s in stride)
    # as_strided does no bounds checking: a crafted view would read memory outside the storage (or crash).
    last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else offset - 1
    if (len(size) != len(stride) or offset < 0 or min(size + stride, default=0) < 0
            or last >= base.size):
        raise UnsafePickleError(f"refusing a tensor view (offset {offset}, size {size}, stride {stride}) that reaches "
                                f"outside its storage of {base.size} elements. Nothing was executed.")
    if not size:
        return np.array(base[offset])
    view = np.lib.stride_tricks.as_strided(base[offset:], shape=tuple(size),
                                           strides=tuple(s * base.itemsize for s in stride))
    return np.array(view)


def _rebuild_parameter(data: np.ndarray, *_: Any) -> np.ndarray:
    return data


@dataclass
class PersistentRecord:
    """What ``persistence._reconstruct_persistent_obj(meta)`` would have rebuilt, kept as inert data.
    ``module_src`` is the embedded source text: it is kept as a string and never executed."""

    class_name: str
    version: int
    module_src: str
    state: dict


def _reconstruct_persistent_obj(meta: dict) -> PersistentRecord:
    return PersistentRecord(str(meta.get("class_name")), int(meta.get("version", 0)),
                            str(meta.get("module_src", "")), dict(meta.get("state") or {}))


class InertStub:
    """Stands in for a harmless class or function a pickle names; it stores arguments and state only."""

    qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "InertStub":
        obj = object.__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<inert {self.qualname}>"


def inert_class(module: str, name: str) -> type:
    """A fresh :class:`InertStub` subclass standing in for ``module.name``."""
    return type(name, (InertStub,), {"qualname": f"{module}.{name}"})


_SAMPLER_NAMES = {"epd_sampler", "epd_parallel_sampler", "heun_sampler", "ipndm_sampler", "dpm_sampler",
                  "dpm_sampler_2", "dpm_2_sampler", "dpm_pp_sampler", "euler_sampler", "edm_sampler",
                  "ddim_sampler", "amed_sampler"}

# What every torch_utils.persistence pickle needs: the persistent-object holder and torch's tensor reductions.
BASE_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_from_bytes,
    ("collections", "OrderedDict"): OrderedDict,
}

_ALLOWED: dict[tuple[str, str], Any] = {
    **BASE_GLOBALS,
    ("torch.nn.modules.activation", "Sigmoid"): inert_class("torch.nn.modules.activation", "Sigmoid"),
    ("torch.nn.modules.activation", "Softmax"): inert_class("torch.nn.modules.activation", "Softmax"),
    **{("solvers", n): inert_class("solvers", n) for n in _SAMPLER_NAMES},
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler whose ``find_class`` answers only from ``allowed`` (``(module, name) -> object``) and never
    imports; any other global, and any persistent id, raises :class:`UnsafePickleError` before it is called.
    ``what`` names the format in the error message."""

    def __init__(self, stream: Any, source: str, allowed: dict[tuple[str, str], Any] | None = None,
                 what: str = "the expected format"):
        super().__init__(stream)
        self.source, self.allowed, self.what = source, allowed if allowed is not None else BASE_GLOBALS, what

    def find_class(self, module: str, name: str) -> Any:
        found = self.allowed.get((module, name))
        if found is None:
            raise UnsafePickleError(
                f"refusing to load {self.source}: it references the global {module}.{name}, which is not part of "
                f"{self.what} and could run code. Nothing was executed.")
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"refusing to load {self.source}: unexpected persistent id {pid!r}. "
                                "Nothing was executed.")


def restricted_load(data: bytes, source: str, allowed: dict[tuple[str, str], Any],
                    what: str = "the expected format") -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler` (``source`` names the file in errors)."""
    return RestrictedUnpickler(io.BytesIO(data), source, allowed, what).load()


class _OfficialUnpickler(RestrictedUnpickler):
    def __init__(self, stream: Any, source: str):
        super().__init__(stream, source, _ALLOWED, "the authors' predictor format")


@dataclass
class OfficialSnapshot:
    """The authors' snapshot dict, read without executing code.

    ``predictor``: the ``EPD_predictor`` record; ``loss_fn``: the ICCV ``EPD_loss`` record (or None).
    """

    path: Path
    sha256: str
    predictor: PersistentRecord
    loss_fn: PersistentRecord | None

    @property
    def init_kwargs(self) -> dict:
        return dict(self.predictor.state.get("_init_kwargs") or {})

    @property
    def parameters(self) -> dict[str, np.ndarray]:
        return {k: np.asarray(v) for k, v in (self.predictor.state.get("_parameters") or {}).items()}

    @property
    def attributes(self) -> dict:
        """Public attributes of the predictor (metadata), parameters and modules excluded."""
        return {k: v for k, v in self.predictor.state.items()
                if not k.startswith("_") and isinstance(v, (str, int, float, bool, type(None), dict, list, tuple))}

    @property
    def t_steps(self) -> np.ndarray | None:
        """The exact training grid the ICCV loss object recorded, when present."""
        if self.loss_fn is None or self.loss_fn.state.get("t_steps") is None:
            return None
        return np.asarray(self.loss_fn.state["t_steps"], dtype=np.float64).reshape(-1)


def read_official(path: str | Path) -> OfficialSnapshot:
    """Read one of the authors' ``network-snapshot*.pkl`` / ``exps/*.pkl`` files as data."""
    path = Path(path)
    data = path.read_bytes()
    obj = _OfficialUnpickler(io.BytesIO(data), str(path)).load()
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), PersistentRecord):
        raise pickle.UnpicklingError(f"{path} is not an EPD predictor snapshot (expected {{'model': EPD_predictor}})")
    if obj["model"].class_name != "EPD_predictor":
        raise pickle.UnpicklingError(f"{path}: 'model' is a {obj['model'].class_name}, not an EPD_predictor")
    loss_fn = obj.get("loss_fn") if isinstance(obj.get("loss_fn"), PersistentRecord) else None
    return OfficialSnapshot(path, hashlib.sha256(data).hexdigest(), obj["model"], loss_fn)


def globals_in_pickle(data: bytes) -> list[str]:
    """Globals a pickle would import, found by reading its opcodes (nothing is executed)."""
    import pickletools

    found, strings = [], []
    memo: dict = {}  # memo index -> the string stored there (None for other objects): names are often re-fetched
    last = None  # the string the previous opcode pushed, if any
    for op, arg, _ in pickletools.genops(data):
        pushed, last = last, None
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
            strings.append(arg)
            last = arg
        elif op.name == "MEMOIZE":
            memo[len(memo)], last = pushed, pushed
        elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg], last = pushed, pushed
        elif op.name in ("GET", "BINGET", "LONG_BINGET") and isinstance(memo.get(arg), str):
            strings.append(memo[arg])
            last = memo[arg]
        elif op.name in ("GLOBAL", "INST"):
            found.append(str(arg).replace(" ", "."))
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            found.append(f"{strings[-2]}.{strings[-1]}")
    return found
