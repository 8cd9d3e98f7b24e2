"""compat.losses: the single-process CacheClassificationLoss (reference semantics) and the engine-backed
DistributedCacheClassificationLoss, in one process and on two gloo ranks. Expected values are derived in
the comments from the scores written out by hand.
"""
from __future__ import annotations

import math

import pytest
import torch

from sharded_negcache.compat import losses
from sharded_negcache.compat.negative_cache import CacheManager, FixedLenFeature, NegativeCache
from sharded_negcache.testing import run_ranks

E = math.e
TOL = dict(rtol=1e-5, atol=1e-6)


def close(got, want) -> None:
    torch.testing.assert_close(torch.as_tensor(got).float(), torch.as_tensor(want, dtype=torch.float32), **TOL)


def tower(data: dict[str, torch.Tensor]) -> torch.Tensor:
    """Document network: embedding = 2 * x (so every cached row x is stale by a factor 2)."""
    return 2.0 * data["x"]


def fixed(*rows: int):
    """A retrieval function that picks the given candidate column for each query."""
    return lambda scores: torch.tensor([[r] for r in rows])


# Cache rows (embedding = x): r0 = [1, 0], r1 = [0, 1], r2 = [1, 1].
ROWS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
# Queries q0 = [1, 0], q1 = [0, 2]; positives p0 = [0, 1], p1 = [1, 1].
Q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
P = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
# Cache scores: q0 -> [1, 0, 1], q1 -> [0, 2, 2]; positive scores s0 = 0, s1 = 2.
P0 = 1.0 / (1.0 + E + 1.0 + E)  # e^0 / (e^0 + e^1 + e^0 + e^1)
P1 = E**2 / (E**2 + 1.0 + E**2 + E**2)
# Fixed draws: q0 -> r2 (fresh 2*[1,1], s- = 2), q1 -> r0 (fresh [2, 0], s- = 0).
TRAIN = [(1 - P0) * (2.0 - 0.0), (1 - P1) * (0.0 - 2.0)]


def one_cache(rows: torch.Tensor = ROWS) -> dict[str, NegativeCache]:
    return {"c": NegativeCache({"emb": rows.clone(), "x": rows.clone()}, [0] * rows.shape[0])}


def local_loss(**kw) -> losses.CacheClassificationLoss:
    return losses.CacheClassificationLoss("emb", ("x",), **kw)


def test_training_and_interpretable_loss_per_query():
    loss = local_loss(reducer=None)
    loss.retrieval_fn = fixed(2, 0)
    out = loss(tower, Q, P, one_cache())
    close(out.training_loss, TRAIN)
    close(out.interpretable_loss, [-math.log(P0), -math.log(P1)])
    close(out.staleness, [0.25, 0.25])  # |x - 2x|^2 / |2x|^2
    loss.reducer = torch.mean
    out = loss(tower, Q, P, one_cache())
    close(out.training_loss, sum(TRAIN) / 2)
    close(out.interpretable_loss, (-math.log(P0) - math.log(P1)) / 2)


def test_the_references_spelling_of_the_retrieval_seam_replaces_the_same_function():
    """Code written for the reference sets ``loss._retrieval_fn``: it must fix the draws exactly as
    ``retrieval_fn`` does (q0 -> r2, q1 -> r0 gives TRAIN), in both losses."""
    loss = local_loss(reducer=None)
    loss._retrieval_fn = fixed(2, 0)
    assert loss.retrieval_fn is loss._retrieval_fn
    close(loss(tower, Q, P, one_cache()).training_loss, TRAIN)
    engine_loss = losses.DistributedCacheClassificationLoss("emb", ("x",))
    engine_loss._retrieval_fn = fixed(0, 0)
    with pytest.raises(NotImplementedError, match="retrieval_fn cannot be replaced"):
        engine_loss(tower, Q, P, one_cache())


def test_refresh_triple():
    loss = local_loss()
    loss.retrieval_fn = fixed(2, 0)
    out = loss(tower, Q, P, one_cache())
    assert out.updated_item_indices["c"].tolist() == [2, 0]
    assert out.updated_item_mask["c"].tolist() == [True, True]
    assert out.updated_item_data["c"]["emb"].tolist() == [[2.0, 2.0], [2.0, 0.0]]
    assert out.topk_features is None


