"""Chunked scoring of all gathered queries against this rank's rows, producing per-query partials.

Never materialises [queries, shard rows]: rows are decoded and scored ``chunk_rows`` at a time, and
only running fp32 partials survive a chunk (design §3 step 2):

* sampling mode: the local log-partition ``lse`` and, for each draw, the local winner of the
  two-stage Gumbel sampler (stage 1 picks a global block with probability Z_b / Z via a Gumbel
  keyed by the block id; stage 2 picks a row inside it by inverse CDF with a uniform keyed by the
  query and draw). Stage 2 runs on the chunk that holds the block, so no block is scored twice.
* top-k mode: the exact local top-k scores and their global row ids.

Every random number is keyed by (seed, step, global query position, global block id, draw), so the
partials, once combined, do not depend on the world size or the chunk size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import keyed_random
from .keyed_random import Stream
from .layout import ShardLayout
from .store import ShardStore

__all__ = ["ScoreFn", "LocalPartials", "score_shard", "make_score_fn"]

_NEG_INF = float("-inf")


class ScoreFn:
    """The score transform T. A float scale is folded into the queries (free); a callable runs per chunk."""

    def __init__(self, transform: Callable[[torch.Tensor], torch.Tensor] | float | None) -> None:
        if transform is None or isinstance(transform, (int, float)):
            self.scale: float | None = 1.0 if transform is None else float(transform)
            self.fn: Callable[[torch.Tensor], torch.Tensor] | None = None
        elif callable(transform):
            self.scale, self.fn = None, transform
        else:
            raise TypeError(f"score_transform must be a callable, a float scale or None, got {transform!r}")

    def prepare_queries(self, q: torch.Tensor) -> torch.Tensor:
        return q * self.scale if self.scale not in (None, 1.0) else q

    def on_dots(self, dots: torch.Tensor) -> torch.Tensor:
        """T applied to raw dot products (with gradient where they have one)."""
        if self.fn is not None:
            return self.fn(dots)
        return dots * self.scale if self.scale != 1.0 else dots

    def on_prepared(self, dots: torch.Tensor) -> torch.Tensor:
        """T for dot products of queries that went through :meth:`prepare_queries`."""
        return self.fn(dots) if self.fn is not None else dots


def make_score_fn(transform: Callable[[torch.Tensor], torch.Tensor] | float | None) -> ScoreFn:
    return transform if isinstance(transform, ScoreFn) else ScoreFn(transform)


@dataclass
class LocalPartials:
    """Per gathered query: sampling mode fills lse/win_*, top-k mode fills topk_*."""

    lse: torch.Tensor | None = None  # [B] float32, -inf without candidates
    win_key: torch.Tensor | None = None  # [B, m] float32 perturbed block key, -inf for none
    win_row: torch.Tensor | None = None  # [B, m] int64 global row, -1 for none
    topk_val: torch.Tensor | None = None  # [B, k] float32, -inf padding
    topk_row: torch.Tensor | None = None  # [B, k] int64, -1 padding


def _mask_chunk(
    scores: torch.Tensor,
    store: ShardStore,
    start: int,
    end: int,
    filled: int,
    exclude_key: str | None,
    exclude_ids: torch.Tensor | None,
) -> None:
    """-inf for empty rows and for rows holding the query's own positive document (in place)."""
    if filled < end - start:
        scores.masked_fill_(~store.filled[start:end][None, :], _NEG_INF)
    if exclude_ids is not None:
        row_ids = store.feature(exclude_key)[start:end].reshape(-1)
        scores.masked_fill_(row_ids[None, :] == exclude_ids[:, None], _NEG_INF)


