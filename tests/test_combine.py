"""combine: the home rank's merge of every rank's partials, against values worked out by hand.

Sampling mode: the log-partition is the log of the summed partition functions, each draw's winner the
largest perturbed key over the ranks (ties: the lowest rank), no winner anywhere is row -1. Top-k mode:
the k best of the W*k candidates (equal values: the lower global row), their log-partition, and a
Gumbel-max draw over them recomputed here candidate by candidate from keyed_random's documented keys.
"""
from __future__ import annotations

import math

import pytest
import torch

from sharded_negcache import keyed_random
from sharded_negcache.combine import merge_partials, pack_partials
from sharded_negcache.keyed_random import Stream
from sharded_negcache.scoring import LocalPartials

INF = float("inf")


def test_pack_sampling_columns_are_lse_keys_rows():
    p = LocalPartials(lse=torch.tensor([0.5, -INF]), win_key=torch.tensor([[1.5, 2.5], [-INF, -INF]]),
                      win_row=torch.tensor([[7, 9], [-1, -1]]))
    got = pack_partials(p)
    assert got.dtype == torch.float64
    assert got.tolist() == [[0.5, 1.5, 2.5, 7.0, 9.0], [-INF, -INF, -INF, -1.0, -1.0]]


def test_pack_topk_columns_are_values_rows():
    p = LocalPartials(topk_val=torch.tensor([[3.0, 1.0, -INF]]), topk_row=torch.tensor([[2**40 + 1, 4, -1]]))
    got = pack_partials(p)
    assert got.tolist() == [[3.0, 1.0, -INF, float(2**40 + 1), 4.0, -1.0]]
    assert int(got[0, 3]) == 2**40 + 1  # global row ids below 2^53 survive float64 exactly


def sampled(lse: float, keys: list[float], rows: list[int]) -> list[float]:
    return [lse, *keys, *(float(r) for r in rows)]


def test_merge_sampled_by_hand():
    # W = 3 ranks, B = 2 queries, m = 2 draws; recv[r, i] = what rank r computed for query i
    recv = torch.tensor([
        [sampled(0.0, [1.0, -INF], [5, -1]), sampled(-INF, [-INF, -INF], [-1, -1])],
        [sampled(math.log(2), [2.0, -INF], [17, -1]), sampled(1.0, [0.5, 0.5], [20, 21])],
        [sampled(math.log(3), [2.0, -INF], [30, -1]), sampled(2.0, [0.5, 0.7], [33, 34])],
    ], dtype=torch.float64)
    got = merge_partials(recv, num_draws=2, top_k=None, seed=0, step=0, query_pos=torch.tensor([0, 1]))
    assert got.lse.dtype == torch.float32 and got.rows.dtype == torch.int64
    want_lse = torch.tensor([math.log(1 + 2 + 3), math.log(math.exp(1.0) + math.exp(2.0))], dtype=torch.float32)
    torch.testing.assert_close(got.lse, want_lse)
    # query 0: draw 0 ties at 2.0 on ranks 1 and 2 -> rank 1's row 17; draw 1 has no winner anywhere -> -1
    # query 1: draw 0 ties at 0.5 on ranks 1 and 2 -> 20; draw 1: 0.7 on rank 2 -> 34
    assert got.rows.tolist() == [[17, -1], [20, 34]]


def test_merge_sampled_of_one_rank_is_the_identity():
    recv = torch.tensor([[sampled(1.25, [0.5, 3.0, -INF], [4, 6, -1])]], dtype=torch.float64)
    got = merge_partials(recv, num_draws=3, top_k=None, seed=0, step=0, query_pos=torch.tensor([0]))
    assert got.lse.tolist() == [1.25] and got.rows.tolist() == [[4, 6, -1]]


def topk(vals: list[float], rows: list[int]) -> list[float]:
    return [*vals, *(float(r) for r in rows)]


def reference_topk_draws(cands: dict[int, float], m: int, seed: int, step: int, pos: int) -> list[int]:
    """Gumbel-max over the candidates, one draw at a time and one candidate at a time."""
    keys = keyed_random.draw_keys(seed, step, Stream.TOPK_GUMBEL, torch.tensor([pos]), m)[0]
    out = []
    for t in range(m):
        best, best_row = -INF, -1
        for row, val in sorted(cands.items()):
            u = float(keyed_random.uniform(keys[t : t + 1], torch.tensor([row]))[0])
            key = val - math.log(-math.log(u))
            if key > best:
                best, best_row = key, row
        out.append(best_row)
    return out


def test_merge_topk_by_hand():
    # W = 2, k = 2: rank 0 holds rows 4 (3.0) and 7 (1.0), rank 1 rows 2 (3.0) and 9 (2.0); the global top-2
    # is the tie at 3.0, rows 2 and 4 (the lower row first), not row 9
    recv = torch.tensor([[topk([3.0, 1.0], [4, 7])], [topk([3.0, 2.0], [2, 9])]], dtype=torch.float64)
    m, seed, step, pos = 64, 3, 5, 11
    got = merge_partials(recv, num_draws=m, top_k=2, seed=seed, step=step, query_pos=torch.tensor([pos]))
    torch.testing.assert_close(got.lse, torch.tensor([3.0 + math.log(2)]))
    assert set(got.rows[0].tolist()) == {2, 4}  # both candidates drawn, nothing else
    assert got.rows[0].tolist() == reference_topk_draws({2: 3.0, 4: 3.0}, m, seed, step, pos)
    # the rank order does not matter (ties go to the lower global row, not the lower rank)
    swapped = merge_partials(recv.flip(0), num_draws=m, top_k=2, seed=seed, step=step, query_pos=torch.tensor([pos]))
    assert torch.equal(swapped.rows, got.rows) and torch.equal(swapped.lse, got.lse)


def test_merge_topk_with_fewer_candidates_than_k():
    recv = torch.tensor([[topk([3.0, -INF], [4, -1]), topk([-INF, -INF], [-1, -1])],
                         [topk([-INF, -INF], [-1, -1]), topk([-INF, -INF], [-1, -1])]], dtype=torch.float64)
    got = merge_partials(recv, num_draws=3, top_k=2, seed=0, step=0, query_pos=torch.tensor([0, 1]))
    assert got.lse.tolist() == [3.0, -INF]
    assert got.rows.tolist() == [[4, 4, 4], [-1, -1, -1]]  # the only candidate every time; none: -1


@pytest.mark.parametrize("step", [0, 1])
def test_merge_topk_draws_follow_the_softmax(step):
    """Over 4000 draws the frequencies of 3 candidates match softmax([0, 1, 2]) within 5 standard errors."""
    m = 4000
    recv = torch.tensor([[topk([2.0, 0.0, -INF], [10, 30, -1])], [topk([1.0, -INF, -INF], [20, -1, -1])]],
                        dtype=torch.float64)
    got = merge_partials(recv, num_draws=m, top_k=3, seed=1, step=step, query_pos=torch.tensor([0]))
    probs = torch.softmax(torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64), 0)  # rows 30, 20, 10
    freq = torch.stack([(got.rows[0] == r).double().mean() for r in (30, 20, 10)])
    se = (probs * (1 - probs) / m).sqrt()
    assert bool(((freq - probs).abs() < 5 * se).all()), (freq, probs)
