"""Sigma grids: the authors' variants reproduce their numbers (docs/authors-code.md §3.1), the correct ones fix
§9.7-9.9 of that document."""

import bisect
import math
from pathlib import Path

import mpmath
import numpy as np
import pytest
import torch

from solvers import schedules
from solvers.official import read_official
from solvers.schedules import (ScheduleSpec, VPDiscreteMap, beta_alphas_cumprod, discrete_sigmas, flowmatch_sigmas,
                               flux_mu, logsnr_sigmas, make_sigmas, polynomial_sigmas, sd15_alphas_cumprod,
                               time_uniform_sigmas)

EDM = (0.002, 80.0)
ICCV = Path(__file__).resolve().parents[2] / "shared" / "official" / "iccv"
needs_iccv = pytest.mark.skipif(not ICCV.is_dir(), reason=f"the authors' ICCV tables are not at {ICCV}")
#: What the ICCV LSUN files record as sigma_min, sigma_max: the LDM noise map's float32 sigma(1e-3), sigma(1).
LSUN = (0.03875904902815819, 83.82247924804688)


# -- an independent float32: mpmath at 24 bits rounds every operation once, as IEEE float32 does --------------------
F32 = mpmath.MPContext()
F32.prec = 24


def _f(value) -> mpmath.mpf:
    """A Python/numpy number cast to float32 (as torch.tensor(value) does), as an exact 24-bit mpf."""
    return F32.mpf(float(np.float32(value)))


def _authors_time_uniform(n: int, sigma_min: float, sigma_max: float, eps: float = 1e-3) -> np.ndarray:
    """The authors' time_uniform grid written out in float32 (docs/authors-code.md §3.1): ``np.log`` of
    ``s**2 + 1``, the fit, ``tau = 1 + i/(n-1) (eps - 1)`` and ``(np.e ** x - 1) ** 0.5``, where ``np.e ** x`` of
    a float32 tensor is pow(float32(e), x)."""
    one = F32.mpf(1)
    log_min = F32.log(_f(sigma_min) * _f(sigma_min) + one)
    log_max = F32.log(_f(sigma_max) * _f(sigma_max) + one)
    beta_d = 2 * (log_min / _f(eps) - log_max) / _f(eps - 1)
    beta_min = log_max - F32.mpf(0.5) * beta_d
    out = []
    for i in range(n):
        tau = one + F32.mpf(i) / F32.mpf(n - 1) * _f(eps - 1)
        x = F32.mpf(0.5) * beta_d * (tau * tau) + beta_min * tau
        out.append(float(F32.sqrt(F32.power(_f(math.e), x) - one)))
    return np.array(out, dtype=np.float32)


class _AuthorsNoiseMap:
    """The authors' CFGPrecond sigma / sigma_inv (docs/authors-code.md §5.1) in 24-bit arithmetic; time keys from
    their own call, ``torch.linspace(0., 1., M + 1)[1:]`` in float32."""

    def __init__(self, alphas_cumprod_f32: np.ndarray):
        self.log_alpha = [F32.mpf(0.5) * F32.log(_f(a)) for a in alphas_cumprod_f32]
        self.t_keys = [F32.mpf(v) for v in torch.linspace(0., 1., len(alphas_cumprod_f32) + 1)[1:].tolist()]

    @staticmethod
    def _interp(x, xs, ys):
        j = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)     # end segments extrapolate
        return ys[j - 1] + (x - xs[j - 1]) * (ys[j] - ys[j - 1]) / (xs[j] - xs[j - 1])

    def sigma(self, t):
        log_alpha = self._interp(t, self.t_keys, self.log_alpha)
        return F32.sqrt(1 - F32.exp(2 * log_alpha)) / F32.exp(log_alpha)

    def sigma_inv(self, sigma):
        b = 2 * F32.log(sigma)                                     # -2 * lamb with lamb = -log(sigma)
        log_alpha = F32.mpf(-0.5) * (max(F32.mpf(0), b) + F32.log1p(F32.exp(-abs(-b))))   # torch.logaddexp(0, b)
        return self._interp(log_alpha, self.log_alpha[::-1], self.t_keys[::-1])

    def discrete(self, n: int) -> np.ndarray:
        t_min, t_max = self.sigma_inv(self.sigma(_f(1e-3))), self.sigma_inv(self.sigma(F32.mpf(1)))
        return np.array([float(self.sigma(t_max + F32.mpf(i) / F32.mpf(n - 1) * (t_min - t_max)))
                         for i in range(n)], dtype=np.float32)


