"""Noise-level (sigma) grids, docs/authors-code.md §3.

Every function returns a float64 tensor of ``num_steps`` decreasing sigmas
``t_0 > t_1 > ... > t_{N-1} > 0`` (``N - 1`` solver steps); ``terminal_zero=True``
appends a final ``0`` as EDM does, giving ``N`` steps.

Where the authors' code is wrong (docs/authors-code.md §9.7-9.9) the default ``variant="correct"``
gives the right formula and ``variant="official"`` reproduces theirs, so released tables can be run
on the grid they were fitted on. ``official`` repeats their float32 arithmetic operation by operation,
each operation rounded once to float32 (see ``_Float32``): its ``time_uniform`` grids equal the grids
stored in all 32 released ICCV files bit for bit, and its float32 LDM noise map gives exactly the LSUN
sigma range those files record. The SD1.5 files store no grid, so ``discrete`` is checked against an
independent float32 computation only (the authors build it on the GPU, whose exp/log may differ in
the last bit). ``flowmatch`` follows diffusers' float32 scheduler.
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
    "refine_grid",
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


class _Float32:
    """IEEE float32 arithmetic, every operation rounded once (the ``official`` variants).

    ``+ - * /`` and ``sqrt`` are numpy's float32 operations, which IEEE rounds correctly. ``log``, ``exp``,
    ``log1p`` and ``pow`` are evaluated in float64 and rounded once to float32 (correct except within 2^-29
    of a float32 tie). The released ICCV grids and LSUN sigma range match these roundings bit for bit, whereas
    the same torch calls in torch 2.14 on the CPU (``sqrt``, ``exp``) miss some by one ulp.
    """

    f = np.float32

    @staticmethod
    def _once(fn: Any, *args: Any) -> np.ndarray:
        return fn(*(np.asarray(a, dtype=np.float32).astype(np.float64) for a in args)).astype(np.float32)

    @classmethod
    def log(cls, x: Any) -> np.ndarray:
        return cls._once(np.log, x)

    @classmethod
    def exp(cls, x: Any) -> np.ndarray:
        return cls._once(np.exp, x)

    @classmethod
    def log1p(cls, x: Any) -> np.ndarray:
        return cls._once(np.log1p, x)

    @classmethod
    def pow(cls, x: Any, p: Any) -> np.ndarray:
        """``x ** p``; for a Python exponent of 1 torch returns ``x`` itself."""
        if isinstance(p, (int, float)) and p == 1:
            return np.asarray(x, dtype=np.float32)
        return cls._once(np.power, x, p)

    @classmethod
    def unit_linspace(cls, steps: int) -> np.ndarray:
        """``torch.linspace(0., 1., steps)`` in float32 on the CPU: ``step = 1/(steps-1)`` in float32, then
        ``step*i`` for the first half and ``1 - step*(steps-1-i)`` for the second, each a fused multiply-add
        (one rounding; both are exact in float64 for steps < 2^28), as torch's scalar CPU kernel does when built
        with FMA."""
        step = np.float64(cls.f(1) / cls.f(steps - 1))
        i = np.arange(steps, dtype=np.float64)
        return np.where(i < steps // 2, step * i, 1.0 - step * (steps - 1 - i)).astype(np.float32)


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
    docs/authors-code.md §9.8), operation by operation: s_min, s_max and eps cast to float32 (Python scalars
    such as ``eps - 1`` and ``eps^{1/rho} - 1`` computed in float64 first, then cast, as torch casts a scalar
    operand), ``s^2`` as ``s*s``, and the exponential as their ``e ** x``: a float32 ``pow`` with base
    float32(e), which is not ``exp(x)``. The LSUN tables pass s_min, s_max = float32 sigma(1e-3), sigma(1) of
    the LDM noise map (``discrete_sigmas``): 0.03875904902815819, 83.82247924804688.
    """
    _check(num_steps, sigma_min, sigma_max)
    if variant == "official":
        f32, n = _Float32, int(num_steps)
        one, e = f32.f(1), f32.f(eps)
        log_min = f32.log(f32.f(sigma_min) * f32.f(sigma_min) + one)
        log_max = f32.log(f32.f(sigma_max) * f32.f(sigma_max) + one)
        beta_d = f32.f(2) * (log_min / e - log_max) / f32.f(eps - 1)
        beta_min = log_max - f32.f(0.5) * beta_d
        i = np.arange(n, dtype=np.float32)
        tau = f32.pow(one + i / f32.f(n - 1) * f32.f(eps ** (1 / rho) - 1), rho)
        x = f32.f(0.5) * beta_d * (tau * tau) + beta_min * tau
        return _finish(np.sqrt(f32.pow(f32.f(math.e), x) - one), terminal_zero)
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


