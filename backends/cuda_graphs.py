"""Replaying a backbone call from CUDA graphs, one graph per input signature.

At batch 1-4 a UNet or transformer call is a few hundred small kernels; launched one by one from Python the
GPU mostly waits for the host (SD1.5 at 512 px: about 28 ms a call eagerly, 12 ms replayed from a graph on an
H200). A graph records the kernels once and replays them with one launch. Shapes are fixed inside a graph,
so :class:`GraphedCall` keeps one graph per signature (shapes, dtypes and ``None`` positions of the
arguments plus a caller-given key); a sampler with CFG and K parallel points needs two (the current point's
batch and the ``K``-fold batch).

Replay semantics: the inputs are copied into the graph's static buffers, the graph replays, and a *copy* of
its static output is returned. The copy matters: all graphs share one memory pool, so a later replay of
another graph may reuse the memory behind this graph's output (PyTorch allows pool sharing when graphs run
one at a time on one stream, which is how a sampler calls them).

The wrapped function must be capturable: no host synchronisation (``.item()``, ``bool(tensor)``), no new
CPU->GPU copies, no data-dependent shapes. It runs eagerly on CPU, with autograd enabled, or while another
capture is active.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Hashable

import torch

__all__ = ["GraphedCall"]


@dataclass
class _Captured:
    graph: Any
    inputs: list[torch.Tensor | None]
    output: Any


def _signature(args: tuple) -> tuple:
    key = []
    for arg in args:
        if arg is None:
            key.append(None)
        elif isinstance(arg, torch.Tensor):
            key.append((tuple(arg.shape), arg.dtype, arg.device))
        else:
            raise TypeError(f"GraphedCall arguments must be tensors or None (got {type(arg).__name__})")
    return tuple(key)


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_clone(v) for v in value)
    raise TypeError(f"a graphed function must return tensors (got {type(value).__name__})")


class GraphedCall:
    """``GraphedCall(fn)(*tensors, key=...)``: ``fn(*tensors)`` replayed from a CUDA graph per signature.

    ``warmup`` eager runs on a side stream precede each capture (cuDNN/cuBLAS pick their algorithms there).
    ``max_graphs`` bounds the number of kept signatures; further ones run eagerly. ``key`` adds Python values
    the function reads (e.g. the guidance scale) to the signature, so changing them captures anew.
    """

    def __init__(self, fn: Callable[..., Any], *, warmup: int = 2, max_graphs: int = 8):
        self.fn = fn
        self.warmup = int(warmup)
        self.max_graphs = int(max_graphs)
        self.graphs: dict[Hashable, _Captured] = {}
        self.pool: Any = None
        self.replays = 0

    def usable(self, args: tuple) -> bool:
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        return (first is not None and first.is_cuda and not torch.is_grad_enabled()
                and not torch.cuda.is_current_stream_capturing())

    def __call__(self, *args: torch.Tensor | None, key: Hashable = None) -> Any:
        if not self.usable(args):
            return self.fn(*args)
        signature = (_signature(args), key)
        entry = self.graphs.get(signature)
        if entry is None:
            if len(self.graphs) >= self.max_graphs:
                return self.fn(*args)
            entry = self.graphs[signature] = self._capture(args)
        for static, value in zip(entry.inputs, args):
            if static is not None:
                static.copy_(value)
        entry.graph.replay()
        self.replays += 1
        return _clone(entry.output)

    def _capture(self, args: tuple) -> _Captured:
        static = [None if a is None else a.detach().clone() for a in args]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = self.fn(*static)
        self.pool = graph.pool()
        return _Captured(graph, static, output)

    def reset(self) -> None:
        """Drop every captured graph (frees their memory pool once nothing else refers to it)."""
        self.graphs.clear()
        self.pool = None
