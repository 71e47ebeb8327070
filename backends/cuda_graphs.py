"""Replaying a call from CUDA graphs, one graph per input signature.

At batch 1-4 a UNet or transformer call is a few hundred small kernels; launched one by one from Python the
GPU mostly waits for the host (SD1.5 at 512 px: about 28 ms a call eagerly, 12 ms replayed from a graph on an
H200). A graph records the kernels once and replays them with one launch. Shapes are fixed inside a graph,
so :class:`GraphedCall` keeps one graph per signature (the shapes, dtypes and devices of the tensors in the
arguments, the values of their plain constants, plus a caller-given key); a sampler with CFG and K parallel
points needs two network graphs (the current point's batch and the ``K``-fold batch).

Three levels use it (docs/benchmarks.md, "The fast path"):

* one guided network call (``cuda_graphs=True`` on a backend);
* a whole sampling loop, every network call and all solver arithmetic of every step in one graph
  (:class:`GraphedSampler`), so a step costs what its kernels cost and nothing in Python;
* a text encoder or VAE decoder forward (``compile=True`` on a diffusers backend).

Replay semantics: the inputs are copied into the graph's static buffers, the graph replays, and a *copy* of
its static output is returned. The copy matters: all graphs on a device share one memory pool, so a later
replay of another graph may reuse the memory behind this graph's output (PyTorch allows pool sharing when
graphs run one at a time on one stream, which is how a sampler calls them). Sharing the pool is what keeps the
memory of the three levels at that of the largest one.

Arguments may be tensors, ``None``, plain constants (str, int, float, bool: part of the signature), and
tuples, lists, dicts and dataclasses of these (a backend's prompt condition). The wrapped function must be
capturable: no host synchronisation (``.item()``, ``bool(tensor)``), no data-dependent shapes. A capture may
not copy host memory to the device either; the grids and tables that the solvers copy are made device
constants by the warm-up run and reused by the capture (:func:`solvers.core.reuse_device_constants`), and
they live as long as the graph. Calls run eagerly on CPU, with
autograd enabled, or while another capture is active (so a graphed network call inside a graphed sampler is
recorded into the sampler's graph). A capture that fails (an operation that cannot be captured) is reported
once in one line and that signature runs eagerly from then on.
"""

from __future__ import annotations

import dataclasses
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterator

import torch

from solvers.core import reuse_device_constants

__all__ = ["GraphedCall", "GraphedSampler", "shared_pool", "to_device", "error_summary"]

_CONSTANTS = (str, int, float, bool, type(None))


@dataclass
class _Captured:
    graph: Any
    inputs: list[torch.Tensor | None]
    output: Any
    device_constants: dict = dataclasses.field(default_factory=dict)


def _init_fields(value: Any) -> list:
    return [f for f in dataclasses.fields(value) if f.init]


def _flatten(value: Any, leaves: list[torch.Tensor], path: str = "argument") -> Any:
    """The structure of ``value`` with each tensor replaced by its signature; tensors are appended to
    ``leaves`` in the order :func:`_map_tensors` visits them."""
    if isinstance(value, torch.Tensor):
        leaves.append(value)
        return ("T", tuple(value.shape), value.dtype, value.device)
    if isinstance(value, _CONSTANTS):
        return ("C", type(value).__name__, value)
    if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
        return (type(value).__name__, tuple(_flatten(v, leaves, f"{path}[{i}]") for i, v in enumerate(value)))
    if isinstance(value, dict):
        return ("dict", tuple((k, _flatten(v, leaves, f"{path}[{k!r}]")) for k, v in value.items()))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return (type(value), tuple((f.name, _flatten(getattr(value, f.name), leaves, f"{path}.{f.name}"))
                                   for f in _init_fields(value)))
    raise TypeError(f"GraphedCall arguments must be tensors or None, constants, or containers of them "
                    f"({path} is a {type(value).__name__})")


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``value`` with ``fn`` applied to each of its tensors, visited in :func:`_flatten`'s order (tensors,
    constants, tuples, lists, dicts, dataclasses; transformers' ModelOutput is a dict built from keywords)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, _CONSTANTS):
        return value
    if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
        return type(value)(_map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        mapped = {k: _map_tensors(v, fn) for k, v in value.items()}
        return mapped if type(value) is dict else type(value)(**mapped)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: _map_tensors(getattr(value, f.name), fn)
                                             for f in _init_fields(value)})
    raise TypeError(f"a graphed function must take and return tensors or containers of them "
                    f"(got {type(value).__name__})")


def _rebuild(value: Any, tensors: Iterator[torch.Tensor]) -> Any:
    """``value`` with its tensors taken, in :func:`_flatten`'s order, from ``tensors``."""
    return _map_tensors(value, lambda _: next(tensors))


def _clone(value: Any) -> Any:
    """A copy of every tensor of an output."""
    return _map_tensors(value, torch.Tensor.clone)


def to_device(value: Any, device: torch.device) -> Any:
    """``value`` (a tensor, or a container or dataclass of tensors) with every tensor on ``device``."""
    return _map_tensors(value, lambda t: t.to(device, non_blocking=True))


_LIVE_GRAPHS: "weakref.WeakSet[torch.cuda.CUDAGraph]" = weakref.WeakSet()


