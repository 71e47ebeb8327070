"""The LSUN-Bedroom latent diffusion model (``lsun_bedrooms-ldm-vq-4``) with random weights, at any width.

``random_lsun_ldm(width=...)`` builds the diffusers ``UNet2DModel`` + ``VQModel`` of :mod:`backends.compvis_ldm`
from the release's parameters with ``model_channels`` (UNet) and ``ch`` (autoencoder) replaced: ``"full"`` is the
release (224 and 128: about 274 M + 55 M parameters, for GPU benchmarks), ``"tiny"`` uses 32 and 32 (every code
path: attention at the three coarse levels, the VQ codebook of 8192 entries; seconds on a CPU). Weights are drawn
by torch's default initialisers from ``seed``; the codebook is spread like latents (N(0, 1)) so that quantization
picks varied entries. :func:`save_random_lsun_ldm` writes it in the converted format that ``lsun_ldm`` loads.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..compvis_ldm import (LSUN_FIRST_STAGE, LSUN_LINEAR_BETAS, LSUN_UNET, ConvertedLDM, ReleaseFirstStage,
                          ReleaseUNet, build_unet, build_vqmodel, save_converted)
from solvers.schedules import beta_alphas_cumprod

__all__ = ["WIDTHS", "lsun_params", "random_lsun_ldm", "save_random_lsun_ldm"]

#: ``(model_channels, ch)`` per named width.
WIDTHS = {"full": (LSUN_UNET.model_channels, LSUN_FIRST_STAGE.ch), "tiny": (32, 32)}


def lsun_params(width: str | tuple[int, int] = "tiny", *, image_size: int = 64, n_embed: int | None = None
                ) -> tuple[ReleaseUNet, ReleaseFirstStage]:
    """The release parameters at ``width`` (a name of :data:`WIDTHS` or ``(model_channels, ch)``, multiples of 32)."""
    model_channels, ch = WIDTHS[width] if isinstance(width, str) else width
    if model_channels % 32 or ch % 32:
        raise ValueError("widths must be multiples of 32 (GroupNorm with 32 groups)")
    first = replace(LSUN_FIRST_STAGE, ch=ch, resolution=image_size * 4,
                    n_embed=LSUN_FIRST_STAGE.n_embed if n_embed is None else n_embed)
    return replace(LSUN_UNET, model_channels=model_channels, image_size=image_size), first


def random_lsun_ldm(width: str | tuple[int, int] = "tiny", *, seed: int = 0, image_size: int = 64,
                    n_embed: int | None = None, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> ConvertedLDM:
    """A :class:`~backends.compvis_ldm.ConvertedLDM` of the LSUN architecture at ``width`` with random weights,
    constructed on ``device`` (``"meta"`` counts parameters without allocating them)."""
    r, f = lsun_params(width, image_size=image_size, n_embed=n_embed)
    torch.manual_seed(int(seed))
    unet, vqvae = build_unet(r, device), build_vqmodel(f, device)      # built in place ("meta": no memory)
    with torch.no_grad():
        vqvae.quantize.embedding.weight.normal_()
    config = {"unet": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(r).items()},
              "first_stage": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(f).items()},
              "scale_factor": 1.0, "ema": False, "source": {"format": "random weights", "seed": int(seed),
                                                            "width": list(WIDTHS.get(width, width))
                                                            if isinstance(width, str) else list(width)}}
    alphas = beta_alphas_cumprod("scaled_linear", *LSUN_LINEAR_BETAS)
    for module in (unet, vqvae):
        # diffusers warns on every dtype cast, so cast only when asked for another dtype
        if dtype != torch.float32:
            module.to(dtype)
        module.eval().requires_grad_(False)
    return ConvertedLDM(unet, vqvae, np.asarray(alphas), 1.0, config)


def save_random_lsun_ldm(path: str | Path, width: str | tuple[int, int] = "tiny", *, seed: int = 0,
                         image_size: int = 64, n_embed: int | None = None) -> Path:
    """Write :func:`random_lsun_ldm` to ``path`` (``.safetensors``) in the format ``lsun_ldm`` loads."""
    return save_converted(random_lsun_ldm(width, seed=seed, image_size=image_size, n_embed=n_embed), path)
