"""compat.handlers.CacheLossHandler: cache as buffers, refresh-then-insert per step, writer tuples, return_topk,
and on two gloo ranks the sharded modes (use_cross_replica, the distributed loss). Values derived in comments.
"""
from __future__ import annotations

import math

import pytest
import torch

from engine_cases import ScalarRecorder
from sharded_negcache.compat import handlers, losses
from sharded_negcache.compat.negative_cache import CacheManager, FixedLenFeature
from sharded_negcache.testing import run_ranks

E = math.e
TOL = dict(rtol=1e-5, atol=1e-6)


def close(got, want) -> None:
    torch.testing.assert_close(torch.as_tensor(got).float(), torch.as_tensor(want, dtype=torch.float32), **TOL)


def tower(data: dict[str, torch.Tensor]) -> torch.Tensor:
    return 2.0 * data["x"]


def manager(rows: int, dim: int = 1) -> CacheManager:
    specs = {"x": FixedLenFeature([dim], torch.float32), "emb": FixedLenFeature([dim], torch.float32)}
    return CacheManager(specs, rows)


def handler(rows: int, loss=None, dim: int = 1, **kw) -> handlers.CacheLossHandler:
    loss = loss if loss is not None else losses.CacheClassificationLoss("emb", ("x",))
    return handlers.CacheLossHandler(manager(rows, dim), loss, "emb", ("x",), **kw)


class StubLoss(losses.CacheLoss):
    """Returns fixed refreshes, as a test double for the loss."""

    def __init__(self, refresh: dict | None) -> None:
        self.refresh = refresh

    def __call__(self, doc_network, query_embeddings, pos_doc_embeddings, cache, return_topk=0):
        r = self.refresh or {}
        return losses.CacheLossReturn(
            torch.tensor(0.0), torch.tensor(0.0), r.get("data"), r.get("indices"), r.get("mask"),
            torch.tensor(0.0), None,
        )


def test_cache_is_zero_buffers_that_move_and_checkpoint():
    h = handler(4, dim=3)
    assert torch.equal(h.cache.data["emb"], torch.zeros(4, 3))
    assert torch.equal(h.cache.age, torch.zeros(4, dtype=torch.int32))
    assert not h.cache.filled.any()
    assert {"_cache.data.x", "_cache.data.emb", "_cache.age", "_cache.filled"} <= set(h.state_dict())
    h.update_cache_and_compute_loss(tower, torch.ones(1, 3), torch.full((1, 3), 5.0), {"x": torch.ones(1, 3)})
    other = handler(4, dim=3)
    other.load_state_dict(h.state_dict())
    assert other.cache.data["emb"][0].tolist() == [5.0, 5.0, 5.0]
    assert other.cache.filled.tolist() == [True, False, False, False]
    moved = h.to("meta")
    assert moved.cache.data["emb"].is_meta and moved.cache.age.is_meta and moved.cache.filled.is_meta


def test_refresh_then_insert_with_a_stub_loss():
    h = handler(4, loss=StubLoss(None))
    h.update_cache_and_compute_loss(None, torch.zeros(1, 1), torch.tensor([[2.0]]), {"x": torch.tensor([[7.0]])})
    # Empty cache, ages all 0: the item goes to slot 0; ages [0, 1, 1, 1].
    h.cache_loss.refresh = {
        "data": {"cache": {"emb": torch.tensor([[5.0]])}},
        "indices": {"cache": torch.tensor([0])},
        "mask": {"cache": torch.tensor([True])},
    }
    h.update_cache_and_compute_loss(None, torch.zeros(1, 1), torch.tensor([[3.0]]), {"x": torch.tensor([[8.0]])})
    # Slot 0 refreshed (age reset), then the new item takes the oldest empty slot, 1 (tie with 2, 3).
    assert h.cache.data["emb"][:, 0].tolist() == [5.0, 3.0, 0.0, 0.0]
    assert h.cache.data["x"][:, 0].tolist() == [7.0, 8.0, 0.0, 0.0]
    assert h.cache.age.tolist() == [0, 0, 2, 2]


def test_two_steps_with_the_real_loss_and_a_writer():
    h = handler(3)
    q = torch.tensor([[1.0]], requires_grad=True)
    loss = h.update_cache_and_compute_loss(tower, q, torch.tensor([[1.0]]), {"x": torch.tensor([[1.0]])})
    assert loss.item() == 0.0  # an empty cache has no candidate: P = 1
    assert h.cache.data["emb"][:, 0].tolist() == [1.0, 0.0, 0.0] and h.cache.age.tolist() == [0, 1, 1]
    # Step 2: the only candidate is row 0 (score 1), s+ = .5, P = e^.5 / (e^.5 + e); re-encoded 2, s- = 2.
    writer = ScalarRecorder()
    loss = h.update_cache_and_compute_loss(
        tower, torch.tensor([[1.0]]), torch.tensor([[0.5]]), {"x": torch.tensor([[3.0]])}, writer=(writer, 7)
    )
    p = math.exp(0.5) / (math.exp(0.5) + E)
    close(loss, (1 - p) * (2.0 - 0.5))
    assert writer.calls[0][0] == "cache/interpretable_prediction_loss" and writer.calls[0][2] == 7
    close(writer.calls[0][1], -math.log(p))
    assert writer.calls[1][0] == "cache/staleness"
    close(writer.calls[1][1], 0.25)  # |1 - 2|^2 / |2|^2
    # Row 0 refreshed to 2 (age reset), the new item in the oldest empty row, 1.
    assert h.cache.data["emb"][:, 0].tolist() == [2.0, 0.5, 0.0]
    assert h.cache.data["x"][:, 0].tolist() == [1.0, 3.0, 0.0]
    assert h.cache.age.tolist() == [0, 0, 2]
    assert h.cache.filled.tolist() == [True, True, False]


