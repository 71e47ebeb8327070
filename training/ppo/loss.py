"""The clipped PPO objective of an RDPO minibatch (docs/authors-code.md §7.3-7.6), as a pure function of tensors.

:func:`ppo_loss` is what :meth:`training.ppo.trainer.RDPOTrainer.train_iteration` minimises on every minibatch; it
holds no state, touches no optimizer and works on any tensors (the tests call it on hand-made ones).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["PPOLoss", "ppo_loss"]


class PPOLoss(NamedTuple):
    """The objective and its statistics; all 0-d tensors, still attached to the graph (``loss`` is the one to
    ``backward``; detach the others before logging them)."""

    loss: Tensor           # policy_loss + kl_coef KL - entropy_coef H
    policy_loss: Tensor    # the clipped surrogate, mean over the minibatch
    kl: Tensor             # the KL term as given (before its coefficient)
    entropy: Tensor        # the entropy term as given (before its coefficient)
    ratio: Tensor          # mean of r = exp(log_prob - old_log_prob)
    clip_fraction: Tensor  # fraction of samples with |r - 1| > eps, whatever the advantage's sign


def ppo_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, *, clip_range: float, kl: Tensor,
             entropy: Tensor, kl_coef: float = 0.0, entropy_coef: float = 0.0) -> PPOLoss:
    """The clipped PPO loss of one minibatch, computed as

        r = exp(log_prob - old_log_prob)
        policy_loss = mean(max(-A r, -A clip(r, 1 - eps, 1 + eps)))        # = -mean(min(r A, clip(r) A))
        loss = policy_loss + kl_coef * kl - entropy_coef * entropy

    with ``A = advantages`` and ``eps = clip_range``. ``log_prob`` (differentiable), ``old_log_prob`` and
    ``advantages`` are ``[B]`` (the last two carry no gradient in training); ``kl`` (e.g. ``KL(pi || pi_start)``)
    and ``entropy`` are scalars of the whole policy, not per sample. A sample whose ratio is outside
    ``[1 - eps, 1 + eps]`` in the direction its advantage favours gets no gradient. The coefficients always
    multiply their terms (a zero coefficient adds ``0 * term``). Returns :class:`PPOLoss`: ``loss``,
    ``policy_loss``, ``kl``, ``entropy``, the mean ``ratio`` and ``clip_fraction`` (mean of ``|r - 1| > eps``).
    """
    eps = float(clip_range)
    ratio = torch.exp(log_prob - old_log_prob)
    policy_loss = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - eps, 1 + eps)).mean()
    loss = policy_loss + float(kl_coef) * kl - float(entropy_coef) * entropy
    clip_fraction = ((ratio - 1).abs() > eps).float().mean()
    return PPOLoss(loss, policy_loss, kl, entropy, ratio.mean(), clip_fraction)
