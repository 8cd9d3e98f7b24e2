"""``ShardedCacheLossHandler``: one training step of the negative cache, as the protocol of design §3.

The handler only orchestrates. Validation lives in ``specs``, the partition in ``layout``, rows in
``store``, the hot loop in ``scoring``, collectives in ``exchange``, merging in ``combine`` and the
formulas in ``loss``. Read :meth:`update_cache_and_compute_loss` top to bottom: it is the protocol.
"""
from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.profiler import record_function

from . import metrics
from .codecs import EmbeddingCodec, make_codec
from .combine import HomePartials, merge_partials, pack_partials
from .exchange import DEFAULT_TIMEOUT_S, BatchRejected, CollectiveFailed, Comm
from .jagged import Jagged
from .layout import ShardLayout
from .loss import cache_losses, staleness
from .scoring import ScoreFn, make_score_fn, resolve_backend, score_shard
from .specs import CacheSchema, FieldSpec
from .store import CacheTooLarge, FetchedRows, ShardStore, check_capacity

__all__ = [
    "ShardedCacheLossHandler", "StepResult", "BatchRejected", "NonFiniteRows", "CollectiveFailed", "CacheTooLarge",
]

_log = logging.getLogger("sharded_negcache")

# Score-matrix bytes per chunk: bounds scoring memory. On CPU a small chunk stays cache-friendly
# (2-8 MB measured best, 32 MB 35-45% slower); a GPU wants few, large kernels.
DEFAULT_CHUNK_BYTES = {"cpu": 8 << 20, "cuda": 256 << 20}

# Profiler range names of the protocol steps, in order (``negcache/agree`` ... ``negcache/insert``).
STAGE_PREFIX = "negcache/"
STAGES = ("agree", "gather", "score", "partials", "fetch", "reencode", "losses", "stats", "write_back", "insert")

Reduction = Literal["mean", "global_mean", "sum"]

_ERR_INPUT, _ERR_QUERY_NONFINITE, _ERR_DOC_NONFINITE = 1, 2, 4


class NonFiniteRows(FloatingPointError):
    """The document tower produced NaN/Inf for some rows (policy 'raise'); raised on every rank, nothing written."""


@dataclass
class StepResult:
    """What one step did, for this rank (detached). ``metrics`` holds global means (same on every rank)."""

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


