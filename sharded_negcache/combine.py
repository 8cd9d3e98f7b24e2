"""Combining the W ranks' partials of each query at its home rank (design §3 step 3).

* ``LSE_i = logsumexp_r LSE_{i,r}``;
* each draw's global winner is the best of the W local winners (ties: lowest rank, i.e. lowest
  global block id), which is exact because the argmax of a union is the best of the argmaxes;
* with top_k, the global top-k is the top-k of the W*k local candidates (exact; equal values: the lower
  global row wins, the rule of every rank's local top-k, so the k rows do not depend on W); the LSE and
  a Gumbel-max draw per (query, global row, draw) then use those k.

Partials travel as one float64 matrix per rank (ids < 2**53 are exact in float64).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import keyed_random
from .keyed_random import Stream
from .scoring import LocalPartials, top_k_lower_row_wins

__all__ = ["HomePartials", "pack_partials", "merge_partials", "own_partials"]


@dataclass
class HomePartials:
    """For this rank's own queries: the log-partition over the candidates and the sampled rows."""

    lse: torch.Tensor  # [B] float32, -inf when the query has no candidate
    rows: torch.Tensor  # [B, m] int64 global row ids, -1 when nothing was sampled
    # [B, m] which candidate each sample is: rank * n + its place among that rank's n candidates (the eager
    # fetch reads the sampled row's bytes from there); meaningless where nothing was sampled
    source: torch.Tensor


def pack_partials(p: LocalPartials) -> torch.Tensor:
    """[B, 1 + 2m] (sampling) or [B, 2k] (top-k) float64 columns, one row per gathered query."""
    if p.topk_val is not None:
        cols = [p.topk_val, p.topk_row]
    else:
        cols = [p.lse.unsqueeze(1), p.win_key, p.win_row]
    return torch.cat([c.to(torch.float64) for c in cols], dim=1)


def _merge_sampled(recv: torch.Tensor, m: int) -> HomePartials:
    lse = torch.logsumexp(recv[:, :, 0], dim=0)
    keys, rows = recv[:, :, 1 : 1 + m], recv[:, :, 1 + m :]
    best = keys.argmax(dim=0, keepdim=True)  # first maximum: lowest rank
    key = keys.gather(0, best).squeeze(0)
    row = rows.gather(0, best).squeeze(0).to(torch.int64)
    row = torch.where(torch.isfinite(key), row, torch.full_like(row, -1))
    return HomePartials(lse.float(), row, best.squeeze(0) * m + torch.arange(m, device=recv.device))


def _merge_topk(
    recv: torch.Tensor, k: int, m: int, seed: int, step: int, query_pos: torch.Tensor
) -> HomePartials:
    w, b = recv.shape[0], recv.shape[1]
    vals = recv[:, :, :k].permute(1, 0, 2).reshape(b, w * k)
    candidates = recv[:, :, k:].permute(1, 0, 2).reshape(b, w * k).to(torch.int64)  # rank r's j-th: r * k + j
    vals, rows = top_k_lower_row_wins(vals, candidates, k)
    lse = torch.logsumexp(vals, dim=1)
    keys = keyed_random.draw_keys(seed, step, Stream.TOPK_GUMBEL, query_pos, m)
    # one Gumbel per (query, draw, candidate row), keyed by the global row id
    u = keyed_random.uniform(keys.unsqueeze(-1), rows.unsqueeze(1))
    perturbed = vals.float().unsqueeze(1) - torch.log(-torch.log(u))
    val, idx = perturbed.max(dim=-1)
    row = rows.gather(1, idx)
    row = torch.where(torch.isfinite(val), row, torch.full_like(row, -1))
    source = (candidates.unsqueeze(1) == row.unsqueeze(2)).int().argmax(dim=2)  # a sampled row is one candidate
    return HomePartials(lse.float(), row, source)


def own_partials(p: LocalPartials) -> HomePartials:
    """Sampling mode with one rank holding every row: its partials are the merged ones, exactly what
    :func:`merge_partials` returns for W = 1 (the float64 round trip is exact), without the packing."""
    m = p.win_row.shape[1]
    rows = torch.where(torch.isfinite(p.win_key), p.win_row, -1)
    return HomePartials(p.lse, rows, torch.arange(m, device=rows.device).expand_as(rows))


def merge_partials(
    recv: torch.Tensor,
    *,
    num_draws: int,
    top_k: int | None,
    seed: int,
    step: int,
    query_pos: torch.Tensor,
) -> HomePartials:
    """``recv`` [W, B, cols]: what every rank computed for this rank's B queries (global positions ``query_pos``)."""
    if top_k:
        return _merge_topk(recv, top_k, num_draws, seed, step, query_pos)
    return _merge_sampled(recv, num_draws)
