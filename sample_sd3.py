"""Sample Stable Diffusion 3 (Medium) with an EPD table or a baseline: ``sample.py`` with the SD3 backend and the
authors' ``sample_sd3.py`` defaults (seeds 0-3, batches of 4, ``samples/sd3_epd``).

    python sample_sd3.py --predictor sd3-1024-best.pkl --model-id weights/sd3-medium --resolution 1024 \\
        --prompt "a watercolor fox in the snow" --seeds 0-3
    python sample_sd3.py --solver dpmpp2m --steps 20 --model-id weights/sd3-medium --prompt-file src/prompts/eval.txt

Prompts pair with seeds by position in the seed list, cycling (as in sample.py and sample_flux.py).
The ODE state is float32 (the authors draw and integrate it in fp16, docs/authors-code.md §9.14); the backbone
runs in fp16.
"""

from __future__ import annotations

import argparse
import sys

from sample import backend_script_parser, main

__all__ = ["parser"]


def parser() -> argparse.ArgumentParser:
    return backend_script_parser(__doc__, "sd3", seeds="0-3", batch=4, outdir="samples/sd3_epd")


if __name__ == "__main__":
    sys.exit(main(parser=parser()))
