"""Fused Triton kernels of the scan (GPU): scores never reach memory.

``block_lse``: one program owns a tile of ``BLOCK_Q`` queries and one sampling block of the shard. It
multiplies the query tile by the block's rows, ``BLOCK_R`` rows at a time, and folds each tile of fp32
accumulators into a running (max, Σ exp) per query (the online log-sum-exp of Milakov & Gimelshein,
as in the fused matmul + LSE of Wijmans et al., "Cut Your Losses in Large-Vocabulary Language
Models", 2024); it writes only the [queries, blocks] LSEs. A block is always reduced by the same
program in the same order, so its value does not depend on the world size.

``pick_rows``: stage 2. One program per (query, draw) re-scores its winning block (a [block, d] · [d]
product, nothing gathered to memory) and applies the inverse CDF of :func:`scoring.pick_in_block`
(float64 weights, never a row without mass).

Rows are read in their stored codec and decoded in registers: fp32 (products in fp32, IEEE, no TF32),
bf16 / fp16 (the queries are rounded to the row dtype; tensor cores, fp32 accumulation), int8 / int4
(fbgemm's fused row-wise layouts: dequantised with the row's scale and bias, then rounded to bf16 for
the tensor cores). The float score scale is folded into the queries by the caller. Empty rows and,
with a doc-id field, the query's own positive are masked. Top-k mode stays on the torch path.

Importing this module imports triton; ``sharded_negcache`` imports it only when the backend is chosen.
On CPU tensors the kernels run under ``TRITON_INTERPRET=1`` (set before triton is imported): that is
how the tests check them without a GPU.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["StoredRows", "block_lse", "pick_rows", "CODECS", "score_error_bound"]

CODECS = {"fp32": 0, "bf16": 1, "fp16": 2, "int8": 3, "int4": 4}
# one rounding to the compute dtype: bf16 2^-8 to nearest; 2^-7 also covers truncation (the interpreter's cast)
_UNIT_ROUNDOFF = {"fp32": 0.0, "bf16": 2.0**-7, "fp16": 2.0**-10, "int8": 2.0**-7, "int4": 2.0**-7}


def score_error_bound(codec: str, dim: int) -> float:
    """Factor c such that |a_kernel - a_torch| <= c · Σ_k |q_k · row_k| for one score (row decoded to
    fp32 as the torch path does): the query and the row each rounded once to the compute dtype
    (2u + u²) plus fp32 accumulation of ``dim`` terms in two different orders (2 · dim · 2^-24)."""
    u = _UNIT_ROUNDOFF[codec]
    return 2 * u + u * u + 2 * dim * 2.0**-24


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
    ("low", 128, Tiles(64, 64, 4, 3)),
    ("low", 384, Tiles(64, 64, 4, 2)),
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


@triton.jit
def _block_lse_kernel(q_ptr, data_ptr, sb_ptr, filled_ptr, rid_ptr, qid_ptr, out_ptr,
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


@triton.jit
def _pick_rows_kernel(q_ptr, data_ptr, sb_ptr, filled_ptr, rid_ptr, qid_ptr, blk_ptr, lse_ptr, u_ptr, out_ptr,
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
        _block_lse_kernel[grid](*args, **meta)
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
    _pick_rows_kernel[grid](*args, **meta)
    return torch.where(found, out.view(b, m), torch.full_like(blk, -1))


def self_check(codec, dim: int, bs: int, device: torch.device) -> str | None:
    """Runs the block-LSE kernel once on synthetic rows of ``codec`` (4 blocks, 16 queries, one empty
    row) against torch; None when it agrees within :func:`score_error_bound`, else what went wrong.
    The engine calls it once per process, device and codec before trusting the kernel."""
    g = torch.Generator().manual_seed(0)
    n = 4 * bs
    stored = codec.encode(torch.randn(n, dim, generator=g).to(device))
    filled = torch.ones(n, dtype=torch.bool, device=device)
    filled[1] = False
    q = (3 * torch.randn(16, dim, generator=g)).to(device)
    try:
        got = block_lse(q, StoredRows.of(stored, codec.name, dim, filled, None), bs, None)
    except Exception as exc:  # noqa: BLE001 - a kernel that does not compile or launch here
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    rows = codec.decode(stored, dim).float()
    a = (q @ rows.t()).masked_fill(~filled[None, :], float("-inf"))
    want = torch.logsumexp(a.view(16, 4, bs), dim=-1)
    bound = score_error_bound(codec.name, dim) * (q.abs() @ rows.abs().t()).view(16, 4, bs).amax(-1) + 1e-4
    err = (got - want).abs()
    if not torch.isfinite(got).all() or bool((err > bound).any()):
        return f"block LSEs differ from torch by up to {float(err.max()):.3g} (bound {float(bound.min()):.3g})"
    return None
