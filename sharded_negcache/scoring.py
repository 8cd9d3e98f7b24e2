"""Chunked scoring of all gathered queries against this rank's rows, producing per-query partials.

Never materialises [queries, shard rows]: rows are decoded and scored ``chunk_rows`` at a time
(design §3 step 2). Per chunk only the passes the log-partition needs anyway run: the product, the
block max, ``exp(a - max)`` in place and the block sums, written into [queries, blocks] partials
(B_g × rows / block_size floats). After the scan:

* sampling mode: ``lse`` over the blocks, and for each draw the two-stage Gumbel sampler: stage 1
  picks a global block with probability Z_b / Z (a Gumbel keyed by the block id on the block LSEs);
  stage 2 re-scores only the winning block of each (query, draw) and picks a row by inverse CDF
  with a uniform keyed by the query and draw;
* top-k mode: the exact local top-k scores and their global row ids (kept running per chunk).

Every random number is keyed by (seed, step, global query position, global block id, draw), so the
partials, once combined, do not depend on the world size or the chunk size. Few, large tensor ops
per chunk also keep the loop cheap when the CPU is oversubscribed (each op is an OpenMP region).
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

    def fingerprint(self) -> str:
        """What ranks compare: the scale, or a callable's name and its values on a fixed probe
        (two different lambdas have the same name but not the same values)."""
        if self.fn is None:
            return f"scale {self.scale!r}"
        with torch.no_grad():
            values = self.fn(torch.linspace(-3.0, 3.0, 7))
        name = getattr(self.fn, "__qualname__", type(self.fn).__name__)
        return f"{name} {[round(float(v), 6) for v in values]}"

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


def _candidate_mask(
    store: ShardStore, rows: torch.Tensor, exclude_key: str | None, exclude_ids: torch.Tensor | None
) -> torch.Tensor:
    """Candidates among local ``rows`` [..., n] for the queries of the leading dimension: filled and
    not holding the query's own positive."""
    ok = store.filled[rows]
    if exclude_ids is not None:
        row_ids = store.feature(exclude_key)[rows].squeeze(-1)
        ok &= row_ids != exclude_ids.view(-1, *([1] * (rows.dim() - 1)))
    return ok


def _mask_chunk(
    scores: torch.Tensor,
    store: ShardStore,
    start: int,
    end: int,
    filled: int,
    exclude_key: str | None,
    exclude_ids: torch.Tensor | None,
) -> bool:
    """-inf for empty rows and rows holding the query's own positive (in place); True if anything was masked."""
    masked = False
    if filled < end - start:
        scores.masked_fill_(~store.filled[start:end][None, :], _NEG_INF)
        masked = True
    if exclude_ids is not None:
        row_ids = store.feature(exclude_key)[start:end].reshape(-1)
        scores.masked_fill_(row_ids[None, :] == exclude_ids[:, None], _NEG_INF)
        masked = True
    return masked


def _block_lse(scores: torch.Tensor, block: int, masked: bool) -> torch.Tensor:
    """Per (query, block): log Σ exp(a) over the block's candidates (-inf if none); overwrites ``scores``.

    The max is per block, so a block's value does not depend on the chunk that holds it.
    """
    s3 = scores.view(scores.shape[0], -1, block)
    bmax = s3.amax(dim=-1)
    shift = torch.where(torch.isfinite(bmax), bmax, torch.zeros_like(bmax)) if masked else bmax
    s3.sub_(shift.unsqueeze(-1)).exp_()
    return s3.sum(dim=-1).log_().add_(shift)


