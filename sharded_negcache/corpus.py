"""Corpus mode: the cache's rows are the documents of a corpus, addressed by document id.

``CorpusIndex`` maps a document id to its global row and its exclusion key; it is replicated on every
rank of a shard group (16 bytes per document: 16 MB for a million). ``place`` decides where prefill
puts each document, ``owned_batches`` yields the documents a rank encodes, and ``content_keys`` hashes
what the tower reads, so that exact duplicates share an exclusion key (design §12).
No collectives here: the handler gathers what the index is rebuilt from.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch

from .jagged import Jagged, JaggedFieldSpec, to_jagged
from .specs import AnySpec

__all__ = ["CORPUS_KEY", "CorpusIndex", "place", "corpus_columns", "owned_batches", "content_keys", "ids_checksum", "select_rows"]

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

    def __len__(self) -> int:
        return self.ids.numel()

    def lookup(self, doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(global rows, exclusion keys, found) of ``doc_ids`` [B]; rows and keys are 0 where not found."""
        doc_ids = doc_ids.reshape(-1).to(torch.int64)
        ids = self.ids.to(doc_ids.device)
        if ids.numel() == 0:
            zero = torch.zeros_like(doc_ids)
            return zero, zero, torch.zeros_like(doc_ids, dtype=torch.bool)
        pos = torch.searchsorted(ids, doc_ids).clamp_(max=ids.numel() - 1)
        found = ids[pos] == doc_ids
        rows = torch.where(found, self.rows.to(doc_ids.device)[pos], 0)
        keys = torch.where(found, self.keys.to(doc_ids.device)[pos], 0)
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


def owned_batches(
    columns: Mapping[str, torch.Tensor | Jagged], rank: int, world_size: int, batch_size: int
) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor | Jagged]]]:
    """(document positions, their fields) of the documents ``place`` gives to ``rank``, ``batch_size`` at a time."""
    num_docs = next(iter(columns.values()))
    num_docs = num_docs.lengths.numel() if isinstance(num_docs, Jagged) else num_docs.shape[0]
    mine = torch.arange(rank, num_docs, world_size, dtype=torch.int64)
    for start in range(0, mine.numel(), batch_size):
        index = mine[start : start + batch_size]
        yield index, {k: select_rows(v, index) for k, v in columns.items()}


def content_keys(columns: Mapping[str, torch.Tensor | Jagged], doc_ids: torch.Tensor) -> torch.Tensor:
    """Per document, an exclusion key shared by exact duplicates (identical values in every field the tower
    reads, hence identical embeddings): the smallest doc id of its duplicate group. Compares each row's
    bytes (field by field, with lengths) on the host: O(total bytes), once per prefill."""
    n = doc_ids.numel()
    fields: list[Sequence[torch.Tensor]] = []
    for key in sorted(columns):
        c = columns[key]
        if isinstance(c, Jagged):
            fields.append(torch.split(c.values.cpu(), c.lengths.cpu().tolist()))
        else:
            fields.append(list(c.cpu().reshape(n, -1).unbind(0)))
    ids = doc_ids.cpu().to(torch.int64).tolist()
    smallest: dict[bytes, int] = {}
    blobs = []
    for i in range(n):
        blob = b"".join(f[i].numel().to_bytes(8, "little") + f[i].numpy().tobytes() for f in fields)
        blobs.append(blob)
        smallest[blob] = min(smallest.get(blob, ids[i]), ids[i])
    return torch.tensor([smallest[b] for b in blobs], dtype=torch.int64)


def ids_checksum(doc_ids: torch.Tensor) -> int:
    """crc32 of the ids' bytes: ranks compare it to make sure they prefill the same corpus."""
    return zlib.crc32(doc_ids.cpu().to(torch.int64).numpy().tobytes())
