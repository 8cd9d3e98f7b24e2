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


@triton.jit
def _load_rows_t(data_ptr, sb_ptr, rows, offs_k, rmask, kmask, stride_row, stride_sb, D, CODEC: tl.constexpr):
    """The [BLOCK_K, BLOCK_R] transposed tile of rows ``rows`` x columns ``offs_k``, decoded in registers
    to the compute dtype (fp32 for fp32 rows, the row dtype for bf16/fp16, bf16 for int8/int4)."""
    m = kmask[:, None] & rmask[None, :]
    rows = rows.to(tl.int64)  # rows x stride passes 2^31 bytes on large shards
    if CODEC == 0 or CODEC == 1 or CODEC == 2:
        return tl.load(data_ptr + rows[None, :] * stride_row + offs_k[:, None], mask=m, other=0.0)
    scale = tl.load(sb_ptr + rows * stride_sb + D // 4, mask=rmask, other=0.0).to(tl.float32)
    bias = tl.load(sb_ptr + rows * stride_sb + D // 4 + 1, mask=rmask, other=0.0).to(tl.float32)
    if CODEC == 3:
        byte = tl.load(data_ptr + rows[None, :] * stride_row + offs_k[:, None], mask=m, other=0)
        val = byte.to(tl.float32)
    else:
        byte = tl.load(data_ptr + rows[None, :] * stride_row + offs_k[:, None] // 2, mask=m, other=0)
        val = ((byte.to(tl.int32) >> ((offs_k[:, None] % 2) * 4)) & 15).to(tl.float32)
    return (val * scale[None, :] + bias[None, :]).to(tl.bfloat16)


@triton.jit
def _candidates(filled_ptr, rid_ptr, rows, rmask, qid, HAS_EXCL: tl.constexpr):
    """[BLOCK_Q, BLOCK_R] candidates: filled rows in the block, minus each query's own positive."""
    ok = (tl.load(filled_ptr + rows, mask=rmask, other=0) != 0) & rmask
    if HAS_EXCL:
        rid = tl.load(rid_ptr + rows, mask=rmask, other=-1)
        return ok[None, :] & (rid[None, :] != qid[:, None])
    return ok[None, :] & (qid[:, None] == qid[:, None])


@triton.jit
def _block_lse_kernel(q_ptr, data_ptr, sb_ptr, filled_ptr, rid_ptr, qid_ptr, out_ptr,
                      B, D, n_blocks, stride_q, stride_row, stride_sb,
                      BS: tl.constexpr, CODEC: tl.constexpr, HAS_EXCL: tl.constexpr, UPCAST: tl.constexpr,
                      BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    # one flat grid (axis 1 is limited to 65535 programs): query tiles vary fastest, so programs in
    # flight share a block's rows (L2 reuse)
    n_qt = tl.cdiv(B, BLOCK_Q)
    pid_q = tl.program_id(0) % n_qt
    blk = tl.program_id(0) // n_qt
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    qmask = offs_q < B
    qid = tl.load(qid_ptr + offs_q, mask=qmask, other=-2) if HAS_EXCL else offs_q
    m_i = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    s_i = tl.zeros([BLOCK_Q], tl.float32)
    for r0 in range(0, BS, BLOCK_R):
        inner = r0 + tl.arange(0, BLOCK_R)
        rmask = inner < BS
        rows = blk * BS + inner
        acc = tl.zeros([BLOCK_Q, BLOCK_R], tl.float32)
        for k0 in range(0, D, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            kmask = offs_k < D
            qt = tl.load(q_ptr + offs_q[:, None] * stride_q + offs_k[None, :],
                         mask=qmask[:, None] & kmask[None, :], other=0.0)
            ct = _load_rows_t(data_ptr, sb_ptr, rows, offs_k, rmask, kmask, stride_row, stride_sb, D, CODEC)
            if CODEC == 0:
                acc += tl.dot(qt, ct, input_precision="ieee")
            elif UPCAST:  # the interpreter's bf16/fp16 dot is wrong: same rounded operands, fp32 product
                acc += tl.dot(qt.to(ct.dtype).to(tl.float32), ct.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(qt.to(ct.dtype), ct)
        ok = _candidates(filled_ptr, rid_ptr, rows, rmask, qid, HAS_EXCL)
        a = tl.where(ok, acc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(a, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s_i = s_i * tl.exp(m_i - shift) + tl.sum(tl.exp(a - shift[:, None]), axis=1)
        m_i = m_new
    lse = tl.where(m_i == float("-inf"), float("-inf"), tl.log(s_i) + m_i)
    tl.store(out_ptr + offs_q * n_blocks + blk, lse, mask=qmask)


@triton.jit
def _block_scores(q_ptr, data_ptr, sb_ptr, filled_ptr, rid_ptr, qi, qid, rows, rmask, D, stride_q, stride_row,
                  stride_sb, CODEC: tl.constexpr, HAS_EXCL: tl.constexpr, BLOCK_K: tl.constexpr):
    """Scores [BLOCK_R] of query ``qi`` against ``rows`` (-inf for non-candidates), fp32."""
    acc = tl.zeros([rows.shape[0]], tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < D
        qk = tl.load(q_ptr + qi * stride_q + offs_k, mask=kmask, other=0.0)
        ct = _load_rows_t(data_ptr, sb_ptr, rows, offs_k, rmask, kmask, stride_row, stride_sb, D, CODEC)
        acc += tl.sum(qk.to(ct.dtype).to(tl.float32)[:, None] * ct.to(tl.float32), axis=0)
    ok = (tl.load(filled_ptr + rows, mask=rmask, other=0) != 0) & rmask
    if HAS_EXCL:
        ok = ok & (tl.load(rid_ptr + rows, mask=rmask, other=-1) != qid)
    return tl.where(ok, acc, float("-inf"))


@triton.jit
def _pick_rows_kernel(q_ptr, data_ptr, sb_ptr, filled_ptr, rid_ptr, qid_ptr, blk_ptr, lse_ptr, u_ptr, out_ptr,
                      m, D, stride_q, stride_row, stride_sb,
                      BS: tl.constexpr, CODEC: tl.constexpr, HAS_EXCL: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    p = tl.program_id(0)
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
        a = _block_scores(q_ptr, data_ptr, sb_ptr, filled_ptr, rid_ptr, qi, qid, blk * BS + inner, rmask, D,
                          stride_q, stride_row, stride_sb, CODEC, HAS_EXCL, BLOCK_K)
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
        a = _block_scores(q_ptr, data_ptr, sb_ptr, filled_ptr, rid_ptr, qi, qid, blk * BS + inner, rmask, D,
                          stride_q, stride_row, stride_sb, CODEC, HAS_EXCL, BLOCK_K)
        w = tl.exp(a.to(tl.float64) - lse)
        cdf = run + tl.cumsum(w, axis=0)
        count += tl.sum(((cdf <= target) & rmask).to(tl.int64), axis=0)
        run += tl.sum(w, axis=0)
    within = tl.minimum(count, last)
    tl.store(out_ptr + p + tl.arange(0, 1), blk * BS + within)


def _interpreted() -> bool:
    """Kernels run in triton's CPU interpreter (tests): its bf16/fp16 ``tl.dot`` is not usable."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _tiles(bs: int, dim: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_K): powers of two >= 16 (tl.dot's minimum), at most 64."""
    return (max(16, min(64, triton.next_power_of_2(bs))), max(16, min(64, triton.next_power_of_2(dim))))


def block_lse(q: torch.Tensor, rows: StoredRows, bs: int, exclude_ids: torch.Tensor | None,
              block_q: int = 64) -> torch.Tensor:
    """[B, blocks] block LSEs of the prepared (scaled) queries ``q`` [B, d] against the shard."""
    b, n_blocks = q.shape[0], rows.data.shape[0] // bs
    out = torch.empty((b, n_blocks), dtype=torch.float32, device=q.device)
    if b == 0 or n_blocks == 0:
        return out
    q = q.float().contiguous()
    block_r, block_k = _tiles(bs, rows.dim)
    qid = exclude_ids.to(torch.int64).contiguous() if exclude_ids is not None else q
    grid = (triton.cdiv(b, block_q) * n_blocks,)
    _block_lse_kernel[grid](
        q, rows.data, rows.scale_bias, rows.filled, rows.row_ids if rows.row_ids is not None else rows.filled, qid, out,
        b, rows.dim, n_blocks, q.stride(0), rows.data.stride(0), rows.scale_bias.stride(0),
        BS=bs, CODEC=CODECS[rows.codec], HAS_EXCL=exclude_ids is not None, UPCAST=_interpreted(),
        BLOCK_Q=block_q, BLOCK_R=block_r, BLOCK_K=block_k,
    )
    return out


def pick_rows(q: torch.Tensor, rows: StoredRows, bs: int, blocks: torch.Tensor, block_lse: torch.Tensor,
              u: torch.Tensor, found: torch.Tensor, exclude_ids: torch.Tensor | None) -> torch.Tensor:
    """Stage 2: local rows [B, m] drawn inside the winning local ``blocks`` [B, m] (LSEs ``block_lse``,
    uniforms ``u``); -1 where ``found`` is False."""
    b, m = blocks.shape
    out = torch.full((b * m,), -1, dtype=torch.int64, device=q.device)
    if b * m == 0:
        return out.view(b, m)
    q = q.float().contiguous()
    block_r, block_k = _tiles(bs, rows.dim)
    qid = exclude_ids.to(torch.int64).contiguous() if exclude_ids is not None else q
    blk = torch.where(found, blocks, torch.zeros_like(blocks)).to(torch.int64).contiguous()
    lse = torch.where(found, block_lse, torch.zeros_like(block_lse)).float().contiguous()
    _pick_rows_kernel[(b * m,)](
        q, rows.data, rows.scale_bias, rows.filled, rows.row_ids if rows.row_ids is not None else rows.filled, qid,
        blk, lse, u.float().contiguous(), out,
        m, rows.dim, q.stride(0), rows.data.stride(0), rows.scale_bias.stride(0),
        BS=bs, CODEC=CODECS[rows.codec], HAS_EXCL=exclude_ids is not None, BLOCK_R=block_r, BLOCK_K=block_k,
    )
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
