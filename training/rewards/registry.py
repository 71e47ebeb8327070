"""One registry of reward heads, and the weighted multi-reward of docs/authors-code.md §7.4.

Trainers only ever talk to this module: a head is built by name (:func:`build_reward`) from a factory that
its own module registered with :func:`register_reward`, so no trainer imports a specific reward model.

* A :class:`RewardHead` maps images ``[B, C, H, W]`` in ``[-1, 1]`` and ``B`` prompts to raw scores ``[B]``,
  and :meth:`RewardHead.normalise` maps raw scores to ``[0, 1]`` (e.g. ``clamp(score / 26, 0, 1)`` for
  PickScore).
* :class:`MultiReward` mixes the normalised scores of the heads with a positive weight:
  ``R = sum_h w_h norm_h / sum_h max(w_h, 0)``. Heads with weight ``<= 0`` are never built, so they need
  no files (docs/authors-code.md §9.39 is fixed: validation does not ask for weights of unused heads).
* :func:`reward_from_config` builds one from a config mapping; ``{"type": "<head>", "raw": true}`` is the
  authors' ``reward.type: hps`` (the raw score of one head, no clamp).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol, Sequence, runtime_checkable

import torch

__all__ = ["RewardHead", "RewardResult", "MultiReward", "register_reward", "unregister_reward",
           "available_rewards", "build_reward", "reward_options", "reward_from_config", "prompts_for",
           "score_in_chunks"]


def prompts_for(images: torch.Tensor, prompts: Sequence[str]) -> list[str]:
    """``prompts`` as a list, checked to hold one prompt per image of ``images [B, ...]``."""
    prompts = list(prompts)
    if len(prompts) != images.shape[0]:
        raise ValueError(f"got {len(prompts)} prompts for {images.shape[0]} images")
    return prompts


def score_in_chunks(images: torch.Tensor, prompts: Sequence[str], batch_size: int,
                    score_chunk: Callable[[torch.Tensor, list[str]], torch.Tensor]) -> torch.Tensor:
    """``score_chunk`` over consecutive chunks of at most ``batch_size`` images (with their prompts), the
    scores concatenated: ``[B]`` on the CPU, float32 (empty for an empty batch)."""
    prompts = prompts_for(images, prompts)
    parts = [score_chunk(images[lo:lo + batch_size], prompts[lo:lo + batch_size]).to("cpu", torch.float32)
             for lo in range(0, len(prompts), batch_size)]
    return torch.cat(parts) if parts else torch.zeros(0)


@runtime_checkable
class RewardHead(Protocol):
    """A reward model: raw scores and their map to ``[0, 1]``."""

    name: str

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Raw scores ``[B]`` (float32) of images ``[B, C, H, W]`` in ``[-1, 1]`` for their prompts."""
        ...

    def normalise(self, scores: torch.Tensor) -> torch.Tensor:
        """Raw scores -> ``[0, 1]`` (the per-head map of docs/authors-code.md §7.4)."""
        ...


RewardFactory = Callable[..., RewardHead]
_REGISTRY: dict[str, RewardFactory] = {}


def register_reward(name: str) -> Callable[[RewardFactory], RewardFactory]:
    """Decorator registering ``factory(**options) -> RewardHead`` under ``name``; a duplicate name is an error."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"reward name must be a non-empty string, got {name!r}")

    def decorate(factory: RewardFactory) -> RewardFactory:
        if name in _REGISTRY:
            raise ValueError(f"reward {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorate


def unregister_reward(name: str) -> None:
    """Remove ``name`` from the registry (for tests); unknown names are ignored."""
    _REGISTRY.pop(name, None)


def available_rewards() -> list[str]:
    """The registered head names, sorted."""
    return sorted(_REGISTRY)


def reward_options(name: str) -> tuple[set[str], bool]:
    """``(keyword options, accepts any **options)`` of the head ``name``'s factory (for CLIs that map their
    flags onto heads); an unknown name is a ValueError."""
    import inspect

    factory = _REGISTRY.get(name)
    if factory is None:
        raise ValueError(f"unknown reward {name!r}; available: {', '.join(available_rewards()) or '(none)'}")
    params = inspect.signature(factory).parameters.values()
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names, any(p.kind == p.VAR_KEYWORD for p in params)


def build_reward(name: str, **options) -> RewardHead:
    """Build the head registered as ``name`` with ``options``; an unknown name is a ValueError."""
    factory = _REGISTRY.get(name)
    if factory is None:
        raise ValueError(f"unknown reward {name!r}; available: {', '.join(available_rewards()) or '(none)'}")
    head = factory(**options)
    if not isinstance(head, RewardHead):
        raise TypeError(f"the factory of reward {name!r} returned {type(head).__name__}, not a RewardHead")
    return head


@dataclass
class RewardResult:
    """The mixed reward ``[B]`` (float32, CPU) and every built head's raw and normalised scores."""

    reward: torch.Tensor
    raw: dict[str, torch.Tensor] = field(default_factory=dict)
    normalised: dict[str, torch.Tensor] = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        """``mixed_reward_mean``, ``mixed_reward_std`` (population) and ``<head>_mean`` of the raw scores."""
        out = {"mixed_reward_mean": float(self.reward.double().mean()),
               "mixed_reward_std": float(self.reward.double().std(unbiased=False)) if self.reward.numel() else math.nan}
        for name, scores in self.raw.items():
            out[f"{name}_mean"] = float(scores.double().mean())
        return out


