"""Checkpoints of the sharded cache with ``torch.distributed.checkpoint`` (DCP), loadable on any world size.

A plain ``handler.state_dict()`` holds this rank's shard only, so it reloads only on the same world
size. :class:`CacheCheckpoint` presents the cache in DCP's native sharded form instead: every per-row
tensor (stored embeddings, ages, filled flags, each feature field, a per-row content hash) is a
``DTensor`` of global shape ``[cache_size, ...]`` placed ``Shard(0)`` over the topology's 1-D mesh of
the handler's shard group (a jagged field is written padded, ``[cache_size, max_length]`` plus lengths), next to
a small JSON record (specs, cache size, codec, block size, step, seed). DCP writes each rank's rows
once and, on load, every rank reads exactly the rows of its new slice, so a cache saved by W ranks
loads on W' ranks (W' must divide ``cache_size``).

Resharding keeps the global row order: global row ``j`` of the saved cache is global row ``j`` of
the loaded one, with its age, filled flag, features and stored (codec-encoded) embedding, bit for
bit. Each rank evicts its own oldest rows, so after a resize the next eviction is the global age
order restricted to each new shard (see docs/checkpointing.md).

:func:`save` and :func:`load` wrap ``dcp.save``/``dcp.load`` for a whole training state
(``{"model": ..., "optim": ..., "cache": CacheCheckpoint(handler)}``) and add what DCP lacks:

- a manifest written last, after every rank finished, binding the checkpoint's files together: one
  checkpoint id (also inside each cache's JSON record), each file's size and sha256 digest, and each
  cache record's digest. A checkpoint without it, with a file missing, of another size or with
  another digest (edited, or copied from another checkpoint), is refused by name before anything
  is read;
- a check of the cache's record against the handler before any tensor is read, with an error that
  names each difference;
- nothing is written into the live cache until every rank has read and verified its rows (content
  hashes), so a refused checkpoint leaves the cache as it was.

Two-level layout (``shard_group_size``): each group's cache is saved under its own names (group 0
under the flat layout's, group g > 0 under ``groups.<g>.``), sharded over the group's ranks. On load
with n' groups, new group j reads saved group ``j mod n`` (:func:`source_group`): growing copies
caches round-robin, shrinking keeps groups 0..n'-1. A flat checkpoint is a one-group checkpoint.

Collectives: a save or load runs over the caches' handler's topology (its whole job) and through its
collective layer (``exchange.Comm.run``) with its ``collective_timeout_s``, so a rank that stalls or
dies fails every rank with the engine's :class:`CollectiveFailed` naming the step and the collective.
The collectives inside ``dcp.save``/``dcp.load`` are DCP's own: they are bounded by the process
group's timeout (``init_process_group(timeout=...)``), and a peer that dies there raises the same error.

``CacheCheckpoint`` also works with a bare ``dcp.save``/``dcp.load``; it then still refuses
mismatched or corrupted caches without touching the live one, but size mismatches surface as DCP's own
error and a partly written checkpoint is only caught when DCP fails to read it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata

from .exchange import CollectiveFailed, Comm
from .handler import ShardedCacheLossHandler
from .jagged import JaggedFieldSpec
from .specs import AnySpec
from .store import ShardStore
from .topology import Topology, is_distributed

__all__ = [
    "CacheCheckpoint",
    "CheckpointError",
    "save",
    "load",
    "verify_checkpoint",
    "latest_checkpoint",
    "row_hashes",
    "cache_record",
    "parse_record",
    "file_sha256",
    "MANIFEST_NAME",
    "source_group",
]

# /2: the record names its checkpoint id and the row hashes are salted with the record's digest;
# the manifest holds per-file sha256 digests and the records' digests.
CACHE_FORMAT = "sharded_negcache.cache/2"
MANIFEST_FORMAT = "sharded_negcache.manifest/2"
MANIFEST_NAME = "negcache_manifest.json"

_P = (1 << 31) - 1  # prime modulus of the row hash: every product below stays inside int64
_HASH_CHUNK_BYTES = 32 << 20  # int64 working set of the hash, per chunk of rows
_UNREAD = "\x00sharded_negcache: not read from the checkpoint\x00"


class CheckpointError(ValueError):
    """A checkpoint that does not fit this handler, is damaged or incomplete, or could not be written.

    On load it is raised on every rank before anything is written into the live cache.
    """


# ---- per-row content hash ------------------------------------------------------------------
def _mix(x: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Affine map mod P of non-negative int64 values below 2**31 (products stay below 2**62)."""
    return (x * a + b) % _P


