"""Helpers of the reference's ``negative_cache.util``: block-max "top-k", gather_nd, cross-replica concat."""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..topology import is_distributed

__all__ = ["approximate_top_k_with_indices", "gather_nd", "cross_replica_concat"]


def approximate_top_k_with_indices(negative_scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's approximate top-k: the maximum of each of k consecutive column groups.

    Returns ``(scores, indices)``, both [B, k], group order (not sorted by score). Group g holds columns
    ``[g*C//k, (g+1)*C//k)``: for ``C % k == 0`` these are the reference's groups; other C (which the
    reference could not handle) give groups whose sizes differ by at most one. A group without columns
    (C < k) has score -inf and index -1. Ties go to the first column.
    """
    if negative_scores.dim() != 2:
        raise ValueError(f"negative_scores must be [batch, columns], got {list(negative_scores.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    b, c = negative_scores.shape
    device = negative_scores.device
    bounds = torch.arange(k + 1, device=device) * c // k
    width = max(-(-c // k), 1)
    cols = bounds[:-1, None] + torch.arange(width, device=device)[None, :]  # [k, width]
    inside = cols < bounds[1:, None]
    cols = cols.clamp(max=max(c - 1, 0))
    if c == 0:
        vals = negative_scores.new_full((b, k, width), float("-inf"))
    else:
        vals = negative_scores[:, cols].masked_fill(~inside, float("-inf"))
    best, arg = vals.max(dim=-1)  # first maximum on ties
    idx = cols.unsqueeze(0).expand(b, k, width).gather(2, arg.unsqueeze(-1)).squeeze(-1)
    idx = torch.where(inside.any(dim=1)[None, :], idx, torch.full_like(idx, -1))
    return best, idx


def gather_nd(params: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``tf.gather_nd``: ``indices`` [N, D] address the first D dims of ``params``; returns [N, *params.shape[D:]]."""
    if indices.dim() != 2 or indices.shape[1] > params.dim():
        raise ValueError(f"indices must be [N, D] with D <= {params.dim()}, got {list(indices.shape)}")
    return params[tuple(indices.long().t())]


def cross_replica_concat(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Every rank's ``tensor`` concatenated along dim 0 in rank order; per-rank row counts may differ.

    Uses the tensor's own device (no hard-coded CUDA); without an initialised process group it is the identity.
    """
    if not is_distributed() or dist.get_world_size(group) == 1:
        return tensor
    world = dist.get_world_size(group)
    count = torch.tensor([tensor.shape[0]], device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    sizes = [int(n) for n in counts]
    pad = max(sizes)
    buf = tensor.new_zeros((pad, *tensor.shape[1:]))
    buf[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(parts, buf.contiguous(), group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])
