"""The reference's cache state and its FIFO/LRU update rule, vectorised (``negative_cache.negative_cache``).

``NegativeCache(data, age)`` is the state; ``CacheManager`` creates it and applies one update call:
refresh the given rows first (LRU: their age resets), then write the new items over the oldest rows
(empty rows first, then the highest age, ties to the lowest slot), then every age grows by one.
"""
from __future__ import annotations

import collections
from typing import Any, Mapping, Sequence

import torch

from ..specs import FieldSpec
from ..store import ShardStore

__all__ = ["FixedLenFeature", "NegativeCache", "CacheManager", "CacheUpdateError"]

FixedLenFeature = collections.namedtuple("FixedLenFeature", ["shape", "dtype", "default_value"], defaults=[None])
FixedLenFeature.__doc__ = "Spec of one cached field (as tf.io.FixedLenFeature): per-row ``shape`` and ``dtype``."


class CacheUpdateError(ValueError, IndexError):
    """Bad update input. An IndexError too, because the reference raised IndexError for mismatched row counts."""


_CacheFields = collections.namedtuple("NegativeCache", ["data", "age"])


class NegativeCache(_CacheFields):
    """One cache: ``data`` (field -> [rows, ...] tensor) and ``age`` ([rows] update calls since written).

    Still the reference's two-field tuple. ``filled`` ([rows] bool, optional) marks rows that hold a
    document; ``None`` means every row does (a cache written by hand, as in the reference's tests).
    """

    filled: torch.Tensor | None

    def __new__(cls, data: Mapping[str, torch.Tensor], age: Any, filled: torch.Tensor | None = None) -> "NegativeCache":
        self = super().__new__(cls, data, age)
        self.filled = filled
        return self

    def __getnewargs__(self) -> tuple:  # pickling keeps ``filled``
        return (self.data, self.age, self.filled)

    @classmethod
    def _make(cls, iterable: Any) -> "NegativeCache":
        return cls(*iterable)

    def _replace(self, **changes: Any) -> "NegativeCache":
        fields = {"data": self.data, "age": self.age, "filled": self.filled}
        unknown = set(changes) - set(fields)
        if unknown:
            raise ValueError(f"NegativeCache has no fields {sorted(unknown)}")
        fields.update(changes)
        return NegativeCache(**fields)

    def __repr__(self) -> str:
        shapes = {k: tuple(v.shape) for k, v in self.data.items()}
        age = getattr(self.age, "shape", self.age)
        return f"NegativeCache(data={shapes}, age={age}, filled={self.filled is not None})"

    @property
    def num_rows(self) -> int:
        """Rows of the cache (read from the first data field)."""
        return next(iter(self.data.values())).shape[0]

    def to(self, device: torch.device | str) -> "NegativeCache":
        """A copy with every tensor on ``device`` (dtypes unchanged: integer fields stay integer)."""
        age = self.age.to(device) if isinstance(self.age, torch.Tensor) else self.age
        filled = self.filled.to(device) if self.filled is not None else None
        return NegativeCache({k: v.to(device) for k, v in self.data.items()}, age, filled)


def normalize_spec_shapes(specs: Mapping[str, Any]) -> dict[str, FieldSpec]:
    """Specs as FieldSpec; shapes may be lists, tuples, ``torch.Size`` or an int (the reference needed lists)."""
    if not isinstance(specs, Mapping) or not specs:
        raise ValueError(f"specs must be a non-empty dict of FixedLenFeature, got {specs!r}")
    out: dict[str, FieldSpec] = {}
    for key, spec in specs.items():
        if not (hasattr(spec, "shape") and hasattr(spec, "dtype")):
            raise TypeError(f"specs[{key!r}] must have shape and dtype (e.g. FixedLenFeature), got {spec!r}")
        shape = (spec.shape,) if isinstance(spec.shape, int) else spec.shape
        try:
            out[key] = FieldSpec(tuple(shape), spec.dtype)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"specs[{key!r}]: {exc}") from None
    return out