def row_hashes(tensors: Sequence[torch.Tensor], first_row: int) -> torch.Tensor:
    """A hash mod 2**31-1 of each row's bytes across ``tensors`` (all [n, ...]) and of its global id.

    Every byte has a non-zero weight mod a prime, so changing any single byte of a row always changes
    its hash; the global id makes a row moved to another position fail too. Rows are hashed
    independently, so hashes computed by W ranks and recomputed after resharding to W' agree.
    Computed in chunks of rows: memory stays bounded for any shard size.
    """
    n = tensors[0].shape[0]
    device = tensors[0].device
    h = torch.zeros(n, dtype=torch.int64, device=device)
    if n == 0:
        return h
    for index, t in enumerate(tensors):
        if t.shape[0] != n:
            raise ValueError(f"row_hashes: tensor {index} has {t.shape[0]} rows, expected {n}")
        data = t.detach().reshape(n, -1).contiguous().view(torch.uint8)
        cols = data.shape[1]
        if cols >= 1 << 24:
            raise ValueError("row_hashes: rows wider than 16 MiB are not supported")
        col = torch.arange(cols, dtype=torch.int64, device=data.device)  # on the field's own device
        weight = _mix(col + 1 + 7919 * index, 1_103_515_245 % _P, 12_345)
        weight = weight + (weight == 0).to(torch.int64)  # in [1, P-1]: non-zero mod P
        step = max(1, _HASH_CHUNK_BYTES // (8 * max(cols, 1)))
        field = torch.empty(n, dtype=torch.int64, device=data.device)
        for lo in range(0, n, step):
            field[lo : lo + step] = (data[lo : lo + step].to(torch.int64) * weight).sum(1) % _P
        h = (h * 1_000_003 + field.to(device) + index + 1) % _P
    rows = torch.arange(first_row, first_row + n, dtype=torch.int64, device=device)
    return (h * 2_654_435_761 % _P + _mix(rows % _P, 48_271, 1)) % _P


# ---- the cache record ------------------------------------------------------------------------
_SPEC_PARTS = ("kind", "shape", "max_length", "dtype", "vocab_size")
_CHECKED = ("format", "specs", "embedding_key", "data_keys", "doc_id_key", "cache_size", "codec", "block_size")


def _spec_record(spec: AnySpec) -> dict[str, Any]:
    """What a field's stored rows depend on (a jagged field's format and pool sizing do not count)."""
    if isinstance(spec, JaggedFieldSpec):
        return {"kind": "jagged", "max_length": spec.max_length, "dtype": str(spec.dtype),
                "vocab_size": spec.vocab_size}
    return {"kind": "fixed", "shape": list(spec.shape), "dtype": str(spec.dtype),
            "vocab_size": getattr(spec, "vocab_size", None)}


def cache_record(handler: ShardedCacheLossHandler, checkpoint_id: str | None = None) -> dict[str, Any]:
    """JSON-able facts of the cache: the ones a load checks, the step and seed it restores, the rest for
    reading, and the id of the checkpoint it belongs to (None for a bare ``dcp.save``)."""
    config = handler.config()
    return {
        "format": CACHE_FORMAT,
        "checkpoint_id": checkpoint_id,
        "specs": {k: _spec_record(s) for k, s in sorted(handler.schema.specs.items())},
        "embedding_key": handler.schema.embedding_key,
        "data_keys": list(handler.schema.data_keys),
        "doc_id_key": handler.schema.doc_id_key,
        "cache_size": handler.layout.cache_size,
        "codec": handler.store.codec.name,
        "block_size": handler.layout.block_size,
        "step": handler.steps_done,
        "seed": int(handler.seed),
        "saved_world_size": handler.topology.world_size,
        "shard_group_size": handler.topology.shard_size,  # free to change on load, like the world size
        "num_groups": handler.topology.num_groups,
        "settings": {  # free to change across a resume; recorded for reading only
            k: config.get(k) for k in
            ("top_k", "num_negatives", "use_lru", "in_batch_negatives", "score_transform", "host_features")
        },
    }


# Keys a record must hold, with their JSON types: a damaged record is refused naming the key.
_RECORD_TYPES: dict[str, type | tuple[type, ...]] = {
    "format": str, "specs": dict, "embedding_key": str, "data_keys": list, "cache_size": int,
    "codec": str, "block_size": int, "step": int, "seed": int,
}


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _record_salt(meta: str) -> int:
    """A value mod P derived from the record's exact text: stored row hashes include it, so rows only
    verify under the record they were saved with (an edited record or a foreign rank file fails)."""
    return int(_sha256_text(meta)[:15], 16) % _P


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            h.update(piece)
    return h.hexdigest()


def _is_a(value: Any, types: type | tuple[type, ...]) -> bool:
    """isinstance for JSON values, where a bool is not an int (no checked field is a bool)."""
    return isinstance(value, types) and not isinstance(value, bool)


def parse_record(meta: Any) -> dict[str, Any]:
    """The cache record from its JSON text, checked for shape; :class:`CheckpointError` (never a raw
    JSON, key or type error) names what is wrong."""
    if not isinstance(meta, str) or meta == _UNREAD:
        raise CheckpointError("the checkpoint holds no cache record ('meta'); nothing was loaded")
    try:
        record = json.loads(meta)
    except ValueError as exc:
        raise CheckpointError(f"the checkpoint's cache record is not valid JSON ({exc}); nothing was loaded") from None
    if not isinstance(record, dict):
        raise CheckpointError(f"the checkpoint's cache record must be a JSON object, got {type(record).__name__}; "
                              "nothing was loaded")
    bad = [f"{k!r} is missing" if k not in record else f"{k!r} is {type(record[k]).__name__}, expected {t.__name__}"
           for k, t in _RECORD_TYPES.items() if k not in record or not _is_a(record[k], t)]
    if record.get("format") == CACHE_FORMAT and not _is_a(record.get("checkpoint_id"), (str, type(None))):
        bad.append("'checkpoint_id' must be a string or null")
    if bad and record.get("format") == CACHE_FORMAT:
        raise CheckpointError("the checkpoint's cache record is damaged: " + "; ".join(bad) + "; nothing was loaded")
    return record


def _block_size_hint(saved: int, cache_size: int, rows_per_rank: int) -> str:
    """How to continue a saved random stream keyed by ``saved``-row blocks, with values that can be built."""
    if saved > 0 and rows_per_rank % saved == 0:
        return (f" (the sampler keys its randomness by block: construct the handler with block_size={saved} to "
                "continue the same random stream, or pass allow_block_size_change=True)")
    worlds = [w for w in range(1, cache_size + 1) if cache_size % w == 0 and (cache_size // w) % max(saved, 1) == 0]
    where = f"load on a number of ranks W' with cache_size / W' a multiple of {saved} ({', '.join(map(str, worlds[:8]))}" \
        + (", ..." if len(worlds) > 8 else "") + "), or " if worlds and saved > 0 else ""
    return (f" (the saved block size {saved} does not divide the {rows_per_rank} rows per rank here, so the saved random "
            f"stream cannot continue on this number of ranks: {where}pass allow_block_size_change=True with a "
            f"block_size that divides {rows_per_rank}, e.g. the default block_size={math.gcd(256, rows_per_rank)})")


def _differences(
    saved: Mapping[str, Any], mine: Mapping[str, Any], check_block_size: bool, rows_per_rank: int
) -> list[str]:
    """Human-readable differences between a saved record and this handler's, one per field."""
    out: list[str] = []
    if saved.get("format") != mine["format"]:
        return [f"format: checkpoint {saved.get('format')!r}, this library writes {mine['format']!r}"]
    for key in _CHECKED[1:]:
        if key == "block_size" and not check_block_size:
            continue
        a, b = saved.get(key), mine[key]
        if key == "specs":
            a = a or {}
            for field in sorted(set(a) | set(b)):
                if field not in b:
                    out.append(f"specs: field {field!r} is in the checkpoint but not in the handler")
                elif field not in a:
                    out.append(f"specs: field {field!r} is in the handler but not in the checkpoint")
                else:
                    parts = set(a[field]) | set(b[field])
                    for part in [p for p in _SPEC_PARTS if p in parts] + sorted(parts - set(_SPEC_PARTS)):
                        if a[field].get(part) != b[field].get(part):
                            was, now = a[field].get(part), b[field].get(part)
                            out.append(f"specs[{field!r}].{part}: checkpoint {was}, handler {now}")
        elif a != b:
            hint = ""
            if key == "block_size":
                hint = _block_size_hint(a, mine["cache_size"], rows_per_rank)
            if key == "cache_size":
                hint = " (the number of rows is fixed by the checkpoint; only the number of ranks may change)"
            out.append(f"{key}: checkpoint {a!r}, handler {b!r}{hint}")
    return out


# ---- the per-row tensors of a shard ----------------------------------------------------------
def shard_rows_names(store: ShardStore) -> dict[str, str]:
    """Checkpoint name of each :meth:`ShardStore.export_rows` entry, in the fixed hashing order.

    The stored (codec-encoded) embeddings, ages and filled flags, then each feature field in name
    order: a fixed field as ``features.<key>``, a jagged one as ``features.<key>.padded`` [rows,
    max_length] and ``features.<key>.lengths`` [rows] (int64).
    """
    names = {"embedding": "embeddings", "age": "age", "filled": "filled"}
    for key in sorted(store.feature_specs):
        if isinstance(store.feature_specs[key], JaggedFieldSpec):
            names[key], names[key + ":lengths"] = f"features.{key}.padded", f"features.{key}.lengths"
        else:
            names[key] = f"features.{key}"
    return names


def _checkpoint_rows(store: ShardStore) -> dict[str, torch.Tensor]:
    """Copies of this shard's rows as stored, by checkpoint name (host-resident fields stay on the host)."""
    rows = store.export_rows(as_stored=True)
    return {name: rows[key].to(torch.int64) if key.endswith(":lengths") else rows[key]
            for key, name in shard_rows_names(store).items()}


# ---- the Stateful --------------------------------------------------------------------------
class CacheCheckpoint:
    """The handler's cache as a DCP ``Stateful``: row-sharded DTensors plus a checked JSON record.

    Put it at the top level of the dict given to ``dcp.save``/``dcp.load`` (or :func:`save`/:func:`load`)::

        state = {"model": model_state, "optim": optim_state, "cache": CacheCheckpoint(handler)}

    ``state_dict()`` returns *copies* of the local rows (one shard of extra memory while saving or
    loading): DCP reads a checkpoint into them, and :meth:`load_state_dict` writes them into the live
    cache only after the record matched and every rank verified its rows' hashes. The loaded step
    counter and seed replace the handler's, so sampling continues exactly where the saved run was.

    Args:
      handler: the cache to save or restore; on load it may run on any number of ranks that divides
        ``cache_size``.
      allow_block_size_change: accept a checkpoint written with another ``block_size`` (the cache rows are
        valid, but the sampling stream then differs from the saved run's).
    """

    def __init__(self, handler: ShardedCacheLossHandler, *, allow_block_size_change: bool = False) -> None:
        if not isinstance(handler, ShardedCacheLossHandler):
            raise TypeError(f"CacheCheckpoint needs a ShardedCacheLossHandler, got {type(handler).__name__}")
        self.handler = handler
        self.allow_block_size_change = allow_block_size_change
        self.checkpoint_id: str | None = None  # set by :func:`save` for the duration of one save
        self.saved_meta: str | None = None  # the record text the last state_dict() returned
        self.source_group: int | None = None  # the saved group a load reads (None: this rank's own group)

    def _group_entries(self, entries: dict[str, Any]) -> dict[str, Any]:
        """``entries`` ('rows', 'row_hash') under the names of group ``source_group`` (own group by default)."""
        group = self.handler.layout.group if self.source_group is None else self.source_group
        return entries if group == 0 else {"groups": {str(group): entries}}

    def _group_state(self, state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
        group = self.handler.layout.group if self.source_group is None else self.source_group
        return state_dict if group == 0 else state_dict["groups"][str(group)]

    def _global(self, local: torch.Tensor) -> torch.Tensor:
        """``local`` as a DTensor of global shape [cache_size, ...] (a plain tensor without torch.distributed).

        The mesh is the handler's shard group, on the tensor's own device type (host-resident
        feature fields stay on the host). DCP moves no tensor data through it: each rank writes and
        reads its rows itself.
        """
        if not self.handler.topology.distributed:
            return local
        from torch.distributed.tensor import DTensor, Shard

        mesh = self.handler.topology.shard_mesh(local.device.type)
        shape = torch.Size([self.handler.layout.cache_size, *local.shape[1:]])
        return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=shape, stride=local.stride())

    def record(self) -> dict[str, Any]:
        """This handler's record: what a checkpoint of it says now."""
        return cache_record(self.handler, self.checkpoint_id)

    def check_record(self, saved: Mapping[str, Any]) -> None:
        """Raises :class:`CheckpointError` naming every difference between ``saved`` and this handler."""
        try:
            diffs = _differences(saved, self.record(), not self.allow_block_size_change, self.handler.layout.rows_per_rank)
        except (AttributeError, TypeError, KeyError) as exc:  # e.g. a spec entry that is not an object
            raise CheckpointError(f"the checkpoint's cache record is damaged ({type(exc).__name__}: {exc}); "
                                  "nothing was loaded") from None
        if diffs:
            raise CheckpointError(
                "the checkpointed cache does not match this handler, nothing was loaded; " + "; ".join(diffs)
            )

    # ---- Stateful ----
    def state_dict(self) -> dict[str, Any]:
        """{'meta': JSON record, 'rows': {name: row-sharded copy}, 'row_hash': row-sharded hashes}.

        The stored hashes are salted with the record's digest, binding every rank's rows to this record.
        No collective: DCP's planning is the only coordination.
        """
        local = _checkpoint_rows(self.handler.store)
        meta = json.dumps(self.record(), sort_keys=True)
        hashes = (row_hashes(list(local.values()), self.handler.layout.row_offset) + _record_salt(meta)) % _P
        self.saved_meta = meta
        return {
            "meta": meta,
            **self._group_entries({"rows": {k: self._global(v) for k, v in local.items()},
                                   "row_hash": self._global(hashes)}),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Checks the record and the rows' hashes on every rank, then writes the rows, step and seed.

        Collective over the handler's group: every rank raises together or none writes.
        """
        meta = state_dict.get("meta")
        saved = parse_record(meta)
        self.check_record(saved)
        state_dict = self._group_state(state_dict)
        local = {k: _to_local(v) for k, v in state_dict["rows"].items()}
        names = shard_rows_names(self.handler.store)
        order = list(names.values())
        if sorted(local) != sorted(order):
            raise CheckpointError(f"the checkpoint's rows have fields {sorted(local)}, expected {sorted(order)}")
        first = self.handler.layout.row_offset
        want = _to_local(state_dict["row_hash"])
        bad = (row_hashes([local[k] for k in order], first) + _record_salt(meta)) % _P != want
        self._agree_rows(bad, first, meta, int(saved["step"]))
        self.handler.store.import_rows({key: local[name] for key, name in names.items()}, as_stored=True)
        # The counters go through the module's own load path, whose post-hook updates the host mirrors.
        self.handler.load_state_dict(
            {"step_count": torch.tensor(int(saved["step"])), "seed": torch.tensor(int(saved["seed"]))}, strict=False
        )

    def _agree_rows(self, bad: torch.Tensor, first: int, meta: str, saved_step: int) -> None:
        """All ranks learn how many rows failed their hash (and the first one), and whether all read the same
        cache record (one per checkpoint: ranks that read different checkpoints differ in it): raise
        everywhere or nowhere."""
        comm = self.handler.comm  # over the whole job: every group's ranks raise together
        table = torch.zeros(comm.world_size, 5, dtype=torch.int64, device=self.handler.device)
        count = int(bad.sum())
        table[comm.rank, 0] = count
        table[comm.rank, 1] = first + int(bad.nonzero()[0, 0]) if count else -1
        table[comm.rank, 2] = bad.numel()
        table[comm.rank, 3] = _record_salt(meta)
        table[comm.rank, 4] = saved_step
        if comm.world_size > 1:
            comm.run("verify rows", lambda: dist.all_reduce(table, group=comm.world_group, async_op=True),
                     step=self.handler.steps_done, kind=_KIND)
        if len(set(table[:, 3].tolist())) > 1:
            raise CheckpointError("ranks read different checkpoints (their cache records differ), nothing was "
                                  "loaded: " + "; ".join(f"rank {r}: step {s}" for r, s in enumerate(table[:, 4].tolist())))
        if int(table[:, 0].sum()):
            where = ", ".join(
                f"rank {r}: {c} rows from global row {j}" for r, (c, j, *_) in enumerate(table[:, :3].tolist()) if c
            )
            every = all(c == n for c, _, n in table[:, :3].tolist() if n)
            hint = (" (every row fails: the cache record was edited, or the data files come from another "
                    "checkpoint)") if every else ""
            raise CheckpointError(
                f"the checkpoint is corrupted: {int(table[:, 0].sum())} cache rows do not match their stored hash "
                f"({where}){hint}; nothing was loaded"
            )


def _to_local(t: Any) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


# ---- whole checkpoints: manifest, verification, save / load ------------------------------
_KIND = "checkpoint collective"  # how a checkpoint's collective names itself when it fails


def _comm(caches: Mapping[str, CacheCheckpoint], process_group: dist.ProcessGroup | None) -> Comm:
    """The collective layer a save or load runs through: the first cache's handler's (its topology and its
    collective timeout), or, for a state without a cache, one over ``process_group`` with the default timeout."""
    if not caches:
        return Comm(Topology.build(None, process_group))
    comm = next(iter(caches.values())).handler.comm
    if process_group is not None and comm.distributed and \
            dist.get_process_group_ranks(process_group) != dist.get_process_group_ranks(comm.world_group):
        raise ValueError("process_group must be the process group of the cache's handler (its ranks: "
                         f"{dist.get_process_group_ranks(comm.world_group)}), got ranks "
                         f"{dist.get_process_group_ranks(process_group)}; or leave it out")
    return comm


def _raised_by_collective(exc: BaseException) -> bool:
    """True when ``exc`` came out of a torch.distributed collective (the innermost frame is in c10d):
    gloo reports a dead peer as a plain RuntimeError, which must not be confused with a user's error
    raised inside DCP (e.g. by a model's state_dict)."""
    if isinstance(exc, dist.DistError):
        return True
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_filename.endswith("distributed_c10d.py")


def _dcp(name: str, step: int | None, comm: Comm, fn: Any) -> Any:
    """Runs a DCP call: its collectives are DCP's own, bounded by the process group's timeout (not the
    engine's), and a peer that died or disconnected becomes the engine's :class:`CollectiveFailed`."""
    try:
        with _quiet_single_process():
            return fn()
    except RuntimeError as exc:
        if isinstance(exc, CollectiveFailed) or not _raised_by_collective(exc):
            raise
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise comm.failure(name, first, step=step, kind=_KIND, timed=False) from exc


def _agree_on_checkpoint(path: str, manifest: Mapping[str, Any], comm: Comm, step: int | None) -> None:
    """Every rank must have found the same checkpoint (id and step) before any rank reads a row: ranks that
    read different ones (a "latest checkpoint" lookup racing a save, nodes with different views of a
    filesystem) would each verify and load a consistent slice of a different cache."""
    views = comm.gather_objects((path, manifest["checkpoint_id"], manifest["step"]), f"load {path}: agree",
                                step=step, kind=_KIND)
    if len({(ckpt, at) for _, ckpt, at in views}) > 1:
        raise CheckpointError("ranks read different checkpoints, nothing was loaded: " + "; ".join(
            f"rank {r}: {p} (checkpoint {ckpt}, step {at})" for r, (p, ckpt, at) in enumerate(views)))


def _agree(problem: str | None, comm: Comm, step: int | None, name: str, payload: Any = None) -> Any:
    """Raises CheckpointError on every rank if any rank has a problem (message per distinct problem);
    otherwise returns rank 0's ``payload`` on every rank."""
    entries = comm.gather_objects((problem, payload), name, step=step, kind=_KIND)
    found = [(r, p) for r, (p, _) in enumerate(entries) if p]
    if found:
        seen: dict[str, list[int]] = {}
        for r, p in found:
            seen.setdefault(p, []).append(r)
        if len(entries) == 1:
            raise CheckpointError(found[0][1])
        raise CheckpointError("; ".join(f"{p} (rank {', '.join(map(str, rs))})" for p, rs in seen.items()))
    return entries[0][1]


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it runs in one process when torch.distributed is not initialised: that is intended here."""
    with warnings.catch_warnings():
        if not is_distributed():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _failures(exc: CheckpointException) -> str:
    failures = getattr(exc, "_failures", {}) or {}
    parts = []
    for rank, failure in sorted(failures.items()):
        err = failure[0] if isinstance(failure, tuple) else failure
        parts.append(f"rank {rank}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    return "; ".join(parts) or str(exc)


# The manifest's keys and JSON types; a damaged manifest is refused naming what is wrong.
_MANIFEST_TYPES: dict[str, type | tuple[type, ...]] = {
    "format": str, "checkpoint_id": str, "step": (int, type(None)), "world_size": int,
    "files": dict, "sha256": dict, "records": dict,
}


def _manifest_problems(manifest: Any) -> list[str]:
    """What is wrong with a parsed manifest (empty when it is well formed)."""
    if not isinstance(manifest, dict):
        return [f"expected a JSON object, got {type(manifest).__name__}"]
    if manifest.get("format") != MANIFEST_FORMAT:
        return [f"format {manifest.get('format')!r}, this library reads {MANIFEST_FORMAT!r}"]
    out = [f"{k!r} is missing" if k not in manifest else f"{k!r} is {type(manifest[k]).__name__}"
           for k, t in _MANIFEST_TYPES.items() if k not in manifest or not _is_a(manifest[k], t)]
    if out:
        return out
    files, digests, records = manifest["files"], manifest["sha256"], manifest["records"]
    if not all(Path(n).name == n and n not in ("", ".", "..") and _is_a(v, int) and v >= 0 for n, v in files.items()):
        out.append("'files' must map file names in the directory to sizes in bytes")
    if set(digests) != set(files) or not all(isinstance(v, str) and len(v) == 64 for v in digests.values()):
        out.append("'sha256' must hold one hex digest per file of 'files'")
    if not all(isinstance(v, str) and len(v) == 64 for v in records.values()):
        out.append("'records' must map cache names to hex digests")
    return out


def _read_manifest(root: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """(the manifest, []) or (None, problems): never a raw JSON, Unicode, key or type error."""
    if not root.is_dir():
        return None, [f"{root} is not a directory"]
    path = root / MANIFEST_NAME
    if not path.is_file():
        return None, [f"{root} has no {MANIFEST_NAME}: the save did not finish "
                      "(or the checkpoint was not written by sharded_negcache.checkpoint.save)"]
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # ValueError covers JSONDecodeError and UnicodeDecodeError
        return None, [f"{path} is unreadable ({type(exc).__name__}: {exc})"]
    problems = _manifest_problems(manifest)
    if problems:
        return None, [f"{path} is damaged: " + "; ".join(problems)]
    return manifest, []


def _file_problems(root: Path, manifest: Mapping[str, Any], digests: bool, share: tuple[int, int] = (0, 1)) -> list[str]:
    """Missing files and size mismatches (every file), digest mismatches (files ``i % W == rank``)."""
    problems = []
    rank, world = share
    for index, (name, size) in enumerate(sorted(manifest["files"].items())):
        file = root / name
        if not file.is_file():
            problems.append(f"file {name} is missing: the checkpoint is incomplete")
        elif file.stat().st_size != size:
            problems.append(f"file {name} has {file.stat().st_size} bytes, the manifest records {size}: "
                            "the checkpoint is cut short or damaged")
        elif digests and index % world == rank:
            try:
                same = file_sha256(file) == manifest["sha256"][name]
            except OSError as exc:
                problems.append(f"file {name} is unreadable: {exc}")
                continue
            if not same:
                problems.append(f"file {name} does not match its sha256 in the manifest: it was changed after "
                                "the save or comes from another checkpoint (the manifest is checkpoint "
                                f"{manifest['checkpoint_id']})")
    return problems


def verify_checkpoint(path: str | os.PathLike, *, digests: bool = True) -> list[str]:
    """Problems that make the checkpoint at ``path`` unusable (empty list: complete). Reads no tensor data.

    Checks that the manifest exists (written only after every rank finished) and is well formed, and
    that every file it lists exists with the recorded size and (``digests=True``) sha256 digest.
    """
    root = Path(path)
    manifest, problems = _read_manifest(root)
    return problems if manifest is None else _file_problems(root, manifest, digests)


def latest_checkpoint(root: str | os.PathLike) -> str | None:
    """The complete checkpoint directory under ``root`` with the highest recorded step (None if none).

    Incomplete or damaged ones (no manifest, a damaged manifest, a file missing or of another size) are
    skipped, so a save that was cut short by a failure falls back to the previous checkpoint. Digests are
    not read here (that would read every checkpoint in full); :func:`load` checks them.
    """
    base = Path(root)
    if not base.is_dir():
        return None
    best: tuple[int, str] | None = None
    for child in base.iterdir():
        manifest, problems = _read_manifest(child) if child.is_dir() else (None, ["not a directory"])
        if manifest is None or _file_problems(child, manifest, digests=False):
            continue
        key = (manifest["step"] if manifest["step"] is not None else -1, child.name)
        if best is None or key > best:
            best = key
    return str(base / best[1]) if best is not None else None


def _caches(state: Mapping[str, Any]) -> dict[str, CacheCheckpoint]:
    return {k: v for k, v in state.items() if isinstance(v, CacheCheckpoint)}


def _current_step(caches: Mapping[str, CacheCheckpoint]) -> int | None:
    return next(iter(caches.values())).handler.steps_done if caches else None


def save(
    state: dict[str, Any],
    checkpoint_id: str | os.PathLike,
    *,
    process_group: dist.ProcessGroup | None = None,
    step: int | None = None,
) -> Metadata:
    """``dcp.save(state)`` into the directory ``checkpoint_id``, then the manifest, written last by rank 0.

    Collective over the caches' handler's process group (``process_group``, if given, must be that one;
    it is the group of a state without a cache, default the world). ``step`` is recorded for
    :func:`latest_checkpoint` (default: the step counter of the first :class:`CacheCheckpoint` in
    ``state``). A manifest left from an earlier save into the same directory is removed first, so an
    overwrite that fails midway is never taken for complete. Rank 0 draws a checkpoint id that goes
    into every cache record and the manifest; each rank digests a share of the written files. A rank
    that died or stalled raises :class:`CollectiveFailed` (naming the step and the collective) on the
    others: the save's own collectives run under the handler's ``collective_timeout_s``.
    """
    root = Path(checkpoint_id)
    caches = _caches(state)
    comm = _comm(caches, process_group)
    if step is None:
        step = _current_step(caches)
    problem, new_id = None, None
    if comm.rank == 0:
        new_id = uuid.uuid4().hex
        try:
            root.mkdir(parents=True, exist_ok=True)
            (root / MANIFEST_NAME).unlink(missing_ok=True)
        except OSError as exc:
            problem = f"cannot prepare {root}: {exc}"
    ckpt_id = _agree(problem, comm, step, f"save {root}: prepare", new_id)
    for cache in caches.values():
        cache.checkpoint_id, cache.saved_meta = ckpt_id, None
    try:
        metadata = _dcp(f"save {root}: dcp.save", step, comm,
                        lambda: dcp.save(state, checkpoint_id=str(root), process_group=comm.world_group))
    except CheckpointException as exc:  # a BaseException in DCP: surface it as an ordinary error
        raise CheckpointError(f"writing checkpoint {root} failed, it has no manifest: {_failures(exc)}") from None
    finally:
        for cache in caches.values():
            cache.checkpoint_id = None
    # dcp.save returns on every rank only after rank 0 wrote .metadata, i.e. after all data was written;
    # its metadata (every file name) is the same on every rank.
    names = sorted({n for n in (getattr(i, "relative_path", None) for i in metadata.storage_data.values()) if n}
                   | {".metadata"})
    rank, world = comm.rank, comm.world_size
    problem, digests = None, {}
    try:
        digests = {n: file_sha256(root / n) for i, n in enumerate(names) if i % world == rank}
    except OSError as exc:
        problem = f"cannot read back {root}: {exc}"
    shares = comm.gather_objects((problem, digests), f"save {root}: digests", step=step, kind=_KIND)
    problem = "; ".join(p for p, _ in shares if p) or None
    if problem is None and rank == 0:
        try:
            manifest = {
                "format": MANIFEST_FORMAT,
                "checkpoint_id": ckpt_id,
                "step": step,
                "world_size": world,
                "time": time.time(),
                "files": {n: (root / n).stat().st_size for n in names},
                "sha256": {n: d for _, part in shares for n, d in part.items()},
                "records": {k: _sha256_text(c.saved_meta) for k, c in sorted(caches.items()) if c.saved_meta},
            }
            tmp = root / (MANIFEST_NAME + ".tmp")
            with open(tmp, "w") as f:
                json.dump(manifest, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, root / MANIFEST_NAME)
        except OSError as exc:
            problem = f"cannot write the manifest of {root}: {exc}"
    _agree(problem, comm, step, f"save {root}: manifest")
    return metadata


def _read_meta(checkpoint_id: str, key: str, comm: Comm, step: int | None) -> str | None:
    """The JSON text of the cache record saved under ``key`` (only that small entry is read), or None."""
    probe: dict[str, Any] = {key: {"meta": _UNREAD}}
    try:
        _dcp(f"load {checkpoint_id}: read record", step, comm, lambda: dcp.load(
            probe, checkpoint_id=checkpoint_id, process_group=comm.world_group,
            planner=DefaultLoadPlanner(allow_partial_load=True)))
    except CheckpointException as exc:
        raise CheckpointError(f"cannot read the cache record of {checkpoint_id}: {_failures(exc)}") from None
    meta = probe[key]["meta"]
    return None if meta == _UNREAD else meta


def _record_problem(path: str, key: str, meta: str | None, manifest: Mapping[str, Any], cache: CacheCheckpoint) -> str | None:
    """Why the cache record ``meta`` cannot be loaded into ``cache`` (None: it can)."""
    if meta is None:
        return f"checkpoint {path} holds no cache under {key!r}"
    if manifest["records"].get(key) != _sha256_text(meta):
        return (f"checkpoint {path}: the cache record {key!r} does not match its digest in the manifest "
                "(edited after the save, or from another checkpoint); nothing was loaded")
    try:
        record = parse_record(meta)
        if record.get("checkpoint_id") != manifest["checkpoint_id"]:
            return (f"checkpoint {path}: the cache record {key!r} belongs to checkpoint "
                    f"{record.get('checkpoint_id')}, the manifest to {manifest['checkpoint_id']}; nothing was loaded")
        cache.check_record(record)
    except CheckpointError as exc:
        return f"checkpoint {path}, {key!r}: {exc}"
    return None


def load(
    state: dict[str, Any],
    checkpoint_id: str | os.PathLike,
    *,
    process_group: dist.ProcessGroup | None = None,
) -> None:
    """Verified ``dcp.load(state)``: refuses incomplete, damaged or mixed checkpoints and mismatched caches
    before reading rows.

    Collective over the caches' handler's process group (see :func:`save` for ``process_group``). Raises
    :class:`CheckpointError` on every rank when the manifest is missing or damaged, a file is missing or has
    another size or digest, a cache record does not match the manifest (its digest, its checkpoint id) or
    differs from its handler (each difference named), DCP fails to read, or a row fails its hash;
    :class:`CollectiveFailed` when a rank died. The checks before DCP runs leave every object in ``state``
    untouched; a :class:`CacheCheckpoint` is untouched in every case. Each rank digests 1/W of the files. The
    load's own collectives run under the handler's ``collective_timeout_s``, as :func:`save`'s do.
    """
    path = str(checkpoint_id)
    caches = _caches(state)
    comm = _comm(caches, process_group)
    step = _current_step(caches)
    manifest, problems = _read_manifest(Path(path))
    if manifest is not None:
        problems = _file_problems(Path(path), manifest, True, (comm.rank, comm.world_size))
    _agree(f"refusing checkpoint {path}: " + "; ".join(problems) if problems else None, comm, step,
           f"load {path}: verify files")
    _agree_on_checkpoint(path, manifest, comm, step)
    for key, cache in caches.items():
        meta = _read_meta(path, key, comm, step)
        _agree(_record_problem(path, key, meta, manifest, cache), comm, step, f"load {path}: check record")
        cache.source_group = source_group(cache.handler.layout.group, parse_record(meta).get("num_groups", 1))
    try:
        _dcp(f"load {path}: dcp.load", step, comm,
             lambda: dcp.load(state, checkpoint_id=path, process_group=comm.world_group))
    except CheckpointException as exc:
        raise CheckpointError(f"reading checkpoint {path} failed, the cache is unchanged: {_failures(exc)}") from None
    finally:
        for cache in caches.values():
            cache.source_group = None


def source_group(group: int, saved_groups: int) -> int:
    """The saved group whose cache new group ``group`` loads: ``group mod saved_groups``.

    Growing (n -> n' > n groups) starts the new groups as copies of the saved ones, round-robin; each
    then samples its own stream and is fed its own positives, so the copies diverge from the first step.
    Shrinking keeps groups 0..n'-1 (the groups' caches are exchangeable samples of the same data
    stream; the rest would only be older duplicates of the same distribution). Group j < n keeps its
    rows, seed and step: it continues exactly as the saved group j would have.
    """
    return group % saved_groups
