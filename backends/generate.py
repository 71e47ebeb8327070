"""One generation sequence for every caller: noise from seeds -> conditions -> sampler -> decode, in batches.

``sample.py``, the RDPO rollouts, the demos and ``scripts/reproduce_iccv.py`` all run it, so a seed gives the
same image wherever it is drawn (each seed has its own generator, :func:`solvers.core.seeded_noise`). The
initial state is ``noise * sigma_0`` for VE models and the noise itself for flow models (their grids start at
sigma = 1, docs/backends/contract.md).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from solvers.core import EvalCount, seeded_noise
from solvers.epd import sample_epd
from solvers.plan import StepPlan
from solvers.registry import eval_count, get_solver

from .base import Backend

__all__ = ["Sampler", "GeneratedBatch", "initial_state", "generate_batches", "generate"]


@dataclass(frozen=True)
class Sampler:
    """An EPD table (one, or one per image) or a baseline solver on its grid: ``sampler(backend, x, cond)``."""

    label: str
    sigmas: np.ndarray
    table: Any = None
    solver: Any = None
    afs: bool = False
    shard: Any = None

    @classmethod
    def from_table(cls, table: Any, shard: Any = None) -> "Sampler":
        """EPD with the table's own grid and flags (``shard`` splits its K points across processes)."""
        label = "epd_plugin" if StepPlan.from_table(table).plugin_order else "epd"
        return cls(label, _grid(table.sigmas), table=table, afs=bool(table.afs), shard=shard)

    @classmethod
    def from_solver(cls, name: Any, sigmas: Any, afs: bool = False) -> "Sampler":
        """A registered baseline (:mod:`solvers.registry`; a name, or a ``SolverSpec`` with options) on ``sigmas``."""
        spec = get_solver(name)
        return cls(spec.label, _grid(sigmas), solver=spec, afs=bool(afs))

    def eval_count(self) -> EvalCount:
        """Evaluations per image, sequential and total (the papers' NFE is the sequential one)."""
        if self.table is not None:
            return self.table.eval_count()
        return eval_count(self.solver, self.sigmas, afs=self.afs)

    def __call__(self, backend: Backend, x: torch.Tensor, cond: Any = None) -> torch.Tensor:
        if self.table is not None:
            return sample_epd(backend, x, self.table, cond, flow=backend.flow, shard=self.shard)
        return self.solver(backend, x, self.sigmas, cond, flow=backend.flow, afs=self.afs)


def _grid(sigmas: Any) -> np.ndarray:
    values = sigmas.detach().cpu().numpy() if isinstance(sigmas, torch.Tensor) else sigmas
    return np.asarray(values, dtype=np.float64)


def initial_state(backend: Backend, noise: torch.Tensor, sigma_start: float) -> torch.Tensor:
    """``noise * sigma_0`` (VE), or the noise itself (flow: ``x_1 = eps``)."""
    return noise if backend.flow else noise * float(sigma_start)


@dataclass
class GeneratedBatch:
    """One batch: its seeds and prompts, the condition, the final ODE states and (when decoded) the images."""

    seeds: list[int]
    prompts: list[str]
    cond: Any
    states: torch.Tensor
    images: torch.Tensor | None

    @property
    def labels(self) -> list[int] | None:
        """Class labels of label-conditioned models (one per image), else None."""
        if isinstance(self.cond, torch.Tensor) and self.cond.dtype == torch.long:
            return [int(v) for v in self.cond.reshape(-1).tolist()]
        return None


def generate_batches(backend: Backend, sampler: Sampler | Callable[..., torch.Tensor], seeds: Iterable[int],
                     prompts: Sequence[str] | Iterator[str] | None = None, *, batch: int = 64, decode: bool = True,
                     graphed: bool = False) -> Iterator[GeneratedBatch]:
    """Batches of at most ``batch`` images for ``seeds`` (any iterable, read lazily: a batch at a time).
    ``prompts`` pair with seeds by position: a sequence is cycled, an iterator is read alongside the seeds;
    None or empty: unconditional. ``sampler`` is a :class:`Sampler` or any ``fn(backend, x, cond)`` with a
    ``sigmas`` attribute. ``graphed``: replay the whole sampling loop from one CUDA graph per batch shape
    (:class:`backends.cuda_graphs.GraphedSampler`; only on CUDA)."""
    if batch < 1:
        raise ValueError("batch must be >= 1")
    if isinstance(prompts, Iterator):
        texts_of: Iterator[str] = prompts
    else:
        texts_of = itertools.cycle(list(prompts) if prompts else [""])
    pairs = zip((int(s) for s in seeds), texts_of)
    sigma_start = float(sampler.sigmas[0])
    run: Callable[[torch.Tensor, Any], torch.Tensor] = lambda x, c: sampler(backend, x, c)  # noqa: E731
    if graphed and torch.device(backend.device).type == "cuda":
        from .cuda_graphs import GraphedSampler

        run = GraphedSampler(run)
    while chunk_pairs := list(itertools.islice(pairs, batch)):
        chunk, texts = [seed for seed, _ in chunk_pairs], [text for _, text in chunk_pairs]
        noise = seeded_noise(chunk, tuple(backend.shape), backend.state_dtype, device=backend.device)
        with torch.no_grad():
            cond = backend.encode_prompts(texts, seeds=chunk)
            states = run(initial_state(backend, noise, sigma_start), cond)
            images = backend.decode(states) if decode else None
        yield GeneratedBatch(chunk, texts, cond, states, images)


def generate(backend: Backend, sampler: Sampler | Callable[..., torch.Tensor], seeds: Sequence[int],
             prompts: Sequence[str] | None = None, *, batch: int = 64, decode: bool = True,
             graphed: bool = False) -> torch.Tensor:
    """All images (decoded, float32 in [-1, 1]) or final states (``decode=False``) of :func:`generate_batches`,
    concatenated in seed order."""
    parts = [(b.images if decode else b.states) for b in
             generate_batches(backend, sampler, seeds, prompts, batch=batch, decode=decode, graphed=graphed)]
    return torch.cat(parts).float() if decode else torch.cat(parts)
