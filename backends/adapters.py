"""Bring your own model: wrap a plain network as a Backend (docs/backends/own_model.md).

Three adapters turn a network you trained yourself into a :class:`~backends.base.Backend`, the denoiser
``D(x, sigma, cond)`` in VE coordinates (or flow-matching states) that every sampler, benchmark and trainer
takes:

* :class:`DiscreteVPBackend`: ``network(x_vp, t, cond)`` predicting eps, v or x0 on a discrete VP schedule
  (DDPM, Stable-Diffusion-style). With ``alpha = 1/sqrt(1 + sigma^2)`` the network sees ``x_vp = alpha x`` at
  the fractional training timestep ``t`` of :class:`~solvers.schedules.VPDiscreteMap` and D follows from
  :func:`~backends.prediction.denoised_from_prediction` (eps: ``D = x - sigma eps``; v: ``D = alpha^2 x -
  alpha sigma v``; sample: ``D = x0_hat``).
* :class:`EDMDenoiserBackend`: a sigma-conditioned network, either already the denoiser ``network(x, sigma,
  cond) -> D`` or a raw ``F`` with EDM's preconditioning (Karras et al. 2022, Table 1):
  ``D = c_skip x + c_out F(c_in x, c_noise, cond)``.
* :class:`FlowBackend`: a rectified-flow velocity ``network(x, t, cond) -> v`` with ``t = time_scale * sigma``
  on ``x = (1 - sigma) x0 + sigma eps``: ``D = x - sigma v``.

What they share (:class:`NetworkBackend`): class labels as conditions (``cond`` int64 ``[B]``, label -1 =
unconditional, handed to the network as ``null_label``; None for unconditional networks), classifier-free
guidance ``D = D_u + g (D_c - D_u)`` from one batched call over ``[uncond, cond]``, ``max_batch`` chunking of
large calls (CFG rows included; an EPD step evaluates B*K rows at once), the network moved to ``device`` /
cast to ``dtype`` and frozen, inputs cast to the network's dtype while the state and ``D`` keep the state's
dtype (float32 by default), and :meth:`~NetworkBackend.describe` / :meth:`~NetworkBackend.config`.

:func:`load_state_dict_network` builds a module and loads its weights from ``.safetensors`` or a ``.pt``/
``.pth``/``.bin`` state dict read with ``torch.load(weights_only=True)`` (no code is ever unpickled).
"""

from __future__ import annotations

import hashlib
import itertools
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from solvers.schedules import ScheduleSpec, VPDiscreteMap, flowmatch_sigmas

from .base import BackendBase
from .edm import file_sha256
from .prediction import VP_PREDICTIONS, denoised_from_prediction, vp_input_scale

__all__ = ["NetworkBackend", "DiscreteVPBackend", "EDMDenoiserBackend", "FlowBackend", "edm_preconditioning",
           "load_state_dict_network", "TIMESTEP_INPUTS", "WEIGHT_SUFFIXES"]