def _ldm_alphas_cumprod(beta_start: float, beta_end: float) -> np.ndarray:
    """LDM's register_schedule: betas = torch.linspace(sqrt b0, sqrt b1, 1000, float64)**2, cumprod, float32 buffer."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).to(torch.float32).numpy()


@pytest.mark.parametrize("n,expected", [
    (3, [80, 2.82371, 0.0020132]),
    (4, [80, 6.95028, 1.28668, 0.0020132]),
    (5, [80, 11.7343, 2.82371, 0.856473, 0.0020132]),
    (6, [80, 16.5063, 4.74637, 1.75413, 0.650225, 0.0020132]),
])
def test_time_uniform_official_matches_authors_grids(n, expected):
    got = time_uniform_sigmas(n, *EDM, rho=1.0, variant="official").numpy()
    np.testing.assert_allclose(got, expected, rtol=2e-5)


def test_time_uniform_official_lsun():
    got = time_uniform_sigmas(4, 0.0387590, 83.8225, variant="official").numpy()
    np.testing.assert_allclose(got, [83.8225, 8.40799, 1.65677, 0.0387592], rtol=2e-5)


@pytest.mark.parametrize("sigma_range", [EDM, LSUN], ids=["edm", "lsun"])
@pytest.mark.parametrize("n", range(3, 13))
def test_time_uniform_official_is_the_authors_float32_arithmetic(sigma_range, n):
    got = time_uniform_sigmas(n, *sigma_range, variant="official")
    expected = _authors_time_uniform(n, *sigma_range)
    assert got.dtype == torch.float64
    assert torch.equal(got, torch.from_numpy(expected).double())
    # their e ** x is not exp(x): the top of the grid shows it (80 exactly versus 80 + 1 ulp)
    assert float(got[0]) == float(np.float32(80.0 if sigma_range == EDM else 83.82247161865234))


@needs_iccv
def test_time_uniform_official_equals_every_released_iccv_grid():
    files = sorted(ICCV.glob("*.pkl"))
    assert len(files) == 32
    for path in files:
        loss = read_official(path).loss_fn.state
        stored = np.asarray(loss["t_steps"])
        assert stored.dtype == np.float32
        assert loss["schedule_type"] == "time_uniform" and loss["schedule_rho"] == 1.0
        assert (loss["sigma_min"], loss["sigma_max"]) in (EDM, LSUN), path.name
        got = time_uniform_sigmas(loss["num_steps"], loss["sigma_min"], loss["sigma_max"], loss["schedule_rho"],
                                  variant="official").numpy()
        assert np.array_equal(got, stored.astype(np.float64)), path.name
        assert np.array_equal(_authors_time_uniform(loss["num_steps"], loss["sigma_min"], loss["sigma_max"]), stored)


def test_lsun_range_is_the_float32_noise_map_of_the_ldm():
    """The LSUN files' sigma_min, sigma_max are the LDM map's float32 sigma(1e-3), sigma(1) (linear 0.0015..0.0195
    in LDM's sense: squared linspace of square roots)."""
    ac = _ldm_alphas_cumprod(0.0015, 0.0195)
    assert np.array_equal(beta_alphas_cumprod("scaled_linear", 0.0015, 0.0195), ac)
    theirs = _AuthorsNoiseMap(ac)
    assert (float(theirs.sigma(_f(1e-3))), float(theirs.sigma(F32.mpf(1)))) == LSUN
    ours = schedules._AuthorsVPMap32(ac)
    assert (float(ours.sigma(1e-3)[0]), float(ours.sigma(1.0)[0])) == LSUN
    assert np.array_equal(ours.t_keys, torch.linspace(0., 1., 1001)[1:].numpy())


def test_discrete_official_is_the_authors_float32_arithmetic():
    ac = _ldm_alphas_cumprod(0.00085, 0.012)
    assert np.array_equal(sd15_alphas_cumprod(), ac)
    theirs = _AuthorsNoiseMap(ac)
    for n in range(2, 52):
        got = discrete_sigmas(n, variant="official")
        assert got.dtype == torch.float64
        assert torch.equal(got, torch.from_numpy(theirs.discrete(n)).double()), n
    lsun = _ldm_alphas_cumprod(0.0015, 0.0195)
    for n in (3, 6, 11):
        got = discrete_sigmas(n, alphas_cumprod=lsun, variant="official").numpy()
        assert np.array_equal(got, _AuthorsNoiseMap(lsun).discrete(n).astype(np.float64)), n
    # the correct variant stays float64: it differs from the float32 grid by float32 roundings only
    correct = discrete_sigmas(51, variant="correct").numpy()
    official = discrete_sigmas(51, variant="official").numpy()
    assert not np.array_equal(correct, official)
    np.testing.assert_allclose(official, correct, rtol=5e-6)


def test_time_uniform_correct_hits_sigma_min_exactly():
    got = time_uniform_sigmas(6, *EDM, variant="correct").numpy()
    assert got[0] == pytest.approx(80.0, rel=1e-12)
    # the float32 refit gives 0.0020132 (docs/authors-code.md §9.8)
    assert got[-1] == pytest.approx(0.002, rel=1e-10)
    official = time_uniform_sigmas(6, *EDM, variant="official").numpy()
    assert abs(official[-1] / got[-1] - 1) > 5e-3


def test_discrete_sd15_grid_and_range():
    got = discrete_sigmas(11, variant="official").numpy()
    expected = [14.6146, 8.30717, 5.09241, 3.32507, 2.27973, 1.61558, 1.16287, 0.831885, 0.571190, 0.343706, 0.0291675]
    np.testing.assert_allclose(got, expected, rtol=2e-5)
    vp = VPDiscreteMap(sd15_alphas_cumprod())
    assert vp.sigma_min == pytest.approx(0.0291675, rel=1e-5)
    assert vp.sigma_max == pytest.approx(14.6146, rel=1e-5)
    # rho = 1: both variants agree; rho != 1: the authors' form applies rho to one end only (docs/authors-code.md §9.7).
    np.testing.assert_allclose(discrete_sigmas(11, variant="correct").numpy(), got, rtol=1e-6)   # float32 official
    # With the model's own range t_max = 1 and 1^(1/rho) = 1, so the bug only shows for a smaller sigma_max.
    wrong = discrete_sigmas(8, sigma_max=10.0, rho=3.0, variant="official").numpy()
    right = discrete_sigmas(8, sigma_max=10.0, rho=3.0, variant="correct").numpy()
    assert right[0] == pytest.approx(10.0, rel=1e-9) and right[-1] == pytest.approx(vp.sigma_min, rel=1e-9)
    assert wrong[0] != pytest.approx(10.0, rel=1e-3)
    assert np.max(np.abs(wrong / right - 1)) > 1e-2


def test_vp_map_timesteps_are_exact_at_keypoints():
    ac = sd15_alphas_cumprod()
    vp = VPDiscreteMap(ac)
    sig = torch.tensor(np.sqrt((1 - ac.astype(np.float64)) / ac.astype(np.float64)))
    steps = vp.timestep(sig).numpy()
    np.testing.assert_allclose(steps, np.arange(1000), atol=1e-6)
    t = np.linspace(0.0005, 1.2, 50)      # includes linear extrapolation on both sides
    np.testing.assert_allclose(vp.sigma_inv(vp.sigma(t)), t, rtol=1e-9, atol=1e-12)


def test_flowmatch_official_sd3_and_flux_values():
    sd3 = flowmatch_sigmas(11, shift=3.0, variant="official").numpy()
    np.testing.assert_allclose(sd3, [1, 0.964400, 0.923343, 0.875467, 0.818923, 0.751121, 0.668327, 0.564950,
                                     0.432225, 0.255589, 0.0089286], rtol=2e-5)
    flux = flowmatch_sigmas(9, mu=1.15, variant="official").numpy()
    np.testing.assert_allclose(flux, [1, 0.956771, 0.904646, 0.840563, 0.759876, 0.655169, 0.513842, 0.312612,
                                      0.0031514], rtol=2e-5)
    assert flux_mu((128 // 2) ** 2) == pytest.approx(1.15)


@pytest.mark.parametrize("config,kwargs", [
    (dict(shift=3.0), dict(shift=3.0)),
    (dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15), dict(mu=1.15)),
])
def test_flowmatch_official_equals_diffusers_set_timesteps(config, kwargs):
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **config)
    scheduler.set_timesteps(9, mu=kwargs.get("mu"))
    theirs = scheduler.sigmas.double().numpy()[:-1]           # the authors drop the terminal 0
    ours = flowmatch_sigmas(9, variant="official", **kwargs).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-7)


