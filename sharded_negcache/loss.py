"""The estimators of design §2 for one rank's queries: P, the training loss, the interpretable loss, staleness.

Pure functions of tensors; nothing here knows about storage or ranks.
"""
from __future__ import annotations

import torch

__all__ = ["cache_losses", "staleness"]

STALENESS_EPS = 1e-12


def cache_losses(
    pos_scores: torch.Tensor,
    lse: torch.Tensor,
    neg_scores: torch.Tensor,
    sampled: torch.Tensor,
    batch_scores: torch.Tensor | None = None,
    batch_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per query: (training loss, interpretable loss −log π⁺, π⁺).

    ``pos_scores`` s⁺ [B] and ``neg_scores`` s⁻ [B, m] carry gradient; ``lse`` [B] is log Z over the
    cached candidates (-inf when there are none); ``sampled`` [B, m] marks real draws. Optional fresh
    in-batch candidates ``batch_scores`` [B, K] (with gradient) where ``batch_mask`` is True.

    With D = exp(s⁺) + Σ_k exp(s_k) + Z and stop-gradient weights π⁺, π_k, π_C = Z / D:
    L = −(1 − π⁺)·s⁺ + Σ_k π_k·s_k + π_C·mean_t s⁻_t, whose expected gradient is that of the softmax
    cross-entropy over positive + in-batch + cache. Without in-batch candidates it is
    (1 − P)·(mean_t s⁻_t − s⁺), P = sigmoid(s⁺ − LSE); with no candidate at all it is 0.
    """
    pos = pos_scores.detach()
    logits = [pos.unsqueeze(1), lse.to(pos.dtype).unsqueeze(1)]
    if batch_scores is not None:
        masked = batch_scores.detach().masked_fill(~batch_mask, float("-inf"))
        logits.append(masked)
    log_d = torch.logsumexp(torch.cat(logits, dim=1), dim=1)
    p_pos = torch.exp(pos - log_d)
    p_cache = torch.exp(lse - log_d)
    neg = torch.where(sampled, neg_scores, torch.zeros_like(neg_scores))
    mean_neg = neg.sum(1) / sampled.sum(1).clamp(min=1)
    training = p_cache * mean_neg - (1.0 - p_pos) * pos_scores
    if batch_scores is not None:
        p_batch = torch.exp(masked - log_d.unsqueeze(1))
        training = training + (p_batch * torch.where(batch_mask, batch_scores, 0.0)).sum(1)
    return training, log_d - pos, p_pos


def staleness(stale: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
    """‖c − e‖² / max(‖e‖², ε) per row: how far the cached embedding drifted from the current tower."""
    fresh = fresh.detach().float()
    return (stale.float() - fresh).pow(2).sum(-1) / fresh.pow(2).sum(-1).clamp(min=STALENESS_EPS)
