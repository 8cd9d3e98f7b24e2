"""The negative cache as a sentence-transformers loss, for ``SentenceTransformerTrainer`` and ``model.fit``.

:class:`CachedNegativesRankingLoss` is shaped like ``MultipleNegativesRankingLoss(model, scale,
similarity_fct)`` and trains on (anchor, positive) pairs: each anchor is scored against its positive
and, through :class:`~sharded_negcache.ShardedCacheLossHandler`, against the whole cache, sharded
over the ranks of the trainer's process group. The cache keeps each positive's token ids unpadded
(a jagged field) and re-encodes the sampled rows with the model being trained.

:class:`NegativeCacheCallback` adds the cache's metrics to the trainer's logs and saves / restores the
cache with the trainer's checkpoints (``checkpoint-<step>/negcache``, DCP, loadable on another
world size).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoint import CacheCheckpoint, load, save
from ..handler import ShardedCacheLossHandler
from ..jagged import JaggedFieldSpec
from ..keyed_random import _mix
from ..specs import FieldSpec

try:  # sentence-transformers is an optional dependency: `pip install sharded_negcache[sentence-transformers]`
    from sentence_transformers.util import cos_sim, dot_score
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "sharded_negcache.integrations.sentence_transformers needs sentence-transformers: "
        "pip install 'sharded_negcache[sentence-transformers]'"
    ) from exc

__all__ = ["CachedNegativesRankingLoss", "NegativeCacheCallback", "token_hash"]

logger = logging.getLogger(__name__)

IDS, DOC_ID, EMBEDDING = "input_ids", "doc_id", "embedding"
CHECKPOINT_DIR = "negcache"  # inside the trainer's checkpoint-<step> folder
LOG_PREFIX = "negcache/"
LOGGED = ("interpretable_loss", "staleness", "fill_fraction", "sampled_age", "sampled")


def token_hash(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """A 62-bit id per row from its unpadded tokens (same on every rank and run): the cache's document id.

    The positive of an anchor may still sit in the cache from an earlier epoch or batch; rows with the
    same token ids are never sampled as that anchor's negatives (design §2, candidate set).
    """
    ids = _left_align(input_ids, attention_mask)  # the same text hashes the same however it was padded
    pos = torch.arange(ids.shape[1], device=ids.device, dtype=torch.int64).expand_as(ids)
    keep = pos < attention_mask.sum(1, keepdim=True)
    hi = torch.where(keep, _mix(_mix(ids ^ 0x5BD1E995) ^ (pos + 0x27D4EB2F)), 0).sum(1) & 0x7FFFFFFF
    lo = torch.where(keep, _mix(_mix(ids + 0x165667B1) ^ (pos * 0x9E3779B1)), 0).sum(1) & 0x7FFFFFFF
    return (hi << 31) | lo


class CachedNegativesRankingLoss(nn.Module):
    """``MultipleNegativesRankingLoss`` whose negatives come from a sharded negative cache.

    Loss per anchor (design §2): the cache's sampled softmax cross-entropy of
    ``scale * similarity(anchor, positive)`` against every cached positive (stale embeddings scored
    without gradient, ``num_negatives`` rows sampled and re-encoded with gradient); with
    ``in_batch_negatives=True`` the positives of the whole global batch are exact extra candidates.
    The mean over this rank's anchors is returned, so DDP's gradient average is the global mean with
    equal per-rank batches, exactly as for ``MultipleNegativesRankingLoss``.

    Args:
      model: the SentenceTransformer being trained (the trainer swaps in its DDP wrapper).
      scale: multiplies the similarity (1 / temperature), as in MNRL.
      similarity_fct: ``cos_sim`` (embeddings are L2-normalised before they are scored and cached) or
        ``dot_score``; other similarities are not dot products and are refused.
      cache_size: global rows; each rank holds ``cache_size / world_size``.
      num_negatives: rows sampled from the cache per anchor and re-encoded.
      in_batch_negatives: also use the global batch's other positives as negatives.
      embedding_codec: storage of the cached embeddings ('fp32', 'bf16', 'fp16', 'int8', 'int4').
      seed: the cache's sampling seed (with the step, it fixes every draw).
      exclude_same_text: rows holding a positive with the same token ids as the anchor's positive
        are not its negatives (a hash of the tokens is cached as the document id).
      handler_kwargs: further :class:`ShardedCacheLossHandler` options (``use_lru``, ``top_k``, ...).

    The handler is built at the first training step (when the trainer has set up the process group
    and the device), or by :meth:`handler_for` (the callback does this at ``on_train_begin``).
    In evaluation (no gradient or ``model.eval()``) the cache is neither read nor written and the
    loss is MNRL's in-batch loss on this rank's batch, so ``eval_loss`` is comparable across runs.
    """

    def __init__(
        self,
        model: nn.Module,
        scale: float = 20.0,
        similarity_fct: Callable[[Tensor, Tensor], Tensor] = cos_sim,
        *,
        cache_size: int = 4096,
        num_negatives: int = 1,
        in_batch_negatives: bool = False,
        embedding_codec: str | None = None,
        seed: int = 0,
        exclude_same_text: bool = True,
        handler_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not scale > 0:
            raise ValueError(f"scale must be a positive number, got {scale!r}")
        if similarity_fct not in (cos_sim, dot_score):
            raise ValueError(
                "similarity_fct must be sentence_transformers.util.cos_sim or dot_score (the cache scores dot "
                f"products of stored embeddings), got {getattr(similarity_fct, '__name__', similarity_fct)!r}"
            )
        if not isinstance(cache_size, int) or cache_size < 1:
            raise ValueError(f"cache_size must be a positive int, got {cache_size!r}")
        self.model = model
        self.scale = float(scale)
        self.similarity_fct = similarity_fct
        self.normalize = similarity_fct is cos_sim
        self.cache_size, self.num_negatives, self.seed = cache_size, num_negatives, seed
        self.in_batch_negatives, self.embedding_codec = in_batch_negatives, embedding_codec
        self.exclude_same_text = exclude_same_text
        self.handler_kwargs = dict(handler_kwargs or {})
        self.handler: ShardedCacheLossHandler | None = None
        self._feature_keys: tuple[str, ...] | None = None
        self._extra: dict[str, Any] = {}
        self._metric_sums: dict[str, float] = {}
        self._metric_steps = 0

    # ---- the handler -----------------------------------------------------------------------
    def _base(self) -> nn.Module:
        """The SentenceTransformer under any DDP / compile wrapper."""
        m = self.model
        while hasattr(m, "module") and isinstance(m.module, nn.Module):
            m = m.module
        return getattr(m, "_orig_mod", m)

    def handler_for(self, device: torch.device | str | None = None) -> ShardedCacheLossHandler:
        """The cache handler, built on first use over the default process group (if initialised)."""
        if self.handler is None:
            base = self._base()
            dim_of = getattr(base, "get_embedding_dimension", None) or base.get_sentence_embedding_dimension
            dim = dim_of()
            max_length = base.max_seq_length
            if dim is None or max_length is None:
                raise ValueError("the model must report get_embedding_dimension() and max_seq_length")
            tokenizer = getattr(base, "tokenizer", None)
            vocab = len(tokenizer) if tokenizer is not None else None
            specs: dict[str, Any] = {
                EMBEDDING: FieldSpec((dim,), torch.float32),
                IDS: JaggedFieldSpec(max_length, torch.int64, vocab_size=vocab, format="padded"),
            }
            if self.exclude_same_text:
                specs[DOC_ID] = FieldSpec((1,), torch.int64)
            if device is None:
                device = next(base.parameters()).device
            self.handler = ShardedCacheLossHandler(
                specs, self.cache_size, EMBEDDING, [IDS], score_transform=self.scale,
                num_negatives=self.num_negatives, seed=self.seed,
                doc_id_key=DOC_ID if self.exclude_same_text else None,
                process_group=dist.group.WORLD if dist.is_available() and dist.is_initialized() else None,
                device=device, embedding_codec=self.embedding_codec, in_batch_negatives=self.in_batch_negatives,
                **self.handler_kwargs,
            )
        return self.handler

    # ---- the loss --------------------------------------------------------------------------
    def _embed(self, features: dict[str, Any]) -> Tensor:
        emb = self.model(features)["sentence_embedding"]
        return F.normalize(emb, dim=-1) if self.normalize else emb

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        """``labels`` is unused (pairs need none), as in MNRL."""
        features = list(sentence_features)
        if len(features) != 2:
            raise ValueError(
                f"CachedNegativesRankingLoss takes (anchor, positive) pairs, got {len(features)} text columns"
            )
        anchor_features, positive_features = features
        inputs = dict(positive_features)  # the model's forward adds its outputs to the dict it is given
        training = torch.is_grad_enabled() and self._base().training
        if training:
            self._remember_extras(inputs)  # refuse unrebuildable inputs before any forward or cache access
        anchors, positives = self._embed(anchor_features), self._embed(positive_features)
        if not training:
            # Evaluation: MNRL's in-batch loss on this rank's batch; the cache is neither read nor written.
            scores = self.scale * anchors @ positives.t()
            return F.cross_entropy(scores, torch.arange(scores.shape[0], device=scores.device))
        handler = self.handler_for(anchors.device)
        ids, mask = inputs[IDS], inputs["attention_mask"]
        data: dict[str, Any] = {IDS: (_left_align(ids, mask), mask.sum(1))}
        if self.exclude_same_text:
            data[DOC_ID] = token_hash(ids, mask)[:, None]
        loss = handler.update_cache_and_compute_loss(self._reencode, anchors, positives, data)
        step = handler.last_step
        self._accumulate(step.metrics)
        # The value shown is the cross-entropy estimate -log P (what MNRL reports), reduced like the loss;
        # the gradient is the engine's estimator's. (The estimator's own value is not a cross-entropy.)
        shown = torch.nan_to_num(step.interpretable_loss, nan=0.0).sum() * step.loss_scale
        return loss + (shown - loss.detach())

    def _remember_extras(self, positive_features: dict[str, Any]) -> None:
        """Which inputs the model reads: re-encoded rows get the same keys (token types zero, non-tensors copied)."""
        keys = tuple(positive_features)
        if keys == self._feature_keys:
            return
        unknown = [k for k, v in positive_features.items()
                   if isinstance(v, Tensor) and k not in (IDS, "attention_mask", "token_type_ids")]
        if unknown:
            raise ValueError(
                f"CachedNegativesRankingLoss re-encodes cached rows from their token ids only; the positives also "
                f"carry tensor inputs {unknown} that cannot be rebuilt"
            )
        self._feature_keys = keys
        self._extra = {k: v for k, v in positive_features.items() if not isinstance(v, Tensor)}
        self._with_token_types = "token_type_ids" in positive_features

    def _reencode(self, rows: dict[str, Any]) -> Tensor:
        """The current model's embeddings of cached rows, rebuilt from their unpadded token ids."""
        padded, lengths = rows[IDS]
        width = max(int(lengths.max()), 1) if lengths.numel() else 1
        padded = padded[:, :width]
        mask = (torch.arange(width, device=padded.device)[None, :] < lengths[:, None]).to(torch.int64)
        features: dict[str, Any] = {IDS: padded, "attention_mask": mask, **self._extra}
        if self._with_token_types:
            features["token_type_ids"] = torch.zeros_like(padded)
        return self._embed(features)

    # ---- metrics ---------------------------------------------------------------------------
    def _accumulate(self, metrics: dict[str, float]) -> None:
        for name in LOGGED:
            if name in metrics:
                self._metric_sums[name] = self._metric_sums.get(name, 0.0) + float(metrics[name])
        self._metric_steps += 1

    def pop_metrics(self) -> dict[str, float]:
        """Means of the cache metrics over the steps since the last call, keyed ``negcache/<name>``."""
        if not self._metric_steps:
            return {}
        out = {LOG_PREFIX + k: round(v / self._metric_steps, 6) for k, v in self._metric_sums.items()}
        self._metric_sums, self._metric_steps = {}, 0
        return out

    @property
    def citation(self) -> str:
        return "Lindgren, Reddi, Guo, Kumar. Efficient Training of Retrieval Models using Negative Cache. NeurIPS 2021."

    def get_config_dict(self) -> dict[str, Any]:
        """What the trainer writes into the model card."""
        return {
            "scale": self.scale, "similarity_fct": self.similarity_fct.__name__, "cache_size": self.cache_size,
            "num_negatives": self.num_negatives, "in_batch_negatives": self.in_batch_negatives, "seed": self.seed,
        }


