"""Corpus mode: the cache's rows are the documents of a corpus, addressed by document id.

``CorpusIndex`` maps a document id to its global row and its exclusion key; it is replicated on every
rank of a shard group (24 bytes per document: 24 MB for a million). ``place`` decides where prefill
puts each document, ``row_batches`` cuts a rank's documents into encoder batches, and ``content_keys``
groups exact duplicates under one exclusion key (design §12).
No collectives here: the handler gathers what the index is rebuilt from.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch

from .jagged import Jagged, JaggedFieldSpec, to_jagged
from .keyed_random import MASK32, mix32
from .specs import AnySpec

__all__ = ["CORPUS_KEY", "CorpusIndex", "place", "corpus_columns", "row_batches", "content_keys", "ids_checksum",
           "select_rows"]

# The store column holding each row's exclusion key (the doc id, or the duplicate group's key).
CORPUS_KEY = "corpus_key"


@dataclass
class CorpusIndex:
    """Sorted document ids with each one's global row and exclusion key (same on every rank of a group)."""

    ids: torch.Tensor  # [N] int64, ascending
    rows: torch.Tensor  # [N] int64 global rows
    keys: torch.Tensor  # [N] int64 exclusion keys

    @classmethod
    def build(cls, ids: torch.Tensor, rows: torch.Tensor, keys: torch.Tensor) -> "CorpusIndex":
        order = torch.argsort(ids)
        return cls(ids[order].contiguous(), rows[order], keys[order])

    def to(self, device: torch.device) -> "CorpusIndex":
        return CorpusIndex(self.ids.to(device), self.rows.to(device), self.keys.to(device))

    def __len__(self) -> int:
        return self.ids.numel()

    def lookup(self, doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(global rows, exclusion keys, found) of ``doc_ids`` [B]; rows and keys are 0 where not found."""
        doc_ids = doc_ids.reshape(-1).to(self.ids.device, torch.int64)
        ids = self.ids
        if ids.numel() == 0:
            zero = torch.zeros_like(doc_ids)
            return zero, zero, torch.zeros_like(doc_ids, dtype=torch.bool)
        pos = torch.searchsorted(ids, doc_ids).clamp_(max=ids.numel() - 1)
        found = ids[pos] == doc_ids
        rows = torch.where(found, self.rows[pos], 0)
        keys = torch.where(found, self.keys[pos], 0)
        return rows, keys, found


def place(num_docs: int, world_size: int, rows_per_rank: int) -> torch.Tensor:
    """Global row of each document: document i goes to rank ``i mod W``, slot ``i div W``, so every rank
    encodes and holds ceil(N / W) or floor(N / W) documents (a contiguous split would leave the last ranks
    idle whenever N < cache_size)."""
    i = torch.arange(num_docs, dtype=torch.int64)
    return (i % world_size) * rows_per_rank + i // world_size


def corpus_columns(
    document_data: Mapping[str, Any], data_specs: Mapping[str, AnySpec], num_docs: int
) -> dict[str, torch.Tensor | Jagged]:
    """The corpus's ``data_keys`` fields, checked and normalised (fixed: [N, *shape]; jagged: ``Jagged``).
    A jagged field may also be a list of integer sequences. Raises ValueError naming the field."""
    if not isinstance(document_data, Mapping):
        raise ValueError(f"document_data must be a mapping of field -> column, got {type(document_data).__name__}")
    missing = sorted(set(data_specs) - set(document_data))
    if missing:
        raise ValueError(f"document_data lacks the data_keys fields {missing} (has {sorted(document_data)})")
    out: dict[str, torch.Tensor | Jagged] = {}
    for key, spec in data_specs.items():
        value = document_data[key]
        if isinstance(spec, JaggedFieldSpec):
            if isinstance(value, (list, tuple)) and not (value and isinstance(value[0], torch.Tensor)):
                value = [torch.as_tensor(v, dtype=spec.dtype).reshape(-1) for v in value]
            j = to_jagged(value, key, spec, num_docs)
            if isinstance(j, str):
                raise ValueError(j)
            out[key] = j
            continue
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"document_data[{key!r}] must be a torch.Tensor, got {type(value).__name__}")
        want = (num_docs, *spec.shape)
        if tuple(value.shape) != want and not (spec.shape == (1,) and tuple(value.shape) == (num_docs,)):
            raise ValueError(f"document_data[{key!r}] must have shape {list(want)} (one row per doc id), "
                             f"got {list(value.shape)}")
        if value.dtype != spec.dtype:
            raise ValueError(f"document_data[{key!r}] must have dtype {spec.dtype}, got {value.dtype}")
        out[key] = value.reshape(want)
    return out


def select_rows(column: torch.Tensor | Jagged, index: torch.Tensor) -> torch.Tensor | Jagged:
    """Rows ``index`` (ascending) of a fixed or jagged column."""
    if isinstance(column, Jagged):
        keep = torch.zeros(column.lengths.numel(), dtype=torch.bool)
        keep[index] = True
        return column.select(keep)
    return column.index_select(0, index)


def row_batches(
    columns: Mapping[str, torch.Tensor | Jagged], num_rows: int, batch_size: int
) -> Iterator[tuple[int, int, dict[str, torch.Tensor | Jagged]]]:
    """(start, end, fields of rows [start, end)) for consecutive ranges of ``batch_size`` rows; a jagged
    field is sliced through its offsets (computed once), so the whole pass is O(rows)."""
    offsets = {k: torch.cat([v.lengths.new_zeros(1), torch.cumsum(v.lengths, 0)]).tolist()
               for k, v in columns.items() if isinstance(v, Jagged)}
    for start in range(0, num_rows, batch_size):
        end = min(start + batch_size, num_rows)
        batch = {}
        for k, v in columns.items():
            if isinstance(v, Jagged):
                batch[k] = Jagged(v.lengths[start:end], v.values[offsets[k][start] : offsets[k][end]])
            else:
                batch[k] = v[start:end]
        yield start, end, batch


def content_keys(columns: Mapping[str, torch.Tensor | Jagged], doc_ids: torch.Tensor) -> torch.Tensor:
    """Per document, an exclusion key shared by exact duplicates (identical values in every field the tower
    reads, hence identical embeddings): the smallest doc id of its duplicate group.

    Each document becomes one row of 64-bit words (every field; a jagged one padded, with its length),
    hashed to 62 bits column by column (vectorised, O(total bytes)); documents with equal hashes are then
    compared word for word with their group's first member, and one that differs (a hash collision, about
    N² / 2^63) keeps its own id: a duplicate can be missed that way, a distinct document never merged.
    """
    n = doc_ids.numel()
    parts = []
    for key in sorted(columns):
        c = columns[key]
        if isinstance(c, Jagged):
            width = int(c.lengths.max()) if n else 0
            padded = c.values.new_zeros(n, width)
            padded[torch.arange(width)[None, :] < c.lengths[:, None]] = c.values
            parts += [c.lengths.reshape(n, 1).to(torch.int64), padded]
        else:
            parts.append(c.reshape(n, -1))
    raw = torch.cat([p.cpu().contiguous().view(torch.uint8).reshape(n, -1) for p in parts], 1)
    raw = torch.nn.functional.pad(raw, (0, -raw.shape[1] % 8))
    words = raw.view(torch.int64)
    low = high = torch.zeros(n, dtype=torch.int64)
    for j in range(words.shape[1]):
        w = words[:, j]
        low = mix32(low ^ mix32(w & MASK32))
        high = mix32(high ^ mix32(((w >> 32) & MASK32) ^ 0x5BD1E995))
    _, group = torch.unique((low << 30) ^ high, return_inverse=True)
    ids = doc_ids.cpu().to(torch.int64)
    first = torch.full((n,), n, dtype=torch.int64).scatter_reduce_(0, group, torch.arange(n), reduce="amin")
    same = (words == words[first[group]]).all(1)
    smallest = torch.full((n,), torch.iinfo(torch.int64).max, dtype=torch.int64)
    smallest.scatter_reduce_(0, group[same], ids[same], reduce="amin")
    return torch.where(same, smallest[group], ids)


def ids_checksum(doc_ids: torch.Tensor) -> int:
    """crc32 of the ids' bytes: ranks compare it to make sure they prefill the same corpus."""
    return zlib.crc32(doc_ids.cpu().to(torch.int64).numpy().tobytes())
