"""Row-wise partition of the global cache: which rank owns which rows, and fixed global row blocks.

Rank r of W owns global rows [r*n, (r+1)*n) with n = cache_size / W. Blocks of ``block_size``
consecutive global rows never straddle two shards, so a block id means the same rows for any W
that keeps ``block_size`` (the sampler keys its randomness by global block id).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["ShardLayout", "DEFAULT_BLOCK_SIZE"]

DEFAULT_BLOCK_SIZE = 256


@dataclass(frozen=True)
class ShardLayout:
    """Facts of the partition for one rank; pure arithmetic, no communication."""

    cache_size: int
    world_size: int
    rank: int
    block_size: int

    @staticmethod
    def build(
        cache_size: int,
        process_group: dist.ProcessGroup | None = None,
        block_size: int | None = None,
    ) -> "ShardLayout":
        """Reads rank and world size from the process group (one process when not initialised)."""
        if dist.is_available() and dist.is_initialized():
            world_size = dist.get_world_size(process_group)
            rank = dist.get_rank(process_group)
        else:
            world_size, rank = 1, 0
        if not isinstance(cache_size, int) or cache_size <= 0:
            raise ValueError(f"cache_size must be a positive int, got {cache_size!r}")
        if cache_size % world_size:
            raise ValueError(
                f"cache_size={cache_size} does not divide by the world size {world_size}: each rank "
                f"holds cache_size / world_size rows; use a multiple of {world_size}"
            )
        rows = cache_size // world_size
        if block_size is None:
            block_size = math.gcd(DEFAULT_BLOCK_SIZE, rows)
        if block_size <= 0 or rows % block_size:
            raise ValueError(
                f"block_size={block_size} must be positive and divide the rows per rank ({rows}) so that "
                "no sampling block straddles two shards"
            )
        return ShardLayout(cache_size, world_size, rank, block_size)

    @property
    def rows_per_rank(self) -> int:
        return self.cache_size // self.world_size

    @property
    def row_offset(self) -> int:
        """Global id of this rank's first row."""
        return self.rank * self.rows_per_rank

    @property
    def blocks_per_rank(self) -> int:
        return self.rows_per_rank // self.block_size

    def owner_of(self, global_rows: torch.Tensor) -> torch.Tensor:
        return torch.div(global_rows, self.rows_per_rank, rounding_mode="floor")

    def to_local(self, global_rows: torch.Tensor) -> torch.Tensor:
        return global_rows - self.row_offset

    def to_global(self, local_rows: torch.Tensor) -> torch.Tensor:
        return local_rows + self.row_offset
