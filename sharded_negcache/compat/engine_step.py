"""Runs one step of the sharded engine over a cache shard that the caller owns (the compat distributed loss).

The reference's API is functional: the loss reads the cache and *returns* the updates, and the
caller applies them with ``CacheManager``. So the engine reads this rank's rows in place, without
copying (``ShardStore.from_tensors``: a store over the caller's tensors), and runs
:meth:`ShardedCacheLossHandler.score`, the engine's "score and sample without writing" step: every
query scored against every rank's shard, exact merge of the partials, the sampled rows fetched from
their owners and re-encoded, and with ``return_refreshes`` the fresh embeddings sent back to their
owners, which receive them as ``StepResult.refreshes`` for the caller to write. The engine inserts
nothing (the caller inserts its own positives); the step that keys the random numbers is counted
here, one per call.

Each query's fresh negative (with gradient) is the tower's output for its sampled row. To find it,
every row carries its global row id in one more feature field (``ROW_ID``), read by the tower wrapper
and stripped before the caller's network sees the rows: nothing depends on the order in which the
engine hands rows to the tower.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as dist

from ..handler import ShardedCacheLossHandler
from ..specs import FieldSpec
from ..store import ShardStore
from ..topology import is_distributed

__all__ = ["EngineOutcome", "EngineStep", "ROW_ID"]

ROW_ID = "compat_row_id"  # the extra feature field: each cached row's global row id


@dataclass
class EngineOutcome:
    """Per query of this rank: P, -log P, staleness (NaN if nothing sampled), the fresh negative (with grad)."""

    prob_positive: torch.Tensor  # [B]
    interpretable_loss: torch.Tensor  # [B]
    staleness: torch.Tensor  # [B]
    sampled: torch.Tensor  # [B] bool
    fresh_negatives: torch.Tensor  # [B, d], zero rows where nothing was sampled
    refreshed_slots: torch.Tensor  # local rows of this shard that some rank re-encoded
    refreshed_embeddings: torch.Tensor  # their fresh embeddings (detached)


class _Tower:
    """The caller's document network as the engine calls it: the row-id field is stripped from the rows and
    kept, with the network's output, so each output row is known by its global id."""

    def __init__(self, fn: Callable[[dict[str, torch.Tensor]], torch.Tensor]) -> None:
        self.fn = fn
        self.ids: torch.Tensor | None = None
        self.output: torch.Tensor | None = None

    def __call__(self, data: dict[str, torch.Tensor]) -> torch.Tensor:
        self.ids = data[ROW_ID].reshape(-1)
        self.output = self.fn({k: v for k, v in data.items() if k != ROW_ID})
        return self.output

    def rows_of(self, ids: torch.Tensor) -> torch.Tensor:
        """The output rows of the given global row ids (every one must have been encoded)."""
        if self.ids is None or self.output is None or self.ids.numel() == 0:
            raise RuntimeError("the engine sampled rows but did not re-encode them")
        order = torch.argsort(self.ids)
        at = order[torch.searchsorted(self.ids[order], ids).clamp(max=self.ids.numel() - 1)]
        if not bool((self.ids[at] == ids).all()):
            raise RuntimeError("the engine did not re-encode every sampled row")
        return self.output[at]


def world_size(group: dist.ProcessGroup | None) -> int:
    return dist.get_world_size(group) if is_distributed() else 1