class _AuthorsVPMap32:
    """The authors' float32 noise map of a discrete VP model (their ``CFGPrecond``, docs/authors-code.md §5.1).

    The float32 ``alphas_cumprod`` buffer gives ``log alpha_n = 0.5 log alphabar_n``; the time keys are
    ``torch.linspace(0, 1, M+1)[1:]`` in float32 (not exactly (n+1)/M). Their piecewise-linear interpolation
    evaluates ``y0 + (x - x0) (y1 - y0) / (x1 - x0)`` on the segment whose right key is the first key >= x
    (the end segments outside). ``sigma(t) = sqrt(1 - exp(2 log alpha)) / exp(log alpha)``;
    ``sigma_inv`` takes ``log alpha = -0.5 logaddexp(0, 2 log sigma)`` with torch's
    ``max(a, b) + log1p(exp(-|a - b|))``. All in :class:`_Float32` arithmetic.
    """

    def __init__(self, alphas_cumprod: Any):
        ac = np.asarray(torch.as_tensor(alphas_cumprod).detach().cpu().numpy(), dtype=np.float32).reshape(-1)
        self.log_alpha = _Float32.f(0.5) * _Float32.log(ac)
        self.t_keys = _Float32.unit_linspace(ac.size + 1)[1:]

    @staticmethod
    def _interp(x: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        j = np.clip(np.searchsorted(xs, x, side="left"), 1, xs.size - 1)
        x0, x1, y0, y1 = xs[j - 1], xs[j], ys[j - 1], ys[j]
        return y0 + (x - x0) * (y1 - y0) / (x1 - x0)

    def sigma(self, t: Any) -> np.ndarray:
        log_alpha = self._interp(np.atleast_1d(np.asarray(t, dtype=np.float32)), self.t_keys, self.log_alpha)
        return np.sqrt(_Float32.f(1) - _Float32.exp(_Float32.f(2) * log_alpha)) / _Float32.exp(log_alpha)

    def sigma_inv(self, sigma: Any) -> np.ndarray:
        zero, b = _Float32.f(0), _Float32.f(2) * _Float32.log(np.atleast_1d(np.asarray(sigma, dtype=np.float32)))
        log_alpha = _Float32.f(-0.5) * (np.maximum(zero, b) + _Float32.log1p(_Float32.exp(-np.abs(zero - b))))
        return self._interp(log_alpha, self.log_alpha[::-1], self.t_keys[::-1])


def discrete_sigmas(num_steps: int, alphas_cumprod: Any = None, sigma_min: float | None = None,
                    sigma_max: float | None = None, rho: float = 1.0, variant: Variant = "correct",
                    terminal_zero: bool = False) -> torch.Tensor:
    """Grid uniform in the discrete model's time (docs/authors-code.md §3.1 ``discrete``).

    correct:  ``t_i = (t_max^{1/rho} + u_i (t_min^{1/rho} - t_max^{1/rho}))^rho``;
    official: ``t_i = (t_max + u_i (t_min^{1/rho} - t_max))^rho`` (rho on t_min only, docs/authors-code.md §9.7; same
    for rho = 1), computed as the authors do, in float32 with their noise map (:class:`_AuthorsVPMap32`):
    sigma_min, sigma_max cast to float32, ``u_i = i/(N-1)`` in float32. Default ``alphas_cumprod`` is Stable
    Diffusion 1.x (float32, as the LDM keeps it); default range is the model's own sigma(1e-3)..sigma(1), in
    float32 for ``official``.
    """
    _check_variant(variant)
    alphas_cumprod = sd15_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod
    if variant == "official":
        return _finish(_official_discrete(int(num_steps), alphas_cumprod, sigma_min, sigma_max, rho), terminal_zero)
    vp = VPDiscreteMap(alphas_cumprod)
    sigma_min = vp.sigma_min if sigma_min is None else sigma_min
    sigma_max = vp.sigma_max if sigma_max is None else sigma_max
    _check(num_steps, sigma_min, sigma_max)
    t_min, t_max = float(vp.sigma_inv(sigma_min)), float(vp.sigma_inv(sigma_max))
    u = np.linspace(0.0, 1.0, int(num_steps))
    t = (t_max ** (1 / rho) + u * (t_min ** (1 / rho) - t_max ** (1 / rho))) ** rho
    return _finish(vp.sigma(t), terminal_zero)


def _official_discrete(n: int, alphas_cumprod: Any, sigma_min: float | None, sigma_max: float | None,
                       rho: float) -> np.ndarray:
    """The authors' ``discrete`` grid in float32 (docs/authors-code.md §3.1, §5.1)."""
    VPDiscreteMap(alphas_cumprod)           # the same validation as the correct variant
    vp = _AuthorsVPMap32(alphas_cumprod)
    s_min = vp.sigma(1e-3) if sigma_min is None else np.float32([sigma_min])
    s_max = vp.sigma(1.0) if sigma_max is None else np.float32([sigma_max])
    _check(n, float(s_min[0]), float(s_max[0]))
    t_min, t_max = vp.sigma_inv(s_min), vp.sigma_inv(s_max)
    u = np.arange(n, dtype=np.float32) / np.float32(n - 1)
    return vp.sigma(_Float32.pow(t_max + u * (_Float32.pow(t_min, 1 / rho) - t_max), rho))


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


def refine_grid(sigmas: Any, inner_steps: int, rho: float = 7.0, dtype: str = "float32") -> torch.Tensor:
    """Every interval ``[t_c, t_n]`` of ``sigmas`` split by an inner polynomial grid of ``inner_steps`` points, as the
    authors' ICCV ``heun`` and their ``dpm`` samplers (and so their distillation teachers) split it
    (docs/authors-code.md §4, §6.2): ``t_j = (t_c^{1/rho} + j/(inner_steps-1) (t_n^{1/rho} - t_c^{1/rho}))^rho``.

    ``dtype="float32"`` computes the inner points as their ``get_schedule`` does (the two ends cast to float32, the
    formula in float32 torch arithmetic over the vector of j); ``"float64"`` computes them in float64. Returns a
    float64 grid of ``(inner_steps-1)(N-1)+1`` points that holds the original points exactly at every
    ``(inner_steps-1)``-th index (theirs may move an end by a float32 rounding; ours keep the outer grid). A final 0
    is allowed; ``inner_steps = 2`` returns the grid unchanged.
    """
    if isinstance(inner_steps, bool) or int(inner_steps) != inner_steps or inner_steps < 2:
        raise ValueError(f"inner_steps must be an integer >= 2 (2 keeps each interval whole; got {inner_steps!r})")
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64' (got {dtype!r})")
    if not rho > 0:
        raise ValueError(f"rho must be > 0 (got {rho!r})")
    outer = torch.as_tensor(np.asarray(sigmas.detach().cpu() if isinstance(sigmas, torch.Tensor) else sigmas,
                                       dtype=np.float64))
    if outer.ndim != 1 or len(outer) < 2 or not bool((outer[1:] < outer[:-1]).all()) or not bool((outer[:-1] > 0).all()) \
            or float(outer[-1]) < 0:
        raise ValueError("sigmas must be a 1-D, strictly decreasing, positive grid of >= 2 points (a final 0 is allowed)")
    per = int(inner_steps) - 1
    fine = torch.empty(per * (len(outer) - 1) + 1, dtype=torch.float64)
    fine[::per] = outer
    if per == 1:
        return fine
    work = torch.float32 if dtype == "float32" else torch.float64
    u = torch.arange(int(inner_steps), dtype=torch.int64).to(work) / per
    for i in range(len(outer) - 1):
        hi, lo = (torch.tensor(float(v), dtype=work) ** (1.0 / rho) for v in (outer[i], outer[i + 1]))
        fine[i * per + 1:(i + 1) * per] = ((hi + u * (lo - hi)) ** rho)[1:-1].double()
    if not bool((fine[1:] < fine[:-1]).all()):
        raise ValueError(f"an interval of sigmas is too narrow for a {dtype} inner grid of {inner_steps} points "
                         "(its points would not decrease strictly); use dtype='float64' or fewer inner steps")
    return fine
