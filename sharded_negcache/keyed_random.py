"""Counter-based randomness: every uniform is a hash of (seed, step, stream, query, item, draw).

Nothing depends on the rank, the chunking or the order of evaluation, so one step samples the same
rows for every world size. The hash is Chris Wellons' ``lowbias32`` on int64 tensors holding 32-bit
values (pure torch: runs on any device).
"""
from __future__ import annotations

import torch

__all__ = ["Stream", "stream_base", "draw_keys", "hash_keys", "uniform", "gumbel", "unit_interval", "mix32", "mix32_int",
           "MASK32"]

MASK32 = 0xFFFFFFFF  # the hash works on 32-bit words held in int64
# The largest float32 below 1. The top hash level (2^24 - 1) + 0.5 rounds to 2^24 in float32, i.e. a
# uniform of exactly 1.0 (a +inf Gumbel; an inverse CDF off the end): that one level is clamped here.
_BELOW_ONE = 1.0 - 2.0**-24


class Stream:
    """Independent random streams of one step."""

    BLOCK_GUMBEL = 1  # stage 1: a Gumbel per (query, block, draw)
    ROW_UNIFORM = 2  # stage 2: one uniform per (query, draw) for the inverse CDF inside a block
    TOPK_GUMBEL = 3  # top_k mode: a Gumbel per (query, global row, draw)
    REENCODE = 4  # reencode_negatives=f: one uniform per (query, draw), re-encoded when below f


def mix32_int(x: int) -> int:
    """:func:`mix32` of one Python int, without a tensor (the per-step base words of the keys)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    x ^= x >> 16
    return x


def mix32(x: torch.Tensor) -> torch.Tensor:
    """The engine's integer hash (lowbias32) of the low 32 bits of each int64: the same on every rank and
    run, for ids that adapters derive from data (Python's ``hash`` is salted per process)."""
    x = x & MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def stream_base(seed: int, step: int, stream: int) -> int:
    """The 32-bit word every key of (seed, step, stream) starts from."""
    return mix32_int(mix32_int(mix32_int(seed) ^ (step & MASK32)) ^ ((step >> 32) + 0x9E3779B9 * stream))


def draw_keys(seed: int, step: int, stream: int, query_pos: torch.Tensor, num_draws: int) -> torch.Tensor:
    """int64 keys [B, num_draws] for global query positions ``query_pos`` [B]."""
    base = stream_base(seed, step, stream)
    draws = torch.arange(num_draws, device=query_pos.device, dtype=torch.int64)
    q = mix32(query_pos.to(torch.int64) ^ base)
    return mix32(q[:, None] ^ mix32(draws + 0x68E31DA4)[None, :])


def hash_keys(keys: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
    """The 32-bit hash :func:`uniform` converts: of each key, or of each key crossed (broadcast) with ``items``."""
    if items is None:
        return mix32(keys + 0x1B56C4E9)
    return mix32(keys ^ mix32(items.to(torch.int64) + 0x5BD1E995))


def unit_interval(h: torch.Tensor) -> torch.Tensor:
    """float32 strictly inside (0, 1) from 32-bit hash values: their top 24 bits, centred, in
    [2^-25, 1 - 2^-24], so ``-log(-log(u))`` is always finite."""
    return (((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))).clamp_(max=_BELOW_ONE)


def uniform(keys: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
    """float32 uniforms strictly inside (0, 1) from keys (broadcast with ``items`` when given)."""
    return unit_interval(hash_keys(keys, items))


def gumbel(keys: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise [*keys.shape, n] for ``keys`` crossed with the 1-D ``items`` (e.g. block ids).

    Computed on a 2-D [keys, items] grid: elementwise kernels are much slower on shapes with size-1
    middle dimensions on CPU.
    """
    flat = keys.reshape(-1, 1)
    u = uniform(flat, items.reshape(1, -1))
    return u.log_().neg_().log_().neg_().view(*keys.shape, items.numel())