def test_gradients():
    # L = mean_i (1 - P_i)(q_i . f_i - q_i . p_i) with f = w * x, w = 2:
    # dL/dq_i = (1 - P_i)(f_i - p_i) / 2; dL/dw = mean_i (1 - P_i) q_i . x_i = ((1-P0)*1 + (1-P1)*0) / 2.
    w = torch.tensor(2.0, requires_grad=True)
    q = Q.clone().requires_grad_(True)
    loss = local_loss()
    loss.retrieval_fn = fixed(2, 0)
    loss(lambda d: w * d["x"], q, P, one_cache()).training_loss.backward()
    close(q.grad, [[(1 - P0) * 2 / 2, (1 - P0) * 1 / 2], [(1 - P1) * 1 / 2, (1 - P1) * -1 / 2]])
    close(w.grad, (1 - P0) / 2)


def test_score_transform():
    # T(s) = s / 2: scores q0 -> [.5, 0, .5], s0 = 0; q1 -> [0, 1, 1], s1 = 1. Draws as above.
    loss = local_loss(score_transform=lambda s: 0.5 * s, reducer=None)
    loss.retrieval_fn = fixed(2, 0)
    out = loss(tower, Q, P, one_cache())
    p0 = 1.0 / (1.0 + 2 * math.exp(0.5) + 1.0)
    p1 = E / (E + 1.0 + 2 * E)
    close(out.training_loss, [(1 - p0) * (1.0 - 0.0), (1 - p1) * (0.0 - 1.0)])


def test_several_caches_concatenate_in_sorted_key_order():
    # "a" holds r0, "b" holds r1, r2; given in the order b, a. Global row 2 is b[1], row 0 is a[0].
    caches = {
        "b": NegativeCache({"emb": ROWS[1:].clone(), "x": ROWS[1:].clone()}, [0, 0]),
        "a": NegativeCache({"emb": ROWS[:1].clone(), "x": ROWS[:1].clone()}, [0]),
    }
    loss = local_loss(reducer=None)
    loss.retrieval_fn = fixed(2, 0)
    out = loss(tower, Q, P, caches)
    close(out.training_loss, TRAIN)
    assert out.updated_item_mask["a"].tolist() == [False, True]
    assert out.updated_item_mask["b"].tolist() == [True, False]
    assert out.updated_item_indices["a"][1].item() == 0
    assert out.updated_item_indices["b"][0].item() == 1


# Four 1-d rows [3, 4, 2, 1], one query q = [1], positive p = [0] (s+ = 0).
ROWS4 = torch.tensor([[3.0], [4.0], [2.0], [1.0]])


def test_top_k_is_the_block_max_of_the_reference():
    # Groups [3, 4] and [2, 1]: candidates 4 (row 1) and 2 (row 2), not the exact top-2 {4, 3}.
    loss = local_loss(top_k=2, reducer=None)
    loss.retrieval_fn = fixed(1)  # the second candidate: row 2, fresh 4, s- = 4
    out = loss(tower, torch.tensor([[1.0]]), torch.tensor([[0.0]]), one_cache(ROWS4))
    p = 1.0 / (1.0 + E**4 + E**2)
    close(out.interpretable_loss, [-math.log(p)])
    close(out.training_loss, [(1 - p) * 4.0])
    assert out.updated_item_indices["c"].tolist() == [2]


def test_top_k_with_rows_not_divisible_by_k():
    # Rows [3, 4, 2, 1, 5], k = 2: groups [3, 4] and [2, 1, 5] -> candidates 4 and 5.
    rows = torch.tensor([[3.0], [4.0], [2.0], [1.0], [5.0]])
    out = local_loss(top_k=2, reducer=None)(tower, torch.tensor([[1.0]]), torch.tensor([[0.0]]), one_cache(rows))
    close(out.interpretable_loss, [math.log(1.0 + E**4 + E**5)])


def test_return_topk_gives_the_best_candidates_per_query():
    loss = local_loss(top_k=2)
    loss.retrieval_fn = fixed(0)
    out = loss(tower, torch.tensor([[1.0]]), torch.tensor([[0.0]]), one_cache(ROWS4), return_topk=5)
    assert len(out.topk_features) == 1
    assert out.topk_features[0]["x"].tolist() == [[4.0], [2.0]]  # min(5, k) candidates, best first
    out = loss(tower, torch.tensor([[1.0]]), torch.tensor([[0.0]]), one_cache(ROWS4), return_topk=1)
    assert out.topk_features[0]["x"].tolist() == [[4.0]]


