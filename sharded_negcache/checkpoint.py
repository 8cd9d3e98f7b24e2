"""Checkpoints of the sharded cache with ``torch.distributed.checkpoint`` (DCP), loadable on any world size.

A plain ``handler.state_dict()`` holds this rank's shard only, so it reloads only on the same world
size. :class:`CacheCheckpoint` presents the cache in DCP's native sharded form instead: every per-row
tensor (stored embeddings, ages, filled flags, each feature field, a per-row content hash) is a
``DTensor`` of global shape ``[cache_size, ...]`` placed ``Shard(0)`` over a 1-D mesh of the handler's
process group (a jagged field is written padded, ``[cache_size, max_length]`` plus lengths), next to
a small JSON record (specs, cache size, codec, block size, step, seed). DCP writes each rank's rows
once and, on load, every rank reads exactly the rows of its new slice, so a cache saved by W ranks
loads on W' ranks (W' must divide ``cache_size``).

Resharding keeps the global row order: global row ``j`` of the saved cache is global row ``j`` of
the loaded one, with its age, filled flag, features and stored (codec-encoded) embedding, bit for
bit. Each rank evicts its own oldest rows, so after a resize the next eviction is the global age
order restricted to each new shard (see docs/checkpointing.md).

:func:`save` and :func:`load` wrap ``dcp.save``/``dcp.load`` for a whole training state
(``{"model": ..., "optim": ..., "cache": CacheCheckpoint(handler)}``) and add what DCP lacks:

- a manifest written last, after every rank finished, listing each file and its size: a checkpoint
  without it, or with a file missing or of another size, is refused before anything is read;
- a check of the cache's record against the handler before any tensor is read, with an error that
  names each difference;
- nothing is written into the live cache until every rank has read and verified its rows (content
  hashes), so a refused checkpoint leaves the cache as it was.

Two-level layout (``shard_group_size``): each group's cache is saved under its own names (group 0
under the flat layout's, group g > 0 under ``groups.<g>.``), sharded over the group's ranks. On load
with n' groups, new group j reads saved group ``j mod n`` (:func:`source_group`): growing copies
caches round-robin, shrinking keeps groups 0..n'-1. A flat checkpoint is a one-group checkpoint.

``CacheCheckpoint`` also works with a bare ``dcp.save``/``dcp.load``; it then still refuses
mismatched or corrupted caches without touching the live one, but size mismatches surface as DCP's own
error and a partly written checkpoint is only caught when DCP fails to read it.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata

from .handler import ShardedCacheLossHandler
from .jagged import JaggedFieldSpec
from .specs import AnySpec
from .store import ShardStore

__all__ = [
    "CacheCheckpoint",
    "CheckpointError",
    "save",
    "load",
    "verify_checkpoint",
    "latest_checkpoint",
    "row_hashes",
    "shard_rows",
    "cache_record",
    "MANIFEST_NAME",
    "source_group",
]

CACHE_FORMAT = "sharded_negcache.cache/1"
MANIFEST_FORMAT = "sharded_negcache.manifest/1"
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


def cache_record(handler: ShardedCacheLossHandler) -> dict[str, Any]:
    """JSON-able facts of the cache: the ones a load checks, the step and seed it restores, the rest for reading."""
    config = handler.config()
    return {
        "format": CACHE_FORMAT,
        "specs": {k: _spec_record(s) for k, s in sorted(handler.schema.specs.items())},
        "embedding_key": handler.schema.embedding_key,
        "data_keys": list(handler.schema.data_keys),
        "doc_id_key": handler.schema.doc_id_key,
        "cache_size": handler.layout.cache_size,
        "codec": handler.store.codec.name,
        "block_size": handler.layout.block_size,
        "step": handler.steps_done,
        "seed": int(handler.seed),
        "saved_world_size": handler.comm.outer_size,
        "shard_group_size": handler.layout.world_size,  # free to change on load, like the world size
        "num_groups": handler.layout.num_groups,
        "settings": {  # free to change across a resume; recorded for reading only
            k: config.get(k) for k in
            ("top_k", "num_negatives", "use_lru", "in_batch_negatives", "score_transform", "host_features")
        },
    }


def _differences(saved: Mapping[str, Any], mine: Mapping[str, Any], check_block_size: bool) -> list[str]:
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
                hint = (
                    f" (the sampler keys its randomness by block: construct the handler with "
                    f"block_size={a} to continue the same random stream, or pass allow_block_size_change=True)"
                )
            if key == "cache_size":
                hint = " (the number of rows is fixed by the checkpoint; only the number of ranks may change)"
            out.append(f"{key}: checkpoint {a!r}, handler {b!r}{hint}")
    return out


# ---- the per-row tensors of a shard ----------------------------------------------------------
def shard_rows(store: ShardStore) -> dict[str, torch.Tensor]:
    """Copies of every per-row tensor of ``store`` by checkpoint name, in the fixed hashing order.

    The stored (codec-encoded) embeddings, ages and filled flags, then each feature field in name
    order: a fixed field as [rows, *shape], a jagged one as ``<key>.padded`` [rows, max_length] (zeros
    past each length) and ``<key>.lengths`` [rows]. Host-resident fields stay on the host.
    """
    rows = {"embeddings": store.embeddings.detach().clone(), "age": store.age.detach().clone(),
            "filled": store.filled.detach().clone()}
    for key in sorted(store.feature_specs):
        column = store.feature(key)
        if isinstance(store.feature_specs[key], JaggedFieldSpec):
            padded, lengths = column.padded()
            rows[f"features.{key}.padded"], rows[f"features.{key}.lengths"] = padded, lengths.to(torch.int64)
        else:
            rows[f"features.{key}"] = column.detach().clone()
    return rows


def _write_rows(store: ShardStore, rows: Mapping[str, torch.Tensor]) -> None:
    """Overwrites every local row from :func:`shard_rows`-shaped tensors; embeddings as stored bytes.

    (``ShardStore.import_rows`` takes fp32 embeddings and would re-encode them: not bitwise for int8/int4.)
    """
    with torch.no_grad():
        store.embeddings.copy_(rows["embeddings"])
        store.age.copy_(rows["age"])
        store.filled.copy_(rows["filled"])
        for key in sorted(store.feature_specs):
            column = store.feature(key)
            if isinstance(store.feature_specs[key], JaggedFieldSpec):
                where = column.lengths.device
                column.load_padded(rows[f"features.{key}.padded"].to(where), rows[f"features.{key}.lengths"].to(where))
            else:
                column.copy_(rows[f"features.{key}"])


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

        The mesh is the handler's process group, on the tensor's own device type (host-resident
        feature fields stay on the host). DCP moves no tensor data through it: each rank writes and
        reads its rows itself.
        """
        if not self.handler.comm.distributed:
            return local
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.tensor import DTensor, Shard

        mesh = DeviceMesh.from_group(self.handler.comm.group or dist.group.WORLD, local.device.type)
        shape = torch.Size([self.handler.layout.cache_size, *local.shape[1:]])
        return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=shape, stride=local.stride())

    def record(self) -> dict[str, Any]:
        """This handler's record: what a checkpoint of it says now."""
        return cache_record(self.handler)

    def check_record(self, saved: Mapping[str, Any]) -> None:
        """Raises :class:`CheckpointError` naming every difference between ``saved`` and this handler."""
        diffs = _differences(saved, self.record(), not self.allow_block_size_change)
        if diffs:
            raise CheckpointError(
                "the checkpointed cache does not match this handler, nothing was loaded; " + "; ".join(diffs)
            )

    # ---- Stateful ----
    def state_dict(self) -> dict[str, Any]:
        """{'meta': JSON record, 'rows': {name: row-sharded copy}, 'row_hash': row-sharded hashes}.

        No collective: DCP's planning is the only coordination.
        """
        local = shard_rows(self.handler.store)
        hashes = row_hashes(list(local.values()), self.handler.layout.row_offset)
        return {
            "meta": json.dumps(self.record(), sort_keys=True),
            **self._group_entries({"rows": {k: self._global(v) for k, v in local.items()},
                                   "row_hash": self._global(hashes)}),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Checks the record and the rows' hashes on every rank, then writes the rows, step and seed.

        Collective over the handler's group: every rank raises together or none writes.
        """
        meta = state_dict.get("meta")
        if not isinstance(meta, str) or meta == _UNREAD:
            raise CheckpointError("the checkpoint holds no cache record ('meta'); nothing was loaded")
        saved = json.loads(meta)
        self.check_record(saved)
        state_dict = self._group_state(state_dict)
        local = {k: _to_local(v) for k, v in state_dict["rows"].items()}
        order = list(shard_rows_names(self.handler.store))
        if sorted(local) != sorted(order):
            raise CheckpointError(f"the checkpoint's rows have fields {sorted(local)}, expected {sorted(order)}")
        first = self.handler.layout.row_offset
        bad = row_hashes([local[k] for k in order], first) != _to_local(state_dict["row_hash"])
        self._agree_rows(bad, first)
        _write_rows(self.handler.store, local)
        # The counters go through the module's own load path, whose post-hook updates the host mirrors.
        self.handler.load_state_dict(
            {"step_count": torch.tensor(int(saved["step"])), "seed": torch.tensor(int(saved["seed"]))}, strict=False
        )

    def _agree_rows(self, bad: torch.Tensor, first: int) -> None:
        """All ranks learn how many rows failed their hash (and the first one): raise everywhere or nowhere."""
        comm = self.handler.comm  # over the whole job: every group's ranks raise together
        table = torch.zeros(comm.outer_size, 2, dtype=torch.int64, device=self.handler.device)
        count = int(bad.sum())
        table[comm.outer_rank, 0] = count
        table[comm.outer_rank, 1] = first + int(bad.nonzero()[0, 0]) if count else -1
        if comm.outer_size > 1:
            dist.all_reduce(table, group=comm.outer_group)
        if int(table[:, 0].sum()):
            where = ", ".join(
                f"rank {r}: {int(c)} rows from global row {int(j)}" for r, (c, j) in enumerate(table.tolist()) if c
            )
            raise CheckpointError(
                f"the checkpoint is corrupted: {int(table[:, 0].sum())} cache rows do not match their stored hash "
                f"({where}); nothing was loaded"
            )


def shard_rows_names(store: ShardStore) -> list[str]:
    """The names :func:`shard_rows` produces, in order, without copying anything."""
    names = ["embeddings", "age", "filled"]
    for key in sorted(store.feature_specs):
        if isinstance(store.feature_specs[key], JaggedFieldSpec):
            names += [f"features.{key}.padded", f"features.{key}.lengths"]
        else:
            names.append(f"features.{key}")
    return names


def _to_local(t: Any) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


# ---- whole checkpoints: manifest, verification, save / load ------------------------------
def _agree(problem: str | None, group: dist.ProcessGroup | None) -> None:
    """Raises CheckpointError on every rank if any rank has a problem (message per distinct problem)."""
    problems = [problem]
    if dist.is_available() and dist.is_initialized():
        problems = [None] * dist.get_world_size(group)
        dist.all_gather_object(problems, problem, group=group)
    found = [(r, p) for r, p in enumerate(problems) if p]
    if found:
        seen: dict[str, list[int]] = {}
        for r, p in found:
            seen.setdefault(p, []).append(r)
        if len(problems) == 1:
            raise CheckpointError(found[0][1])
        raise CheckpointError("; ".join(f"{p} (rank {', '.join(map(str, rs))})" for p, rs in seen.items()))


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it runs in one process when torch.distributed is not initialised: that is intended here."""
    with warnings.catch_warnings():
        if not (dist.is_available() and dist.is_initialized()):
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _is_coordinator(group: dist.ProcessGroup | None) -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank(group) == 0


def _failures(exc: CheckpointException) -> str:
    failures = getattr(exc, "_failures", {}) or {}
    parts = []
    for rank, failure in sorted(failures.items()):
        err = failure[0] if isinstance(failure, tuple) else failure
        parts.append(f"rank {rank}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    return "; ".join(parts) or str(exc)


def verify_checkpoint(path: str | os.PathLike) -> list[str]:
    """Problems that make the checkpoint at ``path`` unusable (empty list: complete). Reads no tensor data.

    Checks that the manifest exists (written only after every rank finished) and that every file it
    lists exists with the recorded size.
    """
    root = Path(path)
    manifest_path = root / MANIFEST_NAME
    if not root.is_dir():
        return [f"{root} is not a directory"]
    if not manifest_path.is_file():
        return [f"{root} has no {MANIFEST_NAME}: the save did not finish "
                "(or the checkpoint was not written by sharded_negcache.checkpoint.save)"]
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        return [f"{manifest_path} is unreadable: {exc}"]
    if manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("files"), dict):
        return [f"{manifest_path} is not a {MANIFEST_FORMAT} manifest"]
    problems = []
    for name, size in sorted(manifest["files"].items()):
        file = root / name
        if not file.is_file():
            problems.append(f"file {name} is missing: the checkpoint is incomplete")
        elif file.stat().st_size != size:
            problems.append(f"file {name} has {file.stat().st_size} bytes, the manifest records {size}: "
                            "the checkpoint is cut short or damaged")
    return problems


def _read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(path) / MANIFEST_NAME).read_text())


