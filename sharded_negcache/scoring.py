"""Chunked scoring of all gathered queries against this rank's rows, producing per-query partials.

Never materialises [queries, shard rows]: rows are decoded and scored ``chunk_rows`` at a time
(design §3 step 2). Per chunk: the product (one matmul), then the block log-sum-exp written into
[queries, blocks] partials (B_g × rows / block_size floats) and stage 1 below; on CPU one call of the
native kernel (:mod:`native_scan`) does both in one pass, and with a float scale it computes the product
too, so no score chunk exists (the fused scan); elsewhere (or without a compiler) torch ops do. Then:

* sampling mode: ``lse`` over the blocks, and for each draw the two-stage Gumbel sampler: stage 1
  picks a global block with probability Z_b / Z (a Gumbel keyed by the block id on the block LSEs,
  a running best over the chunks); stage 2 picks a row inside the block by inverse CDF with a
  uniform keyed by the query and draw. The CPU kernel and the torch path copy the winning block's
  scores out of the chunk for the draws whose winner the chunk changed (no re-scoring) and the inverse
  CDF runs once, after the scan, on the final winners; the Triton kernel, which never writes scores,
  re-scores each winning block;
* top-k mode: the exact local top-k scores and their global row ids (kept running per chunk).

Every random number is keyed by (seed, step, global query position, global block id, draw), so the
partials, once combined, do not depend on the world size or the chunk size. Few, large tensor ops
per chunk also keep the loop cheap when the CPU is oversubscribed (each op is an OpenMP region).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch.profiler import record_function

from . import keyed_random, native_scan
from .keyed_random import Stream
from .layout import ShardLayout
from .store import ShardStore

__all__ = ["ScoreFn", "LocalPartials", "score_shard", "make_score_fn", "block_lse", "pick_in_block", "resolve_backend",
           "BACKENDS"]

_NEG_INF = float("-inf")
KERNEL_RANGE = "negcache/score.kernel"  # profiler range of each native kernel call, inside negcache/score
log = logging.getLogger("sharded_negcache")


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


BACKENDS = ("auto", "torch", "triton")


def resolve_backend(requested: str, device: torch.device, score_fn: ScoreFn, top_k: int | None) -> tuple[str, str]:
    """(backend, reason) for ``scoring_backend``: 'auto' takes the Triton kernel on CUDA when triton
    imports, the transform is a float scale and the mode is sampling; otherwise the torch scan."""
    if requested not in BACKENDS:
        raise ValueError(f"scoring_backend must be one of {BACKENDS}, got {requested!r}")
    if requested == "torch":
        return "torch", "requested"
    why_not = None
    if top_k:
        why_not = "top_k mode runs on the torch path"
    elif score_fn.fn is not None:
        why_not = "a callable score_transform runs on the torch path (the kernel folds a float scale into the queries)"
    elif requested == "auto" and device.type != "cuda":
        why_not = (f"device is {device.type}: the native CPU scan kernel, built on first use, or torch ops where "
                   "no compiler works; the Triton kernel is for CUDA")
    else:
        try:
            import triton  # noqa: F401
        except ImportError:
            why_not = "triton is not installed"
    if why_not is None:
        return "triton", "requested" if requested == "triton" else "CUDA device and triton available"
    if requested == "triton":
        raise ValueError(f"scoring_backend='triton' is not possible here: {why_not}")
    return "torch", why_not


def _mask_chunk(
    scores: torch.Tensor,
    store: ShardStore,
    start: int,
    end: int,
    filled: int,
    exclude_key: str | None,
    exclude_ids: torch.Tensor | None,
) -> None:
    """-inf (in place) for empty rows and rows holding the query's own positive."""
    if filled < end - start:
        scores.masked_fill_(~store.filled[start:end][None, :], _NEG_INF)
    if exclude_ids is not None:
        row_ids = store.feature(exclude_key)[start:end].reshape(-1)
        scores.masked_fill_(row_ids[None, :] == exclude_ids[:, None], _NEG_INF)


