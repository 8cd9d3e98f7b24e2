"""One rank's rows of the cache: encoded embeddings, feature fields, ages and filled flags.

All state is registered as buffers, so ``state_dict()`` holds the cache and ``.to()`` moves it.
No collectives here: the exchange layer moves the packed bytes this module produces.
"""
from __future__ import annotations

from typing import Any, Collection, Mapping

import torch
from torch import nn

from .codecs import EmbeddingCodec, make_codec
from .jagged import Jagged, JaggedColumn, JaggedFieldSpec
from .specs import AnySpec, FieldSpec

__all__ = ["ShardStore", "FetchedRows", "first_occurrence", "CacheTooLarge", "check_capacity", "shard_bytes"]

_EMPTY_FIRST = 1 << 62  # added to an empty row's age: it sorts before every filled row


class CacheTooLarge(MemoryError):
    """The shard would not fit in the device's free memory: refused at construction, not mid-training."""


def shard_bytes(
    rows: int, dim: int, feature_specs: Mapping[str, AnySpec], codec: EmbeddingCodec, host_keys: Collection[str] = ()
) -> int:
    """Bytes one shard's buffers take on the cache device: stored embeddings, ages (8), flags (1) and
    the device-resident feature fields (a jagged one: offset and length, plus its initial value pool)."""
    per_row = codec.bytes_per_row(dim) + 8 + 1
    for key, s in feature_specs.items():
        if key in host_keys:
            continue
        if isinstance(s, JaggedFieldSpec):
            mean = s.mean_length or max(1, s.max_length // 4)
            per_row += 16 + int(mean * 1.25 * _itemsize(s.dtype))
        else:
            per_row += _itemsize(s.dtype) * _numel(s.shape)
    return rows * per_row


def _free_bytes(device: torch.device) -> int | None:
    """Free memory of a CUDA device, or MemAvailable of the host for CPU; None when unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def check_capacity(
    rows: int,
    dim: int,
    feature_specs: Mapping[str, AnySpec],
    codec: EmbeddingCodec,
    device: torch.device | str | None,
    host_keys: Collection[str] = (),
) -> None:
    """Raises CacheTooLarge (with the computed size) when a shard cannot fit in the free memory of ``device``."""
    device = torch.device(device if device is not None else "cpu")
    need = shard_bytes(rows, dim, feature_specs, codec, host_keys)
    free = _free_bytes(device)
    if free is not None and need > free:
        raise CacheTooLarge(
            f"a cache shard of {rows} rows needs {need / 2**30:.2f} GiB on {device} "
            f"({need // rows} bytes per row) but only {free / 2**30:.2f} GiB are free; "
            "use more ranks, a smaller cache_size or a compact embedding_codec"
        )


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def first_occurrence(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique ``keys`` (sorted) and, for each, the position of its first occurrence in ``keys``."""
    uniq, inverse = torch.unique(keys, return_inverse=True)
    pos = torch.arange(keys.numel(), device=keys.device)
    first = torch.full_like(uniq, keys.numel()).scatter_reduce_(0, inverse, pos, reduce="amin")
    return uniq, first


class FetchedRows:
    """Rows read from a shard: features per field (``Jagged`` for jagged fields), stale fp32 embeddings, ages."""

    def __init__(self, features: dict[str, Any], embeddings: torch.Tensor, ages: torch.Tensor) -> None:
        self.features = features
        self.embeddings = embeddings
        self.ages = ages

    def select(self, keep: torch.Tensor) -> "FetchedRows":
        """The rows where ``keep`` [n] is True."""
        return FetchedRows({k: v.select(keep) if isinstance(v, Jagged) else v[keep] for k, v in self.features.items()},
                           self.embeddings[keep], self.ages[keep])


class _HostResident(nn.Module):
    """Holds feature buffers in host memory (pinned when CUDA is present); ``.to()`` does not move them."""

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        return self


def _host_device() -> torch.device:
    return torch.device("cpu")


class ShardStore(nn.Module):
    """The rows of one shard and the cache policy applied to them (reference semantics, design §4).

    ``host_keys`` names feature fields kept in host memory while embeddings, ages and flags live on
    ``device``: only the sampled rows' features are read each step, so they need not occupy the GPU.
    """

    def __init__(
        self,
        rows: int,
        dim: int,
        feature_specs: Mapping[str, AnySpec],
        codec: EmbeddingCodec,
        device: torch.device | str | None = None,
        host_keys: Collection[str] = (),
    ) -> None:
        super().__init__()
        for key in feature_specs:
            if "." in key or ":" in key or not key:
                raise ValueError(f"feature key {key!r} must be non-empty and contain no '.' or ':'")
        unknown = set(host_keys) - set(feature_specs)
        if unknown:
            raise ValueError(f"host_features {sorted(unknown)} are not feature fields {sorted(feature_specs)}")
        codec.check_dim(dim)
        self.rows, self.dim, self.codec = rows, dim, codec
        self.feature_specs = dict(feature_specs)
        self.host_keys = frozenset(host_keys)
        self.register_buffer("embeddings", torch.zeros(rows, codec.width(dim), dtype=codec.storage_dtype, device=device))
        self.register_buffer("age", torch.zeros(rows, dtype=torch.int64, device=device))
        self.register_buffer("filled", torch.zeros(rows, dtype=torch.bool, device=device))
        self.features = nn.Module()
        self.host_features = _HostResident()
        pin = torch.cuda.is_available()
        for key, spec in self.feature_specs.items():
            owner = self.host_features if key in self.host_keys else self.features
            where = _host_device() if key in self.host_keys else device
            if isinstance(spec, JaggedFieldSpec):
                owner.add_module(key, JaggedColumn(rows, spec, where))
            else:
                t = torch.zeros(rows, *spec.shape, dtype=spec.dtype, device=where)
                owner.register_buffer(key, t.pin_memory() if pin and key in self.host_keys else t)

    @classmethod
    def from_tensors(
        cls,
        embeddings: torch.Tensor,
        features: Mapping[str, torch.Tensor],
        filled: torch.Tensor | None = None,
        age: torch.Tensor | None = None,
    ) -> "ShardStore":
        """A store whose rows are the caller's tensors, used in place (no copy): for callers that own the rows
        (``compat``'s functional losses) and run the engine over them.

        ``embeddings`` [rows, d] float, stored as its own dtype (the ``fp32``/``bf16``/``fp16`` codec); each
        feature field [rows, *shape]; ``filled`` [rows] bool (default: every row holds a document); ``age``
        [rows] int64 (default: zeros). All on one device. Writes through the store reach these tensors.
        """
        if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2 or not embeddings.is_floating_point():
            got = list(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__
            raise ValueError(f"embeddings must be a floating-point [rows, d] tensor, got {got}")
        rows, dim = embeddings.shape
        device = embeddings.device
        filled = torch.ones(rows, dtype=torch.bool, device=device) if filled is None else filled
        age = torch.zeros(rows, dtype=torch.int64, device=device) if age is None else age
        for name, t, dtype in (("filled", filled, torch.bool), ("age", age, torch.int64)):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (rows,) or t.dtype != dtype:
                got = f"{list(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must be a [{rows}] {dtype} tensor (one per row of embeddings), got {got}")
        for key, t in features.items():
            if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] != rows:
                got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"features[{key!r}] must be a [{rows}, ...] tensor (one row per cache row), got {got}")
        placed = {"filled": filled, "age": age, **{f"features[{k!r}]": t for k, t in features.items()}}
        elsewhere = {name: str(t.device) for name, t in placed.items() if t.device != device}
        if elsewhere:
            raise ValueError(f"every tensor must be on the embeddings' device {device}, got {elsewhere}")
        specs = {k: FieldSpec(tuple(t.shape[1:]), t.dtype) for k, t in features.items()}
        store = cls(rows, dim, specs, make_codec(embeddings.dtype), device="meta")  # allocates nothing
        store.embeddings, store.filled, store.age = embeddings, filled, age
        for key, t in features.items():
            setattr(store.features, key, t)
        return store

    @property
    def device(self) -> torch.device:
        return self.age.device

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        """Only device moves reach the rows: their dtypes are fixed by the codec and the specs, so a module-wide
        cast (``.half()``, ``.to(torch.bfloat16)``) must not turn them into something the codec cannot read."""
        device = fn(torch.zeros((), device=self.device)).device
        return super()._apply(lambda t: t.to(device), recurse)

    def feature(self, key: str) -> Any:
        """A fixed field's buffer [rows, *shape], or a jagged field's ``JaggedColumn``."""
        return getattr(self.host_features if key in self.host_keys else self.features, key)

    @property
    def jagged_fields(self) -> bool:
        """Whether some feature field is jagged (its rows vary in size: they cannot travel as fixed-size bytes)."""
        return bool(self._jagged())

    def _jagged(self) -> list[str]:
        return [k for k, s in self.feature_specs.items() if isinstance(s, JaggedFieldSpec)]

    def _on(self, key: str, slots: torch.Tensor) -> torch.Tensor:
        return slots.cpu() if key in self.host_keys else slots

    # ---- reading ---------------------------------------------------------------------------
    def decode(self, start: int, end: int) -> torch.Tensor:
        """fp32 embeddings of local rows [start, end) (a scoring chunk)."""
        return self.codec.decode(self.embeddings[start:end], self.dim)

    def filled_per_chunk(self, chunk_rows: int) -> list[int]:
        """Filled rows in each scoring chunk (one host sync): full chunks skip the empty-row mask."""
        full, rest = divmod(self.rows, chunk_rows)
        flags = self.filled.view(torch.uint8)  # an int32 sum of bytes: cheaper than a bool sum, which accumulates in int64
        counts = flags[: full * chunk_rows].view(full, chunk_rows).sum(1, dtype=torch.int32)
        if rest:
            counts = torch.cat([counts, flags[full * chunk_rows :].sum(dtype=torch.int32).view(1)])
        return counts.tolist()

    def _field_rows(self, slots: torch.Tensor) -> dict[str, Any]:
        """Every feature field at local ``slots``, on the store's device (``Jagged`` for jagged fields)."""
        out = {}
        for key, spec in self.feature_specs.items():
            f, where = self.feature(key), self._on(key, slots)
            out[key] = (f.read(where) if isinstance(spec, JaggedFieldSpec) else f.index_select(0, where)).to(self.device)
        return out

    def read(self, slots: torch.Tensor) -> FetchedRows:
        """Features, decoded embeddings and ages of local ``slots`` (on the store's device)."""
        return FetchedRows(self._field_rows(slots), self.codec.decode(self.embeddings.index_select(0, slots), self.dim),
                           self.age[slots])

    # ---- packing rows for transfer ---------------------------------------------------------
    def _parts(self) -> list[tuple[str, torch.dtype, tuple[int, ...], int]]:
        """(name, dtype, shape, bytes) of each packed column group: fields (a jagged one: its length),
        the stored embedding, the age."""
        parts = [(k, torch.int64, ()) if isinstance(s, JaggedFieldSpec) else (k, s.dtype, s.shape)
                 for k, s in self.feature_specs.items()]
        parts.append(("__embedding__", self.codec.storage_dtype, (self.codec.width(self.dim),)))
        parts.append(("__age__", torch.int64, ()))
        return [(n, dt, sh, _itemsize(dt) * _numel(sh)) for n, dt, sh in parts]

    def pack(self, slots: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Rows at ``slots``: one uint8 tensor [k, row_bytes] (fixed fields, jagged lengths, stored
        embedding, age) and, per jagged field, the rows' concatenated values."""
        fixed, var = [], {}
        for key, rows in self._field_rows(slots).items():
            if isinstance(rows, Jagged):
                fixed.append(rows.lengths)
                var[key] = rows.values
            else:
                fixed.append(rows)
        fixed += [self.embeddings.index_select(0, slots), self.age[slots]]
        k = slots.numel()
        cols = [t.reshape(k, nbytes // _itemsize(t.dtype)).contiguous().view(torch.uint8)
                for t, (_, _, _, nbytes) in zip(fixed, self._parts())]
        return torch.cat(cols, dim=1), var

    def _columns(self, packed: torch.Tensor) -> dict[str, torch.Tensor]:
        k, out, col = packed.shape[0], {}, 0
        for name, dtype, shape, nbytes in self._parts():
            # clone: a column slice keeps its byte offset, which may not be aligned for ``dtype``
            out[name] = packed[:, col : col + nbytes].clone(memory_format=torch.contiguous_format).view(dtype).reshape(k, *shape)
            col += nbytes
        return out

    def jagged_lengths(self, packed: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per jagged field, the lengths of the packed rows (to size the values' transfer)."""
        cols = self._columns(packed)
        return {k: cols[k] for k in self._jagged()}

    def unpack(self, packed: torch.Tensor, var: Mapping[str, torch.Tensor]) -> FetchedRows:
        """Inverse of :meth:`pack` (on any rank: all ranks share specs and codec)."""
        out = self._columns(packed)
        emb = self.codec.decode(out.pop("__embedding__"), self.dim)
        age = out.pop("__age__")
        for key in self._jagged():
            out[key] = Jagged(out[key], var[key])
        return FetchedRows(out, emb, age)

    def row_bytes(self) -> int:
        """Bytes of one packed row without jagged values (what a fetch moves per sampled row)."""
        return sum(p[3] for p in self._parts())

    # ---- whole-shard views (tests, resharding, checkpoints; not the hot path) -----------------
    def export_rows(self, *, as_stored: bool = False) -> dict[str, torch.Tensor]:
        """Copies of every local row: 'embedding', 'age', 'filled', each fixed field, and each jagged field as
        padded [rows, max_length] (zeros past each length) plus '<key>:lengths'.

        By default the embeddings are decoded to fp32 and every tensor is on the cache device (what
        :meth:`ShardedCacheLossHandler.gather_global_rows` moves). ``as_stored=True``: the embeddings as
        stored (codec-encoded, bit for bit) and each field where it lives (host-resident fields stay on
        the host): what a checkpoint writes and :meth:`import_rows` takes back with ``as_stored=True``.
        """
        embedding = self.embeddings.detach().clone() if as_stored else self.codec.decode(self.embeddings, self.dim)
        out = {"embedding": embedding, "age": self.age.clone(), "filled": self.filled.clone()}
        for key, spec in self.feature_specs.items():
            where = self.feature(key).lengths.device if isinstance(spec, JaggedFieldSpec) else self.feature(key).device
            where = where if as_stored else self.device
            if isinstance(spec, JaggedFieldSpec):
                out[key], out[key + ":lengths"] = (t.to(where) for t in self.feature(key).padded())
            else:
                out[key] = self.feature(key).detach().to(where, copy=True)
        return out

    @torch.no_grad()
    def import_rows(self, rows: Mapping[str, torch.Tensor], *, as_stored: bool = False) -> None:
        """Overwrites every local row from :meth:`export_rows`-shaped tensors (checked before writing).

        ``as_stored=True``: 'embedding' holds stored (codec-encoded) rows, copied bit for bit instead of
        encoded (re-encoding decoded int8/int4 rows would not give the same bytes).
        """
        expected = {"embedding", "age", "filled", *self.feature_specs, *(k + ":lengths" for k in self._jagged())}
        if set(rows) != expected:
            raise ValueError(f"rows must have exactly the keys {sorted(expected)}, got {sorted(rows)}")
        for key, t in rows.items():
            if t.shape[0] != self.rows:
                raise ValueError(f"rows[{key!r}] has {t.shape[0]} rows, the shard has {self.rows}")
        embedding = rows["embedding"].to(self.device)
        self.embeddings.copy_(embedding if as_stored else self.codec.encode(embedding))
        self.age.copy_(rows["age"])
        self.filled.copy_(rows["filled"])
        for key, spec in self.feature_specs.items():
            f = self.feature(key)
            if isinstance(spec, JaggedFieldSpec):
                f.load_padded(rows[key].to(f.values.device), rows[key + ":lengths"].to(f.values.device))
            else:
                f.copy_(rows[key].reshape(f.shape))

    # ---- writing ---------------------------------------------------------------------------
    # Every write runs under no_grad: the buffers hold copies of the values, never a node of the
    # caller's graph (a feature that requires grad would otherwise make them part of it).
    @torch.no_grad()
    def refresh(self, slots: torch.Tensor, embeddings: torch.Tensor, use_lru: bool, *,
                distinct: bool = False) -> torch.Tensor:
        """Writes fresh embeddings in place; with duplicates the first occurrence wins. Returns unique slots.
        ``distinct``: the caller's slots are already unique, so the dedupe is skipped."""
        if not distinct:
            slots, first = first_occurrence(slots)
            embeddings = embeddings.index_select(0, first)
        self.embeddings.index_copy_(0, slots, self.codec.encode(embeddings))
        if use_lru:
            self.age[slots] = -1  # +1 at the end of the step: age 0, like a new item
        return slots

    def oldest_slots(self, n: int) -> torch.Tensor:
        """The n rows to evict, oldest first: empty rows first, then highest age, ties to the lowest slot."""
        return self.eviction_order(self.age, self.filled, n)

    @staticmethod
    def eviction_order(age: torch.Tensor, filled: torch.Tensor, n: int) -> torch.Tensor:
        """The cache policy's eviction order over [rows] ages and filled flags: the n rows to write next,
        oldest first (empty rows first, then highest age, ties to the lowest slot). One order for the engine's
        shards and for ``compat``'s caches.

        One top-n of the ages finds the n-th largest age t; the rows above t are all among the n, and the
        rows at t are taken lowest slot first. (A single int64 sort key folding in the slot would take four
        int64 passes over the shard.)"""
        if n == 0:
            return torch.empty(0, dtype=torch.int64, device=age.device)
        age = age.to(torch.int64)
        # a full shard (the steady state) needs no empty-first key: read on host where that is free (CPU)
        full = age.device.type == "cpu" and bool(filled.all())
        key = age if full else torch.where(filled, age, age + _EMPTY_FIRST)
        values, slots = torch.topk(key, n, sorted=False)
        t = values.min()
        above = slots[values > t]
        at = (key == t).nonzero().squeeze(1)[: n - above.numel()]
        chosen = torch.sort(torch.cat([above, at])).values  # slot order, then a stable sort by age
        return chosen[torch.sort(key[chosen], descending=True, stable=True).indices]

    @torch.no_grad()
    def insert(self, embeddings: torch.Tensor, features: Mapping[str, Any]) -> torch.Tensor:
        """Writes new rows over the oldest ones, item i into the i-th oldest (age -1 before the tick).

        ``features`` holds every field: fixed ones as [n, *shape] tensors, jagged ones as ``Jagged``.
        Returns the slots written.
        """
        slots = self.oldest_slots(embeddings.shape[0])
        self.write(slots, embeddings, features, age=-1)
        return slots

    @torch.no_grad()
    def write(self, slots: torch.Tensor, embeddings: torch.Tensor, features: Mapping[str, Any], age: int) -> None:
        """Writes whole rows (embedding, every feature field) at distinct ``slots``, filled, with age ``age``."""
        self.embeddings.index_copy_(0, slots, self.codec.encode(embeddings))
        for key, spec in self.feature_specs.items():
            f, where = self.feature(key), self._on(key, slots)
            if isinstance(spec, JaggedFieldSpec):
                f.write(where, features[key])
            else:
                f.index_copy_(0, where, features[key].reshape(-1, *spec.shape).to(f.device, f.dtype))
        self.filled[slots] = True
        self.age[slots] = age

    @torch.no_grad()
    def clear(self) -> None:
        """Every row empty (age 0): the state before a corpus prefill."""
        self.filled.zero_()
        self.age.zero_()

    def stalest_slots(self, n: int) -> torch.Tensor:
        """Up to n filled rows with the highest age (the longest since last encoded), ties to the lowest slot."""
        n = min(n, int(self.filled.sum()))
        if n <= 0:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        key = torch.where(self.filled, self.age, -1)
        order = torch.sort(key, descending=True, stable=True).indices
        return order[:n]

    def tick(self) -> None:
        """End of an update call: every row is one call older."""
        self.age += 1
