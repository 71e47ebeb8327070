"""Reward registry, the spec-7.4 multi-reward mix, and the offline digit heads (fast, CPU)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backends.analytic import load_digits_data
from training.rewards import (MultiReward, RewardResult, available_rewards, build_reward, register_reward,
                              reward_from_config, unregister_reward)
from training.rewards import digits as digit_rewards

ROOT = Path(__file__).resolve().parents[1]


class StubHead:
    """Raw score = per-image value + offset; normalise = clamp(score / divisor, 0, 1). Records chunk sizes."""

    def __init__(self, name: str, values: torch.Tensor, offset: float = 0.0, divisor: float = 1.0):
        self.name, self.values, self.offset, self.divisor = name, values, offset, divisor
        self.calls: list[int] = []

    def score(self, images, prompts):
        self.calls.append(images.shape[0])
        idx = images[:, 0, 0, 0].long()          # the test images carry their index in pixel (0, 0)
        return (self.values[idx] + self.offset).float()

    def normalise(self, scores):
        return (scores / self.divisor).clamp(0, 1)


RAW_A = torch.tensor([0.0, 5.0, 10.0, 20.0, 7.0, 2.5, 1.0])      # divisor 10 -> 0, .5, 1, 1, .7, .25, .1
RAW_B = torch.tensor([0.3, -1.0, 0.9, 0.2, 2.0, 0.6, 0.0])       # divisor 1  -> .3, 0, .9, .2, 1, .6, 0


def indexed_images(count: int) -> torch.Tensor:
    images = torch.zeros(count, 1, 8, 8)
    images[:, 0, 0, 0] = torch.arange(count, dtype=torch.float32)
    return images


@pytest.fixture
def stubs():
    """Register stub heads a, b (working) and c, d (raise if ever built); unregister afterwards."""
    names = ["stub_a", "stub_b", "stub_c", "stub_d"]
    built: dict[str, StubHead] = {}

    def maker(name, values, divisor):
        def factory(offset: float = 0.0):
            built[name] = StubHead(name, values, offset=offset, divisor=divisor)
            return built[name]
        return factory

    def forbidden(**options):
        raise AssertionError("a head with weight <= 0 was built")

    register_reward("stub_a")(maker("stub_a", RAW_A, 10.0))
    register_reward("stub_b")(maker("stub_b", RAW_B, 1.0))
    register_reward("stub_c")(forbidden)
    register_reward("stub_d")(forbidden)
    yield built
    for name in names:
        unregister_reward(name)


# -- registry ---------------------------------------------------------------------------------------------

def test_register_build_duplicate_unknown(stubs):
    assert {"stub_a", "stub_b", "digit_class", "digit_realism"} <= set(available_rewards())
    head = build_reward("stub_a", offset=1.0)
    assert head is stubs["stub_a"] and head.offset == 1.0
    with pytest.raises(ValueError, match="already registered"):
        register_reward("stub_a")(lambda: None)
    with pytest.raises(ValueError, match="unknown reward 'nope'.*digit_class"):
        build_reward("nope")
    register_reward("stub_bad")(lambda: object())
    try:
        with pytest.raises(TypeError, match="not a RewardHead"):
            build_reward("stub_bad")
    finally:
        unregister_reward("stub_bad")


def test_multi_reward_mix_and_unbuilt_heads(stubs):
    reward = MultiReward({"stub_a": 2, "stub_b": 1, "stub_c": 0, "stub_d": -1})
    assert reward.names == ["stub_a", "stub_b"] and set(stubs) == {"stub_a", "stub_b"}
    out = reward(indexed_images(7), ["p"] * 7)
    assert isinstance(out, RewardResult) and out.reward.dtype == torch.float32 and out.reward.shape == (7,)
    norm_a, norm_b = (RAW_A / 10).clamp(0, 1), RAW_B.clamp(0, 1)
    torch.testing.assert_close(out.reward, (2 * norm_a + norm_b) / 3)
    torch.testing.assert_close(out.raw["stub_a"], RAW_A)
    torch.testing.assert_close(out.normalised["stub_b"], norm_b)
    assert set(out.raw) == {"stub_a", "stub_b"}
    summary = out.summary()
    assert math.isclose(summary["stub_a_mean"], float(RAW_A.mean()), rel_tol=1e-6)
    assert math.isclose(summary["mixed_reward_std"], float(out.reward.double().std(unbiased=False)), rel_tol=1e-6)


def test_multi_reward_errors_and_injection(stubs):
    with pytest.raises(ValueError, match="no positive weight"):
        MultiReward({"stub_c": 0, "stub_d": -2})
    with pytest.raises(ValueError, match="unknown reward 'missing'"):
        MultiReward({"missing": 1.0})
    MultiReward({"missing": 0.0, "stub_a": 1.0})           # unknown heads with weight 0 need nothing
    injected = StubHead("x", RAW_B, divisor=1.0)
    reward = MultiReward({"stub_c": 3.0}, heads={"stub_c": injected})
    torch.testing.assert_close(reward(indexed_images(7), [""] * 7).reward, RAW_B.clamp(0, 1))
    with pytest.raises(ValueError, match="without a weight"):
        MultiReward({"stub_a": 1.0}, heads={"other": injected})
    with pytest.raises(ValueError, match="prompts"):
        reward(indexed_images(7), [""] * 6)


def test_chunked_equals_one_shot(stubs):
    reward = MultiReward({"stub_a": 1.0, "stub_b": 0.5}, options={"stub_a": {"offset": 0.5}})
    whole = reward(indexed_images(7), [""] * 7)
    chunked = reward(indexed_images(7), [""] * 7, batch_size=3)
    assert stubs["stub_a"].calls == [7, 3, 3, 1]
    torch.testing.assert_close(chunked.reward, whole.reward, rtol=0, atol=0)
    for name in whole.raw:
        torch.testing.assert_close(chunked.raw[name], whole.raw[name], rtol=0, atol=0)


def test_reward_from_config(stubs):
    raw = reward_from_config({"type": "stub_a", "raw": True, "offset": 100.0})
    torch.testing.assert_close(raw(indexed_images(7), [""] * 7).reward, RAW_A + 100.0)   # no clamp
    single = reward_from_config({"type": "stub_a", "offset": 100.0})
    assert bool((single(indexed_images(7), [""] * 7).reward == 1.0).all())
    multi = reward_from_config({"type": "multi", "weights": {"stub_a": 1, "stub_b": 3, "stub_c": 0},
                                "heads": {"stub_a": {"offset": 1.0}, "stub_c": {"x": 1}}, "batch_size": 2})
    out = multi(indexed_images(7), [""] * 7)
    assert stubs["stub_a"].calls == [2, 2, 2, 1]
    torch.testing.assert_close(out.reward, (((RAW_A + 1) / 10).clamp(0, 1) + 3 * RAW_B.clamp(0, 1)) / 4)
    with pytest.raises(ValueError, match="unknown keys"):
        reward_from_config({"type": "multi", "weights": {"stub_a": 1}, "typo": 1})
    with pytest.raises(ValueError, match="type"):
        reward_from_config({"weights": {"stub_a": 1}})


def test_import_stays_light():
    code = ("import sys, training.rewards as r; assert 'digit_class' in r.available_rewards(); "
            "heavy = [m for m in ('open_clip', 'transformers', 'sklearn') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


# -- digit heads ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def holdout():
    images, labels = load_digits_data()
    idx = digit_rewards.holdout_indices()
    return idx, images[idx], labels[idx]


def test_classifier_accuracy(holdout):
    idx, _, _ = holdout
    assert digit_rewards.classifier_accuracy() >= 0.95
    classifier = digit_rewards.get_digit_classifier()
    assert len(set(idx.tolist()) & set(classifier.train_indices.tolist())) == 0
    assert len(idx) + len(classifier.train_indices) == 1797


def test_digit_class_head(holdout):
    _, images, labels = holdout
    head = build_reward("digit_class")
    true_prompts = [f"a handwritten {int(y)}" if i % 2 else str(int(y)) for i, y in enumerate(labels)]
    wrong_prompts = [str((int(y) + 1 + i % 9) % 10) for i, y in enumerate(labels)]
    right = head.score(images, true_prompts)
    wrong = head.score(images.float(), wrong_prompts)
    assert right.dtype == torch.float32 and right.shape == (len(labels),)
    assert float(right.mean()) > 0.8 and float(wrong.mean()) < 0.2
    probs = head.classifier.probs(images)
    torch.testing.assert_close(head.score(images, [""] * len(labels)), probs.max(-1).values.float())
    torch.testing.assert_close(head.normalise(right), right)
    with pytest.raises(ValueError, match="several digits"):
        head.score(images[:1], ["12"])
    with pytest.raises(ValueError, match="prompts"):
        head.score(images[:2], ["1"])


def test_digit_realism_head(holdout):
    idx, images, _ = holdout
    scale = digit_rewards.realism_scale()
    loo = torch.exp(-(digit_rewards.leave_one_out_distances() / scale) ** 2)
    assert abs(float(loo.median()) - 0.5) < 1e-6
    held_out = build_reward("digit_realism", exclude=idx).score(images, [""] * len(idx))
    assert 0.3 < float(held_out.median()) < 0.7
    head = build_reward("digit_realism")
    assert head.scale == scale
    torch.testing.assert_close(head.score(images[:4], [""] * 4), torch.ones(4), atol=1e-6, rtol=0)   # training digits
    noise = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert float(head.score(noise, [""] * 64).max()) < 0.05
    assert float(digit_rewards.nearest_training_distance(images[:3]).abs().max()) < 1e-6


@pytest.mark.parametrize("bad", [torch.zeros(2, 3, 8, 8), torch.zeros(2, 64),
                                 torch.zeros(2, 1, 8, 8, dtype=torch.long)])
def test_digit_heads_reject_bad_images(bad):
    for name in ("digit_class", "digit_realism"):
        with pytest.raises(ValueError, match=r"\[B, 1, 8, 8\]"):
            build_reward(name).score(bad, [""] * bad.shape[0])


def test_digit_heads_deterministic_and_mixed(holdout):
    _, images, labels = holdout
    prompts = [str(int(y)) for y in labels[:64]]
    first = build_reward("digit_class").score(images[:64], prompts)
    first_scale = digit_rewards.realism_scale()
    digit_rewards.clear_cache()
    second = build_reward("digit_class").score(images[:64], prompts)
    assert torch.equal(first, second) and digit_rewards.realism_scale() == first_scale
    mixed = reward_from_config({"type": "multi", "weights": {"digit_class": 1.0, "digit_realism": 1.0, "hps": 0.0}})
    out = mixed(images[:64], prompts, batch_size=16)
    torch.testing.assert_close(out.reward, (out.raw["digit_class"] + out.raw["digit_realism"]) / 2)
    assert bool(((out.reward >= 0) & (out.reward <= 1)).all())


def test_image_contrast_stand_in_head():
    from training.rewards import build_reward

    head = build_reward("image_contrast")
    flat = torch.zeros(2, 3, 8, 8)
    checker = torch.ones(1, 3, 8, 8)
    checker[..., ::2, ::2] = -1
    checker[..., 1::2, 1::2] = -1
    scores = head.score(torch.cat([flat, checker]), ["", "", ""])
    assert scores[:2].tolist() == [0.0, 0.0] and float(scores[2]) == pytest.approx(0.5, abs=1e-6)
    assert head.normalise(scores).tolist() == pytest.approx([0.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="image_contrast expects"):
        head.score(torch.zeros(2, 8, 8), ["", ""])
