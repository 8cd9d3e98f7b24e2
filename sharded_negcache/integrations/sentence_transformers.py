"""The negative cache as a sentence-transformers loss, for ``SentenceTransformerTrainer`` and ``model.fit``.

:class:`CachedNegativesRankingLoss` is shaped like ``MultipleNegativesRankingLoss(model, scale,
similarity_fct)`` and trains on (anchor, positive[, negative_1, ...]) columns: each anchor is scored
against its positive, the negative columns and, through :class:`~sharded_negcache.ShardedCacheLossHandler`,
the whole cache, sharded over the ranks of the trainer's process group. The cache holds recent positives
(streaming) or a given corpus (``corpus=``), keeps their token ids unpadded (a jagged field) and
re-encodes the sampled rows with the model being trained.

:class:`NegativeCacheCallback` adds the cache's metrics to the trainer's logs and saves / restores the
cache with the trainer's checkpoints (``checkpoint-<step>/negcache``, DCP, loadable on another
world size).
"""
from __future__ import annotations

import functools
import inspect
import logging
import os
import sys
import warnings
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoint import CacheCheckpoint, load, save
from ..handler import ShardedCacheLossHandler
from ..jagged import JaggedFieldSpec
from ..keyed_random import mix32
from ..specs import FieldSpec
from ..topology import is_distributed

try:  # sentence-transformers is an optional dependency: `pip install sharded_negcache[sentence-transformers]`
    try:  # its loss modules moved in 6.0; the old path still imports there, with a deprecation warning
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    except ImportError:
        from sentence_transformers.losses import MultipleNegativesRankingLoss
    from sentence_transformers.util import cos_sim, dot_score
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_utils import get_last_checkpoint
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "sharded_negcache.integrations.sentence_transformers needs sentence-transformers: "
        "pip install 'sharded_negcache[sentence-transformers]'"
    ) from exc
if not hasattr(MultipleNegativesRankingLoss, "compute_loss_from_embeddings"):  # added in sentence-transformers 5.0
    raise ImportError("sharded_negcache.integrations.sentence_transformers needs sentence-transformers >= 5.0 "
                      "(MultipleNegativesRankingLoss.compute_loss_from_embeddings): "
                      "pip install -U sentence-transformers")

__all__ = ["CachedNegativesRankingLoss", "NegativeCacheCallback", "token_hash"]

logger = logging.getLogger(__name__)

IDS, DOC_ID, EMBEDDING = "input_ids", "doc_id", "embedding"
CHECKPOINT_DIR = "negcache"  # inside the trainer's checkpoint-<step> folder
LOG_PREFIX = "negcache/"
LOGGED = ("interpretable_loss", "staleness", "fill_fraction", "sampled_age", "sampled")
IN_BATCH = "in_batch_loss"  # MNRL's loss on the rank's batch: what ``eval_loss`` measures


