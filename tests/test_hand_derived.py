"""Small cases whose values are worked out by hand: losses, P, staleness, eviction order and ages."""
from __future__ import annotations

import math

import pytest
import torch

from sharded_negcache import FieldSpec, ShardedCacheLossHandler
from sharded_negcache.codecs import make_codec
from sharded_negcache.store import ShardStore


def identity_tower(data):
    """The 'document network' returns the stored features: fresh embedding = features."""
    return data["x"].clone()


def two_row_handler(**kw) -> ShardedCacheLossHandler:
    specs = {"x": FieldSpec((2,), torch.float32), "embedding": FieldSpec((2,), torch.float32)}
    h = ShardedCacheLossHandler(specs, 4, "embedding", ("x",), score_transform=None, block_size=1, **kw)
    # rows 0 and 1 hold stale embeddings (1,0) and (0,1); their features (fresh embeddings) are (2,0), (0,3)
    h.load_global_rows({
        "x": torch.tensor([[2.0, 0.0], [0.0, 3.0], [0.0, 0.0], [0.0, 0.0]]),
        "embedding": torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]]),
        "age": torch.tensor([3, 5, 0, 0]),
        "filled": torch.tensor([True, True, False, False]),
    })
    return h


@pytest.mark.parametrize("seed", range(4))
def test_losses_and_staleness_by_hand(seed):
    h = two_row_handler(seed=seed)
    q = torch.tensor([[1.0, 1.0]], requires_grad=True)
    p = torch.tensor([[2.0, 0.0]])
    loss = h.update_cache_and_compute_loss(identity_tower, q, p, {"x": p})
    res = h.last_step
    # a = (q·c1, q·c2) = (1, 1): Z = 2e, s+ = q·p = 2, P = e^2 / (e^2 + 2e) = e / (e + 2)
    prob = math.e / (math.e + 2)
    assert res.lse.item() == pytest.approx(math.log(2) + 1, rel=1e-6)
    assert res.prob_positive.item() == pytest.approx(prob, rel=1e-6)
    assert res.interpretable_loss.item() == pytest.approx(math.log(1 + 2 / math.e), rel=1e-6)
    row = res.sampled_rows.item()
    assert row in (0, 1)
    # re-encoded: row 0 -> (2,0), s- = 2, staleness |(1,0)-(2,0)|^2/4 = 1/4; row 1 -> (0,3), s- = 3, |(0,1)-(0,3)|^2/9 = 4/9
    s_neg, stale = {0: (2.0, 0.25), 1: (3.0, 4 / 9)}[row]
    assert loss.item() == pytest.approx((1 - prob) * (s_neg - 2.0), rel=1e-6, abs=1e-6)
    assert res.staleness.item() == pytest.approx(stale, rel=1e-6)
    # d loss / d q = (1-P) (e - p) with e the fresh embedding
    loss.backward()
    fresh = {0: [2.0, 0.0], 1: [0.0, 3.0]}[row]
    want = (1 - prob) * (torch.tensor(fresh) - p[0])
    torch.testing.assert_close(q.grad[0], want)
    # the refreshed row now holds the fresh embedding; LRU: its age is 0 after the step
    rows = h.store.export_rows()
    torch.testing.assert_close(rows["embedding"][row], torch.tensor(fresh))
    assert rows["age"][row].item() == 0
    # the positive went into the oldest (empty) row with the lowest slot: row 2
    assert res.inserted_rows.tolist() == [2]
    torch.testing.assert_close(rows["embedding"][2], p[0])
    assert rows["age"].tolist()[2:] == [0, 1]


def test_sampler_uses_both_rows_with_equal_scores():
    """a = (1, 1): each row has probability 1/2; over 8 seeds both rows must appear."""
    seen = set()
    for seed in range(8):
        h = two_row_handler(seed=seed)
        q, p = torch.tensor([[1.0, 1.0]]), torch.tensor([[2.0, 0.0]])
        h.update_cache_and_compute_loss(identity_tower, q, p, {"x": p})
        seen.add(h.last_step.sampled_rows.item())
    assert seen == {0, 1}


