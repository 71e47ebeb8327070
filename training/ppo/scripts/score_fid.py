"""FID (and KID) of a folder of images against a reference: ``python -m training.ppo.scripts.score_fid --images DIR
--ref REF.npz|DIR [--kid]`` (flags and output of :mod:`training.rewards.fid`)."""

from __future__ import annotations

import sys
from typing import Iterable

from training.rewards.fid import main as _fid_main

__all__ = ["main"]


def main(argv: Iterable[str] | None = None) -> int:
    """Run the FID CLI."""
    return _fid_main(argv, prog="python -m training.ppo.scripts.score_fid")


if __name__ == "__main__":
    sys.exit(main())
