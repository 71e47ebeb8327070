"""Export an RDPO run's policy as a predictor table (docs/authors-code.md §7.8): the Dirichlet mean (the authors'
choice) or mode, scale tables included, with all metadata. Works on a finished or an interrupted run.

    python -m training.ppo.export exps/rdpo/00001-digits                      # -> RUN/export/table-mean-step000150.pkl
    python -m training.ppo.export RUN --kind mode --out my-table.pkl
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from safeio.cli import ArgumentParser, entry_point
from solvers.table import PredictorTable, load_table, save_table

from .cold_start import cold_start
from .config import load_config
from .policy import DirichletPolicy
from .trainer import policy_table

__all__ = ["export_run", "main"]


def export_run(run_dir: str | Path, kind: str = "mean", checkpoint: str | Path | None = None,
               out: str | Path | None = None) -> tuple[PredictorTable, Path]:
    """Rebuild the policy from the run's config, start table and checkpoint; write its table (``.pkl`` and the
    same as ``.json``) to ``out`` (default ``RUN/export/table-<kind>-step<step>.pkl``)."""
    run_dir = Path(run_dir)
    config = load_config(run_dir / "config.yaml")
    checkpoint = Path(checkpoint) if checkpoint else run_dir / "checkpoint.pt"
    if not checkpoint.is_file():
        raise FileNotFoundError(f"no checkpoint {checkpoint}")
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    start = load_table(config.data.predictor_snapshot)
    ppo = config.ppo
    policy = DirichletPolicy(cold_start(start, float(ppo.dirichlet_concentration), str(ppo.parameterisation)),
                             hidden=int(ppo.hidden), blocks=int(ppo.blocks), scale_std=float(ppo.scale_std),
                             train_scale_dir=ppo.train_scale_dir, train_scale_time=ppo.train_scale_time)
    policy.load_state_dict(saved["policy"])
    step = int(saved["step"])
    table = policy_table(policy, config, start, kind, steps=step)
    table = table.with_metadata(rdpo={**table.metadata["rdpo"], "checkpoint": str(checkpoint)})
    out = Path(out) if out else run_dir / "export" / f"table-{kind}-step{step:06d}.pkl"
    save_table(table, out)
    save_table(table, out.with_suffix(".json"))
    return table, out


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description="Export an RDPO run's policy as a predictor table")
    parser.add_argument("run_dir")
    parser.add_argument("--kind", default="mean", choices=("mean", "mode"))
    parser.add_argument("--checkpoint", help="default: RUN/checkpoint.pt")
    parser.add_argument("--out", help="default: RUN/export/table-<kind>-step<step>.pkl")
    args = parser.parse_args(argv)
    table, out = export_run(args.run_dir, args.kind, args.checkpoint, args.out)
    print(f"wrote {out} and {out.with_suffix('.json')} (NFE {table.eval_count().sequential})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
