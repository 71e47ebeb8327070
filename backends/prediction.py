"""From a discrete-time VP network's output to the denoiser D in VE coordinates (docs/backends/contract.md).

With ``alpha = 1 / sqrt(1 + sigma^2)`` the VP state is ``x_VP = alpha x`` (``x`` the VE state) and its noise
level ``sigma_VP = alpha sigma``. The network sees ``c_in x = alpha x`` at its timestep and predicts

    epsilon:       D = x - sigma eps
    v_prediction:  v = alpha eps - sigma_VP x0   =>   D = alpha^2 x - alpha sigma v
    sample:        D = x0_hat

(the v form is Salimans & Ho 2022, eq. 2 rearranged; k-diffusion's ``c_skip = 1/(1+sigma^2)``,
``c_out = -sigma/sqrt(1+sigma^2)``). Each is affine in the output, so classifier-free guidance on D equals
guidance on the raw output.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["VP_PREDICTIONS", "vp_input_scale", "denoised_from_prediction", "prediction_type_from_config"]

VP_PREDICTIONS = ("epsilon", "v_prediction", "sample")


def vp_input_scale(sigma: torch.Tensor) -> torch.Tensor:
    """``c_in = alpha = 1 / sqrt(1 + sigma^2)``: the VE state times this is the VP state the network takes."""
    return torch.rsqrt(1.0 + sigma * sigma)


def denoised_from_prediction(prediction_type: str, output: torch.Tensor, x: torch.Tensor,
                             sigma: torch.Tensor) -> torch.Tensor:
    """D from the network ``output`` for VE state ``x`` at ``sigma`` (broadcast over the batch dimension)."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    output = output.to(x.dtype)
    if prediction_type == "epsilon":
        return x - s * output
    if prediction_type == "v_prediction":
        alpha = vp_input_scale(s)
        return alpha * alpha * x - alpha * s * output
    if prediction_type == "sample":
        return output
    raise ValueError(f"unknown prediction_type {prediction_type!r}; use one of {', '.join(VP_PREDICTIONS)}")


def prediction_type_from_config(config: Any, default: str = "epsilon") -> str:
    """``prediction_type`` from a diffusers scheduler config (a missing or null entry means ``default``)."""
    value = (config.get("prediction_type") if hasattr(config, "get") else None) or default
    if value not in VP_PREDICTIONS:
        raise ValueError(f"prediction_type {value!r} is not supported; use one of {', '.join(VP_PREDICTIONS)}")
    return value
