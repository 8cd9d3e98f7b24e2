"""Cache classification losses with the reference's API (``negative_cache.losses``).

Both losses compute, per query, ``P = softmax([s⁺, cache scores])₀`` (no gradient) and the training
loss ``(1 − P)·(s⁻ − s⁺)`` with one negative s⁻ drawn from the cache softmax and re-encoded by the
document network. ``CacheClassificationLoss`` does it in this process over the whole score matrix
(the reference's algorithm, block-max ``top_k`` included); ``DistributedCacheClassificationLoss`` runs
the sharded engine over every rank's cache (exact, chunked, refreshes returned to the owner shard).
"""
from __future__ import annotations

import abc
import collections
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import retrieval_fns, util
from .engine_step import EngineStep
from .negative_cache import NegativeCache, as_cache_dict, concat_sources

__all__ = ["CacheLossReturn", "CacheLoss", "CacheClassificationLoss", "DistributedCacheClassificationLoss"]

STALENESS_EPS = 1e-12

CacheLossReturn = collections.namedtuple(
    "CacheLossReturn",
    [
        "training_loss",
        "interpretable_loss",
        "updated_item_data",
        "updated_item_indices",
        "updated_item_mask",
        "staleness",
        "topk_features",
    ],
)
CacheLossReturn.__doc__ = "A cache loss's result: losses, per-source cache refreshes, staleness, top-k features."

Reducer = Callable[[torch.Tensor], torch.Tensor]
DocNetwork = Callable[[dict[str, torch.Tensor]], torch.Tensor]


