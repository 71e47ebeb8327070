"""Reward heads for Stage 2 (RDPO): one registry, built by name, mixed as in docs/authors-code.md §7.4.

Importing this package registers the built-in heads by importing their modules (listed in
``_BUILTIN_MODULES``). Those modules must stay light at import time: heavy dependencies (open_clip,
transformers, weights) are imported inside the factories, so ``import training.rewards`` never loads them.
"""

from __future__ import annotations

import importlib

from training.rewards.registry import (MultiReward, RewardHead, RewardResult, available_rewards, build_reward,
                                       register_reward, reward_from_config, unregister_reward)

__all__ = ["RewardHead", "RewardResult", "MultiReward", "register_reward", "unregister_reward",
           "available_rewards", "build_reward", "reward_from_config"]

_BUILTIN_MODULES = ("training.rewards.digits", "training.rewards.image_stats", "training.rewards.hps",
                    "training.rewards.clip_score", "training.rewards.pickscore", "training.rewards.imagereward",
                    "training.rewards.mps")

for _module in _BUILTIN_MODULES:
    importlib.import_module(_module)