def test_flowmatch_correct_shifts_once():
    got = flowmatch_sigmas(11, shift=3.0).numpy()
    assert got[0] == pytest.approx(1.0) and got[-1] == pytest.approx(3 * 0.001 / (1 + 2 * 0.001), rel=1e-12)
    tau = got / (3.0 - 2.0 * got)                               # unshift: must be evenly spaced
    np.testing.assert_allclose(np.diff(tau), np.diff(tau)[0], rtol=1e-9)
    zero = flowmatch_sigmas(11, shift=3.0, terminal_zero=True).numpy()
    assert len(zero) == 12 and zero[-1] == 0.0


def test_polynomial_and_logsnr():
    poly = polynomial_sigmas(6, *EDM, rho=7.0).numpy()
    assert poly[0] == pytest.approx(80.0) and poly[-1] == pytest.approx(0.002)
    roots = poly ** (1 / 7)
    np.testing.assert_allclose(np.diff(roots), np.diff(roots)[0], rtol=1e-9)
    log = logsnr_sigmas(5, *EDM).numpy()
    np.testing.assert_allclose(np.diff(np.log(log)), np.diff(np.log(log))[0], rtol=1e-12)
    edm = polynomial_sigmas(6, *EDM, terminal_zero=True)
    assert edm.shape == (7,) and edm[-1] == 0 and edm.dtype == torch.float64


def test_spec_round_trip_and_errors():
    spec = ScheduleSpec(kind="time_uniform", num_steps=5, sigma_min=0.002, sigma_max=80.0, rho=1.0, variant="official")
    assert ScheduleSpec.from_dict(spec.to_dict()) == spec
    np.testing.assert_array_equal(make_sigmas(spec).numpy(), time_uniform_sigmas(5, *EDM, variant="official").numpy())
    with pytest.raises(ValueError, match="num_steps"):
        polynomial_sigmas(1, *EDM)
    with pytest.raises(ValueError, match="sigma_min"):
        polynomial_sigmas(4, 80.0, 0.002)
    with pytest.raises(ValueError, match="unknown schedule"):
        make_sigmas(ScheduleSpec(kind="cosine"))
    with pytest.raises(ValueError, match="variant"):
        time_uniform_sigmas(4, *EDM, variant="legacy")