def fit_rows(value: Any, name: str, spec: FieldSpec, rows: int, device: torch.device) -> torch.Tensor:
    """``value`` as [rows, *spec.shape] of the spec dtype on ``device``.

    Shorter trailing dims are right-padded with zeros (as the reference did for short token rows);
    a [rows] tensor fills a (1,) field; integers are cast; floats into an integer field are refused.
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() == 0 or value.shape[0] != rows:
        got = value.shape[0] if value.dim() else "a scalar"
        raise CacheUpdateError(f"{name} must have {rows} rows (one per item), got {got}")
    if value.is_floating_point() and not spec.dtype.is_floating_point:
        raise TypeError(f"{name} is {value.dtype} but the spec dtype is {spec.dtype}: refusing a lossy cast")
    if spec.shape == (1,) and value.dim() == 1:
        value = value.unsqueeze(1)
    tail = tuple(value.shape[1:])
    if tail != spec.shape:
        if len(tail) != len(spec.shape) or any(t > s for t, s in zip(tail, spec.shape)):
            raise CacheUpdateError(
                f"{name} must have rows of shape {list(spec.shape)} (or shorter, zero-padded), got {list(tail)}"
            )
        padded = torch.zeros((rows, *spec.shape), dtype=spec.dtype, device=device)
        padded[(slice(None), *(slice(0, t) for t in tail))] = value.to(device=device, dtype=spec.dtype)
        return padded
    return value.to(device=device, dtype=spec.dtype)


def _as_index(indices: Any, name: str, device: torch.device) -> torch.Tensor:
    idx = torch.as_tensor(indices, device=device)
    if idx.is_floating_point() or idx.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer row indices, got {idx.dtype}")
    return idx.reshape(-1).to(torch.int64)


def _as_mask(mask: Any, rows: int, name: str, device: torch.device) -> torch.Tensor:
    if mask is None:
        return torch.ones(rows, dtype=torch.bool, device=device)
    m = torch.as_tensor(mask, device=device).reshape(-1)
    if m.numel() != rows:
        raise CacheUpdateError(f"{name} has {m.numel()} entries, expected {rows}")
    return m.to(torch.bool)


def _last_occurrence(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique ``keys`` and the position of each one's last occurrence (the reference's loop let the last write win)."""
    uniq, inverse = torch.unique(keys, return_inverse=True)
    pos = torch.arange(keys.numel(), device=keys.device)
    last = torch.full_like(uniq, -1).scatter_reduce_(0, inverse, pos, reduce="amax")
    return uniq, last


