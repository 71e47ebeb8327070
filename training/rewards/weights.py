"""Deprecated alias of :mod:`training.rewards.pretrained` (the manifest of pretrained files), kept for earlier
command lines (``python training/rewards/weights.py present ...``, ``python -m training.rewards.weights check``)
and outside code importing ``training.rewards.weights``."""
import sys

if __name__ == "__main__":   # as a script or with -m: run the manifest's CLI (standard library only, no torch)
    if __package__:
        from training.rewards.pretrained import main
    else:   # `python training/rewards/weights.py`: this folder is sys.path[0], the package is not imported
        from pretrained import main
    sys.exit(main())
else:   # an import: this module *is* training.rewards.pretrained (same objects, monkeypatching included)
    from training.rewards import pretrained
    sys.modules[__name__] = pretrained
