"""Cold start and residual Dirichlet policy of RDPO (docs/authors-code.md §7.1, 7.2, 7.6, 7.8)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributions import Dirichlet, LogNormal

from solvers.plan import StepPlan
from solvers.table import PredictorTable, load_table, save_table, uniform_table
from training.ppo.cold_start import (ColdStart, cold_start, positions_to_segments, sanitize_rows,
                                     segments_to_positions)
from training.ppo.policy import (DirichletPolicy, TableSample, dirichlet_kl, dirichlet_log_prob, lognormal_kl,
                                 lognormal_log_prob)

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "exps" / "digits" / "epd-nfe5.pkl"
OFFICIAL = Path(__file__).resolve().parents[2] / "shared" / "official" / "tpami"   # beside the checkout
SIGMAS = np.array([80.0, 20.0, 5.0, 1.0, 0.2])


def digits_table() -> PredictorTable:
    if not DIGITS.is_file():
        pytest.skip(f"missing {DIGITS}")
    return load_table(DIGITS)


def official(name: str) -> PredictorTable:
    path = OFFICIAL / name
    if not path.is_file():
        pytest.skip(f"missing {path}")
    return load_table(path)


def perturb(policy: DirichletPolicy, scale: float = 0.3, seed: int = 0) -> DirichletPolicy:
    """Move the policy away from its base by a random head bias."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        policy.head.bias.copy_(scale * torch.randn(policy.head.bias.shape, generator=g))
    return policy


# -- cold start ---------------------------------------------------------------------------------------------
def test_segments_round_trip_numpy_and_torch():
    rng = np.random.default_rng(0)
    pos = np.sort(rng.uniform(0.01, 0.99, size=(5, 3)), axis=-1)
    seg = positions_to_segments(pos)
    assert seg.shape == (5, 4) and np.allclose(seg.sum(-1), 1)
    assert np.allclose(segments_to_positions(seg), pos, atol=1e-15)
    t = torch.tensor(pos)
    seg_t = positions_to_segments(t)
    assert isinstance(seg_t, torch.Tensor) and seg_t.shape == (5, 4)
    assert torch.allclose(segments_to_positions(seg_t), t, atol=1e-15)
    assert np.allclose(seg_t.numpy(), seg)
    # batched leading axes
    assert positions_to_segments(torch.rand(2, 5, 3).sort(-1).values).shape == (2, 5, 4)


