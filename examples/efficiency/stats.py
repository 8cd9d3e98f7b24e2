"""Paired per-query bootstrap: is method A's held-out score different from method B's on the same queries?

Both methods are evaluated on the same queries, so the comparison resamples *queries* (with replacement)
and takes the mean of the per-query differences each time: the spread of those means is the uncertainty
that comes from which queries happened to be held out, with the pairing removing the queries' own
difficulty from it.
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["paired_bootstrap"]


def paired_bootstrap(a: Sequence[float] | torch.Tensor, b: Sequence[float] | torch.Tensor, *, resamples: int = 10_000,
                     confidence: float = 0.95, seed: int = 0) -> dict[str, float]:
    """Mean of ``a - b`` over queries, its percentile bootstrap interval and a two-sided bootstrap p-value.

    ``a`` and ``b`` hold one score per query (e.g. reciprocal rank), the same queries in the same order.
    The p-value is twice the smaller fraction of resampled means on either side of zero (at most 1).
    """
    x = torch.as_tensor(a, dtype=torch.float64)
    y = torch.as_tensor(b, dtype=torch.float64)
    if x.ndim != 1 or x.shape != y.shape or x.numel() == 0:
        raise ValueError(f"a and b must be non-empty 1-d sequences of the same length, got shapes "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if resamples < 1:
        raise ValueError(f"resamples must be a positive int, got {resamples!r}")
    diff = x - y
    gen = torch.Generator().manual_seed(seed)
    means = torch.empty(resamples, dtype=torch.float64)
    chunk = max(1, 2**22 // diff.numel())  # bounded memory: at most ~4M indices at a time
    for start in range(0, resamples, chunk):
        n = min(chunk, resamples - start)
        idx = torch.randint(diff.numel(), (n, diff.numel()), generator=gen)
        means[start : start + n] = diff[idx].mean(1)
    tail = (1.0 - confidence) / 2
    lo, hi = torch.quantile(means, torch.tensor([tail, 1.0 - tail], dtype=torch.float64)).tolist()
    p = min(1.0, 2 * min(float((means <= 0).double().mean()), float((means >= 0).double().mean())))
    return {"mean_diff": float(diff.mean()), "ci_low": lo, "ci_high": hi, "p_value": p, "queries": diff.numel()}