def block_lse(scores: torch.Tensor, block: int) -> torch.Tensor:
    """[B, n·block] scores (-inf for non-candidates) -> [B, n] log Σ exp per block (-inf if none), in torch
    ops (the kernel of :mod:`native_scan` computes the same on CPU in one pass).

    The max is per block, so a block's value does not depend on the chunk that holds it; ``scores``
    is left unchanged (stage 2 reads the winners' scores from it).
    """
    s3 = scores.view(scores.shape[0], -1, block)
    bmax = s3.amax(dim=-1, keepdim=True)
    shift = torch.where(torch.isfinite(bmax), bmax, torch.zeros_like(bmax))
    return (s3 - shift).exp_().sum(dim=-1).log_().add_(shift.squeeze(-1))


def pick_in_block(scores: torch.Tensor, block_lse: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Stage 2's inverse CDF: for each of P pairs, the index inside its block of the row drawn with
    probability exp(a_j) / Z_b, from ``scores`` [P, block] (-inf for non-candidates), the block LSEs
    [P] and uniforms ``u`` [P].

    Never returns a row without mass: u = 0 gives the first row with mass (``right=True`` skips
    leading zeros) and u = 1 (or rounding at the top of the CDF) the last row with mass.
    """
    cdf = (scores.double() - block_lse.double().unsqueeze(1)).exp_().cumsum_(1)
    total = cdf[:, -1:].contiguous()
    within = torch.searchsorted(cdf, u.double().unsqueeze(1) * total, right=True)
    # the first index where the CDF reaches its total is the last row with mass (its step is > 0)
    last = torch.searchsorted(cdf, total, right=False)
    return torch.minimum(within, last).squeeze(1)


class _Draws:
    """Running stage-1 winners of the m draws of every query: a Gumbel keyed by (query, global
    block, draw) on each block's LSE; ties keep the lower block (strict ``>`` in increasing block order).

    The Gumbel grid is computed for ``span`` blocks at a time (several chunks' worth: a dozen hash
    ops per call), bounded like a chunk: ~4 int64 temporaries per element while it is built.
    """

    def __init__(self, seed: int, step: int, b: int, m: int, layout: ShardLayout, budget_rows: int,
                 device: torch.device) -> None:
        if native_scan.available(device):  # one call instead of ~40 int64 tensor ops
            self.keys, self.u = native_scan.draws(keyed_random.stream_base(seed, step, Stream.BLOCK_GUMBEL),
                                                  keyed_random.stream_base(seed, step, Stream.ROW_UNIFORM), b, m)
        else:
            pos = torch.arange(b, device=device, dtype=torch.int64)
            self.keys = keyed_random.draw_keys(seed, step, Stream.BLOCK_GUMBEL, pos, m)
            self.u = keyed_random.uniform(keyed_random.draw_keys(seed, step, Stream.ROW_UNIFORM, pos, m))
        self.first_block, self.blocks = layout.row_offset // layout.block_size, layout.blocks_per_rank
        self.span = max(1, budget_rows // (8 * max(m, 1)))  # chunk budget / (32 bytes x B x m)
        self.grid, self.grid_lo = torch.empty(b, m, 0, device=device), 0
        self.best_key = torch.full((b, m), _NEG_INF, device=device)
        self.best_row = torch.full((b, m), -1, dtype=torch.int64, device=device)  # local row (or block)

    def _gumbel(self, lo: int, hi: int) -> torch.Tensor:
        """[B, m, hi - lo] Gumbels of local blocks [lo, hi)."""
        if not (self.grid_lo <= lo and hi <= self.grid_lo + self.grid.shape[2]):
            top = min(max(hi, lo + self.span), self.blocks)
            ids = torch.arange(lo, top, device=self.keys.device) + self.first_block
            self.grid, self.grid_lo = keyed_random.gumbel(self.keys, ids), lo
        return self.grid[:, :, lo - self.grid_lo : hi - self.grid_lo]

    def offer(self, lse: torch.Tensor, lo: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Blocks ``lo, lo + 1, ...`` (local) with LSEs ``lse`` [B, n]: updates the best keys and
        returns the (query, draw) pairs they improved and their winning block (relative to ``lo``)."""
        key, blk = (self._gumbel(lo, lo + lse.shape[1]) + lse.unsqueeze(1)).max(dim=-1)
        better = key > self.best_key
        qi, ti = better.nonzero(as_tuple=True)
        self.best_key[qi, ti] = key[qi, ti]
        return qi, ti, blk[qi, ti]

    def partials(self, lse: torch.Tensor, layout: ShardLayout) -> LocalPartials:
        found = torch.isfinite(self.best_key)
        rows = torch.where(found, layout.to_global(self.best_row), torch.full_like(self.best_row, -1))
        return LocalPartials(lse=lse, win_key=self.best_key, win_row=rows)


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
    backend: str = "torch",
) -> LocalPartials:
    """Scores ``queries`` [B, d] (global batch order) against every filled local row.

    ``backend``: 'torch' (chunks of ``chunk_rows`` rows) or 'triton' (the fused kernel of
    :mod:`triton_scan`, no score matrix at all; sampling mode with a float scale only).
    """
    b, device = queries.shape[0], queries.device
    q = score_fn.prepare_queries(queries.detach().float())  # the partials carry no gradient
    bs = layout.block_size
    if top_k:
        return _scan_topk(store, layout, q, score_fn, top_k, max(bs, chunk_rows // bs * bs), exclude_key, exclude_ids)
    draws = _Draws(seed, step, b, num_draws, layout, chunk_rows, device)
    if b == 0:
        return draws.partials(torch.empty(0, device=device), layout)
    if backend == "triton" and _triton_trusted(store, bs, device):
        return _sample_triton(store, layout, q, draws, chunk_rows, exclude_key, exclude_ids)
    chunk_rows = max(bs, chunk_rows // bs * bs)
    # Stage 2 deferred: the current winners' block scores are kept ([B·m, block] floats, at most one
    # chunk's worth) and the inverse CDF runs once, after the scan, on the final winners only; the first
    # chunks replace most of their winners, so resolving at once did ~(1 + ln chunks)x the work. Same
    # inputs per pair, row-wise ops: the same rows either way. Above the budget: resolved per chunk.
    if num_draws * bs <= chunk_rows and native_scan.available(device):
        return _sample_native(store, layout, q, score_fn, draws, chunk_rows, exclude_key, exclude_ids)
    return _sample_torch(store, layout, q, score_fn, draws, chunk_rows, exclude_key, exclude_ids)


def _chunks(store: ShardStore, chunk_rows: int) -> Iterator[tuple[int, int, int]]:
    """(start, end, filled rows) of every scoring chunk that holds at least one row."""
    for start, filled in zip(range(0, store.rows, chunk_rows), store.filled_per_chunk(chunk_rows)):
        if filled:
            yield start, min(start + chunk_rows, store.rows), filled


def _chunk_scores(store: ShardStore, q: torch.Tensor, score_fn: ScoreFn, start: int, end: int,
                  buf: torch.Tensor) -> torch.Tensor:
    """T(q · rows[start:end]) [B, end - start], the product written into ``buf`` (one buffer per scan: no
    allocation, no fresh pages per chunk)."""
    out = buf[: q.shape[0] * (end - start)].view(q.shape[0], -1)
    return score_fn.on_prepared(torch.mm(q, store.decode(start, end).t(), out=out)).contiguous()


def _deferred_buffers(draws: _Draws, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
    b, m = draws.best_key.shape
    return torch.empty((b * m, bs), device=draws.keys.device), torch.empty(b * m, device=draws.keys.device)


def _pick_deferred(draws: _Draws, win_scores: torch.Tensor, win_lse: torch.Tensor) -> None:
    """Stage 2 for the final winners: the row inside each winning block (``best_row`` holds its first row)."""
    found = torch.isfinite(draws.best_key).view(-1).nonzero().squeeze(1)
    if found.numel() == win_lse.numel():
        draws.best_row.view(-1).add_(pick_in_block(win_scores, win_lse, draws.u.view(-1)))
    elif found.numel():
        within = pick_in_block(win_scores.index_select(0, found), win_lse.index_select(0, found),
                               draws.u.reshape(-1).index_select(0, found))
        draws.best_row.view(-1).index_add_(0, found, within)


def _sample_torch(
    store: ShardStore,
    layout: ShardLayout,
    q: torch.Tensor,
    score_fn: ScoreFn,
    draws: _Draws,
    chunk_rows: int,
    exclude_key: str | None,
    exclude_ids: torch.Tensor | None,
) -> LocalPartials:
    """The scan in torch ops (any device): block LSEs by :func:`block_lse`, stage 1 by :meth:`_Draws.offer`,
    stage 2 from the scores still in memory (no re-scoring, no gathered copy of embeddings)."""
    (b, m), bs, device = draws.best_key.shape, layout.block_size, q.device
    lse_all = torch.full((b, layout.blocks_per_rank), _NEG_INF, device=device)
    buf = torch.empty(b * min(chunk_rows, store.rows), device=device)
    defer = m * bs <= chunk_rows
    if defer:
        win_scores, win_lse = _deferred_buffers(draws, bs)
    for start, end, filled in _chunks(store, chunk_rows):
        scores = _chunk_scores(store, q, score_fn, start, end, buf)
        _mask_chunk(scores, store, start, end, filled, exclude_key, exclude_ids)
        lse_c = block_lse(scores, bs)
        s3 = scores.view(b, -1, bs)
        lse_all[:, start // bs : end // bs] = lse_c
        # stage 1 for this chunk's blocks; stage 2 for the draws whose winner changed
        qi, ti, blk = draws.offer(lse_c, start // bs)
        if qi.numel():
            pair = qi * s3.shape[1] + blk  # (query, block) as a row of [B * blocks, block]: a contiguous gather
            pair_scores, pair_lse = s3.reshape(-1, bs).index_select(0, pair), lse_c.reshape(-1).index_select(0, pair)
            if defer:
                slot = qi * m + ti
                win_scores.index_copy_(0, slot, pair_scores)
                win_lse.index_copy_(0, slot, pair_lse)
                draws.best_row[qi, ti] = start + blk * bs  # the block's first row; + the pick after the scan
            else:
                draws.best_row[qi, ti] = start + blk * bs + pick_in_block(pair_scores, pair_lse, draws.u[qi, ti])
    if defer:
        _pick_deferred(draws, win_scores, win_lse)
    return draws.partials(torch.logsumexp(lse_all, dim=1), layout)


def _native_exclusions(store: ShardStore, exclude_key: str | None, exclude_ids: torch.Tensor | None):
    """(row ids [rows], excluded ids ascending, their queries) as int64 for the kernel, or None when there is
    nothing to exclude. int32 ids are widened once per step (O(rows), not O(B x rows) per chunk)."""
    if exclude_ids is None:
        return None
    row_ids = store.feature(exclude_key).reshape(-1).to(torch.int64).contiguous()
    ids, order = torch.sort(exclude_ids.to(torch.int64))
    return row_ids, ids.contiguous(), order.contiguous()


def _native_masks(store: ShardStore, excl, start: int, end: int, filled: int) -> native_scan.ChunkMasks:
    """The kernel's masks for local rows [start, end) holding ``filled`` rows (``excl``: :func:`_native_exclusions`)."""
    return native_scan.ChunkMasks(
        filled=store.filled[start:end] if filled < end - start else None,
        row_ids=None if excl is None else excl[0][start:end],
        excl_sorted=None if excl is None else excl[1], excl_query=None if excl is None else excl[2])


def _fused_chunk_rows(store: ShardStore, chunk_rows: int) -> int:
    """Rows per call of a fused kernel: fp32 rows are scanned where they lie (no buffer to bound: one call),
    other codecs are decoded ``chunk_rows`` at a time."""
    return store.rows if store.codec.storage_dtype == torch.float32 else chunk_rows


def _sample_native(
    store: ShardStore,
    layout: ShardLayout,
    q: torch.Tensor,
    score_fn: ScoreFn,
    draws: _Draws,
    chunk_rows: int,
    exclude_key: str | None,
    exclude_ids: torch.Tensor | None,
) -> LocalPartials:
    """The CPU scan: one kernel call per chunk (:mod:`native_scan`) that masks, writes the block LSEs, runs
    stage 1 and copies each new winner's block scores for the deferred stage 2. With a float scale (folded
    into ``q``) the kernel also computes the product, block by block, so no score chunk is ever written
    (the fused scan); a callable transform needs the scores, so ``torch.mm`` and the transform run first."""
    b, bs = draws.best_key.shape[0], layout.block_size
    lse_all = torch.full((b, layout.blocks_per_rank), _NEG_INF)
    win_scores, win_lse = _deferred_buffers(draws, bs)
    state = native_scan.Stage1(draws.keys, draws.best_key, draws.best_row, win_scores, win_lse)
    excl = _native_exclusions(store, exclude_key, exclude_ids)
    fused = score_fn.fn is None
    if fused:
        packed, chunk_rows = native_scan.pack_queries(q), _fused_chunk_rows(store, chunk_rows)
    else:
        buf = torch.empty(b * min(chunk_rows, store.rows))
    for start, end, filled in _chunks(store, chunk_rows):
        masks = _native_masks(store, excl, start, end, filled)
        where = dict(first_block=draws.first_block + start // bs, row0=start)
        lse_out = lse_all[:, start // bs : end // bs]
        if fused:
            rows = store.decode(start, end)
            with record_function(KERNEL_RANGE):  # a trace shows the kernel apart from the decode
                native_scan.fused_scan(packed, b, rows, bs, lse_out, masks, state, **where)
        else:
            scores = _chunk_scores(store, q, score_fn, start, end, buf)
            with record_function(KERNEL_RANGE):  # a trace shows the kernel apart from the product
                native_scan.scan_chunk(scores, bs, lse_out, masks, state, **where)
    native_scan.pick(win_scores, win_lse, draws.u.view(-1), draws.best_key.view(-1), draws.best_row.view(-1),
                     layout.row_offset)  # global rows, -1 where nothing was found: the partials as they are
    return LocalPartials(lse=native_scan.row_lse(lse_all), win_key=draws.best_key, win_row=draws.best_row)


_TRITON_CHECKED: dict[tuple[str, str, int], bool] = {}


def _triton_trusted(store: ShardStore, bs: int, device: torch.device) -> bool:
    """The kernel's self-check (once per process, device, codec and block size): where it fails to
    compile or disagrees with torch, one warning and the torch scan from then on."""
    key = (str(device), store.codec.name, bs)
    if key not in _TRITON_CHECKED:
        from . import triton_scan

        problem = triton_scan.self_check(store.codec, store.dim, bs, device)
        if problem is not None:
            log.warning("sharded_negcache: the Triton scan failed its self-check on %s with %s rows (%s); "
                        "scoring runs the torch scan", device, store.codec.name, problem)
        _TRITON_CHECKED[key] = problem is None
    return _TRITON_CHECKED[key]


def _sample_triton(
    store: ShardStore,
    layout: ShardLayout,
    q: torch.Tensor,
    draws: _Draws,
    chunk_rows: int,
    exclude_key: str | None,
    exclude_ids: torch.Tensor | None,
) -> LocalPartials:
    """The fused kernel writes only [B, blocks] LSEs; stage 1 walks them in ranges whose Gumbel grid
    stays within the chunk budget; stage 2 re-scores each winning block inside a second kernel."""
    from . import triton_scan

    row_ids = store.feature(exclude_key).reshape(-1) if exclude_ids is not None else None
    rows = triton_scan.StoredRows.of(store.embeddings, store.codec.name, store.dim, store.filled, row_ids)
    bs, (b, m) = layout.block_size, draws.best_key.shape
    lse_all = triton_scan.block_lse(q, rows, bs, exclude_ids)
    best_blk = torch.zeros((b, m), dtype=torch.int64, device=q.device)
    for lo in range(0, layout.blocks_per_rank, draws.span):
        qi, ti, blk = draws.offer(lse_all[:, lo : lo + draws.span], lo)
        best_blk[qi, ti] = blk + lo
    found = torch.isfinite(draws.best_key)
    win_lse = lse_all.gather(1, best_blk)
    draws.best_row = triton_scan.pick_rows(q, rows, bs, best_blk, win_lse, draws.u, found, exclude_ids)
    return draws.partials(torch.logsumexp(lse_all, dim=1), layout)


def _scan_topk(
    store: ShardStore,
    layout: ShardLayout,
    q: torch.Tensor,
    score_fn: ScoreFn,
    k: int,
    chunk_rows: int,
    exclude_key: str | None,
    exclude_ids: torch.Tensor | None,
) -> LocalPartials:
    """The exact local top-k (value, global row), kept running chunk by chunk (on CPU with a float scale: in the
    fused kernel, which never writes a score chunk)."""
    b, device = q.shape[0], q.device
    best_val = torch.full((b, k), _NEG_INF, device=device)
    best_row = torch.full((b, k), -1, dtype=torch.int64, device=device)
    if b == 0:
        return LocalPartials(topk_val=best_val, topk_row=best_row)
    if score_fn.fn is None and native_scan.available(device):
        return _topk_native(store, layout, q, best_val, best_row, chunk_rows, exclude_key, exclude_ids)
    for start, end, filled in _chunks(store, chunk_rows):
        scores = score_fn.on_prepared(q @ store.decode(start, end).t())
        _mask_chunk(scores, store, start, end, filled, exclude_key, exclude_ids)
        val, idx = scores.topk(min(k, end - start), dim=1)
        row = torch.where(torch.isfinite(val), idx + (layout.row_offset + start), torch.full_like(idx, -1))
        val, pick = torch.cat([best_val, val], 1).topk(k, dim=1)
        best_val, best_row = val, torch.cat([best_row, row], 1).gather(1, pick)
    return LocalPartials(topk_val=best_val, topk_row=best_row)


TOPK_TILE_ROWS = 192  # rows the fused top-k scores per (query group, tile): a multiple of every micro-tile


def _topk_native(store: ShardStore, layout: ShardLayout, q: torch.Tensor, best_val: torch.Tensor,
                 best_row: torch.Tensor, chunk_rows: int, exclude_key: str | None,
                 exclude_ids: torch.Tensor | None) -> LocalPartials:
    """Top-k mode in the fused kernel: each query's running top-k as a heap per lane, a row entering only when
    above the k-th value (rare after the first rows); sorted once at the end. fp32 rows in one call."""
    packed, excl = native_scan.pack_queries(q), _native_exclusions(store, exclude_key, exclude_ids)
    for start, end, filled in _chunks(store, _fused_chunk_rows(store, chunk_rows)):
        masks = _native_masks(store, excl, start, end, filled)
        with record_function(KERNEL_RANGE):
            native_scan.fused_topk(packed, q.shape[0], store.decode(start, end), TOPK_TILE_ROWS, best_val, best_row,
                                   masks, row0=layout.row_offset + start)
    best_val, order = best_val.sort(dim=1, descending=True)
    return LocalPartials(topk_val=best_val, topk_row=best_row.gather(1, order))
