"""Noise-level (sigma) grids, docs/authors-code.md §3.

Every function returns a float64 tensor of ``num_steps`` decreasing sigmas
``t_0 > t_1 > ... > t_{N-1} > 0`` (``N - 1`` solver steps); ``terminal_zero=True``
appends a final ``0`` as EDM does, giving ``N`` steps.

Where the authors' code is wrong (docs/authors-code.md §9.7-9.9) the default ``variant="correct"``
gives the right formula and ``variant="official"`` reproduces theirs bit for bit
(float32 arithmetic included), so released tables can be run on the grid they
were fitted on.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Sequence

import numpy as np
import torch

__all__ = [
    "Variant",
    "ScheduleSpec",
    "VPDiscreteMap",
    "polynomial_sigmas",
    "logsnr_sigmas",
    "time_uniform_sigmas",
    "discrete_sigmas",
    "flowmatch_sigmas",
    "flux_mu",
    "sd15_alphas_cumprod",
    "beta_alphas_cumprod",
    "make_sigmas",
    "default_rho",
    "SCHEDULES",
]

Variant = Literal["correct", "official"]
SCHEDULES = ("polynomial", "logsnr", "time_uniform", "discrete", "flowmatch")


def default_rho(kind: str) -> float:
    """The usual rho of a schedule: 7 for EDM's polynomial grid, 1 otherwise (time_uniform as in DPM-Solver)."""
    return 7.0 if kind == "polynomial" else 1.0


def _finish(sigmas: np.ndarray | torch.Tensor, terminal_zero: bool) -> torch.Tensor:
    out = torch.as_tensor(np.asarray(sigmas, dtype=np.float64))
    if terminal_zero:
        out = torch.cat([out, out.new_zeros(1)])
    return out


def _check(num_steps: int, sigma_min: float, sigma_max: float) -> None:
    if int(num_steps) < 2:
        raise ValueError(f"num_steps must be >= 2 (got {num_steps}): a grid needs two points for one step")
    if not (0 < sigma_min < sigma_max):
        raise ValueError(f"need 0 < sigma_min < sigma_max (got sigma_min={sigma_min}, sigma_max={sigma_max})")


def polynomial_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0,
                      terminal_zero: bool = False) -> torch.Tensor:
    """EDM (Karras et al. eq. 5): ``t_i = (s_max^{1/rho} + u_i (s_min^{1/rho} - s_max^{1/rho}))^rho``, u_i = i/(N-1)."""
    _check(num_steps, sigma_min, sigma_max)
    u = np.linspace(0.0, 1.0, int(num_steps))
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return _finish((hi + u * (lo - hi)) ** rho, terminal_zero)


def logsnr_sigmas(num_steps: int, sigma_min: float, sigma_max: float, terminal_zero: bool = False) -> torch.Tensor:
    """Uniform in log sigma (i.e. in log-SNR): ``t_i = exp(log s_max + u_i (log s_min - log s_max))``."""
    _check(num_steps, sigma_min, sigma_max)
    return _finish(np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), int(num_steps))), terminal_zero)


def time_uniform_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 1.0,
                        variant: Variant = "correct", terminal_zero: bool = False,
                        eps: float = 1e-3) -> torch.Tensor:
    """Uniform in VP time (DPM-Solver style), docs/authors-code.md §3.1.

    A linear-beta VP schedule is fitted so that sigma(1) = s_max and sigma(eps) = s_min:
    ``beta_d = 2 (log(s_min^2+1)/eps - log(s_max^2+1)) / (eps - 1)``, ``beta_min = log(s_max^2+1) - beta_d/2``;
    then ``tau_i = (1 + u_i (eps^{1/rho} - 1))^rho`` and ``t_i = sqrt(exp(beta_d tau^2/2 + beta_min tau) - 1)``.
    ``official`` does this in float32 as the authors do (so t_{N-1} = 0.0020132 for s_min = 0.002,
    docs/authors-code.md §9.8).
    """
    _check(num_steps, sigma_min, sigma_max)
    if variant == "official":
        f32 = torch.float32
        smin, smax, e = (torch.tensor(v, dtype=f32) for v in (sigma_min, sigma_max, eps))
        beta_d = 2 * (torch.log(smin ** 2 + 1) / e - torch.log(smax ** 2 + 1)) / (e - 1)
        beta_min = torch.log(smax ** 2 + 1) - 0.5 * beta_d
        step = torch.arange(int(num_steps), dtype=f32)
        tau = (1 + step / (num_steps - 1) * (e ** (1 / rho) - 1)) ** rho
        sig = (torch.exp(0.5 * beta_d * tau ** 2 + beta_min * tau) - 1) ** 0.5
        return _finish(sig.double().numpy(), terminal_zero)
    _check_variant(variant)
    beta_d = 2 * (math.log(sigma_min ** 2 + 1) / eps - math.log(sigma_max ** 2 + 1)) / (eps - 1)
    beta_min = math.log(sigma_max ** 2 + 1) - 0.5 * beta_d
    u = np.linspace(0.0, 1.0, int(num_steps))
    tau = (1 + u * (eps ** (1 / rho) - 1)) ** rho
    return _finish(np.sqrt(np.expm1(0.5 * beta_d * tau ** 2 + beta_min * tau)), terminal_zero)


