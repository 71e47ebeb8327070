"""Exact analytic diffusion models built from scikit-learn's bundled digits (1797 images, 8x8, in [-1, 1]).

They are the embedded default: they run anywhere in milliseconds, need no weights, and their denoisers
are exact, so the probability-flow ODE can be solved to any accuracy and a solver's error measured exactly.

* ``gmm``: one full-covariance Gaussian per digit class. ``D(x, s) = sum_c g_c(x) [mu_c + S_c (S_c + s^2 I)^-1
  (x - mu_c)]`` with posterior weights ``g_c ~ pi_c N(x; mu_c, S_c + s^2 I)`` (log-sum-exp), evaluated in each
  component's eigenbasis. Smooth: the primary benchmark model.
* ``digits``: the empirical data set itself, ``D(x, s) = sum_i softmax_i(-|x - y_i|^2 / 2s^2) y_i``. It makes
  real digits but memorises (near s = 0 a trajectory snaps to one training image): a hard stress case.

Both are class-conditional (the digit is the prompt; an empty prompt or label -1 is unconditional) with
classifier-free guidance done as one batched call over ``[uncond, cond]``, like the real backends.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch

from .base import BackendBase
from .prompts import shown_prompt

__all__ = ["AnalyticDiffusion", "GaussianMixtureDiffusion", "EmpiricalDiffusion", "load_digits_data",
           "make_analytic", "ANALYTIC_MODELS"]

ANALYTIC_MODELS = ("gmm", "digits")


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.data.astype(np.float64) / 16.0 * 2.0 - 1.0      # pixel values 0..16 -> [-1, 1]
    return images, bunch.target.astype(np.int64)


def load_digits_data() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1797 digits as a float64 ``[1797, 1, 8, 8]`` tensor in [-1, 1] and their labels ``[1797]``."""
    images, labels = _digits()
    return torch.from_numpy(images.copy()).view(-1, 1, 8, 8), torch.from_numpy(labels.copy())


