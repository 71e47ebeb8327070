"""Leave-one-out (RLOO) advantages for prompt-major batches (docs/authors-code.md §7.5).

A rank's batch holds G prompts, each ``k`` times in a row: ``[p0]*k + [p1]*k + ...`` (prompt-major).

* ``grouped by prompt`` (default): ``A_n = R_n - mean of the other k-1 rewards of the same prompt``, so the
  baseline estimates how good the table is *for this prompt*, and prompt difficulty cancels out.
* ``legacy_mixed`` (the authors', docs/authors-code.md §7.5 / 9.35): the reward vector is viewed row-major as a
``k x G``
  matrix and leave-one-out runs down its columns, so the group of sample n is ``{n' : n' = n mod G}``: samples
  spaced G apart, which in prompt-major order mixes prompts (with B = 16, k = 4 the baseline comes entirely
  from other prompts). Kept for comparison.

Optionally standardised over the batch: ``(A - mean) / max(std_population, 1e-8)`` (skipped for one sample).
"""

from __future__ import annotations

import torch

__all__ = ["rloo_advantages", "group_indices"]


def group_indices(batch: int, k: int, legacy_mixed: bool = False) -> torch.Tensor:
    """``[G, k]`` indices of the leave-one-out groups of a prompt-major batch of ``batch = G k``."""
    if k < 1 or batch % k:
        raise ValueError(f"batch {batch} is not a multiple of rloo_k {k}")
    index = torch.arange(batch)
    if legacy_mixed:
        return index.view(k, batch // k).T.contiguous()     # column g of the k x G view: {g, g+G, g+2G, ...}
    return index.view(batch // k, k)


def rloo_advantages(rewards: torch.Tensor, k: int, *, legacy_mixed: bool = False,
                    standardize: bool = True) -> torch.Tensor:
    """RLOO advantages of a prompt-major reward vector ``[B]`` (see the module docstring)."""
    rewards = rewards.reshape(-1).double()
    batch = rewards.numel()
    if k == 1:
        advantages = rewards.clone()
    else:
        groups = group_indices(batch, k, legacy_mixed)
        grouped = rewards[groups]                                          # [G, k]
        baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (k - 1)
        advantages = torch.empty_like(rewards)
        advantages[groups] = grouped - baseline
    if standardize and batch > 1:
        std = advantages.std(unbiased=False).clamp_min(1e-8)
        advantages = (advantages - advantages.mean()) / std
    return advantages.float()
