"""FLUX.1-dev and FLUX.1-schnell (``flux``, 1024 px) as a denoiser: a rectified-flow transformer
(docs/authors-code.md §5.4).

The ODE state is the ordinary latent ``[B, 16, H/8, W/8]``; around each call it is packed into 2x2 patches,
``[B, (H/16)(W/16), 64]`` with channel order (c, dy, dx) and row-major patch order, and unpacked again:

    v = transformer(pack(x), sigma, guidance = g, text, pooled, txt_ids, img_ids)
    D(x, sigma) = x - sigma unpack(v)

There is no classifier-free guidance batch, so a negative prompt is rejected. The two releases differ in:

* guidance. FLUX.1-dev is guidance-distilled: ``g`` (default 3.5) is an input of the network ("embedded
  guidance", transformer config ``guidance_embeds=True``). FLUX.1-schnell is timestep-distilled and has no
  guidance input (``guidance_embeds=False``): its guidance is 1.0 (none), and asking for any other value is a
  ValueError rather than a silent no-op (diffusers ignores ``guidance_scale`` for schnell; its examples pass
  0.0, which here means: leave guidance unset).
* grid. dev shifts dynamically (``mu`` from the packed sequence length, 1.15 at 1024 px); schnell's scheduler
  has ``use_dynamic_shifting=False, shift=1.0``, an unshifted grid. Both come from the scheduler config
  (:meth:`FlowMatchingBackend.flow_shift`).
* T5 length. ``max_sequence_length=None`` picks 512 for dev (diffusers' default) and 256 for schnell (the
  length it was trained with; diffusers' FluxPipeline would use 512), by ``guidance_embeds``; give a number to
  override.

Decoding: ``VAE.decode(z / 0.3611 + 0.1159)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .diffusers_base import PromptCondition, load_pipeline, place_pipeline, resolve_dtype, resolve_model_path
from .sd3 import FlowMatchingBackend

__all__ = ["FluxBackend", "load_flux", "pack_latents", "unpack_latents", "latent_image_ids", "MAX_SEQUENCE_LENGTH"]

REPO = "black-forest-labs/FLUX.1-dev"

#: Default T5 length by whether the transformer embeds guidance: dev (True) 512, schnell (False) 256.
MAX_SEQUENCE_LENGTH = {True: 512, False: 256}


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W] -> [B, (H/2)(W/2), 4C]``: 2x2 patches, channels ordered (c, dy, dx)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack_latents(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for a latent of ``height x width``."""
    b, _, channels = x.shape
    c = channels // 4
    return x.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


def latent_image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Rotary position ids ``[(H/2)(W/2), 3]`` of the packed patches: (0, row, column)."""
    rows = torch.arange(height // 2, device=device, dtype=dtype)
    cols = torch.arange(width // 2, device=device, dtype=dtype)
    ids = torch.zeros(height // 2, width // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = rows[:, None]
    ids[..., 2] = cols[None, :]
    return ids.reshape(-1, 3)


class FluxBackend(FlowMatchingBackend):
    """FLUX.1-dev or -schnell around a diffusers ``FluxPipeline`` (transformer, VAE, CLIP-L, T5-XXL).

    ``embedded_guidance``: whether the transformer takes a guidance input (dev); without it (schnell) the
    guidance is 1.0 and another value is refused. ``max_sequence_length=None``: :data:`MAX_SEQUENCE_LENGTH`.
    """

    name = "flux"
    uses_cfg = False
    default_guidance = 3.5
    latent_multiple = 2      # 2x2 packing

    def __init__(self, pipe: Any, *, max_sequence_length: int | None = None, **kwargs: Any):
        self.embedded_guidance = bool(pipe.transformer.config.get("guidance_embeds", False))
        if max_sequence_length is None:
            max_sequence_length = MAX_SEQUENCE_LENGTH[self.embedded_guidance]
        self.max_sequence_length = int(max_sequence_length)
        if kwargs.get("negative_prompt"):
            raise ValueError("FLUX.1 has no classifier-free guidance batch: a negative prompt is not supported "
                             "(guidance is the embedded scale of FLUX.1-dev, backend_config.guidance)")
        if not self.embedded_guidance:
            guidance = kwargs.get("guidance")
            if guidance is not None and float(guidance) != 1.0:
                raise ValueError(f"this FLUX transformer has no guidance input (guidance_embeds=False, e.g. "
                                 f"FLUX.1-schnell), so guidance {guidance} would have no effect; leave it unset "
                                 "(or 1.0). diffusers' guidance_scale=0.0 for schnell means the same")
            kwargs["guidance"] = 1.0
        super().__init__(pipe, **kwargs)

    @property
    def network(self) -> torch.nn.Module:
        return self.pipe.transformer

    def default_resolution(self) -> int:
        return 1024

    def _denoise(self, x: torch.Tensor, sigma: torch.Tensor, embeds: torch.Tensor,
                 pooled: torch.Tensor | None) -> torch.Tensor:
        height, width = x.shape[-2:]
        guidance = None
        if self.embedded_guidance:
            guidance = torch.full((x.shape[0],), self.guidance, device=x.device, dtype=torch.float32)
        velocity = self.run_network(
            hidden_states=pack_latents(x).to(self.dtype), timestep=sigma.to(self.dtype), guidance=guidance,
            pooled_projections=pooled.to(self.dtype), encoder_hidden_states=embeds.to(self.dtype),
            txt_ids=torch.zeros(embeds.shape[1], 3, device=x.device, dtype=self.dtype),
            img_ids=latent_image_ids(height, width, x.device, self.dtype), return_dict=False)[0]
        return x - sigma.reshape(-1, 1, 1, 1) * unpack_latents(velocity.to(x.dtype), height, width)

    def _encode(self, prompts: list[str], negative: list[str] | None) -> PromptCondition:
        embeds, pooled, _ = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, device=self.device,
                                                    num_images_per_prompt=1,
                                                    max_sequence_length=self.max_sequence_length)
        return PromptCondition(embeds=embeds, pooled=pooled)

    def config(self) -> dict:
        return {**super().config(), "max_sequence_length": self.max_sequence_length}

    def describe(self) -> dict:
        """As :meth:`FlowMatchingBackend.describe`, with the release (``dev``: embedded guidance, else
        ``schnell``)."""
        return {**super().describe(), "variant": "dev" if self.embedded_guidance else "schnell"}


def load_flux(model_path: str | None = None, *, default_model_path: str | None = None, device: str | None = None, dtype: str | torch.dtype | None = "auto",
              offload: str = "none", **backend_kwargs: Any) -> FluxBackend:
    """FLUX.1-dev or -schnell from a local diffusers folder; ``model_path`` defaults to ``$FLUX_MODEL_PATH``
    (docs/authors-code.md §5.4). Which one it is comes from the folder's transformer and scheduler configs."""
    from diffusers import FluxPipeline

    place = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = resolve_dtype(dtype, place, torch.bfloat16)
    path = resolve_model_path(model_path, repo=REPO, env="FLUX_MODEL_PATH", default=default_model_path)
    pipe = load_pipeline(FluxPipeline, Path(path), torch_dtype)
    pipe.set_progress_bar_config(disable=True)
    place_pipeline(pipe, place, offload)
    return FluxBackend(pipe, **backend_kwargs)