def _check_variant(variant: str) -> None:
    if variant not in ("correct", "official"):
        raise ValueError(f"variant must be 'correct' or 'official' (got {variant!r})")


def beta_alphas_cumprod(kind: str, beta_start: float, beta_end: float, num_timesteps: int = 1000) -> np.ndarray:
    """``alphabar_n = prod_{i<=n} (1 - beta_i)`` of a DDPM beta schedule: ``linear`` (betas evenly spaced, Ho et al.
    2020) or ``scaled_linear`` (their square roots evenly spaced, LDM). Computed in float64, returned as float32
    as the LDM code keeps its buffer (docs/authors-code.md §5.1)."""
    n = int(num_timesteps)
    if kind == "linear":
        betas = np.linspace(beta_start, beta_end, n, dtype=np.float64)
    elif kind == "scaled_linear":
        betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=np.float64) ** 2
    else:
        raise ValueError(f"beta schedule {kind!r} is not supported (linear, scaled_linear)")
    return np.cumprod(1.0 - betas).astype(np.float32)


def sd15_alphas_cumprod() -> np.ndarray:
    """Stable Diffusion 1.x ``alphas_cumprod``: scaled-linear betas 0.00085..0.012 over 1000 steps."""
    return beta_alphas_cumprod("scaled_linear", 0.00085, 0.012, 1000)


