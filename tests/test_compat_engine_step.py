"""The public seam compat runs the engine through: ``ShardStore.from_tensors``, a store over the caller's rows."""
from __future__ import annotations

import pytest
import torch

from sharded_negcache.store import ShardStore


def rows(n: int = 4) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    emb = torch.arange(n * 2, dtype=torch.float32).reshape(n, 2)
    return emb, {"x": torch.arange(n * 3).reshape(n, 3), "doc": torch.arange(n)}


def test_a_store_over_given_tensors_reads_and_writes_them_in_place():
    emb, feats = rows()
    filled = torch.tensor([True, False, True, True])
    store = ShardStore.from_tensors(emb, feats, filled)
    assert store.embeddings.data_ptr() == emb.data_ptr() and store.filled.data_ptr() == filled.data_ptr()
    assert (store.rows, store.dim, store.device) == (4, 2, torch.device("cpu"))
    assert {k: (s.shape, s.dtype) for k, s in store.feature_specs.items()} == {
        "x": ((3,), torch.int64), "doc": ((), torch.int64)}
    got = store.read(torch.tensor([2, 0]))
    assert got.embeddings.tolist() == [[4.0, 5.0], [0.0, 1.0]]
    assert got.features["x"].tolist() == [[6, 7, 8], [0, 1, 2]] and got.ages.tolist() == [0, 0]
    # the eviction order sees the given flags (row 1 empty first), and a write lands in the caller's tensors
    assert store.oldest_slots(2).tolist() == [1, 0]
    store.refresh(torch.tensor([3]), torch.tensor([[9.0, 9.0]]), use_lru=True)
    assert emb[3].tolist() == [9.0, 9.0] and store.age[3] == -1


def test_defaults_every_row_filled_age_zero():
    emb, feats = rows(3)
    store = ShardStore.from_tensors(emb, feats)
    assert store.filled.tolist() == [True] * 3 and store.age.tolist() == [0] * 3 and store.age.dtype == torch.int64


@pytest.mark.parametrize("bad, match", [
    (dict(embeddings=torch.zeros(4)), r"embeddings must be a floating-point \[rows, d\] tensor, got \[4\]"),
    (dict(embeddings=torch.zeros(4, 2, dtype=torch.int64)), "embeddings must be a floating-point"),
    (dict(filled=torch.ones(4, dtype=torch.int64)), r"filled must be a \[4\] torch.bool tensor"),
    (dict(filled=torch.ones(3, dtype=torch.bool)), r"filled must be a \[4\] torch.bool tensor .* got \[3\]"),
    (dict(age=torch.zeros(4, dtype=torch.int32)), r"age must be a \[4\] torch.int64 tensor"),
    (dict(features={"x": torch.zeros(3, 2)}), r"features\['x'\] must be a \[4, ...\] tensor"),
    (dict(features={"x": torch.zeros(4, 2, device="meta")}), r"on the embeddings' device cpu.*features\['x'\]"),
])
def test_bad_tensors_are_refused_naming_the_field(bad, match):
    emb, feats = rows()
    args = {"embeddings": emb, "features": feats, **bad}
    with pytest.raises(ValueError, match=match):
        ShardStore.from_tensors(**args)


def test_each_query_gets_the_tower_output_of_its_own_sampled_row():
    """One process, top_k = 1 (each query's negative is its best row): q0 = [1, 0] scores the rows [2, 0],
    [0, 1], [1, 1] as 2, 0, 1 (row 0); q1 = [0.5, 2] as 1, 2, 2.5 (row 2). The tower (2x, seeing only the
    caller's fields) gives fresh negatives 2 * row, whatever order the engine hands it the rows in; the
    refreshes are the same rows, detached, for the caller to write."""
    from sharded_negcache.compat.engine_step import EngineStep

    cached = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    seen = []

    def tower(data):
        seen.append(sorted(data))
        return 2.0 * data["x"]

    out = EngineStep().run(tower, torch.tensor([[1.0, 0.0], [0.5, 2.0]]), torch.zeros(2, 2), cached,
                           {"x": cached.clone()}, torch.ones(3, dtype=torch.bool), embedding_key="emb",
                           data_keys=("x",), score_transform=None, top_k=1, seed=0, process_group=None)
    assert seen == [["x"]]
    assert out.sampled.tolist() == [True, True]
    assert out.fresh_negatives.tolist() == [[4.0, 0.0], [2.0, 2.0]]
    order = torch.argsort(out.refreshed_slots)
    assert out.refreshed_slots[order].tolist() == [0, 2]
    assert out.refreshed_embeddings[order].tolist() == [[4.0, 0.0], [2.0, 2.0]]


def test_a_cache_field_named_like_the_row_ids_is_refused():
    from sharded_negcache.compat.engine_step import ROW_ID, EngineStep

    emb, feats = rows()
    with pytest.raises(ValueError, match=f"{ROW_ID!r} names the row ids"):
        EngineStep().run(lambda d: d[ROW_ID], emb[:1], emb[:1], emb, {ROW_ID: feats["doc"]},
                         torch.ones(4, dtype=torch.bool), embedding_key="emb", data_keys=(ROW_ID,),
                         score_transform=None, top_k=None, seed=0, process_group=None)