def _block_lse_and_weights(scores: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (query, block): log-sum-exp and in-block weights exp(a - max_b), computed in place.

    The max is per block, so the result for a block is the same whatever chunk holds it.
    """
    b = scores.shape[0]
    s3 = scores.view(b, -1, block)
    bmax = s3.amax(dim=-1)
    shift = torch.where(torch.isfinite(bmax), bmax, torch.zeros_like(bmax))
    s3.sub_(shift.unsqueeze(-1)).exp_()
    return shift + s3.sum(dim=-1).log(), s3


def _pick_rows_in_blocks(weights: torch.Tensor, block_idx: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Stage 2: inside each chosen block, the row of inverse CDF at ``u`` [B, m] (float64 sums)."""
    b, m = block_idx.shape
    query = torch.arange(b, device=weights.device).unsqueeze(1).expand(b, m)
    cdf = weights[query, block_idx].to(torch.float64).cumsum_(-1)  # [B, m, block]
    target = u.to(torch.float64).unsqueeze(-1) * cdf[..., -1:]
    row = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return row.clamp_(max=weights.shape[-1] - 1)


def score_shard(
    store: ShardStore,
    layout: ShardLayout,
    queries: torch.Tensor,
    score_fn: ScoreFn,
    *,
    num_draws: int,
    top_k: int | None,
    seed: int,
    step: int,
    chunk_rows: int,
    exclude_key: str | None = None,
    exclude_ids: torch.Tensor | None = None,
) -> LocalPartials:
    """Scores ``queries`` [B, d] (global batch order) against every filled local row, chunk by chunk."""
    b, device = queries.shape[0], queries.device
    q = score_fn.prepare_queries(queries.float())
    bs = layout.block_size
    chunk_rows = max(bs, chunk_rows // bs * bs)
    filled = store.filled_per_chunk(chunk_rows)
    pos = torch.arange(b, device=device, dtype=torch.int64)
    if top_k:
        k = top_k
        best_val = torch.full((b, k), _NEG_INF, device=device)
        best_row = torch.full((b, k), -1, dtype=torch.int64, device=device)
    else:
        m = num_draws
        block_keys = keyed_random.draw_keys(seed, step, Stream.BLOCK_GUMBEL, pos, m)
        row_u = keyed_random.uniform(keyed_random.draw_keys(seed, step, Stream.ROW_UNIFORM, pos, m))
        lse = torch.full((b,), _NEG_INF, device=device)
        best_val = torch.full((b, m), _NEG_INF, device=device)
        best_row = torch.full((b, m), -1, dtype=torch.int64, device=device)

    for c, start in enumerate(range(0, store.rows, chunk_rows)):
        if b == 0 or filled[c] == 0:
            continue
        end = min(start + chunk_rows, store.rows)
        scores = score_fn.on_prepared(q @ store.decode(start, end).t())
        _mask_chunk(scores, store, start, end, filled[c], exclude_key, exclude_ids)
        first_row = layout.row_offset + start
        if top_k:
            val, idx = scores.topk(min(k, end - start), dim=1)
            row = torch.where(torch.isfinite(val), idx + first_row, torch.full_like(idx, -1))
            val, pick = torch.cat([best_val, val], 1).topk(k, dim=1)
            best_val, best_row = val, torch.cat([best_row, row], 1).gather(1, pick)
            continue
        block_lse, weights = _block_lse_and_weights(scores, bs)
        lse = torch.logaddexp(lse, torch.logsumexp(block_lse, dim=1))
        block_ids = torch.arange(block_lse.shape[1], device=device) + first_row // bs
        perturbed = keyed_random.gumbel(block_keys, block_ids).add_(block_lse.unsqueeze(1))
        val, blk = perturbed.max(dim=-1)
        better = val > best_val  # strict: on a tie the lower block id (seen first) keeps the draw
        row = first_row + blk * bs + _pick_rows_in_blocks(weights, blk, row_u)
        best_val = torch.where(better, val, best_val)
        best_row = torch.where(better, row, best_row)

    if top_k:
        return LocalPartials(topk_val=best_val, topk_row=best_row)
    return LocalPartials(lse=lse, win_key=best_val, win_row=best_row)
