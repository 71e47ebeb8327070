"""A user's own model, as docs/backends/own_model.md describes it: a tiny epsilon-predicting CNN on a linear-beta
DDPM schedule (1e-4..0.02 over 1000 steps), its weights in a ``.safetensors`` state dict, and the factory
``make_backend`` that every CLI reaches as ``own_model_example:make_backend`` (tests/test_own_model.py)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from backends.adapters import DiscreteVPBackend, load_state_dict_network

__all__ = ["TinyEpsNet", "make_backend", "BETAS", "SHAPE"]

BETAS = np.linspace(1e-4, 0.02, 1000)
SHAPE = (1, 8, 8)


def timestep_features(t: torch.Tensor, dim: int = 16) -> torch.Tensor:
    """Sinusoidal features ``[cos(t w_k), sin(t w_k)]`` with ``w_k = 10000^(-k/(dim/2))`` (DDPM's embedding)."""
    freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, dtype=torch.float32, device=t.device) / (dim // 2))
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class TinyEpsNet(nn.Module):
    """Three 3x3 convolutions with a timestep embedding added after the first: ``eps(x_vp, t)``."""

    def __init__(self, channels: int = 1, width: int = 16):
        super().__init__()
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.time = nn.Linear(16, width)
        self.mid = nn.Conv2d(width, width, 3, padding=1)
        self.out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        h = torch.nn.functional.silu(self.inp(x) + self.time(timestep_features(t))[:, :, None, None])
        return self.out(torch.nn.functional.silu(self.mid(h)))


def make_backend(model_path: str, device: str | None = None) -> DiscreteVPBackend:
    """The backend of a saved :class:`TinyEpsNet` (epsilon prediction, linear betas, timesteps 0..999)."""
    network = load_state_dict_network(TinyEpsNet, model_path, device=device or "cpu")
    return DiscreteVPBackend(network, betas=BETAS, prediction_type="epsilon", shape=SHAPE, name="tiny_eps")
