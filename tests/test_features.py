"""Tests for training.features (CPU, random weights; no downloads)."""

from __future__ import annotations

import os

import lpips
import pytest
import torch
import torchvision
from pytorch_fid import inception as fid_inception

from training import features
from training.features import (
    DataSpaceLoss,
    FeatureSpaceLoss,
    InceptionFeatures,
    LPIPSLoss,
    make_feature_loss,
)

_ORIGINAL_FID_LOADER = fid_inception.load_state_dict_from_url


def _randomize_(module: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Randomise every float tensor (BN buffers included) so that no value is a default, keeping
    He-scaled conv weights so the signal survives the ~100 layers; return a copy of the state."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=gen)
            if t.ndim > 1:  # conv / linear weight
                t.copy_(noise * (2.0 / t[0].numel()) ** 0.5)
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            elif name.endswith("bn.weight"):
                t.copy_(1.0 + 0.1 * noise)
            else:  # biases, running means
                t.copy_(0.1 * noise)
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def fid_weights(tmp_path_factory) -> tuple[str, dict[str, torch.Tensor]]:
    """Random-weight FID Inception-v3 built by pytorch_fid itself, saved to a .pth file."""
    built = {}

    def capture(self, state_dict, *args, **kwargs):
        built["net"] = self

    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(fid_inception, "load_state_dict_from_url", lambda *a, **k: None)
        mp.setattr(torchvision.models.inception.Inception3, "load_state_dict", capture)
        fid_inception.fid_inception_v3()
    finally:
        mp.undo()
    state = _randomize_(built["net"])
    path = tmp_path_factory.mktemp("fid") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(state, path)
    return str(path), state


@pytest.fixture(scope="module")
def inception(fid_weights) -> InceptionFeatures:
    return InceptionFeatures(fid_weights[0])


def _images(b: int = 2, c: int = 3, hw: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.rand(b, c, hw, hw, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_data_space_loss_matches_hand_computation():
    s = torch.tensor([[[[1.0, -1.0], [0.5, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]]]).requires_grad_()
    t = torch.tensor([[[[0.0, -1.0], [0.0, 1.0]]], [[[1.0, 1.0], [-1.0, 0.0]]]])
    loss = DataSpaceLoss()(s, t)
    # sample 0: (1 + 0 + 0.25 + 1) / 4; sample 1: (1 + 1 + 1 + 0) / 4
    torch.testing.assert_close(loss, torch.tensor([0.5625, 0.75]))
    loss.sum().backward()
    torch.testing.assert_close(s.grad, 2 * (s - t).detach() / 4)


# Layers of the FID Inception in the order pytorch_fid.inception.InceptionV3 puts them in `blocks`.
_FID_BLOCKS = [
    ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"],
    ["Conv2d_3b_1x1", "Conv2d_4a_3x3"],
    ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a"] + [f"Mixed_6{c}" for c in "bcde"],
    ["Mixed_7a", "Mixed_7b", "Mixed_7c"],
]


def test_inception_loads_saved_weights(inception, fid_weights):
    _, saved = fid_weights
    loaded = inception.net.state_dict()
    used = set()
    for key, value in loaded.items():
        _, block, layer, rest = key.split(".", 3)  # "blocks.i.j.<rest>"
        name = f"{_FID_BLOCKS[int(block)][int(layer)]}.{rest}"
        torch.testing.assert_close(value, saved[name], rtol=0, atol=0)
        used.add(name)
    assert set(saved) - used == {"fc.weight", "fc.bias"}  # only the classifier is unused
    assert all(not p.requires_grad for p in inception.parameters())
    assert not inception.training


def test_feature_space_loss_zero_positive_and_gradient(inception):
    t = _images(seed=2)
    s = torch.stack([t[0], _images(b=1, seed=3)[0]]).requires_grad_(True)  # same, different
    loss = FeatureSpaceLoss(inception)(s, t)
    assert loss.shape == (2,)
    assert loss[0].item() == 0.0 and loss[1].item() > 0.0
    loss.sum().backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad[1].abs().sum() > 0


@torch.no_grad()
def test_inception_features_shape_and_grey_images(inception):
    grey = _images(b=1, c=1)
    feats = inception(torch.cat([grey.repeat(1, 3, 1, 1), _images(b=1, seed=4)]))
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all()
    torch.testing.assert_close(inception(grey), feats[:1], rtol=1e-4, atol=1e-4)


def test_inception_keeps_eval_mode(inception):
    inception.train()
    assert not inception.training and not inception.net.training


def test_inception_missing_file_and_loader_restored(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth") as err:
        InceptionFeatures(missing)
    assert "pt_inception-2015-12-05-6726825d.pth" in str(err.value)
    bad = tmp_path / "bad.pth"
    torch.save({"not": torch.zeros(1)}, bad)
    with pytest.raises(RuntimeError):  # load_state_dict fails inside pytorch_fid
        InceptionFeatures(bad)
    assert fid_inception.load_state_dict_from_url is _ORIGINAL_FID_LOADER


def test_inception_loader_restored_after_success(inception):
    assert fid_inception.load_state_dict_from_url is _ORIGINAL_FID_LOADER


@pytest.fixture(scope="module")
def alex_weights(tmp_path_factory) -> tuple[str, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    state = torchvision.models.alexnet(weights=None).state_dict()
    path = tmp_path_factory.mktemp("lpips") / "alexnet.pth"
    torch.save(state, path)
    return str(path), state


def test_lpips_alex(alex_weights):
    path, saved = alex_weights
    loss_fn = LPIPSLoss(path, net="alex")
    backbone = loss_fn.model.net.state_dict()  # "sliceK.N.<p>" <- torchvision "features.N.<p>"
    assert len(backbone) == 10
    for key, value in backbone.items():
        torch.testing.assert_close(value, saved["features." + key.split(".", 1)[1]], rtol=0, atol=0)
    torch.testing.assert_close(loss_fn.model.net.slice3[1].weight, saved["features.6.weight"])
    shipped_path = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "alex.pth")
    shipped = torch.load(shipped_path, map_location="cpu", weights_only=True)
    torch.testing.assert_close(loss_fn.model.lin0.model[1].weight, shipped["lin0.model.1.weight"])
    assert all(not p.requires_grad for p in loss_fn.parameters())
    t = _images(hw=64, seed=4)
    same = loss_fn(t.clone(), t)
    assert same.shape == (2,)
    torch.testing.assert_close(same, torch.zeros(2), atol=1e-6, rtol=0)
    s = _images(hw=64, seed=5).requires_grad_(True)
    diff = loss_fn(s, t)
    assert diff.shape == (2,) and (diff > 0).all()
    diff.sum().backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    grey = _images(hw=64, c=1, seed=6)
    assert loss_fn(grey, t).shape == (2,)


def test_lpips_wrong_or_missing_backbone(alex_weights, tmp_path):
    with pytest.raises(FileNotFoundError, match="vgg16.pth"):
        LPIPSLoss(tmp_path / "vgg16.pth", net="vgg")
    bad = dict(alex_weights[1])
    del bad["features.3.weight"]
    bad["features.0.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not a torchvision alexnet state_dict") as err:
        LPIPSLoss(tmp_path / "bad.pth", net="alex")
    assert "missing 'features.3.weight'" in str(err.value)
    assert "'features.0.weight' has shape (64, 3, 3, 3), expected (64, 3, 11, 11)" in str(err.value)


def test_make_feature_loss(alex_weights, monkeypatch):
    assert isinstance(make_feature_loss("data"), DataSpaceLoss)
    with pytest.raises(ValueError, match="data.*inception.*lpips"):
        make_feature_loss("clip")
    for kind in ("inception", "lpips"):
        with pytest.raises(ValueError, match="weights_path"):
            make_feature_loss(kind)
    assert isinstance(make_feature_loss("lpips", alex_weights[0], lpips_net="alex"), LPIPSLoss)
    # The inception branch wraps InceptionFeatures(path, device) in a FeatureSpaceLoss (stubbed: the
    # real extractor is covered above and is slow to build).
    calls = []
    fake = lambda *a, **k: calls.append((a, k)) or torch.nn.Identity()  # noqa: E731
    monkeypatch.setattr(features, "InceptionFeatures", fake)
    loss = make_feature_loss("inception", "w.pth", device="cpu")
    assert isinstance(loss, FeatureSpaceLoss) and isinstance(loss.extractor, torch.nn.Identity)
    assert calls == [(("w.pth",), {"device": "cpu"})]