class MultiReward:
    """Weighted mix of normalised head scores (docs/authors-code.md §7.4): ``R = sum_h w_h norm_h / sum_h max(w_h, 0)``.

    Only heads with weight ``> 0`` are built (``build_reward(name, **options.get(name, {}))``) or taken from
    ``heads``; the others contribute nothing and need nothing. ``raw=True`` (one head only) returns that
    head's raw score as the reward. Scores are gathered on the CPU as float32.
    """

    def __init__(self, weights: Mapping[str, float], options: Mapping[str, Mapping] | None = None,
                 heads: Mapping[str, RewardHead] | None = None, batch_size: int | None = None,
                 raw: bool = False):
        options = dict(options or {})
        given = dict(heads or {})
        clean: dict[str, float] = {}
        for name, weight in weights.items():
            w = float(weight)
            if not math.isfinite(w):
                raise ValueError(f"reward weight of {name!r} must be finite, got {weight!r}")
            clean[name] = w
        stray = sorted(set(given) - set(clean))
        if stray:
            raise ValueError(f"heads given without a weight: {', '.join(stray)}")
        self.weights = {name: w for name, w in clean.items() if w > 0}
        self.total_weight = sum(self.weights.values())
        if self.total_weight <= 0:
            raise ValueError(f"reward weights {dict(weights)} have no positive weight")
        if batch_size is not None and int(batch_size) < 1:
            raise ValueError(f"reward batch_size must be >= 1, got {batch_size}")
        self.batch_size = None if batch_size is None else int(batch_size)
        self.raw = bool(raw)
        if self.raw and len(self.weights) != 1:
            raise ValueError("raw=True takes exactly one head with a positive weight")
        self.heads: dict[str, RewardHead] = {}
        for name in self.weights:
            if name in given:
                self.heads[name] = given[name]
            else:
                opts = options.get(name) or {}
                if not isinstance(opts, Mapping):
                    raise ValueError(f"options of reward {name!r} must be a mapping, got {type(opts).__name__}")
                self.heads[name] = build_reward(name, **opts)

    @property
    def names(self) -> list[str]:
        """The built heads, in weight order."""
        return list(self.heads)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], batch_size: int | None = None) -> RewardResult:
        """Score ``images [B, ...]`` for ``prompts`` (``B`` of them) in chunks of ``batch_size`` images."""
        prompts = prompts_for(images, prompts)
        total = len(prompts)
        chunk = batch_size if batch_size is not None else self.batch_size
        chunk = total if chunk is None else int(chunk)
        if chunk < 1:
            raise ValueError(f"batch_size must be >= 1, got {chunk}")
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in self.heads}
        for start in range(0, total, chunk):
            sub_images, sub_prompts = images[start:start + chunk], prompts[start:start + chunk]
            for name, head in self.heads.items():
                scores = torch.as_tensor(head.score(sub_images, sub_prompts)).detach()
                if scores.shape != (sub_images.shape[0],):
                    raise ValueError(f"reward {name!r} returned shape {tuple(scores.shape)} for "
                                     f"{sub_images.shape[0]} images")
                parts[name].append(scores.to("cpu", torch.float32))
        raw = {name: torch.cat(p) if p else torch.zeros(0) for name, p in parts.items()}
        normalised = {name: torch.as_tensor(self.heads[name].normalise(s)).detach().to("cpu", torch.float32)
                      for name, s in raw.items()}
        if self.raw:
            reward = next(iter(raw.values())).clone()
        else:
            mixed = torch.zeros(total, dtype=torch.float64)
            for name, w in self.weights.items():
                mixed += w * normalised[name].double()
            reward = (mixed / self.total_weight).float()
        return RewardResult(reward=reward, raw=raw, normalised=normalised)

    def __repr__(self) -> str:
        return f"MultiReward(weights={self.weights}, raw={self.raw}, batch_size={self.batch_size})"


_MULTI_KEYS = {"type", "weights", "heads", "batch_size"}


def reward_from_config(cfg: Mapping) -> MultiReward:
    """Build a reward from a config mapping.

    * ``{"type": "multi", "weights": {name: w}, "heads": {name: options}, "batch_size": n}``;
    * ``{"type": "<head>", "raw": bool, "batch_size": n, **options}``: one head, its normalised score as
      the reward, or its raw score with ``raw: true`` (the authors' ``reward.type: hps``).
    """
    cfg = dict(cfg)
    kind = cfg.get("type")
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"reward config needs a 'type' (multi or a head: {', '.join(available_rewards())})")
    batch_size = cfg.get("batch_size")
    if kind == "multi":
        unknown = sorted(set(cfg) - _MULTI_KEYS)
        if unknown:
            raise ValueError(f"unknown keys in a multi reward config: {', '.join(unknown)} "
                             f"(allowed: {', '.join(sorted(_MULTI_KEYS))})")
        weights = cfg.get("weights")
        if not isinstance(weights, Mapping) or not weights:
            raise ValueError("a multi reward config needs a non-empty 'weights' mapping")
        heads = cfg.get("heads") or {}
        if not isinstance(heads, Mapping):
            raise ValueError("'heads' of a multi reward config must map head names to options")
        return MultiReward(weights, options=heads, batch_size=batch_size)
    options = {k: v for k, v in cfg.items() if k not in ("type", "raw", "batch_size")}
    return MultiReward({kind: 1.0}, options={kind: options}, batch_size=batch_size, raw=bool(cfg.get("raw", False)))