def test_sanitize_sorts_permutes_and_clips():
    pos = np.array([[0.7, 0.2], [0.3, 0.3], [0.2, 0.6], [0.0, 1.0]])
    w = np.array([[0.9, 0.1], [0.5, 0.5], [0.4, 0.6], [0.3, 0.7]])
    c = np.array([[1.1, 0.9], [1.0, 1.0], [1.2, 0.8], [1.0, 1.0]])
    a = np.array([[2.0, 3.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    out = sanitize_rows(pos, w, c, a, eps=1e-6)
    assert np.allclose(out.positions[0], [0.2, 0.7]) and np.allclose(out.weights[0], [0.1, 0.9])
    assert np.allclose(out.dir_scales[0], [0.9, 1.1]) and np.allclose(out.time_scales[0], [3.0, 2.0])
    assert np.allclose(out.positions[1], [0.3, 0.3 + 1e-6], atol=1e-15)  # tie: pushed right by eps
    assert np.array_equal(out.positions[2], pos[2])  # untouched
    assert np.allclose(out.positions[3], [1e-6, 1 - 1e-6], atol=1e-15)  # clipped into (0, 1)
    assert out.changed == 3
    assert np.all(np.diff(out.positions, axis=-1) > 0) and np.all((out.positions > 0) & (out.positions < 1))
    # right end: r_k <= 1 - eps (K - k + 1)
    crowd = sanitize_rows([[0.9999999, 0.99999995, 1.0]], [[0.2, 0.3, 0.5]], eps=1e-6)
    assert np.allclose(crowd.positions, [[1 - 3e-6, 1 - 2e-6, 1 - 1e-6]], atol=1e-15)
    assert crowd.dir_scales is None and crowd.time_scales is None
    np.testing.assert_array_equal(pos[0], [0.7, 0.2])  # input not modified
    with pytest.raises(ValueError, match="shape"):
        sanitize_rows(pos, w[:, :1])
    with pytest.raises(ValueError, match="NaN"):
        sanitize_rows([[0.1, np.nan]], [[0.5, 0.5]])


def test_cold_start_flux_example():
    table = uniform_table(SIGMAS, num_points=2, positions=(0.335, 0.665))
    start = cold_start(table, concentration=10.0)
    assert np.allclose(start.alpha_pos, np.tile([3.35, 3.30, 3.35], (4, 1)), atol=1e-12)
    assert np.allclose(start.alpha_weight, 5.0, atol=1e-12)
    assert start.replaced_rows == () and start.sanitized_rows == 0
    assert start.dir_scales is None and start.time_scales is None
    assert start.parameterisation == "mean" and start.concentration == 10.0
    assert np.allclose(start.table.positions, table.positions, atol=1e-15)
    mode = cold_start(table, concentration=10.0, parameterisation="mode")
    assert np.allclose(mode.alpha_pos, 1 + np.array([3.35, 3.30, 3.35]), atol=1e-12)
    assert np.allclose(mode.alpha_weight, 6.0, atol=1e-12)


def test_cold_start_official_tables():
    flux = official("flux-start.pkl")
    start = cold_start(flux, concentration=10.0)
    assert np.allclose(start.alpha_pos, [3.35, 3.30, 3.35], atol=1e-9)
    assert np.allclose(start.alpha_weight, [5.0, 5.0], atol=1e-9)
    sd15 = official("sd15-distilled.pkl")
    start = cold_start(sd15, concentration=20.0)
    assert start.alpha_pos.shape == (sd15.num_steps - 1, 3) and start.alpha_weight.shape == (sd15.num_steps - 1, 2)
    assert np.allclose(start.alpha_pos.sum(-1), 20) and np.allclose(start.alpha_weight.sum(-1), 20)
    assert np.allclose(start.alpha_pos / 20, positions_to_segments(sd15.positions), atol=1e-12)
    assert np.allclose(start.alpha_weight / 20, sd15.weights, atol=1e-12)
    assert start.table.metadata == sd15.metadata
    assert np.array_equal(start.table.sigmas, sd15.sigmas)


def test_cold_start_replaces_degenerate_rows():
    pos = np.array([[0.3, 0.6], [0.5, 0.5], [0.2, 0.7], [0.2, 0.8]])
    w = np.array([[0.5, 0.5], [0.5, 0.5], [1.0, 0.0], [0.25, 0.75]])
    table = PredictorTable(positions=pos, weights=w, sigmas=SIGMAS)
    start = cold_start(table, concentration=30.0)
    assert start.replaced_rows == (1, 2)  # a zero-width segment (tie), a zero weight
    assert np.allclose(start.alpha_pos[1:3], 10.0) and np.allclose(start.alpha_weight[1:3], 15.0)
    assert np.allclose(start.table.positions[1:3], [1 / 3, 2 / 3])
    assert np.allclose(start.table.weights[1:3], 0.5)
    assert np.allclose(start.alpha_pos[3], 30 * np.array([0.2, 0.6, 0.2]))
    assert start.sanitized_rows == 1


def test_cold_start_validation():
    table = uniform_table(SIGMAS)
    with pytest.raises(ValueError, match="concentration"):
        cold_start(table, concentration=0.0)
    with pytest.raises(ValueError, match="concentration"):
        cold_start(table, concentration=float("nan"))
    with pytest.raises(ValueError, match="parameterisation"):
        cold_start(table, parameterisation="median")
    with pytest.raises(ValueError, match="PredictorTable"):
        cold_start({"positions": [[0.5]]})  # type: ignore[arg-type]


# -- policy -------------------------------------------------------------------------------------------------
def test_initial_mean_table_equals_cold_start():
    table = digits_table()
    assert table.dir_scales is not None and table.time_scales is not None
    start = cold_start(table, concentration=10.0)
    policy = DirichletPolicy(start)
    assert policy.spec["model_scale_dir"] and policy.spec["model_scale_time"]
    assert float(policy.kl_to_base().detach()) == 0.0
    mean = policy.table("mean")
    for name in ("positions", "weights", "dir_scales", "time_scales"):
        np.testing.assert_allclose(getattr(mean, name), getattr(start.table, name), atol=1e-6, err_msg=name)
    np.testing.assert_allclose(mean.positions, table.positions, atol=1e-6)
    assert np.array_equal(mean.sigmas, table.sigmas) and mean.afs == table.afs and mean.solver == table.solver
    assert mean.metadata["rdpo"]["kind"] == "mean" and mean.metadata["rdpo"]["scales"] == {"dir": "sampled",
                                                                                            "time": "sampled"}
    assert {k: v for k, v in mean.metadata.items() if k != "rdpo"} == table.metadata
    # the authors' loc = log(scale) would give a mean of scale * exp(s^2/2): ours is exact
    loc = policy.base_log_scale_dir.double().numpy()
    np.testing.assert_allclose(np.exp(loc + 0.05 ** 2 / 2), table.dir_scales, rtol=1e-6)
    # with the "mean" start the Dirichlet mode differs from the table (small c spreads the samples)
    assert np.abs(policy.table("mode").positions - table.positions).max() > 1e-2


def test_mode_parameterisation_mode_table_equals_start():
    table = digits_table()
    start = cold_start(table, concentration=10.0, parameterisation="mode")
    policy = DirichletPolicy(start)
    mode = policy.table("mode")
    for name in ("positions", "weights", "dir_scales", "time_scales"):
        np.testing.assert_allclose(getattr(mode, name), getattr(start.table, name), atol=1e-6, err_msg=name)
    assert mode.metadata["rdpo"]["mode_fallback_rows"] == {"positions": [], "weights": []}
    # a "mean" start with some alpha <= 1 falls back to the mean on those rows
    low = DirichletPolicy(cold_start(table, concentration=2.0))
    info = low.table("mode").metadata["rdpo"]["mode_fallback_rows"]
    assert info["positions"] == [0, 1, 2]


def test_log_prob_and_entropy_match_torch_distributions():
    policy = perturb(DirichletPolicy(cold_start(digits_table(), concentration=10.0)))
    sample, log_prob = policy.sample(16, torch.Generator().manual_seed(3))
    params = policy()
    ref = (Dirichlet(params.alpha_pos).log_prob(sample.segments).sum(-1)
           + Dirichlet(params.alpha_weight).log_prob(sample.weights).sum(-1)
           + LogNormal(params.dir_loc, params.dir_log_std.exp()).log_prob(sample.dir_scales).sum((-2, -1))
           + LogNormal(params.time_loc, params.time_log_std.exp()).log_prob(sample.time_scales).sum((-2, -1)))
    torch.testing.assert_close(log_prob, ref.detach(), rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(policy.log_prob(sample), ref, rtol=1e-10, atol=1e-9)
    ent = (Dirichlet(params.alpha_pos).entropy().sum() + Dirichlet(params.alpha_weight).entropy().sum()
           + LogNormal(params.dir_loc, params.dir_log_std.exp()).entropy().sum()
           + LogNormal(params.time_loc, params.time_log_std.exp()).entropy().sum())
    torch.testing.assert_close(policy.entropy(), ent, rtol=1e-10, atol=1e-9)


def test_kl_matches_monte_carlo():
    policy = perturb(DirichletPolicy(cold_start(digits_table(), concentration=10.0)), scale=0.4)
    params, base = policy(), policy.base_params()
    sample, _ = policy.sample(200_000, torch.Generator().manual_seed(7))
    with torch.no_grad():
        mc_dir = (dirichlet_log_prob(params.alpha_pos, sample.segments)
                  - dirichlet_log_prob(base.alpha_pos, sample.segments)
                  + dirichlet_log_prob(params.alpha_weight, sample.weights)
                  - dirichlet_log_prob(base.alpha_weight, sample.weights)).sum(-1).mean()
        exact_dir = dirichlet_kl(params.alpha_pos, base.alpha_pos).sum() + dirichlet_kl(
            params.alpha_weight, base.alpha_weight).sum()
        mc_ln = (lognormal_log_prob(params.dir_loc, params.dir_log_std, sample.dir_scales)
                 - lognormal_log_prob(base.dir_loc, base.dir_log_std, sample.dir_scales)).sum((-2, -1)).mean()
        exact_ln = lognormal_kl(params.dir_loc, params.dir_log_std, base.dir_loc, base.dir_log_std).sum()
        total_mc = (policy.log_prob(sample, params) - policy.log_prob(sample, base)).mean()
        total = policy.kl_to_base(params)
    assert float(exact_dir) > 0.1 and float(exact_ln) > 0.1
    assert abs(float(mc_dir / exact_dir) - 1) < 0.03, (float(mc_dir), float(exact_dir))
    assert abs(float(mc_ln / exact_ln) - 1) < 0.03, (float(mc_ln), float(exact_ln))
    assert abs(float(total_mc / total) - 1) < 0.03, (float(total_mc), float(total))


def test_gradient_step_increases_log_prob_of_advantaged_sample():
    torch.manual_seed(0)
    policy = DirichletPolicy(cold_start(digits_table(), concentration=10.0))
    sample, old = policy.sample(1, torch.Generator().manual_seed(11))
    optimiser = torch.optim.Adam(policy.parameters(), lr=1e-3)
    advantage = torch.tensor([2.0])
    for _ in range(3):
        optimiser.zero_grad()
        loss = -(advantage * policy.log_prob(sample)).mean()
        loss.backward()
        optimiser.step()
    new = policy.log_prob(sample).detach()
    assert float(new) > float(old) + 1e-3
    assert float(policy.kl_to_base().detach()) > 0


def test_sample_reproducible_and_global_rng_untouched():
    policy = DirichletPolicy(cold_start(digits_table(), concentration=10.0))
    state = torch.get_rng_state()
    a, lp_a = policy.sample(8, torch.Generator().manual_seed(5))
    b, lp_b = policy.sample(8, torch.Generator().manual_seed(5))
    c, _ = policy.sample(8, torch.Generator().manual_seed(6))
    assert torch.equal(torch.get_rng_state(), state)
    for name in ("segments", "weights", "dir_scales", "time_scales"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert not torch.equal(getattr(a, name), getattr(c, name)), name
    assert torch.equal(lp_a, lp_b)
    pos = a.positions
    assert pos.shape == (8, 3, 2) and bool((pos > 0).all() and (pos < 1).all())
    assert bool((pos.diff(dim=-1) > 0).all())
    one = torch.ones((), dtype=torch.float64)
    assert torch.allclose(a.segments.sum(-1), one) and torch.allclose(a.weights.sum(-1), one)
    assert not a.segments.requires_grad and not lp_a.requires_grad


def test_sample_extreme_alphas_stay_inside_simplex():
    policy = DirichletPolicy(cold_start(uniform_table(SIGMAS, num_points=3), concentration=10.0))
    with torch.no_grad():  # alphas at the 1e-5 floor and very large ones
        policy.head.bias[:4].copy_(torch.tensor([-20.0, 8.0, -20.0, -20.0]))
    sample, log_prob = policy.sample(64, torch.Generator().manual_seed(0))
    assert bool(torch.isfinite(log_prob).all())
    pos = sample.positions
    assert bool((pos > 0).all() and (pos < 1).all() and (pos.diff(dim=-1) > 0).all())
    assert bool((pos.float().diff(dim=-1) > 0).all())  # still strictly increasing in float32


def test_fixed_and_added_scales():
    table = digits_table()
    fixed = DirichletPolicy(cold_start(table, 10.0), train_scale_dir=False)
    assert not fixed.spec["model_scale_dir"] and fixed.spec["model_scale_time"]
    assert "base_log_scale_dir" not in fixed.state_dict()
    sample, log_prob = fixed.sample(4, torch.Generator().manual_seed(0))
    assert torch.equal(sample.dir_scales, torch.tensor(table.dir_scales).expand(4, -1, -1))
    params = fixed()
    ref = (Dirichlet(params.alpha_pos).log_prob(sample.segments).sum(-1)
           + Dirichlet(params.alpha_weight).log_prob(sample.weights).sum(-1)
           + LogNormal(params.time_loc, params.time_log_std.exp()).log_prob(sample.time_scales).sum((-2, -1)))
    torch.testing.assert_close(log_prob, ref.detach())
    exported = fixed.table()
    assert np.array_equal(exported.dir_scales, table.dir_scales)
    assert exported.metadata["rdpo"]["scales"] == {"dir": "fixed", "time": "sampled"}
    # a table without scales, with trained time scales: start at 1.0
    added = DirichletPolicy(cold_start(uniform_table(SIGMAS), 10.0), train_scale_time=True)
    sample, _ = added.sample(2, torch.Generator().manual_seed(0))
    assert sample.dir_scales is None and sample.time_scales.shape == (2, 4, 2)
    out = added.table()
    assert out.dir_scales is None and np.allclose(out.time_scales, 1.0, atol=1e-6)


def test_table_sample_helpers_and_sampler_layout():
    from solvers.epd import sample_epd

    table = digits_table()
    policy = DirichletPolicy(cold_start(table, 10.0))
    sample, log_prob = policy.sample(5, torch.Generator().manual_seed(0))
    assert len(sample) == 5 and len(sample.select(torch.tensor([0, 2]))) == 2
    part = sample.select(slice(1, 3))
    torch.testing.assert_close(policy.log_prob(part).detach(), log_prob[1:3])
    assert len(sample.select(4)) == 1 and sample.detach().to("cpu").segments.shape == (5, 3, 3)
    rows = sample.rows()
    assert rows.positions.shape == (3, 5, 2) and rows.dir_scales.shape == (3, 5, 2)
    torch.testing.assert_close(rows.positions[1, 2], sample.positions[2, 1])
    per_image = StepPlan(table.sigmas, rows)
    x = torch.randn(5, 4, dtype=torch.float64) * float(table.sigmas[0])
    out = sample_epd(lambda z, sigma, cond=None: z / (1 + sigma.view(-1, 1) ** 2), x, per_image)
    assert out.shape == x.shape and bool(torch.isfinite(out).all())
    assert isinstance(sample, TableSample)


def test_export_round_trip(tmp_path):
    table = digits_table()
    policy = perturb(DirichletPolicy(cold_start(table, 10.0)), scale=0.2)
    first = policy.table("mean")
    path = save_table(first, tmp_path / "rdpo.pkl")
    loaded = load_table(path)
    again = DirichletPolicy(cold_start(loaded, concentration=10.0)).table("mean")
    for name in ("positions", "weights", "dir_scales", "time_scales", "sigmas"):
        np.testing.assert_allclose(getattr(again, name), getattr(first, name), atol=1e-6, err_msg=name)
    assert again.metadata["rdpo"]["kind"] == "mean" and again.afs == table.afs


def test_policy_validation_and_state_dict_rebuild():
    start = cold_start(digits_table(), 10.0)
    assert isinstance(start, ColdStart)
    with pytest.raises(ValueError, match="scale_std"):
        DirichletPolicy(start, scale_std=0.0)
    with pytest.raises(ValueError, match="kind"):
        DirichletPolicy(start).table("median")
    policy = perturb(DirichletPolicy(start, hidden=16, blocks=1))
    spec = policy.spec
    clone = DirichletPolicy(start, hidden=spec["hidden"], blocks=spec["blocks"], scale_std=spec["scale_std"],
                            train_scale_dir=spec["train_scale_dir"], train_scale_time=spec["train_scale_time"])
    clone.load_state_dict(policy.state_dict())
    torch.testing.assert_close(clone().alpha_pos, policy().alpha_pos)
