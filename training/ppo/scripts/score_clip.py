"""CLIP scores of a folder of images: ``python -m training.ppo.scripts.score_clip --images DIR [--prompts FILE]``
(flags and output of :mod:`training.rewards.score_cli`; head ``clip``)."""

from __future__ import annotations

import sys
from typing import Iterable

from training.rewards.score_cli import main as _score_main

__all__ = ["main", "HEAD"]

HEAD = "clip"


def main(argv: Iterable[str] | None = None) -> int:
    """Run the shared score CLI with ``--head clip`` as the default."""
    return _score_main(argv, head=HEAD, prog="python -m training.ppo.scripts.score_clip")


if __name__ == "__main__":
    sys.exit(main())