def token_hash(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """A 62-bit id per row from its unpadded tokens (same on every rank and run): the cache's document id.

    The positive of an anchor may still sit in the cache from an earlier epoch or batch; rows with the
    same token ids are never sampled as that anchor's negatives (design §2, candidate set).
    """
    ids = _left_align(input_ids, attention_mask)  # the same text hashes the same however it was padded
    pos = torch.arange(ids.shape[1], device=ids.device, dtype=torch.int64).expand_as(ids)
    keep = pos < attention_mask.sum(1, keepdim=True)
    hi = torch.where(keep, mix32(mix32(ids ^ 0x5BD1E995) ^ (pos + 0x27D4EB2F)), 0).sum(1) & 0x7FFFFFFF
    lo = torch.where(keep, mix32(mix32(ids + 0x165667B1) ^ (pos * 0x9E3779B1)), 0).sum(1) & 0x7FFFFFFF
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
      cache_size: global rows; each rank holds ``cache_size / world_size`` (at least one per-device
        batch: checked when training begins).
      num_negatives: rows sampled from the cache per anchor and re-encoded.
      in_batch_negatives: also use the global batch's other positives as negatives (MNRL's candidates,
        so a fine-tuning run starts where MNRL is and the cache only adds to it).
      embedding_codec: storage of the cached embeddings ('fp32', 'bf16', 'fp16', 'int8', 'int4').
      seed: the cache's sampling seed (with the step, it fixes every draw).
      exclude_same_text: rows holding a positive with the same token ids as the anchor's positive
        are not its negatives (a hash of the tokens is cached as the document id).
      corpus: the documents the cache holds (texts: a list or a dataset column such as
        ``train_dataset["positive"]``): the engine's corpus mode, one row per distinct text, its id the
        hash of its tokens. Every training positive must be one of them (its row is refreshed in place).
        Encoded into the cache when training begins (:meth:`prefill`), unless a checkpoint is restored.
      prefill_batch_size: texts encoded at once by :meth:`prefill`.
      handler_kwargs: further :class:`ShardedCacheLossHandler` options (``use_lru``, ``top_k``, and in
        corpus mode ``reencode_negatives``, ``refresh_budget``, ``exclude_duplicates``, ...).

    Negative columns (``(anchor, positive, negative_1, ..., negative_n)``, as MNRL takes) are encoded
    with gradient and passed to the engine as ``extra_negatives``: candidates of their own anchor, and
    with ``in_batch_negatives`` of every anchor of the batch, as in MNRL; they are never cached.

    The handler is built at the first training step (when the trainer has set up the process group
    and the device), or by :meth:`handler_for` (the callback does this at ``on_train_begin``).
    In evaluation (no gradient or ``model.eval()``) the cache is neither read nor written and the
    loss is MNRL's in-batch loss on this rank's batch, so ``eval_loss`` is comparable across runs; the
    same quantity on each training batch is logged as ``negcache/in_batch_loss``.

    In a ``SentenceTransformerTrainer`` (or ``model.fit``) without a :class:`NegativeCacheCallback`, the
    first training step attaches one and warns; on a resumed run it raises instead (the cache could
    not be restored).
    """

    def __init__(
        self,
        model: nn.Module,
        scale: float = 20.0,
        similarity_fct: Callable[[Tensor, Tensor], Tensor] = cos_sim,
        *,
        cache_size: int = 65536,
        num_negatives: int = 4,
        in_batch_negatives: bool = True,
        embedding_codec: str | None = None,
        seed: int = 0,
        exclude_same_text: bool = True,
        corpus: Iterable[str] | None = None,
        prefill_batch_size: int = 256,
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
        if not isinstance(num_negatives, int) or num_negatives < 1:
            raise ValueError(f"num_negatives must be an int >= 1, got {num_negatives!r}")
        owned = {"score_transform", "num_negatives", "seed", "doc_id_key", "process_group", "device",
                 "embedding_codec", "in_batch_negatives", "cache_mode"} & set(handler_kwargs or {})
        if owned:
            raise ValueError(f"handler_kwargs must not set {sorted(owned)}: the loss sets them (use its own arguments)")
        self.corpus = _corpus_texts(corpus) if corpus is not None else None
        if self.corpus is not None and not exclude_same_text:
            raise ValueError("corpus needs exclude_same_text=True: the hash of a text's tokens is its document id")
        if not isinstance(prefill_batch_size, int) or prefill_batch_size < 1:
            raise ValueError(f"prefill_batch_size must be an int >= 1, got {prefill_batch_size!r}")
        self.prefill_batch_size = prefill_batch_size
        self._corpus_pending = self.corpus is not None  # cleared by prefill() or a restored checkpoint
        self.model = model
        self.scale = float(scale)
        self.similarity_fct = similarity_fct
        self.normalize = similarity_fct is cos_sim
        self.cache_size, self.num_negatives, self.seed = cache_size, num_negatives, seed
        self.in_batch_negatives, self.embedding_codec = in_batch_negatives, embedding_codec
        self.exclude_same_text = exclude_same_text
        # MNRL itself, on the embeddings this loss computes: the in-batch loss of evaluation and of the
        # negcache/in_batch_loss metric (its scale, similarity and candidate conventions, not a copy of them).
        # Kept out of the module tree: it holds the same model, whose parameters must appear once in state_dict.
        self.__dict__["mnrl"] = MultipleNegativesRankingLoss(model, scale=self.scale, similarity_fct=similarity_fct)
        self.handler_kwargs = dict(handler_kwargs or {})
        self.handler: ShardedCacheLossHandler | None = None
        self._feature_keys: tuple[str, ...] | None = None
        self._extra: dict[str, Any] = {}
        self._metric_sums: dict[str, float] = {}
        self._in_batch_sum: Tensor | None = None
        self._metric_steps = 0
        self.callback: NegativeCacheCallback | None = None  # set by the callback when training begins
        self._callback_checked = False

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
                process_group=dist.group.WORLD if is_distributed() else None,
                device=device, embedding_codec=self.embedding_codec, in_batch_negatives=self.in_batch_negatives,
                **({"cache_mode": "corpus"} if self.corpus is not None else {}), **self.handler_kwargs,
            )
        return self.handler

    def prefill(self) -> None:
        """Encodes the corpus into the cache: every rank together, each encoding only the rows it owns.

        The callback calls it when training begins (unless it restored the cache from a checkpoint), or the
        first training step does. The model runs unwrapped (no DDP: ranks encode different numbers of batches)
        and in eval mode: cached embeddings are the documents as the model would serve them, without dropout.
        """
        if self.corpus is None:
            raise ValueError("prefill needs a corpus: pass corpus=[...] to CachedNegativesRankingLoss")
        base = self._base()
        handler = self.handler_for()
        tokens, doc_ids = self._tokenize_corpus(base)
        was_training = base.training
        base.eval()
        try:
            handler.prefill(doc_ids, {IDS: tokens}, functools.partial(self.encode_rows, model=base),
                            batch_size=self.prefill_batch_size)
        finally:
            base.train(was_training)
        self._corpus_pending = False

    def _tokenize_corpus(self, base: nn.Module) -> tuple[list[Tensor], Tensor]:
        """Each distinct text's unpadded token ids and its token hash (its document id), in corpus order."""
        tokens: list[Tensor] = []
        hashes: list[Tensor] = []
        for start in range(0, len(self.corpus), 1024):
            features = dict(base.preprocess(self.corpus[start : start + 1024]))
            self._remember_extras(features)
            ids, mask = features[IDS], features["attention_mask"]
            aligned, lengths = _left_align(ids, mask), mask.sum(1).tolist()
            tokens += [aligned[i, :n] for i, n in enumerate(lengths)]
            hashes.append(token_hash(ids, mask))
        every = torch.cat(hashes)
        # identical texts are one document (one row): keep each id's first occurrence
        distinct, inverse = torch.unique(every, return_inverse=True)
        first = torch.full((len(distinct),), len(every)).scatter_reduce(0, inverse, torch.arange(len(every)), "amin")
        keep = first.sort().values
        return [tokens[i] for i in keep.tolist()], every[keep]

    # ---- the loss --------------------------------------------------------------------------
    def _embed(self, features: dict[str, Any], model: nn.Module | None = None) -> Tensor:
        emb = (model if model is not None else self.model)(features)["sentence_embedding"]
        return F.normalize(emb, dim=-1) if self.normalize else emb

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        """(anchor, positive[, negative_1, ...]) text columns, as MNRL takes; ``labels`` is unused."""
        features = list(sentence_features)
        if len(features) < 2:
            raise ValueError(
                "CachedNegativesRankingLoss takes (anchor, positive) or (anchor, positive, negative_1, ...) text "
                f"columns, got {len(features)}"
            )
        anchor_features, positive_features, *negative_features = features
        inputs = dict(positive_features)  # the model's forward adds its outputs to the dict it is given
        training = torch.is_grad_enabled() and self._base().training
        if training:
            self._remember_extras(inputs)  # refuse unrebuildable inputs before any forward or cache access
        anchors, positives = self._embed(anchor_features), self._embed(positive_features)
        negatives = [self._embed(f) for f in negative_features]
        if not training:
            # Evaluation: MNRL's in-batch loss on this rank's batch; the cache is neither read nor written.
            return self.mnrl.compute_loss_from_embeddings([anchors, positives, *negatives], labels)
        if not self._callback_checked:
            self._ensure_callback()
        handler = self.handler_for(anchors.device)
        if self._corpus_pending:
            self.prefill()
        ids, mask = inputs[IDS], inputs["attention_mask"]
        data: dict[str, Any] = {IDS: (_left_align(ids, mask), mask.sum(1))}
        if self.exclude_same_text:
            data[DOC_ID] = token_hash(ids, mask)[:, None]
        extra = torch.stack(negatives, dim=1) if negatives else None  # [B, n, d], fresh, with gradient
        loss = handler.update_cache_and_compute_loss(self.encode_rows, anchors, positives, data, extra_negatives=extra)
        step = handler.last_step
        with torch.no_grad():
            in_batch = self.mnrl.compute_loss_from_embeddings([anchors, positives, *negatives], labels)
        self._accumulate(step.metrics, in_batch)
        # The value shown is the cross-entropy estimate -log P (what MNRL reports), reduced like the loss;
        # the gradient is the engine's estimator's. (The estimator's own value is not a cross-entropy.)
        shown = torch.nan_to_num(step.interpretable_loss, nan=0.0).sum() * step.loss_scale
        return loss + (shown - loss.detach())

    def _ensure_callback(self) -> None:
        """Forgetting the callback must not be silent: inside a trainer without one, attach one (and warn), or
        raise when the trainer resumed (its checkpoint's cache can no longer be restored)."""
        self._callback_checked = True
        if self.callback is not None:
            return
        trainer = _calling_trainer(self)
        if trainer is None:  # a plain training loop: no trainer checkpoints to keep the cache in
            return
        if trainer.state.global_step > 0:
            raise RuntimeError(
                f"the trainer resumed at step {trainer.state.global_step} without a NegativeCacheCallback, so the "
                "negative cache was not restored: call NegativeCacheCallback.attach(trainer) before trainer.train()"
            )
        self.callback = NegativeCacheCallback.attach(trainer, self)
        warnings.warn(
            "CachedNegativesRankingLoss: the trainer had no NegativeCacheCallback; one is attached now (cache metrics "
            "in the logs, the cache saved with checkpoints). Call NegativeCacheCallback.attach(trainer) before "
            "trainer.train() so that resuming restores the cache.", UserWarning, stacklevel=3,
        )

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

    def encode_rows(self, rows: dict[str, Any], model: nn.Module | None = None) -> Tensor:
        """The current model's embeddings of cached rows, rebuilt from their unpadded token ids: the document
        tower the cache calls (on sampled rows with gradient, and by :meth:`prefill`). Wrapping it on the
        instance (e.g. to time re-encoding apart from the batch's own forward) is supported."""
        padded, lengths = rows[IDS]
        width = max(int(lengths.max()), 1) if lengths.numel() else 1
        padded = padded[:, :width]
        mask = (torch.arange(width, device=padded.device)[None, :] < lengths[:, None]).to(torch.int64)
        features: dict[str, Any] = {IDS: padded, "attention_mask": mask, **self._extra}
        if self._with_token_types:
            features["token_type_ids"] = torch.zeros_like(padded)
        return self._embed(features, model)

    # ---- metrics ---------------------------------------------------------------------------
    def _accumulate(self, metrics: dict[str, float], in_batch: Tensor) -> None:
        for name in LOGGED:
            if name in metrics:
                self._metric_sums[name] = self._metric_sums.get(name, 0.0) + float(metrics[name])
        # kept on the device until logged: no host sync per step
        self._in_batch_sum = in_batch.double() if self._in_batch_sum is None else self._in_batch_sum + in_batch
        self._metric_steps += 1

    def pop_metrics(self) -> dict[str, float]:
        """Means of the cache metrics over the steps since the last call, keyed ``negcache/<name>``.

        The cache's metrics are global already; ``in_batch_loss`` is each rank's own and is averaged over the
        ranks here (a collective: every rank calls this together, as the trainer's ``on_log`` does).
        """
        if not self._metric_steps:
            return {}
        sums = dict(self._metric_sums)
        total = self._in_batch_sum.reshape(1)
        if is_distributed():  # the handler's group: WORLD
            dist.all_reduce(total)
            total = total / dist.get_world_size()
        sums[IN_BATCH] = float(total)
        out = {LOG_PREFIX + k: round(v / self._metric_steps, 6) for k, v in sums.items()}
        self._metric_sums, self._metric_steps, self._in_batch_sum = {}, 0, None
        return out

    @property
    def citation(self) -> str:
        return "Lindgren, Reddi, Guo, Kumar. Efficient Training of Retrieval Models using Negative Cache. NeurIPS 2021."

    def get_config_dict(self) -> dict[str, Any]:
        """What the trainer writes into the model card."""
        return {
            "scale": self.scale, "similarity_fct": self.similarity_fct.__name__, "cache_size": self.cache_size,
            "num_negatives": self.num_negatives, "in_batch_negatives": self.in_batch_negatives, "seed": self.seed,
            **({"corpus_size": len(self.corpus)} if self.corpus is not None else {}),
        }


