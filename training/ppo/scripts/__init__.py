"""Scoring command lines with the authors' module names (docs/authors-code.md §8.5): ``python -m
training.ppo.scripts.score_hps``, ``score_pick``, ``score_imagereward``, ``score_clip``, ``score_aesthetic``,
``score_mps`` and ``score_fid``. Each is a thin wrapper of :mod:`training.rewards.score_cli` (or
:mod:`training.rewards.fid`) with its head name."""
