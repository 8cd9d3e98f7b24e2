"""Scoring all gathered queries against this rank's rows: the scan's inputs, the choice of backend, and the
torch backend.

Never materialises [queries, shard rows]: rows are decoded and scored ``chunk_rows`` at a time (design §3
step 2). Per chunk: the product, then the block log-sum-exp written into [queries, blocks] partials and
stage 1 below. Then:

* sampling mode: ``lse`` over the blocks, and for each draw the two-stage Gumbel sampler: stage 1 picks a
  global block with probability Z_b / Z (a Gumbel keyed by the block id on the block LSEs, a running best
  over the chunks); stage 2 picks a row inside the winning block by inverse CDF with a uniform keyed by the
  query and draw;
* top-k mode: the exact local top-k scores and their global row ids (kept running per chunk).

A scan is one :class:`ScanInputs` (prepared queries, settings, exclusions; chunk masks and the sampler's
state are cut from it in one way) handed to one backend: ``sample`` or ``topk`` of :class:`ScanBackend`.
Three backends exist, one module each: torch ops (here, any device), the C++ kernel (:mod:`native_backend`,
CPU) and the Triton kernels (:mod:`triton_scan`, CUDA); :func:`resolve_backend` is the one place that
chooses among them. Every random number is keyed by (seed, step, global query position, global block id,
draw), so the partials, once combined, do not depend on the world size, the chunk size or the backend's
order of work.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Iterator, Protocol

import torch

from . import keyed_random, native_scan
from .keyed_random import Stream
from .layout import ShardLayout
from .store import ShardStore

__all__ = ["ScoreFn", "LocalPartials", "ScanInputs", "Draws", "ScanBackend", "TorchScan", "TORCH", "BACKENDS",
           "resolve_backend", "scan_backend", "score_shard", "make_score_fn", "block_lse", "pick_in_block",
           "mask_chunk", "chunk_top_k", "top_k_lower_row_wins", "KERNEL_RANGE"]

_NEG_INF = float("-inf")
KERNEL_RANGE = "negcache/score.kernel"  # profiler range of each native kernel call, inside negcache/score


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


# ---- choosing the backend -------------------------------------------------------------------------------------
BACKENDS = ("auto", "torch", "native", "triton")
_AUTO_REASON = {"native": "CPU device and the C++ kernel loaded", "triton": "CUDA device and triton available"}


def resolve_backend(requested: str, device: torch.device | None, score_fn: ScoreFn,
                    top_k: int | None) -> tuple[str, str]:
    """(backend, reason): the one place where ``scoring_backend`` becomes what runs. 'torch' runs torch ops
    only; 'native' the C++ kernel (CPU); 'triton' the Triton kernels (CUDA, sampling mode, a float scale);
    'auto' the C++ kernel on CPU and Triton on CUDA where each is possible, else torch ops. A requested kernel
    that is impossible here raises ValueError naming why; ``SHARDED_NEGCACHE_NATIVE=0`` overrides a request
    of the C++ kernel (torch ops, the reason says so). ``device`` None (not known yet, at construction): only
    what does not depend on it is checked."""
    if requested not in BACKENDS:
        raise ValueError(f"scoring_backend must be one of {BACKENDS}, got {requested!r}")
    if requested == "torch":
        return "torch", "requested"
    if requested == "native" or (requested == "auto" and device is not None and device.type == "cpu"):
        if not native_scan.enabled():
            return "torch", f"{native_scan.ENV_NATIVE} turns the C++ kernel off"
        kernel, why_not = "native", _why_not_native(device, score_fn, top_k)
    else:
        kernel, why_not = "triton", _why_not_triton(requested, device, score_fn, top_k)
    if why_not is None:
        return kernel, "requested" if requested == kernel else _AUTO_REASON[kernel]
    if requested == kernel:
        raise ValueError(f"scoring_backend={kernel!r} is not possible here: {why_not}")
    return "torch", why_not


def _why_not_native(device: torch.device | None, score_fn: ScoreFn, top_k: int | None) -> str | None:
    if device is not None and device.type != "cpu":
        return f"device is {device.type}, the C++ kernel is for CPU"
    if top_k and score_fn.fn is not None:
        return "top_k mode with a callable score_transform has no C++ kernel (its top-k folds a float scale)"
    if not native_scan.available(torch.device("cpu")):
        return "the C++ kernel did not build or load (see the warning)"
    return None


def _why_not_triton(requested: str, device: torch.device | None, score_fn: ScoreFn,
                    top_k: int | None) -> str | None:
    if top_k:
        return "top_k mode runs on the torch path"
    if score_fn.fn is not None:
        return "a callable score_transform runs on the torch path (the kernel folds a float scale into the queries)"
    if requested == "auto" and device is not None and device.type != "cuda":
        return f"device is {device.type}, the kernel is for CUDA"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    return None


class ScanBackend(Protocol):
    """One way to run a scan: both modes over the same :class:`ScanInputs`, returning the rank's partials."""

    name: str

    def sample(self, scan: ScanInputs) -> LocalPartials:
        """Sampling mode: every query's LSE over the local rows and its m stage-1 winners with their rows."""
        ...

    def topk(self, scan: ScanInputs) -> LocalPartials:
        """Top-k mode: every query's exact local top-k (value, global row), best first, lower row on ties."""
        ...