class CacheManager:
    """Creates a cache from ``specs`` and applies update calls (FIFO, or LRU with ``use_lru``)."""

    def __init__(self, specs: Mapping[str, Any], cache_size: int, use_lru: bool = True) -> None:
        self.specs = specs
        self.field_specs = normalize_spec_shapes(specs)
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size <= 0:
            raise ValueError(f"cache_size must be a positive int, got {cache_size!r}")
        self.cache_size = cache_size
        self.use_lru = bool(use_lru)

    def init_cache(self, device: torch.device | str | None = None) -> NegativeCache:
        """Zero data, zero int32 ages and no filled row (on ``device``, CPU by default)."""
        data = {
            k: torch.zeros((self.cache_size, *s.shape), dtype=s.dtype, device=device)
            for k, s in self.field_specs.items()
        }
        age = torch.zeros(self.cache_size, dtype=torch.int32, device=device)
        return NegativeCache(data, age, torch.zeros(self.cache_size, dtype=torch.bool, device=device))

    def update_cache(
        self,
        cache: NegativeCache,
        *,
        new_items: Mapping[str, torch.Tensor] | None = None,
        new_items_mask: torch.Tensor | None = None,
        updated_item_data: Mapping[str, torch.Tensor] | None = None,
        updated_item_indices: torch.Tensor | None = None,
        updated_item_mask: torch.Tensor | None = None,
    ) -> NegativeCache:
        """The cache after one update call; ``cache`` itself is left unchanged.

        ``updated_item_*``: rows to overwrite first (masked entries skipped; with duplicate indices the
        last unmasked entry wins). ``new_items`` (every spec field) then replace the oldest rows, the
        j-th unmasked item going to the j-th oldest row. Written rows get age 0, all others age + 1.
        """
        state = self._checked(cache)
        data = {k: v.clone() for k, v in state.data.items()}
        filled = state.filled.clone() if state.filled is not None else None
        out = NegativeCache(data, state.age.clone(), filled)
        self.apply_update_(
            out,
            new_items=new_items,
            new_items_mask=new_items_mask,
            updated_item_data=updated_item_data,
            updated_item_indices=updated_item_indices,
            updated_item_mask=updated_item_mask,
        )
        return out

    def _checked(self, cache: NegativeCache) -> NegativeCache:
        if not isinstance(cache, tuple) or not hasattr(cache, "data") or not hasattr(cache, "age"):
            raise TypeError(f"cache must be a NegativeCache, got {type(cache).__name__}")
        if set(cache.data) != set(self.field_specs):
            raise ValueError(
                f"cache.data keys {sorted(cache.data)} differ from the spec keys {sorted(self.field_specs)}"
            )
        rows = {k: v.shape[0] for k, v in cache.data.items()}
        if len(set(rows.values())) != 1:
            raise ValueError(f"cache.data fields have different row counts: {rows}")
        n = next(iter(rows.values()))
        device = next(iter(cache.data.values())).device
        age = torch.as_tensor(cache.age, device=device)
        if age.shape != (n,):
            raise ValueError(f"cache.age must have shape [{n}], got {list(age.shape)}")
        filled = getattr(cache, "filled", None)
        if filled is not None and tuple(filled.shape) != (n,):
            raise ValueError(f"cache.filled must have shape [{n}], got {list(filled.shape)}")
        return NegativeCache(cache.data, age, filled)

    def apply_update_(
        self,
        cache: NegativeCache,
        *,
        new_items: Mapping[str, torch.Tensor] | None = None,
        new_items_mask: torch.Tensor | None = None,
        updated_item_data: Mapping[str, torch.Tensor] | None = None,
        updated_item_indices: torch.Tensor | None = None,
        updated_item_mask: torch.Tensor | None = None,
    ) -> None:
        """:meth:`update_cache` writing into ``cache``'s own tensors (the handler's buffers). Checks before writing."""
        if not isinstance(cache.age, torch.Tensor) or cache.age.dim() != 1:
            raise TypeError("cache.age must be a 1-D tensor for an in-place update")
        n_rows, device = cache.age.shape[0], cache.age.device
        refresh = self._prepare_refresh(updated_item_data, updated_item_indices, updated_item_mask, n_rows, device)
        insert = self._prepare_insert(new_items, new_items_mask, n_rows, device)
        if refresh is not None:
            rows, values = refresh
            for key, value in values.items():
                cache.data[key][rows] = value
            if self.use_lru:
                cache.age[rows] = -1  # the +1 below makes it 0, like a new item
        if insert is not None:
            values, count = insert
            filled = cache.filled if cache.filled is not None else torch.ones_like(cache.age, dtype=torch.bool)
            slots = ShardStore.eviction_order(cache.age, filled, count)  # the engine's order
            for key, value in values.items():
                cache.data[key][slots] = value
            cache.age[slots] = -1
            if cache.filled is not None:
                cache.filled[slots] = True
        cache.age.add_(1)

    def _prepare_refresh(
        self,
        data: Mapping[str, torch.Tensor] | None,
        indices: Any,
        mask: Any,
        n_rows: int,
        device: torch.device,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        """Unique target rows and the values to write there, after masks and duplicates."""
        if data is None and indices is None:
            return None
        if indices is None:
            raise ValueError("updated_item_data was given without updated_item_indices")
        data = {} if data is None else data
        unknown = set(data) - set(self.field_specs)
        if unknown:
            raise ValueError(
                f"updated_item_data keys {sorted(unknown)} are not in the cache specs {sorted(self.field_specs)}"
            )
        idx = _as_index(indices, "updated_item_indices", device)
        keep = _as_mask(mask, idx.numel(), "updated_item_mask", device)
        values = {
            k: fit_rows(v, f"updated_item_data[{k!r}]", self.field_specs[k], idx.numel(), device)
            for k, v in data.items()
        }
        positions = keep.nonzero().squeeze(1)
        rows = idx[positions]
        if rows.numel() and (rows.min() < 0 or rows.max() >= n_rows):
            raise CacheUpdateError(
                f"updated_item_indices must lie in [0, {n_rows}) where unmasked, got {rows.tolist()}"
            )
        rows, last = _last_occurrence(rows)
        return rows, {k: v[positions[last]] for k, v in values.items()}

    def _prepare_insert(
        self, items: Mapping[str, torch.Tensor] | None, mask: Any, n_rows: int, device: torch.device
    ) -> tuple[dict[str, torch.Tensor], int] | None:
        """The unmasked new items, in order, and how many rows they take."""
        if items is None:
            return None
        if set(items) != set(self.field_specs):
            raise ValueError(
                f"Value `new_items` must have the same keys ({sorted(items)}) as the cache specs "
                f"({sorted(self.field_specs)})"
            )
        first = next(iter(items.values()))
        count = first.shape[0] if isinstance(first, torch.Tensor) and first.dim() else -1
        values = {k: fit_rows(v, f"new_items[{k!r}]", self.field_specs[k], count, device) for k, v in items.items()}
        if count > n_rows:
            raise CacheUpdateError(f"new_items has {count} rows, more than the {n_rows} rows of the cache")
        keep = _as_mask(mask, count, "new_items_mask", device)
        positions = keep.nonzero().squeeze(1)
        return {k: v[positions] for k, v in values.items()}, positions.numel()


def as_cache_dict(cache: Any, name: str = "cache") -> dict[str, NegativeCache]:
    """The reference's losses take ``{source: NegativeCache}``; returns it with sorted keys after checks."""
    if not isinstance(cache, Mapping) or not cache:
        raise TypeError(
            f"{name} must be a non-empty dict of NegativeCache (e.g. {{'cache': cache}}), got {type(cache).__name__}"
        )
    for key, value in cache.items():
        if not hasattr(value, "data") or not isinstance(value.data, Mapping):
            raise TypeError(f"{name}[{key!r}] must be a NegativeCache, got {type(value).__name__}")
    return {k: cache[k] for k in sorted(cache)}


def concat_sources(
    caches: Mapping[str, NegativeCache], keys: Sequence[str], name: str = "cache"
) -> tuple[dict[str, torch.Tensor], torch.Tensor, list[int]]:
    """Fields ``keys`` of several caches concatenated in sorted source order, the filled mask, and the row offsets.

    A single source is returned without a copy.
    """
    data: dict[str, torch.Tensor] = {}
    for key in keys:
        parts = []
        for src, c in caches.items():
            if key not in c.data:
                raise ValueError(f"{name}[{src!r}].data has no field {key!r} (fields: {sorted(c.data)})")
            parts.append(c.data[key])
        data[key] = parts[0] if len(parts) == 1 else torch.cat(parts)
    sizes = [c.data[keys[0]].shape[0] for c in caches.values()]
    device = data[keys[0]].device
    filled = [
        torch.ones(n, dtype=torch.bool, device=device) if getattr(c, "filled", None) is None else c.filled.to(device)
        for c, n in zip(caches.values(), sizes)
    ]
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)
    return data, filled[0] if len(filled) == 1 else torch.cat(filled), offsets
