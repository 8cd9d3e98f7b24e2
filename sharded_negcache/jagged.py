"""Variable-length feature fields: their spec, the accepted input forms, and the unpadded column that stores them.

A jagged field (e.g. the token ids of documents of different lengths) is stored without padding:
one flat value pool per shard plus (offset, length) per row. New rows append at the pool's tail;
when the tail reaches the end, live rows are compacted to the front (amortised O(1) per value) and
the pool doubles only if the live values alone do not fit. Only inserts write features (refreshes
write embeddings), so compaction is rare.

Inputs may be a TorchRec ``KeyedJaggedTensor`` holding the field's key, a ``JaggedTensor``, a list of
1-D tensors, or a ``(padded [B, L], lengths [B])`` tuple. The document network gets the field in
the spec's ``format``. TorchRec is imported only to build a ``KeyedJaggedTensor`` output.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

__all__ = ["JaggedFieldSpec", "Jagged", "JaggedColumn", "to_jagged", "to_user_format", "id_range_problem"]

Format = Literal["kjt", "list", "padded"]


@dataclass(frozen=True)
class JaggedFieldSpec:
    """A variable-length field of at most ``max_length`` values of ``dtype`` per document.

    ``vocab_size``: ids must lie in [0, vocab_size) (checked per batch). ``mean_length`` sizes the
    initial value pool (rows × mean_length × 1.25). ``format``: what the document network receives.
    """

    max_length: int
    dtype: torch.dtype
    vocab_size: int | None = None
    mean_length: int | None = None
    format: Format = "kjt"

    def __post_init__(self) -> None:
        if not isinstance(self.max_length, int) or self.max_length <= 0:
            raise ValueError(f"JaggedFieldSpec.max_length must be a positive int, got {self.max_length!r}")
        if self.format not in ("kjt", "list", "padded"):
            raise ValueError(f"JaggedFieldSpec.format must be 'kjt', 'list' or 'padded', got {self.format!r}")
        check_vocab(self.dtype, self.vocab_size, "JaggedFieldSpec")

    @property
    def shape(self) -> tuple[int, ...]:
        return ()


def check_vocab(dtype: torch.dtype, vocab_size: int | None, where: str) -> None:
    """A vocabulary must fit the id dtype (int32 ids cannot hold a vocabulary above 2**31 - 1)."""
    if vocab_size is None:
        return
    if dtype.is_floating_point or dtype == torch.bool:
        raise ValueError(f"{where}.vocab_size needs an integer dtype, got {dtype}")
    limit = torch.iinfo(dtype).max + 1
    if not 0 < vocab_size <= limit:
        raise ValueError(f"{where}.vocab_size={vocab_size} does not fit dtype {dtype} (at most {limit})")


@dataclass
class Jagged:
    """Rows of a jagged field: ``lengths`` [n] int64 and the concatenated ``values``."""

    lengths: torch.Tensor
    values: torch.Tensor

    def to(self, device: torch.device) -> "Jagged":
        return Jagged(self.lengths.to(device), self.values.to(device))

    def select(self, keep: torch.Tensor) -> "Jagged":
        """The rows where ``keep`` is True."""
        return Jagged(self.lengths[keep], self.values[torch.repeat_interleave(keep, self.lengths)])


def _offsets(lengths: torch.Tensor) -> torch.Tensor:
    """Exclusive cumulative sum: where each row starts in the concatenated values."""
    return torch.cumsum(lengths, 0) - lengths


def _ranges(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Concatenation of arange(start, start + length) for each row (vectorised, no Python loop)."""
    total = int(lengths.sum())
    within = torch.arange(total, device=lengths.device) - torch.repeat_interleave(_offsets(lengths), lengths, output_size=total)
    return torch.repeat_interleave(starts, lengths, output_size=total) + within


def _is_padded_pair(value: Any) -> bool:
    return (isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, torch.Tensor) for v in value)
            and value[0].dim() == 2 and value[1].dim() == 1)


def _normalise(value: Any, key: str, dtype: torch.dtype) -> Jagged | str:
    if hasattr(value, "keys") and callable(value.keys) and not isinstance(value, dict):  # KeyedJaggedTensor
        if key not in value.keys():
            return f"document_data[{key!r}] is a KeyedJaggedTensor without the key {key!r} (keys {value.keys()})"
        value = value[key]
    if callable(getattr(value, "lengths", None)) and callable(getattr(value, "values", None)):  # JaggedTensor
        return Jagged(value.lengths().to(torch.int64), value.values())
    if _is_padded_pair(value):
        padded, lengths = value
        if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
            return f"document_data[{key!r}] needs integer lengths in (padded, lengths), got {lengths.dtype}"
        if lengths.shape[0] != padded.shape[0]:
            return f"document_data[{key!r}] has {lengths.shape[0]} lengths for {padded.shape[0]} padded rows"
        lengths = lengths.to(torch.int64)
        if lengths.numel():  # negative lengths are refused by to_jagged, for every input form
            hi = int(lengths.max())
            if hi > padded.shape[1]:
                return f"document_data[{key!r}] lengths exceed the padded width {padded.shape[1]} (a row of length {hi})"
        mask = torch.arange(padded.shape[1], device=padded.device)[None, :] < lengths[:, None]
        return Jagged(lengths, padded[mask])
    if isinstance(value, (list, tuple)) and all(isinstance(v, torch.Tensor) and v.dim() == 1 for v in value):
        values = torch.cat(list(value)) if value else torch.empty(0, dtype=dtype)
        lengths = torch.tensor([v.numel() for v in value], dtype=torch.int64, device=values.device)
        return Jagged(lengths, values)
    return (f"document_data[{key!r}] must be a KeyedJaggedTensor, JaggedTensor, list of 1-D tensors "
            f"or (padded [B, L], lengths [B]), got {type(value).__name__}")