def shared_pool(device: torch.device) -> Any:
    """The memory pool of a live graph on ``device`` (``None`` when there is none: the next capture then
    starts a pool that later ones share). A pool lives as long as some graph captured into it, so it is
    always taken from a live graph, never kept on its own."""
    device = torch.device(device)
    index = torch.cuda.current_device() if device.index is None else device.index
    for graph in list(_LIVE_GRAPHS):
        if getattr(graph, "_epd_device", None) == index:
            return graph.pool()
    return None


def error_summary(err: BaseException) -> str:
    """``Type: message`` of an exception in one line (the first informative line of the message, which for
    torch.compile's wrapped errors is the line after "backend='inductor' raised:")."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    lines = [line for line in lines if not line.endswith("raised:")] or [""]
    return f"{type(err).__name__}: {lines[0][:240]}"


class GraphedCall:
    """``GraphedCall(fn)(*args, key=..., **kwargs)``: ``fn(*args, **kwargs)`` replayed from a CUDA graph per signature.

    ``warmup`` eager runs on a side stream precede each capture (cuDNN/cuBLAS pick their algorithms there,
    torch.compile compiles there). ``max_graphs`` bounds the number of kept signatures; further ones run
    eagerly. ``key`` adds Python values the function reads (e.g. the guidance scale) to the signature, so
    changing them captures anew. ``name`` labels the one-line warning of a failed capture.
    """

    def __init__(self, fn: Callable[..., Any], *, warmup: int = 2, max_graphs: int = 8, name: str | None = None):
        self.fn = fn
        self.warmup = int(warmup)
        self.max_graphs = int(max_graphs)
        self.name = name or getattr(fn, "__qualname__", "function")
        self.graphs: dict[Hashable, _Captured | None] = {}   # None: capture failed, run eagerly
        self.replays = 0

    def usable(self, leaves: list[torch.Tensor]) -> bool:
        return (bool(leaves) and leaves[0].is_cuda and not torch.is_grad_enabled()
                and not torch.cuda.is_current_stream_capturing())

    def __call__(self, *args: Any, key: Hashable = None, **kwargs: Any) -> Any:
        leaves: list[torch.Tensor] = []
        structure = _flatten((args, kwargs), leaves)
        if not self.usable(leaves):
            return self.fn(*args, **kwargs)
        signature = (structure, key)
        if signature not in self.graphs:
            if len(self.graphs) >= self.max_graphs:
                return self.fn(*args, **kwargs)
            self.graphs[signature] = self._try_capture((args, kwargs), leaves)
        entry = self.graphs[signature]
        if entry is None:
            return self.fn(*args, **kwargs)
        for static, value in zip(entry.inputs, leaves):
            static.copy_(value)
        entry.graph.replay()
        self.replays += 1
        return _clone(entry.output)

    def _try_capture(self, call: tuple, leaves: list[torch.Tensor]) -> _Captured | None:
        try:
            return self._capture(call, leaves)
        except Exception as err:  # noqa: BLE001 - any capture failure: report once, then run eagerly
            torch.cuda.synchronize()
            warnings.warn(f"CUDA graph capture of {self.name} failed ({error_summary(err)}); running it eagerly",
                          RuntimeWarning, stacklevel=3)
            return None

    def _capture(self, call: tuple, leaves: list[torch.Tensor]) -> _Captured:
        """``call`` is ``(args, kwargs)``; ``leaves`` its tensors in :func:`_flatten`'s order."""
        static = [t.detach().clone() for t in leaves]
        args, kwargs = _rebuild(call, iter(static))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with reuse_device_constants() as constants:     # warm-up copies the constants, the capture reuses them
            with torch.cuda.stream(side):
                for _ in range(max(self.warmup, 1)):
                    self.fn(*args, **kwargs)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=shared_pool(static[0].device)):
                output = self.fn(*args, **kwargs)
        graph._epd_device = static[0].device.index
        _LIVE_GRAPHS.add(graph)
        return _Captured(graph, static, output, constants)

    def reset(self) -> None:
        """Drop every captured graph (their memory returns to the shared pool once nothing refers to it)."""
        self.graphs.clear()


class GraphedSampler:
    """A whole sampling run ``sample(x, cond) -> x_end`` replayed from one CUDA graph per signature.

    ``sample`` is a closure over the denoiser, the solver and its grid or table (e.g.
    ``lambda x, c: sample_epd(backend, x, table, c, flow=flow)``): the grid and table are constants of the
    graph, so a new table or grid needs a new :class:`GraphedSampler`. ``cond`` is moved to ``x``'s device
    first, and a condition's prompt text (a ``prompts`` field: only its embeddings reach the network) is
    left out of the signature, so every prompt of a batch size replays the same graph. One warm-up run
    precedes the capture (it also compiles and captures the network's own graphs). Off CUDA, under autograd,
    or while another capture runs, it simply calls ``sample``.
    """

    def __init__(self, sample: Callable[[torch.Tensor, Any], torch.Tensor], *, max_graphs: int = 4,
                 name: str = "the sampling loop"):
        self.call = GraphedCall(sample, warmup=1, max_graphs=max_graphs, name=name)

    def __call__(self, x: torch.Tensor, cond: Any = None) -> torch.Tensor:
        if x.is_cuda:
            cond = to_device(cond, x.device)
            if dataclasses.is_dataclass(cond) and any(f.name == "prompts" for f in dataclasses.fields(cond)):
                cond = dataclasses.replace(cond, prompts=())
        return self.call(x, cond)

    @property
    def replays(self) -> int:
        return self.call.replays
