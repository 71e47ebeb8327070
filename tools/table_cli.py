"""``python -m solvers.table`` (alias of ``python -m tools.table_cli``): show, convert and make predictor tables.

    python -m solvers.table show PATH [PATH ...] [--json]
    python -m solvers.table convert IN --out OUT.pkl|OUT.json
    python -m solvers.table uniform --out OUT --num-steps N [--schedule discrete --backend NAME] [--afs]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from safeio.cli import USER_ERRORS, ArgumentParser, entry_point, error_line
from solvers.schedules import ScheduleSpec, default_rho, make_sigmas
from solvers.table import format_rows, describe, load_table, save_table, uniform_table

__all__ = ["main"]


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m solvers.table", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("show", help="print a predictor table (ours or the authors')")
    show.add_argument("path", nargs="+")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    make = sub.add_parser("uniform", help="write a hand-made start table (same positions every step, equal weights)")
    make.add_argument("--out", required=True, type=Path)
    make.add_argument("--num-steps", type=int, required=True, help="grid points N (N-1 steps)")
    make.add_argument("--num-points", type=int, default=2)
    make.add_argument("--positions", default=None,
                      help="comma-separated r values (default: the authors' start 0.335,0.665 for K = 2, "
                           "evenly spaced otherwise)")
    make.add_argument("--schedule", default="polynomial", choices=["polynomial", "logsnr", "time_uniform", "discrete"],
                      help="discrete: the backend's own grid (it is loaded for its alphas_cumprod)")
    make.add_argument("--rho", type=float, help="default 7 for polynomial, 1 otherwise")
    make.add_argument("--sigma-min", type=float, help="default 0.002 (discrete: the model's own)")
    make.add_argument("--sigma-max", type=float, help="default 80 (discrete: the model's own)")
    make.add_argument("--afs", action="store_true")
    make.add_argument("--backend", default="analytic")
    make.add_argument("--backend-config", default="{}", help="JSON object, e.g. '{\"model\": \"digits\"}'")
    convert = sub.add_parser("convert", help="rewrite any readable table (e.g. an authors' pickle) as a data-only file")
    convert.add_argument("path", type=Path)
    convert.add_argument("--out", required=True, type=Path, help=".pkl (data-only pickle) or .json")
    args = parser.parse_args(argv)
    out = getattr(args, "out", None)
    if out is not None and Path(out).suffix not in (".pkl", ".json"):
        parser.error(f"--out {out}: a table file ends in .pkl (data-only pickle) or .json")
    if args.command == "convert":
        table = load_table(args.path)
        print(f"wrote {save_table(table, args.out)} ({table.num_steps} grid points, K={table.num_points}, "
              f"solver {table.solver})")
        return 0
    if args.command == "uniform":
        from backends import backend_entry, load_backend     # the CLI, not the library, knows the backends

        discrete = args.schedule == "discrete"
        spec = ScheduleSpec(kind=args.schedule, num_steps=args.num_steps,
                            sigma_min=args.sigma_min if args.sigma_min is not None or discrete else 0.002,
                            sigma_max=args.sigma_max if args.sigma_max is not None or discrete else 80.0,
                            rho=args.rho if args.rho is not None else default_rho(args.schedule))
        if args.num_points < 1:
            parser.error(f"--num-points must be >= 1 (got {args.num_points})")
        try:
            positions = [float(v) for v in args.positions.split(",")] if args.positions else \
                ([0.335, 0.665] if args.num_points == 2 else None)
        except ValueError:
            parser.error(f"--positions takes comma-separated numbers in (0, 1) (got {args.positions!r})")
        try:
            backend_config = json.loads(args.backend_config)
        except json.JSONDecodeError as err:
            parser.error(f"--backend-config is not valid JSON ({err})")
        if not isinstance(backend_config, dict):
            raise ValueError("--backend-config must be a JSON object")
        backend_entry(args.backend)
        alphas_cumprod = None
        if discrete:
            alphas_cumprod = load_backend(args.backend, **backend_config).alphas_cumprod
            if alphas_cumprod is None:
                raise ValueError(f"--schedule discrete needs a discrete-time model; backend {args.backend!r} "
                                 "has no alphas_cumprod")
        table = uniform_table(make_sigmas(spec, alphas_cumprod), args.num_points, positions, spec, afs=args.afs,
                              backend=args.backend, backend_config=backend_config)
        print(f"wrote {save_table(table, args.out)} (NFE sequential {table.eval_count().sequential})")
        return 0
    status = 0
    for path in args.path:
        try:
            info = describe(load_table(path))
        except USER_ERRORS as err:      # the other paths are still shown
            print(error_line(err), file=sys.stderr)
            status = 2
            continue
        if args.json:
            print(json.dumps(info, indent=1))
            continue
        print(f"== {path}")
        print(f"num_steps={info['num_steps']} num_points={info['num_points']} solver={info['solver']} "
              f"afs={info['afs']} fcn={info['fcn']} NFE sequential={info['nfe']['sequential']} "
              f"total={info['nfe']['total']}")
        for key in ("r", "weights", "scale_dir", "scale_time"):
            print(f"{key}:\n{format_rows(info[key])}")
        print("sigmas: " + ", ".join(f"{s:.6g}" for s in info["sigmas"]))
        print("metadata: " + json.dumps(info["metadata"], default=str))
    return status


if __name__ == "__main__":
    sys.exit(main())
