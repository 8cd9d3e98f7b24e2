"""The C++ kernel backend of the scan (CPU): :class:`NativeScan` drives :mod:`native_scan` over a scan's chunks.

Sampling: one kernel call per chunk masks, writes the block LSEs, runs stage 1 and copies each new winner's
block scores; stage 2 (the inverse CDF) and the per-query LSE run once, after the scan, in the kernel too.
With a float scale (folded into the queries) the kernel also computes the product, block by block, so no
score chunk is ever written (the fused scan); a callable transform needs the scores, so ``torch.mm`` and the
transform run first and the kernel scans the chunk. The winners' blocks are always kept for the deferred
stage 2 ([B·m, block] floats, even where that exceeds one chunk's budget): stage 2 then reads the very
scores the kernel reduced, so the rows drawn do not depend on the chunk size.

Top-k mode: each query's running top-k as a heap per lane inside the fused kernel, a row entering only when
above the k-th value; sorted once at the end (a float scale only: :func:`scoring.resolve_backend` refuses a
callable transform here).
"""
from __future__ import annotations

import torch

from . import native_scan
from .scoring import KERNEL_RANGE, Draws, LocalPartials, ScanInputs, top_k_lower_row_wins
from .stages import traced

__all__ = ["NativeScan", "NATIVE", "TOPK_TILE_ROWS"]

TOPK_TILE_ROWS = 192  # rows the fused top-k scores per (query group, tile): a multiple of every micro-tile


def _rows_per_call(scan: ScanInputs) -> int:
    """Rows per call of a fused kernel: fp32 rows are scanned where they lie (no buffer to bound: one call),
    other codecs are decoded ``chunk_rows`` at a time."""
    return scan.store.rows if scan.store.codec.storage_dtype == torch.float32 else scan.chunk_rows


class NativeScan:
    """The scan in the C++ kernel (CPU tensors only)."""

    name = "native"

    def sample(self, scan: ScanInputs) -> LocalPartials:
        draws, layout, store = Draws(scan, native=True), scan.layout, scan.store
        b, bs = scan.b, layout.block_size
        lse_all = torch.full((b, layout.blocks_per_rank), float("-inf"))
        win_scores, win_lse = draws.deferred(bs)
        state = native_scan.Stage1(draws.keys, draws.best_key, draws.best_row, win_scores, win_lse)
        fused = scan.score_fn.fn is None
        if fused:
            packed = native_scan.pack_queries(scan.q)
        else:
            buf = torch.empty(b * min(scan.chunk_rows, store.rows))
        for start, end, filled in scan.chunks(_rows_per_call(scan) if fused else None):
            masks = scan.masks(start, end, filled)
            where = dict(first_block=draws.first_block + start // bs, row0=start)
            lse_out = lse_all[:, start // bs : end // bs]
            if fused:
                rows = store.decode(start, end)
                with traced(KERNEL_RANGE):  # a trace shows the kernel apart from the decode
                    native_scan.fused_scan(packed, b, rows, bs, lse_out, masks, state, **where)
            else:
                scores = scan.scores(start, end, buf)
                with traced(KERNEL_RANGE):  # a trace shows the kernel apart from the product
                    native_scan.scan_chunk(scores, bs, lse_out, masks, state, **where)
        native_scan.pick(win_scores, win_lse, draws.u.view(-1), draws.best_key.view(-1), draws.best_row.view(-1),
                         layout.row_offset)  # global rows, -1 where nothing was found: the partials as they are
        return LocalPartials(lse=native_scan.row_lse(lse_all), win_key=draws.best_key, win_row=draws.best_row)

    def topk(self, scan: ScanInputs) -> LocalPartials:
        if scan.score_fn.fn is not None:
            raise ValueError("top_k mode with a callable score_transform has no C++ kernel: use scoring_backend "
                             "'torch' (or 'auto')")
        b, k = scan.b, scan.top_k
        best_val = torch.full((b, k), float("-inf"))
        best_row = torch.full((b, k), -1, dtype=torch.int64)
        packed = native_scan.pack_queries(scan.q)
        for start, end, filled in scan.chunks(_rows_per_call(scan)):
            masks = scan.masks(start, end, filled)
            with traced(KERNEL_RANGE):
                native_scan.fused_topk(packed, b, scan.store.decode(start, end), TOPK_TILE_ROWS, best_val, best_row,
                                       masks, row0=scan.layout.row_offset + start)
        best_val, best_row = top_k_lower_row_wins(best_val, best_row, k)  # the heaps, in order
        return LocalPartials(topk_val=best_val, topk_row=best_row)


NATIVE = NativeScan()
