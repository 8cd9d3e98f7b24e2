"""Shard groups of the two-level layout: validating G and creating one process group per group of G ranks.

Its collectives run once, at construction (the step's collectives are all in ``exchange``): the
groups must be created identically on every rank (``torch.distributed.new_group`` is collective over
the whole job), so G is compared across ranks first and a mismatch raises on every rank.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

__all__ = ["ShardGroups"]


@dataclass(frozen=True)
class ShardGroups:
    """Which ranks share one cache: the W ranks of the outer group in W/G groups of G consecutive ranks.

    ``shard`` is the process group of this rank's cache (data movement); ``outer`` the whole group
    (agreement, config checks, statistics), or None when the layout is flat (G = W: one cache, the
    outer group itself, and no new process group is created).
    """

    world_size: int
    group_size: int
    index: int
    shard: dist.ProcessGroup | None
    outer: dist.ProcessGroup | None

    @property
    def count(self) -> int:
        return self.world_size // self.group_size

    @staticmethod
    def build(shard_group_size: int | None, process_group: dist.ProcessGroup | None = None) -> "ShardGroups":
        """Validates G and creates the groups' process groups (collective over the whole job when G < W).

        ``torch.distributed.new_group`` must be entered by every process of the job for every group, in
        the same order: every process constructs its handler at the same point, as it must anyway.
        """
        distributed = dist.is_available() and dist.is_initialized()
        world = dist.get_world_size(process_group) if distributed else 1
        size = world if shard_group_size is None else shard_group_size
        valid = not isinstance(size, bool) and isinstance(size, int) and size >= 1 and world % size == 0
        if distributed and world > 1 and shard_group_size is not None:
            # Every rank must create the same groups: compare G first, so that a mismatch raises everywhere.
            # (an object all-gather: works on any backend before the cache's device is known)
            sizes: list = [None] * world
            dist.all_gather_object(sizes, size if valid else -1, group=process_group)
            if len(set(sizes)) > 1:
                raise ValueError(f"ranks disagree on shard_group_size (by rank: {sizes}, -1: invalid); "
                                 "every rank must pass the same value")
        if not valid:
            raise ValueError(
                f"shard_group_size must be a positive int dividing the world size {world} (the ranks form "
                f"world_size / shard_group_size groups of consecutive ranks), got {shard_group_size!r}"
            )
        if size == world:
            return ShardGroups(world, world, 0, process_group, None)
        ranks = dist.get_process_group_ranks(process_group or dist.group.WORLD)
        index = dist.get_rank(process_group) // size
        mine = None
        for g in range(world // size):
            group = dist.new_group(ranks[g * size : (g + 1) * size])
            if g == index:
                mine = group
        return ShardGroups(world, size, index, mine, process_group or dist.group.WORLD)
