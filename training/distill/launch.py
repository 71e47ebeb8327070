"""Stage-1 distillation CLI.

    python -m training.distill.launch --config configs/distill/gmm-nfe5.yaml [--override key=value ...]
    torchrun --nproc_per_node=N -m training.distill.launch --config ...       # DDP (gloo on CPU, NCCL on GPU)
    python -m training.distill.launch --resume exps/00003-gmm-nfe5           # continue a killed run
    python -m training.distill.launch --config configs/distill/gmm-nfe5.yaml --search   # recipe search

The authors' ``train.py`` flags work too and become overrides, e.g. ``--num_steps 4 --sampler_tea heun --M 3
--afs True --scale_dir 0.05 --batch 32 --lr 0.2 --coslr --total_kimg 10``; ``--dataset_name cifar10`` without
``--config`` picks ``configs/distill/cifar10.yaml``. With neither, the defaults of
``training/distill/config.py`` apply (the embedded ``gmm`` model).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from safeio.cli import ArgumentParser, entry_point

__all__ = ["main", "AUTHOR_FLAGS"]

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "distill"

# The authors' train.py flag -> our config key (docs/authors-code.md §6.1).
AUTHOR_FLAGS = {
    "dataset_name": "dataset", "num_steps": "student.num_steps", "sampler_stu": "student.solver",
    "sampler_tea": "teacher.solver", "M": "teacher.M", "guidance_type": "guidance.type",
    "guidance_rate": "guidance.rate", "schedule_type": "schedule.kind", "schedule_rho": "schedule.rho",
    "afs": "student.afs", "scale_dir": "student.scale_dir", "scale_time": "student.scale_time",
    "max_order": "student.max_order", "batch": "batch", "batch_gpu": "batch_gpu", "lr": "optim.lr",
    "num_points": "student.num_points", "alpha": "loss.alpha", "total_kimg": "total_kimg", "seed": "seed",
    "outdir": "outdir", "desc": "name",
}
_SWITCHES = {"coslr": "optim.cosine", "fcn": "student.fcn"}
_IGNORED = ("predict_x0", "lower_order_final")  # metadata only in the authors' code (docs/authors-code.md §2.1)


def _value(text: str) -> str:
    lowered = text.lower()
    return {"true": "true", "false": "false", "none": "null"}.get(lowered, text)


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m training.distill.launch",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config", type=Path, help="YAML config (see configs/distill/)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="omegaconf dotlist override, repeatable (e.g. optim.lr=0.1)")
    parser.add_argument("--resume", type=Path, help="a run folder to continue from its checkpoint")
    parser.add_argument("--search", action="store_true",
                        help="recipe search: short runs of the candidate recipes of the config's search section, "
                             "the best on validation trained to the full budget (docs/distill/recipe.md)")
    parser.add_argument("--no-progress", action="store_true")
    for flag in AUTHOR_FLAGS:
        names = [f"--{flag}"] + ([f"--{flag.replace('_', '-')}"] if "_" in flag else [])
        parser.add_argument(*names, dest=f"author_{flag}", metavar="V", help=argparse.SUPPRESS)
    for flag in _SWITCHES:
        parser.add_argument(f"--{flag}", dest=f"author_{flag}", nargs="?", const="true", help=argparse.SUPPRESS)
    for flag in _IGNORED:
        parser.add_argument(f"--{flag}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    overrides = []
    for flag, key in {**AUTHOR_FLAGS, **_SWITCHES}.items():
        value = getattr(args, f"author_{flag}")
        if value is not None:
            overrides.append(f"{key}={_value(value)}")
    overrides += args.override
    if args.search:
        overrides.append("search.enabled=true")
    config = args.config
    if config is None and args.resume is None and args.author_dataset_name is not None:
        config = CONFIG_DIR / f"{args.author_dataset_name}.yaml"
        if not config.is_file():
            parser.error(f"no config for dataset {args.author_dataset_name!r} ({config} is missing)")

    from .trainer import train

    table, folder = train(config, overrides, resume=args.resume, progress=not args.no_progress)
    from backends.distributed import leave_process_group, rank_and_world

    if rank_and_world()[0] == 0:
        counts = table.eval_count()
        print(f"run folder: {folder}")
        print(f"table: {folder / 'table.pkl'} (NFE {counts.sequential} sequential, {counts.total} total)")
    leave_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
