"""Sample FLUX.1-dev with an EPD table or a baseline: ``sample.py`` with the FLUX backend and the authors'
``sample_flux.py`` defaults (seed 0, batches of 1, ``samples/flux_epd``, 1024 px).

    python sample_flux.py --predictor flux-best.pkl --model-id weights/FLUX.1-dev --prompt "a lighthouse at dusk"
    FLUX_MODEL_PATH=weights/FLUX.1-dev python sample_flux.py --solver euler --steps 28 --seeds 0-7

The model is ``--model-id`` (a local folder, or a repo id already in the local Hugging Face cache), else
``$FLUX_MODEL_PATH``, else the table's recorded id (docs/authors-code.md §5.4); nothing is downloaded. Guidance is the
embedded scale (3.5 in the released table), there is no negative prompt. Prompts pair with seeds by position, cycling.
"""

from __future__ import annotations

import argparse
import sys

from sample import backend_script_parser, main

__all__ = ["parser"]


def parser() -> argparse.ArgumentParser:
    return backend_script_parser(__doc__, "flux", seeds="0", batch=1, outdir="samples/flux_epd")


if __name__ == "__main__":
    sys.exit(main(parser=parser()))
