"""RDPO settings (docs/authors-code.md §7.7): defaults, YAML files with ``inherit:``, ``key=value`` overrides, checks.

The section and key names are the authors' (``run``, ``data``, ``model``, ``reward``, ``ppo``, ``logging``), so
their ``--override`` lines work. The grid, K and the schedule come from the start table (a table is only
valid on the grid it was fitted on), so the authors' ``model.schedule_*``/``num_steps``/``sigma_*`` keys are
accepted only as checks against the table. The backend and its options come from the table's metadata unless
``model.backend`` / ``model.backend_options`` say otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, OmegaConf

from training.runs import ConfigError, compose_config

__all__ = ["DEFAULTS", "ConfigError", "load_config", "validate"]

DEFAULTS: dict[str, Any] = {
    "run": {"output_root": "exps", "run_name": "rl_run", "seed": 0, "device": "auto",
            "export": None},                   # also write the final mean table here
    "data": {
        "predictor_snapshot": None,            # the start table (ours, .json, or the authors' release pickle)
        "prompt_csv": None,                    # .txt (a prompt per line) or .csv (text/prompt/caption column)
        "prompt_column": None,
        "prompts": None,                       # or an inline list of prompts
    },
    "model": {
        "backend": None,                       # default: the table's backend
        "backend_options": {},                 # loader options merged over the table's backend_config
        "guidance_rate": None,                 # default: the table's
        "resolution": None,
        "dataset_name": None,                  # metadata only
        "num_steps": None, "num_points": None,  # checks: must equal the table's
    },
    "reward": {
        "type": "multi",                       # multi, or one head's name (its raw score is the reward)
        "batch_size": 8,                       # images per reward-model call
        "weights": {},                         # head -> weight (multi); heads with weight <= 0 are not built
        "heads": {},                           # head -> its options (weights paths, devices, ...)
    },
    "ppo": {
        "rollout_batch_size": 16,              # images per PPO step over all ranks
        "rloo_k": 4,                           # images per prompt (the leave-one-out group)
        "ppo_epochs": 1,
        "minibatch_size": 4,                   # per rank
        "learning_rate": 7e-5,
        "betas": [0.9, 0.999],
        "weight_decay": 0.0,
        "clip_range": 0.2,
        "kl_coef": 0.0,
        "entropy_coef": 0.0,
        "max_grad_norm": 1.0,                  # null: no clipping
        "steps": 100,
        "dirichlet_concentration": 200.0,
        "parameterisation": "mean",            # mean (the authors': c * table) | mode (the mode equals the table)
        "scale_std": 0.05,
        "train_scale_dir": None,               # null: model the scales the table has
        "train_scale_time": None,
        "hidden": 128,                         # the authors' launch uses 128 x 2 (docs/authors-code.md §9.38)
        "blocks": 2,
        # the authors' RLOO groups that mix prompts (docs/authors-code.md §7.5, 9.35)
        "legacy_mixed_baseline": False,
        "standardize_advantages": True,
        "decode_rgb": True,                    # score decoded images (False: the raw states, analytic models)
    },
    "eval": {
        "prompts": None,                       # held-out prompts (a list or a file); null: the training prompts
        "seeds": "0-63",                       # held-out seeds (training seeds are >= 2^31)
        "interval": 0,                         # evaluate the mean table every n steps (0: start and end only)
    },
    "logging": {"log_interval": 1, "save_interval": 25},
}

_OPEN = ("model.backend_options", "reward.weights", "reward.heads")


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> DictConfig:
    """Defaults <- YAML file (with its ``inherit`` chain) <- ``key=value`` overrides; then :func:`validate`.
    Relative paths in the file (start table, prompt files) are taken relative to the working directory."""
    config = compose_config(DEFAULTS, path, overrides, open_sections=_OPEN)
    validate(config)
    return config


def validate(config: DictConfig, check_files: bool = True) -> None:
    """Types, ranges and files, with messages that name the setting (docs/authors-code.md §7.7, without 9.39: only the
    files of reward heads that are used are required, and that is the head's own check when it is built)."""

    def get(key: str) -> Any:
        return OmegaConf.select(config, key)

    def fail(key: str, why: str) -> None:
        raise ConfigError(f"setting '{key}' {why} (got {get(key)!r})")

    ppo = config.ppo
    if get("data.predictor_snapshot") is None:
        fail("data.predictor_snapshot", "is required: the start table (e.g. a distilled table)")
    if check_files and not Path(get("data.predictor_snapshot")).is_file():
        fail("data.predictor_snapshot", "must be an existing table file")
    if get("data.prompt_csv") is None and get("data.prompts") is None:
        fail("data.prompt_csv", "or data.prompts is required (the prompts to train on)")
    if check_files and get("data.prompt_csv") is not None and not Path(get("data.prompt_csv")).is_file():
        fail("data.prompt_csv", "must be an existing .txt or .csv file")
    for key in ("ppo.rollout_batch_size", "ppo.rloo_k", "ppo.ppo_epochs", "ppo.minibatch_size", "ppo.steps",
                "ppo.hidden", "ppo.blocks", "reward.batch_size", "logging.log_interval", "logging.save_interval"):
        if int(get(key)) < (0 if key == "ppo.blocks" else 1):
            fail(key, "must be a positive integer")
    if int(ppo.rollout_batch_size) % int(ppo.rloo_k):
        fail("ppo.rollout_batch_size", f"must be a multiple of ppo.rloo_k ({ppo.rloo_k})")
    for key in ("ppo.learning_rate", "ppo.dirichlet_concentration", "ppo.scale_std", "ppo.clip_range"):
        if float(get(key)) <= 0:
            fail(key, "must be > 0")
    for key in ("ppo.kl_coef", "ppo.entropy_coef", "ppo.weight_decay"):
        if float(get(key)) < 0:
            fail(key, "must be >= 0")
    if ppo.max_grad_norm is not None and float(ppo.max_grad_norm) <= 0:
        fail("ppo.max_grad_norm", "must be > 0 or null")
    if ppo.parameterisation not in ("mean", "mode"):
        fail("ppo.parameterisation", "must be 'mean' or 'mode'")
    if int(config.eval.interval) < 0:
        fail("eval.interval", "must be >= 0")
    reward = config.reward
    if reward.type == "multi":
        weights = {k: float(v) for k, v in reward.weights.items()}
        if not weights or sum(max(w, 0.0) for w in weights.values()) <= 0:
            fail("reward.weights", "needs at least one head with a positive weight")