def test_return_topk_returns_the_loss_and_features():
    h = handler(2)
    pos = torch.tensor([[1.0], [3.0]])  # cached embeddings 1 (x = 4) and 3 (x = 6)
    h.update_cache_and_compute_loss(tower, torch.ones(2, 1), pos, {"x": torch.tensor([[4.0], [6.0]])})
    loss, feats = h.update_cache_and_compute_loss(
        tower, torch.ones(1, 1), torch.ones(1, 1), {"x": torch.ones(1, 1)}, return_topk=2
    )
    assert loss.dim() == 0
    assert feats[0]["x"][:, 0].tolist() == [6.0, 4.0]  # q = [1] scores them 3 and 1: best first


def test_bad_use():
    with pytest.raises(ValueError, match="return_topk"):
        handler(2).update_cache_and_compute_loss(
            tower, torch.ones(1, 1), torch.ones(1, 1), {"x": torch.ones(1, 1)}, return_topk=-1
        )
    with pytest.raises(ValueError, match=r"features lacks the data_keys \['x'\]"):
        handler(2).update_cache_and_compute_loss(tower, torch.ones(1, 1), torch.ones(1, 1), {"y": torch.ones(1, 1)})
    with pytest.raises(ValueError, match="embedding_key"):
        handlers.CacheLossHandler(manager(2), StubLoss(None), "emb", ("x", "y"))
    with pytest.raises(TypeError, match="use_cross_replica=True"):
        handler(2, loss=StubLoss(None), use_cross_replica=True)


# ---- two ranks -------------------------------------------------------------------------------
# d = 2, tower f(x) = 2x, one query per rank per step. Step 1 fills the empty cache:
#   rank 0 inserts emb [1, 0] (x [1, 0]); rank 1 inserts emb [0, 1] (x [0, 1]).
# Step 2: rank 0 q = [0, 2], p = [1, 1]; rank 1 q = [3, 0], p = [0, 0] (x = p).
STEPS = [  # per step, per rank: (query, positive)
    [([[1.0, 0.0]], [[1.0, 0.0]]), ([[0.0, 1.0]], [[0.0, 1.0]])],
    [([[0.0, 2.0]], [[1.0, 1.0]]), ([[3.0, 0.0]], [[0.0, 0.0]])],
]


def run_handler(rank: int, h: handlers.CacheLossHandler) -> dict:
    out = []
    for step in STEPS:
        q, p = (torch.tensor(t) for t in step[rank])
        out.append(h.update_cache_and_compute_loss(tower, q, p, {"x": p.clone()}).item())
    c = h.cache
    return {"loss": out, "emb": c.data["emb"].tolist(), "age": c.age.tolist(), "rows": c.age.shape[0]}


def two_rank_handlers(rank: int, world_size: int) -> dict:
    torch.manual_seed(100 + rank)
    local = lambda: losses.CacheClassificationLoss("emb", ("x",), top_k=1)  # noqa: E731
    dist = lambda: losses.DistributedCacheClassificationLoss("emb", ("x",), top_k=1)  # noqa: E731
    results = {
        "cross_local": run_handler(rank, handler(4, loss=local(), dim=2, use_cross_replica=True)),
        "cross_dist": run_handler(rank, handler(4, loss=dist(), dim=2, use_cross_replica=True)),
        "dist": run_handler(rank, handler(2, loss=dist(), dim=2)),
        "independent": run_handler(rank, handler(2, loss=local(), dim=2)),
    }
    try:
        handler(3, loss=local(), dim=2, use_cross_replica=True)
    except ValueError as exc:
        results["odd_size_error"] = str(exc)
    return results


def test_sharded_handlers_on_two_ranks():
    r0, r1 = run_ranks(2, two_rank_handlers)
    # One global cache of 4 rows, 2 per rank (rank 0: global rows 0-1, rank 1: rows 2-3).
    # Step 2, rank 0: q = [0, 2] scores the filled rows [1,0] (row 0) and [0,1] (row 2) as 0 and 2; s+ = 2.
    #   top-1 = row 2 on rank 1; P = e^2 / (e^2 + e^2) = 1/2; fresh [0, 2], s- = 4: loss (1 - 1/2)(4 - 2) = 1.
    # Step 2, rank 1: q = [3, 0] scores row 0 as 3 and row 2 as 0; s+ = 0.
    #   top-1 = row 0 on rank 0; P = 1 / (1 + e^3); fresh [2, 0], s- = 6: loss (1 - P) * 6.
    want0, want1 = [0.0, 1.0], [0.0, 6.0 * E**3 / (1 + E**3)]
    # Owners refresh the sampled rows (age reset), then insert their own positive into their empty row.
    shard0 = {"emb": [[2.0, 0.0], [1.0, 1.0]], "age": [0, 0], "rows": 2}
    shard1 = {"emb": [[0.0, 2.0], [0.0, 0.0]], "age": [0, 0], "rows": 2}
    for mode in ("cross_local", "cross_dist", "dist"):
        close(r0[mode]["loss"], want0)
        close(r1[mode]["loss"], want1)
        assert {k: r0[mode][k] for k in shard0} == shard0, mode
        assert {k: r1[mode][k] for k in shard1} == shard1, mode
    # Without sharing, rank 0 only sees its own row [1, 0]: score 0 vs s+ = 2, P = e^2 / (e^2 + 1),
    # fresh [2, 0], s- = 0: loss (1 - P)(0 - 2).
    close(r0["independent"]["loss"], [0.0, -2.0 / (1 + E**2)])
    assert r0["independent"]["emb"] == [[2.0, 0.0], [1.0, 1.0]]
    assert "must divide by the world size 2" in r0["odd_size_error"]