def test_empty_rows_are_never_candidates():
    # One filled row (embedding 1) among three: the zero rows would add e^0 twice in the reference.
    m = CacheManager({"emb": FixedLenFeature([1], torch.float32), "x": FixedLenFeature([1], torch.float32)}, 3)
    cache = m.update_cache(m.init_cache(), new_items={"emb": torch.tensor([[1.0]]), "x": torch.tensor([[1.0]])})
    out = local_loss(reducer=None)(tower, torch.tensor([[1.0]]), torch.tensor([[0.0]]), {"c": cache})
    p = 1.0 / (1.0 + E)
    close(out.interpretable_loss, [-math.log(p)])
    close(out.training_loss, [(1 - p) * 2.0])  # the only candidate, re-encoded as 2
    assert out.updated_item_indices["c"].tolist() == [0]


def test_a_query_without_candidates_has_zero_loss_and_no_draw():
    m = CacheManager({"emb": FixedLenFeature([1], torch.float32), "x": FixedLenFeature([1], torch.float32)}, 2)

    def must_not_run(data):
        raise AssertionError("nothing was sampled: the document network must not run")

    q = torch.tensor([[1.0], [2.0]], requires_grad=True)
    out = local_loss(reducer=None)(must_not_run, q, torch.tensor([[1.0], [1.0]]), {"c": m.init_cache()})
    close(out.training_loss, [0.0, 0.0])
    close(out.interpretable_loss, [0.0, 0.0])
    assert torch.isnan(out.staleness).all()
    assert out.updated_item_mask["c"].tolist() == [False, False]
    reduced = local_loss()(must_not_run, q, torch.tensor([[1.0], [1.0]]), {"c": m.init_cache()})
    reduced.training_loss.backward()
    assert reduced.staleness.item() == 0.0 and q.grad.abs().sum().item() == 0.0


def test_bad_settings_and_inputs():
    with pytest.raises(TypeError, match="data_keys"):
        losses.CacheClassificationLoss("emb", "x")
    with pytest.raises(ValueError, match="top_k"):
        losses.CacheClassificationLoss("emb", ("x",), top_k=0)
    with pytest.raises(TypeError, match="cache"):
        local_loss()(tower, Q, P, one_cache()["c"])
    with pytest.raises(ValueError, match="has no field 'x'"):
        local_loss()(tower, Q, P, {"c": NegativeCache({"emb": ROWS}, [0, 0, 0])})
    with pytest.raises(ValueError, match="pos_doc_embeddings"):
        local_loss()(tower, Q, P[:1], one_cache())
    loss = local_loss()
    loss.retrieval_fn = fixed(7, 0)
    with pytest.raises(ValueError, match="retrieval_fn"):
        loss(tower, Q, P, one_cache())


# ---- the engine-backed distributed loss -------------------------------------------------------

# One process: rows r0..r2 as above; queries q0 = [1, .5], q1 = [-1, 2]; positives p0 = [0, 1], p1 = [1, 1].
# Scores q0 -> [1, .5, 1.5] (s+ = .5), q1 -> [-1, 2, 1] (s+ = 1). With top_k = 1 the only candidate is the
# best row: q0 -> r2 (fresh [2, 2], s- = 3), q1 -> r1 (fresh [0, 2], s- = 4); P = 1 / (1 + e) for both.
DQ = torch.tensor([[1.0, 0.5], [-1.0, 2.0]])
DP = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
PT = 1.0 / (1.0 + E)


def dist_loss(**kw) -> losses.DistributedCacheClassificationLoss:
    return losses.DistributedCacheClassificationLoss("emb", ("x",), **kw)


def test_distributed_loss_in_one_process_top_1():
    w = torch.tensor(2.0, requires_grad=True)
    q = DQ.clone().requires_grad_(True)
    out = dist_loss(top_k=1)(lambda d: w * d["x"], q, DP, one_cache())
    close(out.training_loss, ((1 - PT) * 2.5 + (1 - PT) * 3.0) / 2)
    close(out.interpretable_loss, math.log(1 + E))  # -log P for both queries
    close(out.staleness, 0.25)
    out.training_loss.backward()
    # dL/dq_i = (1 - P)(f_i - p_i) / 2; dL/dw = mean_i (1 - P) q_i . x_i = (1 - P)(1.5 + 2) / 2.
    close(q.grad, [[(1 - PT) * 2 / 2, (1 - PT) * 1 / 2], [(1 - PT) * -1 / 2, (1 - PT) * 1 / 2]])
    close(w.grad, (1 - PT) * 3.5 / 2)
    # Refreshes of this (only) shard: rows 1 and 2, re-encoded.
    assert out.updated_item_indices["c"].tolist() == [1, 2]
    assert out.updated_item_mask["c"].tolist() == [True, True]
    assert out.updated_item_data["c"]["emb"].tolist() == [[0.0, 2.0], [2.0, 2.0]]


