"""Pieces every solver shares: the denoiser interface, condition repetition, AFS, evaluation counting.

The denoiser interface (docs/backends/contract.md): ``denoiser(x, sigma, cond) -> x0_hat`` in variance-exploding
coordinates, ``sigma`` a per-sample tensor ``[B]``. The ODE direction is ``d = (x - D(x, sigma)) / sigma``
(= the velocity ``v`` for flow-matching backends, whose adapters return ``D = x - sigma v``).
"""

from __future__ import annotations

import bisect
import itertools
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence

import numpy as np
import torch

__all__ = [
    "Denoiser",
    "Callback",
    "repeat_condition",
    "sigma_batch",
    "direction",
    "analytic_denoised",
    "EvalCount",
    "EvalCounter",
    "seeded_noise",
    "parse_seeds",
    "SEED_LIMIT",
    "MAX_SEED_ITEMS",
    "Seeds",
    "as_tensor",
    "reuse_device_constants",
]

Callback = Callable[[dict], None]


class Denoiser(Protocol):
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> torch.Tensor: ...


def repeat_condition(cond: Any, repeats: int) -> Any:
    """Repeat a per-sample condition ``repeats`` times per sample, in ``b * repeats + k`` order.

    This is the order of ``x_mid.flatten(0, 1)`` in the parallel EPD call (docs/authors-code.md §1.1). Tensors are
    repeated along dim 0 (class labels too: docs/authors-code.md §9.1-9.2 are the authors' bugs of forgetting some);
    objects that define ``repeat_interleave(repeats)`` (backend condition dataclasses) do it themselves; mappings,
    dataclasses and lists/tuples are handled element-wise, where a list/tuple of non-tensors (prompts) counts as
    per-sample. Scalars and ``None`` pass through unchanged.
    """
    if repeats == 1 or cond is None:
        return cond
    if isinstance(cond, torch.Tensor):
        return cond.repeat_interleave(repeats, dim=0) if cond.ndim > 0 else cond
    method = getattr(cond, "repeat_interleave", None)
    if callable(method):
        return method(repeats)
    if isinstance(cond, Mapping):
        return type(cond)((k, repeat_condition(v, repeats)) for k, v in cond.items())
    if is_dataclass(cond) and not isinstance(cond, type):
        return replace(cond, **{f.name: repeat_condition(getattr(cond, f.name), repeats) for f in fields(cond)})
    if isinstance(cond, (list, tuple)):
        if any(isinstance(c, torch.Tensor) for c in cond):
            return type(cond)(repeat_condition(c, repeats) for c in cond)
        return type(cond)(c for c in cond for _ in range(repeats))
    return cond


_constants = threading.local()


@contextmanager
def reuse_device_constants() -> Iterator[dict]:
    """Within the block, :func:`as_tensor` makes one device copy per distinct host value and hands the same
    copy back whenever that value (same bytes, shape, dtype and device) is asked for again.

    This is how a sampler becomes capturable in a CUDA graph: a capture may not copy pageable host memory to
    the device, so the capturer runs the sampler once inside this block (every grid and table is copied
    then), and captures the second run, which finds all its constants already on the device. The capturer
    keeps the yielded dict with the graph, whose replays read those device tensors.
    """
    previous = getattr(_constants, "memo", None)
    memo: dict = {} if previous is None else previous
    _constants.memo = memo
    try:
        yield memo
    finally:
        _constants.memo = previous


def as_tensor(values: Any, like: torch.Tensor) -> torch.Tensor:
    """``values`` (tensor, array, list or number) as a tensor with ``like``'s dtype and device (a copy for
    numpy input, which may be read-only)."""
    # non_blocking: a host->GPU copy of a small table must not make the host wait for queued GPU work
    # (from pageable memory CUDA stages the data before returning, so the source may be freed at once).
    memo = getattr(_constants, "memo", None)
    if isinstance(values, torch.Tensor) and (memo is None or values.device.type != "cpu"):
        return values.to(dtype=like.dtype, device=like.device, non_blocking=True)
    host = values.detach().to(like.dtype) if isinstance(values, torch.Tensor) else \
        torch.tensor(np.asarray(values), dtype=like.dtype)
    if memo is None:
        return host.to(like.device, non_blocking=True)
    key = (host.numpy().tobytes() if host.dtype != torch.bfloat16 else host.float().numpy().tobytes(),
           tuple(host.shape), host.dtype, like.device)
    if key not in memo:
        memo[key] = host.to(like.device, non_blocking=True)
    return memo[key]


