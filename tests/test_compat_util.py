"""compat.util: the block-max approximate top-k (any C), gather_nd, and cross_replica_concat over two gloo ranks."""
from __future__ import annotations

import pytest
import torch

from sharded_negcache.compat import util
from sharded_negcache.testing import run_ranks

INF = float("inf")


def test_block_max_when_columns_divide_by_k():
    # Groups of two consecutive columns: [5, 1] [2, 7] [0, 3] and [-1, -2] [4, 4] [6, 6].
    scores = torch.tensor([[5.0, 1.0, 2.0, 7.0, 0.0, 3.0], [-1.0, -2.0, 4.0, 4.0, 6.0, 6.0]])
    vals, idx = util.approximate_top_k_with_indices(scores, k=3)
    assert vals.tolist() == [[5.0, 7.0, 3.0], [-1.0, 4.0, 6.0]]
    assert idx.tolist() == [[0, 3, 5], [0, 2, 4]]  # ties: the first column of the group


def test_block_max_is_not_the_exact_top_k():
    # Exact top-2 of [3, 4, 2, 1] is {4, 3}; the block maxima of [3, 4] and [2, 1] are 4 and 2.
    vals, idx = util.approximate_top_k_with_indices(torch.tensor([[3.0, 4.0, 2.0, 1.0]]), k=2)
    assert vals.tolist() == [[4.0, 2.0]] and idx.tolist() == [[1, 2]]


def test_columns_not_divisible_by_k():
    # C=5, k=2: groups [0, 2) and [2, 5).
    vals, idx = util.approximate_top_k_with_indices(torch.tensor([[1.0, 4.0, 9.0, 2.0, 9.0]]), k=2)
    assert vals.tolist() == [[4.0, 9.0]] and idx.tolist() == [[1, 2]]


def test_fewer_columns_than_k_gives_empty_groups():
    # C=2, k=3: groups [0, 0) (empty), [0, 1), [1, 2).
    vals, idx = util.approximate_top_k_with_indices(torch.tensor([[8.0, -1.0]]), k=3)
    assert vals.tolist() == [[-INF, 8.0, -1.0]] and idx.tolist() == [[-1, 0, 1]]


def test_bad_k_and_shape():
    with pytest.raises(ValueError, match="k must be"):
        util.approximate_top_k_with_indices(torch.zeros(1, 4), k=0)
    with pytest.raises(ValueError, match="negative_scores"):
        util.approximate_top_k_with_indices(torch.zeros(4), k=2)


def test_gather_nd():
    params = torch.tensor([[1, 2], [3, 4], [5, 6]])
    assert util.gather_nd(params, torch.tensor([[2, 0], [0, 1]])).tolist() == [5, 2]
    assert util.gather_nd(params, torch.tensor([[1], [1]])).tolist() == [[3, 4], [3, 4]]


def test_cross_replica_concat_is_identity_without_a_group():
    t = torch.arange(3)
    assert util.cross_replica_concat(t) is t


def concat_on_ranks(rank: int, world_size: int) -> list:
    local = torch.full((rank + 1, 2), float(rank))  # rank 0 has one row, rank 1 two
    return util.cross_replica_concat(local).tolist()


def test_cross_replica_concat_two_ranks_uneven_rows():
    results = run_ranks(2, concat_on_ranks)
    want = [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
    assert results == [want, want]
