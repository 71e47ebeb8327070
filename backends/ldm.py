"""Stable Diffusion 1.x/2.x (``ldm``) as a denoiser: a discrete-time VP UNet in VE coordinates
(docs/authors-code.md §5.1).

    x_VE = x_VP / alpha,   sigma = sqrt(1 - alpha^2) / alpha,   c_in = alpha = 1 / sqrt(1 + sigma^2)
    out = unet(c_in x, t(sigma))
    epsilon (SD1.x, SD2.x 512-base):  D = x - sigma out
    v_prediction (SD2.x 768-v):       D = alpha^2 x - alpha sigma out
    sample:                           D = out

(:func:`backends.prediction.denoised_from_prediction`), with ``t(sigma) = M sigma^{-1}(sigma) - 1`` the
fractional training timestep of the continuous map built from ``alphas_cumprod``
(:class:`solvers.schedules.VPDiscreteMap`; exactly n at sigma_n). Unlike the authors' map, ours is
differentiable in sigma, so learned time scales get gradients through the UNet's time input.
Decoding: ``VAE.decode(z / 0.18215)``.

Of the pipeline's scheduler config only the betas (``alphas_cumprod``) and ``prediction_type`` are used; its
``timestep_spacing``, ``steps_offset``, ``set_alpha_to_one``, ``clip_sample`` and the like describe diffusers'
own sampling grid and are ignored (our grid is ours). ``rescale_betas_zero_snr`` would change the betas
(alphabar_M = 0, an infinite sigma_max) and is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from solvers.schedules import ScheduleSpec, VPDiscreteMap, beta_alphas_cumprod

from .diffusers_base import (DiffusersBackend, PromptCondition, load_local_pipeline, place_pipeline, resolve_dtype,
                             resolve_model_path)
from .prediction import VP_PREDICTIONS, denoised_from_prediction, prediction_type_from_config, vp_input_scale

__all__ = ["StableDiffusionBackend", "load_sd15", "alphas_cumprod_from_config"]

REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def alphas_cumprod_from_config(config: Any) -> np.ndarray:
    """``alphas_cumprod`` from a diffusers scheduler config, computed in float64 and stored as float32 as the LDM code
    keeps its buffer (docs/authors-code.md §5.1); ``linear`` and ``scaled_linear`` beta schedules (or
    ``trained_betas``). ``rescale_betas_zero_snr`` is refused: it sets alphabar_M = 0, a terminal sigma no VE grid can
    start from."""
    n = int(config.get("num_train_timesteps", 1000))
    if config.get("rescale_betas_zero_snr", False):
        raise ValueError("rescale_betas_zero_snr=True (zero terminal SNR, alphabar_M = 0) is not supported by the "
                         "ldm backend: its sigma_max is infinite")
    if config.get("trained_betas") is not None:
        return np.cumprod(1.0 - np.asarray(config["trained_betas"], dtype=np.float64)).astype(np.float32)
    kind = config.get("beta_schedule", "scaled_linear")
    if kind not in ("linear", "scaled_linear"):
        raise ValueError(f"beta_schedule {kind!r} is not supported by the ldm backend (linear, scaled_linear)")
    return beta_alphas_cumprod(kind, float(config.get("beta_start", 0.00085)), float(config.get("beta_end", 0.012)), n)


class StableDiffusionBackend(DiffusersBackend):
    """SD1.x/2.x around a diffusers ``StableDiffusionPipeline`` (UNet, VAE, CLIP text encoder and tokenizer).

    The pipeline's scheduler is only read for its beta schedule and ``prediction_type`` (epsilon,
    v_prediction or sample); sampling is ours. ``prediction_type=None`` takes it from the scheduler config;
    give it explicitly for a checkpoint whose config is wrong (e.g. an SD2.x 768-v model shipped with an
    epsilon scheduler config). Build it from a loaded pipeline with ``StableDiffusionBackend(pipe,
    guidance=7.5)`` or from disk with :func:`load_sd15`.
    """

    name = "ldm"
    family = "ve"
    prediction_type = "epsilon"
    default_guidance = 7.5

    def __init__(self, pipe: Any, *, alphas_cumprod: Any = None, prediction_type: str | None = None,
                 **kwargs: Any):
        if prediction_type is None:
            prediction_type = prediction_type_from_config(pipe.scheduler.config)
        if prediction_type not in VP_PREDICTIONS:
            raise ValueError(f"prediction_type {prediction_type!r} is not supported by the ldm backend; use one "
                             f"of {', '.join(VP_PREDICTIONS)} (or None: from the scheduler config)")
        self.prediction_type = prediction_type
        super().__init__(pipe, **kwargs)
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
        """The authors' SD1.5 grid: uniform in discrete model time from sigma(1) to sigma(1e-3)
        (docs/authors-code.md §3.1)."""
        return ScheduleSpec(kind="discrete", num_steps=num_steps, sigma_min=None, sigma_max=None, rho=1.0,
                            variant=variant)

    def _denoise(self, x: torch.Tensor, sigma: torch.Tensor, embeds: torch.Tensor,
                 pooled: torch.Tensor | None) -> torch.Tensor:
        c_in = vp_input_scale(sigma.reshape(-1, *([1] * (x.ndim - 1))))
        timestep = self.vp.timestep(sigma).to(device=x.device, dtype=torch.float32)
        output = self.run_network((c_in * x).to(self.dtype), timestep, encoder_hidden_states=embeds.to(self.dtype),
                                  return_dict=False)[0]
        return denoised_from_prediction(self.prediction_type, output, x, sigma)

    def _encode(self, prompts: list[str], negative: list[str] | None) -> PromptCondition:
        embeds, neg = self.pipe.encode_prompt(prompts, self.device, 1, negative is not None,
                                              negative_prompt=negative)
        return PromptCondition(embeds=embeds, neg_embeds=neg)

    def config(self) -> dict:
        return {**super().config(), "negative_prompt": self.negative_prompt, "prediction_type": self.prediction_type}

    def describe(self) -> dict:
        """As :meth:`DiffusersBackend.describe`, with the family and what the UNet predicts."""
        return {**super().describe(), "family": self.family, "prediction_type": self.prediction_type}


def load_sd15(model_path: str | None = None, *, default_model_path: str | None = None, config: str | None = None, device: str | None = None,
              dtype: str | torch.dtype | None = "auto", offload: str = "none", **backend_kwargs: Any) -> StableDiffusionBackend:
    """SD1.x/2.x from a local diffusers folder, or from a single ``.ckpt``/``.safetensors`` checkpoint (the authors'
    ``v1-5-pruned-emaonly.ckpt``) together with ``config``, a local diffusers folder of the same architecture
    that supplies the component configs, tokenizer and scheduler (diffusers would otherwise fetch them).
    The UNet's prediction type comes from that scheduler config; ``prediction_type=`` overrides it."""
    from diffusers import StableDiffusionPipeline

    place = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = resolve_dtype(dtype, place, torch.float16)
    path = resolve_model_path(model_path, repo=REPO, env="SD15_MODEL_PATH", default=default_model_path)
    extra = dict(safety_checker=None, requires_safety_checker=False)
    pipe = load_local_pipeline(StableDiffusionPipeline, Path(path), config, torch_dtype, repo=REPO, label="SD1.5", **extra)
    pipe.set_progress_bar_config(disable=True)
    place_pipeline(pipe, place, offload)
    return StableDiffusionBackend(pipe, **backend_kwargs)
