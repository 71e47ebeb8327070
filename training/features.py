"""Pluggable feature losses for the final-step loss of Stage-1 distillation.

A :class:`FeatureLoss` maps a student batch and a teacher batch of images in
``[-1, 1]`` with shape ``[B, C, H, W]`` (``C`` in {1, 3}) to a per-sample loss
``[B]`` that is differentiable w.r.t. the student.  The teacher is always treated
as a constant target (detached / computed under ``no_grad``).

* :class:`DataSpaceLoss`     -- ``mean((s - t)^2)`` over all elements.
* :class:`FeatureSpaceLoss`  -- ``mean((f(s) - f(t))^2)`` over features of an extractor ``f``.
* :class:`InceptionFeatures` -- 2048-d pool features of the FID Inception-v3 (pytorch-fid port
  of TF ``inception-2015-12-05``), loaded from a local file; never downloads.
* :class:`LPIPSLoss`         -- LPIPS (``lpips`` package) with the torchvision backbone loaded
  from a local file.

Pretrained networks are frozen and kept in eval mode, but gradients flow to their input.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, Protocol

import torch
from torch import nn

__all__ = [
    "FeatureLoss",
    "DataSpaceLoss",
    "FeatureSpaceLoss",
    "InceptionFeatures",
    "LPIPSLoss",
    "make_feature_loss",
    "FID_WEIGHTS_FILENAME",
]

FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
_KINDS = ("data", "inception", "lpips")


class FeatureLoss(Protocol):
    def __call__(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """Per-sample loss ``[B]``, differentiable w.r.t. ``student``."""
        ...


def _to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Repeat grey ``[B, 1, H, W]`` images to 3 channels; pass RGB through."""
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape [B, 1|3, H, W], got {tuple(x.shape)}")
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def _require_file(path: str | os.PathLike, what: str) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found at '{path}'; provide it locally (no downloads).")
    return path


class _FrozenModule(nn.Module):
    """Base for pretrained networks: parameters frozen, always in eval mode."""

    def _freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "_FrozenModule":
        return super().train(False)


class DataSpaceLoss(nn.Module):
    """Plain data-space loss: ``loss[b] = mean_{c,h,w} (student[b] - teacher[b])^2``."""

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return (student - teacher.detach()).pow(2).flatten(1).mean(1)


class FeatureSpaceLoss(nn.Module):
    """Feature-space loss: ``loss[b] = mean_k (f(student)[b, k] - f(teacher)[b, k])^2``.

    ``f(teacher)`` is computed under ``torch.no_grad()``.
    """

    def __init__(self, extractor: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.extractor = extractor

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            f_teacher = self.extractor(teacher)
        f_student = self.extractor(student)
        return (f_student - f_teacher).pow(2).flatten(1).mean(1)


class InceptionFeatures(_FrozenModule):
    """FID Inception-v3 pool features: images ``[B, C, H, W]`` in ``[-1, 1]`` -> ``[B, 2048]``.

    Built from ``pytorch_fid.inception.InceptionV3`` (bilinear resize to 299, own input
    normalisation) with weights read from ``weights_path``, which must be pytorch-fid's
    ``pt_inception-2015-12-05-6726825d.pth``.
    """

    def __init__(
        self, weights_path: str | os.PathLike, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        what = f"FID Inception weights (pytorch-fid's '{FID_WEIGHTS_FILENAME}')"
        path = _require_file(weights_path, what)
        from pytorch_fid import inception as fid_inception

        def _local_loader(*args, **kwargs) -> dict[str, torch.Tensor]:
            return torch.load(path, map_location="cpu", weights_only=True)

        original = fid_inception.load_state_dict_from_url
        fid_inception.load_state_dict_from_url = _local_loader
        try:
            self.net = fid_inception.InceptionV3(
                output_blocks=[3],
                resize_input=True,
                normalize_input=True,
                requires_grad=False,
                use_fid_inception=True,
            )
        finally:
            fid_inception.load_state_dict_from_url = original
        self._freeze()
        if device is not None:
            self.to(device)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (_to_rgb(images).float() + 1.0) / 2.0  # [-1, 1] -> [0, 1]; pytorch-fid rescales itself
        return self.net(x)[0].flatten(1)


class LPIPSLoss(_FrozenModule):
    """LPIPS distance per sample: ``loss[b] = sum_l mean_{h,w} w_l . (phi_l(s) - phi_l(t))^2``
    with unit-normalised backbone activations ``phi_l`` and the linear weights ``w_l`` shipped
    inside the ``lpips`` package. The torchvision backbone (``vgg16`` or ``alexnet``
    ``state_dict()``) is loaded from ``backbone_weights_path``.
    """

    def __init__(
        self,
        backbone_weights_path: str | os.PathLike,
        net: str = "vgg",
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if net not in ("vgg", "alex"):
            raise ValueError(f"net must be 'vgg' or 'alex', got {net!r}")
        path = _require_file(backbone_weights_path, f"LPIPS {net} backbone weights")
        import lpips

        with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=False`
            warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
            self.model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
        state = torch.load(path, map_location="cpu", weights_only=True)
        _load_lpips_backbone(self.model.net, state, path)
        self._freeze()
        if device is not None:
            self.to(device)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return self.model(_to_rgb(student), _to_rgb(teacher.detach())).flatten()


def _load_lpips_backbone(backbone: nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    """Copy torchvision ``features.N.<p>`` tensors into lpips' ``sliceK.N.<p>`` modules.

    lpips' vgg16/alexnet wrappers split torchvision's ``features`` into ``slice1..5`` but keep
    each layer's original index ``N`` as its module name, so the mapping is by ``N``.
    """
    mapped, problems = {}, []
    for key, target in backbone.state_dict().items():
        src_key = "features." + key.split(".", 1)[1]  # "sliceK.N.weight" -> "features.N.weight"
        src = state.get(src_key)
        if src is None:
            problems.append(f"missing {src_key!r}")
        elif src.shape != target.shape:
            problems.append(
                f"{src_key!r} has shape {tuple(src.shape)}, expected {tuple(target.shape)}"
            )
        else:
            mapped[key] = src
    if problems:
        raise ValueError(
            f"{path} is not a torchvision {type(backbone).__name__} state_dict "
            f"(keys 'features.N.weight'/'features.N.bias'): " + "; ".join(problems)
        )
    backbone.load_state_dict(mapped, strict=True)


def make_feature_loss(
    kind: str,
    weights_path: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    *,
    lpips_net: str = "vgg",
) -> FeatureLoss:
    """Build a feature loss: ``"data"`` (no weights), ``"inception"`` (FID Inception pool
    features; ``weights_path`` = ``pt_inception-2015-12-05-6726825d.pth``) or ``"lpips"``
    (``weights_path`` = torchvision ``lpips_net`` backbone ``state_dict``)."""
    if kind not in _KINDS:
        raise ValueError(f"unknown feature loss kind {kind!r}; choose one of {list(_KINDS)}")
    if kind == "data":
        return DataSpaceLoss()
    if weights_path is None:
        raise ValueError(
            f"feature loss {kind!r} needs weights_path: pretrained weights are loaded from a "
            "local file and never downloaded"
        )
    if kind == "inception":
        return FeatureSpaceLoss(InceptionFeatures(weights_path, device=device))
    return LPIPSLoss(weights_path, net=lpips_net, device=device)