# What the discrete VP network's time input t is, given the fractional training-step index n (VPDiscreteMap).
TIMESTEP_INPUTS = ("index", "unit")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).replace("torch.", "")
    if name not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def _tensor_output(out: Any) -> torch.Tensor:
    """A network's tensor output: the tensor itself, the first item of a tuple, or a diffusers ``.sample``."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    sample = getattr(out, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    raise TypeError(f"the network returned a {type(out).__name__}; it must return a tensor (or a tuple / a "
                    "diffusers output whose first item / .sample is one)")


class NetworkBackend(BackendBase):
    """Shared body of the adapters: conditions, guidance, chunking, devices and metadata.

    ``network``: a callable (usually an ``nn.Module``, then moved to ``device``, cast to ``dtype``, put in eval
    mode and frozen with ``requires_grad_(False)``; gradients still flow through its inputs, as distillation
    needs). ``shape``: one state ``(C, H, W)``. ``num_classes`` > 0: a class-conditional network (prompts name
    the class, ``condition_kind`` "label"); 0: unconditional (``condition_kind`` "none", ``cond`` None).
    ``guidance`` != 1 (needs ``num_classes``): ``D = D_u + g (D_c - D_u)``, both rows in one call.
    ``null_label``: the label the network takes for "no class" (-1 by default; e.g. ``num_classes`` for a
    DiT-style null class). ``max_batch``: the most rows per network call. ``decode``: states -> images in
    [-1, 1] for latent models (default: states are images, clamped). ``info``: what is known about the weights
    (``path``, ``file_sha256``; default: what :func:`load_state_dict_network` recorded on the module).
    Subclasses implement :meth:`_denoise`.
    """

    name = "custom"

    def __init__(self, network: Callable[..., Any], *, shape: Sequence[int], num_classes: int = 0,
                 guidance: float = 1.0, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, max_batch: int | None = None, null_label: int = -1,
                 decode: Callable[[torch.Tensor], torch.Tensor] | None = None, name: str | None = None,
                 info: Mapping[str, Any] | None = None):
        if not callable(network):
            raise TypeError(f"network must be callable (got {type(network).__name__})")
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) < 1 or any(s < 1 for s in self.shape):
            raise ValueError(f"shape must be one state's positive sizes, e.g. (3, 32, 32) (got {tuple(shape)})")
        self.num_classes = int(num_classes)
        if self.num_classes < 0:
            raise ValueError("num_classes must be >= 0 (0: unconditional)")
        self.condition_kind = "label" if self.num_classes else "none"
        self.guidance = float(guidance)
        if self.guidance != 1.0 and not self.num_classes:
            raise ValueError("classifier-free guidance needs a class-conditional network (num_classes > 0)")
        self.max_batch = None if not max_batch else int(max_batch)
        if self.max_batch is not None and self.max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if self.guided and self.max_batch is not None and self.max_batch < 2:
            raise ValueError("with guidance a call holds [uncond, cond] rows; max_batch must be >= 2")
        self.null_label = int(null_label)
        self._decode = decode
        if name:
            self.name = str(name)
        self._device = None if device is None else torch.device(device)
        target_dtype = _resolve_dtype(dtype)
        if isinstance(network, nn.Module):
            if target_dtype is not None:
                network = network.to(dtype=target_dtype)
            if self._device is not None:
                network = network.to(self._device)
            network.eval().requires_grad_(False)
        self._explicit_dtype = target_dtype
        self.network = network
        self.info = dict(info if info is not None else getattr(network, "weights_info", None) or {})

    # -- where the network runs ------------------------------------------------------------------------------
    def _first_tensor(self, floating: bool = False) -> torch.Tensor | None:
        """The network's first parameter or buffer (the first floating one with ``floating``); None if none."""
        if not isinstance(self.network, nn.Module):
            return None
        for tensor in itertools.chain(self.network.parameters(), self.network.buffers()):
            if not floating or tensor.is_floating_point():
                return tensor
        return None

    @property
    def device(self) -> torch.device:
        """``device`` if given, else where the network's parameters are (CPU for a parameter-free callable)."""
        if self._device is not None:
            return self._device
        tensor = self._first_tensor()
        return tensor.device if tensor is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """The network's compute dtype: its first floating parameter's, else ``dtype``, else float32."""
        tensor = self._first_tensor(floating=True)
        return tensor.dtype if tensor is not None else (self._explicit_dtype or torch.float32)

    # -- conditions ------------------------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str], seeds: Sequence[int] | None = None) -> torch.Tensor | None:
        """Class labels from prompts (``"7"`` -> 7, ``""`` -> -1 unconditional); None for unconditional networks."""
        labels = super().encode_prompts(prompts, seeds)
        if labels is not None and bool(((labels < -1) | (labels >= self.num_classes)).any()):
            raise ValueError(f"class labels must be -1 (unconditional) or 0..{self.num_classes - 1} "
                             f"(got {labels.tolist()})")
        return labels

    def _labels(self, cond: Any, batch: int) -> torch.Tensor | None:
        """``cond`` as int64 labels ``[B]`` on the CPU (-1: unconditional); None for unconditional networks."""
        if not self.num_classes:
            if cond is not None and bool((torch.as_tensor(cond) != -1).any()):
                raise ValueError(f"the {self.name} network is unconditional; pass cond=None")
            return None
        if cond is None:
            return torch.full((batch,), -1, dtype=torch.long)
        labels = torch.as_tensor(cond).reshape(-1)
        if labels.is_floating_point():
            raise ValueError("cond must be integer class labels [B] (-1: unconditional)")
        labels = labels.long()
        if labels.shape[0] != batch:
            raise ValueError(f"got {labels.shape[0]} labels for a batch of {batch}")
        if not labels.is_cuda and bool(((labels < -1) | (labels >= self.num_classes)).any()):
            raise ValueError(f"labels must be -1 (unconditional) or 0..{self.num_classes - 1}")
        return labels

    def _network_labels(self, labels: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
        if labels is None:
            return None
        if self.null_label != -1:
            labels = torch.where(labels < 0, torch.full_like(labels, self.null_label), labels)
        return labels.to(device)

    # -- the denoiser --------------------------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Any = None) -> torch.Tensor:
        """``D(x, sigma, cond)``: ``sigma`` a scalar or ``[B]``; guided and chunked as the class docstring says."""
        batch = x.shape[0]
        sigma = torch.as_tensor(sigma, device=x.device)
        sigma = sigma.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        sigma = sigma.reshape(-1).expand(batch) if sigma.numel() == 1 else sigma.reshape(batch)
        labels = self._labels(cond, batch)
        if self.guided and labels is not None and bool((labels >= 0).any()):
            both = self._rows(torch.cat([x, x]), torch.cat([sigma, sigma]),
                              torch.cat([torch.full_like(labels, -1), labels]))
            uncond, conditional = both.chunk(2)
            return uncond + self.guidance * (conditional - uncond)
        return self._rows(x, sigma, labels)

    def _rows(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """:meth:`_denoise` over chunks of at most ``max_batch`` rows."""
        step = self.max_batch or x.shape[0]
        outs = []
        for lo in range(0, x.shape[0], step):
            rows = None if labels is None else self._network_labels(labels[lo:lo + step], self.device)
            outs.append(self._denoise(x[lo:lo + step], sigma[lo:lo + step], rows))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _denoise(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """D for one chunk without guidance (``x`` in the state dtype, ``sigma`` ``[b]``); subclasses."""
        raise NotImplementedError

    def _net(self, inputs: torch.Tensor, time: torch.Tensor, labels: torch.Tensor | None,
             like: torch.Tensor) -> torch.Tensor:
        """One network call: inputs in the network dtype on its device, ``time`` ``[b]`` in float32 (float64 for
        a float64 network); the output in ``like``'s dtype and device, checked against its shape."""
        device, dtype = self.device, self.dtype
        time_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        out = _tensor_output(self.network(inputs.to(device=device, dtype=dtype),
                                          time.to(device=device, dtype=time_dtype), labels))
        if out.shape != like.shape:
            raise ValueError(f"the network returned shape {tuple(out.shape)} for inputs of shape "
                             f"{tuple(like.shape)}; it must return one value per input element (slice extra "
                             "channels, such as a learned variance, in a wrapper)")
        return out.to(device=like.device, dtype=like.dtype)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """``decode(x)`` when given (latent models), else the states themselves: float32 clamped to [-1, 1]."""
        return (self._decode(x) if self._decode is not None else x).float().clamp(-1, 1)

    # -- metadata -------------------------------------------------------------------------------------------------
    def config(self) -> dict:
        """Options a factory needs besides the weights' path: the guidance scale when guided, else nothing."""
        return {"guidance": self.guidance} if self.guided else {}

    def _describe_extra(self) -> dict:
        return {}

    def describe(self) -> dict:
        """Identity for caches, sidecars and table metadata: adapter, network class and size, weights file and
        its sha256 (when loaded by :func:`load_state_dict_network`), conditions, range, plus the adapter's own."""
        network = self.network
        params = sum(p.numel() for p in network.parameters()) if isinstance(network, nn.Module) else None
        return {"backend": self.name, "adapter": type(self).__name__, "family": self.family,
                "prediction_type": self.prediction_type, "network": type(network).__name__, "parameters": params,
                "dtype": str(self.dtype).replace("torch.", ""), "shape": list(self.shape),
                "num_classes": self.num_classes, "guidance": self.guidance, "null_label": self.null_label,
                "sigma_min": float(self.sigma_min), "sigma_max": float(self.sigma_max),
                "checkpoint": self.info.get("path"), "file_sha256": self.info.get("file_sha256"),
                **self._describe_extra()}


class DiscreteVPBackend(NetworkBackend):
    """A discrete-time VP network ``network(x_vp, t, cond)`` predicting ``prediction_type`` (epsilon,
    v_prediction or sample) on the schedule given by ``betas`` or ``alphas_cumprod`` (one of them; N entries,
    ``alphabar_n = prod_{i<=n} (1 - beta_i)``).

    Index convention (:class:`~solvers.schedules.VPDiscreteMap`): training step n = 0..N-1 has
    ``sigma_n = sqrt((1 - alphabar_n) / alphabar_n)``; the fractional index ``n(sigma)`` interpolates
    ``log alpha = 0.5 log alphabar`` linearly between the steps and is exactly n at sigma_n. So **t = 0 is
    sigma_0** (the least noise, ``sigma_min``) and **t = N-1 is sigma_{N-1}** (the most, ``sigma_max``), as in
    DDPM/diffusers where the network is trained on timesteps 0..N-1 and step n adds noise alphabar_n.
    ``timestep_input`` says what ``t`` the network takes: ``"index"`` (``t = n``, float; diffusers UNets),
    ``"unit"`` (``t = (n + 1) / N`` in (0, 1]), or a function of the index tensor (e.g. ``lambda n: n / N``).

    ``D = denoised_from_prediction(prediction_type, network(alpha x, t, cond), x, sigma)``, ``alpha =
    1/sqrt(1 + sigma^2)``. ``alphas_cumprod`` (float64) gives the model's own ``discrete`` grid, the default
    one; ``sigma_min``/``sigma_max`` are sigma_0 and sigma_{N-1}. Pass the schedule exactly as your training
    code used it (e.g. a diffusers scheduler's ``alphas_cumprod``). Other options: :class:`NetworkBackend`.
    """

    family = "ve"

    def __init__(self, network: Callable[..., Any], *, betas: Any = None, alphas_cumprod: Any = None,
                 prediction_type: str = "epsilon", shape: Sequence[int], num_classes: int = 0,
                 guidance: float = 1.0, device: str | torch.device | None = None, max_batch: int | None = None,
                 timestep_input: str | Callable[[torch.Tensor], torch.Tensor] = "index",
                 dtype: str | torch.dtype | None = None, null_label: int = -1,
                 decode: Callable[[torch.Tensor], torch.Tensor] | None = None, name: str | None = None,
                 info: Mapping[str, Any] | None = None):
        if (betas is None) == (alphas_cumprod is None):
            raise ValueError("give the schedule as exactly one of betas and alphas_cumprod")
        if betas is not None:
            b = np.asarray(torch.as_tensor(betas).detach().cpu().numpy(), dtype=np.float64)
            if b.ndim != 1 or not np.all((b > 0) & (b < 1)):
                raise ValueError("betas must be a 1-D sequence in (0, 1)")
            ac = np.cumprod(1.0 - b)
        else:
            ac = np.asarray(torch.as_tensor(alphas_cumprod).detach().cpu().numpy(), dtype=np.float64)
        if prediction_type not in VP_PREDICTIONS:
            raise ValueError(f"prediction_type {prediction_type!r}: use one of {', '.join(VP_PREDICTIONS)}")
        if not callable(timestep_input) and timestep_input not in TIMESTEP_INPUTS:
            raise ValueError(f"timestep_input {timestep_input!r}: use one of {', '.join(TIMESTEP_INPUTS)} or a "
                             "function of the fractional training-step index")
        self.vp = VPDiscreteMap(ac)          # checks: 1-D, strictly decreasing, in (0, 1]
        self.alphas_cumprod = ac
        self.num_train_timesteps = int(ac.size)
        self.sigma_min, self.sigma_max = self.vp.sigma_min, self.vp.sigma_max
        self.prediction_type = prediction_type
        self.timestep_input = timestep_input
        super().__init__(network, shape=shape, num_classes=num_classes, guidance=guidance, device=device,
                         dtype=dtype, max_batch=max_batch, null_label=null_label, decode=decode, name=name, info=info)

    def timesteps(self, sigma: torch.Tensor) -> torch.Tensor:
        """The network's time input for each sigma: ``n(sigma)`` (index), ``(n + 1) / N`` (unit) or
        ``timestep_input(n)``; float64, differentiable in sigma."""
        index = self.vp.timestep(sigma)
        if callable(self.timestep_input):
            return torch.as_tensor(self.timestep_input(index))
        if self.timestep_input == "unit":
            return (index + 1.0) / self.num_train_timesteps
        return index

    def _denoise(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        out = self._net(vp_input_scale(s) * x, self.timesteps(sigma), labels, like=x)
        return denoised_from_prediction(self.prediction_type, out, x, sigma)

    def _describe_extra(self) -> dict:
        digest = hashlib.sha256(np.ascontiguousarray(self.alphas_cumprod).tobytes()).hexdigest()[:16]
        kind = "callable" if callable(self.timestep_input) else self.timestep_input
        return {"timestep_input": kind, "num_train_timesteps": self.num_train_timesteps,
                "alphas_cumprod_sha256": digest}


def edm_preconditioning(sigma: torch.Tensor, sigma_data: float = 0.5) -> tuple[torch.Tensor, ...]:
    """EDM's ``(c_skip, c_out, c_in, c_noise)`` (Karras et al. 2022, Table 1): ``sd^2/(s^2+sd^2)``,
    ``s sd/sqrt(s^2+sd^2)``, ``1/sqrt(s^2+sd^2)``, ``ln(s)/4``."""
    sd2 = float(sigma_data) ** 2
    norm = (sigma * sigma + sd2).sqrt()
    return sd2 / (sigma * sigma + sd2), sigma * float(sigma_data) / norm, 1.0 / norm, sigma.log() / 4


class EDMDenoiserBackend(NetworkBackend):
    """A sigma-conditioned network in VE coordinates on images of scale ``sigma_data``.

    ``preconditioned=True``: ``network(x, sigma, cond)`` already is the denoiser D (``sigma`` float32 ``[B]``).
    ``preconditioned=False``: a raw ``F``, ``D = c_skip x + c_out F(c_in x, c_noise, cond)`` with
    :func:`edm_preconditioning` (``c_noise = ln(sigma)/4`` float32 ``[B]``), as NVIDIA's ``EDMPrecond``.
    ``sigma_min``/``sigma_max``: the range of default (polynomial rho 7) grids, EDM's 0.002..80. Other options:
    :class:`NetworkBackend`.
    """

    family = "ve"

    def __init__(self, network: Callable[..., Any], *, shape: Sequence[int], sigma_data: float = 0.5,
                 preconditioned: bool = False, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 num_classes: int = 0, guidance: float = 1.0, device: str | torch.device | None = None,
                 max_batch: int | None = None, dtype: str | torch.dtype | None = None, null_label: int = -1,
                 decode: Callable[[torch.Tensor], torch.Tensor] | None = None, name: str | None = None,
                 info: Mapping[str, Any] | None = None):
        if not sigma_data > 0:
            raise ValueError("sigma_data must be > 0")
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max (got {sigma_min}, {sigma_max})")
        self.sigma_data = float(sigma_data)
        self.preconditioned = bool(preconditioned)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.prediction_type = "sample" if self.preconditioned else "edm"
        super().__init__(network, shape=shape, num_classes=num_classes, guidance=guidance, device=device,
                         dtype=dtype, max_batch=max_batch, null_label=null_label, decode=decode, name=name, info=info)

    def _denoise(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        if self.preconditioned:
            return self._net(x, sigma, labels, like=x)
        s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        c_skip, c_out, c_in, _ = edm_preconditioning(s, self.sigma_data)
        c_noise = sigma.log() / 4
        return c_skip * x + c_out * self._net(c_in * x, c_noise, labels, like=x)

    def _describe_extra(self) -> dict:
        return {"sigma_data": self.sigma_data, "preconditioned": self.preconditioned}


class FlowBackend(NetworkBackend):
    """A rectified-flow / flow-matching velocity network ``network(x, t, cond) -> v`` on
    ``x = (1 - sigma) x0 + sigma eps``, with ``t = time_scale * sigma`` (1000: SD3/FLUX-style timesteps; 1: t =
    sigma). ``D = x - sigma v`` (family ``flow``; the ODE ``dx/dsigma = (x - D)/sigma = v``).

    Range ``(0, 1]``: ``sigma_max = 1`` and ``sigma_min`` (default) the shifted end of the training range,
    ``shift / N / (1 + (shift - 1) / N)`` for ``num_train_timesteps`` N. The default grid is ``flowmatch`` with
    the static ``shift`` (None: 1, unshifted; SD3 uses 3). Other options: :class:`NetworkBackend`.
    """

    family = "flow"
    prediction_type = "flow"
    sigma_max = 1.0

    def __init__(self, network: Callable[..., Any], *, shape: Sequence[int], time_scale: float = 1000.0,
                 shift: float | None = None, sigma_min: float | None = None, num_train_timesteps: int = 1000,
                 num_classes: int = 0, guidance: float = 1.0, device: str | torch.device | None = None,
                 max_batch: int | None = None, dtype: str | torch.dtype | None = None, null_label: int = -1,
                 decode: Callable[[torch.Tensor], torch.Tensor] | None = None, name: str | None = None,
                 info: Mapping[str, Any] | None = None):
        self.time_scale = float(time_scale)
        if not (self.time_scale > 0 and math.isfinite(self.time_scale)):
            raise ValueError("time_scale must be a finite number > 0")
        self.shift = 1.0 if shift is None else float(shift)
        if self.shift <= 0:
            raise ValueError("shift must be > 0")
        self.num_train_timesteps = int(num_train_timesteps)
        self._sigma_min_arg = None if sigma_min is None else float(sigma_min)
        self.sigma_min = (float(flowmatch_sigmas(2, self.shift, num_train_timesteps=self.num_train_timesteps)[-1])
                          if sigma_min is None else float(sigma_min))
        if not 0 < self.sigma_min < 1:
            raise ValueError(f"sigma_min must lie in (0, 1) (got {self.sigma_min})")
        super().__init__(network, shape=shape, num_classes=num_classes, guidance=guidance, device=device,
                         dtype=dtype, max_batch=max_batch, null_label=null_label, decode=decode, name=name, info=info)

    def flow_shift(self) -> tuple[float | None, float | None]:
        """``(shift, None)``: a static shift."""
        return self.shift, None

    def default_schedule(self, num_steps: int, variant: str = "correct") -> ScheduleSpec:
        """The ``flowmatch`` grid with this model's shift, from sigma 1 to ``sigma_min``."""
        return ScheduleSpec(kind="flowmatch", num_steps=num_steps, sigma_min=self._sigma_min_arg, sigma_max=1.0,
                            rho=1.0, variant=variant, shift=self.shift)

    def _denoise(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        return x - s * self._net(x, self.time_scale * sigma, labels, like=x)

    def _describe_extra(self) -> dict:
        return {"time_scale": self.time_scale, "shift": self.shift, "num_train_timesteps": self.num_train_timesteps}


def load_state_dict_network(module_factory: Callable[[], nn.Module], path: str | Path,
                            device: str | torch.device | None = None, *, strict: bool = True,
                            dtype: str | torch.dtype | None = None) -> nn.Module:
    """``module_factory()`` with the state dict at ``path`` loaded, in eval mode, on ``device`` (default: CUDA
    when available, else CPU) and ``dtype`` (default: as saved into the module's own dtype).

    ``.safetensors`` is read by ``safetensors.torch.load_file``; ``.pt``/``.pth``/``.bin`` by ``torch.load(...,
    weights_only=True)`` (a file holding pickled code is refused, never run; a ``{"state_dict": ...}`` wrapper
    is unwrapped). ``strict`` as in ``load_state_dict``. The module records ``weights_info = {"path",
    "file_sha256"}``, which the adapters put into :meth:`~NetworkBackend.describe` (cache keys, metadata).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"network weights not found: {path} (give the path of a "
                                f"{', '.join(WEIGHT_SUFFIXES)} state dict)")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path), device="cpu")
    elif suffix in WEIGHT_SUFFIXES:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:      # pickle.UnpicklingError and friends: the file is more than tensors
            raise ValueError(f"{path} is not a plain state dict readable with torch.load(weights_only=True) "
                             f"(pickled code is never loaded; save model.state_dict() instead): {err}") from err
        if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
            state = state["state_dict"]
    else:
        raise ValueError(f"{path}: unknown weights format {suffix or '(no suffix)'!r}; use one of "
                         f"{', '.join(WEIGHT_SUFFIXES)}")
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    module = module_factory()
    if not isinstance(module, nn.Module):
        raise TypeError(f"module_factory returned a {type(module).__name__}, not a torch.nn.Module")
    module.load_state_dict(dict(state), strict=strict)
    target = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available()
                                                                           else "cpu")
    module = module.to(device=target, dtype=_resolve_dtype(dtype)) if dtype is not None else module.to(target)
    module.eval()
    module.weights_info = {"path": str(path.resolve()), "file_sha256": file_sha256(path)}
    return module
