"""Row-wise partition of the global cache: which rank owns which rows, and fixed global row blocks.

Rank r of W owns global rows [r*n, (r+1)*n) with n = cache_size / W. Blocks of ``block_size``
consecutive global rows never straddle two shards, so a block id means the same rows for any W
that keeps ``block_size`` (the sampler keys its randomness by global block id).

Two-level layout (``topology.Topology``): the W ranks form W/G groups of G consecutive ranks; each group
holds an independent cache of ``cache_size`` rows sharded over its G ranks, so the partition above is
over the shard group: ``shard_rank`` r of ``shard_size`` G owns rows [r*n, (r+1)*n) with n = cache_size / G
(flat layout: G = W). Row ids are group-local (the same ids in every group); each group draws from its
own random stream (:func:`stream_seed`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .topology import Topology

__all__ = ["ShardLayout", "stream_seed", "DEFAULT_BLOCK_SIZE"]

DEFAULT_BLOCK_SIZE = 256
_GOLDEN32 = 0x9E3779B9  # odd: group offsets are distinct mod 2**32 for every group index < 2**32


def stream_seed(seed: int, group: int) -> int:
    """The sampler's seed for group ``group``: ``seed`` for group 0, else ``(seed + 0x9E3779B9 * group) mod 2**32``.

    The keyed sampler reads a seed's low 32 bits only, so the streams of the groups of one run are
    pairwise distinct, and group 0 (hence the flat layout) samples exactly as with ``seed``.
    """
    return seed if group == 0 else (seed + _GOLDEN32 * group) & 0xFFFFFFFF


@dataclass(frozen=True)
class ShardLayout:
    """Facts of the partition for one rank; pure arithmetic, no communication."""

    cache_size: int
    shard_size: int  # G: the ranks sharing this cache (W in the flat layout)
    shard_rank: int  # this rank's place among them
    block_size: int
    group: int = 0  # this rank's shard group (two-level layout)
    num_groups: int = 1

    @staticmethod
    def build(cache_size: int, topology: Topology, block_size: int | None = None) -> "ShardLayout":
        """The partition of ``cache_size`` rows over ``topology``'s shard group; checks the sizes divide."""
        shard_size, num_groups = topology.shard_size, topology.num_groups
        if not isinstance(cache_size, int) or cache_size <= 0:
            raise ValueError(f"cache_size must be a positive int, got {cache_size!r}")
        if cache_size % shard_size:
            size = "world size" if num_groups == 1 else "shard_group_size"
            raise ValueError(
                f"cache_size={cache_size} does not divide by the {size} {shard_size}: each rank "
                f"holds cache_size / {size.replace(' ', '_')} rows; use a multiple of {shard_size}"
            )
        rows = cache_size // shard_size
        if block_size is None:
            block_size = math.gcd(DEFAULT_BLOCK_SIZE, rows)
        if block_size <= 0 or rows % block_size:
            raise ValueError(
                f"block_size={block_size} must be positive and divide the rows per rank ({rows}) so that "
                "no sampling block straddles two shards"
            )
        return ShardLayout(cache_size, shard_size, topology.shard_rank, block_size, topology.group, num_groups)

    @property
    def rows_per_rank(self) -> int:
        return self.cache_size // self.shard_size

    @property
    def total_rows(self) -> int:
        """Rows of every group's cache together (``cache_size`` in the flat layout)."""
        return self.cache_size * self.num_groups

    def stream_seed(self, seed: int) -> int:
        """This group's sampler seed (see :func:`stream_seed`)."""
        return stream_seed(seed, self.group)

    @property
    def row_offset(self) -> int:
        """Global id of this rank's first row."""
        return self.shard_rank * self.rows_per_rank

    @property
    def blocks_per_rank(self) -> int:
        return self.rows_per_rank // self.block_size

    def owner_of(self, global_rows: torch.Tensor) -> torch.Tensor:
        return torch.div(global_rows, self.rows_per_rank, rounding_mode="floor")

    def to_local(self, global_rows: torch.Tensor) -> torch.Tensor:
        return global_rows - self.row_offset

    def to_global(self, local_rows: torch.Tensor) -> torch.Tensor:
        return local_rows + self.row_offset