def to_jagged(value: Any, key: str, spec: JaggedFieldSpec, batch: int) -> Jagged | str:
    """Normalises one input form to ``Jagged`` and checks it; returns an error message naming the field instead."""
    j = _normalise(value, key, spec.dtype)
    if isinstance(j, str):
        return j
    if j.lengths.numel() != batch:
        return f"document_data[{key!r}] has {j.lengths.numel()} rows, expected {batch}"
    if j.values.dtype != spec.dtype:
        return f"document_data[{key!r}] must have dtype {spec.dtype}, got {j.values.dtype}"
    if batch:
        lo, hi, total = torch.stack([j.lengths.min(), j.lengths.max(), j.lengths.sum()]).tolist()  # one device read
        if lo < 0:
            return f"document_data[{key!r}] has a negative length {lo}: lengths must lie in [0, max_length]"
        if hi > spec.max_length:
            return f"document_data[{key!r}] has a row of length {hi} over max_length {spec.max_length}"
        if total != j.values.numel():
            return f"document_data[{key!r}] lengths sum to {total} but there are {j.values.numel()} values"
    return id_range_problem(key, j.values, spec.vocab_size) or j


def id_range_problem(key: str, ids: torch.Tensor, vocab_size: int | None) -> str | None:
    """A message when an id lies outside [0, vocab_size) (one device read), else None."""
    if vocab_size is None or not ids.numel():
        return None
    lo, hi = (int(v) for v in torch.aminmax(ids))
    if lo < 0 or hi >= vocab_size:
        return f"document_data[{key!r}] holds id {lo if lo < 0 else hi} outside [0, {vocab_size})"
    return None


def to_user_format(j: Jagged, key: str, spec: JaggedFieldSpec) -> Any:
    """Rows handed to the document network in the spec's format."""
    if spec.format == "list":
        return list(torch.split(j.values, j.lengths.tolist()))
    if spec.format == "padded":
        n = j.lengths.numel()
        padded = j.values.new_zeros(n, spec.max_length)
        mask = torch.arange(spec.max_length, device=j.values.device)[None, :] < j.lengths[:, None]
        padded[mask] = j.values
        return padded, j.lengths
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    return KeyedJaggedTensor(keys=[key], values=j.values, lengths=j.lengths)


class JaggedColumn(nn.Module):
    """One jagged field of one shard: a flat value pool and (offset, length) per row, no padding."""

    def __init__(self, rows: int, spec: JaggedFieldSpec, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.spec = spec
        mean = spec.mean_length or max(1, spec.max_length // 4)
        capacity = max(spec.max_length, int(rows * mean * 1.25))
        self.register_buffer("values", torch.zeros(capacity, dtype=spec.dtype, device=device))
        self.register_buffer("offsets", torch.zeros(rows, dtype=torch.int64, device=device))
        self.register_buffer("lengths", torch.zeros(rows, dtype=torch.int64, device=device))
        self.register_buffer("tail", torch.zeros((), dtype=torch.int64, device=device))

    def read(self, slots: torch.Tensor) -> Jagged:
        lengths = self.lengths[slots]
        return Jagged(lengths, self.values[_ranges(self.offsets[slots], lengths)])

    def write(self, slots: torch.Tensor, rows: Jagged) -> None:
        """Stores rows at ``slots`` (distinct), appending their values; compacts or grows when full."""
        self.lengths[slots] = 0  # the overwritten rows' old values become garbage
        total, tail = rows.values.numel(), int(self.tail)
        if tail + total > self.values.numel():
            tail = self._compact(total)
        self.values[tail : tail + total] = rows.values.to(self.values.device)
        self.offsets[slots] = tail + _offsets(rows.lengths.to(self.offsets.device))
        self.lengths[slots] = rows.lengths.to(self.lengths.device)
        self.tail.fill_(tail + total)

    def _compact(self, incoming: int) -> int:
        """Moves live rows to the front (slot order); doubles the pool if they and ``incoming`` do not fit."""
        live = int(self.lengths.sum())
        capacity = self.values.numel()
        while live + incoming > capacity:
            capacity *= 2
        values = self.values.new_zeros(capacity)
        values[:live] = self.values[_ranges(self.offsets, self.lengths)]
        self.values = values
        self.offsets.copy_(_offsets(self.lengths))
        return live

    def padded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row as [rows, max_length] (zeros past each length) plus lengths: export for resharding."""
        j = self.read(torch.arange(self.lengths.numel(), device=self.lengths.device))
        out = j.values.new_zeros(self.lengths.numel(), self.spec.max_length)
        mask = torch.arange(self.spec.max_length, device=out.device)[None, :] < j.lengths[:, None]
        out[mask] = j.values
        return out, j.lengths

    def load_padded(self, padded: torch.Tensor, lengths: torch.Tensor) -> None:
        """Replaces every row from :meth:`padded`-shaped tensors."""
        mask = torch.arange(padded.shape[1], device=padded.device)[None, :] < lengths[:, None]
        self.lengths.zero_()
        self.tail.zero_()
        self.write(torch.arange(lengths.numel(), device=self.lengths.device), Jagged(lengths.to(torch.int64), padded[mask]))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        """The pool's size varies (it grows): adopt the saved size before copying."""
        key = prefix + "values"
        if key in state_dict and state_dict[key].shape != self.values.shape:
            self.values = self.values.new_zeros(state_dict[key].shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
