"""Field specs of the cached documents and validation of user batches against them.

Nothing here talks to other ranks: validation produces a message (or ``None``) so that the
collective layer can make every rank agree before anything is written.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence, Union

import torch

from .jagged import JaggedFieldSpec, check_vocab, id_range_problem, to_jagged

__all__ = ["FieldSpec", "JaggedFieldSpec", "AnySpec", "normalize_specs", "CacheSchema"]


@dataclass(frozen=True)
class FieldSpec:
    """Shape (per document, without the batch dimension) and dtype of one cached field."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    vocab_size: int | None = None  # integer ids must lie in [0, vocab_size); checked per batch

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.shape)  # lists, tuples and torch.Size are all fine
        if any(s <= 0 for s in shape):
            raise ValueError(f"FieldSpec.shape must hold positive sizes, got {self.shape}")
        if not isinstance(self.dtype, torch.dtype):
            raise TypeError(f"FieldSpec.dtype must be a torch.dtype, got {self.dtype!r}")
        check_vocab(self.dtype, self.vocab_size, "FieldSpec")
        object.__setattr__(self, "shape", shape)

    @property
    def numel(self) -> int:
        """Elements per document."""
        n = 1
        for s in self.shape:
            n *= s
        return n


AnySpec = Union[FieldSpec, JaggedFieldSpec]


def normalize_specs(specs: Mapping[str, object]) -> dict[str, AnySpec]:
    """Accepts FieldSpec, JaggedFieldSpec or any object with ``shape`` and ``dtype`` (e.g. ``FixedLenFeature``)."""
    out: dict[str, AnySpec] = {}
    for key, spec in specs.items():
        if isinstance(spec, (FieldSpec, JaggedFieldSpec)):
            out[key] = spec
        elif hasattr(spec, "shape") and hasattr(spec, "dtype"):
            out[key] = FieldSpec(tuple(spec.shape), spec.dtype)
        else:
            raise TypeError(f"specs[{key!r}] must be a FieldSpec, got {type(spec).__name__}")
    return out


