"""The EPD step and sampler (docs/authors-code.md §1.1) and the iPNDM plugin (docs/authors-code.md §4)."""

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from solvers import EvalCounter, sample_epd, sample_heun
from solvers.core import analytic_denoised, repeat_condition, seeded_noise
from solvers.epd import adams_bashforth, epd_step
from solvers.plan import StepPlan, TableRows
from solvers.schedules import polynomial_sigmas
from solvers.table import PredictorTable, uniform_table

S2 = 0.37  # data variance of the linear Gaussian test model


def gaussian_denoiser(x, sigma, cond=None):
    """Exact denoiser of N(0, S2 I): D = S2 / (S2 + sigma^2) x."""
    k = S2 / (S2 + sigma.double() ** 2)
    return x * k.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)


def g(sigma):  # d(x, sigma) = g(sigma) x for the Gaussian model
    return sigma / (S2 + sigma ** 2)


def random_table(n_steps=6, k=3, seed=0, scales=True, solver="epd", max_order=None, afs=False, fcn=False):
    rng = np.random.default_rng(seed)
    sig = polynomial_sigmas(n_steps, 0.002, 80.0).numpy()
    rows = n_steps - 1
    w = rng.random((rows, k)) + 0.1
    return PredictorTable(positions=rng.uniform(0.05, 0.95, (rows, k)), weights=w / w.sum(-1, keepdims=True),
                          sigmas=sig, dir_scales=rng.uniform(0.95, 1.05, (rows, k)) if scales else None,
                          time_scales=rng.uniform(0.9, 1.1, (rows, k)) if scales else None, solver=solver,
                          max_order=max_order, afs=afs, fcn=fcn)


def noise(batch=5):
    return seeded_noise(range(batch), (1, 8, 8), torch.float64)


@pytest.mark.parametrize("solver,max_order", [("epd", None), ("ipndm", 3)])
def test_parallel_equals_sequential_with_cfg_scales_and_labels(gmm, solver, max_order):
    from backends.analytic import make_analytic

    guided = make_analytic("gmm", guidance=2.5)
    table = random_table(solver=solver, max_order=max_order, afs=True, fcn=True)
    # class labels repeated for the K points (docs/authors-code.md §9.1 fixed)
    labels = torch.tensor([3, -1, 7, 0, 9])
    x = noise() * 80.0
    parallel = sample_epd(guided, x, table, labels, parallel=True)
    sequential = sample_epd(guided, x, table, labels, parallel=False)
    assert torch.isfinite(parallel).all()
    torch.testing.assert_close(parallel, sequential, rtol=1e-12, atol=1e-12)
    # and the labels matter (the condition really reaches the K points)
    assert (sample_epd(guided, x, table, None) - parallel).abs().max() > 1e-3


def test_one_batched_call_per_step_and_counts():
    table = random_table(n_steps=6, k=3, scales=False)
    counter = EvalCounter(gaussian_denoiser, batch_size=4)
    sample_epd(counter, noise(4) * 80.0, table)
    assert counter.calls == 2 * 5                       # one at t_c, one batched call for the K points
    assert counter.items == 4 * (1 + 3) * 5
    assert counter.count == table.eval_count()
    afs = EvalCounter(gaussian_denoiser, batch_size=4)
    sample_epd(afs, noise(4) * 80.0, table, afs=True, denoise_to_zero=True)
    assert afs.calls == 2 * 5 - 1 + 1
    assert afs.count == random_table(n_steps=6, k=3, scales=False, afs=True).eval_count(denoise_to_zero=True)


