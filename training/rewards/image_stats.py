"""Weight-free stand-in reward heads for smoke runs of any RGB backend (no reward model needed): they let the
whole RDPO loop run on a new backbone before real reward weights are at hand. Not a measure of quality.

* ``image_contrast``: the standard deviation of the luminance of each image in [0, 1] (0 for a flat image,
  0.5 for a black-and-white checkerboard); normalised by ``clamp(score / 0.5, 0, 1)``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from training.rewards.registry import register_reward

__all__ = ["ImageContrastHead"]

_LUMA = (0.299, 0.587, 0.114)


class ImageContrastHead:
    name = "image_contrast"

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"image_contrast expects images [B, 1 or 3, H, W] in [-1, 1], got {tuple(images.shape)}")
        pixels = ((images.float().clamp(-1, 1) + 1) / 2)
        luma = pixels[:, 0] if pixels.shape[1] == 1 else sum(c * pixels[:, i] for i, c in enumerate(_LUMA))
        return luma.flatten(1).std(dim=1, unbiased=False).cpu()

    def normalise(self, scores: torch.Tensor) -> torch.Tensor:
        return (scores / 0.5).clamp(0, 1)


@register_reward("image_contrast")
def _make_image_contrast() -> ImageContrastHead:
    return ImageContrastHead()
