"""FLUX.1-dev (``flux``, 1024 px) as a denoiser: a guidance-distilled rectified-flow transformer (spec 5.4).

The ODE state is the ordinary latent ``[B, 16, H/8, W/8]``; around each call it is packed into 2x2 patches,
``[B, (H/16)(W/16), 64]`` with channel order (c, dy, dx) and row-major patch order, and unpacked again:

    v = transformer(pack(x), sigma, guidance = g, text, pooled, txt_ids, img_ids)
    D(x, sigma) = x - sigma unpack(v)

There is no classifier-free guidance batch: ``g`` (3.5) is an input of the network ("embedded guidance"),
so a negative prompt is rejected. Decoding: ``VAE.decode(z / 0.3611 + 0.1159)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .diffusers_base import PromptCondition, load_pipeline, place_pipeline, resolve_dtype, resolve_model_path
from .sd3 import FlowMatchingBackend

__all__ = ["FluxBackend", "load_flux", "pack_latents", "unpack_latents", "latent_image_ids"]

REPO = "black-forest-labs/FLUX.1-dev"


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
    """FLUX around a diffusers ``FluxPipeline`` (transformer, VAE, CLIP-L, T5-XXL)."""

    name = "flux"
    uses_cfg = False
    default_guidance = 3.5
    latent_multiple = 2      # 2x2 packing

    def __init__(self, pipe: Any, *, max_sequence_length: int = 512, **kwargs: Any):
        self.max_sequence_length = int(max_sequence_length)
        if kwargs.get("negative_prompt"):
            raise ValueError("FLUX.1-dev has no classifier-free guidance batch: a negative prompt is not supported "
                             "(guidance is the embedded scale, backend_config.guidance)")
        super().__init__(pipe, **kwargs)

    @property
    def network(self) -> torch.nn.Module:
        return self.pipe.transformer

    def default_resolution(self) -> int:
        return 1024

    def _denoise(self, x: torch.Tensor, sigma: torch.Tensor, embeds: torch.Tensor,
                 pooled: torch.Tensor | None) -> torch.Tensor:
        transformer = self.pipe.transformer
        height, width = x.shape[-2:]
        guidance = None
        if transformer.config.get("guidance_embeds", False):
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


def load_flux(model_path: str | None = None, *, default_model_path: str | None = None, device: str | None = None, dtype: str | torch.dtype | None = "auto",
              offload: str = "none", **backend_kwargs: Any) -> FluxBackend:
    """FLUX from a local diffusers folder; ``model_path`` defaults to ``$FLUX_MODEL_PATH`` (spec 5.4)."""
    from diffusers import FluxPipeline

    place = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = resolve_dtype(dtype, place, torch.bfloat16)
    path = resolve_model_path(model_path, repo=REPO, env="FLUX_MODEL_PATH", default=default_model_path)
    pipe = load_pipeline(FluxPipeline, Path(path), torch_dtype)
    pipe.set_progress_bar_config(disable=True)
    place_pipeline(pipe, place, offload)
    return FluxBackend(pipe, **backend_kwargs)
