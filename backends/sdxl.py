"""Stable Diffusion XL (``sdxl``) as a denoiser: a discrete-time VP UNet in VE coordinates, conditioned on two
text encoders and on the SDXL micro-conditions (``time_ids``).

    x_VE = x_VP / alpha,   sigma = sqrt(1 - alpha^2) / alpha,   c_in = alpha = 1 / sqrt(1 + sigma^2)
    out  = UNet(c_in x, t(sigma), text, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})
    D    = denoised_from_prediction(prediction_type, out, x, sigma)     # epsilon: D = x - sigma eps

``t(sigma)`` is the fractional training timestep of :class:`solvers.schedules.VPDiscreteMap` (as for SD1.5,
:mod:`backends.ldm`), ``prediction_type`` comes from the scheduler config (``epsilon`` for SDXL base;
``v_prediction`` and ``sample`` also work, :mod:`backends.prediction`). Text: ``pipe.encode_prompt`` gives the
concatenated penultimate hidden states of CLIP-L and OpenCLIP-bigG (``[B, 77, 2048]``) and bigG's projected
pooled output (``[B, 1280]``).

Micro-conditions, the rule of diffusers' ``StableDiffusionXLPipeline`` (``_get_add_time_ids``):

    time_ids     = original_size + crops_coords_top_left + target_size                     (6 numbers)
    neg time_ids = negative_original_size + negative_crops + negative_target_size  if both negative sizes
                   are given, else the positive ones

with sizes as ``(height, width)`` and defaults ``original = target = (resolution, resolution)``, crop ``(0, 0)``.
A pipeline whose config says ``requires_aesthetics_score`` (the refiner) uses ``size + crop + (score,)`` with
``aesthetic_score`` 6.0 / ``negative_aesthetic_score`` 2.5 instead, as diffusers' img2img pipeline does. The
time ids are per-row constants of the backend, so every row of a call, CFG rows and the ``b*K + k`` rows of a
parallel EPD call alike, gets the positive or negative vector it belongs to.

Negative prompt: with ``force_zeros_for_empty_prompt`` (SDXL base) an empty negative prompt gives zero
embeddings and zero pooled embeddings, which is what diffusers' pipeline does when no negative prompt is given.

Decoding: ``VAE.decode(z / scaling_factor)`` (0.13025; with ``latents_mean``/``latents_std`` in the VAE config,
``z * std / scaling_factor + mean``). SDXL's VAE overflows in float16 (``force_upcast``): as diffusers' pipeline
upcasts it for decoding, an fp16 VAE with ``force_upcast`` decodes through a float32 copy (an offloaded one is
upcast in place for the duration of each decode, as diffusers does). bf16 needs no upcast.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from solvers.schedules import ScheduleSpec, VPDiscreteMap

from .diffusers_base import (DiffusersBackend, PromptCondition, load_local_pipeline, place_pipeline, resolve_dtype,
                             resolve_model_path)
from .ldm import alphas_cumprod_from_config
from .prediction import denoised_from_prediction, prediction_type_from_config, vp_input_scale

__all__ = ["SDXLBackend", "load_sdxl", "sdxl_time_ids", "REPO"]

REPO = "stabilityai/stable-diffusion-xl-base-1.0"

def _size(value: int | Sequence[int] | None, default: tuple[int, int] | None) -> tuple[int, int] | None:
    """``512`` -> ``(512, 512)``; ``(h, w)`` unchanged; None -> ``default``."""
    if value is None:
        return default
    if isinstance(value, (int, np.integer)):
        return (int(value), int(value))
    items = tuple(int(v) for v in value)
    if len(items) != 2:
        raise ValueError(f"a size is an int or (height, width), got {value!r}")
    return items  # type: ignore[return-value]


def sdxl_time_ids(original_size: tuple[int, int], crops_coords_top_left: tuple[int, int],
                  target_size: tuple[int, int], *, negative_original_size: tuple[int, int] | None = None,
                  negative_crops_coords_top_left: tuple[int, int] = (0, 0),
                  negative_target_size: tuple[int, int] | None = None, requires_aesthetics_score: bool = False,
                  aesthetic_score: float = 6.0, negative_aesthetic_score: float = 2.5,
                  ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(positive, negative)`` micro-condition vectors by diffusers' SDXL rule (module docstring).

    Base: ``orig + crop + target`` (6 values); the negative one is ``neg_orig + neg_crop + neg_target`` when
    both negative sizes are given, else equal to the positive one. Refiner (``requires_aesthetics_score``):
    ``orig + crop + (aesthetic_score,)`` and ``(neg_orig or orig) + neg_crop + (negative_aesthetic_score,)``.
    """
    if requires_aesthetics_score:
        positive = (*original_size, *crops_coords_top_left, aesthetic_score)
        negative = (*(negative_original_size or original_size), *negative_crops_coords_top_left,
                    negative_aesthetic_score)
    else:
        positive = (*original_size, *crops_coords_top_left, *target_size)
        if negative_original_size is not None and negative_target_size is not None:
            negative = (*negative_original_size, *negative_crops_coords_top_left, *negative_target_size)
        else:
            negative = positive
    return tuple(float(v) for v in positive), tuple(float(v) for v in negative)