class CacheLoss(metaclass=abc.ABCMeta):
    """A callable ``(doc_network, query_embeddings, pos_doc_embeddings, cache, return_topk) -> CacheLossReturn``."""

    @abc.abstractmethod
    def __call__(
        self,
        doc_network: DocNetwork,
        query_embeddings: torch.Tensor,
        pos_doc_embeddings: torch.Tensor,
        cache: Mapping[str, NegativeCache],
        return_topk: int = 0,
    ) -> CacheLossReturn:
        ...

    # ``retrieval_fn`` ([B, C'] scores -> [B, 1] indices) picks the sampled rows; the reference spelled this seam
    # ``_retrieval_fn``, so that name reads and replaces the same attribute.
    retrieval_fn: Callable[[torch.Tensor], torch.Tensor]

    @property
    def _retrieval_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return self.retrieval_fn

    @_retrieval_fn.setter
    def _retrieval_fn(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.retrieval_fn = fn


def _check_settings(
    embedding_key: Any, data_keys: Any, score_transform: Any, top_k: Any, reducer: Any
) -> tuple[str, ...]:
    if not isinstance(embedding_key, str):
        raise TypeError(f"embedding_key must be a str, got {embedding_key!r}")
    if isinstance(data_keys, str) or not data_keys:
        raise TypeError(f"data_keys must be a non-empty sequence of keys, e.g. ('input_ids',), got {data_keys!r}")
    if score_transform is not None and not callable(score_transform):
        raise TypeError(f"score_transform must be None or a callable, got {score_transform!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if reducer is not None and not callable(reducer):
        raise TypeError(f"reducer must be None or a callable such as torch.mean, got {reducer!r}")
    return tuple(data_keys)


def _score(q: torch.Tensor, d: torch.Tensor, transform: Callable | None) -> torch.Tensor:
    scores = (q * d).sum(dim=1)
    return transform(scores) if transform is not None else scores


def _check_batch(query_embeddings: Any, pos_doc_embeddings: Any) -> None:
    for name, t in (("query_embeddings", query_embeddings), ("pos_doc_embeddings", pos_doc_embeddings)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a [batch, d] tensor, got {getattr(t, 'shape', type(t).__name__)}")
    if query_embeddings.shape != pos_doc_embeddings.shape:
        raise ValueError(
            f"query_embeddings {list(query_embeddings.shape)} and pos_doc_embeddings "
            f"{list(pos_doc_embeddings.shape)} differ"
        )


def _reduce(reducer: Reducer | None, training: torch.Tensor, interpretable: torch.Tensor,
            staleness: torch.Tensor, sampled: torch.Tensor) -> tuple[Any, Any, Any]:
    """Applies the reducer; staleness is reduced over the queries that sampled a row (0 if none did)."""
    if reducer is None:
        return training, interpretable, staleness
    stale = reducer(staleness[sampled]) if bool(sampled.any()) else staleness.new_zeros(())
    return reducer(training), reducer(interpretable), stale


def _training_loss(prob_pos: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, sampled: torch.Tensor) -> torch.Tensor:
    """(1 − P)·(s⁻ − s⁺); 0 for a query without candidates (P = 1, nothing sampled)."""
    return (1.0 - prob_pos) * (torch.where(sampled, neg, pos) - pos)


def _staleness(stale: torch.Tensor, fresh: torch.Tensor, sampled: torch.Tensor) -> torch.Tensor:
    fresh = fresh.detach().float()
    value = (stale.float() - fresh).pow(2).sum(1) / fresh.pow(2).sum(1).clamp(min=STALENESS_EPS)
    return torch.where(sampled, value, torch.full_like(value, float("nan")))


def _updates_per_source(
    sources: Sequence[str], offsets: Sequence[int], rows: torch.Tensor, keep: torch.Tensor,
    embeddings: torch.Tensor, embedding_key: str,
) -> tuple[dict, dict, dict]:
    """The reference's per-source refresh triple: source-relative indices, a mask of rows in that source, the data."""
    data, indices, mask = {}, {}, {}
    for i, src in enumerate(sources):
        lo, hi = offsets[i], offsets[i + 1]
        data[src] = {embedding_key: embeddings}
        indices[src] = rows - lo
        mask[src] = keep & (rows >= lo) & (rows < hi)
    return data, indices, mask


class CacheClassificationLoss(CacheLoss):
    """The reference's single-process cache loss over ``{source: NegativeCache}``, sources concatenated in sorted order.

    ``top_k`` keeps the reference's meaning: the maximum of each of top_k consecutive row groups
    (``util.approximate_top_k_with_indices``), not the exact top-k. Rows not ``filled`` are never
    candidates. Replace ``retrieval_fn`` ([B, C'] scores -> [B, 1] indices) to fix the sampled rows.
    """

    def __init__(
        self,
        embedding_key: str,
        data_keys: Sequence[str],
        score_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        top_k: int | None = None,
        reducer: Reducer | None = torch.mean,
    ) -> None:
        self.data_keys = _check_settings(embedding_key, data_keys, score_transform, top_k, reducer)
        self.embedding_key = embedding_key
        self.score_transform = score_transform
        self.top_k = top_k
        self.reducer = reducer
        self.retrieval_fn = retrieval_fns.GumbelMaxRetrievalFn()

    def __call__(
        self,
        doc_network: DocNetwork,
        query_embeddings: torch.Tensor,
        pos_doc_embeddings: torch.Tensor,
        cache: Mapping[str, NegativeCache],
        return_topk: int = 0,
    ) -> CacheLossReturn:
        _check_batch(query_embeddings, pos_doc_embeddings)
        if return_topk < 0:
            raise ValueError(f"return_topk must be >= 0, got {return_topk}")
        caches = as_cache_dict(cache)
        keys = (self.embedding_key, *self.data_keys)
        fields, filled, offsets = concat_sources(caches, keys)
        cached = fields[self.embedding_key]
        if cached.device != query_embeddings.device:
            raise ValueError(f"the cache is on {cached.device} but query_embeddings are on {query_embeddings.device}")
        q = query_embeddings
        pos = _score(q, pos_doc_embeddings, self.score_transform)
        with torch.no_grad():
            scores = q.detach() @ cached.to(q.dtype).t()
            if self.score_transform is not None:
                scores = self.score_transform(scores)
            scores = scores.masked_fill(~filled[None, :], float("-inf"))
            if self.top_k:
                cand_scores, cand_rows = util.approximate_top_k_with_indices(scores, self.top_k)
            else:
                cand_scores = scores
                cand_rows = torch.arange(scores.shape[1], device=scores.device).expand_as(scores)
            pick = torch.as_tensor(self.retrieval_fn(cand_scores), device=q.device).reshape(-1, 1).long()
            if pick.shape[0] != q.shape[0] or (pick.numel() and (pick.min() < 0 or pick.max() >= cand_scores.shape[1])):
                raise ValueError(
                    f"retrieval_fn must return [{q.shape[0]}, 1] indices in [0, {cand_scores.shape[1]}), "
                    f"got {pick.tolist()}"
                )
            sampled = torch.isfinite(cand_scores.gather(1, pick)).squeeze(1)
            rows = torch.where(sampled, cand_rows.gather(1, pick).squeeze(1), torch.full_like(pick[:, 0], -1))
        fresh = q.new_zeros((q.shape[0], cached.shape[1]))
        if bool(sampled.any()):
            chosen = rows[sampled]
            encoded = doc_network({k: fields[k][chosen] for k in self.data_keys})
            fresh = fresh.index_put((sampled.nonzero().squeeze(1),), encoded.to(fresh.dtype))
        neg = _score(q, fresh, self.score_transform)
        log_p = F.log_softmax(torch.cat([pos.detach()[:, None], cand_scores.to(pos.dtype)], dim=1), dim=1)[:, 0]
        training = _training_loss(log_p.exp(), pos, neg, sampled)
        stale = _staleness(cached[rows.clamp(min=0)], fresh, sampled)
        training, interpretable, stale = _reduce(self.reducer, training, -log_p, stale, sampled)
        data, indices, mask = _updates_per_source(
            list(caches), offsets, rows, sampled, fresh.detach(), self.embedding_key
        )
        topk = self._top_candidates(cand_scores, cand_rows, fields, return_topk) if return_topk else None
        return CacheLossReturn(training, interpretable, data, indices, mask, stale, topk)

    def _top_candidates(
        self, cand_scores: torch.Tensor, cand_rows: torch.Tensor, fields: Mapping[str, torch.Tensor], n: int
    ) -> list[dict[str, torch.Tensor]]:
        """Per query, the data of its ``n`` highest-scoring candidates (empty rows left out), best first."""
        n = min(n, cand_scores.shape[1])
        vals, pos = cand_scores.topk(n, dim=1)
        rows = cand_rows.gather(1, pos)
        valid = torch.isfinite(vals)
        return [{k: fields[k][rows[b][valid[b]]] for k in self.data_keys} for b in range(rows.shape[0])]


class DistributedCacheClassificationLoss(CacheLoss):
    """The cache loss over a cache sharded across the ranks of ``process_group``: this rank passes its own shard.

    Runs the sharded engine: every query is scored against every rank's rows (chunked, exact), one
    negative per query is sampled from the softmax over the whole cache, ``top_k`` is the exact global
    top-k, and the returned ``updated_item_*`` are the refreshes of *this rank's own rows* (re-encoded by
    whichever rank sampled them), ready for ``CacheManager.update_cache``. Every rank must call it together.
    Sampling is keyed by ``seed`` and a step counter, so ``retrieval_fn`` cannot be replaced.
    """

    def __init__(
        self,
        embedding_key: str,
        data_keys: Sequence[str],
        score_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        top_k: int | None = None,
        reducer: Reducer | None = torch.mean,
        *,
        seed: int = 0,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        self.data_keys = _check_settings(embedding_key, data_keys, score_transform, top_k, reducer)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.embedding_key = embedding_key
        self.score_transform = score_transform
        self.top_k = top_k
        self.reducer = reducer
        self.seed = seed
        self.process_group = process_group
        self.retrieval_fn = retrieval_fns.GumbelMaxRetrievalFn()
        self._engine = EngineStep()

    def __call__(
        self,
        doc_network: DocNetwork,
        query_embeddings: torch.Tensor,
        pos_doc_embeddings: torch.Tensor,
        cache: Mapping[str, NegativeCache],
        return_topk: int = 0,
    ) -> CacheLossReturn:
        _check_batch(query_embeddings, pos_doc_embeddings)
        if return_topk:
            raise NotImplementedError("return_topk is not supported by the engine-backed "
                                      "DistributedCacheClassificationLoss")
        fn = self.retrieval_fn
        if type(fn) is not retrieval_fns.GumbelMaxRetrievalFn or fn.inv_temp != 1.0:
            raise NotImplementedError("DistributedCacheClassificationLoss samples inside the sharded engine "
                                      "(keyed Gumbel-max); retrieval_fn cannot be replaced. Use seed=..., "
                                      "or top_k=1 for a deterministic negative.")
        caches = as_cache_dict(cache)
        fields, filled, offsets = concat_sources(caches, (self.embedding_key, *self.data_keys))
        out = self._engine.run(
            doc_network, query_embeddings, pos_doc_embeddings, fields[self.embedding_key],
            {k: fields[k] for k in self.data_keys}, filled,
            embedding_key=self.embedding_key, data_keys=self.data_keys, score_transform=self.score_transform,
            top_k=self.top_k, seed=self.seed, process_group=self.process_group,
        )
        q = query_embeddings
        pos = _score(q, pos_doc_embeddings, self.score_transform)
        neg = _score(q, out.fresh_negatives, self.score_transform)
        training = _training_loss(out.prob_positive.to(pos.dtype), pos, neg, out.sampled)
        training, interpretable, stale = _reduce(
            self.reducer, training, out.interpretable_loss, out.staleness, out.sampled
        )
        keep = torch.ones_like(out.refreshed_slots, dtype=torch.bool)
        data, indices, mask = _updates_per_source(
            list(caches), offsets, out.refreshed_slots, keep, out.refreshed_embeddings, self.embedding_key
        )
        return CacheLossReturn(training, interpretable, data, indices, mask, stale, None)
