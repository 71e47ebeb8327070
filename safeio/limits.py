"""Resource limits for reading untrusted files: what a file may make us spend before we refuse it.

A small file can still cost a lot. A pickle can name a huge memo index, and the unpickler then allocates a
table that large. Shared references ("billion laughs") can make a 1 KB structure expand to 10^9 leaves for
whoever walks it. A tensor view with zero strides can claim 10^9 elements over one stored number. Deep or
cyclic nesting can exhaust the recursion limit. Each check below runs before the expensive step. Each refusal
is a :class:`LimitError` that names the file and the limit.

The values are chosen to be far above every real file: the authors' 43 released tables (at most a few KB,
fewer than 2,000 pickle memo entries, 20 grid points), NVIDIA's EDM networks (at most about 1.2 GB and about
600 tensors), and ours.
"""

from __future__ import annotations

import pickletools
from typing import Any

__all__ = ["LimitError", "MAX_TABLE_BYTES", "MAX_NETWORK_BYTES", "MAX_MEMO_ENTRIES", "MAX_OBJECTS", "MAX_DEPTH",
           "MAX_VIEW_ELEMENTS", "check_size", "check_pickle", "check_structure"]


class LimitError(ValueError):
    """A file would make us spend more memory or time than any real file of its kind does."""


#: A predictor table is a few KB (the largest released one is under 10 KB); 16 MiB leaves room for tables with
#: thousands of steps and rich metadata (10^4 steps of K = 10 are about 3 MB), while a file of that size
#: unpickles to at most 16 million objects (about 130 MB of references).
MAX_TABLE_BYTES = 16 << 20
#: NVIDIA's largest EDM network pickle (ImageNet-64, ADM) is about 1.2 GB.
MAX_NETWORK_BYTES = 4 << 30
#: Pickle memo entries. A pickle stores one entry per object it may reference again. The released tables hold
#: under 2,000 and the EDM networks a few tens of thousands; a memo index must also be one the stream has
#: already written, so an index of 2^31 in a 9-byte file is refused.
MAX_MEMO_ENTRIES = 1 << 22
#: Containers and leaves visited when walking a loaded structure, every visit of a shared object counted. The
#: largest real structure (an EDM network's module tree with its state) has under 10^5 nodes.
MAX_OBJECTS = 2_000_000
#: Nesting depth of a loaded structure. Real files nest fewer than 20 levels.
MAX_DEPTH = 100
#: Elements a tensor view may have beyond its storage's own element count. Views of the released files never
#: exceed their storage; a broadcast (zero-stride) view is allowed only up to this size (8 MB in float64).
MAX_VIEW_ELEMENTS = 1 << 20


def check_size(size: int, limit: int, source: str, what: str) -> None:
    """Refuse a file of ``size`` bytes above ``limit``."""
    if size > limit:
        raise LimitError(f"refusing {source}: {size} bytes is more than any {what} needs (limit {limit} bytes)")


def check_pickle(data: bytes, source: str, max_memo: int = MAX_MEMO_ENTRIES) -> None:
    """Read the opcodes of a pickle without building anything and refuse memo indices the stream has not
    written yet or beyond ``max_memo``. These are what make the C unpickler allocate without bound. A malformed
    stream is left for the unpickler to report."""
    written = 0
    try:
        for op, arg, _ in pickletools.genops(data):
            name = op.name
            if name == "MEMOIZE":
                written += 1
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                index = int(arg)
                if index > written or index >= max_memo:
                    raise LimitError(f"refusing {source}: the pickle stores memo entry {index} after writing "
                                     f"{written} (limit {max_memo} entries); no real file does this")
                written = max(written, index + 1)
            if written > max_memo:
                raise LimitError(f"refusing {source}: the pickle holds more than {max_memo} memo entries")
    except LimitError:
        raise
    except Exception:  # noqa: BLE001 - a malformed stream: the unpickler gives the precise error
        return


def check_structure(value: Any, source: str, max_objects: int = MAX_OBJECTS, max_depth: int = MAX_DEPTH,
                    children: Any = None) -> int:
    """Walk a loaded structure iteratively and count every visit, shared objects each time they are reached.
    Refuse more than ``max_objects`` visits (expansion bombs and cycles) or a depth above ``max_depth``.
    ``children(obj)`` lists an object's parts (default: dict values and keys, list/tuple/set items, and the
    ``__dict__`` of other objects). Returns the number of visits."""
    parts = children or _children
    stack = [(value, 0)]
    visits = 0
    while stack:
        obj, depth = stack.pop()
        visits += 1
        if visits > max_objects:
            raise LimitError(f"refusing {source}: its structure expands to more than {max_objects} objects "
                             f"(shared or cyclic references); no real file of this kind does")
        if depth > max_depth:
            raise LimitError(f"refusing {source}: its structure nests deeper than {max_depth} levels")
        children = parts(obj)
        # Count what is queued too: a list of 10^7 items must be refused before 10^7 entries are stacked.
        if visits + len(stack) + len(children) > max_objects:
            raise LimitError(f"refusing {source}: its structure expands to more than {max_objects} objects "
                             f"(shared or cyclic references, or very wide containers); no real file of this kind does")
        stack.extend((child, depth + 1) for child in children)
    return visits


def _children(obj: Any) -> Any:
    if obj is None or isinstance(obj, (str, bytes, bytearray, int, float, complex, bool)):
        return ()
    if isinstance(obj, dict):
        return [*obj.keys(), *obj.values()]
    if isinstance(obj, (list, tuple, set, frozenset)):
        return obj
    state = getattr(obj, "__dict__", None)
    if isinstance(state, dict):
        return list(state.values())
    return ()
