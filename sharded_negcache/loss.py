"""The estimators of design §2 for one rank's queries: P, the training loss, the interpretable loss, staleness.

Pure functions of tensors; nothing here knows about storage or ranks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

__all__ = [
    "cache_losses", "staleness", "spread", "in_batch_mask", "QueryLosses", "query_losses", "nonfinite_queries",
    "reduce_loss", "loss_scale", "overflowing", "zero_rows", "scale_gradient",
]

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
    """‖c − e‖² / max(‖e‖², ε) per row: how far the cached embedding drifted from the current tower.
    (Norms, then squared: one fused reduction per term instead of a pow and a sum.)"""
    fresh = fresh.detach().float()
    drift = torch.linalg.vector_norm(stale.float() - fresh, dim=-1).square_()
    return drift / torch.linalg.vector_norm(fresh, dim=-1).square_().clamp_(min=STALENESS_EPS)


def zero_rows(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``x`` [n, d] with the rows where ``keep`` [n] is False set to 0 (so that no NaN or Inf reaches a product
    or its gradient). On CPU, where a host read is free, ``x`` itself when every row is kept (no [n, d] copy)."""
    if x.device.type == "cpu" and bool(keep.all()):
        return x
    return torch.where(keep.unsqueeze(1), x, 0.0)


def spread(values: torch.Tensor, rows: torch.Tensor, which: torch.Tensor, fill: float | bool | int) -> torch.Tensor:
    """Values of the unique fetched rows spread to each (query, draw) [B, m]; ``fill`` where nothing was drawn."""
    out = torch.full(rows.shape, fill, dtype=values.dtype, device=rows.device)
    out[rows >= 0] = values[which]
    return out


