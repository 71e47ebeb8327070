"""The Backend contract: what every model must offer to be sampled, benchmarked and distilled.

A backend is a denoiser in VE coordinates (``x = x0 + sigma * eps``), or in flow-matching coordinates
(``x = (1 - sigma) x0 + sigma eps``), together with what a sampler needs around it:

    D = backend(x, sigma, cond)                 # x0 estimate, same shape and dtype as x; sigma scalar or [B]
    cond = backend.encode_prompts(prompts, seeds)   # one condition row per image
    images = backend.decode(states)             # float32 [B, 3|1, H, W] in [-1, 1]

The probability-flow ODE is ``dx/dsigma = (x - D) / sigma`` in both families (for flow models this is the
velocity, docs/backends/contract.md). :class:`Backend` lists every member; :class:`BackendBase` gives the
defaults a simple model can keep, and :func:`check_backend` is the one place that tests an object against
the contract (the error names each missing member). docs/backends/contract.md is the written version.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from solvers.schedules import ScheduleSpec

from .prompts import shown_prompt

__all__ = ["Backend", "BackendBase", "check_backend", "CONTRACT", "FAMILIES", "PREDICTION_TYPES",
           "CONDITION_KINDS"]

FAMILIES = ("ve", "flow")
# What the underlying network predicts; the backend always returns D (the x0 estimate) whatever it is.
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow", "edm", "exact")
# none: unconditional (prompts must be empty); label: prompts name class labels, cheap to encode and check
# up front; prompt: free text through a text encoder.
CONDITION_KINDS = ("none", "label", "prompt")


@runtime_checkable
class Backend(Protocol):
    """The single contract between models and everything that samples them (docs/backends/contract.md).

    ``family``: ``ve`` or ``flow``. ``prediction_type``: what the network predicts (:data:`PREDICTION_TYPES`).
    ``condition_kind``: :data:`CONDITION_KINDS`. ``shape``: one state ``(C, H, W)``. ``state_dtype`` and
    ``device``: where the ODE state lives. ``sigma_min``/``sigma_max``: the range default grids span.
    ``alphas_cumprod``: a discrete-time model's schedule (its ``discrete`` grid), else None. ``guidance``: the
    guidance scale in effect and ``guided`` whether it costs a second network row per image.
    ``save_upscale``: nearest-neighbour factor for saved images (None: automatic).
    """

    name: str
    family: str
    prediction_type: str
    condition_kind: str
    shape: tuple[int, ...]
    state_dtype: torch.dtype
    device: torch.device
    sigma_min: float
    sigma_max: float
    alphas_cumprod: np.ndarray | None
    guidance: float
    guided: bool
    save_upscale: int | None

    @property
    def flow(self) -> bool: ...

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Any = None) -> torch.Tensor: ...

    def encode_prompts(self, prompts: Sequence[str], seeds: Sequence[int] | None = None) -> Any: ...

    def decode(self, x: torch.Tensor) -> torch.Tensor: ...

    def default_schedule(self, num_steps: int, variant: str = "correct") -> ScheduleSpec: ...

    def flow_shift(self) -> tuple[float | None, float | None]: ...

    def config(self) -> dict: ...

    def describe(self) -> dict: ...


CONTRACT: tuple[str, ...] = ("name", "family", "prediction_type", "condition_kind", "shape", "state_dtype",
                             "device", "sigma_min", "sigma_max", "alphas_cumprod", "guidance", "guided",
                             "save_upscale", "flow", "__call__", "encode_prompts", "decode", "default_schedule",
                             "flow_shift", "config", "describe")


class BackendBase:
    """Defaults of the contract: a VE, unconditional-or-label, float32 CPU model on EDM's 0.002..80 range,
    without guidance, whose states are images. Subclasses set what differs and implement ``__call__``."""

    name = "custom"
    family: Literal["ve", "flow"] = "ve"
    prediction_type = "sample"
    condition_kind = "label"
    state_dtype = torch.float32
    sigma_min = 0.002
    sigma_max = 80.0
    alphas_cumprod: np.ndarray | None = None
    guidance = 1.0
    save_upscale: int | None = None

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def guided(self) -> bool:
        return self.guidance != 1.0

    @property
    def flow(self) -> bool:
        """True for flow-matching states (``D = x - sigma v``); the solvers' ``flow`` switch."""
        return self.family == "flow"

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Any = None) -> torch.Tensor:
        raise NotImplementedError

    def encode_prompts(self, prompts: Sequence[str], seeds: Sequence[int] | None = None) -> Any:
        """Class labels from prompts (``"7"`` -> 7; ``""`` -> -1, unconditional); None if no prompt names one."""
        labels = []
        for prompt in prompts:
            text = str(prompt or "").strip()
            if text and not text.lstrip("-").isdigit():
                raise ValueError(f"prompt {shown_prompt(text)} is not a class label; the {self.name} model takes "
                                 "integers")
            labels.append(int(text) if text else -1)
        if self.condition_kind == "none":
            if any(label != -1 for label in labels):
                raise ValueError(f"the {self.name} model is unconditional; it takes no prompt or class")
            return None
        return torch.tensor(labels, dtype=torch.long)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """States are images already: float32, clamped to [-1, 1]."""
        return x.float().clamp(-1, 1)

    def default_schedule(self, num_steps: int, variant: str = "correct") -> ScheduleSpec:
        """The model's own grid when it has one (``discrete``), else EDM's polynomial rho 7 (Karras et al. eq. 5)."""
        if self.alphas_cumprod is not None:
            return ScheduleSpec(kind="discrete", num_steps=num_steps, sigma_min=self.sigma_min,
                                sigma_max=self.sigma_max, rho=1.0, variant=variant)
        return ScheduleSpec(kind="polynomial", num_steps=num_steps, sigma_min=self.sigma_min,
                            sigma_max=self.sigma_max, rho=7.0, variant=variant)

    def flow_shift(self) -> tuple[float | None, float | None]:
        """``(shift, mu)`` of a flow model's grid; ``(None, None)`` for VE models."""
        return None, None

    def config(self) -> dict:
        """Loader options that rebuild this backend (besides the weights' path), stored in tables."""
        return {}

    def describe(self) -> dict:
        """Identity of the model for caches, sidecars and table metadata."""
        return {"backend": self.name, "family": self.family, "prediction_type": self.prediction_type,
                "shape": list(self.shape), "sigma_min": float(self.sigma_min), "sigma_max": float(self.sigma_max)}


def check_backend(obj: Any, source: str = "the backend") -> Any:
    """``obj`` if it meets the contract; else a TypeError naming every missing or invalid member."""
    missing = [name for name in CONTRACT if not hasattr(obj, name)]
    if missing:
        raise TypeError(f"{source} ({type(obj).__name__}) does not implement the Backend contract: missing "
                        f"{', '.join(missing)} (docs/backends/contract.md; subclass backends.BackendBase for "
                        "defaults)")
    problems = []
    if obj.family not in FAMILIES:
        problems.append(f"family {obj.family!r} (use {' or '.join(FAMILIES)})")
    if obj.prediction_type not in PREDICTION_TYPES:
        problems.append(f"prediction_type {obj.prediction_type!r} (use one of {', '.join(PREDICTION_TYPES)})")
    if obj.condition_kind not in CONDITION_KINDS:
        problems.append(f"condition_kind {obj.condition_kind!r} (use one of {', '.join(CONDITION_KINDS)})")
    if not callable(obj):
        problems.append("it is not callable as backend(x, sigma, cond)")
    if problems:
        raise TypeError(f"{source} ({type(obj).__name__}) breaks the Backend contract: {'; '.join(problems)}")
    return obj
