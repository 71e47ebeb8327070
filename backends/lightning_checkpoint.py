"""Code-free reading of PyTorch-Lightning checkpoints (``model.ckpt``): the ``state_dict`` as numpy arrays.

A Lightning checkpoint is a ``torch.save`` zip archive (``<root>/data.pkl`` plus one ``<root>/data/<key>`` entry
per storage) of a dict such as ``{"state_dict": {...}, "epoch": ..., "global_step": ..., "optimizer_states":
[...], "callbacks": {...}, "hyper_parameters": ...}``. ``torch.load`` would import and call whatever the pickle
names. This reader unpickles ``data.pkl`` with :class:`safeio.RestrictedUnpickler` (docs/authors-code.md §2.5):

* tensors become lazy :class:`TensorRef` records (storage key, dtype, offset, size, stride), each view checked
  against the size of its storage entry before anything is read; only the tensors the caller takes are read;
* classes of the libraries that write such checkpoints (``pytorch_lightning``, ``lightning``,
  ``lightning_fabric``, ``omegaconf``, ``numpy``, ``argparse``, ``pathlib``, ``typing``, ``torch`` dtypes and
  ``torch.nn``/``torch.optim`` names) become inert stand-ins that store their arguments and state and run
  nothing;
* any other global (``os.system``, ``builtins.eval``, ``subprocess.*``, ...) is refused with
  :class:`safeio.UnsafePickleError` before it is called.

The pickle is bounded by :mod:`safeio.limits` (memo, objects, depth) and the file by
:data:`MAX_CHECKPOINT_BYTES`. The legacy (pre-zip) ``torch.save`` format is refused with a clear message.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from safeio.limits import LimitError, check_size, check_structure
from safeio.unpickle import RestrictedUnpickler, UnsafePickleError, restricted_load

__all__ = ["TensorRef", "LightningCheckpoint", "read_lightning_checkpoint", "MAX_CHECKPOINT_BYTES",
           "MAX_PICKLE_BYTES"]

#: The released LSUN-Bedroom LDM ``model.ckpt`` holds about 330 M parameters (UNet, autoencoder, maybe an EMA copy
#: and optimizer moments: at most about 6 GB); 16 GiB leaves room for any Lightning checkpoint of that size class.
MAX_CHECKPOINT_BYTES = 16 << 30
#: ``data.pkl`` holds only the structure (storages are separate entries): a few MB for real checkpoints.
MAX_PICKLE_BYTES = 256 << 20

_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
           "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
           "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
           "UntypedStorage": np.uint8}
# Modules whose names may appear in a Lightning checkpoint's extra entries; they are rebuilt as inert data.
_INERT_PREFIXES = ("pytorch_lightning", "lightning", "lightning_fabric", "omegaconf", "numpy", "argparse",
                   "pathlib", "typing", "torch.nn", "torch.optim", "datetime", "enum", "_codecs", "packaging")
_PLAIN_BUILTINS = {"set": set, "frozenset": frozenset, "list": list, "dict": dict, "tuple": tuple, "int": int,
                   "float": float, "bool": bool, "str": str, "bytes": bytes, "complex": complex,
                   "bytearray": bytearray}
_TORCH_DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
                 "float", "double", "half", "long", "int")


@dataclass(frozen=True)
class _StorageType:
    name: str


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: Any
    numel: int


@dataclass(frozen=True)
class TensorRef:
    """A tensor of the checkpoint, not read yet: ``storage`` key, numpy ``dtype``, element ``offset``, ``shape``
    and ``stride`` (in elements), checked against the storage's size when it was unpickled."""

    storage: str
    dtype: Any
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