def latest_checkpoint(root: str | os.PathLike) -> str | None:
    """The complete checkpoint directory under ``root`` with the highest recorded step (None if none).

    Incomplete ones (no manifest, a file missing or of another size) are skipped, so a save that was
    cut short by a failure falls back to the previous checkpoint.
    """
    base = Path(root)
    if not base.is_dir():
        return None
    best: tuple[int, str] | None = None
    for child in base.iterdir():
        if child.is_dir() and not verify_checkpoint(child):
            step = _read_manifest(child).get("step")
            key = (int(step) if step is not None else -1, child.name)
            if best is None or key > best:
                best = key
    return str(base / best[1]) if best is not None else None


def _caches(state: Mapping[str, Any]) -> dict[str, CacheCheckpoint]:
    return {k: v for k, v in state.items() if isinstance(v, CacheCheckpoint)}


def save(
    state: dict[str, Any],
    checkpoint_id: str | os.PathLike,
    *,
    process_group: dist.ProcessGroup | None = None,
    step: int | None = None,
) -> Metadata:
    """``dcp.save(state)`` into the directory ``checkpoint_id``, then the manifest, written last by rank 0.

    Collective over ``process_group`` (default: the world). ``step`` is recorded for
    :func:`latest_checkpoint` (default: the step counter of the first :class:`CacheCheckpoint` in
    ``state``). A manifest left from an earlier save into the same directory is removed first, so an
    overwrite that fails midway is never taken for complete.
    """
    root = Path(checkpoint_id)
    problem = None
    if _is_coordinator(process_group):
        try:
            root.mkdir(parents=True, exist_ok=True)
            (root / MANIFEST_NAME).unlink(missing_ok=True)
        except OSError as exc:
            problem = f"cannot prepare {root}: {exc}"
    _agree(problem, process_group)
    caches = _caches(state)
    if step is None and caches:
        step = next(iter(caches.values())).handler.steps_done
    try:
        with _quiet_single_process():
            metadata = dcp.save(state, checkpoint_id=str(root), process_group=process_group)
    except CheckpointException as exc:  # a BaseException in DCP: surface it as an ordinary error
        raise CheckpointError(f"writing checkpoint {root} failed, it has no manifest: {_failures(exc)}") from None
    # dcp.save returns on every rank only after rank 0 wrote .metadata, i.e. after all data was written.
    problem = None
    if _is_coordinator(process_group):
        try:
            names = {getattr(info, "relative_path", None) for info in metadata.storage_data.values()}
            names = {n for n in names if n} | {".metadata"}
            manifest = {
                "format": MANIFEST_FORMAT,
                "step": step,
                "world_size": dist.get_world_size(process_group) if dist.is_initialized() else 1,
                "time": time.time(),
                "caches": sorted(caches),
                "files": {n: (root / n).stat().st_size for n in sorted(names)},
            }
            tmp = root / (MANIFEST_NAME + ".tmp")
            with open(tmp, "w") as f:
                json.dump(manifest, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, root / MANIFEST_NAME)
        except OSError as exc:
            problem = f"cannot write the manifest of {root}: {exc}"
    _agree(problem, process_group)
    return metadata