def test_empty_cache_gives_zero_loss_and_p_one():
    specs = {"x": FieldSpec((2,), torch.float32), "embedding": FieldSpec((2,), torch.float32)}
    h = ShardedCacheLossHandler(specs, 4, "embedding", ("x",), block_size=1)
    calls = []
    q = torch.tensor([[1.0, 0.5]], requires_grad=True)
    p = torch.tensor([[0.3, 0.2]])
    loss = h.update_cache_and_compute_loss(lambda d: calls.append(1) or d["x"], q, p, {"x": p})
    assert loss.item() == 0.0 and calls == []  # nothing sampled, tower not called
    assert h.last_step.prob_positive.item() == 1.0
    assert h.last_step.interpretable_loss.item() == 0.0
    assert h.last_step.sampled_rows.tolist() == [[-1]]
    loss.backward()
    assert torch.count_nonzero(q.grad) == 0


def _store(rows: int = 4) -> ShardStore:
    return ShardStore(rows, 2, {"x": FieldSpec((1,), torch.int64)}, make_codec("fp32"))


def _insert(store: ShardStore, values: list[int]) -> list[int]:
    emb = torch.tensor([[float(v), 0.0] for v in values])
    slots = store.insert(emb, {"x": torch.tensor([[v] for v in values])})
    store.tick()
    return slots.tolist()


def test_eviction_order_by_hand():
    s = _store()
    assert _insert(s, [10, 11]) == [0, 1]  # empty rows first, lowest slots
    assert s.age.tolist() == [0, 0, 1, 1]  # written rows 0; never-written rows count calls too
    assert _insert(s, [12]) == [2]  # remaining empty rows before any filled row
    assert s.age.tolist() == [1, 1, 0, 2]
    assert sorted(_insert(s, [13, 14])) == [0, 3]  # empty row 3, then oldest filled: 0 and 1 tie at age 1 -> slot 0
    assert s.age.tolist() == [0, 2, 1, 0]
    assert _insert(s, [15]) == [1]  # oldest: row 1 (age 2)
    # item i of a batch goes to the i-th oldest row (as the reference): 13 -> empty row 3, 14 -> row 0
    assert s.feature("x")[:, 0].tolist() == [14, 15, 12, 13]


def test_lru_refresh_resets_age_and_fifo_keeps_it():
    for use_lru, want_age in ((True, 0), (False, 3)):
        s = _store()
        _insert(s, [1, 2, 3, 4])  # ages 0
        s.tick()
        s.tick()  # ages 2
        s.refresh(torch.tensor([1, 1]), torch.tensor([[7.0, 7.0], [8.0, 8.0]]), use_lru)
        s.tick()
        assert s.age[1].item() == want_age
        assert s.age[0].item() == 3
        # duplicates: the first occurrence wins
        torch.testing.assert_close(s.export_rows()["embedding"][1], torch.tensor([7.0, 7.0]))
        # refresh before insert: under LRU the refreshed row is young, so the next insert evicts row 0
        slot = _insert(s, [9])
        assert slot == [0]


def test_reencode_on_every_rank_calls_the_tower_with_zero_rows():
    specs = {"x": FieldSpec((2,), torch.float32), "embedding": FieldSpec((2,), torch.float32)}
    h = ShardedCacheLossHandler(specs, 4, "embedding", ("x",), block_size=1, reencode_on_every_rank=True)
    calls = []
    p = torch.tensor([[0.3, 0.2]])
    h.update_cache_and_compute_loss(lambda d: calls.append(d["x"].shape) or d["x"], torch.ones(1, 2), p, {"x": p})
    assert calls == [torch.Size([0, 2])]  # empty cache: nothing sampled, the tower still ran (on zero rows)


def test_zero_rows_masks_values_and_gradients_and_copies_nothing_when_all_rows_are_kept():
    """The losses zero the rows left out (NaN / Inf inputs) before any product: values and gradients of those rows
    are 0 and never NaN; with every row kept, CPU returns the tensor itself (no [n, d] copy)."""
    from sharded_negcache.loss import zero_rows

    x = torch.tensor([[1.0, 2.0], [float("nan"), float("inf")], [3.0, -1.0]], requires_grad=True)
    keep = torch.tensor([True, False, True])
    y = zero_rows(x, keep)
    assert y.tolist() == [[1.0, 2.0], [0.0, 0.0], [3.0, -1.0]]
    (y * torch.tensor([[1.0, 1.0], [5.0, 5.0], [2.0, 2.0]])).sum().backward()
    assert x.grad.tolist() == [[1.0, 1.0], [0.0, 0.0], [2.0, 2.0]]
    ok = torch.ones(2, 2)
    assert zero_rows(ok, torch.tensor([True, True])) is ok