def _corpus_texts(corpus: Iterable[str]) -> list[str]:
    """The corpus as a list of texts (a list, tuple or dataset column), checked."""
    if isinstance(corpus, (str, bytes)):
        raise ValueError("corpus must be a sequence of texts (e.g. a list or a dataset column), got one string")
    texts = list(corpus)
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise ValueError(f"corpus must hold texts; corpus[{bad}] is {type(texts[bad]).__name__}")
    if not texts:
        raise ValueError("corpus is empty")
    return texts


def _calling_trainer(loss: nn.Module) -> Any:
    """The transformers ``Trainer`` whose ``compute_loss`` is calling ``loss`` (found on the call stack), or None.

    The loss is handed to the trainer before the trainer exists and is never told about it; the stack is
    the one place that knows. Only the trainer that holds this loss counts.
    """
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, Trainer):
            held = getattr(owner, "loss", None)
            if held is loss or (isinstance(held, dict) and any(v is loss for v in held.values())):
                return owner
        frame = frame.f_back
    return None


def _left_align(ids: Tensor, mask: Tensor) -> Tensor:
    """Token ids with the real tokens first in each row (handles left-padded batches); padding after them."""
    if bool(mask[:, 0].all()):  # right-padded (or unpadded): already aligned
        return ids.to(torch.int64)
    order = torch.argsort(~mask.bool(), dim=1, stable=True)
    return torch.gather(ids, 1, order).to(torch.int64)


