"""Baseline solvers: float64 closed-form checks where diffusers has no scheduler, convergence orders against the
exact reference, and honest evaluation counts. (Parity with diffusers: test_parity_diffusers.py.)"""

import math

import pytest
import torch

from solvers import SOLVERS, EvalCounter, eval_count, get_solver, steps_for_nfe
from solvers.baselines import sample_dpm2, sample_dpmpp, sample_euler, sample_heun, sample_ipndm, sample_unipc
from solvers.core import seeded_noise
from solvers.reference import solve_ode
from solvers.schedules import logsnr_sigmas, polynomial_sigmas

S2 = 0.37


def gaussian_denoiser(x, sigma, cond=None):
    k = S2 / (S2 + sigma.double() ** 2)
    return x * k.view(-1, *([1] * (x.ndim - 1)))


def g(sigma):
    return sigma / (S2 + sigma ** 2)


def noise(batch=4):
    return seeded_noise(range(batch), (1, 8, 8), torch.float64)


SIGMAS = polynomial_sigmas(7, 0.002, 80.0).numpy()


def scalar_run(step):
    factor = 1.0
    for i in range(len(SIGMAS) - 1):
        factor = step(factor, SIGMAS[i], SIGMAS[i + 1], i)
    return factor


def test_euler_heun_dpm2_closed_form():
    x = noise() * 80.0
    euler = scalar_run(lambda f, c, n, i: f * (1 + (n - c) * g(c)))
    heun = scalar_run(lambda f, c, n, i: f * (1 + (n - c) * 0.5 * (g(c) + (1 + (n - c) * g(c)) * g(n))))

    def dpm2(f, c, n, i):
        m = math.sqrt(c * n)
        return f * (1 + (n - c) * (1 + (m - c) * g(c)) * g(m))

    for solver, factor in ((sample_euler, euler), (sample_heun, heun), (sample_dpm2, scalar_run(dpm2))):
        torch.testing.assert_close(solver(gaussian_denoiser, x, SIGMAS), x * factor, rtol=1e-12, atol=0)


@pytest.mark.parametrize("max_order", [1, 2, 3, 4])
def test_ipndm_closed_form(max_order):
    coeffs = {1: [1.0], 2: [1.5, -0.5], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}
    state = {"history": []}

    def step(f, c, n, i):
        d = g(c) * f
        hist = state["history"]
        order = min(max_order, len(hist) + 1)
        ab = sum(cf * v for cf, v in zip(coeffs[order], [d] + hist[::-1]))
        state["history"] = (hist + [d])[-(max_order - 1):] if max_order > 1 else []
        return f + (n - c) * ab

    x = noise() * 80.0
    torch.testing.assert_close(sample_ipndm(gaussian_denoiser, x, SIGMAS, max_order=max_order), x * scalar_run(step),
                               rtol=1e-12, atol=0)


def test_first_order_multistep_is_euler(gmm):
    x = noise() * 80.0
    euler = sample_euler(gmm, x, SIGMAS)
    torch.testing.assert_close(sample_dpmpp(gmm, x, SIGMAS, order=1), euler, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sample_ipndm(gmm, x, SIGMAS, max_order=1), euler, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,order", [("euler", 1), ("heun", 2), ("dpm2", 2), ("dpmpp2m", 2), ("dpmpp3m", 2),
                                        ("unipc", 3), ("unipc3", 3), ("ipndm", 2)])
def test_convergence_order_against_exact_reference(gmm, name, order):
    """Halving the step in log sigma must cut the global error by about 2^order, measured on the smooth GMM from
    sigma 2 to 0.2. Multistep methods warm up with a first-order step whose O(h^2) local error caps the global
    order at 2 (DPM-Solver++(3M), iPNDM); UniPC's corrector lifts every step by one order, so it reaches 3.
    (The 3M formula itself is checked step by step against diffusers in test_parity_diffusers.py.)"""
    x = noise(8) * 2.0
    reference = solve_ode(gmm, x, 2.0, [0.2], rtol=1e-11, atol=1e-11)["states"][0.2]
    errors = []
    for steps in (16, 32):
        sig = logsnr_sigmas(steps + 1, 0.2, 2.0)
        out = get_solver(name)(gmm, x, sig, lower_order_final=False) if name.startswith(("dpmpp", "unipc")) \
            else get_solver(name)(gmm, x, sig)
        errors.append(float((out - reference).abs().max()))
    measured = math.log2(errors[0] / errors[1])
    assert measured > order - 0.35, f"{name}: observed order {measured:.2f}, expected about {order}"


@pytest.mark.parametrize("name", sorted(SOLVERS))
@pytest.mark.parametrize("afs,terminal_zero", [(False, False), (True, False), (False, True)])
def test_static_eval_count_matches_measured(gmm, name, afs, terminal_zero):
    sig = polynomial_sigmas(6, 0.002, 80.0, terminal_zero=terminal_zero)
    counter = EvalCounter(gmm, 3)
    out = get_solver(name)(counter, noise(3) * 80.0, sig, afs=afs)
    assert torch.isfinite(out).all()
    assert counter.count == eval_count(name, sig, afs=afs)


@pytest.mark.parametrize("name", ["euler", "heun", "dpm2", "ipndm", "dpmpp3m", "unipc"])
@pytest.mark.parametrize("nfe", [3, 4, 5, 9, 10])
def test_steps_for_nfe_gives_exact_nfe(gmm, name, nfe):
    steps, afs = steps_for_nfe(name, nfe)
    counter = EvalCounter(gmm, 1)
    get_solver(name)(counter, noise(1) * 80.0, polynomial_sigmas(steps + 1, 0.002, 80.0), afs=afs)
    assert counter.calls == nfe


def test_steps_to_zero_are_finite_for_every_multistep_setting(gmm):
    sig = polynomial_sigmas(6, 0.002, 80.0, terminal_zero=True)
    x = noise(2) * 80.0
    for order in (2, 3):
        for lof in (True, False):
            assert torch.isfinite(sample_dpmpp(gmm, x, sig, order=order, lower_order_final=lof)).all()
            assert torch.isfinite(sample_unipc(gmm, x, sig, order=order, lower_order_final=lof)).all()


def test_registry_aliases_and_errors():
    assert get_solver("ddim").name == "euler" and get_solver("dpm").name == "dpm2" and get_solver("EDM").name == "heun"
    with pytest.raises(KeyError, match="unknown solver"):
        get_solver("plms")
    with pytest.raises(KeyError, match="predictor table"):
        get_solver("epd")
    with pytest.raises(ValueError, match="decrease"):
        sample_euler(gaussian_denoiser, noise(1), [1.0, 2.0])
    with pytest.raises(ValueError, match="order"):
        sample_dpmpp(gaussian_denoiser, noise(1), SIGMAS, order=4)


def test_afs_first_step_uses_no_network_call():
    calls = []

    def spy(x, sigma, cond=None):
        calls.append(float(sigma[0]))
        return gaussian_denoiser(x, sigma)

    x = noise(1) * 80.0
    sample_euler(spy, x, SIGMAS, afs=True)
    assert calls[0] == pytest.approx(SIGMAS[1])                 # the first evaluation at sigma_0 was analytic
    expected = x * (1 + (SIGMAS[1] - SIGMAS[0]) / math.sqrt(1 + SIGMAS[0] ** 2))
    first = sample_euler(gaussian_denoiser, x, SIGMAS[:2], afs=True)
    torch.testing.assert_close(first, expected)
