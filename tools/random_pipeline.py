"""``python -m tools.random_pipeline --model sd15 --size tiny --out DIR``: a diffusers pipeline of the real
architecture with random weights (:mod:`backends.testing.random_init`), saved in diffusers format, for tests and
GPU benchmarks (cost does not depend on the values). ``python -m backends.testing.random_init`` is an alias.
"""

from __future__ import annotations

import time

import torch

from backends.testing.random_init import (_DTYPES, MODELS, SIZES, build_pipeline, count_parameters,
                                          write_ldm_single_file)
from safeio.cli import ArgumentParser, entry_point

__all__ = ["main"]


@entry_point
def main(argv: list[str] | None = None) -> int:
    """Build a random pipeline, save it with ``save_pretrained`` and print parameter counts per component."""
    parser = ArgumentParser(prog="python -m tools.random_pipeline", description=main.__doc__)
    parser.add_argument("--model", choices=MODELS, required=True)
    parser.add_argument("--size", choices=SIZES, default="tiny")
    parser.add_argument("--out", required=True, help="output folder (diffusers format)")
    parser.add_argument("--dtype", choices=tuple(_DTYPES), default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ldm", default=None, help="sd15 only: also write an original-LDM single file here")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    pipe = build_pipeline(args.model, args.size, dtype=_DTYPES[args.dtype], device=args.device, seed=args.seed)
    built = time.perf_counter()
    total = 0
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            n = count_parameters(component)
            total += n
            print(f"{name:16s} {type(component).__name__:32s} {n:>15,d}")
    print(f"{'total':16s} {'':32s} {total:>15,d}")
    pipe.save_pretrained(args.out, safe_serialization=True)
    if args.ldm:
        write_ldm_single_file(pipe, args.ldm)
    print(f"built in {built - start:.1f}s, saved to {args.out} in {time.perf_counter() - built:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