def sigma_batch(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """A per-sample sigma vector ``[B]`` in the state's dtype and device."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma.reshape(x.shape[0])


def _bcast(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return values.reshape(values.shape + (1,) * (x.ndim - values.ndim))


def direction(x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """ODE direction ``d = (x - D) / sigma`` (dx/dsigma of the probability-flow ODE)."""
    return (x - denoised) / _bcast(torch.as_tensor(sigma, dtype=x.dtype, device=x.device), x)


def analytic_denoised(x: torch.Tensor, sigma: torch.Tensor | float, flow: bool = False) -> torch.Tensor:
    """The analytical first step (AFS, docs/authors-code.md §1.3) as a denoiser output, so every solver can use it.

    VE/EDM states: the authors' direction ``d = x / sqrt(1 + sigma^2)``, i.e. ``D = x - sigma d``. Flow-matching states:
    at high noise the best estimate of the data is its mean (zero), so ``D = 0`` and ``d = v = x / sigma``. (The authors
    apply the VE formula to flow models too, docs/authors-code.md §9.3; no released table uses AFS with flow matching,
    so no compatibility switch is kept.)
    """
    if flow:
        return torch.zeros_like(x)
    s = _bcast(torch.as_tensor(sigma, dtype=x.dtype, device=x.device), x)
    return x - s * x / torch.sqrt(1 + s * s)


@dataclass(frozen=True)
class EvalCount:
    """Network evaluations of one sampling run, per image.

    ``sequential``: denoiser calls one after another (latency); the papers' "(parallel) NFE".
    ``total``: evaluations of the network per image (compute); the K parallel points count K times.
    With classifier-free guidance every evaluation is a batch of two inside the backend; ``cfg_doubled``
    gives the authors' doubled figure (docs/authors-code.md §1.2), which we never print by default.
    """

    sequential: int
    total: int

    @property
    def parallel_nfe(self) -> int:
        return self.sequential

    def cfg_doubled(self) -> "EvalCount":
        return EvalCount(2 * self.sequential, 2 * self.total)


class EvalCounter:
    """Wraps a denoiser and counts calls (sequential evaluations) and evaluated items (total / batch)."""

    def __init__(self, denoiser: Denoiser, batch_size: int):
        self.denoiser = denoiser
        self.batch_size = int(batch_size)
        self.calls = 0
        self.items = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> torch.Tensor:
        self.calls += 1
        self.items += x.shape[0]
        return self.denoiser(x, sigma, cond)

    @property
    def count(self) -> EvalCount:
        return EvalCount(self.calls, self.items // max(self.batch_size, 1))


def seeded_noise(seeds: "list[int] | torch.Tensor", shape: tuple, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> torch.Tensor:
    """Unit Gaussian noise ``[len(seeds), *shape]``, one generator per seed (seed mod 2^32), so a given seed
    gives the same noise whatever the batch it is drawn in (the authors' ``StackedRandomGenerator``)."""
    out = []
    for seed in seeds:
        gen = torch.Generator(device="cpu").manual_seed(int(seed) % (1 << 32))
        out.append(torch.randn(shape, generator=gen, dtype=torch.float64))
    return torch.stack(out).to(device=device, dtype=dtype)


#: Seeds are 32-bit (each seeds its own generator, :func:`seeded_noise`); seed 2^32 would silently repeat seed 0.
SEED_LIMIT = 1 << 32
#: Items (numbers and ranges) one ``--seeds`` text may hold; each range costs one entry however long it is.
MAX_SEED_ITEMS = 100_000


class Seeds(Sequence[int]):
    """An ordered set of seeds held as disjoint ranges, so ``0-999999999`` costs a few bytes: ``len``, indexing,
    slicing (a list) and iteration expand on demand."""

    def __init__(self, ranges: Iterable[range]) -> None:
        self.ranges = [r for r in ranges if len(r)]
        self._ends = list(itertools.accumulate(len(r) for r in self.ranges))

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"seed index {index} out of range for {len(self)} seeds")
        which = bisect.bisect_right(self._ends, index)
        return self.ranges[which][index - (self._ends[which - 1] if which else 0)]

    def __iter__(self) -> Iterator[int]:
        return itertools.chain.from_iterable(self.ranges)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Seeds):
            return self.ranges == other.ranges
        return isinstance(other, Sequence) and len(self) == len(other) and all(a == b for a, b in zip(self, other))

    def __repr__(self) -> str:
        return f"Seeds({','.join(f'{r.start}-{r.stop - 1}' if len(r) > 1 else str(r.start) for r in self.ranges)})"


def _new_pieces(new: range, starts: list[int], stops: list[int]) -> list[range]:
    """The parts of ``new`` outside the disjoint sorted intervals ``[starts[i], stops[i])``, which then grow to
    cover ``new`` too (merged, still sorted); O(log n) plus the overlapped intervals."""
    lo, hi = new.start, new.stop
    first = bisect.bisect_right(stops, lo - 1)          # intervals ending at or after lo (touching counts)
    last = bisect.bisect_left(starts, hi + 1)           # intervals starting at or before hi
    pieces, cursor = [], lo
    for start, stop in zip(starts[first:last], stops[first:last]):
        if start > cursor:
            pieces.append(range(cursor, min(start, hi)))
        cursor = max(cursor, stop)
    if cursor < hi:
        pieces.append(range(cursor, hi))
    merged_lo = min([lo] + starts[first:last])
    merged_hi = max([hi] + stops[first:last])
    starts[first:last], stops[first:last] = [merged_lo], [merged_hi]
    return [piece for piece in pieces if len(piece)]


def parse_seeds(text: str) -> Seeds:
    """``"0-19,25,30-31"`` -> seeds 0..19, 25, 30, 31 (ranges inclusive, order kept, duplicates dropped), each
    in ``[0, 2^32)``; ranges are kept as ranges (:class:`Seeds`), never expanded into a list."""
    items = [part.strip() for part in text.split(",") if part.strip()]
    if len(items) > MAX_SEED_ITEMS:
        raise ValueError(f"--seeds has {len(items)} items; at most {MAX_SEED_ITEMS} (write runs as ranges: 0-999)")
    taken: list[range] = []
    starts: list[int] = []
    stops: list[int] = []
    for part in items:
        match = re.fullmatch(r"(\d+)\s*-\s*(\d+)|(\d+)", part)
        if not match:
            raise ValueError(f"bad seed item {part!r}: use numbers and inclusive ranges like 0-19,25")
        lo, hi = (int(match.group(3)),) * 2 if match.group(3) is not None else (int(match.group(1)), int(match.group(2)))
        if hi < lo:
            raise ValueError(f"bad seed range {part!r}: end before start")
        if hi >= SEED_LIMIT:
            raise ValueError(f"seed {hi} in {part!r} is not below 2^32 = {SEED_LIMIT}; seeds are 32-bit")
        taken += _new_pieces(range(lo, hi + 1), starts, stops)
    if not taken:
        raise ValueError("no seeds given")
    return Seeds(taken)
