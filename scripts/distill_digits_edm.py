"""Distil the digits_edm EPD tables (NFE 3, 5, 7, 9) within a wall-time budget.

    python scripts/distill_digits_edm.py --budget-s 120 --batch 128           # what scripts/gpu_digits_edm.sh runs
    python -m training.distill.launch --config configs/distill/digits_edm-nfe5.yaml   # one table, the config's length

Each table is an ordinary run of the Stage-1 trainer (``training.distill.train``) on
``configs/distill/digits_edm-nfe{N}.yaml`` with ``batch`` and ``total_kimg`` overridden. Two things make the four
runs fit the budget:

* the teacher (the adaptive reference solve, whose ~160 sequential network calls dominate an iteration) is run
  up front on ``--teacher-chunk`` trajectories at a time and stored in the trainer's teacher cache under the
  trainer's own key and batch ids, so that every iteration of the run is a cache hit. The trajectories, noise
  seeds and grids are exactly the trainer's; only the batch the adaptive solver shares its step size with is
  larger (every trajectory still meets the tolerance);
* a calibration (the teacher for one chunk and three student iterations of the most expensive table, all reused
  afterwards) gives the cost of a trajectory and of a student step, from which one number of iterations for all
  tables is planned; should a table run slower than planned, the later ones are shortened to stay within budget.

Prints progress, one JSON line per table and a final JSON summary.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from safeio.cli import ArgumentParser, entry_point  # noqa: E402
from training.distill.config import load_config  # noqa: E402
from training.distill.trainer import Distiller, train  # noqa: E402

CONFIGS = ROOT / "configs" / "distill"
OVERHEAD_S = 4.0      # per table: loading the network, the run folder, the final table files and plot


def _sync(distiller: Distiller) -> None:
    if distiller.device.type == "cuda":
        torch.cuda.synchronize(distiller.device)


def fill_teacher_cache(distiller: Distiller, iterations: int, chunk: int) -> tuple[int, float]:
    """Teacher states of iterations ``0 .. iterations-1`` into the distiller's cache, ``chunk`` trajectories per
    teacher solve (:meth:`training.distill.trainer.Distiller.precompute_teacher`). Returns (computed, seconds)."""
    return distiller.precompute_teacher(range(iterations), chunk)


@entry_point
def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--budget-s", type=float, default=120.0, help="wall time for all tables together")
    p.add_argument("--nfe", default="3,5,7,9")
    p.add_argument("--batch", type=int, default=128, help="trajectories per iteration")
    p.add_argument("--teacher-chunk", type=int, default=8192, help="trajectories per precomputed teacher solve")
    p.add_argument("--min-iterations", type=int, default=20)
    p.add_argument("--max-iterations", type=int, default=600)
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="extra trainer overrides for every run (e.g. teacher.rtol=1e-3)")
    p.add_argument("--progress", action="store_true", help="show the trainer's progress bars")
    args = p.parse_args(argv)
    start = time.perf_counter()
    nfes = [int(v) for v in args.nfe.split(",") if v.strip()]
    paths = {n: CONFIGS / f"digits_edm-nfe{n}.yaml" for n in nfes}
    base = [f"batch={args.batch}"] + list(args.override)
    steps = {n: int(load_config(paths[n], base).student.num_steps) - 1 for n in nfes}
    order = sorted(nfes, key=lambda n: -steps[n])          # most expensive first: later plans only get safer

    def distiller_for(n: int, iterations: int, folder: Path) -> Distiller:
        kimg = iterations * args.batch / 1000
        return Distiller(load_config(paths[n], base + [f"total_kimg={kimg}"]), folder, progress=False)

    # calibration on the most expensive table: one teacher chunk, then three student iterations from the cache
    costly = order[0]
    scratch = Path(tempfile.mkdtemp(prefix="calibrate-"))
    try:
        probe = distiller_for(costly, 3, scratch)
        chunk_iterations = max(3, args.teacher_chunk // args.batch)
        computed, teacher_s = fill_teacher_cache(probe, chunk_iterations, args.teacher_chunk)
        per_trajectory = teacher_s / max(computed, 1)
        probe.train_iteration(0)
        _sync(probe)
        tick = time.perf_counter()
        for i in (1, 2):
            probe.train_iteration(i)
        _sync(probe)
        per_step = (time.perf_counter() - tick) / 2 / steps[costly]    # seconds per student step per iteration
        del probe
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps({"calibration": {"table": f"nfe{costly}", "teacher_ms_per_trajectory": round(1000 * per_trajectory, 3),
                                      "student_ms_per_iteration": round(1000 * per_step * steps[costly], 1),
                                      "batch": args.batch, "seconds": round(time.perf_counter() - start, 1)}}),
          flush=True)

    def iterations_for(tables: list[int]) -> int:
        """One iteration count for ``tables`` that fits the remaining budget (teacher of not yet cached
        trajectories + student steps; the calibration chunk of the costly table is cached already)."""
        remaining = args.budget_s - (time.perf_counter() - start)
        lo, hi = args.min_iterations, args.max_iterations
        while lo < hi:   # the largest count whose estimated cost fits
            mid = (lo + hi + 1) // 2
            cost = sum(OVERHEAD_S + mid * steps[n] * per_step + max(0, mid - (chunk_iterations if n == costly else 0))
                       * args.batch * per_trajectory for n in tables)
            lo, hi = (mid, hi) if cost <= remaining else (lo, mid - 1)
        return lo

    planned = iterations_for(order)
    print(f"plan: {planned} iterations of {args.batch} trajectories per table ({planned * args.batch / 1000:g} kimg), "
          f"tables {', '.join(f'NFE {n}' for n in order)}", flush=True)
    results, failed = [], 0
    for index, n in enumerate(order):
        iterations = min(planned, iterations_for(order[index:]))
        kimg = iterations * args.batch / 1000
        print(f"NFE {n}: {iterations} iterations ({kimg:g} kimg); "
              f"{args.budget_s - (time.perf_counter() - start):.0f} s of the budget left", flush=True)
        tick = time.perf_counter()
        try:
            scratch = Path(tempfile.mkdtemp(prefix="teacher-"))
            try:
                computed, teacher_s = fill_teacher_cache(distiller_for(n, iterations, scratch), iterations,
                                                         args.teacher_chunk)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            if computed:
                per_trajectory = max(per_trajectory, teacher_s / computed)
            student_tick = time.perf_counter()
            table, folder = train(paths[n], base + [f"total_kimg={kimg}"], progress=args.progress)
            per_step = max(per_step, (time.perf_counter() - student_tick) / (iterations * steps[n]))
        except Exception as err:  # noqa: BLE001 - one failed table must not cost the others
            print(json.dumps({"nfe": n, "error": f"{type(err).__name__}: {err}"}), flush=True)
            failed += 1
            continue
        counts = table.eval_count()
        record = {"nfe": n, "run": str(folder), "export": str(load_config(paths[n], base).export),
                  "iterations": iterations, "kimg": kimg, "teacher_trajectories_computed": computed,
                  "teacher_seconds": round(teacher_s, 1), "seconds": round(time.perf_counter() - tick, 1),
                  "final_loss": table.metadata["training"]["final_loss"], "sequential": counts.sequential,
                  "total": counts.total}
        results.append(record)
        print(json.dumps(record), flush=True)
    print(json.dumps({"tables": len(results), "failed": failed, "seconds": round(time.perf_counter() - start, 1),
                      "budget_s": args.budget_s}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
