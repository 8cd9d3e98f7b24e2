"""Who the ranks are: the one place that reads ``torch.distributed``'s state and builds the process groups.

A :class:`Topology` is built once per handler and handed to the layout, the collective layer and the
checkpoints. It names each size by what it counts: ``world_size`` (W) and ``rank`` are those of the
whole job (the handler's process group), ``shard_size`` (G) and ``shard_rank`` those of the shard
group, the G consecutive ranks that hold one cache between them. The flat layout is G = W: one
shard group, the job itself.

Its only collectives run in :meth:`Topology.build`: ``torch.distributed.new_group`` must be entered
by every process of the job for every group, in the same order, so G is compared across ranks first
and a mismatch raises on every rank.

No 2-D ``DeviceMesh`` (TorchRec's ``ShardingEnv2D`` builds one over replica x shard): the W/G caches
are independent caches, not replicas of one tensor, so a mesh dimension that DCP reads as
replication would save one group's cache and drop the others; a mesh over both dimensions would make
one tensor of all groups' rows, which cannot be reloaded with another G. A mesh also fixes one device
type, while a cache keeps some fields on the host. So the topology keeps the process groups and
gives DCP a 1-D mesh over the shard group per device type (:meth:`Topology.shard_mesh`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist

__all__ = ["Topology", "is_distributed"]


def is_distributed() -> bool:
    """True when ``torch.distributed`` is built in and a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


@dataclass(frozen=True)
class Topology:
    """The job's ranks and the shard groups they form: W ranks in W/G groups of G consecutive ranks.

    ``world_group`` is the handler's process group (agreement, config checks, statistics, checkpoints;
    None without torch.distributed); ``shard_group`` the process group of this rank's cache (queries,
    partials and rows move only inside it; ``world_group`` itself in the flat layout). ``members``:
    the world ranks of this rank's shard group, in order.
    """

    world_size: int
    rank: int
    shard_size: int
    shard_rank: int
    group: int  # index of this rank's shard group, 0 .. num_groups - 1
    world_group: dist.ProcessGroup | None = None
    shard_group: dist.ProcessGroup | None = None
    members: tuple[int, ...] = (0,)
    _meshes: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def num_groups(self) -> int:
        return self.world_size // self.shard_size

    @property
    def distributed(self) -> bool:
        """True when collectives run (torch.distributed was initialised when this was built)."""
        return self.world_group is not None

    @property
    def two_level(self) -> bool:
        """True when the job holds more than one cache (G < W)."""
        return self.shard_size < self.world_size

    def where(self) -> str:
        """This rank, for error messages: its world rank, and its shard rank in the two-level layout."""
        if self.two_level:
            return f"rank {self.rank} of {self.world_size} (rank {self.shard_rank} of its shard group)"
        return f"rank {self.rank} of {self.world_size}"

    def shard_mesh(self, device_type: str) -> Any:
        """A 1-D ``DeviceMesh`` over the shard group on ``device_type`` (DCP places the cache's rows on it).

        Built on first use per device type from the existing group: no new process group, no collective.
        """
        if device_type not in self._meshes:
            from torch.distributed.device_mesh import DeviceMesh

            self._meshes[device_type] = DeviceMesh.from_group(self.shard_group, device_type)
        return self._meshes[device_type]

    @staticmethod
    def build(shard_group_size: int | None = None, process_group: dist.ProcessGroup | None = None) -> "Topology":
        """Reads W and the rank from ``process_group`` (default WORLD; one process when not initialised),
        validates G (``shard_group_size``, default W) and creates the shard groups' process groups.

        Collective over ``process_group`` when G is given and W > 1 (G is compared across ranks), and over
        the whole job when G < W (``torch.distributed.new_group``); every process must build its handler
        at the same point, as it must anyway.
        """
        distributed = is_distributed()
        world_group = (process_group or dist.group.WORLD) if distributed else None
        world = dist.get_world_size(world_group) if distributed else 1
        rank = dist.get_rank(world_group) if distributed else 0
        size = world if shard_group_size is None else shard_group_size
        valid = not isinstance(size, bool) and isinstance(size, int) and size >= 1 and world % size == 0
        if distributed and world > 1 and shard_group_size is not None:
            # Every rank must create the same groups: compare G first, so that a mismatch raises everywhere.
            # (an object all-gather: works on any backend before the cache's device is known)
            sizes: list = [None] * world
            dist.all_gather_object(sizes, size if valid else -1, group=world_group)
            if len(set(sizes)) > 1:
                raise ValueError(f"ranks disagree on shard_group_size (by rank: {sizes}, -1: invalid); "
                                 "every rank must pass the same value")
        if not valid:
            raise ValueError(
                f"shard_group_size must be a positive int dividing the world size {world} (the ranks form "
                f"world_size / shard_group_size groups of consecutive ranks), got {shard_group_size!r}"
            )
        if size == world:
            return Topology(world, rank, world, rank, 0, world_group, world_group, tuple(range(world)))
        ranks = dist.get_process_group_ranks(world_group)
        index = rank // size
        mine = None
        for g in range(world // size):
            group = dist.new_group(ranks[g * size : (g + 1) * size])
            if g == index:
                mine = group
        return Topology(world, rank, size, rank % size, index, world_group, mine,
                        tuple(range(index * size, (index + 1) * size)))
