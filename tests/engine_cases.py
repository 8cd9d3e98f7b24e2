"""Shared, deterministic inputs for engine tests: specs, a document tower, cache contents, batches."""
from __future__ import annotations

import torch

from sharded_negcache import FieldSpec, ShardedCacheLossHandler

DIM, FEAT = 8, 6


def specs(with_ids: bool = False) -> dict[str, FieldSpec]:
    out = {"x": FieldSpec((FEAT,), torch.float32), "embedding": FieldSpec((DIM,), torch.float32)}
    if with_ids:
        out["doc_id"] = FieldSpec((1,), torch.int64)
    return out


class ScalarRecorder:
    """A SummaryWriter stand-in (``add_scalar``) that records every call as (tag, value, step)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float, int]] = []

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.calls.append((tag, value, step))


class Tower(torch.nn.Module):
    """A fixed linear document tower: the same weights in every process."""

    def __init__(self, seed: int = 1) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.lin = torch.nn.Linear(FEAT, DIM)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(DIM, FEAT, generator=g) * 0.5)
            self.lin.bias.copy_(torch.randn(DIM, generator=g) * 0.1)

    def forward(self, data: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.lin(data["x"])


def make_handler(cache_size: int, with_ids: bool = False, **kw) -> ShardedCacheLossHandler:
    kw.setdefault("score_transform", 3.0)
    kw.setdefault("block_size", 4)
    return ShardedCacheLossHandler(
        specs(with_ids), cache_size, "embedding", ("x",), doc_id_key="doc_id" if with_ids else None, **kw
    )


def global_cache(cache_size: int, tower: Tower, seed: int = 7, empty_every: int = 5, with_ids: bool = False) -> dict:
    """Whole-cache contents: features, slightly stale embeddings, ages, some empty rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(cache_size, FEAT, generator=g)
    with torch.no_grad():
        emb = tower({"x": x}) + 0.05 * torch.randn(cache_size, DIM, generator=g)
    filled = torch.ones(cache_size, dtype=torch.bool)
    filled[::empty_every] = False
    rows = {"x": x, "embedding": emb, "age": torch.randint(0, 9, (cache_size,), generator=g), "filled": filled}
    if with_ids:
        rows["doc_id"] = torch.randint(0, 12, (cache_size, 1), generator=g)
    return rows


def global_batch(size: int, tower: Tower, seed: int = 11, with_ids: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(size, FEAT, generator=g)
    batch = {"x": x, "q": torch.randn(size, DIM, generator=g)}
    if with_ids:
        batch["doc_id"] = torch.randint(0, 12, (size, 1), generator=g)
    return batch


def rank_batch(rank: int, step: int, n: int = 3) -> tuple[torch.Tensor, dict]:
    """(queries [n, DIM], document data) of one rank at one step: different on every rank and step."""
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(n, DIM, generator=g), {"x": torch.randn(n, FEAT, generator=g)}


def run_step(handler: ShardedCacheLossHandler, tower: Tower, batch: dict, lo: int, hi: int, with_ids: bool = False):
    """One step on this rank's slice [lo, hi) of the global batch; returns the loss and gradient norms."""
    q = batch["q"][lo:hi].clone().requires_grad_(True)
    data = {"x": batch["x"][lo:hi]}
    if with_ids:
        data["doc_id"] = batch["doc_id"][lo:hi]
    tower.zero_grad()
    loss = handler.update_cache_and_compute_loss(tower, q, tower(data), data)
    loss.backward()
    return loss.detach(), q.grad


def cache_state(h: ShardedCacheLossHandler) -> dict:
    """A copy of this rank's shard (rows, ages, fill flags), step counter and seed: what a refused call keeps."""
    state = {k: v.clone() for k, v in h.store.export_rows().items()}
    state["step"] = torch.tensor(h.steps_done)
    state["seed"] = h.seed.clone()
    return state


def changed(before: dict, h: ShardedCacheLossHandler) -> list[str]:
    """The entries of :func:`cache_state` that differ from ``before`` (empty: the cache is exactly as it was)."""
    after = cache_state(h)
    return sorted(set(before) ^ set(after)) + [k for k in before if k in after and not torch.equal(before[k], after[k])]
