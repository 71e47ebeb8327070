"""The fast path on the EDM pixel backend (digits_edm, the committed network): eager, graphed and compiled
sampling of the same seeds with a committed EPD table, their agreement, and steady-state time per batch.

    python scripts/gpu_check_fast_path.py --batch 64 --json out.json

Each variant samples ``--batch`` seeds with ``exps/digits_edm/epd-nfe5.pkl``: ``eager`` (plain calls),
``graph`` (the whole loop replayed from one CUDA graph) and ``fast`` (that, over the compiled network). The
first call's wall time (compilation and capture) and the median of ``--repeats`` later calls are reported,
with the largest absolute difference of the final states against eager.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backends import load_backend  # noqa: E402
from backends.compile import use_compile_cache  # noqa: E402
from backends.cuda_graphs import GraphedSampler  # noqa: E402
from safeio.cli import ArgumentParser, entry_point  # noqa: E402
from solvers.core import seeded_noise  # noqa: E402
from solvers.epd import sample_epd  # noqa: E402
from solvers.table import load_table  # noqa: E402

TABLE = Path(__file__).resolve().parents[1] / "exps" / "digits_edm" / "epd-nfe5.pkl"


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--compile-cache", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: this check needs a CUDA GPU", file=sys.stderr)
        return 2
    use_compile_cache(args.compile_cache)
    table = load_table(TABLE)
    device = torch.device("cuda")
    seeds = list(range(args.batch))
    prompts = [str(s % 10) for s in seeds]
    result: dict = {"table": str(TABLE.name), "batch": args.batch, "device": torch.cuda.get_device_name(device)}
    finals = {}
    for label, options in (("eager", {}), ("graph", {"cuda_graphs": True}), ("fast", {"compile": True})):
        backend = load_backend("digits_edm", device="cuda", dtype="float32", **options)
        cond = backend.encode_prompts(prompts)
        noise = seeded_noise(seeds, tuple(backend.shape), device=device) * float(table.sigmas[0])

        def sample(x, c, b=backend):
            return sample_epd(b, x, table, c)

        run = sample if label == "eager" else GraphedSampler(sample)
        with torch.no_grad():
            torch.cuda.synchronize()
            begin = time.perf_counter()
            finals[label] = run(noise, cond)
            torch.cuda.synchronize()
            first = time.perf_counter() - begin
            times = []
            for _ in range(args.repeats):
                begin = time.perf_counter()
                run(noise, cond)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - begin)
        result[label] = {"first_call_s": first, "ms_per_batch": statistics.median(times) * 1e3,
                         "max_abs_diff_vs_eager": float((finals[label] - finals["eager"]).abs().max())}
        if label != "eager":
            result[label]["loop_replays"] = run.replays
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
