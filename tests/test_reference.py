"""The reference ODE solver is accurate where the answer is known in closed form."""

import math

import pytest
import torch

from solvers.reference import reference_solution, solve_ode

S2 = 0.37


def gaussian_denoiser(x, sigma, cond=None):
    return x * (S2 / (S2 + sigma ** 2)).view(-1, 1, 1, 1)


def test_exact_solution_of_the_gaussian_ode():
    """For N(0, S2 I) data, x(sigma) = x_T sqrt((S2 + sigma^2) / (S2 + sigma_T^2))."""
    x = torch.randn(5, 1, 4, 4, dtype=torch.float64) * 80
    result = solve_ode(gaussian_denoiser, x, 80.0, [0.002, 1.0, 10.0], rtol=1e-10, atol=1e-10)
    assert sorted(result["states"]) == [0.002, 1.0, 10.0]
    for sigma, state in result["states"].items():
        exact = x * math.sqrt((S2 + sigma ** 2) / (S2 + 80.0 ** 2))
        assert float((state - exact).abs().max() / exact.abs().max()) < 1e-8


def test_report_checks_its_own_convergence(gmm):
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64) * 80
    report = reference_solution(gmm, x, 80.0, [0.002], rtol=1e-6)
    info = report.as_dict()
    assert info["rtol"] == pytest.approx(1e-8) and info["check_rtol"] == 1e-6
    assert 0 < info["check_max_abs_diff"] < 1e-3 and info["evals"] > 0
    with pytest.raises(ValueError):
        solve_ode(gmm, x, 1.0, [2.0])
