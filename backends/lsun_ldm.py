"""``lsun_ldm``: the ICCV LSUN-Bedroom latent diffusion model (CompVis ``lsun_bedrooms-ldm-vq-4``) as a denoiser
(docs/authors-code.md §5.1, docs/edm.md §5).

An unconditional epsilon-predicting discrete VP model on ``3 x 64 x 64`` VQ-f4 latents, LDM's linear betas
0.0015 -> 0.0195 over 1000 steps, mapped to VE coordinates by the rule of the SD1.5 backend
(:class:`solvers.schedules.VPDiscreteMap`, :func:`backends.prediction.denoised_from_prediction`):

    c_in = 1 / sqrt(1 + sigma^2),   t = 1000 sigma^{-1}(sigma) - 1 (fractional; n at sigma_n)
    D(x, sigma) = x - sigma * unet(c_in x, t)

with sigma range sigma(1e-3)..sigma(1) = 0.0387590..83.8225 (docs/authors-code.md §3.2). ``decode`` is LDM's
``decode_first_stage``: ``z / scale_factor`` (1 here) quantized to the VQ codebook, then ``post_quant_conv`` and
the decoder, giving ``[-1, 1]`` images of 256 x 256. The default grid is the released tables' ``time_uniform``
(rho 1) between those ends.

Weights load from a local file only (:func:`lsun_model_path`): the release's ``model.ckpt`` (read without running
its pickle, converted in memory by :mod:`backends.compvis_ldm`) or the ``.safetensors`` file of
``python -m tools.lsun_cli convert``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from solvers.schedules import ScheduleSpec, VPDiscreteMap

from .base import BackendBase
from .compvis_ldm import ConvertedLDM, load_model_file, quantize_latents
from .diffusers_base import resolve_dtype
from .edm import file_sha256
from .prediction import denoised_from_prediction, vp_input_scale

__all__ = ["LSUNLDMBackend", "load_lsun_ldm", "lsun_model_path", "ENV_VAR", "DEFAULT_PATHS", "RELEASE_URL"]

ENV_VAR = "LSUN_LDM_MODEL_PATH"
DEFAULT_PATHS = (Path("weights") / "lsun_ldm" / "lsun_bedrooms-ldm-vq-4.safetensors",
                 Path("weights") / "lsun_ldm" / "model.ckpt")
RELEASE_URL = "https://ommer-lab.com/files/latent-diffusion/lsun_bedrooms.zip"


class LSUNLDMBackend(BackendBase):
    """A converted LSUN latent diffusion model (:class:`~backends.compvis_ldm.ConvertedLDM`) as a denoiser.

    ``dtype``: the UNet's and decoder's compute dtype (the state and ``D`` keep the state's dtype).
    ``max_batch`` splits larger network calls (the B*K rows of a parallel EPD step). ``info``: provenance.
    """

    name = "lsun_ldm"
    family = "ve"
    prediction_type = "epsilon"
    condition_kind = "none"
    guidance = 1.0
    save_upscale = 1          # images are saved at 256 px, as FID needs them

    def __init__(self, model: ConvertedLDM, *, dtype: torch.dtype | None = None, max_batch: int | None = None,
                 ema: bool = False, info: dict | None = None):
        self.model = model
        self.unet, self.vqvae = model.unet, model.vqvae
        self.dtype = dtype or next(self.unet.parameters()).dtype
        for module in (self.unet, self.vqvae):
            if next(module.parameters()).dtype != self.dtype:    # diffusers warns on any dtype cast
                module.to(self.dtype)
        self.max_batch = None if not max_batch else int(max_batch)
        if self.max_batch is not None and self.max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.ema = bool(ema)
        self.info = dict(info or {})
        self.alphas_cumprod = np.asarray(model.alphas_cumprod, dtype=np.float32)
        self.vp = VPDiscreteMap(self.alphas_cumprod)
        self.sigma_min, self.sigma_max = self.vp.sigma_min, self.vp.sigma_max
        self.scale_factor = float(model.scale_factor)

    @property
    def network(self) -> torch.nn.Module:
        return self.unet

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def shape(self) -> tuple[int, int, int]:
        size = int(self.unet.config.sample_size)
        return (int(self.unet.config.in_channels), size, size)

    def encode_prompts(self, prompts: Sequence[str], seeds: Sequence[int] | None = None) -> None:
        """Unconditional: every prompt must be empty; the condition is None."""
        named = [p for p in prompts if str(p or "").strip()]
        if named:
            raise ValueError(f"the {self.name} model is unconditional; it takes no prompt or class (got "
                             f"{str(named[0])[:40]!r})")
        return None

    def eps(self, x_vp: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """The UNet's epsilon for VP latents ``x_vp`` at (fractional) training timesteps ``[B]``."""
        step = self.max_batch or x_vp.shape[0]
        out = [self.unet(x_vp[lo:lo + step].to(self.dtype), timestep[lo:lo + step], return_dict=False)[0]
               for lo in range(0, x_vp.shape[0], step)]
        return out[0] if len(out) == 1 else torch.cat(out)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Any = None) -> torch.Tensor:
        if cond is not None:
            raise ValueError(f"the {self.name} model is unconditional; pass cond=None")
        batch = x.shape[0]
        sigma = torch.as_tensor(sigma, device=x.device)
        sigma = (sigma.expand(batch) if sigma.ndim == 0 else sigma.reshape(batch)).to(x.dtype)
        c_in = vp_input_scale(sigma.reshape(-1, *([1] * (x.ndim - 1))))
        timestep = self.vp.timestep(sigma).to(device=x.device, dtype=torch.float32)
        return denoised_from_prediction("epsilon", self.eps(c_in * x, timestep), x, sigma)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """LDM's ``decode_first_stage``: quantize ``x / scale_factor`` to the codebook, decode; float32 [-1, 1].
        Differentiable (straight through the quantizer, as taming's), so final-step feature losses reach the
        state; chunked by ``max_batch``."""
        codebook = self.vqvae.quantize.embedding.weight
        step = self.max_batch or x.shape[0]
        images = []
        for lo in range(0, x.shape[0], step):
            quant = quantize_latents((x[lo:lo + step] / self.scale_factor).to(self.dtype), codebook)
            images.append(self.vqvae.decode(quant, force_not_quantize=True, return_dict=False)[0])
        return torch.cat(images).float().clamp(-1, 1)

    def default_schedule(self, num_steps: int, variant: str = "correct") -> ScheduleSpec:
        """The released LSUN tables' grid: ``time_uniform`` (rho 1) from sigma(1) to sigma(1e-3)
        (docs/authors-code.md §3.2)."""
        return ScheduleSpec(kind="time_uniform", num_steps=num_steps, sigma_min=self.sigma_min,
                            sigma_max=self.sigma_max, rho=1.0, variant=variant)

    def config(self) -> dict:
        return {"ema": True} if self.ema else {}

    def describe(self) -> dict:
        return {**super().describe(), "backend": self.name, "scale_factor": self.scale_factor,
                "ema": self.ema or bool(self.model.config.get("ema", False)),
                "file": self.info.get("file"), "file_sha256": self.info.get("file_sha256"),
                "release": self.model.config.get("unet"), "first_stage": self.model.config.get("first_stage"),
                "parameters": sum(p.numel() for p in self.unet.parameters()) +
                sum(p.numel() for p in self.vqvae.parameters())}