def in_batch_mask(first: int, own: int, total: int, positive_ids: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """[own, total]: which positives of the global batch are negatives of this rank's queries (global
    positions ``first .. first + own``): not the query's own positive, nor any with the same document id."""
    cols = torch.arange(total, device=device)
    rows = torch.arange(first, first + own, device=device)
    mask = cols.unsqueeze(0) != rows.unsqueeze(1)
    if positive_ids is not None:
        mask &= positive_ids.unsqueeze(0) != positive_ids[first : first + own].unsqueeze(1)
    return mask


@dataclass
class QueryLosses:
    """Per query of this rank: the training loss (with gradient), −log π⁺, π⁺, and staleness per draw."""

    training: torch.Tensor  # [B]
    interpretable: torch.Tensor  # [B], NaN for a left-out query
    prob_positive: torch.Tensor  # [B]
    staleness: torch.Tensor  # [B, m], NaN where nothing (finite) was drawn


def query_losses(
    queries: torch.Tensor,
    positives: torch.Tensor,
    lse: torch.Tensor,
    rows: torch.Tensor,
    which: torch.Tensor,
    fresh: torch.Tensor,
    fresh_ok: torch.Tensor,
    stale: torch.Tensor,
    transform: Callable[[torch.Tensor], torch.Tensor],
    batch_positives: torch.Tensor | None = None,
    batch_mask: torch.Tensor | None = None,
    leave_out: torch.Tensor | None = None,
    own_negatives: torch.Tensor | None = None,
) -> QueryLosses:
    """Assembles the scores of design §2 for this rank's queries and applies :func:`cache_losses`.

    ``queries`` [B, d] and ``positives`` [B, d] carry gradient; ``lse`` [B] and the sampled global
    ``rows`` [B, m] (−1: none) come from the merged partials; ``which`` maps each drawn (query, draw)
    to its row among the unique re-encoded rows ``fresh`` [U, d] (finite; ``fresh_ok`` marks rows the
    tower made finite) whose stored embeddings are ``stale`` [U, d]. With in-batch negatives,
    ``batch_positives`` [B_g, d] (with gradient) where ``batch_mask`` [B, B_g]. ``transform`` is T on
    dot products. ``leave_out`` [B] marks queries whose terms leave the loss (0, no gradient): their
    inputs are zeroed before the products, so no NaN or Inf can reach the gradient. ``own_negatives``
    [B, n, d] (with gradient) are fresh candidates of their own query only (extra hard negatives); they
    enter the formula as in-batch candidates do.
    """
    q = queries.float()
    if leave_out is not None and leave_out.device.type == "cpu" and not bool(leave_out.any()):
        leave_out = None  # nothing is left out: no masking (the host read is free on CPU only, as in zero_rows)
    if leave_out is not None:
        q = zero_rows(q, ~leave_out)
        lse = lse.masked_fill(leave_out, float("-inf"))
    pos_scores = transform((q * positives).sum(-1))
    if fresh.shape[0]:
        index = spread(torch.arange(fresh.shape[0], device=rows.device), rows, which, 0)  # each draw's fetched row
        drawn = (rows >= 0) & fresh_ok[index]  # a real draw whose re-encoding is finite
        per_draw = fresh.index_select(0, index.view(-1)).view(*index.shape, fresh.shape[1])  # [B, m, d]
        neg_scores = transform(torch.einsum("bd,bmd->bm", q, per_draw))
        stale_per_draw = staleness(stale, fresh)[index]
    else:
        drawn = torch.zeros(rows.shape, dtype=torch.bool, device=rows.device)
        neg_scores = stale_per_draw = q.new_zeros(rows.shape)
    counted = drawn if leave_out is None else drawn & ~leave_out.unsqueeze(1)
    batch_scores = None
    if batch_positives is not None:
        batch_scores = transform(q @ batch_positives.float().t())
        if leave_out is not None:
            batch_mask = batch_mask & ~leave_out.unsqueeze(1)
    if own_negatives is not None:
        own_scores = transform(torch.einsum("bd,bnd->bn", q, own_negatives.float()))
        own_mask = torch.ones(own_scores.shape, dtype=torch.bool, device=q.device)
        if leave_out is not None:
            own_mask &= ~leave_out.unsqueeze(1)
        batch_scores = own_scores if batch_scores is None else torch.cat([batch_scores, own_scores], 1)
        batch_mask = own_mask if batch_mask is None else torch.cat([batch_mask, own_mask], 1)
    training, interpretable, prob = cache_losses(pos_scores, lse, neg_scores, counted, batch_scores, batch_mask)
    if leave_out is not None:
        training = torch.where(leave_out, 0.0, training)
        interpretable = torch.where(leave_out, float("nan"), interpretable)
    return QueryLosses(training, interpretable, prob, torch.where(drawn, stale_per_draw, float("nan")))


def nonfinite_queries(losses: QueryLosses, lse: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """[B] queries among ``counted`` whose log-partition (NaN or +Inf; −Inf means no candidate) or loss is not finite."""
    bad = torch.isnan(lse) | (lse == float("inf"))
    bad |= ~torch.isfinite(losses.training.detach()) | ~torch.isfinite(losses.interpretable)
    return bad & counted


def scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` in value, ``factor`` times its gradient: re-encoding a fraction f of the draws with weight 1 / f
    keeps the document tower's expected gradient (importance weighting of the draws chosen)."""
    if factor == 1.0:
        return x
    return x.detach() + (x - x.detach()) * factor


def reduce_loss(training: torch.Tensor, reduction: str, world_size: int, global_batch: int) -> torch.Tensor:
    """This rank's loss: 'mean' over its queries, 'global_mean' (× W / B_g, so that DDP's average over
    ranks is the mean over the global batch) or 'sum'. An empty batch gives 0 connected to the graph."""
    total = training.sum()
    if reduction == "mean":
        return total / max(training.shape[0], 1)
    if reduction == "global_mean":
        return total * world_size / max(global_batch, 1)
    return total


def loss_scale(reduction: str, world_size: int, global_batch: int, batch: int) -> float:
    """The factor :func:`reduce_loss` applies to the sum of this rank's ``batch`` per-query losses (W: all ranks,
    B_g: the global batch), for values reported alongside the loss."""
    if reduction == "mean":
        return 1.0 / max(batch, 1)
    if reduction == "global_mean":
        return world_size / max(global_batch, 1)
    return 1.0


def overflowing(training: torch.Tensor, bad: torch.Tensor, reduction: str, world_size: int,
                global_batch: int) -> torch.Tensor:
    """[B]: True for every query when the reduction of this rank's finite per-query losses (those not ``bad``)
    is not finite (each below float32's maximum, their sum above it), else False. Such a rank's queries count
    as non-finite together: no one of them is to blame, and a +inf loss must not pass silently."""
    total = reduce_loss(torch.where(bad, 0.0, training.detach()), reduction, world_size, global_batch)
    return (~torch.isfinite(total)).expand(training.shape[0])