class AnalyticDiffusion(BackendBase):
    """Base class: the denoiser interface, prompts -> labels, CFG, decoding. Subclasses give the posterior."""

    name = "analytic"
    family = "ve"
    prediction_type = "exact"
    condition_kind = "label"
    shape = (1, 8, 8)
    sigma_min = 0.002
    sigma_max = 80.0
    num_classes = 10
    state_dtype = torch.float64  # exact models: keep the ODE state in float64 too

    def __init__(self, guidance: float = 1.0):
        self.guidance = float(guidance)

    # -- subclass hook -------------------------------------------------------------------------------
    def posterior_mean(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``E[x0 | x, sigma, label]`` for flat float64 ``x [B, 64]``; label -1 means unconditional."""
        raise NotImplementedError

    # -- denoiser interface ---------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        batch = x.shape[0]
        flat = x.reshape(batch, -1).double()
        sig = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1).expand(batch)
        labels = self._labels(cond, batch, x.device)
        guided = self.guidance != 1.0 and bool((labels >= 0).any())
        if guided:
            both = self.posterior_mean(torch.cat([flat, flat]), torch.cat([sig, sig]),
                                       torch.cat([torch.full_like(labels, -1), labels]))
            uncond, conditional = both.chunk(2)
            out = torch.where((labels >= 0)[:, None], uncond + self.guidance * (conditional - uncond), uncond)
        else:
            out = self.posterior_mean(flat, sig, labels)
        return out.to(x.dtype).reshape(x.shape)

    def _labels(self, cond: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        if cond is None:
            return torch.full((batch,), -1, dtype=torch.long, device=device)
        labels = torch.as_tensor(cond, device=device).long().reshape(-1)
        if labels.shape[0] != batch:
            raise ValueError(f"got {labels.shape[0]} labels for a batch of {batch}")
        if bool(((labels < -1) | (labels >= self.num_classes)).any()):
            raise ValueError(f"labels must be -1 (unconditional) or 0..{self.num_classes - 1}")
        return labels

    def encode_prompts(self, prompts: Sequence[str], seeds: Sequence[int] | None = None) -> torch.Tensor:
        """Prompts name the digit: ``"7"``, ``"a handwritten 7"``; ``""`` is unconditional (``seeds`` unused)."""
        labels = []
        for prompt in prompts:
            digits = re.findall(r"\d", prompt or "")
            if len(digits) > 1:
                raise ValueError(f"prompt {shown_prompt(prompt)} names several digits; use one digit 0-9 or ''")
            labels.append(int(digits[0]) if digits else -1)
            if not digits and prompt and prompt.strip():
                raise ValueError(f"prompt {shown_prompt(prompt)} names no digit; the analytic models understand 0-9 or ''")
        return torch.tensor(labels, dtype=torch.long)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """States are images already: clamp to [-1, 1]."""
        return x.clamp(-1, 1)

    def config(self) -> dict:
        return {"guidance": self.guidance} if self.guided else {}

    def describe(self) -> dict:
        return {"backend": "analytic", "model": self.name, "guidance": self.guidance,
                "sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "shape": list(self.shape)}


class GaussianMixtureDiffusion(AnalyticDiffusion):
    """One full-covariance Gaussian per digit class, fitted to the digits (covariance + ``ridge`` I)."""

    name = "gmm"

    def __init__(self, guidance: float = 1.0, ridge: float = 1e-3):
        super().__init__(guidance)
        images, labels = _digits()
        means, eigvals, eigvecs, log_priors = [], [], [], []
        for c in range(self.num_classes):
            members = images[labels == c]
            cov = np.cov(members, rowvar=False) + ridge * np.eye(images.shape[1])
            vals, vecs = np.linalg.eigh(cov)
            means.append(members.mean(0))
            eigvals.append(vals)
            eigvecs.append(vecs)
            log_priors.append(np.log(len(members) / len(images)))
        self.means = torch.tensor(np.stack(means))              # [C, D]
        self.eigvals = torch.tensor(np.stack(eigvals))          # [C, D]
        self.eigvecs = torch.tensor(np.stack(eigvecs))          # [C, D, D] columns = eigenvectors
        self.log_priors = torch.tensor(log_priors)              # [C]
        self.ridge = ridge
        dim = images.shape[1]
        self._basis = self.eigvecs.permute(1, 0, 2).reshape(dim, -1).contiguous()                  # [D, C*D]
        self._projected_means = torch.einsum("cd,cde->ce", self.means, self.eigvecs).reshape(1, -1)

    def posterior_mean(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        dev = x.device
        num_c, dim = self.means.shape
        means, vals = self.means.to(dev), self.eigvals.to(dev)
        basis = self._basis.to(dev)                                                   # [D, C*D]: all eigenbases
        z = (x @ basis - self._projected_means.to(dev)).view(-1, num_c, dim)           # [B, C, D] coordinates
        var = vals[None] + (sigma ** 2)[:, None, None]                                 # [B, C, D]
        log_lik = -0.5 * (z * z / var).sum(-1) - 0.5 * torch.log(var).sum(-1) + self.log_priors.to(dev)
        allowed = (labels[:, None] < 0) | (labels[:, None] == torch.arange(num_c, device=dev)[None])
        weights = torch.softmax(log_lik.masked_fill(~allowed, float("-inf")), dim=1)  # [B, C]
        # sum_c w_c (mu_c + U_c (lambda_c / var_c) z_c), the back-projection of all components in one product
        shrunk = (weights[..., None] * z * (vals[None] / var)).reshape(-1, num_c * dim)
        return weights @ means + shrunk @ basis.T


class EmpiricalDiffusion(AnalyticDiffusion):
    """The exact denoiser of the empirical data distribution (a Dirac at each of the 1797 digits)."""

    name = "digits"

    def __init__(self, guidance: float = 1.0):
        super().__init__(guidance)
        images, labels = _digits()
        self.images = torch.tensor(images)              # [M, D]
        self.image_labels = torch.tensor(labels)
        self.sq_norms = (self.images ** 2).sum(-1)

    def posterior_mean(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        dev = x.device
        images = self.images.to(dev)
        sq_dist = (x * x).sum(-1, keepdim=True) - 2 * x @ images.T + self.sq_norms.to(dev)[None]   # [B, M]
        logits = -0.5 * sq_dist.clamp_min(0) / (sigma ** 2)[:, None]
        allowed = (labels[:, None] < 0) | (labels[:, None] == self.image_labels.to(dev)[None])
        weights = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
        return weights @ images


def make_analytic(name: str, guidance: float = 1.0) -> AnalyticDiffusion:
    """Build ``gmm`` or ``digits``."""
    if name == "gmm":
        return GaussianMixtureDiffusion(guidance)
    if name == "digits":
        return EmpiricalDiffusion(guidance)
    raise ValueError(f"unknown analytic model {name!r}; choose one of {', '.join(ANALYTIC_MODELS)}")
