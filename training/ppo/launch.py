"""RDPO command line (docs/authors-code.md §7.7), with the authors' flags.

    python -m training.ppo.launch --config training/ppo/cfgs/digits.yaml
    torchrun --nproc_per_node=2 -m training.ppo.launch --config training/ppo/cfgs/sd15.yaml \\
        --override data.predictor_snapshot=exps/sd15/sd15-distilled.pkl --override ppo.steps=2000
    python -m training.ppo.launch --resume exps/00003-digits-rdpo          # continue a killed run
    python -m training.ppo.launch --config ... --dry-run                       # resolve, check, print
"""

from __future__ import annotations

import sys

from omegaconf import OmegaConf

from safeio.cli import ArgumentParser, entry_point
from training.runs import ConfigError

from .config import load_config

__all__ = ["main", "dry_run_report"]


def dry_run_report(config) -> list[str]:
    """What a run would use, checked without loading any model: the start table, the reward heads."""
    from solvers.table import load_table
    from training.rewards import available_rewards

    table = load_table(config.data.predictor_snapshot)
    heads = [config.reward.type] if config.reward.type != "multi" else \
        [name for name, weight in config.reward.weights.items() if float(weight) > 0]
    missing = [h for h in heads if h not in available_rewards()]
    if missing:
        raise ConfigError(f"reward head(s) {', '.join(missing)} are not available in this build; available: "
                          f"{', '.join(available_rewards())}")
    from pathlib import Path

    from training.rewards.pretrained import head_entries, resolve

    absent = []
    for head in heads:
        options = dict(config.reward.heads.get(head, {}) or {}) if config.reward.type == "multi" else dict(config.reward)
        for file_name, option in head_entries(head):
            given = options.get(option)
            try:
                if given is None:
                    resolve(file_name)
                elif not Path(given).exists():
                    raise FileNotFoundError(f"reward.heads.{head}.{option} = {given} does not exist")
            except FileNotFoundError as err:
                absent.append(str(err))
    if absent:
        raise ConfigError("missing reward weights:\n  " + "\n  ".join(absent))
    return [f"start table: {config.data.predictor_snapshot} (N = {table.num_steps}, K = {table.num_points}, "
            f"backend {table.metadata.get('backend')}, NFE {table.eval_count().sequential})",
            f"reward heads: {', '.join(heads)}", "config OK"]


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description="RDPO: fine-tune an EPD table with PPO on a reward (Stage 2)")
    parser.add_argument("--config", help="YAML file (training/ppo/cfgs/*.yaml)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="set one setting, e.g. ppo.learning_rate=1e-4 (repeatable)")
    parser.add_argument("--run-name", help="run.run_name")
    parser.add_argument("--max-steps", type=int, help="ppo.steps")
    parser.add_argument("--resume", help="an existing run folder to continue")
    parser.add_argument("--dry-run", action="store_true", help="resolve and check the config, print it, exit")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    overrides = list(args.override)
    if args.run_name:
        overrides.append(f"run.run_name={args.run_name}")
    if args.max_steps is not None:
        overrides.append(f"ppo.steps={args.max_steps}")
    if not args.config and not args.resume:
        parser.error("give --config (or --resume RUN_DIR)")
    if args.dry_run:
        config = load_config(args.config if not args.resume else f"{args.resume}/config.yaml", overrides)
        print(OmegaConf.to_yaml(config))
        for line in dry_run_report(config):
            print(line)
        return 0
    from .trainer import train

    table, folder = train(args.config, overrides, resume=args.resume, progress=not args.no_progress)
    print(f"run folder: {folder}\nmean table: {folder / 'table-mean.pkl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
