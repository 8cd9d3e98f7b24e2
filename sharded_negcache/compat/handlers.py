"""``CacheLossHandler`` with the reference's API: one call computes the cache loss and updates the cache.

The cache lives in module buffers (``state_dict`` holds it, ``.to()`` moves it). Without
``use_cross_replica`` and with a single-process loss, every rank keeps its own independent cache, as
in the reference. With ``DistributedCacheClassificationLoss`` or ``use_cross_replica=True`` the step runs
on the sharded engine and ``handler.cache`` is this rank's shard of one cache spread over the ranks:
* distributed loss, ``use_cross_replica=False``: each rank holds ``cache_size`` rows (global W·cache_size);
* ``use_cross_replica=True`` (either loss): ``cache_size`` is the global size, each rank holds cache_size / W.
Each rank inserts its own positives into its own shard; sampled rows are refreshed in their owner's shard.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from .. import metrics
from .engine_step import world_size
from .losses import CacheClassificationLoss, CacheLoss, CacheLossReturn, DistributedCacheClassificationLoss
from .negative_cache import CacheManager, NegativeCache

__all__ = ["CacheLossHandler"]

_CACHE_KEY = "cache"
_SYNCED = ("score_transform", "top_k", "reducer", "retrieval_fn")


class _CacheBuffers(nn.Module):
    """A NegativeCache held as buffers: data fields, age and filled flags."""

    def __init__(self, cache: NegativeCache) -> None:
        super().__init__()
        self.keys = tuple(cache.data)
        self.data = nn.Module()
        for key, value in cache.data.items():
            if not key or "." in key:
                raise ValueError(f"cache field name {key!r} must be non-empty and contain no '.' (it names a buffer)")
            self.data.register_buffer(key, value)
        self.register_buffer("age", cache.age)
        self.register_buffer("filled", cache.filled)

    def view(self) -> NegativeCache:
        """The live tensors (no copy) as a NegativeCache."""
        return NegativeCache({k: getattr(self.data, k) for k in self.keys}, self.age, self.filled)


class CacheLossHandler(nn.Module):
    """Computes the cache loss with ``cache_loss``, logs its summaries and updates the cache, in one call."""

    def __init__(
        self,
        cache_manager: CacheManager,
        cache_loss: CacheLoss | Callable[..., CacheLossReturn],
        embedding_key: str,
        data_keys: Sequence[str],
        use_cross_replica: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(cache_manager, CacheManager):
            raise TypeError(f"cache_manager must be a compat CacheManager, got {type(cache_manager).__name__}")
        if not callable(cache_loss):
            raise TypeError(f"cache_loss must be a cache loss (callable), got {type(cache_loss).__name__}")
        if isinstance(data_keys, str) or not data_keys:
            raise TypeError(f"data_keys must be a non-empty sequence of keys, e.g. ('input_ids',), got {data_keys!r}")
        expected = {embedding_key, *data_keys}
        if set(cache_manager.field_specs) != expected:
            raise ValueError(
                f"cache_manager specs {sorted(cache_manager.field_specs)} must be exactly embedding_key + data_keys "
                f"{sorted(expected)}"
            )
        self.cache_manager = cache_manager
        self.cache_loss = cache_loss
        self.embedding_key = embedding_key
        self.data_keys = tuple(data_keys)
        self.use_cross_replica = bool(use_cross_replica)
        self._loss, self._manager, self._world = self._plan()
        self._cache = _CacheBuffers(self._manager.init_cache())
        self._device_fixed = False
        self._steps = 0

    def _plan(self) -> tuple[Any, CacheManager, int | None]:
        """Which loss runs the step, the manager of this rank's rows, and the world size they were sized for."""
        loss, manager = self.cache_loss, self.cache_manager
        if isinstance(loss, DistributedCacheClassificationLoss) and not self.use_cross_replica:
            return loss, manager, world_size(loss.process_group)
        if not self.use_cross_replica:
            return loss, manager, None
        if isinstance(loss, CacheClassificationLoss):
            loss = DistributedCacheClassificationLoss(loss.embedding_key, loss.data_keys)
        elif not isinstance(loss, DistributedCacheClassificationLoss):
            raise TypeError(
                "use_cross_replica=True needs a compat CacheClassificationLoss or DistributedCacheClassificationLoss "
                f"(it runs on the sharded engine), got {type(self.cache_loss).__name__}"
            )
        world = world_size(loss.process_group)
        if manager.cache_size % world:
            raise ValueError(
                f"cache_size={manager.cache_size} must divide by the world size {world} with use_cross_replica=True "
                "(it is the global cache size, sharded across the ranks)"
            )
        return loss, CacheManager(manager.specs, manager.cache_size // world, manager.use_lru), world

    @property
    def cache(self) -> NegativeCache:
        """This rank's rows (the whole cache when not sharded), as live tensors."""
        return self._cache.view()

    def update_cache_and_compute_loss(
        self,
        item_network: Callable[[dict[str, torch.Tensor]], torch.Tensor],
        query_embeddings: torch.Tensor,
        pos_item_embeddings: torch.Tensor,
        features: Mapping[str, torch.Tensor],
        writer: Any = None,
        return_topk: int = 0,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """The training loss (and the top-k candidates' features when ``return_topk`` > 0); updates the cache.

        ``writer``: a ``(SummaryWriter, global_step)`` tuple as in the reference, or a SummaryWriter.
        """
        if isinstance(return_topk, bool) or not isinstance(return_topk, int) or return_topk < 0:
            raise ValueError(f"return_topk must be an int >= 0, got {return_topk!r}")
        if self._world is not None and world_size(self._loss.process_group) != self._world:
            raise RuntimeError(
                f"the cache was sharded for world size {self._world}; create the handler after init_process_group"
            )
        self._follow_device(query_embeddings)
        if self._loss is not self.cache_loss:  # use_cross_replica with a CacheClassificationLoss: follow its settings
            for name in _SYNCED:
                setattr(self._loss, name, getattr(self.cache_loss, name))
        result = self._loss(
            doc_network=item_network,
            query_embeddings=query_embeddings,
            pos_doc_embeddings=pos_item_embeddings,
            cache={_CACHE_KEY: self.cache},
            return_topk=return_topk,
        )
        self._log(writer, result)
        self._manager.apply_update_(
            self.cache,
            new_items=self._new_items(pos_item_embeddings, features),
            updated_item_data=_source(result.updated_item_data),
            updated_item_indices=_source(result.updated_item_indices),
            updated_item_mask=_source(result.updated_item_mask),
        )
        self._steps += 1
        return (result.training_loss, result.topk_features) if return_topk else result.training_loss

    forward = update_cache_and_compute_loss

    def _follow_device(self, query_embeddings: Any) -> None:
        """Before the first step the cache moves to the queries' device (later, ``.to()`` moves it)."""
        if self._device_fixed or not isinstance(query_embeddings, torch.Tensor):
            return
        if query_embeddings.device != self._cache.age.device:
            self._cache.to(query_embeddings.device)
        self._device_fixed = True

    def _new_items(self, embeddings: torch.Tensor, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not isinstance(features, Mapping):
            raise TypeError(f"features must be a dict of tensors, got {type(features).__name__}")
        missing = [k for k in self.data_keys if k not in features]
        if missing:
            raise ValueError(f"features lacks the data_keys {missing} (has {sorted(features)})")
        items = {k: features[k] for k in self.data_keys}
        items[self.embedding_key] = embeddings.detach()
        return items

    def _log(self, writer: Any, result: CacheLossReturn) -> None:
        """Writes the interpretable loss and staleness, like the reference (every rank that passes a writer)."""
        log_to, step = metrics.resolve_writer(writer, self._steps)
        if log_to is None:
            return
        for name in ("interpretable_loss", "staleness"):
            value = getattr(result, name)
            value = float(value.detach().float().nanmean()) if isinstance(value, torch.Tensor) else float(value)
            if not math.isnan(value):
                log_to.add_scalar(metrics.TAGS[name], value, step)


def _source(per_source: Mapping[str, Any] | None) -> Any:
    """The handler's single source out of a loss's per-source dict (None when the loss returned none)."""
    return None if per_source is None else per_source.get(_CACHE_KEY)
