"""Compiling a backend's networks with ``torch.compile`` (TorchInductor) for the fast sampling path.

Launch overhead is what CUDA graphs remove (:mod:`backends.cuda_graphs`); what is left of a network call is
its kernels, and at the batch sizes of sampling many of them are memory-bound elementwise work (normalisation,
activations, residual adds, modulation) that inductor fuses into a few generated kernels. The fast path is
both: inductor's kernels, recorded into CUDA graphs by our own capture (so inductor runs without its
``reduce-overhead`` graphs: one graph level, one memory pool). docs/benchmarks.md measures it.

* Shapes are static (``dynamic=False``): each call signature a sampler uses (the current point's batch, the
  K-fold batch of the parallel points, each with its CFG rows) is compiled once, as a graph capture needs.
* :class:`CompiledCall` compiles lazily at the first call and never silently: where compilation is impossible
  (no C++ compiler for inductor on the CPU, no Triton on the GPU, an operation inductor cannot compile) it
  warns in one line and runs the function eagerly from then on.
* Compiled artefacts (inductor's FX-graph and autograd caches, Triton's kernels) persist in a cache folder
  (:func:`use_compile_cache`; default ``.cache/compile`` in the repository, or ``$EPD_COMPILE_CACHE``), so a
  second process skips code generation and reaches steady state in seconds.
"""

from __future__ import annotations

import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from .cuda_graphs import error_summary

__all__ = ["CompiledCall", "compile_unavailable", "use_compile_cache", "default_compile_cache", "INDUCTOR_OPTIONS"]

# Inductor settings of diffusers' speed guide that change kernels, not numerics' meaning: 1x1 convolutions
# (UNet/VAE projections and shortcuts) as matrix products, which inductor can fuse with their epilogues.
INDUCTOR_OPTIONS = {"conv_1x1_as_mm": True}


def default_compile_cache() -> Path:
    """``$EPD_COMPILE_CACHE``, else ``.cache/compile`` beside the repository's code."""
    env = os.environ.get("EPD_COMPILE_CACHE")
    return Path(env).expanduser() if env else Path(__file__).resolve().parents[1] / ".cache" / "compile"


def use_compile_cache(path: str | os.PathLike | None = None) -> Path:
    """Point inductor's and Triton's on-disk caches at ``path`` (default :func:`default_compile_cache`).

    Takes effect for compilations that start afterwards; an explicit ``$TORCHINDUCTOR_CACHE_DIR`` given by
    the user wins over the default (not over an explicit ``path``).
    """
    if path is None and os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    folder = Path(path).expanduser() if path is not None else default_compile_cache()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"compile cache folder {folder} cannot be created: {err.strerror}") from None
    if not os.access(folder, os.W_OK):
        raise ValueError(f"compile cache folder {folder} is not writable")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    # Triton's kernel cache follows inductor's folder unless the user set it; keep it inside ours.
    os.environ.setdefault("TRITON_CACHE_DIR", str(folder / "triton"))
    return folder


def compile_unavailable(device: torch.device | str) -> str | None:
    """Why ``torch.compile`` cannot generate code for ``device`` here, or ``None`` when it can."""
    device = torch.device(device)
    if sys.platform == "win32":
        return "torch.compile is not supported on Windows by this project"
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "Triton is not installed (inductor generates its GPU kernels with it)"
        return None
    if device.type == "cpu":
        compiler = os.environ.get("CXX") or next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)
        if compiler is None or shutil.which(compiler) is None:
            return "no C++ compiler on the PATH (inductor compiles its CPU kernels with one; install g++)"
        return None
    return f"inductor does not generate code for {device.type} devices"


class CompiledCall:
    """``CompiledCall(fn, name=..., device=...)(*args, **kwargs)``: ``fn`` through ``torch.compile``.

    ``fullgraph=True``: a graph break would leave Python between kernels, which a CUDA graph capture of the
    call could not replay faithfully, so any break is a compilation failure. On failure (or where
    :func:`compile_unavailable` gives a reason) one warning names ``name`` and the reason, and ``fn`` runs
    eagerly from then on; an error that the eager function raises too (a wrong input) surfaces as usual.
    """

    def __init__(self, fn: Callable[..., Any], *, name: str, device: torch.device | str,
                 mode: str | None = None, options: dict | None = None):
        self.eager = fn
        self.name = name
        self.device = torch.device(device)
        self.failure: str | None = compile_unavailable(self.device)   # set: calls run eagerly
        if self.failure is None:
            chosen = dict(INDUCTOR_OPTIONS if self.device.type == "cuda" else {}, **(options or {}))
            self.compiled = torch.compile(fn, fullgraph=True, dynamic=False, mode=mode,
                                          options=chosen or None)
        else:
            self._warn()

    @property
    def active(self) -> bool:
        """Whether calls go through the compiled function (False after a failure)."""
        return self.failure is None

    def _warn(self) -> None:
        warnings.warn(f"torch.compile of {self.name} is not used: {self.failure}; running it eagerly",
                      RuntimeWarning, stacklevel=3)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.failure is not None:
            return self.eager(*args, **kwargs)
        try:
            return self.compiled(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - inductor/dynamo raise many types; eager decides below
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise
            self.failure = f"compilation failed ({error_summary(err)})"
            self._warn()
            return self.eager(*args, **kwargs)
