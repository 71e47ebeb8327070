"""Unpickling as data: restricted unpicklers that never import or run what a file names (docs/authors-code.md §2.5).

``find_class`` answers only from a whitelist given by the caller, and any other global raises
:class:`UnsafePickleError` before anything is called. :data:`BASE_GLOBALS` is what every
``torch_utils.persistence`` pickle (the authors' tables, NVIDIA's EDM networks) needs: the persistent-object
holder, rebuilt as inert :class:`PersistentRecord` data, and torch's tensor reductions, rebuilt as numpy arrays
with every view checked against its storage. :func:`globals_in_pickle` lists the globals a pickle names by
reading its opcodes.
"""

from __future__ import annotations

import io
import pickle
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from .limits import MAX_VIEW_ELEMENTS, check_pickle, check_structure

__all__ = ["UnsafePickleError", "PersistentRecord", "InertStub", "inert_class", "BASE_GLOBALS",
           "RestrictedUnpickler", "restricted_load", "globals_in_pickle"]


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
    check_pickle(data, "a tensor storage stream")
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
        raw = stream.read(max(numel, 0) * itemsize)
        # A count that disagrees with the storage's own, or with the bytes present, is a damaged or crafted file.
        if numel < 0 or numel != storage.numel or len(raw) != numel * itemsize:
            raise pickle.UnpicklingError(f"a tensor storage claims {numel} elements ({storage.numel} in its record) "
                                         f"but holds {len(raw) // itemsize}")
        storage.array = _decode_storage(raw, storage.dtype)
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
    elements = int(np.prod(size, dtype=np.float64)) if size else 1
    if elements > max(base.size, MAX_VIEW_ELEMENTS):
        raise UnsafePickleError(f"a tensor view of {elements} elements over a storage of {base.size} is more than "
                                f"any real file holds (limit {MAX_VIEW_ELEMENTS} for a broadcast view). "
                                "Nothing was executed.")
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


# What every torch_utils.persistence pickle needs: the persistent-object holder and torch's tensor reductions.
BASE_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_from_bytes,
    ("collections", "OrderedDict"): OrderedDict,
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


def restricted_load(data: bytes, source: str, allowed: dict[tuple[str, str], Any] | None = None,
                    what: str = "the expected format", unpickler: type | None = None) -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler` (or the given subclass), inside the limits of
    :mod:`safeio.limits`: the memo is checked before loading and the result's size and depth after, so no
    expansion bomb reaches the caller. ``source`` names the file in errors."""
    check_pickle(data, source)
    try:
        if unpickler is None:
            obj = RestrictedUnpickler(io.BytesIO(data), source, allowed, what).load()
        else:
            obj = unpickler(io.BytesIO(data), source).load()
    except UnsafePickleError as err:
        if source in str(err):
            raise
        raise UnsafePickleError(f"refusing to load {source}: {err}") from None   # raised deep inside, unnamed
    check_structure(obj, source)
    return obj


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
