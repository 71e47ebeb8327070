"""Stable Diffusion 3 and 3.5 (``sd3``: SD3-Medium at 512 or 1024 px, SD3.5-Medium, SD3.5-Large) as a
denoiser: a rectified-flow MMDiT transformer (docs/authors-code.md §5.3).

    x_sigma = (1 - sigma) x0 + sigma eps,   v = transformer(x, 1000 sigma, text, pooled)
    D(x, sigma) = x - sigma v               so (x - D) / sigma = v, the EPD/baseline direction

CFG over [negative, positive] in one call (guidance 4.5 in the released tables). Decoding:
``VAE.decode(z / scaling_factor + shift_factor)`` (SD3/3.5: 1.5305 / 0.0609).

The three releases share the pipeline, text encoders, VAE and scheduler (static shift 3.0) and differ only in
the transformer (:func:`sd3_variant` tells them apart from its config):

==============  ======  =====  =======  ==============  ===============  ==========================
variant         layers  heads  qk_norm  dual attention  pos_embed_max    size: published (stored)
==============  ======  =====  =======  ==============  ===============  ==========================
sd3-medium      24      24     none     none            192              2B (2.08B)
sd3.5-medium    24      24     rms      layers 0..12    384              2.5B (2.47B)
sd3.5-large     38      38     rms      none            192              8.1B (8.15B)
==============  ======  =====  =======  ==============  ===============  ==========================

("stored": parameters plus the fixed sin-cos position-embedding buffer, what the checkpoint holds;
:mod:`backends.testing.random_variants` checks these on the meta device.)

None of this changes the call (the transformer takes the same inputs), so one backend serves all three. What
does: the default resolution (``sample_size * 8`` = 1024 px for all three), the largest resolution the
position embedding covers (``pos_embed_max_size * patch_size * 8`` px, checked up front) and the default
guidance when none is given (:data:`VARIANT_GUIDANCE`: the model cards' 3.5 for SD3.5-Large, 4.5 otherwise).
Skip-layer guidance (SD3.5-Medium's optional ``skip_guidance_layers``) is not implemented: it is a sampling
heuristic outside the ODE, off by default in diffusers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from solvers.schedules import ScheduleSpec, flowmatch_sigmas, flux_mu

from .diffusers_base import (DiffusersBackend, PromptCondition, load_pipeline, place_pipeline, resolve_dtype,
                             resolve_model_path)

__all__ = ["FlowMatchingBackend", "SD3Backend", "load_sd3", "sd3_variant", "VARIANT_GUIDANCE"]

REPO = "stabilityai/stable-diffusion-3-medium-diffusers"

#: Default guidance per transformer variant when none is given (SD3-Medium: the released EPD tables' 4.5;
#: SD3.5: the model cards' 4.5 for Medium and 3.5 for Large). SD3.5-Large-Turbo has the Large architecture and
#: is sampled without CFG: give it ``guidance=1.0``.
VARIANT_GUIDANCE = {"sd3-medium": 4.5, "sd3.5-medium": 4.5, "sd3.5-large": 3.5}


def sd3_variant(config: Any) -> str:
    """``sd3-medium``, ``sd3.5-medium`` or ``sd3.5-large`` from an ``SD3Transformer2DModel`` config, by its
    structure: dual-attention layers mean SD3.5-Medium, QK-normalisation without them SD3.5-Large, neither SD3."""
    if config.get("dual_attention_layers"):
        return "sd3.5-medium"
    return "sd3.5-large" if config.get("qk_norm") else "sd3-medium"


class FlowMatchingBackend(DiffusersBackend):
    """Shared by SD3 and FLUX: sigma range and grid from the pipeline's FlowMatchEulerDiscreteScheduler."""

    family = "flow"
    prediction_type = "flow"
    sigma_max = 1.0

    def _scheduler_config(self) -> Any:
        return self.pipe.scheduler.config

    def flow_shift(self) -> tuple[float | None, float | None]:
        """``(shift, mu)``: the scheduler's static shift, or under dynamic shifting the mu of this resolution,
        linear in the packed sequence length ``(latent / 2)^2`` (FLUX: 1.15 at 1024 px, docs/authors-code.md §3.2)."""
        config = self._scheduler_config()
        if not config.get("use_dynamic_shifting", False):
            return float(config.get("shift", 1.0)), None
        seq_len = (self.shape[-1] // 2) * (self.shape[-2] // 2)
        return None, flux_mu(seq_len, int(config.get("base_image_seq_len", 256)),
                             int(config.get("max_image_seq_len", 4096)), float(config.get("base_shift", 0.5)),
                             float(config.get("max_shift", 1.15)))

    @property
    def sigma_min(self) -> float:
        shift, mu = self.flow_shift()
        n = int(self._scheduler_config().get("num_train_timesteps", 1000))
        return float(flowmatch_sigmas(2, shift, mu, num_train_timesteps=n)[-1])

    def default_schedule(self, num_steps: int, variant: str = "correct") -> ScheduleSpec:
        """Flow-matching grid (docs/authors-code.md §3.1): ``correct`` is uniform in unshifted time and shifted once;
        ``official`` is the authors' twice-shifted diffusers grid without the terminal zero
        (docs/authors-code.md §9.9)."""
        shift, mu = self.flow_shift()
        return ScheduleSpec(kind="flowmatch", num_steps=num_steps, sigma_min=None, sigma_max=1.0, rho=1.0,
                            variant=variant, shift=None if mu is not None else shift, mu=mu)

    def describe(self) -> dict:
        """As :meth:`DiffusersBackend.describe`, with the family and what the network predicts (``flow``)."""
        return {**super().describe(), "family": self.family, "prediction_type": self.prediction_type}


class SD3Backend(FlowMatchingBackend):
    """SD3/SD3.5 around a diffusers ``StableDiffusion3Pipeline`` (MMDiT transformer, VAE, CLIP-L, CLIP-G, T5).

    ``variant`` (:func:`sd3_variant`) is read from the transformer config; ``guidance=None`` means
    :data:`VARIANT_GUIDANCE` of it. A resolution beyond what the position embedding covers is a ValueError.
    """

    name = "sd3"
    default_guidance = 4.5
    latent_multiple = 2      # patch size of the transformer

    def __init__(self, pipe: Any, *, max_sequence_length: int = 256, **kwargs: Any):
        self.max_sequence_length = int(max_sequence_length)
        self.variant = sd3_variant(pipe.transformer.config)
        if kwargs.get("guidance") is None:
            kwargs["guidance"] = VARIANT_GUIDANCE[self.variant]
        super().__init__(pipe, **kwargs)
        config = pipe.transformer.config
        patches = self.resolution // (self.vae_scale_factor * int(config.patch_size))
        if config.get("pos_embed_max_size") is not None and patches > int(config.pos_embed_max_size):
            largest = int(config.pos_embed_max_size) * int(config.patch_size) * self.vae_scale_factor
            raise ValueError(f"{self.name} ({self.variant}): resolution {self.resolution} exceeds the {largest} px "
                             f"its position embedding covers (pos_embed_max_size {config.pos_embed_max_size})")

    @property
    def network(self) -> torch.nn.Module:
        return self.pipe.transformer

    def default_resolution(self) -> int:
        return int(self.pipe.transformer.config.sample_size) * self.vae_scale_factor

    def _denoise(self, x: torch.Tensor, sigma: torch.Tensor, embeds: torch.Tensor,
                 pooled: torch.Tensor | None) -> torch.Tensor:
        num_train = float(self._scheduler_config().get("num_train_timesteps", 1000))
        velocity = self.run_network(hidden_states=x.to(self.dtype), timestep=(sigma * num_train).float(),
                                         encoder_hidden_states=embeds.to(self.dtype),
                                         pooled_projections=pooled.to(self.dtype), return_dict=False)[0]
        return x - sigma.reshape(-1, *([1] * (x.ndim - 1))) * velocity.to(x.dtype)

    def _encode(self, prompts: list[str], negative: list[str] | None) -> PromptCondition:
        embeds, neg, pooled, neg_pooled = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=negative is not None, negative_prompt=negative,
            max_sequence_length=self.max_sequence_length)
        return PromptCondition(embeds=embeds, pooled=pooled, neg_embeds=neg, neg_pooled=neg_pooled)

    def config(self) -> dict:
        return {**super().config(), "negative_prompt": self.negative_prompt,
                "max_sequence_length": self.max_sequence_length}

    def describe(self) -> dict:
        """As :meth:`FlowMatchingBackend.describe`, with the transformer variant (:func:`sd3_variant`)."""
        return {**super().describe(), "variant": self.variant}


def load_sd3(model_path: str | None = None, *, default_model_path: str | None = None, device: str | None = None, dtype: str | torch.dtype | None = "auto",
             offload: str = "none", drop_t5: bool = False, **backend_kwargs: Any) -> SD3Backend:
    """SD3 or SD3.5 (Medium, Large) from a local diffusers folder. ``drop_t5`` skips the 4.7B-parameter T5 encoder (diffusers then
    feeds zeros in its place: less memory, somewhat worse prompt following)."""
    from diffusers import StableDiffusion3Pipeline

    place = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = resolve_dtype(dtype, place, torch.float16)
    path = resolve_model_path(model_path, repo=REPO, env="SD3_MODEL_PATH", default=default_model_path)
    extra = dict(text_encoder_3=None, tokenizer_3=None) if drop_t5 else {}
    pipe = load_pipeline(StableDiffusion3Pipeline, Path(path), torch_dtype, **extra)
    pipe.set_progress_bar_config(disable=True)
    place_pipeline(pipe, place, offload)
    return SD3Backend(pipe, **backend_kwargs)
