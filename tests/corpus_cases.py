"""Shared inputs of the corpus-mode tests: a corpus whose first feature column is the document's index
(so a tower call reveals which documents it encoded), a recording encoder, and corpus handlers."""
from __future__ import annotations

import torch

from engine_cases import DIM, FEAT, Tower, make_handler

N_DOCS, ID_BASE = 22, 1000


def corpus(n: int = N_DOCS, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(doc ids [n], features x [n, FEAT]); x[:, 0] is the document's index, row 7 duplicates row 2."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEAT, generator=g)
    x[:, 0] = torch.arange(n, dtype=torch.float32)
    x[7] = x[2]
    ids = ID_BASE + 3 * torch.arange(n, dtype=torch.int64)  # not 0..n-1: rows are found by id, not position
    return ids, x


class Recorder:
    """An encode_fn that records the documents and batch sizes of each call and whether it ran in inference mode."""

    def __init__(self, tower: Tower, fail: bool = False) -> None:
        self.tower, self.fail = tower, fail
        self.docs: list[int] = []
        self.calls: list[int] = []
        self.inference: list[bool] = []

    def __call__(self, data: dict) -> torch.Tensor:
        if self.fail:
            raise RuntimeError("encoder broke")
        self.docs += data["x"][:, 0].round().long().tolist()
        self.calls.append(data["x"].shape[0])
        self.inference.append(torch.is_inference_mode_enabled())
        return self.tower(data)


def corpus_handler(cache_size: int = 32, **kw):
    kw.setdefault("num_negatives", 4)
    return make_handler(cache_size, with_ids=True, cache_mode="corpus", **kw)


def rows_by_id(rows: dict) -> dict[int, int]:
    """doc id -> global row of every filled row of a gathered cache."""
    filled = rows["filled"].nonzero().flatten().tolist()
    return {int(rows["doc_id"][r]): r for r in filled}


__all__ = ["DIM", "FEAT", "N_DOCS", "ID_BASE", "Tower", "corpus", "Recorder", "corpus_handler", "rows_by_id"]