class VPDiscreteMap:
    """Continuous-time view of a discrete VP model (docs/authors-code.md §5.1).

    Keypoints ``t_n = (n+1)/M`` carry ``log alpha_n = 0.5 log alphabar_n``; ``log alpha(t)`` is their
    piecewise-linear interpolation (linear extrapolation outside), and ``sigma(t) = sqrt(1 - alpha^2)/alpha``.
    ``timestep(sigma) = M sigma^{-1}(sigma) - 1`` is the fractional training timestep (exactly n at sigma_n).
    """

    def __init__(self, alphas_cumprod: Sequence[float] | np.ndarray | torch.Tensor):
        ac = np.asarray(torch.as_tensor(alphas_cumprod).detach().cpu().numpy(), dtype=np.float64)
        if ac.ndim != 1 or ac.size < 2 or not np.all((ac > 0) & (ac <= 1)) or np.any(np.diff(ac) >= 0):
            raise ValueError("alphas_cumprod must be a 1-D, strictly decreasing sequence in (0, 1]")
        self.num_train_timesteps = ac.size
        self.t_keys = (np.arange(ac.size) + 1.0) / ac.size
        self.log_alpha_keys = 0.5 * np.log(ac)

    def _interp(self, x: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        # np.interp clamps outside the range; the reference extrapolates with the end segments.
        y = np.interp(x, xs, ys)
        lo, hi = x < xs[0], x > xs[-1]
        y = np.where(lo, ys[0] + (x - xs[0]) * (ys[1] - ys[0]) / (xs[1] - xs[0]), y)
        return np.where(hi, ys[-1] + (x - xs[-1]) * (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]), y)

    def sigma(self, t: np.ndarray | float) -> np.ndarray:
        log_alpha = self._interp(np.asarray(t, dtype=np.float64), self.t_keys, self.log_alpha_keys)
        return np.sqrt(np.expm1(-2.0 * log_alpha))

    def sigma_inv(self, sigma: np.ndarray | float) -> np.ndarray:
        log_alpha = -0.5 * np.logaddexp(0.0, 2.0 * np.log(np.asarray(sigma, dtype=np.float64)))
        # log alpha decreases with t: interpolate on the reversed (increasing) keys.
        return self._interp(log_alpha, self.log_alpha_keys[::-1], self.t_keys[::-1])

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional training timestep ``M sigma^{-1}(sigma) - 1`` for each sigma, in torch and differentiable
        in ``sigma`` (the learned time scales reach a UNet's time input through it); float64 inside, result on
        ``sigma``'s device in float64 (callers cast)."""
        log_sigma = torch.log(torch.as_tensor(sigma).to(torch.float64))
        log_alpha = -0.5 * torch.nn.functional.softplus(2.0 * log_sigma)
        keys, t_keys = self._torch_keys(log_alpha.device)
        # Segment index, clamped so that values outside the keys extrapolate with the end segments.
        index = torch.searchsorted(keys, log_alpha.detach().contiguous()).clamp(1, keys.numel() - 1)
        x0, x1, y0, y1 = keys[index - 1], keys[index], t_keys[index - 1], t_keys[index]
        t = y0 + (log_alpha - x0) * (y1 - y0) / (x1 - x0)
        return self.num_train_timesteps * t - 1.0

    def _torch_keys(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(log alpha keys increasing, matching t keys) on ``device``, made once per device."""
        cache = self.__dict__.setdefault("_keys_on", {})
        if device not in cache:
            cache[device] = (torch.as_tensor(self.log_alpha_keys[::-1].copy(), device=device),
                             torch.as_tensor(self.t_keys[::-1].copy(), device=device))
        return cache[device]

    @property
    def sigma_min(self) -> float:
        return float(self.sigma(1.0 / self.num_train_timesteps))

    @property
    def sigma_max(self) -> float:
        return float(self.sigma(1.0))


def discrete_sigmas(num_steps: int, alphas_cumprod: Any = None, sigma_min: float | None = None,
                    sigma_max: float | None = None, rho: float = 1.0, variant: Variant = "correct",
                    terminal_zero: bool = False) -> torch.Tensor:
    """Grid uniform in the discrete model's time (docs/authors-code.md §3.1 ``discrete``).

    correct:  ``t_i = (t_max^{1/rho} + u_i (t_min^{1/rho} - t_max^{1/rho}))^rho``;
    official: ``t_i = (t_max + u_i (t_min^{1/rho} - t_max))^rho`` (rho on t_min only, docs/authors-code.md §9.7; same
    for rho = 1). Default ``alphas_cumprod`` is Stable Diffusion 1.x; default range is the model's own
    sigma(1e-3)..sigma(1).
    """
    _check_variant(variant)
    vp = VPDiscreteMap(sd15_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod)
    sigma_min = vp.sigma_min if sigma_min is None else sigma_min
    sigma_max = vp.sigma_max if sigma_max is None else sigma_max
    _check(num_steps, sigma_min, sigma_max)
    t_min, t_max = float(vp.sigma_inv(sigma_min)), float(vp.sigma_inv(sigma_max))
    u = np.linspace(0.0, 1.0, int(num_steps))
    if variant == "official":
        t = (t_max + u * (t_min ** (1 / rho) - t_max)) ** rho
    else:
        t = (t_max ** (1 / rho) + u * (t_min ** (1 / rho) - t_max ** (1 / rho))) ** rho
    return _finish(vp.sigma(t), terminal_zero)


def flux_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
            base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX dynamic-shift parameter: linear in the packed sequence length (docs/authors-code.md §3.2)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)


def _shift(tau: np.ndarray, shift: float | None, mu: float | None) -> np.ndarray:
    if mu is not None:
        return math.exp(mu) / (math.exp(mu) + (1.0 / tau - 1.0))
    return shift * tau / (1.0 + (shift - 1.0) * tau)


def _unshift(sigma: float, shift: float | None, mu: float | None) -> float:
    if mu is not None:
        return 1.0 / (1.0 + math.exp(mu) * (1.0 / sigma - 1.0))
    return sigma / (shift - (shift - 1.0) * sigma)


def flowmatch_sigmas(num_steps: int, shift: float | None = 3.0, mu: float | None = None,
                     sigma_min: float | None = None, sigma_max: float = 1.0, num_train_timesteps: int = 1000,
                     variant: Variant = "correct", terminal_zero: bool = False) -> torch.Tensor:
    """Flow-matching grid (SD3: static ``shift``; FLUX: dynamic ``mu``), docs/authors-code.md §3.1 ``flowmatch``.

    Shift maps: static ``s tau / (1 + (s-1) tau)``, dynamic ``e^mu / (e^mu + 1/tau - 1)``.

    correct:  ``tau = linspace(tau(s_max), tau(s_min), N)`` with tau the inverse shift, then shifted once.
              Default s_min is the training range's shifted end (tau = 1/num_train_timesteps).
    official: what diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps(N, mu)`` returns with the
              terminal zero dropped, as the authors use it: the scheduler's already-shifted sigma range is
              linearly spaced and shifted again (docs/authors-code.md §9.9), in float32;
              ``sigma_min``/``sigma_max`` ignored.
    """
    if (shift is None) == (mu is None) and mu is None:
        raise ValueError("flowmatch needs a static `shift` or a dynamic `mu`")
    if mu is not None:
        shift = None
    _check_variant(variant)
    n = int(num_steps)
    if variant == "official":
        f32 = np.float32
        u = np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=f32)[::-1] / f32(num_train_timesteps)
        if shift is not None:
            u = (f32(shift) * u / (f32(1) + (f32(shift) - f32(1)) * u)).astype(f32)
        s_max, s_min = float(u[0]), float(u[-1])
        tau = np.linspace(s_max * num_train_timesteps, s_min * num_train_timesteps, n) / num_train_timesteps
        return _finish(_shift(tau, shift, mu).astype(np.float32), terminal_zero)
    s_min = _shift(np.array(1.0 / num_train_timesteps), shift, mu) if sigma_min is None else sigma_min
    _check(n, float(s_min), sigma_max)
    tau = np.linspace(_unshift(sigma_max, shift, mu), _unshift(float(s_min), shift, mu), n)
    return _finish(_shift(tau, shift, mu), terminal_zero)


@dataclass(frozen=True)
class ScheduleSpec:
    """Everything needed to rebuild a sigma grid; stored in predictor tables next to the grid itself."""

    kind: str = "polynomial"
    num_steps: int = 6
    sigma_min: float | None = 0.002
    sigma_max: float | None = 80.0
    rho: float = 7.0
    variant: str = "correct"
    terminal_zero: bool = False
    shift: float | None = None
    mu: float | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ScheduleSpec":
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)

    def sigmas(self, alphas_cumprod: Any = None) -> torch.Tensor:
        return make_sigmas(self, alphas_cumprod=alphas_cumprod)


def make_sigmas(spec: ScheduleSpec, alphas_cumprod: Any = None) -> torch.Tensor:
    """Build the grid a :class:`ScheduleSpec` describes."""
    kind, n = spec.kind, spec.num_steps
    if kind == "polynomial":
        return polynomial_sigmas(n, spec.sigma_min, spec.sigma_max, spec.rho, spec.terminal_zero)
    if kind == "logsnr":
        return logsnr_sigmas(n, spec.sigma_min, spec.sigma_max, spec.terminal_zero)
    if kind == "time_uniform":
        return time_uniform_sigmas(n, spec.sigma_min, spec.sigma_max, spec.rho, spec.variant, spec.terminal_zero)
    if kind == "discrete":
        return discrete_sigmas(n, alphas_cumprod, spec.sigma_min, spec.sigma_max, spec.rho, spec.variant,
                               spec.terminal_zero)
    if kind == "flowmatch":
        return flowmatch_sigmas(n, spec.shift, spec.mu, spec.sigma_min, spec.sigma_max if spec.sigma_max else 1.0,
                                variant=spec.variant, terminal_zero=spec.terminal_zero)
    raise ValueError(f"unknown schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")
