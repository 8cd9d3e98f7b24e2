"""The estimator of design §2 for one rank's queries: P, the training loss, the interpretable loss, staleness.

Pure functions of tensors; nothing here knows about storage or ranks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["cache_losses", "staleness"]

STALENESS_EPS = 1e-12


def cache_losses(
    pos_scores: torch.Tensor,
    lse: torch.Tensor,
    neg_scores: torch.Tensor,
    sampled: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per query: (training loss, interpretable loss, P).

    ``pos_scores`` s⁺ [B] and ``neg_scores`` s⁻ [B, m] carry gradient; ``lse`` [B] is log Z over the
    candidates (-inf when there are none); ``sampled`` [B, m] marks real draws. With no candidate,
    P = 1 and the training loss is 0.
    """
    p = torch.sigmoid(pos_scores.detach() - lse)
    neg = torch.where(sampled, neg_scores, torch.zeros_like(neg_scores))
    mean_neg = neg.sum(1) / sampled.sum(1).clamp(min=1)
    training = (1.0 - p) * (mean_neg - pos_scores)
    interpretable = F.softplus(lse - pos_scores.detach())  # = -log P, 0 when lse = -inf
    return training, interpretable, p


def staleness(stale: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
    """‖c − e‖² / max(‖e‖², ε) per row: how far the cached embedding drifted from the current tower."""
    fresh = fresh.detach().float()
    return (stale.float() - fresh).pow(2).sum(-1) / fresh.pow(2).sum(-1).clamp(min=STALENESS_EPS)