def _read_record(checkpoint_id: str, key: str, group: dist.ProcessGroup | None) -> dict[str, Any] | None:
    """The JSON record of the cache saved under ``key`` (only that small entry is read), or None."""
    probe: dict[str, Any] = {key: {"meta": _UNREAD}}
    try:
        with _quiet_single_process():
            dcp.load(probe, checkpoint_id=checkpoint_id, process_group=group,
                     planner=DefaultLoadPlanner(allow_partial_load=True))
    except CheckpointException as exc:
        raise CheckpointError(f"cannot read the cache record of {checkpoint_id}: {_failures(exc)}") from None
    meta = probe[key]["meta"]
    return None if meta == _UNREAD else json.loads(meta)


def load(
    state: dict[str, Any],
    checkpoint_id: str | os.PathLike,
    *,
    process_group: dist.ProcessGroup | None = None,
) -> None:
    """Verified ``dcp.load(state)``: refuses incomplete checkpoints and mismatched caches before reading rows.

    Collective over ``process_group``. Raises :class:`CheckpointError` on every rank when the manifest
    is missing, a file is missing or has another size, a cache's record differs from its handler (each
    difference named), DCP fails to read, or a row fails its hash. The checks before DCP runs leave
    every object in ``state`` untouched; a :class:`CacheCheckpoint` is untouched in every case.
    """
    path = str(checkpoint_id)
    problems = verify_checkpoint(path)
    _agree(f"refusing checkpoint {path}: " + "; ".join(problems) if problems else None, process_group)
    caches = _caches(state)
    for key, cache in caches.items():
        record = _read_record(path, key, process_group)
        problem = None
        if record is None:
            problem = f"checkpoint {path} holds no cache under {key!r}"
        else:
            try:
                cache.check_record(record)
            except CheckpointError as exc:
                problem = f"checkpoint {path}, {key!r}: {exc}"
        _agree(problem, process_group)
        cache.source_group = source_group(cache.handler.layout.group, record.get("num_groups", 1))
    try:
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=path, process_group=process_group)
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
