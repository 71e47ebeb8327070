"""Offline reward heads for the embedded analytic models (8x8 digits in ``[-1, 1]``): adherence + realism.

* ``digit_class`` (prompt adherence): the probability that a small classifier, trained here at run time on
  the bundled digits, gives the prompted digit (prompts parse as in ``AnalyticDiffusion.encode_prompts``;
  ``""`` scores the largest class probability). The classifier is an MLP ``64 -> 256 -> 10`` (ReLU),
  trained deterministically (seed 0, float64, AdamW with a one-cycle schedule, 30 epochs) on a fixed
  80 % split with Gaussian-noise and Gaussian-blur augmentation, so the soft samples of few-step solvers
  are read as digits, and temperature-calibrated on the held-out 20 % (NLL). It never touches the global
  torch RNG and is cached per process (:func:`clear_cache` forgets it). Training takes about 1.3 s on
  2 CPU cores; held-out accuracy 98.6 % (354/359, temperature 1.42; :func:`classifier_accuracy`).
* ``digit_realism`` (closeness to the data manifold): ``d`` = RMS per-pixel distance to the nearest of the
  1797 digits (:func:`nearest_training_distance`), score ``exp(-(d / scale)^2)``. ``scale`` is calibrated so
  that real digits scored leave-one-out (nearest among the *other* digits) have median score 0.5:
  ``scale = median_LOO_d / sqrt(ln 2)`` = 0.3026 (median LOO RMS distance 0.2519; :func:`realism_scale`).
  Being an L2 nearest-neighbour score it favours smooth, prototype-like images (a blurred class mean is
  closer to many digits than they are to each other): pair it with ``digit_class`` and watch for blur.

Both heads are already in ``[0, 1]``: ``normalise`` is the identity. Images are clamped to ``[-1, 1]`` (as
the decoders do) and must be ``[B, 1, 8, 8]``.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from backends.analytic import AnalyticDiffusion, load_digits_data
from training.rewards.registry import register_reward

__all__ = ["DigitClassifier", "DigitClassHead", "DigitRealismHead", "get_digit_classifier",
           "classifier_accuracy", "holdout_indices", "nearest_training_distance", "leave_one_out_distances",
           "realism_scale", "clear_cache", "check_digit_images", "DIGIT_SHAPE"]

DIGIT_SHAPE = (1, 8, 8)
HOLDOUT_FRACTION = 0.2
_LOCK = threading.Lock()
_CLASSIFIERS: dict[int, "DigitClassifier"] = {}
_SCALE: list[float] = []


def check_digit_images(images: torch.Tensor) -> torch.Tensor:
    """Validate ``[B, 1, 8, 8]`` float images and return them flat ``[B, 64]`` float64 on the CPU, clamped."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4 or tuple(images.shape[1:]) != DIGIT_SHAPE:
        raise ValueError(f"digit rewards take images [B, 1, 8, 8] in [-1, 1], got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"digit rewards take float images [B, 1, 8, 8] in [-1, 1], got dtype {images.dtype}")
    return images.detach().to("cpu", torch.float64).reshape(images.shape[0], -1).clamp(-1, 1)


def _parse_labels(prompts: Sequence[str], batch: int) -> torch.Tensor:
    prompts = list(prompts)
    if len(prompts) != batch:
        raise ValueError(f"got {len(prompts)} prompts for {batch} images")
    return AnalyticDiffusion().encode_prompts(prompts)


# -- the classifier ---------------------------------------------------------------------------------------

class _MLP(nn.Module):
    """64 -> hidden -> 10, initialised from an explicit generator (the global RNG is left alone)."""

    def __init__(self, hidden: int, generator: torch.Generator):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(hidden, 64, dtype=torch.float64))
        self.b1 = nn.Parameter(torch.empty(hidden, dtype=torch.float64))
        self.w2 = nn.Parameter(torch.empty(10, hidden, dtype=torch.float64))
        self.b2 = nn.Parameter(torch.empty(10, dtype=torch.float64))
        with torch.no_grad():
            for weight, bias in ((self.w1, self.b1), (self.w2, self.b2)):
                bound = 1.0 / math.sqrt(weight.shape[1])
                weight.uniform_(-bound, bound, generator=generator)
                bias.uniform_(-bound, bound, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.w1.T + self.b1) @ self.w2.T + self.b2


