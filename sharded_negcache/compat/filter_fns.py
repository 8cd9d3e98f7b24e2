"""Filters of the reference: masks of new items worth adding to a cache."""
from __future__ import annotations

import abc
from typing import Mapping, Sequence

import torch

from .negative_cache import NegativeCache

__all__ = ["CacheFilterFn", "IsInCacheFilterFn"]


class CacheFilterFn(metaclass=abc.ABCMeta):
    """Maps (cache, new_items) to a [n] bool mask, True for items to add."""

    @abc.abstractmethod
    def __call__(self, cache: NegativeCache, new_items: Mapping[str, torch.Tensor]) -> torch.Tensor:
        ...


class IsInCacheFilterFn(CacheFilterFn):
    """True for new items that no filled cache row matches exactly on every one of ``keys``.

    Fields may be scalar per row ([rows]) or of any shape ([rows, ...]); rows marked unfilled are
    never a match (an empty zero row is not a cached document).
    """

    def __init__(self, keys: Sequence[str]) -> None:
        if isinstance(keys, str) or not keys:
            raise ValueError(f"keys must be a non-empty sequence of field names, e.g. ('id',), got {keys!r}")
        self.keys = tuple(keys)

    def __call__(self, cache: NegativeCache, new_items: Mapping[str, torch.Tensor]) -> torch.Tensor:
        match: torch.Tensor | None = None
        for key in self.keys:
            if key not in cache.data:
                raise ValueError(f"IsInCacheFilterFn key {key!r} is not in cache.data {sorted(cache.data)}")
            if key not in new_items:
                raise ValueError(f"IsInCacheFilterFn key {key!r} is not in new_items {sorted(new_items)}")
            cached, new = cache.data[key], new_items[key]
            if cached.shape[1:] != new.shape[1:]:
                raise ValueError(
                    f"new_items[{key!r}] rows have shape {list(new.shape[1:])}, the cache's {list(cached.shape[1:])}"
                )
            cached = cached.reshape(cached.shape[0], -1)
            new = new.to(cached.device).reshape(new.shape[0], -1)
            same = (new[:, None, :] == cached[None, :, :]).all(dim=-1)  # [n, rows]
            match = same if match is None else match & same
        filled = getattr(cache, "filled", None)
        if filled is not None:
            match = match & filled.to(match.device)[None, :]
        return ~match.any(dim=1)