class SDXLBackend(DiffusersBackend):
    """SDXL around a diffusers ``StableDiffusionXLPipeline`` (UNet, VAE, CLIP-L + OpenCLIP-bigG).

    The pipeline's scheduler is only read for its beta schedule and ``prediction_type``; sampling is ours.
    Options besides :class:`DiffusersBackend`'s: ``prediction_type`` (default: the scheduler config's),
    ``alphas_cumprod`` (default: from the scheduler config), and the micro-conditions ``original_size``,
    ``target_size``, ``crops_coords_top_left``, ``negative_original_size``, ``negative_target_size``,
    ``negative_crops_coords_top_left``, ``aesthetic_score``, ``negative_aesthetic_score`` (sizes: an int for a
    square or ``(height, width)``; see :func:`sdxl_time_ids`). Guidance defaults to 5.0, diffusers' default.
    """

    name = "sdxl"
    family = "ve"
    prediction_type = "epsilon"
    default_guidance = 5.0

    def __init__(self, pipe: Any, *, alphas_cumprod: Any = None, prediction_type: str | None = None,
                 original_size: int | Sequence[int] | None = None, target_size: int | Sequence[int] | None = None,
                 crops_coords_top_left: Sequence[int] = (0, 0),
                 negative_original_size: int | Sequence[int] | None = None,
                 negative_target_size: int | Sequence[int] | None = None,
                 negative_crops_coords_top_left: Sequence[int] = (0, 0),
                 aesthetic_score: float = 6.0, negative_aesthetic_score: float = 2.5, **kwargs: Any):
        if getattr(pipe, "text_encoder_2", None) is None and getattr(pipe, "text_encoder", None) is None:
            raise ValueError("the sdxl backend needs a pipeline with its text encoders")
        if pipe.unet.config.get("addition_embed_type") != "text_time":
            raise ValueError("the sdxl backend expects an SDXL UNet (addition_embed_type 'text_time'), got "
                             f"{pipe.unet.config.get('addition_embed_type')!r}")
        if pipe.unet.config.get("time_cond_proj_dim") is not None:
            raise ValueError("the sdxl backend does not support UNets with a guidance embedding "
                             "(time_cond_proj_dim, e.g. LCM-distilled SDXL)")
        self._vae32: torch.nn.Module | None = None
        self._upcast_in_place = False
        vae = pipe.vae
        if vae.dtype == torch.float16 and bool(vae.config.get("force_upcast", False)):
            if any(hasattr(m, "_hf_hook") for m in vae.modules()):
                self._upcast_in_place = True        # offloaded: diffusers' own per-decode upcast
            else:
                self._vae32 = copy.deepcopy(vae).to(torch.float32)
        super().__init__(pipe, **kwargs)
        config = pipe.scheduler.config
        if config.get("rescale_betas_zero_snr", False):
            raise ValueError("the sdxl backend does not support zero-terminal-SNR schedules "
                             "(rescale_betas_zero_snr): sigma_max would be infinite")
        self.prediction_type = prediction_type_from_config(
            {"prediction_type": prediction_type} if prediction_type else config)
        self._prediction_override = prediction_type
        if alphas_cumprod is None:
            alphas_cumprod = alphas_cumprod_from_config(config)
        self.alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float32)
        self.vp = VPDiscreteMap(self.alphas_cumprod)
        self.sigma_min = self.vp.sigma_min
        self.sigma_max = self.vp.sigma_max

        square = (self.resolution, self.resolution)
        self.size_options = {
            "original_size": _size(original_size, None), "target_size": _size(target_size, None),
            "crops_coords_top_left": _size(crops_coords_top_left, (0, 0)),
            "negative_original_size": _size(negative_original_size, None),
            "negative_target_size": _size(negative_target_size, None),
            "negative_crops_coords_top_left": _size(negative_crops_coords_top_left, (0, 0)),
            "aesthetic_score": float(aesthetic_score), "negative_aesthetic_score": float(negative_aesthetic_score),
        }
        opts = self.size_options
        self.requires_aesthetics_score = bool(getattr(pipe.config, "requires_aesthetics_score", False))
        self.time_ids, self.negative_time_ids = sdxl_time_ids(
            opts["original_size"] or square, opts["crops_coords_top_left"], opts["target_size"] or square,
            negative_original_size=opts["negative_original_size"],
            negative_crops_coords_top_left=opts["negative_crops_coords_top_left"],
            negative_target_size=opts["negative_target_size"],
            requires_aesthetics_score=self.requires_aesthetics_score, aesthetic_score=opts["aesthetic_score"],
            negative_aesthetic_score=opts["negative_aesthetic_score"])
        self._check_added_embedding()
        self._time_rows: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _check_added_embedding(self) -> None:
        """The UNet's added embedding takes ``addition_time_embed_dim * len(time_ids) + pooled dim`` inputs."""
        unet = self.pipe.unet
        encoder = getattr(self.pipe, "text_encoder_2", None)
        pooled = int(encoder.config.projection_dim) if encoder is not None else \
            int(unet.config.projection_class_embeddings_input_dim) - 6 * int(unet.config.addition_time_embed_dim)
        passed = int(unet.config.addition_time_embed_dim) * len(self.time_ids) + pooled
        expected = int(unet.add_embedding.linear_1.in_features)
        if passed != expected:
            hint = (" (requires_aesthetics_score is set: the refiner's 5 time ids)" if self.requires_aesthetics_score
                    else " (a refiner UNet needs requires_aesthetics_score in the pipeline config)")
            raise ValueError(f"sdxl: the UNet's added embedding takes {expected} inputs but {len(self.time_ids)} time "
                             f"ids and a {pooled}-wide pooled embedding give {passed}{hint}")

    # -- what DiffusersBackend asks for ---------------------------------------------------------------------
    @property
    def network(self) -> torch.nn.Module:
        return self.pipe.unet

    @property
    def decode_vae(self) -> torch.nn.Module:
        """The float32 copy of an fp16 ``force_upcast`` VAE, else the pipeline's VAE."""
        return self._vae32 if self._vae32 is not None else self.pipe.vae

    def default_resolution(self) -> int:
        return int(self.pipe.unet.config.sample_size) * self.vae_scale_factor

    def default_schedule(self, num_steps: int, variant: str = "correct") -> ScheduleSpec:
        """Uniform in discrete model time from sigma(1) to sigma(1e-3), as for SD1.5 (docs/authors-code.md §3.1)."""
        return ScheduleSpec(kind="discrete", num_steps=num_steps, sigma_min=None, sigma_max=None, rho=1.0,
                            variant=variant)

    def _encode(self, prompts: list[str], negative: list[str] | None) -> PromptCondition:
        zeros = bool(getattr(self.pipe.config, "force_zeros_for_empty_prompt", False))
        if negative is not None and zeros and not any(negative):
            negative = None                          # diffusers: zero embeddings for "no negative prompt"
        guided = self.guided
        embeds, neg, pooled, neg_pooled = self.pipe.encode_prompt(
            prompt=prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=guided,
            negative_prompt=negative)
        if not guided:
            neg = neg_pooled = None
        return PromptCondition(embeds=embeds, pooled=pooled, neg_embeds=neg, neg_pooled=neg_pooled)

    def _time_id_rows(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(positive, negative)`` time ids as ``[1, n]`` float32 tensors on ``device`` (made once per device,
        so a captured CUDA graph never copies them from the host)."""
        if device not in self._time_rows:
            self._time_rows[device] = (torch.tensor([self.time_ids], dtype=torch.float32, device=device),
                                       torch.tensor([self.negative_time_ids], dtype=torch.float32, device=device))
        return self._time_rows[device]

    def _unet_denoise(self, x: torch.Tensor, sigma: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor,
                      time_ids: torch.Tensor) -> torch.Tensor:
        """``D`` from one UNet call: input ``c_in x`` at the fractional timestep ``t(sigma)``."""
        if pooled is None:
            raise ValueError("the sdxl backend needs pooled text embeddings (use backend.encode_prompts)")
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        timestep = self.vp.timestep(sigma).to(device=x.device, dtype=torch.float32)
        added = {"text_embeds": pooled.to(self.dtype), "time_ids": time_ids.to(self.dtype)}
        out = self.run_network((vp_input_scale(s) * x).to(self.dtype), timestep,
                               encoder_hidden_states=embeds.to(self.dtype), added_cond_kwargs=added,
                               return_dict=False)[0]
        return denoised_from_prediction(self.prediction_type, out, x, sigma)

    def _denoise(self, x: torch.Tensor, sigma: torch.Tensor, embeds: torch.Tensor,
                 pooled: torch.Tensor | None) -> torch.Tensor:
        """Unguided ``D``: every row gets the positive time ids."""
        positive, _ = self._time_id_rows(x.device)
        return self._unet_denoise(x, sigma, embeds, pooled, positive.expand(x.shape[0], -1))

    def _guided(self, x: torch.Tensor, sigma: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor | None,
                neg_embeds: torch.Tensor | None, neg_pooled: torch.Tensor | None) -> torch.Tensor:
        """``D = D_u + g (D_c - D_u)`` from one UNet call over [negative, positive] rows, the negative rows with
        the negative time ids (the base class's call, plus the per-half micro-conditions)."""
        if neg_embeds is None:
            return self._denoise(x, sigma, embeds, pooled)
        n = x.shape[0]
        positive, negative = self._time_id_rows(x.device)
        both = self._unet_denoise(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([neg_embeds, embeds]),
                                  torch.cat([neg_pooled, pooled]),
                                  torch.cat([negative.expand(n, -1), positive.expand(n, -1)]))
        uncond, conditional = both.chunk(2)
        return uncond + self.guidance * (conditional - uncond)

    # -- decoding -------------------------------------------------------------------------------------------
    def vae_latents(self, x: torch.Tensor) -> torch.Tensor:
        """``z / scaling_factor``, or ``z * latents_std / scaling_factor + latents_mean`` when the VAE config
        has both (as diffusers' SDXL pipeline)."""
        config = self.pipe.vae.config
        mean, std = config.get("latents_mean"), config.get("latents_std")
        if mean is None or std is None:
            return super().vae_latents(x)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        mean = torch.tensor(mean, dtype=x.dtype, device=x.device).reshape(shape)
        std = torch.tensor(std, dtype=x.dtype, device=x.device).reshape(shape)
        return x * std / config.scaling_factor + mean

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1], float32; an fp16 ``force_upcast`` VAE decodes in float32."""
        if not self._upcast_in_place:
            return super().decode(x)
        vae = self.pipe.vae
        vae.to(dtype=torch.float32)
        try:
            return super().decode(x)
        finally:
            vae.to(dtype=torch.float16)

    # -- identity -------------------------------------------------------------------------------------------
    def config(self) -> dict:
        """Loader options that rebuild this backend: resolution, guidance, negative prompt and the
        micro-condition options that were set (sizes as ``[height, width]``)."""
        extra: dict[str, Any] = {}
        defaults = {"crops_coords_top_left": (0, 0), "negative_crops_coords_top_left": (0, 0),
                    "aesthetic_score": 6.0, "negative_aesthetic_score": 2.5}
        for key, value in self.size_options.items():
            if value is not None and value != defaults.get(key):
                extra[key] = list(value) if isinstance(value, tuple) else value
        if self._prediction_override:
            extra["prediction_type"] = self._prediction_override
        return {**super().config(), "negative_prompt": self.negative_prompt, **extra}

    def describe(self) -> dict:
        """As :meth:`DiffusersBackend.describe`, with the family, prediction type and the time ids in effect."""
        return {**super().describe(), "family": self.family, "prediction_type": self.prediction_type,
                "time_ids": list(self.time_ids), "negative_time_ids": list(self.negative_time_ids)}


def load_sdxl(model_path: str | None = None, *, default_model_path: str | None = None, config: str | None = None,
              device: str | None = None, dtype: str | torch.dtype | None = "auto", offload: str = "none",
              **backend_kwargs: Any) -> SDXLBackend:
    """SDXL from a local diffusers folder (``$SDXL_MODEL_PATH``, ``stabilityai/stable-diffusion-xl-base-1.0``),
    or from a single ``.safetensors``/``.ckpt`` checkpoint (``sd_xl_base_1.0.safetensors``) together with
    ``config``, a local diffusers SDXL folder that supplies the component configs, tokenizers and scheduler.
    ``dtype="auto"``: float16 on CUDA (the VAE then decodes in float32, module docstring), float32 elsewhere."""
    from diffusers import StableDiffusionXLPipeline

    place = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = resolve_dtype(dtype, place, torch.float16)
    path = resolve_model_path(model_path, repo=REPO, env="SDXL_MODEL_PATH", default=default_model_path)
    extra = dict(add_watermarker=False)
    pipe = load_local_pipeline(StableDiffusionXLPipeline, Path(path), config, torch_dtype, repo=REPO, label="SDXL", **extra)
    pipe.set_progress_bar_config(disable=True)
    place_pipeline(pipe, place, offload)
    return SDXLBackend(pipe, **backend_kwargs)