def _blur_kernels(sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample normalised 3x3 Gaussian kernels ``[B, 1, 3, 3]``."""
    offsets = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    g = torch.exp(-0.5 * (offsets[None] / sigmas[:, None]) ** 2)
    g = g / g.sum(1, keepdim=True)
    return (g[:, :, None] * g[:, None, :])[:, None]


def _augment(flat: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random blur (p = 0.5, sigma 0.3-1.0, background padding) then Gaussian noise (sigma 0-0.2), clamped."""
    batch = flat.shape[0]
    images = flat.view(batch, 1, 8, 8)
    sigmas = 0.3 + 0.7 * torch.rand(batch, generator=generator, dtype=torch.float64)
    padded = nn.functional.pad(images, (1, 1, 1, 1), value=-1.0).view(1, batch, 10, 10)
    blurred = nn.functional.conv2d(padded, _blur_kernels(sigmas), groups=batch).view(batch, 1, 8, 8)
    use_blur = torch.rand(batch, generator=generator, dtype=torch.float64) < 0.5
    images = torch.where(use_blur[:, None, None, None], blurred, images)
    noise_sd = 0.2 * torch.rand(batch, 1, 1, 1, generator=generator, dtype=torch.float64)
    images = images + noise_sd * torch.randn(images.shape, generator=generator, dtype=torch.float64)
    return images.clamp(-1, 1).view(batch, -1)


@dataclass
class DigitClassifier:
    """The trained MLP, its calibration temperature, the split and its held-out accuracy / NLL."""

    net: _MLP
    temperature: float
    accuracy: float
    holdout_nll: float
    train_indices: torch.Tensor
    holdout_indices: torch.Tensor
    train_seconds: float
    seed: int

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Calibrated logits ``[B, 10]`` (float64, CPU) of images ``[B, 1, 8, 8]``."""
        flat = check_digit_images(images)
        with torch.inference_mode():
            return self.net(flat) / self.temperature

    def probs(self, images: torch.Tensor) -> torch.Tensor:
        """Calibrated class probabilities ``[B, 10]`` (float64, CPU)."""
        return torch.softmax(self.logits(images), dim=-1)


def _one_cycle(step: int, total: int, peak: float) -> float:
    """Learning rate: linear warm-up over the first 30 % of steps from peak/25, cosine down to peak/1e4."""
    warm = max(1, int(0.3 * total))
    if step <= warm:
        return peak / 25 + (peak - peak / 25) * step / warm
    progress = (step - warm) / max(1, total - warm)
    return peak / 1e4 + (peak - peak / 1e4) * 0.5 * (1 + math.cos(math.pi * progress))


def _adamw_step(params: list[torch.Tensor], grads: Sequence[torch.Tensor],
                moments: list[tuple[torch.Tensor, torch.Tensor]], step: int, lr: float, weight_decay: float,
                betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
    """One AdamW update, written out (``torch.optim`` would import ``torch._dynamo``: seconds at start-up)."""
    with torch.no_grad():
        for param, grad, (mean, sq) in zip(params, grads, moments):
            param.mul_(1 - lr * weight_decay)
            mean.mul_(betas[0]).add_(grad, alpha=1 - betas[0])
            sq.mul_(betas[1]).addcmul_(grad, grad, value=1 - betas[1])
            denom = (sq / (1 - betas[1] ** step)).sqrt_().add_(eps)
            param.addcdiv_(mean, denom, value=-lr / (1 - betas[0] ** step))


def _split(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    n_hold = int(round(HOLDOUT_FRACTION * count))
    return perm[n_hold:].sort().values, perm[:n_hold].sort().values


def _train(seed: int, hidden: int = 256, epochs: int = 30, batch_size: int = 64, lr: float = 1e-2,
           weight_decay: float = 1e-4) -> DigitClassifier:
    start = time.perf_counter()
    images, labels = load_digits_data()
    flat = images.reshape(images.shape[0], -1).double()
    train_idx, hold_idx = _split(flat.shape[0], seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.inference_mode(False), torch.enable_grad():
        net = _MLP(hidden, generator)
        x_train, y_train = flat[train_idx].clone(), labels[train_idx].clone()
        params = list(net.parameters())
        moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
        steps = epochs * math.ceil(len(train_idx) / batch_size)
        step = 0
        for _ in range(epochs):
            augmented = _augment(x_train, generator)
            order = torch.randperm(len(train_idx), generator=generator)
            for i in range(0, len(order), batch_size):
                batch = order[i:i + batch_size]
                loss = nn.functional.cross_entropy(net(augmented[batch]), y_train[batch])
                grads = torch.autograd.grad(loss, params)
                step += 1
                _adamw_step(params, grads, moments, step, _one_cycle(step, steps, lr), weight_decay)
    net.eval().requires_grad_(False)
    with torch.inference_mode():
        hold_logits = net(flat[hold_idx])
        hold_labels = labels[hold_idx]
        accuracy = float((hold_logits.argmax(-1) == hold_labels).double().mean())
        temps = torch.exp(torch.linspace(math.log(0.2), math.log(5.0), 321, dtype=torch.float64))
        nll = torch.stack([nn.functional.cross_entropy(hold_logits / t, hold_labels) for t in temps])
        best = int(nll.argmin())
    return DigitClassifier(net=net, temperature=float(temps[best]), accuracy=accuracy,
                           holdout_nll=float(nll[best]), train_indices=train_idx, holdout_indices=hold_idx,
                           train_seconds=time.perf_counter() - start, seed=seed)


def get_digit_classifier(seed: int = 0) -> DigitClassifier:
    """The classifier for ``seed``, trained once per process (deterministic)."""
    with _LOCK:
        if seed not in _CLASSIFIERS:
            _CLASSIFIERS[seed] = _train(seed)
        return _CLASSIFIERS[seed]


def classifier_accuracy(seed: int = 0) -> float:
    """Accuracy of the classifier on its held-out 20 % of the real digits."""
    return get_digit_classifier(seed).accuracy


def holdout_indices(seed: int = 0) -> torch.Tensor:
    """Indices (into ``load_digits_data()``) of the digits the classifier never trained on."""
    return get_digit_classifier(seed).holdout_indices.clone()


def clear_cache() -> None:
    """Forget the trained classifiers and the realism scale (the next use recomputes them)."""
    with _LOCK:
        _CLASSIFIERS.clear()
        _SCALE.clear()


# -- realism ------------------------------------------------------------------------------------------------

def _reference(exclude: torch.Tensor | Sequence[int] | None) -> torch.Tensor:
    images, _ = load_digits_data()
    flat = images.reshape(images.shape[0], -1).double()
    if exclude is None:
        return flat
    keep = torch.ones(flat.shape[0], dtype=torch.bool)
    keep[torch.as_tensor(exclude, dtype=torch.long)] = False
    if not bool(keep.any()):
        raise ValueError("exclude leaves no reference digits")
    return flat[keep]


def _rms_min_distance(flat: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    sq = (flat * flat).sum(-1, keepdim=True) - 2 * flat @ reference.T + (reference * reference).sum(-1)[None]
    return (sq.clamp_min(0).min(-1).values / flat.shape[1]).sqrt()


def nearest_training_distance(images: torch.Tensor,
                              exclude: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
    """RMS per-pixel distance ``[B]`` (float64, CPU) from each image to the nearest of the 1797 digits
    (``sqrt(min_i |x - y_i|^2 / 64)`` in ``[-1, 1]`` pixels), leaving out the digits indexed by ``exclude``."""
    flat = check_digit_images(images)
    reference = _reference(exclude)
    return torch.cat([_rms_min_distance(flat[i:i + 4096], reference) for i in range(0, flat.shape[0], 4096)]) \
        if flat.shape[0] else torch.zeros(0, dtype=torch.float64)


def leave_one_out_distances() -> torch.Tensor:
    """For each of the 1797 digits, the RMS distance ``[1797]`` to its nearest *other* digit."""
    flat = _reference(None)
    sq = (flat * flat).sum(-1, keepdim=True) - 2 * flat @ flat.T + (flat * flat).sum(-1)[None]
    sq.fill_diagonal_(float("inf"))
    return (sq.clamp_min(0).min(-1).values / flat.shape[1]).sqrt()


def realism_scale() -> float:
    """``median(leave_one_out_distances()) / sqrt(ln 2)``: real digits scored leave-one-out have median 0.5."""
    with _LOCK:
        if not _SCALE:
            _SCALE.append(float(leave_one_out_distances().median()) / math.sqrt(math.log(2.0)))
        return _SCALE[0]


# -- heads --------------------------------------------------------------------------------------------------

class DigitClassHead:
    """Prompt adherence: the calibrated probability of the prompted digit (max probability for ``""``)."""

    name = "digit_class"

    def __init__(self, seed: int = 0):
        self.classifier = get_digit_classifier(int(seed))

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        probs = self.classifier.probs(images)
        labels = _parse_labels(prompts, probs.shape[0])
        prompted = probs.gather(1, labels.clamp_min(0)[:, None])[:, 0]
        return torch.where(labels >= 0, prompted, probs.max(-1).values).float()

    def normalise(self, scores: torch.Tensor) -> torch.Tensor:
        return scores


class DigitRealismHead:
    """Realism: ``exp(-(d / scale)^2)`` with ``d`` the RMS distance to the nearest training digit."""

    name = "digit_realism"

    def __init__(self, scale: float | None = None, exclude: torch.Tensor | Sequence[int] | None = None):
        self.scale = realism_scale() if scale is None else float(scale)
        if not self.scale > 0:
            raise ValueError(f"digit_realism scale must be > 0, got {scale}")
        self.exclude = None if exclude is None else torch.as_tensor(exclude, dtype=torch.long).clone()

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        _parse_labels(prompts, images.shape[0])
        distance = nearest_training_distance(images, self.exclude)
        return torch.exp(-(distance / self.scale) ** 2).float()

    def normalise(self, scores: torch.Tensor) -> torch.Tensor:
        return scores


@register_reward("digit_class")
def _make_digit_class(seed: int = 0) -> DigitClassHead:
    return DigitClassHead(seed=seed)


@register_reward("digit_realism")
def _make_digit_realism(scale: float | None = None,
                        exclude: torch.Tensor | Sequence[int] | None = None) -> DigitRealismHead:
    return DigitRealismHead(scale=scale, exclude=exclude)
