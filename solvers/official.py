"""A code-free reader for the authors' released predictor pickles (docs/authors-code.md §2.4-2.5).

Their files pickle a ``torch_utils.persistence`` object whose reconstruction ``exec``s embedded source code.
This reader never imports or executes anything a pickle names: ``find_class`` answers from a fixed
whitelist of harmless re-implementations (tensor rebuilders in numpy, a holder for the persistent record,
inert stubs for ``nn.Sigmoid``/``nn.Softmax`` and the sampler functions the ICCV loss object names) and
refuses every other global with :class:`UnsafePickleError` before anything is called.

The machinery (:class:`safeio.RestrictedUnpickler` and :data:`safeio.BASE_GLOBALS`, the part every
``torch_utils.persistence`` pickle needs) lives in :mod:`safeio.unpickle`, shared with
:mod:`backends.edm_checkpoint`; this module adds only the authors' predictor format.
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from safeio.limits import MAX_TABLE_BYTES, check_size
from safeio.unpickle import BASE_GLOBALS, PersistentRecord, RestrictedUnpickler, inert_class, restricted_load

__all__ = ["OfficialSnapshot", "read_official"]


_SAMPLER_NAMES = {"epd_sampler", "epd_parallel_sampler", "heun_sampler", "ipndm_sampler", "dpm_sampler",
                  "dpm_sampler_2", "dpm_2_sampler", "dpm_pp_sampler", "euler_sampler", "edm_sampler",
                  "ddim_sampler", "amed_sampler"}

_ALLOWED: dict[tuple[str, str], Any] = {
    **BASE_GLOBALS,
    ("torch.nn.modules.activation", "Sigmoid"): inert_class("torch.nn.modules.activation", "Sigmoid"),
    ("torch.nn.modules.activation", "Softmax"): inert_class("torch.nn.modules.activation", "Softmax"),
    **{("solvers", n): inert_class("solvers", n) for n in _SAMPLER_NAMES},
}


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
    check_size(path.stat().st_size, MAX_TABLE_BYTES, str(path), "predictor table")
    data = path.read_bytes()
    obj = restricted_load(data, str(path), unpickler=_OfficialUnpickler)
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), PersistentRecord):
        raise pickle.UnpicklingError(f"{path} is not an EPD predictor snapshot (expected {{'model': EPD_predictor}})")
    if obj["model"].class_name != "EPD_predictor":
        raise pickle.UnpicklingError(f"{path}: 'model' is a {obj['model'].class_name}, not an EPD_predictor")
    loss_fn = obj.get("loss_fn") if isinstance(obj.get("loss_fn"), PersistentRecord) else None
    return OfficialSnapshot(path, hashlib.sha256(data).hexdigest(), obj["model"], loss_fn)


