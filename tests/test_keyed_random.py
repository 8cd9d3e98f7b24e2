"""keyed_random: the sampler's uniforms lie strictly inside (0, 1) over the whole hash range.

A uniform of exactly 1.0 gives a +inf Gumbel (stage 1 drops the draw) and runs stage 2's inverse CDF
off the end of its block. The keys that produce the extreme hash values are constructed directly,
by inverting the ``lowbias32`` hash, and the conversion from hash to float is checked exhaustively.
"""
from __future__ import annotations

import torch

from sharded_negcache import keyed_random
from sharded_negcache.keyed_random import MASK32


def _unmix(y: int) -> int:
    """Inverse of ``lowbias32`` (Wellons' published inverse): the key whose hash is ``y``."""
    x = y & MASK32
    x ^= x >> 16
    x = (x * 0x43021123) & MASK32
    x ^= (x >> 15) ^ (x >> 30)
    x = (x * 0x1D69E2A5) & MASK32
    x ^= x >> 16
    return x


# Hash values at both ends of the 32-bit range: the 2^9 lowest and highest, which cover the extreme
# 24-bit levels the uniform is built from (its low 8 bits are dropped) twice over.
EDGE = list(range(512)) + list(range(MASK32 - 511, MASK32 + 1))


def test_inverse_hash_is_exact():
    for y in EDGE[:8] + EDGE[-8:] + [0x12345678, 0x80000000]:
        assert keyed_random.mix32_int(_unmix(y)) == y
        assert int(keyed_random.mix32(torch.tensor([_unmix(y)]))[0]) == y


def keys_for(hashes: list[int], items: int | None) -> torch.Tensor:
    """Keys that make ``uniform(keys, items)`` hash to exactly ``hashes`` (see keyed_random.hash_keys)."""
    if items is None:
        return torch.tensor([(_unmix(h) - 0x1B56C4E9) & MASK32 for h in hashes], dtype=torch.int64)
    salt = keyed_random.mix32_int(items + 0x5BD1E995)
    return torch.tensor([_unmix(h) ^ salt for h in hashes], dtype=torch.int64)


def test_uniforms_at_the_edges_of_the_hash_range_are_strictly_inside():
    for items in (None, 0, 12345):
        keys = keys_for(EDGE, items)
        item_t = None if items is None else torch.tensor([items])
        assert torch.equal(keyed_random.hash_keys(keys, item_t), torch.tensor(EDGE, dtype=torch.int64))
        u = keyed_random.uniform(keys) if items is None else keyed_random.uniform(keys[:, None], item_t[None, :])
        assert u.dtype == torch.float32
        assert bool((u > 0).all()) and bool((u < 1).all()), f"items={items}: min {u.min()}, max {u.max()}"
        if items is not None:
            assert bool(torch.isfinite(keyed_random.gumbel(keys, item_t)).all())
    # The largest hash: (2^24 - 1 + 0.5) / 2^24 rounds to 1.0 in float32 unless clamped.
    assert float(keyed_random.uniform(keys_for([MASK32], None))[0]) == 1.0 - 2.0**-24


def test_every_hash_level_maps_strictly_inside_and_monotonically():
    """All 2^24 levels (the uniform uses the hash's top 24 bits): exhaustive, in two passes of 8M."""
    prev_max = -1.0
    for lo in (0, 1 << 23):
        levels = torch.arange(lo, lo + (1 << 23), dtype=torch.int64)
        for low_bits in (0, 255):  # the dropped low byte cannot matter
            u = keyed_random.unit_interval((levels << 8) | low_bits)
            assert float(u.min()) > 0.0 and float(u.max()) < 1.0
            assert bool((u[1:] >= u[:-1]).all()), "the map from hash to uniform must stay monotone"
            g = u.log().neg().log().neg()
            assert bool(torch.isfinite(g).all())
        assert float(u[0]) >= prev_max
        prev_max = float(u[-1])
    # Away from the top level the values are the old ones: (level + 0.5) / 2^24 in float32.
    levels = torch.tensor([0, 1, 2**20 + 3, 2**23 - 1, 2**23, 2**24 - 2], dtype=torch.int64)
    want = ((levels.to(torch.float32) + 0.5) * 2.0**-24)
    assert torch.equal(keyed_random.unit_interval(levels << 8), want)


def test_gumbel_of_a_whole_grid_is_finite_at_the_extreme_keys():
    keys = keys_for([MASK32, MASK32 - 1, 0, 1], 7)
    g = keyed_random.gumbel(keys, torch.tensor([7, 8, 9]))
    assert g.shape == (4, 3) and bool(torch.isfinite(g).all())
    assert float(g[0, 0]) > 16.0  # the top hash is the largest Gumbel (-log(-log(1 - 2^-24)) = 16.6)
