"""The Triton backend of the scan (GPU): :class:`TritonScan` and its fused kernels; scores never reach memory.

``block_lse``: one program owns a tile of ``BLOCK_Q`` queries and a slab of consecutive sampling blocks. It
loads the query tile once (in the rows' compute dtype) and keeps it on chip while it streams the slab's
rows, ``BLOCK_R`` at a time, folding each tile of fp32 products into a running (max, Σ exp) per query
(the online log-sum-exp of Milakov & Gimelshein, as in the fused matmul + LSE of Wijmans et al., "Cut
Your Losses in Large-Vocabulary Language Models", 2024); it writes only the [queries, blocks] LSEs. A
block is always reduced by the same program in the same order, so its value does not depend on the
world size. Tiles come from a small table per (codec, d) (:func:`tiles`); docs/design.md §9 has the
roofline with the traffic of this design.

``pick_rows``: stage 2. One program per (query, draw) re-scores its winning block (a [block, d] · [d]
product, nothing gathered to memory) and applies the inverse CDF of :func:`scoring.pick_in_block`
(float64 weights, never a row without mass).

Rows are read in their stored codec and decoded in registers: fp32 (products in fp32, IEEE, no TF32),
bf16 / fp16 (the queries are rounded to the row dtype; tensor cores, fp32 accumulation), int8 / int4
(fbgemm's fused row-wise layouts: dequantised with the row's scale and bias, then rounded to bf16 for
the tensor cores). The float score scale is folded into the queries by the caller. Empty rows and,
with a doc-id field, the query's own positive are masked. Top-k mode stays on the torch path.

Before the engine trusts the kernels it runs :func:`self_check` (exact data, both kernels, with and without
exclusions); tests/test_triton_compile.py compiles every variant for sm_90 and sm_80 without a GPU.

Importing this module imports triton; ``sharded_negcache`` imports it only when the backend is chosen.
On CPU tensors the kernels run under ``TRITON_INTERPRET=1`` (set before triton is imported): that is
how the tests check them without a GPU.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .scoring import TORCH, Draws, LocalPartials, ScanInputs, pick_in_block

log = logging.getLogger("sharded_negcache")

__all__ = ["TritonScan", "TRITON", "TRUSTED", "trusted", "StoredRows", "Tiles", "tiles", "block_lse", "pick_rows",
           "lse_launch", "pick_launch", "block_lse_kernel", "pick_rows_kernel", "self_check", "CODECS",
           "score_error_bound"]

CODECS = {"fp32": 0, "bf16": 1, "fp16": 2, "int8": 3, "int4": 4}
# one rounding to the compute dtype: bf16 2^-8 to nearest; 2^-7 also covers truncation (the interpreter's cast)
_UNIT_ROUNDOFF = {"fp32": 0.0, "bf16": 2.0**-7, "fp16": 2.0**-10, "int8": 2.0**-7, "int4": 2.0**-7}


def score_error_bound(codec: str, dim: int) -> float:
    """Factor c such that |a_kernel - a_torch| <= c · Σ_k |q_k · row_k| for one score (row decoded to
    fp32 as the torch path does): the query and the row each rounded once to the compute dtype
    (2u + u²) plus fp32 accumulation of ``dim`` terms in two different orders (2 · dim · 2^-24)."""
    u = _UNIT_ROUNDOFF[codec]
    return 2 * u + u * u + 2 * dim * 2.0**-24


class TritonScan:
    """The scan in the Triton kernels: the fused kernel writes only the [B, blocks] LSEs; stage 1 walks them in
    ranges whose Gumbel grid stays within the chunk budget; stage 2 re-scores each winning block inside a second
    kernel. Sampling mode with a float scale only (:func:`scoring.resolve_backend`)."""

    name = "triton"

    def sample(self, scan: ScanInputs) -> LocalPartials:
        store, layout, q = scan.store, scan.layout, scan.q
        bs = layout.block_size
        if not trusted(store.codec, store.dim, bs, q.device):
            return TORCH.sample(scan)
        draws, (b, m) = Draws(scan, native=False), (scan.b, scan.num_draws)
        rows = StoredRows.of(store.embeddings, store.codec.name, store.dim, store.filled, scan.row_ids)
        lse_all = block_lse(q, rows, bs, scan.exclude_ids)
        best_blk = torch.zeros((b, m), dtype=torch.int64, device=q.device)
        for lo in range(0, layout.blocks_per_rank, draws.span):
            qi, ti, blk = draws.offer(lse_all[:, lo : lo + draws.span], lo)
            best_blk[qi, ti] = blk + lo
        found = torch.isfinite(draws.best_key)
        win_lse = lse_all.gather(1, best_blk)
        draws.best_row = pick_rows(q, rows, bs, best_blk, win_lse, draws.u, found, scan.exclude_ids)
        return draws.partials(torch.logsumexp(lse_all, dim=1), layout)

    def topk(self, scan: ScanInputs) -> LocalPartials:
        raise ValueError("top_k mode has no Triton kernel: use scoring_backend 'torch' (or 'auto')")


TRITON = TritonScan()

# The self-check's verdict per (device, codec name, width, block size): each compiles its own kernel variant.
TRUSTED: dict[tuple[str, str, int, int], bool] = {}


def trusted(codec, dim: int, bs: int, device: torch.device) -> bool:
    """Whether the kernels passed :func:`self_check` for rows of ``codec`` (checked once per process, device,
    codec, width and block size); where either fails to compile or disagrees with torch, one warning naming
    the check that disagreed, and the torch scan from then on."""
    key = (str(device), codec.name, dim, bs)
    if key not in TRUSTED:
        problem = self_check(codec, dim, bs, device)
        if problem is not None:
            log.warning("sharded_negcache: the Triton scan failed its self-check on %s with %s rows (%s); "
                        "scoring runs the torch scan", device, codec.name, problem)
        TRUSTED[key] = problem is None
    return TRUSTED[key]


@dataclass(frozen=True)
class StoredRows:
    """What the kernels read of a shard: the stored rows and, for int8/int4, a view of the same bytes
    as fp32/fp16 (the row's scale and bias); ``filled`` as uint8; the doc ids of the rows or None."""

    data: torch.Tensor
    scale_bias: torch.Tensor
    codec: str
    dim: int
    filled: torch.Tensor
    row_ids: torch.Tensor | None

    @staticmethod
    def of(embeddings: torch.Tensor, codec: str, dim: int, filled: torch.Tensor,
           row_ids: torch.Tensor | None) -> "StoredRows":
        if codec not in CODECS:
            raise ValueError(f"the Triton scan supports the codecs {sorted(CODECS)}, got {codec!r}")
        data = embeddings.contiguous()
        if codec == "int8":
            sb = data.view(torch.float32)  # [rows, dim/4 + 2]: scale, bias at columns dim/4, dim/4 + 1
        elif codec == "int4":
            sb = data.view(torch.float16)  # [rows, dim/4 + 2]: fp16 scale, bias at columns dim/4, dim/4 + 1
        else:
            sb = data
        ids = None if row_ids is None else row_ids.reshape(-1).to(torch.int64).contiguous()
        return StoredRows(data, sb, codec, dim, filled.contiguous().view(torch.uint8), ids)


@dataclass(frozen=True)
class Tiles:
    """Launch shape of the block-LSE kernel: queries and rows per tile, warps, pipeline stages."""

    block_q: int
    block_r: int
    num_warps: int
    num_stages: int


# (codec family, largest d) -> tiles, first match. The query tile stays on chip for the whole program, so
# BLOCK_Q x d (in the compute dtype) plus num_stages row tiles of BLOCK_R x d must fit the SM's 227 KB of
# shared memory, and the fp32 path (CUDA-core FMA, operands in registers) must not spill; every entry is
# compiled for sm_90 and sm_80 by tests/test_triton_compile.py, which asserts both.
_TILE_TABLE: list[tuple[str, int, Tiles]] = [
    ("fp32", 128, Tiles(32, 32, 4, 2)),
    ("fp32", 1 << 30, Tiles(16, 32, 4, 2)),
    ("low", 128, Tiles(128, 64, 8, 3)),
    ("low", 384, Tiles(128, 64, 8, 2)),
    ("low", 768, Tiles(64, 32, 4, 2)),
    ("low", 1 << 30, Tiles(64, 16, 4, 2)),
]
PROGRAMS_TARGET = 2048  # programs per launch: ~15 waves on 132 SMs (load balance) while each program's
# query tile is read once for a slab of rows (query traffic = programs x BLOCK_Q x d, ~0.2 GB at B = 4096)


def tiles(codec: str, dim: int, bs: int) -> Tiles:
    """The block-LSE tiles for rows of ``codec`` and width ``dim`` (blocks of ``bs`` rows): the table's,
    with BLOCK_R cut to the block (a row tile never spans two blocks; tl.dot needs 16 at least)."""
    family = "fp32" if codec == "fp32" else "low"
    t = next(t for f, top, t in _TILE_TABLE if f == family and dim <= top)
    return Tiles(t.block_q, max(16, min(t.block_r, triton.next_power_of_2(bs))), t.num_warps, t.num_stages)


def depth_split(dim: int) -> tuple[int, int]:
    """(DA, DB): ``dim`` covered by two power-of-two pieces (tl.arange needs powers of two): DA the largest
    power of two <= dim, DB the next power of two of the rest (0 if none), so 768 = 512 + 256 and
    384 = 256 + 128 are covered without padding, and any d with less than 2x padding."""
    da = max(16, 1 << (max(dim, 1).bit_length() - 1))
    rest = dim - da
    return da, (max(16, triton.next_power_of_2(rest)) if rest > 0 else 0)


def row_align(stride: int) -> int:
    """The largest power of two <= 16 dividing a row stride (in elements): the kernels address rows as
    ``(stride // ALIGN) * ALIGN`` so that triton knows the alignment and loads wide vectors (int8 rows of
    d + 8 bytes are 8-byte aligned: 8-byte loads instead of single bytes)."""
    return math.gcd(stride, 16) if stride else 16


@triton.jit
def _load_rows_t(data_ptr, sb_ptr, rows, k0, rmask, stride_row, stride_sb,
                 KW: tl.constexpr, D: tl.constexpr, CODEC: tl.constexpr, ALIGN: tl.constexpr):
    """The [KW, R] transposed tile of rows ``rows`` (int64) x columns k0 .. k0 + KW, decoded in registers to
    the compute dtype (fp32 for fp32 rows, the row dtype for bf16/fp16, bf16 for int8/int4). Masked-off
    entries (columns >= D, rows not in ``rmask``) are not read from memory."""
    offs_k = k0 + tl.arange(0, KW)
    base = rows * (stride_row * ALIGN)  # int64: rows x stride passes 2^31 bytes on large shards
    if CODEC == 0 or CODEC == 1 or CODEC == 2:
        m = (offs_k < D)[:, None] & rmask[None, :]
        t = tl.load(data_ptr + base[None, :] + offs_k[:, None], mask=m, other=0.0)
    else:
        scale = tl.load(sb_ptr + rows * stride_sb + D // 4, mask=rmask, other=0.0).to(tl.float32)
        bias = tl.load(sb_ptr + rows * stride_sb + D // 4 + 1, mask=rmask, other=0.0).to(tl.float32)
        if CODEC == 3:
            m = (offs_k < D)[:, None] & rmask[None, :]
            val = tl.load(data_ptr + base[None, :] + offs_k[:, None], mask=m, other=0).to(tl.float32)
        else:
            # byte j holds column 2j (low nibble) and 2j + 1 (high): read the KW / 2 bytes (contiguous, so in
            # vectors), then interleave the two nibbles back into KW columns
            offs_j = k0 // 2 + tl.arange(0, KW // 2)
            m = (offs_j < D // 2)[:, None] & rmask[None, :]
            byte = tl.load(data_ptr + base[None, :] + offs_j[:, None], mask=m, other=0).to(tl.int32)
            pair = tl.join(byte & 15, byte >> 4)  # [KW / 2, R, 2]
            val = tl.reshape(tl.permute(pair, (0, 2, 1)), (KW, rows.shape[0])).to(tl.float32)
        t = (val * scale[None, :] + bias[None, :]).to(tl.bfloat16)
    return t


@triton.jit
def _dot(q, ct, acc, CODEC: tl.constexpr, UPCAST: tl.constexpr):
    """acc + q · ct in fp32: IEEE fp32 for fp32 rows (no TF32); tensor cores for the others (q already in the
    row's compute dtype). Under the interpreter, whose bf16/fp16 dot is wrong, the same rounded operands
    are multiplied in fp32 (``UPCAST``)."""
    if CODEC == 0:
        acc = tl.dot(q, ct, acc, input_precision="ieee")
    elif UPCAST:
        acc = tl.dot(q.to(tl.float32), ct.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(q, ct, acc)
    return acc


# sizes are not specialised (divisibility, == 1): the self-check then runs the very binary the engine launches
@triton.jit(do_not_specialize=["B", "n_blocks", "blocks_per_prog"])
def block_lse_kernel(q_ptr, data_ptr, sb_ptr, filled_ptr, rid_ptr, qid_ptr, out_ptr,
                      B, n_blocks, blocks_per_prog, stride_q, stride_row, stride_sb,
                      D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, BS: tl.constexpr,
                      CODEC: tl.constexpr, HAS_EXCL: tl.constexpr, UPCAST: tl.constexpr, ALIGN: tl.constexpr,
                      BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr):
    # program = (query tile, slab of blocks_per_prog blocks); query tiles vary fastest, so the programs in
    # flight read the same slabs' rows (HBM once, L2 for the other query tiles)
    n_qt = tl.cdiv(B, BLOCK_Q)
    pid_q = tl.program_id(0) % n_qt
    blk0 = (tl.program_id(0) // n_qt) * blocks_per_prog
    offs_q = (pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)).to(tl.int64)  # every offset from an argument is int64
    qmask = offs_q < B
    qid = tl.load(qid_ptr + offs_q, mask=qmask, other=-2) if HAS_EXCL else offs_q
    # the query tile, on chip for the whole slab: d as DA + DB columns (powers of two)
    ka = tl.arange(0, DA)
    qa = tl.load(q_ptr + offs_q[:, None] * stride_q + ka[None, :], mask=qmask[:, None] & (ka[None, :] < D), other=0.0)
    if DB > 0:
        kb = DA + tl.arange(0, DB)
        qb = tl.load(q_ptr + offs_q[:, None] * stride_q + kb[None, :], mask=qmask[:, None] & (kb[None, :] < D),
                     other=0.0)
    TPB: tl.constexpr = (BS + BLOCK_R - 1) // BLOCK_R  # row tiles per block
    n_tiles = tl.minimum(blocks_per_prog, n_blocks - blk0) * TPB
    m_i = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    s_i = tl.zeros([BLOCK_Q], tl.float32)
    for t in range(0, n_tiles):
        blk = (blk0 + t // TPB).to(tl.int64)
        inner = (t % TPB) * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = inner < BS
        rows = blk * BS + inner
        # empty rows are not read (masked loads move no bytes): an empty block costs no memory traffic
        ok = (tl.load(filled_ptr + rows, mask=rmask, other=0) != 0) & rmask
        acc = tl.zeros([BLOCK_Q, BLOCK_R], tl.float32)
        acc = _dot(qa, _load_rows_t(data_ptr, sb_ptr, rows, 0, ok, stride_row, stride_sb, DA, D, CODEC, ALIGN),
                   acc, CODEC, UPCAST)
        if DB > 0:
            acc = _dot(qb, _load_rows_t(data_ptr, sb_ptr, rows, DA, ok, stride_row, stride_sb, DB, D, CODEC, ALIGN),
                       acc, CODEC, UPCAST)
        cand = ok[None, :]
        if HAS_EXCL:
            rid = tl.load(rid_ptr + rows, mask=rmask, other=-1)
            cand = cand & (rid[None, :] != qid[:, None])
        a = tl.where(cand, acc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(a, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s_i = s_i * tl.exp(m_i - shift) + tl.sum(tl.exp(a - shift[:, None]), axis=1)
        m_i = m_new
        # the block's last tile: its LSE out (int64 offset: B x blocks passes 2^31), then a fresh block
        end = (t % TPB) == TPB - 1
        lse = tl.where(m_i == float("-inf"), float("-inf"), tl.log(s_i) + m_i)
        tl.store(out_ptr + offs_q * n_blocks + blk, lse, mask=qmask & end)
        m_i = tl.where(end, float("-inf"), m_i)
        s_i = tl.where(end, 0.0, s_i)


@triton.jit
def _block_scores(q_ptr, data_ptr, sb_ptr, filled_ptr, rid_ptr, qi, qid, rows, rmask, stride_q, stride_row,
                  stride_sb, D: tl.constexpr, CODEC: tl.constexpr, HAS_EXCL: tl.constexpr, ALIGN: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """Scores [BLOCK_R] of query ``qi`` against ``rows`` (-inf for non-candidates), fp32 (CUDA cores: one
    query, so no tensor-core tile)."""
    acc = tl.zeros([BLOCK_K, rows.shape[0]], tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < D
        qk = tl.load(q_ptr + qi * stride_q + offs_k, mask=kmask, other=0.0)
        ct = _load_rows_t(data_ptr, sb_ptr, rows, k0, rmask, stride_row, stride_sb, BLOCK_K, D, CODEC, ALIGN)
        acc += qk.to(tl.float32)[:, None] * ct.to(tl.float32)
    ok = (tl.load(filled_ptr + rows, mask=rmask, other=0) != 0) & rmask
    if HAS_EXCL:
        ok = ok & (tl.load(rid_ptr + rows, mask=rmask, other=-1) != qid)
    return tl.where(ok, tl.sum(acc, axis=0), float("-inf"))


@triton.jit(do_not_specialize=["m"])
def pick_rows_kernel(q_ptr, data_ptr, sb_ptr, filled_ptr, rid_ptr, qid_ptr, blk_ptr, lse_ptr, u_ptr, out_ptr,
                      m, stride_q, stride_row, stride_sb,
                      D: tl.constexpr, BS: tl.constexpr, CODEC: tl.constexpr, HAS_EXCL: tl.constexpr,
                      ALIGN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)
    qi = p // m
    blk = tl.load(blk_ptr + p)
    lse = tl.load(lse_ptr + p).to(tl.float64)
    qid = tl.load(qid_ptr + qi) if HAS_EXCL else qi
    # pass 1: the block's total weight and its last row with mass
    total = tl.zeros([1], tl.float64)
    last = tl.full([1], BS - 1, tl.int64)
    last_nz = tl.full([1], -1, tl.int64)
    for r0 in range(0, BS, BLOCK_R):
        inner = r0 + tl.arange(0, BLOCK_R)
        rmask = inner < BS
        a = _block_scores(q_ptr, data_ptr, sb_ptr, filled_ptr, rid_ptr, qi, qid, blk * BS + inner, rmask,
                          stride_q, stride_row, stride_sb, D, CODEC, HAS_EXCL, ALIGN, BLOCK_K)
        w = tl.exp(a.to(tl.float64) - lse)
        total += tl.sum(w, axis=0)
        last_nz = tl.maximum(last_nz, tl.max(tl.where(w > 0, inner.to(tl.int64), -1), axis=0))
    last = tl.where(last_nz >= 0, last_nz, last)
    # pass 2: searchsorted(cdf, u · total, right=True) = the number of cdf values <= the target
    target = tl.load(u_ptr + p).to(tl.float64) * total
    run = tl.zeros([1], tl.float64)
    count = tl.zeros([1], tl.int64)
    for r0 in range(0, BS, BLOCK_R):
        inner = r0 + tl.arange(0, BLOCK_R)
        rmask = inner < BS
        a = _block_scores(q_ptr, data_ptr, sb_ptr, filled_ptr, rid_ptr, qi, qid, blk * BS + inner, rmask,
                          stride_q, stride_row, stride_sb, D, CODEC, HAS_EXCL, ALIGN, BLOCK_K)
        w = tl.exp(a.to(tl.float64) - lse)
        cdf = run + tl.cumsum(w, axis=0)
        count += tl.sum(((cdf <= target) & rmask).to(tl.int64), axis=0)
        run += tl.sum(w, axis=0)
    within = tl.minimum(count, last)
    tl.store(out_ptr + p + tl.arange(0, 1), blk * BS + within)


def _interpreted() -> bool:
    """Kernels run in triton's CPU interpreter (tests): its bf16/fp16 ``tl.dot`` is not usable."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


COMPUTE_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.bfloat16,
                 "int4": torch.bfloat16}
PICK_BLOCK_R, PICK_BLOCK_K = 64, 64  # stage 2: [BLOCK_K, BLOCK_R] fp32 partial products per step


def lse_constexprs(codec: str, dim: int, bs: int, stride_row: int, has_excl: bool, interpreted: bool = False) -> dict:
    """The block-LSE kernel's compile-time arguments and launch options for one shard shape: what the
    engine launches and what tests/test_triton_compile.py compiles for sm_90 / sm_80."""
    t = tiles(codec, dim, bs)
    da, db = depth_split(dim)
    return dict(D=dim, DA=da, DB=db, BS=bs, CODEC=CODECS[codec], HAS_EXCL=has_excl, UPCAST=interpreted,
                ALIGN=row_align(stride_row), BLOCK_Q=t.block_q, BLOCK_R=t.block_r, num_warps=t.num_warps,
                num_stages=t.num_stages)


def pick_constexprs(codec: str, dim: int, bs: int, stride_row: int, has_excl: bool) -> dict:
    """The stage-2 kernel's compile-time arguments and launch options (see :func:`lse_constexprs`)."""
    return dict(D=dim, BS=bs, CODEC=CODECS[codec], HAS_EXCL=has_excl, ALIGN=row_align(stride_row),
                BLOCK_R=max(16, min(PICK_BLOCK_R, triton.next_power_of_2(bs))),
                BLOCK_K=max(16, min(PICK_BLOCK_K, triton.next_power_of_2(dim))), num_warps=4, num_stages=2)


def prepare_queries(q: torch.Tensor, codec: str) -> torch.Tensor:
    """The (scaled) queries rounded once, here, to the compute dtype of ``codec``'s rows: half the bytes of
    fp32 for the low-precision codecs, and the same rounding the tensor cores would need anyway."""
    return q.to(COMPUTE_DTYPE[codec]).contiguous()


def lse_launch(q: torch.Tensor, rows: StoredRows, bs: int, exclude_ids: torch.Tensor | None,
               out: torch.Tensor) -> tuple[tuple[int], tuple, dict]:
    """(grid, arguments, compile-time arguments and options) of the block-LSE kernel writing ``out`` [B, blocks]:
    what :func:`block_lse` launches, and what tests/test_triton_compile.py compiles for sm_90 / sm_80."""
    b, n_blocks = q.shape[0], rows.data.shape[0] // bs
    qc = prepare_queries(q, rows.codec)
    stride = rows.data.stride(0)
    meta = lse_constexprs(rows.codec, rows.dim, bs, stride, exclude_ids is not None, _interpreted())
    n_qt = triton.cdiv(b, meta["BLOCK_Q"])
    per_prog = triton.cdiv(n_blocks, max(1, min(n_blocks, triton.cdiv(PROGRAMS_TARGET, n_qt))))
    qid = exclude_ids.to(torch.int64).contiguous() if exclude_ids is not None else qc
    args = (qc, rows.data, rows.scale_bias, rows.filled, rows.row_ids if rows.row_ids is not None else rows.filled,
            qid, out, b, n_blocks, per_prog, qc.stride(0), stride // meta["ALIGN"], rows.scale_bias.stride(0))
    return (n_qt * triton.cdiv(n_blocks, per_prog),), args, meta


def block_lse(q: torch.Tensor, rows: StoredRows, bs: int, exclude_ids: torch.Tensor | None) -> torch.Tensor:
    """[B, blocks] block LSEs of the prepared (scaled) queries ``q`` [B, d] against the shard."""
    out = torch.empty((q.shape[0], rows.data.shape[0] // bs), dtype=torch.float32, device=q.device)
    if out.numel():
        grid, args, meta = lse_launch(q, rows, bs, exclude_ids, out)
        block_lse_kernel[grid](*args, **meta)
    return out


def pick_launch(q: torch.Tensor, rows: StoredRows, bs: int, blk: torch.Tensor, lse: torch.Tensor, u: torch.Tensor,
                exclude_ids: torch.Tensor | None, out: torch.Tensor) -> tuple[tuple[int], tuple, dict]:
    """(grid, arguments, compile-time arguments and options) of the stage-2 kernel: one program per entry of
    ``blk`` [B, m] (int64 local blocks, LSEs ``lse``, uniforms ``u``), rows into ``out`` [B·m]."""
    qc = prepare_queries(q, rows.codec)
    stride = rows.data.stride(0)
    meta = pick_constexprs(rows.codec, rows.dim, bs, stride, exclude_ids is not None)
    qid = exclude_ids.to(torch.int64).contiguous() if exclude_ids is not None else qc
    args = (qc, rows.data, rows.scale_bias, rows.filled, rows.row_ids if rows.row_ids is not None else rows.filled,
            qid, blk, lse, u, out, blk.shape[1], qc.stride(0), stride // meta["ALIGN"], rows.scale_bias.stride(0))
    return (blk.numel(),), args, meta


def pick_rows(q: torch.Tensor, rows: StoredRows, bs: int, blocks: torch.Tensor, block_lse: torch.Tensor,
              u: torch.Tensor, found: torch.Tensor, exclude_ids: torch.Tensor | None) -> torch.Tensor:
    """Stage 2: local rows [B, m] drawn inside the winning local ``blocks`` [B, m] (LSEs ``block_lse``,
    uniforms ``u``); -1 where ``found`` is False."""
    b, m = blocks.shape
    out = torch.full((b * m,), -1, dtype=torch.int64, device=q.device)
    if b * m == 0:
        return out.view(b, m)
    blk = torch.where(found, blocks, torch.zeros_like(blocks)).to(torch.int64).contiguous()
    lse = torch.where(found, block_lse, torch.zeros_like(block_lse)).float().contiguous()
    grid, args, meta = pick_launch(q, rows, bs, blk, lse, u.float().contiguous(), exclude_ids, out)
    pick_rows_kernel[grid](*args, **meta)
    return torch.where(found, out.view(b, m), torch.full_like(blk, -1))


# Row values of the self-check's exact data, per codec: integers the codec stores exactly, and for fp32 with
# 12 significant bits (odd, 2049..4095), which TF32's 11 would round. Query values are odd 17..31 (5 bits:
# exact in bf16/fp16, rounded by fp8's 4), 16 non-zeros per query, so every product and partial sum is an
# integer below 2^21: exact in fp32 in any order, on CUDA cores or tensor cores.
_EXACT_ROWS = {"fp32": (2049, 4095), "bf16": (0, 255), "fp16": (0, 255), "int8": (-128, 127), "int4": (-8, 7)}
CHECK_BLOCKS = 8  # 0-3 one candidate row each, 4 empty, 5-7 several rows (some empty, some excluded)
CHECK_QUERIES, CHECK_DRAWS = 8, 4  # stage 2: draws of the first queries
_SINGLE_RTOL = 2.0**-22  # a one-row block's LSE is its score: exact data leaves only the last bits of exp/log
_LSE_ATOL = 1e-4  # several rows: exp/log/sum rounding of scores within +-8 (~1e-5) with margin
_CDF_STEP = 2.0**-20  # stage-2 targets this fraction of the block's mass beside a CDF step: above fp32's
# resolution of u (2^-24), far below what a fault moves a step (>= 1e-4), far above the exact path's 1e-15


def _exact_case(codec, dim: int, bs: int, b: int, device: torch.device):
    """(stored rows, their decoded fp32 values, filled, row ids, queries, query ids) of the exact data."""
    g = torch.Generator().manual_seed(0)
    n, name = CHECK_BLOCKS * bs, codec.name
    lo, hi = _EXACT_ROWS[name]
    if name == "fp32":
        x = (2 * torch.randint((lo - 1) // 2, (hi + 1) // 2, (n, dim), generator=g) + 1).float()
        x *= torch.randint(0, 2, (n, dim), generator=g) * 2 - 1.0
    else:
        x = torch.randint(lo if lo < 0 else -hi, hi + 1, (n, dim), generator=g).float()
        if name in ("int8", "int4"):  # each row holds its range's ends: scale 1 and bias lo, so decoding is exact
            x[:, 0], x[:, -1] = lo, hi
    stored = codec.encode(x.to(device))
    decoded = codec.decode(stored, dim).float().cpu()
    filled = torch.rand(n, generator=g) < 0.7
    filled[: 4 * bs] = False
    filled[torch.arange(4) * bs + torch.tensor([0, bs // 2, bs - 1, bs // 3])] = True  # one candidate per block
    filled[4 * bs : 5 * bs] = False
    row_ids = torch.randint(0, 6, (n,), generator=g)
    row_ids[: 4 * bs] = 100  # no query excludes the one-row blocks' candidates
    nz = torch.rand(b, dim, generator=g).argsort(1)[:, : min(16, dim)]
    sign = torch.randint(0, 2, nz.shape, generator=g) * 2 - 1.0
    qv = (2 * torch.randint(8, 16, nz.shape, generator=g) + 1).float() * sign
    qi = torch.zeros(b, dim).scatter_(1, nz, qv)
    top = float((qi.abs() @ decoded.abs().t()).max())
    q = qi * 2.0 ** -math.ceil(math.log2(max(top, 8.0) / 8.0))  # scores within +-8, still exact
    qids = torch.randint(0, 6, (b,), generator=g)
    return stored, decoded, filled, row_ids, q, qids


def _crafted_uniforms(a: torch.Tensor, lse: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """For each [P, block] score row: u whose target lies _CDF_STEP of the mass beside a random CDF step (above
    or below), so a score error that moves that step by more flips the row drawn."""
    w = (a.double() - lse.double()[:, None]).exp()
    cdf = w.cumsum(1)
    total = cdf[:, -1]
    has = w > 0
    j = torch.multinomial(has.double() + 1e-300 * (~has.any(1, keepdim=True)), 1, generator=g).squeeze(1)
    step = cdf.gather(1, j[:, None]).squeeze(1) / total
    side = torch.randint(0, 2, j.shape, generator=g) * 2 - 1.0
    return (step + side * _CDF_STEP).clamp(0.0, 1.0).float()


def self_check(codec, dim: int, bs: int, device: torch.device) -> str | None:
    """Runs both kernels, with and without exclusions, on exact data of ``codec`` (integer-valued rows and
    queries whose products are exact in fp32: the right answer is known to the last bit) against the torch
    path; None when they agree, else what disagreed. Checked: one-row blocks' LSE to 2 ulp (rejects TF32,
    fp8-rounded queries, a dropped filled mask, rows read out of order), an empty block -inf, several-row
    blocks' LSE within 1e-4, stage-1 winners under the same Gumbels, and stage-2 rows drawn with targets
    2^-20 of the mass beside a CDF step (a score error that moves the step flips the row). A kernel that
    does not compile or launch is a disagreement too. The engine calls it once per process, device, codec,
    width and block size before trusting the kernels."""
    try:
        for excl in (True, False):
            problem = _check_once(codec, dim, bs, device, excl)
            if problem:
                return f"{problem} ({'with' if excl else 'without'} exclusions)"
    except Exception as exc:  # noqa: BLE001 - a kernel that does not compile or launch here
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    return None


def _check_once(codec, dim: int, bs: int, device: torch.device, excl: bool) -> str | None:
    b = tiles(codec.name, dim, bs).block_q + 3  # a full query tile and a ragged one
    stored, decoded, filled, row_ids, q, qids = _exact_case(codec, dim, bs, b, device)
    nb = CHECK_BLOCKS
    a = (q @ decoded.t()).masked_fill(~filled[None, :], float("-inf"))
    if excl:
        a = a.masked_fill(row_ids[None, :] == qids[:, None], float("-inf"))
    want = torch.logsumexp(a.view(b, nb, bs), dim=-1)
    rows = StoredRows.of(stored, codec.name, dim, filled.to(device), row_ids.to(device) if excl else None)
    got = block_lse(q.to(device), rows, bs, qids.to(device) if excl else None).cpu()
    single = (got[:, :4] - want[:, :4]).abs() > _SINGLE_RTOL * want[:, :4].abs()
    if bool(single.any()) or not bool(torch.isfinite(got[:, :4]).all()):
        err = float((got[:, :4] - want[:, :4]).abs().nan_to_num(float("inf")).max())
        return f"block LSEs of one-row blocks differ from torch by up to {err:.3g} (exact data: 2 ulp allowed)"
    if not bool(torch.isneginf(got[:, 4]).all()):
        return "the empty block's LSE is not -inf"
    fin = torch.isfinite(want[:, 5:])
    err = (got[:, 5:] - want[:, 5:]).abs()
    if not torch.equal(torch.isfinite(got[:, 5:]), fin) or bool((err[fin] > _LSE_ATOL).any()):
        worst = float(err.nan_to_num(float("inf")).max())
        return f"block LSEs of several-row blocks differ from torch by up to {worst:.3g} (tolerance {_LSE_ATOL:g})"
    g = torch.Generator().manual_seed(1)
    gumbel = -torch.log(-torch.log(torch.rand(b, CHECK_DRAWS, nb, generator=g).clamp_min(1e-12)))
    keys = want[:, None, :] + gumbel
    top2 = keys.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * _LSE_ATOL
    if not torch.equal((got[:, None, :] + gumbel).argmax(-1)[clear], keys.argmax(-1)[clear]):
        return "stage-1 winners differ from torch under the same Gumbels"
    # stage 2 in the several-row blocks with mass (the one-row blocks draw their row whatever the scores), for
    # the first CHECK_QUERIES queries
    b = CHECK_QUERIES
    q, qids, a, want = q[:b], qids[:b], a[:b], want[:b]
    blocks = torch.where(torch.isfinite(want[:, 5:]), torch.arange(5, nb), -1)
    choice = torch.randint(0, 3, (b, CHECK_DRAWS), generator=g)
    blk = blocks.gather(1, choice)
    found = blk >= 0
    blk = torch.where(found, blk, torch.zeros_like(blk))
    seg = a.view(b, nb, bs)[torch.arange(b)[:, None], blk].reshape(-1, bs)
    lse = want.gather(1, blk)
    u = _crafted_uniforms(torch.where(found.reshape(-1, 1), seg, torch.zeros_like(seg)), lse.reshape(-1), g)
    ref = (blk.reshape(-1) * bs + pick_in_block(seg, lse.reshape(-1), u)).view(b, CHECK_DRAWS)
    ref = torch.where(found, ref, torch.full_like(ref, -1))
    out = pick_rows(q.to(device), rows, bs, blk.to(device), lse.to(device), u.view(b, CHECK_DRAWS).to(device),
                    found.to(device), qids.to(device) if excl else None).cpu()
    if not torch.equal(out, ref):
        return f"stage-2 rows differ from torch in {int((out != ref).sum())} of {int(found.sum())} draws"
    return None