class _Inert(dict):
    """Stands in for a class or function of a known library: keeps its arguments, items and state; runs nothing."""

    qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "_Inert":
        obj = dict.__new__(cls)
        obj.args, obj.state, obj.items_list = args, None, []
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def append(self, value: Any) -> None:
        self.items_list.append(value)

    def extend(self, values: Any) -> None:
        self.items_list.extend(values)

    def __call__(self, *args: Any, **kwargs: Any) -> "_Inert":   # an inert "function" called by REDUCE
        return type(self)(*args)

    def __repr__(self) -> str:
        return f"<inert {self.qualname}>"

    def __hash__(self) -> int:   # inert values may be dict keys or set members (enum members, dtypes)
        return id(self)

    def __eq__(self, other: Any) -> bool:
        return self is other


def _inert(module: str, name: str) -> type:
    return type(name, (_Inert,), {"qualname": f"{module}.{name}"})


def _reconstructor(cls: Any, base: Any, state: Any = None) -> Any:
    """``copyreg._reconstructor`` for inert classes only (protocol 0/1 objects)."""
    if isinstance(cls, type) and issubclass(cls, _Inert):
        return cls()
    raise UnsafePickleError(f"refusing copyreg._reconstructor of {cls!r}. Nothing was executed.")


class _CheckpointUnpickler(RestrictedUnpickler):
    """Resolves storages to the archive's entries and unknown-but-known-harmless globals to inert classes."""

    def __init__(self, stream: Any, source: str, storages: dict[str, int], root: str):
        super().__init__(stream, source, {}, "a PyTorch(-Lightning) checkpoint")
        self.storages, self.root = storages, root
        self.seen: dict[str, _StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _DTYPES:
            return _StorageType(name)
        if module == "torch.storage" and name == "UntypedStorage":
            return _StorageType(name)
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return self._rebuild_tensor
        if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            return lambda data, *_: data
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "collections" and name == "defaultdict":
            return _inert(module, name)
        if module == "builtins" and name in _PLAIN_BUILTINS:
            return _PLAIN_BUILTINS[name]
        if module == "copyreg" and name == "_reconstructor":
            return _reconstructor
        if module == "torch" and (name in _TORCH_DTYPES or name in ("device", "Size")):
            return _inert(module, name)
        if any(module == p or module.startswith(p + ".") for p in _INERT_PREFIXES):
            return _inert(module, name)
        return super().find_class(module, name)          # refuses, naming the global

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise UnsafePickleError(f"refusing to load {self.source}: unexpected persistent id {pid!r}. "
                                    "Nothing was executed.")
        key, numel = str(pid[2]), int(pid[4])
        dtype = _DTYPES[pid[1].name]
        itemsize = 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
        size = self.storages.get(f"{self.root}/data/{key}")
        if size is None or numel < 0 or size < numel * itemsize:
            raise UnsafePickleError(f"refusing to load {self.source}: storage {key} claims {numel} elements but the "
                                    f"archive holds {size} bytes for it. Nothing was executed.")
        ref = _StorageRef(key, dtype, numel)
        self.seen[key] = ref
        return ref

    def _rebuild_tensor(self, storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> TensorRef:
        if not isinstance(storage, _StorageRef):
            raise UnsafePickleError(f"refusing to load {self.source}: a tensor built on {type(storage).__name__}, "
                                    "not a storage. Nothing was executed.")
        offset, shape, stride = int(offset), tuple(int(n) for n in size), tuple(int(s) for s in stride)
        last = offset + sum((n - 1) * s for n, s in zip(shape, stride)) if all(shape) else offset - 1
        if len(shape) != len(stride) or offset < 0 or min(shape + stride, default=0) < 0 or last >= storage.numel:
            raise UnsafePickleError(f"refusing to load {self.source}: a tensor view (offset {offset}, size {shape}, "
                                    f"stride {stride}) reaches outside its storage of {storage.numel} elements. "
                                    "Nothing was executed.")
        return TensorRef(storage.key, storage.dtype, offset, shape, stride)


@dataclass
class LightningCheckpoint:
    """A checkpoint read as data: its top-level ``entries``, the ``state_dict`` as :class:`TensorRef` records, and
    the archive to read them from (:meth:`array`)."""

    path: Path
    sha256: str | None
    entries: list[str]
    state_dict: dict[str, TensorRef]
    root: str

    def array(self, name: str) -> np.ndarray:
        """The tensor ``name`` of the state dict as a numpy array (read from the archive now)."""
        return self.arrays([name])[name]

    def arrays(self, names: list[str] | None = None) -> dict[str, np.ndarray]:
        """Several tensors at once, each storage entry read once."""
        names = list(self.state_dict) if names is None else names
        out: dict[str, np.ndarray] = {}
        cache: dict[str, bytes] = {}
        with zipfile.ZipFile(self.path) as archive:
            for name in names:
                ref = self.state_dict[name]
                if ref.storage not in cache:
                    cache[ref.storage] = archive.read(f"{self.root}/data/{ref.storage}")
                raw = cache[ref.storage]
                if ref.dtype == "bfloat16":
                    base = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
                else:
                    base = np.frombuffer(raw, dtype=np.dtype(ref.dtype).newbyteorder("<"))
                if not ref.shape:
                    out[name] = np.array(base[ref.offset])
                else:
                    out[name] = np.array(np.lib.stride_tricks.as_strided(
                        base[ref.offset:], shape=ref.shape, strides=tuple(s * base.itemsize for s in ref.stride)))
        return out


def _flat_tensors(state: Any, source: str) -> dict[str, TensorRef]:
    if not isinstance(state, dict):
        raise ValueError(f"{source}: the checkpoint's state_dict is a {type(state).__name__}, not a mapping")
    out: dict[str, TensorRef] = {}
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, TensorRef):
            raise ValueError(f"{source}: state_dict entry {key!r} is a {type(value).__name__}, not a tensor")
        out[key] = value
    return out


def read_lightning_checkpoint(path: str | Path, *, hash_file: bool = False) -> LightningCheckpoint:
    """Read ``path`` (a ``torch.save`` zip archive of a dict with a ``state_dict``, or of a bare state dict)
    without executing anything it names. ``hash_file``: also record the file's sha256 (reads it all)."""
    path = Path(path)
    source = str(path)
    check_size(path.stat().st_size, MAX_CHECKPOINT_BYTES, source, "Lightning checkpoint")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{source}: not a torch.save zip archive (the legacy pre-1.6 torch.save format and other "
                         "files are not read; the latent-diffusion release's model.ckpt is a zip archive)")
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
        pickles = [i for i in infos if i.filename.endswith("/data.pkl") and i.filename.count("/") == 1]
        if len(pickles) != 1:
            raise ValueError(f"{source}: expected one <root>/data.pkl in the archive, found {len(pickles)}")
        root = pickles[0].filename.split("/")[0]
        check_size(pickles[0].file_size, MAX_PICKLE_BYTES, f"{source}:{pickles[0].filename}", "checkpoint pickle")
        data = archive.read(pickles[0])
        storages = {i.filename: i.file_size for i in infos}
    holder: dict[str, _CheckpointUnpickler] = {}

    def make(stream: Any, name: str) -> _CheckpointUnpickler:
        holder["u"] = _CheckpointUnpickler(stream, name, storages, root)
        return holder["u"]

    try:
        obj = restricted_load(data, source, unpickler=make)
    except (UnsafePickleError, LimitError):
        raise
    except Exception as err:  # noqa: BLE001 - damaged pickles fail in many ways inside the unpickler
        raise ValueError(f"{source}: not a readable checkpoint pickle ({type(err).__name__}: {err})") from None
    check_structure(obj, source)
    entries = [str(k) for k in obj] if isinstance(obj, dict) else []
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    digest = None
    if hash_file:
        sha = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                sha.update(block)
        digest = sha.hexdigest()
    return LightningCheckpoint(path, digest, entries, _flat_tensors(state, source), root)