def _pick_rows_in_blocks(
    store: ShardStore,
    queries: torch.Tensor,
    score_fn: ScoreFn,
    block_idx: torch.Tensor,
    u: torch.Tensor,
    block: int,
    exclude_key: str | None,
    exclude_ids: torch.Tensor | None,
    budget_bytes: int,
) -> torch.Tensor:
    """Stage 2: for each (query, draw) re-score its winning local block and pick a row by inverse CDF.

    ``queries`` [B, d] are prepared (scaled); ``block_idx`` [B, m] local block ids (any value where
    the draw has no winner: the result is then ignored); ``u`` [B, m] uniforms. Returns local rows.
    Each distinct (query, block) pair is scored once, however many draws chose it, in pieces that
    keep the gathered rows under ``budget_bytes``.
    """
    b, m = block_idx.shape
    if b == 0:
        return block_idx.clone()
    query = torch.arange(b, device=queries.device).unsqueeze(1).expand(b, m)
    pair_key, which = torch.unique(query * store.rows + block_idx, return_inverse=True)
    pair_q, pair_blk = pair_key // store.rows, pair_key % store.rows
    offsets = torch.arange(block, device=queries.device)
    step = max(1, budget_bytes // (block * store.dim * 4))
    cdfs = []
    for lo in range(0, pair_key.numel(), step):
        qi, blk = pair_q[lo : lo + step], pair_blk[lo : lo + step]
        rows = blk.unsqueeze(1) * block + offsets  # [P, block] local rows
        emb = store.codec.decode(store.embeddings[rows.reshape(-1)], store.dim).view(rows.shape[0], block, store.dim)
        a = score_fn.on_prepared(torch.bmm(emb, queries[qi].unsqueeze(-1)).squeeze(-1))
        ok = _candidate_mask(store, rows, exclude_key, None if exclude_ids is None else exclude_ids[qi])
        a = a.masked_fill(~ok, _NEG_INF)
        shift = a.amax(dim=1, keepdim=True)
        w = (a - torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))).exp()
        cdfs.append(w.to(torch.float64).cumsum_(1))
    cdf = torch.cat(cdfs)[which.reshape(-1)]  # [B*m, block]: each draw's block
    target = u.reshape(-1, 1).to(torch.float64) * cdf[:, -1:]
    within = torch.searchsorted(cdf, target, right=True).clamp_(max=block - 1)
    return (block_idx.reshape(-1, 1) * block + within).view(b, m)


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
    if top_k:
        best_val = torch.full((b, top_k), _NEG_INF, device=device)
        best_row = torch.full((b, top_k), -1, dtype=torch.int64, device=device)
    else:
        block_lse = torch.full((b, layout.blocks_per_rank), _NEG_INF, device=device)

    for c, start in enumerate(range(0, store.rows, chunk_rows)):
        if b == 0 or filled[c] == 0:
            continue
        end = min(start + chunk_rows, store.rows)
        scores = score_fn.on_prepared(q @ store.decode(start, end).t())
        masked = _mask_chunk(scores, store, start, end, filled[c], exclude_key, exclude_ids)
        if top_k:
            val, idx = scores.topk(min(top_k, end - start), dim=1)
            row = torch.where(torch.isfinite(val), idx + (layout.row_offset + start), torch.full_like(idx, -1))
            val, pick = torch.cat([best_val, val], 1).topk(top_k, dim=1)
            best_val, best_row = val, torch.cat([best_row, row], 1).gather(1, pick)
        else:
            cols = slice(start // bs, end // bs)
            block_lse[:, cols] = _block_lse(scores, bs, masked)

    if top_k:
        return LocalPartials(topk_val=best_val, topk_row=best_row)
    return _sample_blocks(store, layout, q, score_fn, block_lse, num_draws, seed, step,
                          exclude_key, exclude_ids, budget_bytes=chunk_rows * max(b, 1) * 4)


def _sample_blocks(
    store: ShardStore,
    layout: ShardLayout,
    q: torch.Tensor,
    score_fn: ScoreFn,
    block_lse: torch.Tensor,
    m: int,
    seed: int,
    step: int,
    exclude_key: str | None,
    exclude_ids: torch.Tensor | None,
    budget_bytes: int,
) -> LocalPartials:
    """Local LSE and, per draw, the local winner of the two-stage sampler.

    Stage 1 walks the blocks in ranges whose Gumbel grid [B, m, range] stays within ``budget_bytes``,
    keeping a running best per (query, draw); the keys depend only on global block ids, so the
    ranges change nothing.
    """
    b, device = q.shape[0], q.device
    lse = torch.logsumexp(block_lse, dim=1)
    pos = torch.arange(b, device=device, dtype=torch.int64)
    keys = keyed_random.draw_keys(seed, step, Stream.BLOCK_GUMBEL, pos, m)
    first_block = layout.row_offset // layout.block_size
    best_key = torch.full((b, m), _NEG_INF, device=device)
    best_blk = torch.zeros((b, m), dtype=torch.int64, device=device)
    span = max(1, budget_bytes // (8 * 4 * max(b * m, 1)))  # ~4 int64 temporaries per grid element
    for lo in range(0, layout.blocks_per_rank, span):
        hi = min(lo + span, layout.blocks_per_rank)
        ids = torch.arange(lo, hi, device=device) + first_block
        key, blk = keyed_random.gumbel(keys, ids).add_(block_lse[:, None, lo:hi]).max(dim=-1)
        better = key > best_key  # strict: on ties the lower block id (an earlier range) keeps the draw
        best_key = torch.where(better, key, best_key)
        best_blk = torch.where(better, blk + lo, best_blk)
    u = keyed_random.uniform(keyed_random.draw_keys(seed, step, Stream.ROW_UNIFORM, pos, m))
    rows = _pick_rows_in_blocks(store, q, score_fn, best_blk, u, layout.block_size, exclude_key, exclude_ids, budget_bytes)
    found = torch.isfinite(best_key)
    return LocalPartials(lse=lse, win_key=best_key, win_row=torch.where(found, layout.to_global(rows), torch.full_like(rows, -1)))