def test_distributed_loss_without_top_k_is_the_exact_softmax():
    out = dist_loss(reducer=None)(tower, DQ, DP, one_cache())
    lse0 = math.log(math.exp(0.5) + E + math.exp(0.5) + math.exp(1.5))
    lse1 = math.log(E + math.exp(-1) + E**2 + E)
    close(out.interpretable_loss, [lse0 - 0.5, lse1 - 1.0])
    assert out.training_loss.shape == (2,)


def test_distributed_top_k_is_exact_not_block_max():
    out = dist_loss(top_k=2, reducer=None)(tower, torch.tensor([[1.0]]), torch.tensor([[0.0]]), one_cache(ROWS4))
    close(out.interpretable_loss, [math.log(1.0 + E**4 + E**3)])  # exact top-2 is {4, 3}


def test_distributed_reducers():
    summed = dist_loss(top_k=1, reducer=torch.sum)(tower, DQ, DP, one_cache())
    close(summed.training_loss, (1 - PT) * 2.5 + (1 - PT) * 3.0)


def test_distributed_loss_refuses_what_the_engine_cannot_do():
    loss = dist_loss()
    with pytest.raises(NotImplementedError, match="return_topk"):
        loss(tower, DQ, DP, one_cache(), return_topk=2)
    loss.retrieval_fn = fixed(0, 0)
    with pytest.raises(NotImplementedError, match="retrieval_fn"):
        loss(tower, DQ, DP, one_cache())


# Two ranks. Shards (embedding = x): rank 0 holds global rows 0, 1 = [1, 0], [0, 1]; rank 1 holds rows
# 2, 3 = [1, 1], [-1, 0]. Rank 0: q = [1, .5], p = [0, 1]. Rank 1: qa = [-1, 2], pa = [1, 1];
# qb = [-.5, -1], pb = [1, 0].
SHARDS = [torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 1.0], [-1.0, 0.0]])]
QUERIES = [(torch.tensor([[1.0, 0.5]]), torch.tensor([[0.0, 1.0]])),
           (torch.tensor([[-1.0, 2.0], [-0.5, -1.0]]), torch.tensor([[1.0, 1.0], [1.0, 0.0]]))]


def two_rank_losses(rank: int, world_size: int) -> dict:
    torch.manual_seed(rank)  # the engine's randomness must not depend on it
    q, p = QUERIES[rank]
    q = q.clone().requires_grad_(True)
    cache = {"c": NegativeCache({"emb": SHARDS[rank].clone(), "x": SHARDS[rank].clone()}, [0, 0])}
    top1 = dist_loss(top_k=1)(tower, q, p, cache)
    top1.training_loss.backward()
    exact = dist_loss(reducer=None)(tower, q.detach(), p, cache)
    return {
        "loss": top1.training_loss.item(), "grad": q.grad.tolist(),
        "indices": top1.updated_item_indices["c"].tolist(), "emb": top1.updated_item_data["c"]["emb"].tolist(),
        "interpretable": exact.interpretable_loss.tolist(),
    }


def test_distributed_loss_on_two_ranks():
    r0, r1 = run_ranks(2, two_rank_losses)
    # Scores against the global rows [1,0], [0,1], [1,1], [-1,0]:
    #   rank 0 q  -> [1, .5, 1.5, -1], s+ = .5: top-1 is row 2 (rank 1's), fresh [2, 2], s- = 3;
    #   rank 1 qa -> [-1, 2, 1, 1],   s+ = 1:  top-1 is row 1 (rank 0's), fresh [0, 2], s- = 4;
    #   rank 1 qb -> [-.5, -1, -1.5, .5], s+ = -.5: top-1 is row 3 (its own), fresh [-2, 0], s- = 1.
    # In each case the best row beats the positive by 1, so P = 1 / (1 + e).
    close(r0["loss"], (1 - PT) * 2.5)
    close(r1["loss"], ((1 - PT) * 3.0 + (1 - PT) * 1.5) / 2)
    close(r0["grad"], [[(1 - PT) * 2, (1 - PT) * 1]])  # (1 - P)(f - p)
    # Each owner receives the refreshes of its own rows, whoever sampled them.
    assert r0["indices"] == [1] and r0["emb"] == [[0.0, 2.0]]
    assert r1["indices"] == [0, 1] and r1["emb"] == [[2.0, 2.0], [-2.0, 0.0]]

    def lse(*scores):
        return math.log(sum(math.exp(s) for s in scores))

    close(r0["interpretable"], [lse(0.5, 1, 0.5, 1.5, -1) - 0.5])
    close(r1["interpretable"], [lse(1, -1, 2, 1, 1) - 1, lse(-0.5, -0.5, -1, -1.5, 0.5) + 0.5])
