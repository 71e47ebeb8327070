"""Sigma grids: the authors' variants reproduce their numbers (docs/authors-code.md §3.1), the correct ones fix
§9.7-9.9 of that document."""

import numpy as np
import pytest
import torch

from solvers.schedules import (ScheduleSpec, VPDiscreteMap, discrete_sigmas, flowmatch_sigmas, flux_mu,
                               logsnr_sigmas, make_sigmas, polynomial_sigmas, sd15_alphas_cumprod,
                               time_uniform_sigmas)

EDM = (0.002, 80.0)


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
    np.testing.assert_allclose(discrete_sigmas(11, variant="correct").numpy(), got, rtol=1e-12)
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
