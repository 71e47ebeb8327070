"""Safe handling of untrusted input, shared by tables, checkpoints, sample outputs and the EDM reader: atomic
writes, unpicklers that treat a file as data (nothing a file names is imported or run), resource limits
(:mod:`safeio.limits`) and the error convention of every entry point (:mod:`safeio.cli`, docs/errors.md)."""

from .atomic import atomic_text, atomic_torch_save, atomic_write, is_temporary, remove_stale_temporaries
from .unpickle import (BASE_GLOBALS, InertStub, PersistentRecord, RestrictedUnpickler, UnsafePickleError, globals_in_pickle,
                       inert_class, restricted_load)

__all__ = ["atomic_write", "atomic_text", "atomic_torch_save", "is_temporary", "remove_stale_temporaries", "UnsafePickleError", "PersistentRecord", "InertStub",
           "inert_class", "BASE_GLOBALS", "RestrictedUnpickler", "restricted_load", "globals_in_pickle"]