class CacheSchema:
    """Which spec is the embedding, which fields feed the document network, which is the doc id."""

    def __init__(
        self,
        specs: Mapping[str, object],
        embedding_key: str,
        data_keys: Sequence[str],
        doc_id_key: str | None = None,
    ) -> None:
        self.specs = normalize_specs(specs)
        if isinstance(data_keys, str):
            raise TypeError("data_keys must be a sequence of keys, e.g. ('input_ids',), not a string")
        self.embedding_key = embedding_key
        self.data_keys = tuple(data_keys)
        self.doc_id_key = doc_id_key
        if embedding_key not in self.specs:
            raise ValueError(f"embedding_key {embedding_key!r} is not in specs {sorted(self.specs)}")
        emb = self.specs[embedding_key]
        if not isinstance(emb, FieldSpec) or len(emb.shape) != 1 or not emb.dtype.is_floating_point:
            raise ValueError(
                f"specs[{embedding_key!r}] must be a 1-D floating field (d,), got {emb.shape} {emb.dtype}"
            )
        if not self.data_keys:
            raise ValueError("data_keys must name at least one feature field")
        missing = [k for k in self.data_keys if k not in self.specs]
        if missing:
            raise ValueError(f"data_keys {missing} are not in specs {sorted(self.specs)}")
        if embedding_key in self.data_keys:
            raise ValueError(f"data_keys must not contain the embedding_key {embedding_key!r}")
        if doc_id_key is not None:
            if doc_id_key not in self.specs:
                raise ValueError(f"doc_id_key {doc_id_key!r} is not in specs {sorted(self.specs)}")
            ids = self.specs[doc_id_key]
            if not isinstance(ids, FieldSpec) or ids.shape != (1,) or ids.dtype not in (torch.int32, torch.int64):
                raise ValueError(
                    f"specs[{doc_id_key!r}] (the doc_id_key) must be FieldSpec((1,), torch.int64 or int32), "
                    f"got {ids.shape} {ids.dtype}"
                )
        extra = set(self.specs) - set(self.feature_keys) - {embedding_key}
        if extra:
            raise ValueError(
                f"specs has fields {sorted(extra)} that are neither data_keys nor the embedding/doc_id key"
            )

    @property
    def dim(self) -> int:
        """Embedding width d."""
        return self.specs[self.embedding_key].shape[0]

    @property
    def feature_keys(self) -> tuple[str, ...]:
        """Fields stored per row besides the embedding: data keys, then the doc id if separate."""
        keys = self.data_keys
        if self.doc_id_key is not None and self.doc_id_key not in keys:
            keys = keys + (self.doc_id_key,)
        return keys

    def feature_specs(self) -> dict[str, AnySpec]:
        return {k: self.specs[k] for k in self.feature_keys}

    def network_input(self, features: Mapping[str, Any]) -> dict[str, Any]:
        """The ``data_keys`` fields of fetched rows, jagged ones in their spec's format."""
        from .jagged import to_user_format

        out = {}
        for key in self.data_keys:
            spec, value = self.specs[key], features[key]
            out[key] = to_user_format(value, key, spec) if isinstance(spec, JaggedFieldSpec) else value
        return out

    def check_batch(
        self,
        query_embeddings: torch.Tensor,
        document_embeddings: torch.Tensor,
        document_data: Mapping[str, torch.Tensor],
        device: torch.device,
        max_batch: int,
    ) -> tuple[str | None, dict[str, Any]]:
        """(message naming the first bad field or None, the batch's features with jagged fields normalised).

        Shapes, dtypes and devices are host-side facts; jagged lengths and id ranges need one
        device read per field.
        """
        problem = self._check_shapes(query_embeddings, document_embeddings, document_data, device, max_batch)
        if problem is not None:
            return problem, {}
        batch, out = query_embeddings.shape[0], {}
        for key in self.feature_keys:
            spec, value = self.specs[key], document_data[key]
            if isinstance(spec, JaggedFieldSpec):
                j = to_jagged(value, key, spec, batch)
                if isinstance(j, str):
                    return j, {}
                out[key] = j
            else:
                out[key] = value.reshape(batch, *spec.shape)
                problem = id_range_problem(key, value, spec.vocab_size)
                if problem:
                    return problem, {}
        return None, out

    def _check_shapes(
        self,
        query_embeddings: torch.Tensor,
        document_embeddings: torch.Tensor,
        document_data: Mapping[str, torch.Tensor],
        device: torch.device,
        max_batch: int,
    ) -> str | None:
        """Keys, shapes, dtypes, devices and the batch size: host-side facts, no device read."""
        for name, t in (("query_embeddings", query_embeddings), ("document_embeddings", document_embeddings)):
            if not isinstance(t, torch.Tensor):
                return f"{name} must be a torch.Tensor, got {type(t).__name__}"
            if t.dim() != 2 or t.shape[1] != self.dim:
                return f"{name} must have shape [batch, {self.dim}], got {list(t.shape)}"
            if not t.dtype.is_floating_point:
                return f"{name} must be a floating tensor, got {t.dtype}"
            if t.device != device:
                return f"{name} is on {t.device} but the cache is on {device}"
        batch = query_embeddings.shape[0]
        if document_embeddings.shape[0] != batch:
            return (
                f"document_embeddings has {document_embeddings.shape[0]} rows but query_embeddings has {batch}"
            )
        if batch > max_batch:
            return f"batch of {batch} documents is larger than a cache shard ({max_batch} rows per rank)"
        if not isinstance(document_data, Mapping):
            return f"document_data must be a dict of tensors, got {type(document_data).__name__}"
        expected = set(self.feature_keys)
        if set(document_data) != expected:
            missing = sorted(expected - set(document_data))
            extra = sorted(set(document_data) - expected)
            return f"document_data keys mismatch: missing {missing}, unexpected {extra}"
        for key in self.feature_keys:
            spec, t = self.specs[key], document_data[key]
            if isinstance(spec, JaggedFieldSpec):
                continue  # checked by to_jagged
            if not isinstance(t, torch.Tensor):
                return f"document_data[{key!r}] must be a torch.Tensor, got {type(t).__name__}"
            want = (batch, *spec.shape)
            if tuple(t.shape) != want:
                # A scalar id field may come as [batch] as well as [batch, 1].
                if not (spec.shape == (1,) and tuple(t.shape) == (batch,)):
                    return f"document_data[{key!r}] must have shape {list(want)}, got {list(t.shape)}"
            if t.dtype != spec.dtype:
                return f"document_data[{key!r}] must have dtype {spec.dtype}, got {t.dtype}"
            if t.device != device:
                return f"document_data[{key!r}] is on {t.device} but the cache is on {device}"
        return None