class EngineStep:
    """One engine per cache layout, reused across calls (its step counter keys the randomness)."""

    def __init__(self) -> None:
        self._engine: ShardedCacheLossHandler | None = None
        self._key: tuple | None = None
        self._step = 0
        self._ages: torch.Tensor | None = None  # zeros: ages are not part of the loss
        self._row_ids: torch.Tensor | None = None  # [rows] this shard's global row ids

    def run(
        self,
        doc_network: Callable[[dict[str, torch.Tensor]], torch.Tensor],
        query_embeddings: torch.Tensor,
        pos_doc_embeddings: torch.Tensor,
        embeddings: torch.Tensor,
        features: Mapping[str, torch.Tensor],
        filled: torch.Tensor,
        *,
        embedding_key: str,
        data_keys: Sequence[str],
        score_transform: Callable[[torch.Tensor], torch.Tensor] | None,
        top_k: int | None,
        seed: int,
        process_group: dist.ProcessGroup | None,
    ) -> EngineOutcome:
        """Loss partials of this rank's queries against the shards of every rank; nothing is written."""
        if ROW_ID in data_keys or ROW_ID == embedding_key:
            raise ValueError(f"{ROW_ID!r} names the row ids the distributed loss adds to the cache rows; rename "
                             "that cache field")
        engine = self._engine_for(
            embeddings, features, embedding_key, data_keys, score_transform, top_k, seed, process_group
        )
        fields = {**{k: features[k] for k in data_keys}, ROW_ID: self._row_ids}
        engine.store = store = ShardStore.from_tensors(embeddings, fields, filled.to(torch.bool), self._ages)
        batch = query_embeddings.shape[0]
        placeholders = {  # the engine validates the positives' features; score() inserts nothing
            k: torch.zeros((batch, *s.shape), dtype=s.dtype, device=embeddings.device)
            for k, s in store.feature_specs.items()
        }
        tower = _Tower(doc_network)
        res = engine.score(tower, query_embeddings, pos_doc_embeddings, placeholders,
                           step=self._step, return_refreshes=True)
        self._step += 1
        rows = res.sampled_rows[:, 0]
        sampled = rows >= 0
        fresh = query_embeddings.new_zeros((batch, embeddings.shape[1]))
        if bool(sampled.any()):
            fresh = fresh.index_put((sampled.nonzero().squeeze(1),), tower.rows_of(rows[sampled]).to(fresh.dtype))
        assert res.refreshes is not None  # score(return_refreshes=True) always returns them
        slots, written = res.refreshes
        return EngineOutcome(
            prob_positive=res.prob_positive,
            interpretable_loss=res.interpretable_loss,
            staleness=res.staleness[:, 0],
            sampled=sampled,
            fresh_negatives=fresh,
            refreshed_slots=slots,
            refreshed_embeddings=written.to(embeddings.dtype),
        )

    def _engine_for(
        self,
        embeddings: torch.Tensor,
        features: Mapping[str, torch.Tensor],
        embedding_key: str,
        data_keys: Sequence[str],
        score_transform: Any,
        top_k: int | None,
        seed: int,
        process_group: dist.ProcessGroup | None,
    ) -> ShardedCacheLossHandler:
        if embeddings.dim() != 2:
            raise ValueError(f"cache field {embedding_key!r} must be [rows, d], got {list(embeddings.shape)}")
        rows, dim = embeddings.shape
        feature_specs = {k: FieldSpec(tuple(features[k].shape[1:]), features[k].dtype) for k in data_keys}
        key = (rows, dim, embeddings.dtype, embeddings.device, tuple(feature_specs.items()),
               id(score_transform), top_k, seed, id(process_group))
        if key != self._key:
            specs = {embedding_key: FieldSpec((dim,), embeddings.dtype), **feature_specs,
                     ROW_ID: FieldSpec((), torch.int64)}
            engine = ShardedCacheLossHandler(
                specs, rows * world_size(process_group), embedding_key, (*data_keys, ROW_ID), score_transform,
                top_k, num_negatives=1, seed=seed, process_group=process_group, device="meta",
                embedding_codec=embeddings.dtype,
            )
            for name, buf in list(engine.named_buffers(recurse=False)):  # counters: off the meta device
                setattr(engine, name, torch.zeros_like(buf, device=embeddings.device))
            self._engine, self._key, self._step = engine, key, 0
            self._ages = torch.zeros(rows, dtype=torch.int64, device=embeddings.device)
            self._row_ids = engine.layout.to_global(torch.arange(rows, device=embeddings.device))
        assert self._engine is not None
        return self._engine
