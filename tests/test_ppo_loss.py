"""The clipped PPO objective (training.ppo.loss): values by hand, clipping, the advantage's sign, KL and entropy."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from training.ppo import PPOLoss, ppo_loss

ROOT = Path(__file__).resolve().parents[1]
T = torch.float64


def tensor(*values: float, grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=T, requires_grad=grad)


def val(t: torch.Tensor) -> float:
    return float(t.detach())


def zero() -> torch.Tensor:
    return torch.zeros((), dtype=T)


def grad_of_log_prob(ratios, advantages, eps=0.2):
    """d policy_loss / d log_prob for samples with the given ratios (old log-prob 0)."""
    log_prob = torch.log(tensor(*ratios)).requires_grad_(True)
    out = ppo_loss(log_prob, torch.zeros(len(ratios), dtype=T), tensor(*advantages), clip_range=eps, kl=zero(),
                   entropy=zero())
    out.loss.backward()
    return log_prob.grad


# -- values -------------------------------------------------------------------------------------------------------
def test_hand_computed_values_on_a_tiny_batch():
    old = tensor(-1.0, 0.5, 2.0)
    log_prob = old + torch.log(tensor(0.5, 1.0, 1.5))                   # ratios 0.5, 1.0, 1.5
    adv = tensor(1.0, -1.0, 2.0)
    kl, entropy = torch.tensor(0.5, dtype=T), torch.tensor(2.0, dtype=T)
    out = ppo_loss(log_prob, old, adv, clip_range=0.2, kl=kl, entropy=entropy, kl_coef=0.1, entropy_coef=0.01)
    assert isinstance(out, PPOLoss)
    assert list(out._asdict()) == ["loss", "policy_loss", "kl", "entropy", "ratio", "clip_fraction"]
    # per sample max(-A r, -A clip(r, 0.8, 1.2)): max(-0.5, -0.8) = -0.5; max(1, 1) = 1; max(-3, -2.4) = -2.4
    assert val(out.policy_loss) == pytest.approx((-0.5 + 1.0 - 2.4) / 3, abs=1e-12)
    assert val(out.loss) == pytest.approx((-0.5 + 1.0 - 2.4) / 3 + 0.1 * 0.5 - 0.01 * 2.0, abs=1e-12)
    assert val(out.ratio) == pytest.approx(1.0, abs=1e-12)
    assert val(out.clip_fraction) == pytest.approx(2 / 3)
    assert out.kl is kl and out.entropy is entropy                            # the terms as given
    assert all(v.dim() == 0 for v in out)


def test_equals_the_textbook_min_form_on_random_tensors():
    gen = torch.Generator().manual_seed(0)
    log_prob = 0.5 * torch.randn(64, generator=gen, dtype=T)
    old = 0.5 * torch.randn(64, generator=gen, dtype=T)
    adv = torch.randn(64, generator=gen, dtype=T)
    eps = 0.15
    r = torch.exp(log_prob - old)
    expected = -torch.minimum(r * adv, r.clamp(1 - eps, 1 + eps) * adv).mean()
    out = ppo_loss(log_prob, old, adv, clip_range=eps, kl=zero(), entropy=zero())
    torch.testing.assert_close(out.policy_loss, expected, rtol=0, atol=1e-14)
    torch.testing.assert_close(out.ratio, r.mean(), rtol=0, atol=1e-14)
    assert val(out.clip_fraction) == float(((r - 1).abs() > eps).double().mean())


# -- clipping -----------------------------------------------------------------------------------------------------
def test_clipped_ratios_get_no_gradient_in_the_direction_the_advantage_favours():
    # A > 0 and r > 1 + eps; A < 0 and r < 1 - eps: the clipped branch wins, no gradient at all
    grad = grad_of_log_prob([1.5, 0.5, 2.0, 0.1], [1.0, -1.0, 3.0, -0.5])
    assert torch.equal(grad, torch.zeros(4, dtype=T))


def test_ratios_outside_the_band_against_the_advantage_keep_their_gradient():
    # A > 0 and r < 1 - eps (wants r back up); A < 0 and r > 1 + eps (wants r back down): unclipped, -A r / B
    ratios, adv = [0.5, 1.5], [1.0, -2.0]
    grad = grad_of_log_prob(ratios, adv)
    torch.testing.assert_close(grad, tensor(*(-a * r / 2 for r, a in zip(ratios, adv))), rtol=1e-12, atol=0)
    assert grad[0] < 0 < grad[1]                  # descent raises the first log-prob and lowers the second


def test_ratios_inside_the_band_get_the_unclipped_gradient():
    ratios, adv = [0.85, 1.0, 1.19], [2.0, -1.0, 0.5]
    grad = grad_of_log_prob(ratios, adv)
    torch.testing.assert_close(grad, tensor(*(-a * r / 3 for r, a in zip(ratios, adv))), rtol=1e-12, atol=0)


def test_the_clip_range_sets_where_clipping_starts():
    assert float(grad_of_log_prob([1.3], [1.0], eps=0.2)[0]) == 0.0
    assert float(grad_of_log_prob([1.3], [1.0], eps=0.4)[0]) == pytest.approx(-1.3)


def test_clip_fraction_counts_ratios_outside_the_band_whatever_the_advantage():
    ratios = [0.5, 0.9, 1.0, 1.1, 3.0, 0.79, 1.21, 1.19]
    log_prob = torch.log(tensor(*ratios))
    for adv in ([1.0] * 8, [-1.0] * 8, [1.0, -1.0] * 4, [0.0] * 8):
        out = ppo_loss(log_prob, torch.zeros(8, dtype=T), tensor(*adv), clip_range=0.2, kl=zero(), entropy=zero())
        assert val(out.clip_fraction) == 4 / 8          # 0.5, 3.0, 0.79, 1.21
    out = ppo_loss(log_prob, torch.zeros(8, dtype=T), tensor(*[1.0] * 8), clip_range=0.05, kl=zero(),
                   entropy=zero())
    assert val(out.clip_fraction) == 7 / 8              # all but r = 1
    out = ppo_loss(log_prob, torch.zeros(8, dtype=T), tensor(*[1.0] * 8), clip_range=5.0, kl=zero(),
                   entropy=zero())
    assert val(out.clip_fraction) == 0.0


def test_ratios_exactly_on_the_band_edge_are_not_counted_as_clipped():
    log_prob = tensor(0.25, -0.4, 0.3)
    ratio = torch.exp(log_prob)
    eps = float(ratio[0]) - 1                      # exact: r - 1 has no rounding error for r in [1, 2]
    assert float(ratio[1]) < 1 - eps and float(ratio[2]) > 1 + eps       # the other two are outside
    out = ppo_loss(log_prob, torch.zeros(3, dtype=T), tensor(1.0, 1.0, 1.0), clip_range=eps, kl=zero(),
                   entropy=zero())
    assert val(out.clip_fraction) == pytest.approx(2 / 3)   # |r - 1| > eps, strictly: the first is not counted


def test_no_clipping_at_the_old_policy():
    old = tensor(-3.0, 0.2, 1.0)
    out = ppo_loss(old.clone().requires_grad_(True), old, tensor(1.0, -2.0, 0.5), clip_range=0.2, kl=zero(),
                   entropy=zero())
    assert val(out.clip_fraction) == 0.0 and val(out.ratio) == 1.0
    assert val(out.policy_loss) == pytest.approx(-(1.0 - 2.0 + 0.5) / 3)


# -- the advantage's sign -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("advantage, direction", [(1.0, 1), (-1.0, -1), (0.0, 0)])
def test_a_gradient_step_moves_the_log_prob_with_the_advantage(advantage, direction):
    logits = torch.tensor([0.3, -0.2, 0.1], dtype=T, requires_grad=True)
    action = torch.tensor([1])

    def log_prob():
        return torch.log_softmax(logits, -1)[action]

    old = log_prob().detach()
    out = ppo_loss(log_prob(), old, tensor(advantage), clip_range=0.2, kl=zero(), entropy=zero())
    out.loss.backward()
    with torch.no_grad():
        logits -= 0.1 * logits.grad
    change = val(log_prob() - old)
    assert (change > 1e-6) if direction > 0 else (change < -1e-6) if direction < 0 else change == 0.0


def test_gradient_sign_with_respect_to_the_log_prob():
    grad = grad_of_log_prob([1.0, 1.0], [2.0, -3.0])
    torch.testing.assert_close(grad, tensor(-1.0, 1.5), rtol=1e-12, atol=0)


# -- KL and entropy ---------------------------------------------------------------------------------------------------
def test_kl_and_entropy_contribute_their_coefficient_times_the_term():
    log_prob, old, adv = tensor(0.1, -0.1), tensor(0.0, 0.0), tensor(1.0, -1.0)
    for kl_coef, entropy_coef in ((0.0, 0.0), (0.1, 0.0), (0.0, 0.02), (0.5, 0.3), (1.0, 0.6)):
        kl = torch.tensor(0.7, dtype=T, requires_grad=True)
        entropy = torch.tensor(-4.0, dtype=T, requires_grad=True)
        out = ppo_loss(log_prob, old, adv, clip_range=0.2, kl=kl, entropy=entropy, kl_coef=kl_coef,
                       entropy_coef=entropy_coef)
        assert val(out.loss - out.policy_loss) == pytest.approx(kl_coef * 0.7 + entropy_coef * 4.0, abs=1e-12)
        out.loss.backward()
        assert float(kl.grad) == kl_coef and float(entropy.grad) == -entropy_coef


def test_zero_coefficients_remove_the_terms():
    log_prob = tensor(0.1, -0.1, grad=True)
    args = (tensor(0.0, 0.0), tensor(1.0, -1.0))
    theta = torch.tensor(0.4, dtype=T, requires_grad=True)       # a parameter shared by the policy and the terms
    out = ppo_loss(log_prob * (1 + theta), *args, clip_range=0.2, kl=theta ** 2 * 3, entropy=-theta * 5)
    assert val(out.loss) == val(out.policy_loss)
    grad_full = torch.autograd.grad(out.loss, theta)[0]
    alone = ppo_loss(log_prob * (1 + theta), *args, clip_range=0.2, kl=zero(), entropy=zero())
    assert torch.equal(grad_full, torch.autograd.grad(alone.loss, theta)[0])
    assert val(out.kl) == pytest.approx(0.48) and val(out.entropy) == pytest.approx(-2.0)   # still reported


def test_the_kl_term_pulls_towards_the_base_and_the_entropy_term_spreads_the_policy():
    # kl(theta) = theta^2, entropy(theta) = -theta^2 + const: descent lowers KL with kl_coef > 0, and raises the
    # entropy with entropy_coef > 0; the policy term is flat (ratio 1 and zero advantage)
    for kl_coef, entropy_coef in ((1.0, 0.0), (0.0, 1.0)):
        theta = torch.tensor(0.8, dtype=T, requires_grad=True)
        out = ppo_loss(tensor(0.0), tensor(0.0), tensor(0.0), clip_range=0.2, kl=theta ** 2,
                       entropy=1.0 - theta ** 2, kl_coef=kl_coef, entropy_coef=entropy_coef)
        (grad,) = torch.autograd.grad(out.loss, theta)
        after = theta.detach() - 0.1 * grad
        assert float(after ** 2) < 0.64 and float(1 - after ** 2) > 1 - 0.64
        assert float(grad) == pytest.approx(2 * 0.8 * (kl_coef + entropy_coef))


def test_doubling_a_coefficient_doubles_its_contribution():
    base = dict(clip_range=0.2, kl=torch.tensor(0.3, dtype=T), entropy=torch.tensor(1.5, dtype=T))
    args = (tensor(0.2), tensor(0.0), tensor(1.0))
    policy = float(ppo_loss(*args, **base).policy_loss)
    for key in ("kl_coef", "entropy_coef"):
        one = float(ppo_loss(*args, **base, **{key: 0.25}).loss) - policy
        two = float(ppo_loss(*args, **base, **{key: 0.5}).loss) - policy
        assert one != 0 and two == pytest.approx(2 * one, abs=1e-14)


# -- the trainer uses it -----------------------------------------------------------------------------------------------
def test_the_trainer_minimises_this_objective(tmp_path, monkeypatch):
    import training.ppo.trainer as trainer_module
    from training.ppo import load_config
    from training.ppo.trainer import RDPOTrainer

    calls = []

    def recording(*args, **kwargs):
        out = ppo_loss(*args, **kwargs)
        calls.append((kwargs, out))
        return out

    monkeypatch.setattr(trainer_module, "ppo_loss", recording)
    config = load_config(ROOT / "training" / "ppo" / "cfgs" / "digits.yaml", [
        f"run.output_root={tmp_path / 'exps'}", f"data.predictor_snapshot={ROOT / 'exps/rdpo/digits-nfe3-stage1.pkl'}",
        "ppo.rollout_batch_size=8", "ppo.minibatch_size=4", "ppo.ppo_epochs=2", "ppo.steps=1", "eval.seeds=0-3",
        "ppo.clip_range=0.1", "ppo.kl_coef=0.3", "ppo.entropy_coef=0.01"])
    record = RDPOTrainer(config, tmp_path / "run", progress=False).train_iteration(0)
    assert len(calls) == 2 * 2                                                    # epochs x minibatches
    assert all(kw["clip_range"] == 0.1 and kw["kl_coef"] == 0.3 and kw["entropy_coef"] == 0.01 for kw, _ in calls)
    for key in ("loss", "policy_loss", "kl", "entropy", "ratio", "clip_fraction"):
        expected = sum(val(getattr(out, key)) for _, out in calls) / len(calls)
        assert math.isclose(record[key], expected, rel_tol=1e-12, abs_tol=1e-15), key
