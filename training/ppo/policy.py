"""The residual Dirichlet policy of RDPO (docs/authors-code.md §7.2) over EPD predictor tables.

The policy's only input is the step index, so it is a residual re-parameterisation of a per-step table:
``Embedding(N-1, H)`` -> ``blocks`` x ``h + Linear(SiLU(LayerNorm(h)))`` -> ``Linear(H, (K+1) + K [+2K] [+2K])``
whose weight and bias start at zero, giving per-step residuals ``Delta``. With float32 buffers ``base_*`` from the
cold start (:mod:`training.ppo.cold_start`):

* ``alpha_pos = max(exp(base_log_alpha_pos + Delta_pos), 1e-5)``  ``[N-1, K+1]``: ``segments ~ Dir(alpha_pos)``;
* ``alpha_w = max(exp(base_log_alpha_weight + Delta_w), 1e-5)``  ``[N-1, K]``: ``weights ~ Dir(alpha_w)``;
* per modelled scale: ``loc = base_log_scale + Delta_loc``, ``log_std = clip(base_log_std + Delta_std, -7, 2)``,
  ``scale ~ LogNormal(loc, exp(log_std))``.

Every image and every interval is drawn independently; a table's log-probability is the sum over intervals
(and over K for the scales) of the log-densities. Distributions are evaluated in float64 (the network and its
buffers are float32), so sampled tables keep strictly increasing positions and PPO ratios are exact.

Choices that differ from the authors (documented in :class:`DirichletPolicy`):

* base scale loc: ``log(scale) - std^2/2`` ("mean" cold start) so that the LogNormal MEAN ``exp(loc + std^2/2)``
  equals the start table at initialisation (the authors use ``log(scale)``, whose mean is
  ``scale * exp(std^2/2)``); ``log(scale) + std^2`` for a "mode" cold start, so the LogNormal MODE matches.
* sampling takes an explicit ``torch.Generator``: Gamma variates come from ``torch._standard_gamma(...,
  generator=)`` and uniforms from ``torch.rand(..., generator=)``, so draws are reproducible and never touch
  the global RNG (``generator=None`` uses the global RNG, like torch).
* export keeps the scales (the authors' export drops trained scale tables, docs/authors-code.md §9.20).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from solvers.plan import TableRows
from solvers.table import PredictorTable

from .cold_start import ColdStart, sanitize_rows, segments_to_positions

__all__ = ["TableSample", "PolicyParams", "DirichletPolicy", "dirichlet_log_prob", "dirichlet_kl",
           "dirichlet_entropy", "lognormal_log_prob", "lognormal_kl", "lognormal_entropy", "sample_dirichlet",
           "SCALE_NAMES", "DTYPE"]

DTYPE = torch.float64          # the dtype the distributions are evaluated in
SCALE_NAMES = ("dir", "time")  # dir_scales, time_scales
ALPHA_MIN = 1e-5
LOG_STD_RANGE = (-7.0, 2.0)
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


# -- closed forms ------------------------------------------------------------------------------------------
def dirichlet_log_prob(alpha: Tensor, x: Tensor) -> Tensor:
    """``ln Dir(x; alpha) = lnG(sum a) - sum lnG(a) + sum (a - 1) ln x`` over the last axis."""
    return torch.lgamma(alpha.sum(-1)) - torch.lgamma(alpha).sum(-1) + ((alpha - 1) * torch.log(x)).sum(-1)


def dirichlet_kl(p: Tensor, q: Tensor) -> Tensor:
    """``KL(Dir(p)||Dir(q)) = lnG(sum p) - lnG(sum q) - sum lnG(p) + sum lnG(q) + sum (p - q)(psi(p) - psi(sum p))``."""
    p0 = p.sum(-1)
    return (torch.lgamma(p0) - torch.lgamma(q.sum(-1)) - torch.lgamma(p).sum(-1) + torch.lgamma(q).sum(-1)
            + ((p - q) * (torch.digamma(p) - torch.digamma(p0).unsqueeze(-1))).sum(-1))


def dirichlet_entropy(alpha: Tensor) -> Tensor:
    """``H = sum lnG(a) - lnG(a0) + (a0 - n) psi(a0) - sum (a - 1) psi(a)`` with ``a0 = sum a``."""
    a0 = alpha.sum(-1)
    n = alpha.shape[-1]
    return (torch.lgamma(alpha).sum(-1) - torch.lgamma(a0) + (a0 - n) * torch.digamma(a0)
            - ((alpha - 1) * torch.digamma(alpha)).sum(-1))


def lognormal_log_prob(loc: Tensor, log_std: Tensor, y: Tensor) -> Tensor:
    """``ln LogN(y; m, s) = -ln y - ln s - ln(2 pi)/2 - (ln y - m)^2 / (2 s^2)`` (elementwise)."""
    z = torch.log(y)
    return -z - log_std - _HALF_LOG_2PI - 0.5 * ((z - loc) * torch.exp(-log_std)) ** 2


def lognormal_kl(loc_p: Tensor, log_std_p: Tensor, loc_q: Tensor, log_std_q: Tensor) -> Tensor:
    """KL of the underlying normals: ``[(s_p^2 + (m_p - m_q)^2) / s_q^2 - 1] / 2 + ln s_q - ln s_p`` (elementwise)."""
    var_ratio = torch.exp(2 * (log_std_p - log_std_q))
    return 0.5 * (var_ratio + (loc_p - loc_q) ** 2 * torch.exp(-2 * log_std_q) - 1) + log_std_q - log_std_p


def lognormal_entropy(loc: Tensor, log_std: Tensor) -> Tensor:
    """``H = m + 1/2 + ln s + ln(2 pi)/2`` (elementwise)."""
    return loc + 0.5 + log_std + _HALF_LOG_2PI


def sample_dirichlet(alpha: Tensor, generator: torch.Generator | None = None, min_value: float = 0.0) -> Tensor:
    """Draw ``Dir(alpha)`` along the last axis as normalised Gamma variates, in log space.

    ``G_i = X_i U_i^(1/a_i)`` with ``X_i ~ Gamma(a_i + 1)``, ``U_i ~ U(0, 1]`` is ``Gamma(a_i)`` and its log
    ``ln X_i + ln U_i / a_i`` never underflows, even for ``a_i`` near the 1e-5 floor; ``x = softmax(ln G)``.
    Values are then clamped at ``min_value`` and renormalised. All randomness comes from ``generator``.
    """
    gamma = torch._standard_gamma(alpha + 1, generator=generator)
    uniform = 1 - torch.rand(alpha.shape, generator=generator, dtype=alpha.dtype, device=alpha.device)
    log_gamma = torch.log(gamma.clamp_min(torch.finfo(alpha.dtype).tiny)) + torch.log(uniform) / alpha
    x = torch.softmax(log_gamma, dim=-1)
    if min_value > 0:
        x = x.clamp_min(min_value)
        x = x / x.sum(-1, keepdim=True)
    return x


# -- samples and parameters --------------------------------------------------------------------------------
@dataclass
class TableSample:
    """Per-image sampled tables: ``segments [B, N-1, K+1]`` on the simplex, ``weights [B, N-1, K]``, and
    positive ``dir_scales``/``time_scales [B, N-1, K]`` or None."""

    segments: Tensor
    weights: Tensor
    dir_scales: Tensor | None = None
    time_scales: Tensor | None = None

    @property
    def positions(self) -> Tensor:
        """``r_k = sum_{j<=k} s_j``: ``[B, N-1, K]``."""
        return segments_to_positions(self.segments)

    def __len__(self) -> int:
        return int(self.segments.shape[0])

    def _map(self, fn: Any) -> "TableSample":
        return TableSample(*(None if v is None else fn(v)
                             for v in (self.segments, self.weights, self.dir_scales, self.time_scales)))

    def select(self, index: Tensor | slice | int | list) -> "TableSample":
        """The images ``index`` (along the batch axis); an integer keeps the batch axis."""
        if isinstance(index, int):
            index = slice(index, index + 1) if index != -1 else slice(-1, None)
        return self._map(lambda v: v[index])

    def detach(self) -> "TableSample":
        return self._map(lambda v: v.detach())

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> "TableSample":
        return self._map(lambda v: v.to(device=device, dtype=dtype))

    def rows(self) -> TableRows:
        """The per-image table rows ``[N-1, B, K]`` (:class:`solvers.plan.TableRows`) that a
        :class:`solvers.plan.StepPlan` and :func:`solvers.epd.sample_epd` read."""
        return TableRows(self.positions, self.weights, self.dir_scales, self.time_scales).map(
            lambda v: v.transpose(0, 1))


@dataclass
class PolicyParams:
    """Distribution parameters (float64): ``alpha_pos [N-1, K+1]``, ``alpha_weight [N-1, K]`` and, for each
    modelled scale, ``*_loc``/``*_log_std [N-1, K]`` (None when the scale is not modelled)."""

    alpha_pos: Tensor
    alpha_weight: Tensor
    dir_loc: Tensor | None = None
    dir_log_std: Tensor | None = None
    time_loc: Tensor | None = None
    time_log_std: Tensor | None = None

    def scale(self, name: str) -> tuple[Tensor, Tensor] | None:
        loc, log_std = getattr(self, f"{name}_loc"), getattr(self, f"{name}_log_std")
        return None if loc is None else (loc, log_std)


class _ResidualBlock(nn.Module):
    """``h + Linear(SiLU(LayerNorm(h)))``."""

    def __init__(self, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.linear = nn.Linear(hidden, hidden)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.linear(nn.functional.silu(self.norm(h)))


def _buffer(values: np.ndarray, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.tensor(np.asarray(values, dtype=np.float64), dtype=dtype)


class DirichletPolicy(nn.Module):
    """The residual Dirichlet policy of RDPO (docs/authors-code.md §7.2): input the step index only.

    ``start``: the cold start (:func:`training.ppo.cold_start.cold_start`). ``hidden``/``blocks``: H and L (the
    authors' launch uses 128/2). ``scale_std``: the start std of the log-scales. Scales are modelled (sampled
    from a LogNormal) when the start table has them or ``train_scale_*`` is True (then from scale 1.0);
    ``train_scale_*=False`` keeps a table's scales fixed at its values (returned unchanged, no log-prob).
    ``min_segment``: sampled segments and weights are clamped at this and renormalised, so positions stay
    strictly increasing inside (0, 1) even in float32 (1e-6 is 16 float32 ulps at 1) and log-probs are finite.

    The base scale loc is ``log(scale) - std^2/2`` ("mean" start: LogNormal mean == table) or
    ``log(scale) + std^2`` ("mode" start: LogNormal mode == table); the authors use ``log(scale)``.
    ``spec`` holds the constructor arguments and shapes needed to rebuild the module for a state_dict.
    """

    def __init__(self, start: ColdStart, hidden: int = 128, blocks: int = 2, scale_std: float = 0.05,
                 train_scale_dir: bool | None = None, train_scale_time: bool | None = None,
                 min_segment: float = 1e-6):
        super().__init__()
        if not isinstance(start, ColdStart):
            raise ValueError(f"DirichletPolicy: start must be a ColdStart (got {type(start).__name__})")
        if hidden < 1 or blocks < 0:
            raise ValueError(f"DirichletPolicy: need hidden >= 1 and blocks >= 0 (got {hidden}, {blocks})")
        if not (scale_std > 0 and math.isfinite(scale_std)):
            raise ValueError(f"DirichletPolicy: scale_std must be finite and > 0 (got {scale_std})")
        rows, points = start.num_rows, start.num_points
        if not (0 <= min_segment < 1.0 / (points + 1)):
            raise ValueError(f"DirichletPolicy: min_segment must be in [0, 1/(K+1)) (got {min_segment})")
        self.start = start
        self.num_rows, self.num_points = rows, points
        self.min_segment = float(min_segment)
        log_std = min(max(math.log(scale_std), LOG_STD_RANGE[0]), LOG_STD_RANGE[1])
        std = math.exp(log_std)
        # loc such that the LogNormal mean (or mode) is the start scale
        loc_shift = std ** 2 if start.parameterisation == "mode" else -0.5 * std ** 2

        self.modelled: dict[str, bool] = {}
        head_dim = (points + 1) + points
        self.register_buffer("base_log_alpha_pos", torch.log(_buffer(start.alpha_pos).clamp_min(ALPHA_MIN)))
        self.register_buffer("base_log_alpha_weight", torch.log(_buffer(start.alpha_weight).clamp_min(ALPHA_MIN)))
        for name, train in (("dir", train_scale_dir), ("time", train_scale_time)):
            values = getattr(start, f"{name}_scales")
            modelled = values is not None if train is None else bool(train)
            self.modelled[name] = modelled
            if modelled:
                init = np.ones((rows, points)) if values is None else np.maximum(values, 1e-6)
                self.register_buffer(f"base_log_scale_{name}", _buffer(np.log(init) + loc_shift))
                self.register_buffer(f"base_log_std_{name}", torch.full((rows, points), log_std, dtype=torch.float32))
                head_dim += 2 * points
            elif values is not None:  # fixed at the table's values, not part of the state_dict
                self.register_buffer(f"fixed_scale_{name}", _buffer(values, DTYPE), persistent=False)
        self.spec = {"num_rows": rows, "num_points": points, "hidden": int(hidden), "blocks": int(blocks),
                     "scale_std": float(scale_std), "train_scale_dir": train_scale_dir,
                     "train_scale_time": train_scale_time, "model_scale_dir": self.modelled["dir"],
                     "model_scale_time": self.modelled["time"], "min_segment": self.min_segment,
                     "concentration": start.concentration, "parameterisation": start.parameterisation,
                     "head_dim": head_dim}

        self.step_embed = nn.Embedding(rows, hidden)
        self.blocks = nn.ModuleList(_ResidualBlock(hidden) for _ in range(blocks))
        self.head = nn.Linear(hidden, head_dim)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.spec.items())

    # -- parameters ---------------------------------------------------------------------------------------
    def _assemble(self, delta: Tensor | None) -> PolicyParams:
        """Parameters from the residuals ``delta [N-1, head_dim]`` (None: the base distribution)."""
        rows, k = self.num_rows, self.num_points
        device = self.base_log_alpha_pos.device
        if delta is None:
            delta = torch.zeros(rows, self.spec["head_dim"], dtype=DTYPE, device=device)
        delta = delta.to(DTYPE)
        chunks = list(torch.split(delta, [k + 1, k] + [k, k] * sum(self.modelled.values()), dim=-1))
        out: dict[str, Tensor] = {
            "alpha_pos": torch.exp(self.base_log_alpha_pos.to(DTYPE) + chunks.pop(0)).clamp_min(ALPHA_MIN),
            "alpha_weight": torch.exp(self.base_log_alpha_weight.to(DTYPE) + chunks.pop(0)).clamp_min(ALPHA_MIN)}
        for name in SCALE_NAMES:
            if self.modelled[name]:
                out[f"{name}_loc"] = getattr(self, f"base_log_scale_{name}").to(DTYPE) + chunks.pop(0)
                out[f"{name}_log_std"] = (getattr(self, f"base_log_std_{name}").to(DTYPE) + chunks.pop(0)
                                          ).clamp(*LOG_STD_RANGE)
        return PolicyParams(**out)

    def forward(self) -> PolicyParams:
        """Evaluate the network on every step index: the current distribution parameters (float64)."""
        idx = torch.arange(self.num_rows, device=self.base_log_alpha_pos.device)
        h = self.step_embed(idx)
        for block in self.blocks:
            h = block(h)
        return self._assemble(self.head(h))

    def base_params(self) -> PolicyParams:
        """The fixed base distribution: the policy at zero residual (the buffers)."""
        return self._assemble(None)

    def _fixed(self, name: str) -> Tensor | None:
        return getattr(self, f"fixed_scale_{name}", None)

    # -- sampling and densities ---------------------------------------------------------------------------
    def sample(self, batch: int, generator: torch.Generator | None = None) -> tuple[TableSample, Tensor]:
        """Draw ``batch`` tables, every image and interval independently; returns ``(sample, log_prob [B])``.

        ``segments ~ Dir(alpha_pos)``, ``weights ~ Dir(alpha_w)`` (:func:`sample_dirichlet`, clamped at
        ``min_segment``), modelled scales ``exp(loc + exp(log_std) N(0, 1))``; fixed scales are the table's,
        repeated. Everything random comes from ``generator`` (on the policy's device); None uses torch's
        global RNG. The sample is detached; ``log_prob`` (no grad) is the old log-probability for PPO.
        """
        if int(batch) < 1:
            raise ValueError(f"DirichletPolicy.sample: batch must be >= 1 (got {batch})")
        batch = int(batch)
        with torch.no_grad():
            params = self.forward()
            segments = sample_dirichlet(params.alpha_pos.expand(batch, -1, -1), generator, self.min_segment)
            weights = sample_dirichlet(params.alpha_weight.expand(batch, -1, -1), generator, self.min_segment)
            scales: dict[str, Tensor | None] = {}
            for name in SCALE_NAMES:
                dist = params.scale(name)
                if dist is not None:
                    loc, log_std = dist
                    noise = torch.randn((batch, *loc.shape), generator=generator, dtype=DTYPE, device=loc.device)
                    scales[name] = torch.exp(loc + torch.exp(log_std) * noise)
                else:
                    fixed = self._fixed(name)
                    scales[name] = None if fixed is None else fixed.expand(batch, -1, -1).clone()
            sample = TableSample(segments, weights, scales["dir"], scales["time"])
            log_prob = self.log_prob(sample, params)
        if not torch.all(torch.isfinite(log_prob)):
            raise FloatingPointError("DirichletPolicy.sample: non-finite log-probability")
        return sample, log_prob

    def log_prob(self, sample: TableSample, params: PolicyParams | None = None) -> Tensor:
        """``[B]``: sum over intervals of ``ln Dir(segments; alpha_pos) + ln Dir(weights; alpha_w)`` plus, for
        modelled scales, the LogNormal log-densities summed over K; differentiable w.r.t. the policy."""
        params = self.forward() if params is None else params
        device = params.alpha_pos.device
        total = dirichlet_log_prob(params.alpha_pos, sample.segments.to(device, DTYPE)).sum(-1)
        total = total + dirichlet_log_prob(params.alpha_weight, sample.weights.to(device, DTYPE)).sum(-1)
        for name in SCALE_NAMES:
            dist = params.scale(name)
            if dist is None:
                continue
            values = getattr(sample, f"{name}_scales")
            if values is None:
                raise ValueError(f"DirichletPolicy.log_prob: the policy models {name}_scales but the sample has none")
            total = total + lognormal_log_prob(*dist, values.to(device, DTYPE)).sum((-2, -1))
        return total

    def kl_to_base(self, params: PolicyParams | None = None) -> Tensor:
        """Scalar: sum over intervals of ``KL(Dir(alpha)||Dir(alpha_base))`` (positions and weights) plus the
        LogNormal KL of the modelled scales (summed over K), against the fixed base distribution."""
        params = self.forward() if params is None else params
        base = self.base_params()
        kl = dirichlet_kl(params.alpha_pos, base.alpha_pos).sum() + dirichlet_kl(params.alpha_weight,
                                                                                 base.alpha_weight).sum()
        for name in SCALE_NAMES:
            dist, ref = params.scale(name), base.scale(name)
            if dist is not None:
                kl = kl + lognormal_kl(*dist, *ref).sum()
        return kl

    def entropy(self, params: PolicyParams | None = None) -> Tensor:
        """Scalar: summed entropy of every interval's Dirichlets and modelled LogNormals."""
        params = self.forward() if params is None else params
        ent = dirichlet_entropy(params.alpha_pos).sum() + dirichlet_entropy(params.alpha_weight).sum()
        for name in SCALE_NAMES:
            dist = params.scale(name)
            if dist is not None:
                ent = ent + lognormal_entropy(*dist).sum()
        return ent

    # -- export -------------------------------------------------------------------------------------------
    def table(self, kind: str = "mean", eps: float = 1e-6) -> PredictorTable:
        """The policy's point-estimate table.

        ``"mean"``: Dirichlet means (``positions = cumsum(alpha/sum)[:K]``, ``weights = alpha_w/sum``) and LogNormal
        means ``exp(mu + s^2/2)`` (the authors' export, docs/authors-code.md §7.8). ``"mode"``: Dirichlet modes ``(alpha
        - 1)/(sum - n)`` on rows where every alpha > 1 (else that row's mean, listed in
        ``metadata["rdpo"]["mode_fallback_rows"]``) and LogNormal modes ``exp(mu - s^2)``: the joint density is a
        product, so this is the single most likely table in the table's own coordinates. Then sanitized
        (:func:`sanitize_rows`); the start table's grid, solver flags and metadata are kept; scales not modelled are
        carried over unchanged (fixing docs/authors-code.md §9.20, where the authors' export drops scales).
        """
        if kind not in ("mean", "mode"):
            raise ValueError(f"DirichletPolicy.table: kind must be 'mean' or 'mode' (got {kind!r})")
        with torch.no_grad():
            params = self.forward()
        fallback: dict[str, list[int]] = {}

        def point(alpha_t: Tensor, what: str) -> np.ndarray:
            alpha = alpha_t.detach().cpu().double().numpy()
            mean = alpha / alpha.sum(-1, keepdims=True)
            if kind == "mean":
                return mean
            ok = np.all(alpha > 1, axis=-1)
            mode = (alpha - 1) / np.maximum(alpha.sum(-1, keepdims=True) - alpha.shape[-1], 1e-300)
            fallback[what] = [int(i) for i in np.flatnonzero(~ok)]
            return np.where(ok[:, None], mode, mean)

        segments = point(params.alpha_pos, "positions")
        weights = point(params.alpha_weight, "weights")
        scales: dict[str, np.ndarray | None] = {}
        status: dict[str, str] = {}
        for name in SCALE_NAMES:
            dist = params.scale(name)
            if dist is not None:
                loc, log_std = (t.detach().cpu().double().numpy() for t in dist)
                var = np.exp(2 * log_std)
                scales[name] = np.exp(loc + 0.5 * var) if kind == "mean" else np.exp(loc - var)
                status[name] = "sampled"
            else:
                scales[name] = getattr(self.start, f"{name}_scales")
                status[name] = "none" if scales[name] is None else "fixed"
        clean = sanitize_rows(segments_to_positions(segments), weights, scales["dir"], scales["time"], eps=eps)
        weights = clean.weights / clean.weights.sum(-1, keepdims=True)
        info: dict[str, Any] = {
            "kind": kind, "concentration": self.start.concentration,
            "parameterisation": self.start.parameterisation,
            "scale_estimate": "lognormal mean exp(mu + s^2/2)" if kind == "mean" else "lognormal mode exp(mu - s^2)",
            "scales": status, "sanitized_rows": clean.changed,
            "start_replaced_rows": list(self.start.replaced_rows)}
        if kind == "mode":
            info["mode_fallback_rows"] = fallback
        base = self.start.table
        return replace(base, positions=clean.positions, weights=weights, dir_scales=clean.dir_scales,
                       time_scales=clean.time_scales, metadata={**base.metadata, "rdpo": info},
                       source="<rdpo policy>")