class ShardedCacheLossHandler(nn.Module):
    """Negative-cache loss over a cache sharded row-wise across the ranks of a process group.

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
        CPU, 256 MB on CUDA.
      scoring_backend: 'auto' (the fused Triton kernel on CUDA when triton imports, sampling mode and a
        float score transform; else the torch scan), 'torch' or 'triton'. The choice is logged once.
      reduction: 'mean' over this rank's queries (the reference), 'global_mean' (scaled so that DDP's
        gradient average equals the mean over the global batch) or 'sum'.
      in_batch_negatives: also use the other positives of the global batch as fresh candidates (design
        §2 "cache plus in-batch negatives"); their gradient flows back to every rank's document tower.
      nonfinite: NaN/Inf from the document tower. 'raise' (default): non-finite document embeddings are
        rejected with the batch, and non-finite re-encoded rows raise NonFiniteRows on every rank before
        anything is written. 'skip': such rows are neither inserted nor refreshed, their terms leave the
        loss, and they are counted in ``cache/rejected_rows``.
      collective_timeout_s: a collective that does not complete in this time (a rank died or stalled)
        raises CollectiveFailed naming the step and the collective.
      host_features: feature fields kept in host memory (pinned where CUDA is present) while the
        embeddings stay on ``device``; only sampled rows' features are read each step.
      reencode_on_every_rank: call ``document_network`` on every rank every step, with zero rows where
        nothing was sampled; needed when the tower runs collectives itself (e.g. a TorchRec sharded
        embedding lookup). By default a rank that sampled nothing does not call it.
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
        scoring_backend: Literal["auto", "torch", "triton"] = "auto",
    ) -> None:
        super().__init__()
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
        self.schema = CacheSchema(specs, embedding_key, data_keys, doc_id_key)
        self.comm = Comm(process_group, collective_timeout_s)
        self.nonfinite = nonfinite
        self.layout = ShardLayout.build(cache_size, process_group, block_size)
        self.score_fn: ScoreFn = make_score_fn(score_transform)
        if scoring_backend != "auto":  # refuse an impossible request now (the device may come later)
            resolve_backend(scoring_backend, torch.device("cuda"), self.score_fn, top_k)
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
        check_capacity(self.layout.rows_per_rank, self.schema.dim, specs, codec, device, host_features)
        self.store = ShardStore(self.layout.rows_per_rank, self.schema.dim, specs, codec, device, host_features)
        self.register_buffer("step_count", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("seed", torch.tensor(seed, dtype=torch.int64, device=device))
        self._step, self._seed, self._global_batch = 0, seed, 0
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
            "scoring_backend": self.scoring_backend,
        }

    # ---- whole-cache views (tests and resharding; gathers everything, not for the hot path) ----
    def gather_global_rows(self) -> dict[str, torch.Tensor]:
        """The whole cache in global row order, on every rank (see :meth:`ShardStore.export_rows`)."""
        local = self.store.export_rows()
        sizes = [self.layout.rows_per_rank] * self.comm.world_size
        return {k: self.comm.gather_rows(v, sizes) for k, v in local.items()}

    def load_global_rows(self, rows: Mapping[str, torch.Tensor]) -> None:
        """Sets this rank's shard from whole-cache tensors in global row order (each rank takes its slice)."""
        lo, hi = self.layout.row_offset, self.layout.row_offset + self.layout.rows_per_rank
        for key, t in rows.items():
            if t.shape[0] != self.layout.cache_size:
                raise ValueError(f"rows[{key!r}] has {t.shape[0]} rows, the cache has {self.layout.cache_size}")
        self.store.import_rows({k: v[lo:hi].to(self.device) for k, v in rows.items()})

    # ---- the step --------------------------------------------------------------------------
    def update_cache_and_compute_loss(
        self,
        document_network: Callable[[dict[str, torch.Tensor]], torch.Tensor],
        query_embeddings: torch.Tensor,
        document_embeddings: torch.Tensor,
        document_data: Mapping[str, torch.Tensor],
        writer: Any = None,
    ) -> torch.Tensor:
        """Loss of this rank's queries against positives plus the whole sharded cache; updates the cache.

        ``document_network`` maps a dict of the ``data_keys`` fields of some rows to their embeddings.
        Every rank must call this together (it runs collectives), with any batch size, zero included.
        """
        self._follow_device(query_embeddings)
        self.comm.step = self._step
        with _stage("agree"):
            sizes, features = self._agree_on_inputs(query_embeddings, document_embeddings, document_data)
        rank, step, m = self.comm.rank, self._step, self.num_negatives
        own, first = sizes[rank], sum(sizes[:rank])
        self._global_batch = sum(sizes)
        query_pos = torch.arange(first, first + own, device=self.device)

        with torch.no_grad():
            # 1. gather every rank's queries (and their positives' ids).
            with _stage("gather"):
                queries = self.comm.gather_rows(query_embeddings.detach().float(), sizes)
                exclude = self._gather_positive_ids(document_data, sizes)
            # 2. score them against the local rows, chunk by chunk.
            with _stage("score"):
                partials = score_shard(
                    self.store, self.layout, queries, self.score_fn,
                    num_draws=m, top_k=self.top_k, seed=self._seed, step=step,
                    chunk_rows=self._chunk_rows(sum(sizes)),
                    exclude_key=self.schema.doc_id_key, exclude_ids=exclude, backend=self._scoring_backend(),
                )
            # 3. send each query's partials to its home rank and combine them there.
            with _stage("partials"):
                received = self.comm.partials_to_home(pack_partials(partials), sizes)
                home = merge_partials(
                    received, num_draws=m, top_k=self.top_k, seed=self._seed, step=step, query_pos=query_pos
                )
        # 4. fetch the sampled rows from their owners and re-encode them with gradient.
        with _stage("fetch"):
            sampled = home.rows >= 0
            unique_rows, which = torch.unique(home.rows[sampled], return_inverse=True)
            owners = self.layout.owner_of(unique_rows)
            packed, jagged, route = self.comm.fetch_rows(
                owners, unique_rows - owners * self.layout.rows_per_rank, self.store.pack, self.store.jagged_lengths
            )
            fetched = self.store.unpack(packed, jagged)
        with _stage("reencode"):
            fresh = self._reencode(document_network, fetched, query_embeddings)
        # 5. the losses (rows the tower made non-finite are left out; optionally in-batch negatives).
        with _stage("losses"):
            fresh_ok = torch.isfinite(fresh.detach()).all(1)
            positive_ok = torch.isfinite(document_embeddings.detach()).all(1)
            positives = torch.where(positive_ok.unsqueeze(1), document_embeddings.float(), 0.0)
            in_batch = self._in_batch_scores(query_embeddings, positives, exclude, sizes)
            result = self._losses(
                query_embeddings, positives, positive_ok, home, which, fresh_ok,
                torch.where(fresh_ok.unsqueeze(1), fresh.float(), 0.0), fetched, in_batch,
            )
        # 6. global statistics; every rank learns of non-finite rows before anything is written.
        with _stage("stats"):
            rejected = (~fresh_ok).sum() + (~positive_ok).sum()
            result.metrics = self._global_metrics(result, fetched, which, rejected, positive_ok.sum())
        if result.metrics["rejected_rows"] and self.nonfinite == "raise":
            raise NonFiniteRows(
                f"step {step}: the document tower produced NaN/Inf for {int(result.metrics['rejected_rows'])} "
                "row(s) (sampled rows or positives, all ranks); cache unchanged. Use nonfinite='skip' to drop them."
            )
        # 7. fresh embeddings back to the owners, written in place; 8. insert the positives.
        with _stage("write_back"):
            slots, rows = self.comm.write_back(route, fresh.detach().float())
            new_emb = document_embeddings.detach().float()
            if self.nonfinite == "skip":
                ok = torch.isfinite(rows).all(1)
                slots, rows = slots[ok], rows[ok]
                features = {
                    k: v.select(positive_ok) if isinstance(v, Jagged) else v[positive_ok] for k, v in features.items()
                }
                new_emb = new_emb[positive_ok]
            refreshed = self.store.refresh(slots, rows, self.use_lru)
        with _stage("insert"):
            inserted = self.store.insert(new_emb, features)
            self.store.tick()
        self._advance_step()
        result.refreshed_rows = self.layout.to_global(refreshed)
        result.inserted_rows = self.layout.to_global(inserted)
        log_to, log_step = metrics.resolve_writer(writer, step)
        metrics.write_scalars(log_to, log_step, result.metrics, rank)
        self.last_step = result
        return result.loss

    forward = update_cache_and_compute_loss

    # ---- steps of the protocol -------------------------------------------------------------
    def _follow_device(self, query_embeddings: torch.Tensor) -> None:
        """Before the first step, a cache without an explicit device moves to the embeddings' device."""
        if self._device_fixed or not isinstance(query_embeddings, torch.Tensor):
            return
        if query_embeddings.device != self.device:
            s = self.store
            check_capacity(s.rows, s.dim, s.feature_specs, s.codec, query_embeddings.device, s.host_keys)
            self.to(query_embeddings.device)
        self._device_fixed = True

    def _agree_on_inputs(
        self,
        query_embeddings: torch.Tensor,
        document_embeddings: torch.Tensor,
        document_data: Mapping[str, torch.Tensor],
    ) -> tuple[list[int], dict[str, Any]]:
        """Validates locally, then one all-gather makes every rank raise together or go on.

        Returns the batch sizes of all ranks and this batch's features (jagged fields normalised).
        """
        problem, features = self.schema.check_batch(
            query_embeddings, document_embeddings, document_data, self.device, self.layout.rows_per_rank
        )
        batch = query_embeddings.shape[0] if problem is None else 0
        config_crc = zlib.crc32(repr(sorted(self.config().items())).encode())
        status = torch.tensor([_ERR_INPUT if problem else 0, batch, config_crc], device=self.device)
        if problem is None:
            status[0] += (~torch.isfinite(query_embeddings)).any().to(torch.int64) * _ERR_QUERY_NONFINITE
            if self.nonfinite == "raise":
                status[0] += (~torch.isfinite(document_embeddings)).any().to(torch.int64) * _ERR_DOC_NONFINITE

        def describe(code: int) -> str:
            parts = [problem] if code & _ERR_INPUT else []
            if code & _ERR_QUERY_NONFINITE:
                parts.append("query_embeddings contain NaN or Inf")
            if code & _ERR_DOC_NONFINITE:
                parts.append("document_embeddings contain NaN or Inf")
            return "; ".join(p for p in parts if p)

        table = self.comm.agree(status, describe)
        if len(set(table[:, 2].tolist())) > 1:
            self._raise_config_mismatch()
        return table[:, 1].tolist(), features

    def _raise_config_mismatch(self) -> None:
        configs = self.comm.all_gather_object(self.config())
        diffs = [
            f"{key}: " + ", ".join(f"rank {r}={c[key]!r}" for r, c in enumerate(configs))
            for key in configs[0]
            if any(c[key] != configs[0][key] for c in configs)
        ]
        raise BatchRejected("ranks disagree on the cache configuration, cache unchanged; " + "; ".join(diffs))

    def _gather_positive_ids(self, document_data: Mapping[str, torch.Tensor], sizes: list[int]) -> torch.Tensor | None:
        key = self.schema.doc_id_key
        if key is None:
            return None
        own = document_data[key].reshape(-1).to(self.store.feature(key).dtype)
        return self.comm.gather_rows(own, sizes)

    def _scoring_backend(self) -> str:
        """The scan's backend, resolved on the first step on a device (known then); logged once per device."""
        if self._backend is None or self._backend[0] != self.device:
            backend, why = resolve_backend(self.scoring_backend, self.device, self.score_fn, self.top_k)
            self._backend = (self.device, backend)
            _log.info("sharded_negcache: scoring backend %s (%s)", backend, why)
        return self._backend[1]

    def _chunk_rows(self, num_queries: int) -> int:
        budget = self.chunk_bytes or DEFAULT_CHUNK_BYTES.get(self.device.type, DEFAULT_CHUNK_BYTES["cpu"])
        return max(self.layout.block_size, budget // (4 * max(num_queries, 1)))

    def _reencode(
        self,
        document_network: Callable[[dict[str, torch.Tensor]], torch.Tensor],
        fetched: FetchedRows,
        query_embeddings: torch.Tensor,
    ) -> torch.Tensor:
        """Current-tower embeddings of the sampled rows (with gradient); by default not called when none was sampled."""
        count = fetched.embeddings.shape[0]
        if count == 0 and not self.reencode_on_every_rank:
            return query_embeddings.new_zeros(0, self.schema.dim)
        fresh = document_network(self.schema.network_input(fetched.features))
        if not isinstance(fresh, torch.Tensor) or tuple(fresh.shape) != (count, self.schema.dim):
            got = tuple(fresh.shape) if isinstance(fresh, torch.Tensor) else type(fresh).__name__
            raise ValueError(f"document_network must return [{count}, {self.schema.dim}] embeddings, got {got}")
        return fresh

    def _in_batch_scores(
        self,
        query_embeddings: torch.Tensor,
        document_embeddings: torch.Tensor,
        positive_ids: torch.Tensor | None,
        sizes: list[int],
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Scores [B, B_g] of my queries against every rank's positives (with gradient) and their mask.

        A query's own positive is not its negative, nor is any positive with the same document id.
        """
        if not self.in_batch_negatives:
            return None
        positives = self.comm.gather_rows_with_grad(document_embeddings, sizes)
        scores = self.score_fn.on_dots(query_embeddings.float() @ positives.t())
        own = sizes[self.comm.rank]
        first = sum(sizes[: self.comm.rank])
        cols = torch.arange(positives.shape[0], device=self.device)
        rows = torch.arange(first, first + own, device=self.device)
        mask = cols.unsqueeze(0) != rows.unsqueeze(1)
        if positive_ids is not None:
            mask &= positive_ids.unsqueeze(0) != positive_ids[first : first + own].unsqueeze(1)
        return scores, mask

    def _losses(
        self,
        query_embeddings: torch.Tensor,
        positives: torch.Tensor,
        positive_ok: torch.Tensor,
        home: HomePartials,
        which: torch.Tensor,
        fresh_ok: torch.Tensor,
        fresh: torch.Tensor,
        fetched: FetchedRows,
        in_batch: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> StepResult:
        """Per-query losses; ``positives`` and ``fresh`` are finite (non-finite rows zeroed and masked out)."""
        q = query_embeddings.float()
        pos_scores = self.score_fn.on_dots((q * positives).sum(-1))
        rows = home.rows
        drawn = _spread(fresh_ok, rows, which, False)  # a real draw whose re-encoding is finite
        if fresh.shape[0]:
            index = _spread(torch.arange(fresh.shape[0], device=rows.device), rows, which, 0)
            neg_scores = self.score_fn.on_dots(torch.einsum("bd,bmd->bm", q, fresh[index]))
        else:
            neg_scores = q.new_zeros(rows.shape)
        stale = _spread(staleness(fetched.embeddings, fresh), rows, which, float("nan"))
        batch_scores, batch_mask = in_batch if in_batch is not None else (None, None)
        training, interpretable, prob = cache_losses(pos_scores, home.lse, neg_scores, drawn, batch_scores, batch_mask)
        training = torch.where(positive_ok, training, 0.0)  # a query whose positive is non-finite is left out
        total = training.sum()
        if self.reduction == "mean":
            loss = total / max(training.shape[0], 1)
        elif self.reduction == "global_mean":
            loss = total * self.comm.world_size / max(self._global_batch, 1)
        else:
            loss = total
        return StepResult(
            loss=loss,
            training_loss=training.detach(),
            interpretable_loss=torch.where(positive_ok, interpretable, float("nan")),
            prob_positive=prob,
            lse=home.lse,
            sampled_rows=rows,
            staleness=torch.where(drawn, stale, float("nan")),
            refreshed_rows=rows.new_empty(0),
            inserted_rows=rows.new_empty(0),
        )

    def _advance_step(self) -> None:
        self._step += 1
        self.step_count.fill_(self._step)

    def _global_metrics(
        self,
        result: StepResult,
        fetched: FetchedRows,
        which: torch.Tensor,
        rejected: torch.Tensor,
        inserting: torch.Tensor,
    ) -> dict[str, float]:
        """One all-reduce of sums, then global means (the same on every rank); runs before any write."""
        drawn = torch.isfinite(result.staleness)
        ages = _spread(fetched.ages.double(), result.sampled_rows, which, 0.0)
        filled = self.store.filled.sum()
        filled_after = filled + torch.minimum(inserting, self.layout.rows_per_rank - filled)
        il = result.interpretable_loss.double()
        sums = torch.stack([
            torch.nan_to_num(il, nan=0.0).sum(),
            torch.isfinite(il).sum().double(),
            torch.where(drawn, result.staleness.double(), 0.0).sum(),
            drawn.sum().double(),
            torch.where(drawn, ages, 0.0).sum(),
            filled_after.double(),
            rejected.double(),
        ])
        il_sum, nq, st, ns, age, filled, rej = self.comm.all_reduce_sum(sums).tolist()
        return {
            "interpretable_loss": il_sum / max(nq, 1),
            "staleness": st / ns if ns else 0.0,
            "fill_fraction": filled / self.layout.cache_size,
            "sampled_age": age / ns if ns else 0.0,
            "sampled": ns,
            "rejected_rows": rej,
        }


def _stage(name: str) -> record_function:
    """A profiler range named ``negcache/<name>``: users' traces (Chrome, TensorBoard) show each protocol step."""
    return record_function(f"{STAGE_PREFIX}{name}")


def _spread(values: torch.Tensor, rows: torch.Tensor, which: torch.Tensor, fill: float | bool | int) -> torch.Tensor:
    """Values of the unique fetched rows spread to each (query, draw) [B, m]; ``fill`` where nothing was drawn."""
    out = torch.full(rows.shape, fill, dtype=values.dtype, device=rows.device)
    out[rows >= 0] = values[which]
    return out


def _sync_host_counters(module: nn.Module, incompatible_keys: Any) -> None:
    """After load_state_dict, the host mirrors of the step counter and seed follow the loaded buffers."""
    if isinstance(module, ShardedCacheLossHandler):
        module._step = int(module.step_count)
        module._seed = int(module.seed)