def test_closed_form_on_linear_gaussian():
    """EPD on D = k(sigma) x is a scalar recursion; compute it independently in plain floats."""
    table = random_table(n_steps=5, k=2, scales=True)
    x0 = noise(3) * 80.0
    ours = sample_epd(gaussian_denoiser, x0, table)
    factor = 1.0
    sig = table.sigmas
    for i in range(len(sig) - 1):
        t_c, t_n = sig[i], sig[i + 1]
        total = 0.0
        for k in range(2):
            r, w = table.positions[i, k], table.weights[i, k]
            c, a = table.dir_scales[i, k], table.time_scales[i, k]
            t_k = t_n ** r * t_c ** (1 - r)
            peek = 1 + (t_k - t_c) * g(t_c)                          # x_k = peek * x
            d_k = peek * (1 - S2 / (S2 + (a * t_k) ** 2)) / t_k     # (x_k - D(x_k, a t_k)) / t_k, per unit x
            total += w * c * d_k
        factor *= 1 + (t_n - t_c) * total
    torch.testing.assert_close(ours, x0 * factor, rtol=1e-12, atol=0)


def test_plugin_closed_form_and_order_one_is_plain_epd():
    table = random_table(n_steps=6, k=2, scales=False, solver="ipndm", max_order=3)
    x0 = noise(2) * 80.0
    ours = sample_epd(gaussian_denoiser, x0, table)
    coeffs = {1: [1.0], 2: [1.5, -0.5], 3: [23 / 12, -16 / 12, 5 / 12]}
    factor, history = 1.0, []   # history of g(t_c) * (current factor): directions per unit initial x
    sig = table.sigmas
    for i in range(len(sig) - 1):
        t_c, t_n = sig[i], sig[i + 1]
        d_c = g(t_c) * factor
        order = min(3, len(history) + 1)
        ab = sum(cf * d for cf, d in zip(coeffs[order], [d_c] + history[::-1]))
        total = 0.0
        for k in range(2):
            t_k = t_n ** table.positions[i, k] * t_c ** (1 - table.positions[i, k])
            total += table.weights[i, k] * (factor + (t_k - t_c) * ab) * g(t_k)
        factor = factor + (t_n - t_c) * total
        history = (history + [d_c])[-2:]
    torch.testing.assert_close(ours, x0 * factor, rtol=1e-12, atol=0)
    plain = random_table(n_steps=6, k=2, scales=False)
    order_one = PredictorTable(positions=plain.positions, weights=plain.weights, sigmas=plain.sigmas,
                               solver="ipndm", max_order=1)
    torch.testing.assert_close(sample_epd(gaussian_denoiser, x0, order_one), sample_epd(gaussian_denoiser, x0, plain))


def test_endpoint_positions_reduce_to_heun(gmm):
    """r -> (0, 1) with equal weights: the two directions are d(t_c) and d at the Euler point, i.e. Heun."""
    sig = polynomial_sigmas(7, 0.002, 80.0).numpy()
    table = uniform_table(sig, 2, positions=(1e-12, 1 - 1e-12))
    x = noise(6) * 80.0
    torch.testing.assert_close(sample_epd(gmm, x, table), sample_heun(gmm, x, sig), rtol=1e-8, atol=1e-8)


def test_per_sample_tables_match_individual_runs(gmm):
    table = random_table(n_steps=5, k=2)
    other = random_table(n_steps=5, k=2, seed=1)
    x = noise(2) * 80.0
    t_c, t_n = float(table.sigmas[0]), float(table.sigmas[1])
    d_cur = (x - gmm(x, torch.full((2,), t_c, dtype=torch.float64))) / t_c
    stacked = lambda name: torch.tensor(np.stack([getattr(table, name)[0], getattr(other, name)[0]]))
    both = epd_step(gmm, x, t_c, t_n, TableRows(stacked("positions"), stacked("weights"), stacked("dir_scales"),
                                                stacked("time_scales")), d_cur=d_cur)
    for b, tab in enumerate((table, other)):
        one = epd_step(gmm, x[b:b + 1], t_c, t_n, StepPlan.from_table(tab).rows[0], d_cur=d_cur[b:b + 1])
        torch.testing.assert_close(both[b:b + 1], one, rtol=1e-12, atol=1e-12)


def test_fcn_drops_direction_scales_on_last_step():
    table = random_table(n_steps=4, k=2, fcn=True)
    dir_scales = table.dir_scales.copy()
    dir_scales[-1] = 1.0
    same = PredictorTable(positions=table.positions, weights=table.weights, sigmas=table.sigmas, dir_scales=dir_scales,
                          time_scales=table.time_scales)
    x = noise(2) * 80.0
    torch.testing.assert_close(sample_epd(gaussian_denoiser, x, table), sample_epd(gaussian_denoiser, x, same))


