"""Safe file handling shared by tables, checkpoints, sample outputs and the EDM reader: atomic writes and
unpicklers that treat a file as data (nothing a file names is imported or run)."""

from .atomic import atomic_text, atomic_torch_save, atomic_write, is_temporary, remove_stale_temporaries
from .unpickle import (BASE_GLOBALS, InertStub, PersistentRecord, RestrictedUnpickler, UnsafePickleError, globals_in_pickle,
                       inert_class, restricted_load)

__all__ = ["atomic_write", "atomic_text", "atomic_torch_save", "is_temporary", "remove_stale_temporaries", "UnsafePickleError", "PersistentRecord", "InertStub",
           "inert_class", "BASE_GLOBALS", "RestrictedUnpickler", "restricted_load", "globals_in_pickle"]