def lsun_model_path(model_path: str | os.PathLike | None = None, default_model_path: str | None = None) -> Path:
    """``model_path``, else ``$LSUN_LDM_MODEL_PATH``, else ``default_model_path``, else the first of
    :data:`DEFAULT_PATHS` that exists. A missing file is one FileNotFoundError naming it and the release."""
    chosen = model_path or os.environ.get(ENV_VAR) or default_model_path
    candidates = [Path(chosen).expanduser()] if chosen else list(DEFAULT_PATHS)
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"LSUN-Bedroom latent diffusion model not found ({' or '.join(map(str, candidates))}). It is model.ckpt "
        f"of the CompVis latent-diffusion release (lsun_bedrooms-ldm-vq-4: {RELEASE_URL}, listed in the "
        f"latent-diffusion README; unzip lsun_bedrooms.zip); nothing is downloaded at run time. Optionally convert "
        f"it once (python -m tools.lsun_cli convert model.ckpt OUT.safetensors), then pass --model_path FILE, "
        f"backend_config.model_path or ${ENV_VAR}. See docs/edm.md section 5.")


def load_lsun_ldm(model_path: str | os.PathLike | None = None, *, default_model_path: str | None = None,
                  device: str | torch.device | None = None, dtype: str | torch.dtype | None = "auto",
                  max_batch: int | None = None, ema: bool = False, resolution: int | None = None,
                  guidance: float | None = None) -> LSUNLDMBackend:
    """Load the LSUN latent diffusion model from ``model.ckpt`` or its converted ``.safetensors``
    (:func:`lsun_model_path`). ``dtype``: ``auto`` is float16 on CUDA and float32 elsewhere, or a name.
    ``ema``: take the UNet's EMA weights from ``model.ckpt`` (default: ``model.diffusion_model``, what loading the
    checkpoint into LatentDiffusion and calling ``apply_model`` uses). ``resolution`` (pixels), when given, must be
    the model's; ``guidance`` must be 1 (the model is unconditional)."""
    if guidance not in (None, 0, 0.0, 1, 1.0):
        raise ValueError(f"guidance {guidance} was asked for, but the lsun_ldm model is unconditional")
    path = lsun_model_path(model_path, default_model_path)
    place = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = resolve_dtype(dtype, place, torch.float16)
    model = load_model_file(path, ema=bool(ema))
    pixels = int(model.unet.config.sample_size) * 2 ** (len(model.vqvae.config.block_out_channels) - 1)
    if resolution is not None and int(resolution) != pixels:
        raise ValueError(f"{path} decodes {pixels}x{pixels} images; resolution {resolution} was asked for")
    model.unet.to(place)
    model.vqvae.to(place)
    info = {"file": str(path), "file_sha256": file_sha256(path), "config": model.config}
    return LSUNLDMBackend(model, dtype=torch_dtype, max_batch=max_batch, ema=bool(ema), info=info)
