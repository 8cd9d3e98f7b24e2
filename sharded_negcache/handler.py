"""``ShardedCacheLossHandler``: one training step of the negative cache, as the protocol of design §3.

The handler only orchestrates. Validation lives in ``specs``, the partition in ``layout``, rows in
``store``, the hot loop in ``scoring``, collectives in ``exchange``, merging in ``combine`` and the
formulas in ``loss``. Read :meth:`update_cache_and_compute_loss` top to bottom: it is the protocol.
"""
from __future__ import annotations

import contextlib
import logging
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from . import metrics
from .codecs import EmbeddingCodec, finite_rows, make_codec
from .combine import HomePartials, merge_partials, own_partials, pack_partials
from .corpus import CORPUS_KEY, CorpusIndex, content_keys, corpus_columns, ids_checksum, place, row_batches, select_rows
from .exchange import DEFAULT_TIMEOUT_S, BatchRejected, CandidateRows, CollectiveFailed, Comm, RowRoute
from .jagged import Jagged, JaggedColumn
from .keyed_random import Stream, draw_keys, uniform
from .layout import ShardLayout
from .loss import (
    in_batch_mask,
    loss_scale,
    nonfinite_queries,
    overflowing,
    query_losses,
    reduce_loss,
    scale_gradient,
    spread,
    zero_rows,
)
from .scoring import LocalPartials, ScoreFn, make_score_fn, resolve_backend, score_shard
from .specs import CacheSchema, FieldSpec
from .stages import STAGE_PREFIX, STAGES  # noqa: F401  (re-exported: the stage names)
from .stages import stage as _stage
from .store import CacheTooLarge, FetchedRows, ShardStore, check_capacity, first_occurrence
from .topology import Topology

__all__ = [
    "ShardedCacheLossHandler", "StepResult", "BatchRejected", "NonFiniteRows", "NonFiniteLoss", "DocumentNetworkFailed",
    "CollectiveFailed", "CacheTooLarge",
]

_log = logging.getLogger("sharded_negcache")

# Score-matrix bytes per chunk: bounds scoring memory. On CPU a small chunk stays cache-friendly
# (benchmarks/results/cpu_scan.md has the chunk sizes measured); a GPU wants few, large kernels.
DEFAULT_CHUNK_BYTES = {"cpu": 8 << 20, "cuda": 256 << 20}


Reduction = Literal["mean", "global_mean", "sum"]
CacheMode = Literal["stream", "corpus"]

_ERR_INPUT, _ERR_QUERY_NONFINITE, _ERR_DOC_NONFINITE, _ERR_DOC_UNSTORABLE = 1, 2, 4, 8
_PREFILL_BAR_MIN_DOCS = 4096  # a smaller corpus encodes in moments: no progress bar


class NonFiniteRows(FloatingPointError):
    """The document tower produced NaN/Inf for some rows (policy 'raise'); raised on every rank, nothing written."""


class NonFiniteLoss(FloatingPointError):
    """Some query's log-partition or loss is NaN/Inf, or a rank's reduced loss overflows (policy 'raise'); raised
    on every rank, nothing written."""


class DocumentNetworkFailed(ValueError):
    """The document tower raised or returned something other than [rows, d] embeddings on some rank; raised
    on every rank, naming each failing rank, with nothing written (the failing rank's error is the cause)."""


@dataclass
class StepResult:
    """What one step did, for this rank (detached but for ``loss`` and ``reencoded``). ``metrics`` holds global
    means (the same on every rank)."""

    loss: torch.Tensor
    training_loss: torch.Tensor  # [B] per query
    interpretable_loss: torch.Tensor  # [B] -log P
    prob_positive: torch.Tensor  # [B] P
    lse: torch.Tensor  # [B] log Z over the candidates
    sampled_rows: torch.Tensor  # [B, m] global row ids, -1 where nothing was sampled
    staleness: torch.Tensor  # [B, m], NaN where nothing was sampled
    refreshed_rows: torch.Tensor  # global ids this rank (as owner) rewrote
    inserted_rows: torch.Tensor  # global ids of this rank's new rows
    metrics: dict[str, float] = field(default_factory=dict)
    # loss = loss_scale x training_loss.sum() (up to rounding): callers that report another per-query value
    # reduced like the loss (the sentence-transformers adapter's -log P) scale it by this, never recompute it
    loss_scale: float = 1.0
    # (unique local slots, fresh fp32 embeddings) this rank, as owner, refreshes in place: what a training step
    # wrote, or with score(return_refreshes=True) what it would write (for callers that own the rows: compat)
    refreshes: tuple[torch.Tensor, torch.Tensor] | None = None
    # the rows this rank re-encoded (as home of their draws): global ids [U] ascending, and the tower's embeddings
    # of them [U, d] with its gradient, as the loss scored them (a subset with ``reencode_negatives`` < 'all')
    reencoded_rows: torch.Tensor | None = None
    reencoded: torch.Tensor | None = None


@dataclass
class _Batch:
    """What the agreement established about one step's batch, for every later stage of the protocol."""

    step: int
    sizes: list[int]  # every rank's batch size (the shard group's ranks, in order)
    own: int  # this rank's batch size
    first: int  # global position of this rank's first query
    query_pos: torch.Tensor  # [own] global positions of this rank's queries
    features: dict[str, Any]  # this batch's feature fields (jagged ones normalised)
    positive_ok: torch.Tensor  # [own] positives the codec can store
    to_gather: list[torch.Tensor]  # the queries (and the positives' exclusion ids) to gather
    payload: torch.Tensor | None  # the agreement's gathered rows, when they rode along
    corpus: CorpusIndex | None
    eager: bool  # rows ride with the partials and back with the statistics (see ``eager_fetch_bytes``)
    capacity: list[int]  # per rank, the most distinct rows it can sample from one owner
    exclude: torch.Tensor | None = None  # the gathered positives' exclusion ids (set by the gather)


@dataclass
class _Fetch:
    """Step 4's rows: the unique sampled rows (global id order) and how they map to draws and owners."""

    fetched: FetchedRows
    global_rows: torch.Tensor  # [U] their global ids, ascending
    which: torch.Tensor  # each sampled (query, draw) → its row among ``fetched``
    owners: torch.Tensor  # [U] owner rank of each row (ascending)
    slots: torch.Tensor  # [U] its local slot there
    route: RowRoute | None  # the request/response fetch's route (None with the eager fetch)
    chosen_draws: torch.Tensor | None = None  # [B, m] draws re-encoded (None: all)
    chosen: torch.Tensor | None = None  # [U] fetched rows re-encoded (None: all)