class NegativeCacheCallback(TrainerCallback):
    """Cache metrics into the trainer's logs; the cache saved and restored with the trainer's checkpoints.

    - ``on_log``: adds ``negcache/interpretable_loss``, ``negcache/in_batch_loss``, ``negcache/staleness``,
      ``negcache/fill_fraction``, ``negcache/sampled_age``, ``negcache/sampled`` (means since the previous
      log; the same on every rank). Pass it in ``callbacks=[...]`` *before* integrations that should see
      these keys, or use :meth:`attach`, which puts it first.
    - ``on_save``: writes the cache into ``<checkpoint-N>/negcache`` with :func:`sharded_negcache.checkpoint.save`
      (every rank writes its own rows).
    - ``on_train_begin``: checks that a rank's cache shard holds a per-device batch; when the trainer
      resumed (``global_step > 0``), loads ``<checkpoint>/negcache`` from the checkpoint given to
      ``trainer.train(resume_from_checkpoint=...)`` (``True``: the trainer's own choice, the last one in
      ``output_dir``), on the current world size (any that divides ``cache_size``). Seeing that argument
      needs :meth:`attach`; ``resume_from`` names the folder explicitly instead.

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
        self.trainer_checkpoint: str | None = None  # what the attached trainer's train() resumes from

    @classmethod
    def attach(cls, trainer: Any, loss: CachedNegativesRankingLoss | None = None, **kwargs: Any) -> "NegativeCacheCallback":
        """Creates the callback for ``trainer.loss``, puts it first (every logger sees the cache metrics) and
        records the checkpoint each ``trainer.train(resume_from_checkpoint=...)`` resumes from."""
        callback = cls(loss if loss is not None else trainer.loss, **kwargs)
        trainer.callback_handler.callbacks.insert(0, callback)
        train = trainer.train
        signature = inspect.signature(train)

        @functools.wraps(train)
        def train_and_record_checkpoint(*args: Any, **kw: Any) -> Any:
            given = signature.bind_partial(*args, **kw).arguments.get("resume_from_checkpoint")
            # The trainer's own resolution: False/None -> none, True -> the last checkpoint in output_dir.
            callback.trainer_checkpoint = get_last_checkpoint(trainer.args.output_dir) if given is True else (
                given or None)
            return train(*args, **kw)

        trainer.train = train_and_record_checkpoint
        return callback

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: D102 (TrainerCallback hook)
        self.loss.callback = self
        handler = self.loss.handler_for(args.device)
        shard = handler.layout.rows_per_rank
        if shard < args.per_device_train_batch_size:  # caught here, before any step, not at the first insert
            raise ValueError(
                f"cache_size={self.loss.cache_size} gives {shard} rows per rank over {handler.layout.shard_size} "
                f"rank(s), fewer than per_device_train_batch_size={args.per_device_train_batch_size}: a batch must "
                "fit in a rank's cache shard; raise cache_size"
            )
        self.loaded_from = self._restore(state, handler)
        if self.loaded_from is not None:
            self.loss._corpus_pending = False  # the checkpoint holds the corpus's rows
        elif self.loss._corpus_pending:
            self.loss.prefill()

    def _restore(self, state, handler: ShardedCacheLossHandler) -> str | None:
        """Loads the cache of the checkpoint being resumed; returns its folder (None: nothing to load)."""
        path = self.resume_from
        if path is None and state.global_step > 0:
            path = self.trainer_checkpoint
            if path is None:
                # Without attach() the callback cannot see which checkpoint train() was given; guessing
                # output_dir/checkpoint-N could load another run's cache.
                problem = (f"the trainer resumed at step {state.global_step} but NegativeCacheCallback cannot see "
                           "which checkpoint: add it with NegativeCacheCallback.attach(trainer) or pass resume_from=")
                if self.require_cache_on_resume:
                    raise RuntimeError(problem)
                logger.warning("%s; starting with an empty cache", problem)
                return None
        if path is None:
            return None
        cache_dir = path if os.path.basename(os.path.normpath(path)) == CHECKPOINT_DIR else os.path.join(path, CHECKPOINT_DIR)
        if not os.path.isdir(cache_dir):
            if self.require_cache_on_resume:
                raise FileNotFoundError(
                    f"resuming at step {state.global_step} but {cache_dir} holds no negative cache; pass "
                    "require_cache_on_resume=False to NegativeCacheCallback to start with an empty cache"
                )
            logger.warning("no negative cache in %s: starting with an empty cache", cache_dir)
            return None
        # The default block size depends on the rows per rank, so a resume on another world size may see
        # another one; the rows are valid under any block size (only the sampler's stream is keyed by it).
        load({"cache": CacheCheckpoint(handler, allow_block_size_change=True)}, cache_dir)
        return cache_dir

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
