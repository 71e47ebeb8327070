"""Stable Diffusion 1.5 (``ldm``) as a denoiser: a discrete-time VP, epsilon-predicting UNet in VE coordinates
(spec 5.1).

    x_VE = x_VP / alpha,   sigma = sqrt(1 - alpha^2) / alpha
    D(x, sigma) = x - sigma * eps(c_in x, t(sigma)),   c_in = 1 / sqrt(1 + sigma^2)

with ``t(sigma) = M sigma^{-1}(sigma) - 1`` the fractional training timestep of the continuous map built from
``alphas_cumprod`` (:class:`solvers.schedules.VPDiscreteMap`; exactly n at sigma_n). Unlike the authors' map,
ours is differentiable in sigma, so learned time scales get gradients through the UNet's time input.
Decoding: ``VAE.decode(z / 0.18215)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from solvers.schedules import ScheduleSpec, VPDiscreteMap, beta_alphas_cumprod

from .diffusers_base import (DiffusersBackend, ModelNotFoundError, PromptCondition, load_pipeline, place_pipeline,
                             resolve_dtype, resolve_model_path)

__all__ = ["StableDiffusionBackend", "load_sd15", "alphas_cumprod_from_config"]

REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SINGLE_FILE_SUFFIXES = (".ckpt", ".safetensors")


def alphas_cumprod_from_config(config: Any) -> np.ndarray:
    """``alphas_cumprod`` from a diffusers scheduler config, computed in float64 and stored as float32 as the
    LDM code keeps its buffer (spec 5.1); ``linear`` and ``scaled_linear`` beta schedules."""
    n = int(config.get("num_train_timesteps", 1000))
    if config.get("trained_betas") is not None:
        return np.cumprod(1.0 - np.asarray(config["trained_betas"], dtype=np.float64)).astype(np.float32)
    kind = config.get("beta_schedule", "scaled_linear")
    if kind not in ("linear", "scaled_linear"):
        raise ValueError(f"beta_schedule {kind!r} is not supported by the ldm backend (linear, scaled_linear)")
    return beta_alphas_cumprod(kind, float(config.get("beta_start", 0.00085)), float(config.get("beta_end", 0.012)), n)


class StableDiffusionBackend(DiffusersBackend):
    """SD1.x around a diffusers ``StableDiffusionPipeline`` (UNet, VAE, CLIP text encoder and tokenizer).

    The pipeline's scheduler is only read for its beta schedule; sampling is ours. Build it from a loaded
    pipeline with ``StableDiffusionBackend(pipe, guidance=7.5)`` or from disk with :func:`load_sd15`.
    """

    name = "ldm"
    family = "ve"
    default_guidance = 7.5

    def __init__(self, pipe: Any, *, alphas_cumprod: Any = None, **kwargs: Any):
        super().__init__(pipe, **kwargs)
        if pipe.unet.config.get("prediction_type", "epsilon") not in (None, "epsilon"):
            raise ValueError("the ldm backend expects an epsilon-predicting UNet")
        if alphas_cumprod is None:
            alphas_cumprod = alphas_cumprod_from_config(pipe.scheduler.config)
        self.alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float32)
        self.vp = VPDiscreteMap(self.alphas_cumprod)
        self.sigma_min = self.vp.sigma_min
        self.sigma_max = self.vp.sigma_max

    @property
    def network(self) -> torch.nn.Module:
        return self.pipe.unet

    def default_resolution(self) -> int:
        return int(self.pipe.unet.config.sample_size) * self.vae_scale_factor

    def default_schedule(self, num_steps: int, variant: str = "correct") -> ScheduleSpec:
        """The authors' SD1.5 grid: uniform in discrete model time from sigma(1) to sigma(1e-3) (spec 3.1)."""
        return ScheduleSpec(kind="discrete", num_steps=num_steps, sigma_min=None, sigma_max=None, rho=1.0,
                            variant=variant)

    def _denoise(self, x: torch.Tensor, sigma: torch.Tensor, embeds: torch.Tensor,
                 pooled: torch.Tensor | None) -> torch.Tensor:
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        c_in = 1.0 / torch.sqrt(1.0 + s * s)
        timestep = self.vp.timestep(sigma).to(device=x.device, dtype=torch.float32)
        eps = self.run_network((c_in * x).to(self.dtype), timestep, encoder_hidden_states=embeds.to(self.dtype),
                             return_dict=False)[0]
        return x - s * eps.to(x.dtype)

    def _encode(self, prompts: list[str], negative: list[str] | None) -> PromptCondition:
        embeds, neg = self.pipe.encode_prompt(prompts, self.device, 1, negative is not None,
                                              negative_prompt=negative)
        return PromptCondition(embeds=embeds, neg_embeds=neg)

    def config(self) -> dict:
        return {**super().config(), "negative_prompt": self.negative_prompt}


def load_sd15(model_path: str | None = None, *, default_model_path: str | None = None, config: str | None = None, device: str | None = None,
              dtype: str | torch.dtype | None = "auto", offload: str = "none", **backend_kwargs: Any) -> StableDiffusionBackend:
    """SD1.5 from a local diffusers folder, or from a single ``.ckpt``/``.safetensors`` checkpoint (the authors'
    ``v1-5-pruned-emaonly.ckpt``) together with ``config``, a local diffusers folder of the same architecture
    that supplies the component configs, tokenizer and scheduler (diffusers would otherwise fetch them)."""
    from diffusers import StableDiffusionPipeline

    place = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = resolve_dtype(dtype, place, torch.float16)
    path = resolve_model_path(model_path, repo=REPO, env="SD15_MODEL_PATH", default=default_model_path)
    extra = dict(safety_checker=None, requires_safety_checker=False)
    if path.is_file():
        if path.suffix not in SINGLE_FILE_SUFFIXES:
            raise ModelNotFoundError(f"{path}: a single-file checkpoint must end in .ckpt or .safetensors")
        if config is None:
            raise ModelNotFoundError(
                f"{path} is a single-file checkpoint; also give backend_config.config = a local diffusers SD1.5 "
                f"folder (its configs, tokenizer and scheduler are needed, and never downloaded), e.g. "
                f"--backend-config '{{\"config\": \"weights/stable-diffusion-v1-5\"}}'")
        config_dir = resolve_model_path(config, repo=REPO)
        try:
            pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(config_dir), local_files_only=True,
                                                            torch_dtype=torch_dtype, **extra)
        except (OSError, ValueError) as err:
            raise ModelNotFoundError(f"could not load {path} with config {config_dir}: {err}") from err
    else:
        pipe = load_pipeline(StableDiffusionPipeline, Path(path), torch_dtype, **extra)
    pipe.set_progress_bar_config(disable=True)
    place_pipeline(pipe, place, offload)
    return StableDiffusionBackend(pipe, **backend_kwargs)