def scan_backend(name: str) -> ScanBackend:
    """The backend :func:`resolve_backend` named, its module imported on first use (triton only where chosen)."""
    if name == "native":
        from .native_backend import NATIVE

        return NATIVE
    if name == "triton":
        from .triton_scan import TRITON

        return TRITON
    return TORCH


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
    backend: str = "auto",
) -> LocalPartials:
    """Scores ``queries`` [B, d] (global batch order) against every filled local row, on ``backend`` (a
    ``scoring_backend`` value, resolved by :func:`resolve_backend`); rows whose ``exclude_key`` field equals a
    query's ``exclude_ids`` entry are not its candidates."""
    name, _ = resolve_backend(backend, queries.device, score_fn, top_k)
    scan = ScanInputs.build(store, layout, queries, score_fn, num_draws=num_draws, top_k=top_k, seed=seed,
                            step=step, chunk_rows=chunk_rows, exclude_key=exclude_key, exclude_ids=exclude_ids)
    if scan.b == 0:
        return scan.no_queries()
    runner = scan_backend(name)
    return runner.topk(scan) if top_k else runner.sample(scan)


# ---- the inputs of a scan -------------------------------------------------------------------------------------
@dataclass
class ScanInputs:
    """What every backend reads, built once per scan by :meth:`build`: the prepared queries, the settings, and
    the exclusions as int64 (each row's doc id, each query's own positive), from which :meth:`masks` cuts
    every chunk's masks and :class:`Draws` the sampler's state."""

    store: ShardStore
    layout: ShardLayout
    q: torch.Tensor  # [B, d] float32, the float scale folded in, no gradient (the partials carry none)
    score_fn: ScoreFn
    num_draws: int
    top_k: int | None
    seed: int
    step: int
    chunk_rows: int  # rows per chunk: whole sampling blocks, at least one
    row_ids: torch.Tensor | None = None  # [rows] int64: each local row's doc id (None: nothing excluded)
    exclude_ids: torch.Tensor | None = None  # [B] int64: each query's own positive

    @staticmethod
    def build(store: ShardStore, layout: ShardLayout, queries: torch.Tensor, score_fn: ScoreFn, *, num_draws: int,
              top_k: int | None, seed: int, step: int, chunk_rows: int, exclude_key: str | None = None,
              exclude_ids: torch.Tensor | None = None) -> ScanInputs:
        """The inputs of :func:`score_shard`; int32 doc ids are widened here, once per scan (O(rows))."""
        row_ids = ids = None
        if exclude_ids is not None:
            if exclude_key is None:
                raise ValueError("exclude_ids needs exclude_key, the feature field holding each row's doc id")
            row_ids = store.feature(exclude_key).reshape(-1).to(torch.int64).contiguous()
            ids = exclude_ids.reshape(-1).to(torch.int64)
        bs = layout.block_size
        q = score_fn.prepare_queries(queries.detach().float())
        return ScanInputs(store, layout, q, score_fn, num_draws, top_k, seed, step, max(bs, chunk_rows // bs * bs),
                          row_ids, ids)

    @property
    def b(self) -> int:
        return self.q.shape[0]

    def chunks(self, rows: int | None = None) -> Iterator[tuple[int, int, int]]:
        """(start, end, filled rows) of every chunk of ``rows`` rows (default ``chunk_rows``) holding a row."""
        n, total = rows or self.chunk_rows, self.store.rows
        for start, filled in zip(range(0, total, n), self.store.filled_per_chunk(n)):
            if filled:
                yield start, min(start + n, total), filled

    @cached_property
    def _excluded_sorted(self) -> tuple[torch.Tensor, torch.Tensor]:
        ids, order = torch.sort(self.exclude_ids)
        return ids.contiguous(), order.contiguous()

    def masks(self, start: int, end: int, filled: int) -> native_scan.ChunkMasks:
        """What local rows [start, end), holding ``filled`` rows, mask: empty rows (None for a full chunk) and
        each query's own positive (the rows' ids, the excluded ids ascending and the query of each)."""
        full = self.store.filled[start:end] if filled < end - start else None
        if self.row_ids is None:
            return native_scan.ChunkMasks(filled=full)
        return native_scan.ChunkMasks(full, self.row_ids[start:end], *self._excluded_sorted)

    def scores(self, start: int, end: int, buf: torch.Tensor) -> torch.Tensor:
        """T(q · rows[start:end]) [B, end - start], the product written into ``buf`` (one buffer per scan: no
        allocation, no fresh pages per chunk); unmasked."""
        out = buf[: self.b * (end - start)].view(self.b, -1)
        return self.score_fn.on_prepared(torch.mm(self.q, self.store.decode(start, end).t(), out=out)).contiguous()

    def no_queries(self) -> LocalPartials:
        """The partials of a scan without queries (both modes)."""
        m, k, dev = self.num_draws, self.top_k or 0, self.q.device
        if self.top_k:
            return LocalPartials(topk_val=torch.full((0, k), _NEG_INF, device=dev),
                                 topk_row=torch.full((0, k), -1, dtype=torch.int64, device=dev))
        return LocalPartials(lse=torch.empty(0, device=dev), win_key=torch.empty((0, m), device=dev),
                             win_row=torch.empty((0, m), dtype=torch.int64, device=dev))


class Draws:
    """Running stage-1 winners of the m draws of every query: a Gumbel keyed by (query, global block, draw) on
    each block's LSE; ties keep the lower block (strict ``>`` in increasing block order). ``native``: the keys
    and uniforms in one kernel call instead of ~40 int64 tensor ops (the same bits).

    The Gumbel grid is computed for ``span`` blocks at a time (several chunks' worth: a dozen hash ops per
    call), bounded like a chunk: ~4 int64 temporaries per element while it is built.
    """

    def __init__(self, scan: ScanInputs, native: bool) -> None:
        b, m, device, layout = scan.b, scan.num_draws, scan.q.device, scan.layout
        if native:
            self.keys, self.u = native_scan.draws(keyed_random.stream_base(scan.seed, scan.step, Stream.BLOCK_GUMBEL),
                                                  keyed_random.stream_base(scan.seed, scan.step, Stream.ROW_UNIFORM),
                                                  b, m)
        else:
            pos = torch.arange(b, device=device, dtype=torch.int64)
            self.keys = keyed_random.draw_keys(scan.seed, scan.step, Stream.BLOCK_GUMBEL, pos, m)
            self.u = keyed_random.uniform(keyed_random.draw_keys(scan.seed, scan.step, Stream.ROW_UNIFORM, pos, m))
        self.first_block, self.blocks = layout.row_offset // layout.block_size, layout.blocks_per_rank
        self.span = max(1, scan.chunk_rows // (8 * max(m, 1)))  # chunk budget / (32 bytes x B x m)
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

    def deferred(self, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Buffers for the current winners' block scores [B·m, bs] and LSEs [B·m]: stage 2 after the scan."""
        b, m = self.best_key.shape
        return torch.empty((b * m, bs), device=self.keys.device), torch.empty(b * m, device=self.keys.device)

    def pick_deferred(self, win_scores: torch.Tensor, win_lse: torch.Tensor) -> None:
        """Stage 2 for the final winners: the row inside each winning block (``best_row`` holds its first row)."""
        found = torch.isfinite(self.best_key).view(-1).nonzero().squeeze(1)
        if found.numel() == win_lse.numel():
            self.best_row.view(-1).add_(pick_in_block(win_scores, win_lse, self.u.view(-1)))
        elif found.numel():
            within = pick_in_block(win_scores.index_select(0, found), win_lse.index_select(0, found),
                                   self.u.reshape(-1).index_select(0, found))
            self.best_row.view(-1).index_add_(0, found, within)

    def partials(self, lse: torch.Tensor, layout: ShardLayout) -> LocalPartials:
        found = torch.isfinite(self.best_key)
        rows = torch.where(found, layout.to_global(self.best_row), torch.full_like(self.best_row, -1))
        return LocalPartials(lse=lse, win_key=self.best_key, win_row=rows)


# ---- the torch backend ----------------------------------------------------------------------------------------
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


def mask_chunk(scores: torch.Tensor, masks: native_scan.ChunkMasks, exclude_ids: torch.Tensor | None) -> None:
    """-inf (in place) in ``scores`` [B, n] for the chunk's empty rows and each query's own positive."""
    if masks.filled is not None:
        scores.masked_fill_(~masks.filled[None, :], _NEG_INF)
    if masks.row_ids is not None:
        scores.masked_fill_(masks.row_ids[None, :] == exclude_ids[:, None], _NEG_INF)


class TorchScan:
    """The scan in torch ops, on any device: block LSEs by :func:`block_lse`, stage 1 by :meth:`Draws.offer`,
    stage 2 from the scores still in memory (no re-scoring, no gathered copy of embeddings)."""

    name = "torch"

    def sample(self, scan: ScanInputs) -> LocalPartials:
        # Stage 2 deferred: the current winners' block scores are kept ([B·m, block] floats, at most one chunk's
        # worth) and the inverse CDF runs once, after the scan, on the final winners only; the first chunks
        # replace most of their winners, so resolving at once did ~(1 + ln chunks)x the work. Same inputs per
        # pair, row-wise ops: the same rows either way. Above the budget: resolved per chunk.
        draws, layout, store = Draws(scan, native=False), scan.layout, scan.store
        (b, m), bs, device = draws.best_key.shape, layout.block_size, scan.q.device
        lse_all = torch.full((b, layout.blocks_per_rank), _NEG_INF, device=device)
        buf = torch.empty(b * min(scan.chunk_rows, store.rows), device=device)
        defer = m * bs <= scan.chunk_rows
        if defer:
            win_scores, win_lse = draws.deferred(bs)
        for start, end, filled in scan.chunks():
            scores = scan.scores(start, end, buf)
            mask_chunk(scores, scan.masks(start, end, filled), scan.exclude_ids)
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
            draws.pick_deferred(win_scores, win_lse)
        return draws.partials(torch.logsumexp(lse_all, dim=1), layout)

    def topk(self, scan: ScanInputs) -> LocalPartials:
        """The exact local top-k, kept running chunk by chunk (:func:`chunk_top_k`, :func:`top_k_lower_row_wins`)."""
        b, k, device, offset = scan.b, scan.top_k, scan.q.device, scan.layout.row_offset
        best_val = torch.full((b, k), _NEG_INF, device=device)
        best_row = torch.full((b, k), -1, dtype=torch.int64, device=device)
        for start, end, filled in scan.chunks():
            scores = scan.score_fn.on_prepared(scan.q @ scan.store.decode(start, end).t())
            mask_chunk(scores, scan.masks(start, end, filled), scan.exclude_ids)
            val, idx = chunk_top_k(scores, min(k, end - start))
            row = torch.where(torch.isfinite(val), idx + (offset + start), torch.full_like(idx, -1))
            best_val, best_row = top_k_lower_row_wins(torch.cat([best_val, val], 1), torch.cat([best_row, row], 1), k)
        return LocalPartials(topk_val=best_val, topk_row=best_row)


TORCH = TorchScan()


def chunk_top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of each row of ``scores`` [B, n] (values, indices; unordered), equal values at the k-th
    going to the lower index. ``torch.topk`` picks among ties at the k-th value arbitrarily: it runs for
    k + 1, and only rows whose (k+1)-th value equals the k-th (duplicated rows: rare otherwise) are
    redone, their tied places given to the lowest indices (a stable sort of the chunk would cost far more
    than the top-k). A -inf k-th value (the rest are rows without a candidate, -1) or a NaN: topk's choice stands."""
    val, idx = scores.topk(min(k + 1, scores.shape[1]), dim=1)
    if val.shape[1] == k:
        return val, idx
    kth = val[:, k - 1 : k]
    fix = (val[:, k] == kth[:, 0]) & torch.isfinite(kth[:, 0]) & ~val.isnan().any(1)
    val, idx = val[:, :k], idx[:, :k]
    if not bool(fix.any()):
        return val, idx
    rows = fix.nonzero().squeeze(1)
    part, th = scores[rows], kth[rows]
    tied = part == th
    places = (val[rows] == th).sum(1, keepdim=True)
    keep = (part > th) | (tied & (tied.cumsum(1) <= places))  # k per row, in ascending index order below
    idx = idx.index_copy(0, rows, keep.nonzero()[:, 1].view(-1, k))
    return scores.gather(1, idx), idx


def top_k_lower_row_wins(vals: torch.Tensor, rows: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` best of each query's candidates ``vals`` / ``rows`` [B, n] (global rows, -1 for none), best
    first; among equal values the lower global row wins (and comes first). The one tie rule of top-k mode,
    shared by the C++ kernel, the torch scan and the merge across ranks: the candidates, hence the samples,
    do not depend on how the rows are sharded (duplicated rows tie exactly)."""
    by_row = rows.argsort(dim=1, stable=True)
    vals, rows = vals.gather(1, by_row), rows.gather(1, by_row)
    order = vals.argsort(dim=1, descending=True, stable=True)[:, :k]
    return vals.gather(1, order), rows.gather(1, order)