class ShardedCacheLossHandler(nn.Module):
    """Negative-cache loss over a cache sharded row-wise across the ranks of a process group.

    A module: in eval mode (or under ``torch.inference_mode()``) a step computes and writes nothing (see
    :meth:`score`); the cache shard is in ``state_dict`` but hidden from whole-model walks such as DDP's
    buffer broadcast; dtype casts of the module leave its rows as the codec stores them.

    Args:
      specs: field name -> FieldSpec (or any object with ``shape`` and ``dtype``), the embedding included.
      cache_size: global number of rows; each rank holds ``cache_size / world_size``.
      embedding_key, data_keys: the embedding field and the fields the document network reads.
      score_transform: T applied to dot products: a callable (elementwise) or a float scale (faster:
        folded into the queries).
      top_k: restrict each query's candidates to its exact global top-k cached rows.
      num_negatives: m draws per query, with replacement.
      seed: with the step counter, fixes every random number (independent of world size).
      use_lru: a refreshed row's age resets (True) or keeps its insertion age (False, FIFO).
      doc_id_key: spec field with a document id; rows holding a query's own positive are excluded.
      process_group: the group the cache is sharded over (default: WORLD when initialised).
      device: where the cache lives; by default it follows the first batch's embeddings.
      embedding_codec: storage of cached embeddings: 'fp32', 'bf16', 'fp16', 'int8' or 'int4' (row-wise,
        fbgemm's fused layouts); default the spec dtype.
      block_size: rows per sampling block (must divide the rows per rank; default gcd(256, rows)).
      chunk_bytes: size of the score matrix scored at once (memory bound of scoring); default 8 MB on
        CPU, 256 MB on CUDA. The fused CPU scan (float scale) writes no score matrix: there it bounds only
        the decoded rows of non-fp32 codecs (fp32 rows are scanned in place).
      scoring_backend: 'auto' (the fused Triton kernel on CUDA when triton imports, sampling mode and a
        float score transform; the C++ kernel on CPU where it builds, except top-k mode with a callable
        transform; else torch ops), 'torch' (torch ops only), 'native' (the C++ kernel) or 'triton'; a
        requested kernel that cannot run raises ValueError. ``SHARDED_NEGCACHE_NATIVE=0`` overrides the C++
        kernel. ``config()`` reports what was requested, what runs and why (``scan_backend``: what runs);
        the choice is logged once.
      reduction: 'mean' over this rank's queries (the reference), 'global_mean' (scaled so that DDP's
        gradient average equals the mean over the global batch) or 'sum'.
      in_batch_negatives: also use the other positives of the global batch as fresh candidates (design
        §2 "cache plus in-batch negatives"); their gradient flows back to every rank's document tower.
      nonfinite: NaN/Inf from the document tower or in a query's log-partition or loss. 'raise' (default):
        non-finite document embeddings are rejected with the batch, and non-finite re-encoded rows or
        losses raise NonFiniteRows / NonFiniteLoss on every rank before anything is written. 'skip': such
        rows are neither inserted nor refreshed, such queries and terms leave the loss, and they are
        counted in ``cache/rejected_rows`` and ``cache/nonfinite_queries``.
      collective_timeout_s: a collective that does not complete in this time (a rank died or stalled)
        raises CollectiveFailed naming the step and the collective.
      host_features: feature fields kept in host memory (pinned where CUDA is present) while the
        embeddings stay on ``device``; only sampled rows' features are read each step.
      reencode_on_every_rank: call ``document_network`` on every rank every step, with zero rows where
        nothing was sampled; needed when the tower runs collectives itself (e.g. a TorchRec sharded
        embedding lookup). By default a rank that sampled nothing does not call it.
      shard_group_size: G, the two-level layout (docs/design.md §10): the W ranks form W/G groups of G
        consecutive ranks, each group holds its own cache of ``cache_size`` rows (``cache_size / G`` per
        rank) fed by its own positives, and a query is scored only in its group, so the per-rank step
        does not grow with W. In-batch negatives come from the group; group g samples with seed
        ``layout.stream_seed(seed)``; agreement and statistics span all W ranks. Default W (flat).
      cache_mode: 'stream' (default: a FIFO/LRU cache fed by each step's positives) or 'corpus' (docs/design.md
        §12): the rows are the documents of a corpus, filled by :meth:`prefill` and addressed by ``doc_id_key``;
        a step's positives refresh their own rows instead of being inserted.
      reencode_negatives: 'all' (default): every sampled row is re-encoded with gradient; 'none': negatives are
        scored from their cached embeddings (gradient through the query only, no tower call for them); a float
        f in (0, 1]: each draw is re-encoded with probability f (keyed randomness), its tower gradient weighted
        1 / f, the others scored from the cache.
      refresh_budget: corpus mode: each rank also re-encodes (no gradient) its K rows longest since encoded,
        every step, and writes them in place.
      exclude_duplicates: corpus mode: rows whose document is an exact duplicate (same values in every
        ``data_keys`` field) of a query's positive are excluded too, not only the positive's own row.
      eager_fetch_bytes: the eager fetch (flat layout, no jagged fields): while each rank's candidate rows
        (gathered queries x draws x packed row bytes) and its padded write-back fit in this many bytes, owners
        send their local winners' rows with the partials, and the fresh rows go back in the statistics'
        all-to-all: three collectives a step instead of six, for W times the row bytes. 0 turns it off.
    """

    def __init__(
        self,
        specs: Mapping[str, FieldSpec | Any],
        cache_size: int,
        embedding_key: str,
        data_keys: Sequence[str],
        score_transform: Callable[[torch.Tensor], torch.Tensor] | float | None = None,
        top_k: int | None = None,
        num_negatives: int = 1,
        seed: int = 0,
        *,
        use_lru: bool = True,
        doc_id_key: str | None = None,
        process_group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
        embedding_codec: str | torch.dtype | EmbeddingCodec | None = None,
        block_size: int | None = None,
        chunk_bytes: int | None = None,
        reduction: Reduction = "mean",
        in_batch_negatives: bool = False,
        nonfinite: Literal["raise", "skip"] = "raise",
        collective_timeout_s: float = DEFAULT_TIMEOUT_S,
        host_features: Sequence[str] = (),
        reencode_on_every_rank: bool = False,
        shard_group_size: int | None = None,
        scoring_backend: Literal["auto", "torch", "native", "triton"] = "auto",
        cache_mode: CacheMode = "stream",
        reencode_negatives: Literal["all", "none"] | float = "all",
        refresh_budget: int = 0,
        exclude_duplicates: bool = False,
        eager_fetch_bytes: int = 4 << 20,
    ) -> None:
        super().__init__()
        _check_corpus_options(cache_mode, doc_id_key, reencode_negatives, refresh_budget, exclude_duplicates, specs)
        if not isinstance(num_negatives, int) or num_negatives < 1:
            raise ValueError(f"num_negatives must be an int >= 1, got {num_negatives!r}")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
        if reduction not in ("mean", "global_mean", "sum"):
            raise ValueError(f"reduction must be 'mean', 'global_mean' or 'sum', got {reduction!r}")
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        if not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        if not isinstance(eager_fetch_bytes, int) or eager_fetch_bytes < 0:
            raise ValueError(f"eager_fetch_bytes must be an int >= 0, got {eager_fetch_bytes!r}")
        self.eager_fetch_bytes = eager_fetch_bytes
        self.schema = CacheSchema(specs, embedding_key, data_keys, doc_id_key)
        self.topology = Topology.build(shard_group_size, process_group)  # the ranks, built once, shared below
        self.comm = Comm(self.topology, collective_timeout_s)
        self.nonfinite = nonfinite
        self.layout = ShardLayout.build(cache_size, self.topology, block_size)
        self.score_fn: ScoreFn = make_score_fn(score_transform)
        if scoring_backend != "auto":  # refuse an impossible request now (the device may come later)
            known = torch.device(device) if device is not None else None
            resolve_backend(scoring_backend, known, self.score_fn, top_k)
        self.scoring_backend, self._backend = scoring_backend, None
        self.top_k, self.num_negatives, self.use_lru = top_k, num_negatives, use_lru
        self.chunk_bytes, self.reduction = chunk_bytes, reduction
        self.in_batch_negatives = bool(in_batch_negatives)
        self.reencode_on_every_rank = bool(reencode_on_every_rank)
        codec = embedding_codec if isinstance(embedding_codec, EmbeddingCodec) else make_codec(
            embedding_codec if embedding_codec is not None else self.schema.specs[embedding_key].dtype
        )
        self._device_fixed = device is not None
        if doc_id_key is not None and doc_id_key in host_features:
            raise ValueError(f"host_features must not hold the doc_id_key {doc_id_key!r}: scoring reads it on the device")
        specs = self.schema.feature_specs()
        self.cache_mode, self.reencode_negatives = cache_mode, reencode_negatives
        self.refresh_budget, self.exclude_duplicates = refresh_budget, bool(exclude_duplicates)
        self._corpus: CorpusIndex | None = None  # corpus mode: rebuilt from the rows when None (after a load)
        if cache_mode == "corpus":
            specs[CORPUS_KEY] = FieldSpec((1,), torch.int64)  # each row's exclusion key (design §12)
        check_capacity(self.layout.rows_per_rank, self.schema.dim, specs, codec, device, host_features)
        self.store = ShardStore(self.layout.rows_per_rank, self.schema.dim, specs, codec, device, host_features)
        self.register_buffer("step_count", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("seed", torch.tensor(seed, dtype=torch.int64, device=device))
        self._step, self._seed, self._global_batch = 0, seed, 0
        self._loading_strict = False  # see load_state_dict
        self.register_load_state_dict_pre_hook(_check_state_dict_before_loading)
        self.register_load_state_dict_post_hook(_sync_host_counters)
        self.last_step: StepResult | None = None

    # ---- properties ------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.store.device

    @property
    def steps_done(self) -> int:
        return self._step

    def config(self) -> dict[str, Any]:
        """Settings every rank must share (checked at each step)."""
        return {
            "specs": {k: repr(s) for k, s in sorted(self.schema.specs.items())},
            "embedding_key": self.schema.embedding_key,
            "data_keys": self.schema.data_keys,
            "doc_id_key": self.schema.doc_id_key,
            "cache_size": self.layout.cache_size,
            "shard_group_size": self.layout.shard_size,
            "block_size": self.layout.block_size,
            "seed": self._seed,
            "step": self._step,
            "score_transform": self.score_fn.fingerprint(),
            "top_k": self.top_k,
            "num_negatives": self.num_negatives,
            "use_lru": self.use_lru,
            "codec": self.store.codec.name,
            "host_features": sorted(self.store.host_keys),
            "in_batch_negatives": self.in_batch_negatives,
            "nonfinite": self.nonfinite,
            "reduction": self.reduction,
            "reencode_on_every_rank": self.reencode_on_every_rank,
            "scoring_backend": self._backend_report(),
            "cache_mode": self.cache_mode,
            "reencode_negatives": self.reencode_negatives,
            "refresh_budget": self.refresh_budget,
            "exclude_duplicates": self.exclude_duplicates,
            "eager_fetch_bytes": self.eager_fetch_bytes,
        }

    def _backend_report(self) -> dict[str, str]:
        """The scan's backend as ``config()`` reports it: what was requested, what runs on the current device and
        why (e.g. ``SHARDED_NEGCACHE_NATIVE=0`` overriding the C++ kernel). Ranks compare it: ranks running
        different kernels (different exp implementations) would not sample alike."""
        runs, why = self._resolved_backend()
        return {"requested": self.scoring_backend, "runs": runs, "why": why}

    def named_modules(  # type: ignore[override]
        self, memo: set[nn.Module] | None = None, prefix: str = "", remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Module]]:
        """The module tree without the cache shard (``store``): whole-model walks (DDP's buffer broadcast,
        mixed-precision buffer casts, ``model.buffers()``) must never see rank-local rows. ``state_dict``,
        ``load_state_dict`` and ``.to()`` still include them (they walk children directly)."""
        hidden = f"{prefix}.store" if prefix else "store"
        for name, module in super().named_modules(memo, prefix, remove_duplicate):
            if name != hidden and not name.startswith(hidden + "."):
                yield name, module

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):  # type: ignore[override]
        """As ``nn.Module.load_state_dict``, but a bad state_dict (shapes, dtypes, and with ``strict`` missing or
        unexpected keys) raises ValueError before anything is loaded."""
        self._loading_strict = strict
        try:
            return super().load_state_dict(state_dict, strict, assign)
        finally:
            self._loading_strict = False

    # ---- whole-cache views (tests and resharding; gathers everything, not for the hot path) ----
    def gather_global_rows(self) -> dict[str, torch.Tensor]:
        """The whole cache in global row order, on every rank (see :meth:`ShardStore.export_rows`): copies, so a
        snapshot stays as it was while later steps write (in one process the gather would return the rows' storage)."""
        local = self.store.export_rows()
        sizes = [self.layout.rows_per_rank] * self.comm.shard_size
        return {k: self.comm.gather_rows(v, sizes, tag="gather_cache").clone() for k, v in local.items()}

    def load_global_rows(self, rows: Mapping[str, torch.Tensor]) -> None:
        """Sets this rank's shard from whole-cache tensors in global row order (each rank takes its slice)."""
        lo, hi = self.layout.row_offset, self.layout.row_offset + self.layout.rows_per_rank
        for key, t in rows.items():
            if t.shape[0] != self.layout.cache_size:
                raise ValueError(f"rows[{key!r}] has {t.shape[0]} rows, the cache has {self.layout.cache_size}")
        self.store.import_rows({k: v[lo:hi].to(self.device) for k, v in rows.items()})
        self._corpus = None

    # ---- the step --------------------------------------------------------------------------
    def update_cache_and_compute_loss(
        self,
        document_network: Callable[[dict[str, torch.Tensor]], torch.Tensor],
        query_embeddings: torch.Tensor,
        document_embeddings: torch.Tensor,
        document_data: Mapping[str, torch.Tensor],
        writer: Any = None,
        *,
        extra_negatives: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss of this rank's queries against positives plus the whole sharded cache; updates the cache.

        ``document_network`` maps a dict of the ``data_keys`` fields of some rows to their embeddings.
        Every rank must call this together (it runs collectives), with any batch size, zero included.
        In eval mode (``handler.eval()``) or under ``torch.inference_mode()`` it writes nothing, as
        :meth:`score`; under ``torch.no_grad()`` in train mode it writes (the module's mode decides).
        ``extra_negatives`` [B, n, d] (with gradient): fresh embeddings of hard negatives given with the batch,
        extra candidates of their own query (and, with ``in_batch_negatives``, of every query of the group);
        every rank passes the same n. They are never written into the cache.
        """
        write = self.training and not torch.is_inference_mode_enabled()
        return self._run_step(document_network, query_embeddings, document_embeddings, document_data, writer,
                              write=write, extra_negatives=extra_negatives).loss

    forward = update_cache_and_compute_loss

    def score(
        self,
        document_network: Callable[[dict[str, torch.Tensor]], torch.Tensor],
        query_embeddings: torch.Tensor,
        document_embeddings: torch.Tensor,
        document_data: Mapping[str, torch.Tensor],
        writer: Any = None,
        *,
        step: int | None = None,
        return_refreshes: bool = False,
        extra_negatives: torch.Tensor | None = None,
    ) -> StepResult:
        """One step's loss (with gradient), samples and metrics, writing nothing: no refresh, no insert, the
        step counter stays. The tower is still called on the sampled rows. Every rank must call it together.

        ``step`` keys the random numbers (default: the handler's step). ``return_refreshes`` also sends the
        re-encoded rows to their owners and returns them there as ``refreshes`` (what a training step would
        write): for callers that own the rows themselves (``compat``).
        """
        return self._run_step(document_network, query_embeddings, document_embeddings, document_data, writer,
                              write=False, step=step, return_refreshes=return_refreshes,
                              extra_negatives=extra_negatives)

    def _run_step(
        self,
        document_network: Callable[[dict[str, torch.Tensor]], torch.Tensor],
        query_embeddings: torch.Tensor,
        document_embeddings: torch.Tensor,
        document_data: Mapping[str, torch.Tensor],
        writer: Any,
        *,
        write: bool,
        step: int | None = None,
        return_refreshes: bool = False,
        extra_negatives: torch.Tensor | None = None,
    ) -> StepResult:
        """The protocol of design §2, top to bottom; writes only when ``write``. The rows' way back to their
        owners runs when the step writes or the caller asks for the refreshes (``StepResult.refreshes``)."""
        self._follow_device(query_embeddings)
        step = self._step if step is None else int(step)
        self.comm.step = step
        corpus = self._corpus_index() if self.cache_mode == "corpus" else None
        route_back = write or return_refreshes
        # 0. agree: every rank validates its batch and learns every other rank's verdict and batch size.
        with _stage("agree"):
            batch = self._agree(query_embeddings, document_embeddings, document_data, step, write, route_back,
                                corpus, extra_negatives)
        # 1-3. gather the queries, score them against the local rows, combine the partials at each query's home.
        with torch.no_grad(), _engine_precision(self.device):
            home, received_rows = self._sample(batch)
        # 4. fetch the sampled rows from their owners and re-encode them with gradient (the caller's autocast
        #    applies to its tower only). A tower that fails here is reported to every rank at step 6.
        with _stage("fetch"):
            rows = self._fetch(batch, home, received_rows)
        with _stage("reencode"):
            fresh, failure = self._reencode_sampled(document_network, batch, home, rows, query_embeddings)
            budget = None
            if corpus is not None and self.refresh_budget and write:  # K stalest rows, no gradient
                budget, budget_failure = self._reencode_budget(document_network, query_embeddings)
                failure = failure or budget_failure
        # 5. the losses (rows the tower made non-finite are left out; optionally in-batch negatives).
        with _stage("losses"), _engine_precision(self.device):
            result, fresh_ok, bad = self._losses(batch, home, rows, fresh, query_embeddings, document_embeddings,
                                                 extra_negatives)
        # 6. global statistics: every rank learns of a failed tower or non-finite rows or losses before any write.
        #    With the eager fetch the fresh rows travel to their owners in the same all-to-all.
        back = self._rows_back(fresh, rows.chosen, rows.fetched.embeddings.shape[0]) if route_back else None
        with _stage("stats"):
            rejected = (~fresh_ok).sum() + (~batch.positive_ok).sum()
            if budget is not None:
                rejected = rejected + (~budget[2]).sum()
            inserting = batch.positive_ok.sum() * write * (corpus is None)
            sums = self._metric_sums(result, rows.fetched, rows.which, rejected, inserting, failure is not None,
                                     bad.sum())
            arrived = None
            if batch.eager and back is not None:
                sums, *arrived = self.comm.stats_and_rows_to_owners(sums, rows.owners, rows.slots, back,
                                                                    batch.capacity)
            else:
                sums = self.comm.all_reduce_sum(sums)
            result.metrics, failed_ranks = self._global_metrics(sums)
        self._raise_step_failures(step, result.metrics, failed_ranks, failure)
        # 7. fresh embeddings back to their owners.
        if back is not None:
            with _stage("write_back"):
                slots, fresh_rows = arrived if arrived is not None else self.comm.write_back(rows.route, back)
                result.refreshes = self._refreshes(slots, fresh_rows, rows.chosen is not None)
        # 8. the writes: refresh in place, then insert the positives (or, in corpus mode, refresh their rows).
        if write:
            with _stage("insert"):
                self._write(result, batch, document_data, document_embeddings, budget)
            self._advance_step()
        log_to, log_step = metrics.resolve_writer(writer, step)
        metrics.write_scalars(log_to, log_step, result.metrics, self.comm.rank)  # one writer per job
        self.last_step = result
        return result

    def _agree(
        self, query_embeddings: torch.Tensor, document_embeddings: torch.Tensor,
        document_data: Mapping[str, torch.Tensor], step: int, write: bool, route_back: bool,
        corpus: CorpusIndex | None, extra_negatives: torch.Tensor | None,
    ) -> _Batch:
        """Step 0: the agreement (see :meth:`_agree_on_inputs`) and what every later stage needs of the batch."""
        def settings() -> dict[str, Any]:
            extra = None
            if extra_negatives is not None:  # n must match on every rank (the in-batch gather sizes by it)
                shaped = isinstance(extra_negatives, torch.Tensor) and extra_negatives.dim() == 3
                extra = extra_negatives.shape[1] if shaped else -1
            return {**self.config(), "step": step, "writes": write, "returns_refreshes": route_back and not write,
                    "extra_negatives": extra}

        sizes, features, positive_ok, to_gather, payload = self._agree_on_inputs(
            query_embeddings, document_embeddings, document_data, settings, corpus,
            lambda: self._check_step_extras(document_data, query_embeddings, extra_negatives, corpus))
        own, first = sizes[self.comm.shard_rank], sum(sizes[: self.comm.shard_rank])
        return _Batch(
            step=step, sizes=sizes, own=own, first=first,
            query_pos=torch.arange(first, first + own, device=self.device), features=features,
            positive_ok=positive_ok, to_gather=to_gather, payload=payload, corpus=corpus,
            eager=self._eager_fetch(sizes),
            capacity=[min(s * self.num_negatives, self.layout.rows_per_rank) for s in sizes],
        )

    def _sample(self, batch: _Batch) -> tuple[HomePartials, CandidateRows | None]:
        """Steps 1-3: this rank's queries' merged partials (their LSE and sampled rows), and with the eager fetch
        the candidates' rows that came with them."""
        # 1. every rank's queries (and their positives' ids): in the flat layout they came with the agreement's
        #    all-gather, padded to the largest batch seen.
        with _stage("gather"):
            queries, *ids = self.comm.gather_agreed(batch.to_gather, batch.sizes, batch.payload)
            batch.exclude = ids[0] if ids else None
        # 2. score them against the local rows, chunk by chunk.
        seed, backend = self.layout.stream_seed(self._seed), self.scan_backend  # resolved (built) before the scan
        with _stage("score"):
            partials = score_shard(
                self.store, self.layout, queries, self.score_fn,
                num_draws=self.num_negatives, top_k=self.top_k, seed=seed, step=batch.step,
                chunk_rows=self.chunk_rows(sum(batch.sizes)),
                exclude_key=CORPUS_KEY if batch.corpus is not None else self.schema.doc_id_key,
                exclude_ids=batch.exclude, backend=backend,
            )
        # 3. each query's partials to its home rank, combined there (with the eager fetch, the local
        #    candidates' rows travel with them).
        with _stage("partials"):
            if not (self.comm.active or self.top_k):
                return own_partials(partials), None
            candidates = self._candidate_rows(partials) if batch.eager else None
            received, received_rows = self.comm.partials_to_home(pack_partials(partials), batch.sizes, candidates)
            home = merge_partials(received, num_draws=self.num_negatives, top_k=self.top_k, seed=seed,
                                  step=batch.step, query_pos=batch.query_pos)
            return home, received_rows

    def _fetch(self, batch: _Batch, home: HomePartials, received_rows: CandidateRows | None) -> _Fetch:
        """Step 4: the unique sampled rows (global id order), from the eager fetch's copies, from their owners
        (request and response), or, in one process, where they lie."""
        sampled = home.rows >= 0
        unique_rows, which = torch.unique(home.rows[sampled], return_inverse=True)
        owners = self.layout.owner_of(unique_rows)
        slots = unique_rows - owners * self.layout.rows_per_rank
        route = None
        if received_rows is not None:  # each unique row's first copy among the candidates that came
            fetched = self.store.unpack(_first_copies(received_rows, home, sampled, which, unique_rows.numel()), {})
        elif self.comm.active:
            packed, jagged, route = self.comm.fetch_rows(owners, slots, self.store.pack, self.store.jagged_lengths,
                                                         batch.capacity)
            fetched = self.store.unpack(packed, jagged)
        else:  # one process: the rows are read where they lie, nothing is packed for a transfer
            fetched, route = self.store.read(slots), RowRoute([slots.numel()], [slots.numel()], slots)
        return _Fetch(fetched, unique_rows, which, owners, slots, route)

    def _reencode_sampled(
        self, document_network: Callable[[dict[str, torch.Tensor]], torch.Tensor], batch: _Batch,
        home: HomePartials, rows: _Fetch, query_embeddings: torch.Tensor,
    ) -> tuple[torch.Tensor, tuple[str, BaseException | None] | None]:
        """The fetched rows re-encoded with gradient: all, or the chosen draws' rows (``reencode_negatives``)."""
        if self.reencode_negatives != "all":
            rows.chosen_draws, rows.chosen = self._chosen_draws(home.rows, rows.which, batch.query_pos, batch.step,
                                                                rows.fetched.embeddings.shape[0])
        subset = rows.fetched if rows.chosen is None else rows.fetched.select(rows.chosen)
        return self._reencode(document_network, subset, query_embeddings)

    def _reencode_budget(
        self, document_network: Callable[[dict[str, torch.Tensor]], torch.Tensor], query_embeddings: torch.Tensor,
    ) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], tuple[str, BaseException | None] | None]:
        """Corpus mode's refresh budget: ((slots, rows, storable) of this rank's K stalest rows, failure)."""
        with torch.no_grad():
            slots = self.store.stalest_slots(self.refresh_budget)
            fresh, failure = self._reencode(document_network, self.store.read(slots), query_embeddings)
        return (slots, fresh, self.store.codec.storable(fresh)), failure

    def _losses(
        self, batch: _Batch, home: HomePartials, rows: _Fetch, fresh: torch.Tensor, query_embeddings: torch.Tensor,
        document_embeddings: torch.Tensor, extra_negatives: torch.Tensor | None,
    ) -> tuple[StepResult, torch.Tensor, torch.Tensor]:
        """Step 5: the step's result (losses, samples), which re-encoded rows the codec can store, and which
        queries' losses are not finite."""
        positive_ok, sizes, own = batch.positive_ok, batch.sizes, batch.own
        fresh_ok = self.store.codec.storable(fresh)  # finite, and representable by the storage codec
        positives = zero_rows(document_embeddings.float(), positive_ok)
        batch_positives = batch_mask = own_negatives = None
        if self.in_batch_negatives:
            batch_positives = self.comm.gather_rows_with_grad(positives, sizes)
            batch_mask = in_batch_mask(batch.first, own, sum(sizes), batch.exclude, self.device)
        if extra_negatives is not None:
            if self.in_batch_negatives:  # the group's extra negatives are candidates of every query
                n = extra_negatives.shape[1]
                extra = self.comm.gather_rows_with_grad(extra_negatives.float().reshape(-1, self.schema.dim),
                                                        [b * n for b in sizes])
                batch_positives = torch.cat([batch_positives, extra])
                batch_mask = torch.cat([batch_mask, batch_mask.new_ones(own, extra.shape[0])], 1)
            else:
                own_negatives = extra_negatives
        table, table_ok, table_which, stale = fresh.float(), fresh_ok, rows.which, rows.fetched.embeddings
        if rows.chosen is not None:  # chosen draws score re-encoded rows, the others their cached embeddings
            table, table_ok, table_which, stale = self._mixed_table(
                fresh, fresh_ok, rows.fetched.embeddings, rows.chosen_draws[home.rows >= 0], rows.chosen, rows.which)
        inputs = (query_embeddings, positives, home.lse, home.rows, table_which, zero_rows(table, table_ok), table_ok,
                  stale, self.score_fn.on_dots, batch_positives, batch_mask)
        losses = query_losses(*inputs, leave_out=~positive_ok, own_negatives=own_negatives)
        bad = nonfinite_queries(losses, home.lse, positive_ok)
        reduced = (self.reduction, self.comm.world_size, self._global_batch)
        bad |= overflowing(losses.training, bad, *reduced) & positive_ok
        if self.nonfinite == "skip" and bool(bad.any()):
            losses = query_losses(*inputs, leave_out=~positive_ok | bad, own_negatives=own_negatives)
        if rows.chosen is not None:  # staleness is known for re-encoded draws only
            losses.staleness = torch.where(rows.chosen_draws, losses.staleness, float("nan"))
        result = StepResult(
            loss=reduce_loss(losses.training, *reduced), loss_scale=loss_scale(*reduced, own),
            training_loss=losses.training.detach(), interpretable_loss=losses.interpretable.detach(),
            prob_positive=losses.prob_positive, lse=home.lse, sampled_rows=home.rows,
            staleness=losses.staleness, refreshed_rows=home.rows.new_empty(0), inserted_rows=home.rows.new_empty(0),
            reencoded_rows=rows.global_rows if rows.chosen is None else rows.global_rows[rows.chosen], reencoded=fresh,
        )
        return result, fresh_ok, bad

    def _refreshes(self, slots: torch.Tensor, rows: torch.Tensor, flagged: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(unique local slots, fresh rows) this rank, as owner, refreshes: flagged rows only (a re-encoded subset),
        storable ones only (``nonfinite='skip'``), the first occurrence where two homes sent the same row."""
        if flagged:
            written = rows[:, -1] > 0
            slots, rows = slots[written], rows[written, :-1]
        if self.nonfinite == "skip":
            ok = self.store.codec.storable(rows)
            slots, rows = slots[ok], rows[ok]
        slots, first_row = first_occurrence(slots)
        return slots, rows[first_row]

    def _write(self, result: StepResult, batch: _Batch, document_data: Mapping[str, torch.Tensor],
               document_embeddings: torch.Tensor, budget: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None) -> None:
        """Step 8: the refreshes in place, then the positives: inserted over the oldest rows (streaming), or
        written into their own rows at their owners (corpus mode, after the refresh budget's rows)."""
        corpus, positive_ok = batch.corpus, batch.positive_ok
        lru = self.use_lru or corpus is not None  # a corpus row's age: steps since last encoded
        result.refreshed_rows = self.layout.to_global(self.store.refresh(*result.refreshes, lru, distinct=True))
        if corpus is not None:
            rewritten = self._refresh_corpus_rows(corpus, document_data, document_embeddings, positive_ok, budget)
            result.refreshed_rows = torch.unique(torch.cat([result.refreshed_rows, rewritten]))
        else:
            new_emb, features = document_embeddings.detach().float(), batch.features
            if self.nonfinite == "skip":
                features = {k: v.select(positive_ok) if isinstance(v, Jagged) else v[positive_ok]
                            for k, v in features.items()}
                new_emb = new_emb[positive_ok]
            result.inserted_rows = self.layout.to_global(self.store.insert(new_emb, features))
        self.store.tick()

    def _raise_step_failures(
        self, step: int, values: dict[str, float], failed_ranks: float, failure: tuple[str, BaseException | None] | None
    ) -> None:
        """After the statistics all-reduce every rank knows the same counts, so all raise together (or none)."""
        if failed_ranks:
            mine, cause = failure if failure is not None else (None, None)
            self.comm.raise_together(mine, DocumentNetworkFailed, f"step {step}: document_network failed on ",
                                     "; cache unchanged", cause)
        if values["rejected_rows"] and self.nonfinite == "raise":
            raise NonFiniteRows(
                f"step {step}: the document tower produced NaN/Inf (or values the embedding codec cannot store) for "
                f"{int(values['rejected_rows'])} "
                "row(s) (sampled rows or positives, all ranks); cache unchanged. Use nonfinite='skip' to drop them."
            )
        count = int(values["nonfinite_queries"])
        if count and self.nonfinite == "raise":
            raise NonFiniteLoss(
                f"step {step}: the log-partition or loss of {count} {'query' if count == 1 else 'queries'} (all "
                "ranks) is NaN/Inf, or a rank's reduced loss of them overflows float32: scores overflowed "
                "(embeddings too large?) or the score transform returned NaN/Inf; cache unchanged. Use "
                "nonfinite='skip' to leave such queries out."
            )

    # ---- steps of the protocol -------------------------------------------------------------
    def _follow_device(self, query_embeddings: torch.Tensor) -> None:
        """Before the first step, a cache without an explicit device moves to the embeddings' device."""
        if self._device_fixed or not isinstance(query_embeddings, torch.Tensor):
            return
        if query_embeddings.device != self.device:
            s = self.store
            check_capacity(s.rows, s.dim, s.feature_specs, s.codec, query_embeddings.device, s.host_keys)
            self.to(query_embeddings.device)
            if self._corpus is not None:
                self._corpus = self._corpus.to(self.device)
        self._device_fixed = True

    def _agree_on_inputs(
        self,
        query_embeddings: torch.Tensor,
        document_embeddings: torch.Tensor,
        document_data: Mapping[str, torch.Tensor],
        settings: Callable[[], Mapping[str, Any]],
        corpus: CorpusIndex | None = None,
        extra_check: Callable[[], str | None] | None = None,
    ) -> tuple[list[int], dict[str, Any], torch.Tensor | None, list[torch.Tensor], torch.Tensor | None]:
        """Validates locally, then one all-gather makes every rank raise together or go on; ``settings()``
        (the configuration, the step and the mode) must be the same on every rank (built only where there
        is another rank to compare with).

        Returns the batch sizes of this shard group's ranks, this batch's features (jagged fields normalised),
        which positives the codec can store (finite and representable: the rows the step inserts), and what
        ``Comm.gather_agreed`` needs to gather the queries and positives' ids (the rows, and the agreement's
        payload when it carried them).
        """
        problem, features = self.schema.check_batch(
            query_embeddings, document_embeddings, document_data, self.device, self.layout.rows_per_rank
        )
        if problem is None and extra_check is not None:
            problem = extra_check()
        batch = query_embeddings.shape[0] if problem is None else 0
        # alone, a rank has no one to disagree with: the checksum (a repr of every setting) is skipped
        config_crc = zlib.crc32(repr(sorted(settings().items())).encode()) if self.comm.world_size > 1 else 0
        positive_ok, flags = None, []
        if problem is None:
            positive_ok = self.store.codec.storable(document_embeddings)
            flags.append((~finite_rows(query_embeddings), _ERR_QUERY_NONFINITE))
            if self.nonfinite == "raise":
                # fp32 storage holds every finite row: there the storable rows are the finite ones
                lossless = self.store.codec.storage_dtype == torch.float32
                finite_docs = positive_ok if lossless else finite_rows(document_embeddings)
                flags += [(~finite_docs, _ERR_DOC_NONFINITE), (finite_docs & ~positive_ok, _ERR_DOC_UNSTORABLE)]
        code = _flag_code(flags)
        status = torch.tensor([(_ERR_INPUT if problem else 0) + (code if isinstance(code, int) else 0), batch,
                               config_crc], device=self.device)
        if not isinstance(code, int):
            status[0] += code

        def describe(code: int) -> str:
            parts = [problem] if code & _ERR_INPUT else []
            if code & _ERR_QUERY_NONFINITE:
                parts.append("query_embeddings contain NaN or Inf")
            if code & _ERR_DOC_NONFINITE:
                parts.append("document_embeddings contain NaN or Inf")
            if code & _ERR_DOC_UNSTORABLE:
                codec = self.store.codec
                parts.append(f"document_embeddings hold values the {codec.name!r} embedding codec cannot store "
                             f"(finite, but the stored row would be Inf/NaN; its error bound: {codec.error_bound})")
            return "; ".join(p for p in parts if p)

        to_gather = self._rows_to_gather(query_embeddings, document_data, batch, corpus)
        table, payload = self.comm.agree(status, describe, to_gather)
        _, batches, crcs = zip(*table.tolist())  # the host table as ints: (code, batch, crc) per rank
        if len(set(crcs)) > 1:
            self._raise_config_mismatch(settings())
        self._global_batch = sum(batches)  # every group's batch: the denominator of global_mean
        return [batches[r] for r in self.comm.members], features, positive_ok, to_gather, payload

    def _raise_config_mismatch(self, settings: Mapping[str, Any]) -> None:
        configs = self.comm.all_gather_object(dict(settings))
        diffs = [
            f"{key}: " + ", ".join(f"rank {r}={c[key]!r}" for r, c in enumerate(configs))
            for key in configs[0]
            if any(c[key] != configs[0][key] for c in configs)
        ]
        raise BatchRejected("ranks disagree on the cache configuration, cache unchanged; " + "; ".join(diffs))

    def _rows_to_gather(self, query_embeddings: torch.Tensor, document_data: Mapping[str, torch.Tensor],
                        batch: int, corpus: CorpusIndex | None) -> list[torch.Tensor]:
        """The fp32 queries and (with a doc_id_key) the positives' exclusion ids: their doc ids, or in corpus mode
        their rows' exclusion keys. Zero rows of the same widths when the batch was rejected, so the agreement's
        buffers still match across ranks."""
        key = self.schema.doc_id_key
        if key is None:
            ids = None
        elif batch == 0:
            ids = torch.zeros(0, dtype=self.store.feature(CORPUS_KEY if corpus else key).dtype, device=self.device)
        elif corpus is not None:
            ids = corpus.lookup(document_data[key])[1]
        else:
            ids = document_data[key].reshape(-1).to(self.store.feature(key).dtype)
        queries = query_embeddings.detach().float() if batch else torch.zeros(0, self.schema.dim, device=self.device)
        return [queries] if ids is None else [queries, ids]

    # ---- corpus mode and the re-encoding choice (design §12) ---------------------------------
    @torch.no_grad()
    def prefill(
        self,
        doc_ids: torch.Tensor,
        document_data: Mapping[str, Any],
        encode_fn: Callable[[dict[str, Any]], torch.Tensor],
        *,
        batch_size: int = 256,
        progress: bool = True,
    ) -> None:
        """Fills a corpus-mode cache with the documents ``doc_ids`` [N] (their ``data_keys`` fields in
        ``document_data``: [N, ...] tensors, or for a jagged field any jagged form or a list of sequences).

        Every rank passes the same whole corpus and encodes only the documents it owns (``corpus.place``),
        ``batch_size`` at a time under ``inference_mode``, with a progress bar on rank 0. Every rank must
        call it together. The previous rows are discarded; ages start at 0. Bad input (N > cache_size,
        repeated ids, a missing or mis-shaped field, ranks with different ids) raises ValueError on every
        rank, and a failing ``encode_fn`` DocumentNetworkFailed, before anything is written.
        """
        if self.cache_mode != "corpus":
            raise ValueError("prefill needs cache_mode='corpus' (a streaming cache fills from its positives)")
        problem, columns, ids = None, {}, torch.empty(0, dtype=torch.int64)
        try:
            ids = _corpus_ids(doc_ids, self.layout.cache_size, batch_size)
            data_specs = {k: self.schema.specs[k] for k in self.schema.data_keys}
            columns = corpus_columns(document_data, data_specs, ids.numel())
        except ValueError as exc:
            problem = str(exc)
        status = torch.tensor([1 if problem else 0, ids_checksum(ids), ids.numel()], device=self.device)
        table, _ = self.comm.agree(status, lambda code: f"prefill: {problem}")
        if len({tuple(r) for r in table[:, 1:].tolist()}) > 1:
            raise ValueError("prefill: ranks passed different doc_ids (every rank must pass the same whole corpus); "
                             "cache unchanged")
        rank, group = self.comm.shard_rank, self.layout.shard_size
        rows = place(ids.numel(), group, self.layout.rows_per_rank)
        keys = content_keys(columns, ids) if self.exclude_duplicates else ids
        mine = torch.arange(rank, ids.numel(), group)  # this rank's documents (``place``)
        own = {k: select_rows(v, mine) for k, v in columns.items()}
        embeddings, failure = [], None
        bar = _progress(progress and self.comm.rank == 0 and ids.numel() >= _PREFILL_BAR_MIN_DOCS,
                        mine.numel(), "negcache prefill (rank 0's share)")
        with torch.inference_mode():
            for start, end, batch in row_batches(own, mine.numel(), batch_size):
                fetched = FetchedRows({k: v.to(self.device) for k, v in batch.items()},
                                      torch.empty(end - start, 0), torch.empty(0))
                out, failure = self._reencode(encode_fn, fetched, torch.empty(0, device=self.device))
                if failure is None and not bool(self.store.codec.storable(out).all()):
                    failure = (f"encode_fn returned NaN/Inf (or values the {self.store.codec.name!r} codec cannot "
                               f"store) in documents {ids[mine[start:end]][:4].tolist()}...", None)
                if failure is not None:
                    break
                embeddings.append(out.float().clone())
                bar.update(end - start)
        bar.close()
        failed = self.comm.all_reduce_sum(torch.tensor([float(failure is not None)], device=self.device))
        if float(failed[0]):
            mine_msg, cause = failure if failure is not None else (None, None)
            self.comm.raise_together(mine_msg, DocumentNetworkFailed, "prefill: encode_fn failed on ",
                                     "; cache unchanged", cause)
        features = {k: v.to(self.device) for k, v in own.items()}
        features[self.schema.doc_id_key] = ids[mine].to(self.device)
        features[CORPUS_KEY] = keys[mine].to(self.device)
        self.store.clear()
        slots = self.layout.to_local(rows[mine].to(self.device))
        emb = torch.cat(embeddings) if embeddings else torch.empty(0, self.schema.dim, device=self.device)
        self.store.write(slots, emb, features, age=0)
        self._corpus = CorpusIndex.build(ids.to(self.device), rows.to(self.device), keys.to(self.device))

    def _corpus_index(self) -> CorpusIndex:
        """The id -> row index; after a load (or before any prefill) rebuilt from the rows' doc id and key
        columns: one all-gather of 24 bytes per row over the shard group."""
        if self._corpus is None:
            local = torch.stack([self.store.feature(self.schema.doc_id_key).reshape(-1).to(torch.int64),
                                 self.store.feature(CORPUS_KEY).reshape(-1), self.store.filled.to(torch.int64)], 1)
            every = self.comm.gather_rows(local, [self.layout.rows_per_rank] * self.comm.shard_size, "corpus_index")
            filled = every[:, 2] > 0
            rows = torch.arange(every.shape[0], device=self.device)[filled]
            self._corpus = CorpusIndex.build(every[filled, 0], rows, every[filled, 1])
        return self._corpus

    def _check_step_extras(
        self,
        document_data: Mapping[str, torch.Tensor],
        query_embeddings: torch.Tensor,
        extra_negatives: torch.Tensor | None,
        corpus: CorpusIndex | None,
    ) -> str | None:
        """This rank's problem with the corpus ids or the extra negatives (checked at the agreement), or None."""
        if corpus is not None:
            ids = document_data[self.schema.doc_id_key].reshape(-1)
            found = corpus.lookup(ids)[2]
            if not bool(found.all()):
                missing = ids[~found][:4].tolist()
                return (f"document_data[{self.schema.doc_id_key!r}] holds {int((~found).sum())} id(s) not in the "
                        f"corpus (e.g. {missing}; the corpus has {len(corpus)} documents: call prefill first, "
                        "with every document a positive can name)")
        if extra_negatives is None:
            return None
        want = f"[{query_embeddings.shape[0]}, n, {self.schema.dim}]"
        if not isinstance(extra_negatives, torch.Tensor) or not extra_negatives.is_floating_point():
            return f"extra_negatives must be a floating tensor {want}, got {type(extra_negatives).__name__}"
        if (extra_negatives.dim() != 3 or extra_negatives.shape[0] != query_embeddings.shape[0]
                or extra_negatives.shape[2] != self.schema.dim):
            return f"extra_negatives must have shape {want}, got {list(extra_negatives.shape)}"
        if extra_negatives.device != self.device:
            return f"extra_negatives is on {extra_negatives.device} but the cache is on {self.device}"
        if not bool(torch.isfinite(extra_negatives).all()):
            return "extra_negatives contain NaN or Inf"
        return None

    def _chosen_draws(
        self, rows: torch.Tensor, which: torch.Tensor, query_pos: torch.Tensor, step: int, num_fetched: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(draws [B, m], fetched rows [U]) re-encoded: none, or each draw with probability f, keyed by (seed,
        step, global query, draw) so that every world size chooses the same."""
        sampled = rows >= 0
        if self.reencode_negatives == "none":
            draws = torch.zeros_like(sampled)
        else:
            keys = draw_keys(self.layout.stream_seed(self._seed), step, Stream.REENCODE, query_pos, rows.shape[1])
            draws = sampled & (uniform(keys) < float(self.reencode_negatives))
        per_row = torch.zeros(num_fetched, dtype=torch.bool, device=rows.device)
        per_row[which[draws[sampled]]] = True
        return draws, per_row

    def _mixed_table(
        self, fresh: torch.Tensor, fresh_ok: torch.Tensor, cached: torch.Tensor, drawn_chosen: torch.Tensor,
        chosen: torch.Tensor, which: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The rows the draws are scored with: the F re-encoded rows (tower gradient × 1 / f) then the U cached
        ones; each drawn entry's index into it; and the cached embedding of each (for staleness)."""
        weight = 1.0 / float(self.reencode_negatives) if self.reencode_negatives != "none" else 1.0
        position = torch.cumsum(chosen.to(torch.int64), 0) - 1  # a chosen row's place among the re-encoded
        index = torch.where(drawn_chosen, position[which], fresh.shape[0] + which)
        table = torch.cat([scale_gradient(fresh.float(), weight), cached.float()])
        ok = torch.cat([fresh_ok, torch.ones(cached.shape[0], dtype=torch.bool, device=cached.device)])
        return table, ok, index, torch.cat([cached[chosen], cached])

    def _refresh_corpus_rows(
        self, corpus: CorpusIndex, document_data: Mapping[str, torch.Tensor], document_embeddings: torch.Tensor,
        positive_ok: torch.Tensor, budget: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        """Writes the refresh budget's rows (slots, rows, storable), then each positive into its own row at its
        owner (last: a positive is this step's encoding of its document). Returns the global rows rewritten."""
        written = []
        if budget is not None:
            budget_slots, budget_rows, budget_ok = budget
            keep = budget_ok if self.nonfinite == "skip" else torch.ones_like(budget_ok)
            written.append(self.store.refresh(budget_slots[keep], budget_rows.detach().float()[keep], True))
        rows = corpus.lookup(document_data[self.schema.doc_id_key])[0][positive_ok]
        owners = self.layout.owner_of(rows)
        slots, emb = self.comm.send_to_owners(owners, rows - owners * self.layout.rows_per_rank,
                                              document_embeddings.detach().float()[positive_ok], "write_positives")
        written.append(self.store.refresh(slots, emb, True))
        return self.layout.to_global(torch.unique(torch.cat(written)))

    @property
    def scan_backend(self) -> str:
        """The scan backend that runs on the current device: 'torch', 'native' or 'triton' (``scoring_backend``
        as :func:`scoring.resolve_backend` resolves it; ``config()`` says why)."""
        return self._resolved_backend()[0]

    def _resolved_backend(self) -> tuple[str, str]:
        """(backend, reason), resolved once per device (the device is known at the first step); logged once."""
        if self._backend is None or self._backend[0] != self.device:
            backend, why = resolve_backend(self.scoring_backend, self.device, self.score_fn, self.top_k)
            self._backend = (self.device, backend, why)
            _log.info("sharded_negcache: scoring backend %s (%s)", backend, why)
        return self._backend[1], self._backend[2]

    def chunk_rows(self, num_queries: int) -> int:
        """Rows scored per chunk in a scan of ``num_queries`` queries: ``chunk_bytes / (4 · queries)`` in whole
        sampling blocks (at least one), the chunk budget of the device when ``chunk_bytes`` is None."""
        bs = self.layout.block_size
        budget = self.chunk_bytes or DEFAULT_CHUNK_BYTES.get(self.device.type, DEFAULT_CHUNK_BYTES["cpu"])
        return max(bs, budget // (4 * max(num_queries, 1)) // bs * bs)

    def _reencode(
        self,
        document_network: Callable[[dict[str, torch.Tensor]], torch.Tensor],
        fetched: FetchedRows,
        query_embeddings: torch.Tensor,
    ) -> tuple[torch.Tensor, tuple[str, BaseException | None] | None]:
        """Current-tower embeddings of the sampled rows (with gradient); by default not called when none was sampled.

        A tower that raises or returns anything but [rows, d] floats does not raise here (the other ranks
        would wait in the next collective): it gives zero rows and (message, exception) for step 6.
        """
        count = fetched.embeddings.shape[0]

        def zeros() -> torch.Tensor:  # what a failed or skipped re-encoding gives
            return query_embeddings.new_zeros(count, self.schema.dim, dtype=torch.float32)

        if count == 0 and not self.reencode_on_every_rank:
            return zeros(), None
        try:
            fresh = document_network(self.schema.network_input(fetched.features))
        except Exception as exc:  # reported on every rank after the statistics all-reduce
            return zeros(), (f"{type(exc).__name__}: {exc}", exc)
        if (isinstance(fresh, torch.Tensor) and fresh.is_floating_point()
                and tuple(fresh.shape) == (count, self.schema.dim) and fresh.device == self.device):
            return fresh, None
        want = f"a floating-point tensor of shape [{count}, {self.schema.dim}] on {self.device}"
        got = (f"got shape {list(fresh.shape)} dtype {fresh.dtype} on {fresh.device}" if isinstance(fresh, torch.Tensor)
               else f"got {type(fresh).__name__}")
        return zeros(), (f"document_network must return {want} (one embedding per row given), {got}", None)

    def _advance_step(self) -> None:
        self._step += 1
        self.step_count.fill_(self._step)

    def _eager_fetch(self, sizes: list[int]) -> bool:
        """Whether rows ride with the partials this step (see ``eager_fetch_bytes``): the same on every rank (it
        depends on the agreed sizes and the configuration only)."""
        if not self.comm.active or self.comm.two_level or self.store.jagged_fields:
            return False
        candidates = sum(sizes) * (self.top_k or self.num_negatives) * self.store.row_bytes()
        write_back = self.comm.shard_size * max(min(s * self.num_negatives, self.layout.rows_per_rank) for s in sizes)
        return max(candidates, write_back * (8 + 4 * (self.schema.dim + 1))) <= self.eager_fetch_bytes

    def _candidate_rows(self, partials: LocalPartials) -> torch.Tensor:
        """[B_g, n, row bytes]: the packed rows of each gathered query's n local candidates (winners or top-k;
        slot 0's bytes where there is none, never sampled)."""
        rows = partials.topk_row if partials.topk_row is not None else partials.win_row
        slots = torch.where(rows >= 0, rows - self.layout.row_offset, 0)
        packed, _ = self.store.pack(slots.reshape(-1))
        return packed.view(rows.shape[0], rows.shape[1], self.store.row_bytes())

    def _rows_back(self, fresh: torch.Tensor, chosen: torch.Tensor | None, fetched: int) -> torch.Tensor:
        """The rows sent back to their owners, in fetch order: the fresh ones; with a re-encoded subset, every
        fetched row plus a last column flagging the re-encoded ones (only those are written)."""
        if chosen is None:
            return fresh.detach().float()
        back = fresh.new_zeros(fetched, self.schema.dim + 1, dtype=torch.float32)
        back[chosen] = torch.cat([fresh.detach().float(), fresh.new_ones(fresh.shape[0], 1)], 1)
        return back

    def _metric_sums(
        self,
        result: StepResult,
        fetched: FetchedRows,
        which: torch.Tensor,
        rejected: torch.Tensor,
        inserting: torch.Tensor,
        tower_failed: bool,
        nonfinite: torch.Tensor,
    ) -> torch.Tensor:
        """This rank's sums behind the global metrics (float64), summed over the job before any write: the finite
        interpretable losses and their count, the drawn rows' staleness, count and age, the filled rows after the
        insert, rejected rows, non-finite queries, whether the tower failed. (Stacked, then one masked sum per
        group: a few ops instead of one per value.)"""
        drawn = torch.isfinite(result.staleness)
        ages = spread(fetched.ages.double(), result.sampled_rows, which, 0.0)
        il = result.interpretable_loss.double()
        il_ok = torch.isfinite(il)
        per_query = torch.stack([il, torch.ones_like(il)]).where(il_ok, 0.0).sum(1)
        per_draw = torch.stack([result.staleness.double(), torch.ones_like(ages), ages]).where(drawn, 0.0).sum((1, 2))
        filled = self.store.filled.sum()
        counts = torch.stack([filled + torch.minimum(inserting, self.layout.rows_per_rank - filled), rejected, nonfinite,
                              torch.tensor(int(tower_failed), device=filled.device)]).double()
        return torch.cat([per_query, per_draw, counts])

    def _global_metrics(self, sums: torch.Tensor) -> tuple[dict[str, float], float]:
        """Global means from the job's summed :meth:`_metric_sums` (the same on every rank), and the number of
        ranks whose tower failed."""
        il_sum, nq, st, ns, age, filled, rej, bad, failed = sums.tolist()
        return {
            "interpretable_loss": il_sum / max(nq, 1),
            "staleness": st / ns if ns else 0.0,
            "fill_fraction": filled / self.layout.total_rows,
            "sampled_age": age / ns if ns else 0.0,
            "sampled": ns,
            "rejected_rows": rej,
            "nonfinite_queries": bad,
        }, failed


def _first_copies(received: CandidateRows, home: Any, sampled: torch.Tensor, which: torch.Tensor,
                  count: int) -> torch.Tensor:
    """[U, row bytes]: the packed bytes of each unique sampled row (``which`` maps samples to them), read from
    the candidates ``received`` at each row's first sample's source (sender * n + candidate)."""
    first = torch.full((count,), which.numel(), dtype=torch.int64, device=which.device)
    first.scatter_reduce_(0, which, torch.arange(which.numel(), device=which.device), reduce="amin")
    draw = sampled.reshape(-1).nonzero().squeeze(1)[first]  # each row's first sample, as a flat (query, draw)
    source = home.source.reshape(-1)[draw]
    return received.select(source // received.n, draw // sampled.shape[1], source % received.n)


def _flag_code(flags: list[tuple[torch.Tensor, int]]) -> int | torch.Tensor:
    """The sum of the bits whose [n] bool mask has a True: on the host for CPU tensors (a host read is free
    there), else on the device (no host read)."""
    if flags and flags[0][0].device.type == "cpu":
        return sum(bit for mask, bit in flags if bool(mask.any()))
    return sum((mask.any().to(torch.int64) * bit for mask, bit in flags), start=0)


def _engine_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """Scoring and the losses run at the engine's precision (fp32 products of the decoded codec), not at the
    caller's autocast dtype: autocast is switched off inside (the tower call keeps it)."""
    if torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _check_state_dict_before_loading(module: nn.Module, state_dict: Mapping[str, Any], prefix: str,
                                     local_metadata: Any, strict: bool, *_: Any) -> None:
    """Runs before anything of the handler is loaded: every tensor's shape and dtype (and, in a strict
    ``handler.load_state_dict``, the key set) must match, or nothing changes (not even the step counter).
    torch passes ``strict=True`` to every pre-hook, hence the flag set by :meth:`load_state_dict`."""
    if not isinstance(module, ShardedCacheLossHandler):
        return
    mine = module.state_dict()
    pools = {f"store.{name}.values" for name, m in module.store.named_modules() if isinstance(m, JaggedColumn)}
    problems = []
    for key, have in mine.items():
        got = state_dict.get(prefix + key)
        if got is None:
            continue
        if not isinstance(got, torch.Tensor):
            problems.append(f"{prefix}{key} is a {type(got).__name__}, not a tensor")
        elif key in pools:  # a value pool's size varies (it grows); its kind does not
            if got.dim() != 1 or got.dtype != have.dtype:
                problems.append(f"{prefix}{key} must be a 1-D {have.dtype} pool, got {list(got.shape)} {got.dtype}")
        elif got.shape != have.shape or got.dtype != have.dtype:
            problems.append(f"{prefix}{key} is {list(got.shape)} {got.dtype} in the state_dict, this handler's is "
                            f"{list(have.shape)} {have.dtype}")
    if getattr(module, "_loading_strict", False):  # set by a direct, strict load_state_dict call
        missing = sorted(prefix + k for k in mine if prefix + k not in state_dict)
        extra = sorted(k for k in state_dict if k.startswith(prefix) and k[len(prefix):] not in mine)
        if missing:
            problems.append(f"missing {missing}")
        if extra:
            problems.append(f"unexpected {extra}")
    if problems:
        raise ValueError(
            "load_state_dict: " + "; ".join(problems) + " (saved with another cache_size, world size, codec or "
            "specs? sharded_negcache.checkpoint reshards across world sizes); nothing was loaded"
        )
def _sync_host_counters(module: nn.Module, incompatible_keys: Any) -> None:
    """After load_state_dict, the host mirrors of the step counter and seed follow the loaded buffers."""
    if isinstance(module, ShardedCacheLossHandler):
        module._step = int(module.step_count)
        module._seed = int(module.seed)
        module._corpus = None  # corpus mode: the id -> row index is rebuilt from the loaded rows


def _check_corpus_options(cache_mode: str, doc_id_key: str | None, reencode_negatives: Any, refresh_budget: Any,
                          exclude_duplicates: Any, specs: Mapping[str, Any]) -> None:
    """The corpus-mode and re-encoding arguments, refused by name before anything is built."""
    if cache_mode not in ("stream", "corpus"):
        raise ValueError(f"cache_mode must be 'stream' or 'corpus', got {cache_mode!r}")
    if cache_mode == "corpus" and doc_id_key is None:
        raise ValueError("cache_mode='corpus' needs doc_id_key: the rows are addressed by document id")
    if cache_mode == "corpus" and CORPUS_KEY in specs:
        raise ValueError(f"cache_mode='corpus' stores a field {CORPUS_KEY!r}: rename the spec of that name")
    fraction = isinstance(reencode_negatives, float) and 0.0 < reencode_negatives <= 1.0
    if reencode_negatives not in ("all", "none") and not fraction:
        raise ValueError(f"reencode_negatives must be 'all', 'none' or a float in (0, 1], got {reencode_negatives!r}")
    if not isinstance(refresh_budget, int) or isinstance(refresh_budget, bool) or refresh_budget < 0:
        raise ValueError(f"refresh_budget must be an int >= 0, got {refresh_budget!r}")
    if cache_mode != "corpus" and (refresh_budget or exclude_duplicates):
        raise ValueError("refresh_budget and exclude_duplicates need cache_mode='corpus' (a streaming cache has "
                         "no fixed set of documents to refresh or to group)")


def _corpus_ids(doc_ids: Any, cache_size: int, batch_size: Any) -> torch.Tensor:
    """``doc_ids`` as a 1-D int64 CPU tensor of distinct ids fitting the cache, else ValueError naming it."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not isinstance(doc_ids, torch.Tensor) or doc_ids.dim() != 1 or doc_ids.dtype not in (torch.int32, torch.int64):
        got = f"{list(doc_ids.shape)} {doc_ids.dtype}" if isinstance(doc_ids, torch.Tensor) else type(doc_ids).__name__
        raise ValueError(f"doc_ids must be a 1-D int64 (or int32) tensor, got {got}")
    if doc_ids.numel() > cache_size:
        raise ValueError(f"the corpus has {doc_ids.numel()} documents but cache_size is {cache_size}: corpus mode "
                         "holds every document in its own row (raise cache_size, or use cache_mode='stream')")
    ids = doc_ids.cpu().to(torch.int64)
    uniq, counts = torch.unique(ids, return_counts=True)
    if uniq.numel() != ids.numel():
        raise ValueError(f"doc_ids must be distinct: {int((counts > 1).sum())} id(s) repeat, e.g. "
                         f"{uniq[counts > 1][:4].tolist()} (each document has one row and one id)")
    return ids


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(show: bool, total: int, desc: str) -> Any:
    """A tqdm bar when ``show`` and tqdm is installed, else one that does nothing."""
    if show:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return _NoBar()
        return tqdm(total=total, desc=desc, unit="doc")
    return _NoBar()