def _left_align(ids: Tensor, mask: Tensor) -> Tensor:
    """Token ids with the real tokens first in each row (handles left-padded batches); padding after them."""
    if bool(mask[:, 0].all()):  # right-padded (or unpadded): already aligned
        return ids.to(torch.int64)
    order = torch.argsort(~mask.bool(), dim=1, stable=True)
    return torch.gather(ids, 1, order).to(torch.int64)


class NegativeCacheCallback(TrainerCallback):
    """Cache metrics into the trainer's logs; the cache saved and restored with the trainer's checkpoints.

    - ``on_log``: adds ``negcache/interpretable_loss``, ``negcache/staleness``, ``negcache/fill_fraction``,
      ``negcache/sampled_age``, ``negcache/sampled`` (means since the previous log; the same on every rank).
      Pass it in ``callbacks=[...]`` *before* integrations that should see these keys, or use
      :meth:`attach`, which puts it first.
    - ``on_save``: writes the cache into ``<checkpoint-N>/negcache`` with :func:`sharded_negcache.checkpoint.save`
      (every rank writes its own rows).
    - ``on_train_begin``: when the trainer resumed (``global_step > 0``), loads
      ``<output_dir>/checkpoint-<global_step>/negcache`` on the current world size (any that divides
      ``cache_size``); ``resume_from`` names another checkpoint folder.

    Args:
      loss: the :class:`CachedNegativesRankingLoss` given to the trainer.
      resume_from: a trainer checkpoint folder (or its ``negcache`` subfolder) to load the cache from.
      require_cache_on_resume: raise (default) rather than start with an empty cache when a resumed
        trainer's checkpoint holds no cache.
    """

    def __init__(self, loss: CachedNegativesRankingLoss, *, resume_from: str | None = None,
                 require_cache_on_resume: bool = True) -> None:
        if not isinstance(loss, CachedNegativesRankingLoss):
            raise TypeError(f"NegativeCacheCallback needs a CachedNegativesRankingLoss, got {type(loss).__name__}")
        self.loss = loss
        self.resume_from = resume_from
        self.require_cache_on_resume = require_cache_on_resume
        self.loaded_from: str | None = None

    @classmethod
    def attach(cls, trainer: Any, loss: CachedNegativesRankingLoss | None = None, **kwargs: Any) -> "NegativeCacheCallback":
        """Creates the callback for ``trainer.loss`` and puts it first, so every logger sees the cache metrics."""
        callback = cls(loss if loss is not None else trainer.loss, **kwargs)
        trainer.callback_handler.callbacks.insert(0, callback)
        return callback

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: D102 (TrainerCallback hook)
        handler = self.loss.handler_for(args.device)
        path = self.resume_from
        if path is None and state.global_step > 0:
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if path is None:
            return
        cache_dir = path if os.path.basename(os.path.normpath(path)) == CHECKPOINT_DIR else os.path.join(path, CHECKPOINT_DIR)
        if not os.path.isdir(cache_dir):
            if self.require_cache_on_resume:
                raise FileNotFoundError(
                    f"resuming at step {state.global_step} but {cache_dir} holds no negative cache; pass "
                    "require_cache_on_resume=False to NegativeCacheCallback to start with an empty cache"
                )
            logger.warning("no negative cache in %s: starting with an empty cache", cache_dir)
            return
        load({"cache": CacheCheckpoint(handler)}, cache_dir)
        self.loaded_from = cache_dir

    def on_save(self, args, state, control, **kwargs):  # noqa: D102
        handler = self.loss.handler_for(args.device)
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", CHECKPOINT_DIR)
        save({"cache": CacheCheckpoint(handler)}, folder)

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: D102
        if logs is None or "loss" not in logs:
            return
        extra = self.loss.pop_metrics()
        logs.update(extra)
        # The trainer appended a copy of ``logs`` to the history before calling the callbacks.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)