def test_afs_estimates():
    x = noise(2)
    sigma = torch.tensor(3.0, dtype=torch.float64)
    d = (x - analytic_denoised(x, sigma)) / sigma
    torch.testing.assert_close(d, x / math.sqrt(1 + 9.0))                 # authors' formula, docs/authors-code.md §1.3
    assert analytic_denoised(x, 1.0, flow=True).abs().max() == 0          # flow: data-mean estimate, d = x


def test_denoise_to_zero_and_bad_grids(gmm):
    table = random_table(n_steps=4, k=2, scales=False)
    x = noise(2) * 80.0
    counter = EvalCounter(gmm, 2)
    out = sample_epd(counter, x, table, denoise_to_zero=True)
    before = sample_epd(gmm, x, table)
    torch.testing.assert_close(out, gmm(before, torch.full((2,), float(table.sigmas[-1]), dtype=torch.float64)))
    with pytest.raises(ValueError, match="sigma_next > 0"):
        epd_step(gmm, x, 1.0, 0.0, TableRows([0.3, 0.7], [0.5, 0.5]), d_cur=x)

    @dataclass
    class Short:
        positions = np.full((2, 2), 0.5)
        weights = np.full((2, 2), 0.5)
        dir_scales = None
        time_scales = None
        sigmas = np.array([80.0, 1.0, 0.1, 0.002])
        solver = "epd"
        afs = False
        fcn = False
        max_order = None

    with pytest.raises(ValueError, match="rows"):
        sample_epd(gmm, x, Short())


def test_repeat_condition_orders_rows_b_major():
    labels = torch.tensor([4, 7])
    assert repeat_condition(labels, 3).tolist() == [4, 4, 4, 7, 7, 7]
    emb = torch.arange(6.0).view(2, 3)
    assert torch.equal(repeat_condition({"emb": emb, "scale": 3.5}, 2)["emb"], emb[[0, 0, 1, 1]])
    assert repeat_condition({"emb": emb, "scale": 3.5}, 2)["scale"] == 3.5
    assert repeat_condition(["a", "b"], 2) == ["a", "a", "b", "b"]
    assert repeat_condition(None, 4) is None

    @dataclass
    class Cond:
        embeds: torch.Tensor
        ids: torch.Tensor = None
        guidance: float = 3.5

        def repeat_interleave(self, n):      # a backend condition that knows its own batch axes
            return Cond(self.embeds.repeat_interleave(n, 0), self.ids, self.guidance)

    ids = torch.zeros(5, 3)
    out = repeat_condition(Cond(emb, ids), 2)
    assert out.embeds.shape == (4, 3) and out.ids is ids and out.guidance == 3.5


def test_adams_bashforth_coefficients_are_consistent():
    d = torch.ones(1)
    for order in range(1, 5):
        history = [torch.ones(1)] * (order - 1)
        assert float(adams_bashforth(d, history, order)) == pytest.approx(1.0)   # coefficients sum to 1
    with pytest.raises(ValueError):
        adams_bashforth(d, [], 5)


def test_official_iccv_tables_run_on_the_analytic_model(gmm):
    from pathlib import Path

    from solvers.table import load_table

    root = Path(__file__).resolve().parents[2] / "shared" / "official" / "iccv"
    if not root.is_dir():
        pytest.skip("../shared/official is not beside this checkout")
    x = noise(3) * 80.0
    for name in ("00002-cifar10-4-5-epd-uni1.0-afs.pkl", "00018-cifar10-4-5-ipndm-uni1.0-afs.pkl"):
        table = load_table(root / name)
        counter = EvalCounter(gmm, 3)
        out = sample_epd(counter, x, table)
        assert torch.isfinite(out).all() and counter.calls == 5      # NFE 5 with AFS (docs/authors-code.md §1.2)
        torch.testing.assert_close(out, sample_epd(gmm, x, table, parallel=False), rtol=1e-12, atol=1e-12)
