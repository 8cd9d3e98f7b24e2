"""compat.negative_cache: specs, init_cache, the update rule (eviction, refresh-before-insert, masks), NegativeCache."""
from __future__ import annotations

import pickle

import pytest
import torch

from sharded_negcache.compat import negative_cache
from sharded_negcache.compat.negative_cache import CacheManager, FixedLenFeature, NegativeCache


def ids_manager(rows: int, use_lru: bool = True) -> CacheManager:
    """An int64 id per row and a 2-float embedding."""
    specs = {"id": FixedLenFeature([1], torch.int64), "emb": FixedLenFeature((2,), torch.float32)}
    return CacheManager(specs, cache_size=rows, use_lru=use_lru)


def items(*ids: int) -> dict[str, torch.Tensor]:
    """New items whose embedding repeats the id, so every row can be recognised."""
    t = torch.tensor(ids, dtype=torch.int64)
    return {"id": t[:, None], "emb": t[:, None].float().repeat(1, 2)}


def test_fixed_len_feature_is_the_reference_tuple():
    spec = FixedLenFeature(shape=[3], dtype=torch.float32)
    assert spec.default_value is None
    assert spec._fields == ("shape", "dtype", "default_value")
    assert FixedLenFeature([2], torch.int32, 5).default_value == 5


@pytest.mark.parametrize("shape", [[2, 3], (2, 3), torch.Size([2, 3])])
def test_spec_shapes_may_be_list_tuple_or_size(shape):
    cache = CacheManager({"f": FixedLenFeature(shape, torch.int32)}, cache_size=4).init_cache()
    assert cache.data["f"].shape == (4, 2, 3)


def test_scalar_and_int_shapes():
    specs = {"s": FixedLenFeature([], torch.int64), "n": FixedLenFeature(5, torch.float16)}
    cache = CacheManager(specs, cache_size=3).init_cache()
    assert cache.data["s"].shape == (3,)
    assert cache.data["n"].shape == (3, 5) and cache.data["n"].dtype == torch.float16


def test_init_cache_is_zero_and_empty():
    specs = {"a": FixedLenFeature([2], torch.int32), "b": FixedLenFeature([3, 2], torch.float32)}
    cache = CacheManager(specs, cache_size=5).init_cache()
    assert torch.equal(cache.data["a"], torch.zeros(5, 2, dtype=torch.int32))
    assert torch.equal(cache.data["b"], torch.zeros(5, 3, 2))
    assert torch.equal(cache.age, torch.zeros(5, dtype=torch.int32))
    assert torch.equal(cache.filled, torch.zeros(5, dtype=torch.bool))
    assert CacheManager(specs, cache_size=5).init_cache(device="meta").data["a"].is_meta


def test_insertion_order_empty_first_then_oldest_ties_to_lowest_slot():
    m = ids_manager(4)
    c = m.init_cache()
    c = m.update_cache(c, new_items=items(1, 2))  # all rows age 0 and empty: slots 0, 1
    assert c.data["id"][:, 0].tolist() == [1, 2, 0, 0] and c.age.tolist() == [0, 0, 1, 1]
    c = m.update_cache(c, new_items=items(3))  # empty slots 2, 3 tie at age 1: slot 2
    assert c.data["id"][:, 0].tolist() == [1, 2, 3, 0] and c.age.tolist() == [1, 1, 0, 2]
    c = m.update_cache(c, new_items=items(4, 5))  # empty slot 3, then slots 0 and 1 tie at age 1: slot 0
    assert c.data["id"][:, 0].tolist() == [5, 2, 3, 4] and c.age.tolist() == [0, 2, 1, 0]
    c = m.update_cache(c, new_items=items(6))  # slot 1 is the oldest (age 2)
    assert c.data["id"][:, 0].tolist() == [5, 6, 3, 4] and c.age.tolist() == [1, 0, 2, 1]
    assert c.data["emb"][:, 1].tolist() == [5.0, 6.0, 3.0, 4.0]
    assert c.filled.all()
    assert c.age.dtype == torch.int32


def test_inserts_follow_the_engines_eviction_order_on_random_caches():
    """compat writes new items where the engine's shards would (``ShardStore.eviction_order``), checked against
    the order written as one sort key: empty rows first, then the highest age, ties to the lowest slot; with and
    without ``filled`` (None: every row holds a document), many ties, int32 ages."""
    g = torch.Generator().manual_seed(1)
    for trial in range(100):
        rows = int(torch.randint(1, 40, (), generator=g))
        m = ids_manager(rows)
        age = torch.randint(0, 4, (rows,), generator=g, dtype=torch.int32)
        filled = (torch.rand(rows, generator=g) < 0.6) if trial % 2 else None
        cache = NegativeCache({"id": torch.full((rows, 1), -1), "emb": torch.zeros(rows, 2)}, age, filled)
        n = int(torch.randint(0, rows + 1, (), generator=g))
        empty = torch.zeros(rows, dtype=torch.int64) if filled is None else (~filled).to(torch.int64)
        key = empty * (1 << 62) + age.to(torch.int64) * rows + (rows - 1 - torch.arange(rows))
        want = torch.topk(key, n, sorted=True).indices
        out = m.update_cache(cache, new_items=items(*range(100, 100 + n)))
        assert out.data["id"][want, 0].tolist() == list(range(100, 100 + n)), trial
        assert int((out.data["id"][:, 0] >= 100).sum()) == n


def full_cache(ids: list[int], ages: list[int]) -> NegativeCache:
    t = torch.tensor(ids)
    data = {"id": t[:, None].clone(), "emb": t[:, None].float().repeat(1, 2)}
    return NegativeCache(data, torch.tensor(ages, dtype=torch.int32))


def test_lru_refresh_happens_before_insert():
    # Rows 40, 41, 42 with ages 5, 3, 4. Refreshing row 0 (the oldest) makes it the youngest, so the
    # new item evicts row 2 (age 4), not row 0.
    m = ids_manager(3, use_lru=True)
    c = m.update_cache(
        full_cache([40, 41, 42], [5, 3, 4]),
        new_items=items(50),
        updated_item_data={"emb": torch.tensor([[9.0, 9.0]])},
        updated_item_indices=torch.tensor([0]),
    )
    assert c.data["id"][:, 0].tolist() == [40, 41, 50]
    assert c.data["emb"].tolist() == [[9.0, 9.0], [41.0, 41.0], [50.0, 50.0]]
    assert c.age.tolist() == [0, 4, 0]


def test_fifo_refresh_keeps_the_insertion_age():
    # Same call without LRU: row 0 stays the oldest and the new item overwrites the refreshed row.
    m = ids_manager(3, use_lru=False)
    c = m.update_cache(
        full_cache([40, 41, 42], [5, 3, 4]),
        new_items=items(50),
        updated_item_data={"emb": torch.tensor([[9.0, 9.0]])},
        updated_item_indices=torch.tensor([0]),
    )
    assert c.data["id"][:, 0].tolist() == [50, 41, 42]
    assert c.data["emb"][0].tolist() == [50.0, 50.0]
    assert c.age.tolist() == [0, 4, 5]


def test_new_items_mask_puts_the_jth_kept_item_in_the_jth_oldest_row():
    m = ids_manager(4)
    c = full_cache([10, 11, 12, 13], [1, 7, 3, 7])  # oldest first: slot 1, slot 3 (tie at 7), slot 2, slot 0
    c = m.update_cache(c, new_items=items(20, 21, 22), new_items_mask=torch.tensor([True, False, True]))
    assert c.data["id"][:, 0].tolist() == [10, 20, 12, 22]
    assert c.age.tolist() == [2, 0, 4, 0]


def test_masked_update_skips_entries_even_out_of_range():
    m = ids_manager(3)
    c = m.update_cache(
        full_cache([1, 2, 3], [0, 0, 0]),
        updated_item_data={"emb": torch.tensor([[7.0, 7.0], [8.0, 8.0], [9.0, 9.0]])},
        updated_item_indices=torch.tensor([2, 99, 0]),
        updated_item_mask=torch.tensor([True, False, True]),
    )
    assert c.data["emb"][:, 0].tolist() == [9.0, 2.0, 7.0]
    assert c.age.tolist() == [0, 1, 0]


def test_fully_masked_update_only_ages():
    m = ids_manager(2)
    before = full_cache([1, 2], [3, 4])
    c = m.update_cache(
        before,
        updated_item_data={"emb": torch.tensor([[7.0, 7.0]])},
        updated_item_indices=torch.tensor([0]),
        updated_item_mask=torch.tensor([False]),
    )
    assert torch.equal(c.data["emb"], before.data["emb"])
    assert c.age.tolist() == [4, 5]


def test_partial_update_leaves_other_fields():
    m = ids_manager(2)
    c = m.update_cache(
        full_cache([1, 2], [0, 0]), updated_item_data={"emb": torch.tensor([[5.0, 6.0]])}, updated_item_indices=[1]
    )
    assert c.data["id"][:, 0].tolist() == [1, 2]
    assert c.data["emb"].tolist() == [[1.0, 1.0], [5.0, 6.0]]


def test_duplicate_update_indices_last_unmasked_wins():
    m = ids_manager(2)
    c = m.update_cache(
        full_cache([1, 2], [0, 0]),
        updated_item_data={"id": torch.tensor([[7], [8], [9]])},
        updated_item_indices=torch.tensor([1, 1, 1]),
        updated_item_mask=torch.tensor([True, True, False]),
    )
    assert c.data["id"][:, 0].tolist() == [1, 8]


def test_update_cache_does_not_modify_its_input():
    m = ids_manager(2)
    before = full_cache([1, 2], [0, 0])
    snapshot = {k: v.clone() for k, v in before.data.items()}
    m.update_cache(before, new_items=items(5), updated_item_data={"id": torch.tensor([[9]])}, updated_item_indices=[0])
    assert all(torch.equal(before.data[k], snapshot[k]) for k in snapshot)
    assert before.age.tolist() == [0, 0]


def test_short_rows_are_zero_padded_and_ints_cast():
    m = CacheManager({"tok": FixedLenFeature([4], torch.int32), "emb": FixedLenFeature([1], torch.float32)}, 2)
    short = {"tok": torch.tensor([[5, 6]], dtype=torch.int64), "emb": torch.ones(1, 1)}
    c = m.update_cache(m.init_cache(), new_items=short)
    assert c.data["tok"].dtype == torch.int32
    assert c.data["tok"][0].tolist() == [5, 6, 0, 0]


def test_bad_inputs_raise_naming_the_field():
    m = ids_manager(2)
    c = m.init_cache()
    with pytest.raises(ValueError, match="new_items"):
        m.update_cache(c, new_items={"id": torch.zeros(1, 1, dtype=torch.int64)})
    with pytest.raises(IndexError, match=r"new_items\['emb'\]"):  # the reference raised IndexError here
        m.update_cache(c, new_items={"id": torch.zeros(2, 1, dtype=torch.int64), "emb": torch.zeros(1, 2)})
    with pytest.raises(ValueError, match="more than the 2 rows"):
        m.update_cache(c, new_items=items(1, 2, 3))
    with pytest.raises(ValueError, match=r"new_items\['emb'\].*shape \[2\]"):
        m.update_cache(c, new_items={"id": torch.zeros(1, 1, dtype=torch.int64), "emb": torch.zeros(1, 3)})
    with pytest.raises(TypeError, match=r"new_items\['id'\].*lossy"):
        m.update_cache(c, new_items={"id": torch.zeros(1, 1), "emb": torch.zeros(1, 2)})
    with pytest.raises(ValueError, match="updated_item_data keys"):
        m.update_cache(c, updated_item_data={"nope": torch.zeros(1)}, updated_item_indices=[0])
    with pytest.raises(ValueError, match="without updated_item_indices"):
        m.update_cache(c, updated_item_data={"emb": torch.zeros(1, 2)})
    with pytest.raises(ValueError, match="updated_item_indices must lie"):
        m.update_cache(c, updated_item_data={"emb": torch.zeros(1, 2)}, updated_item_indices=[2])
    with pytest.raises(ValueError, match="cache_size"):
        CacheManager({"a": FixedLenFeature([1], torch.int32)}, cache_size=0)
    with pytest.raises(ValueError, match=r"specs\['a'\]"):
        CacheManager({"a": FixedLenFeature([0], torch.int32)}, cache_size=2)
    with pytest.raises(TypeError, match=r"specs\['a'\]"):
        CacheManager({"a": [1]}, cache_size=2)


def test_negative_cache_is_the_reference_pair():
    c = ids_manager(2).init_cache()
    data, age = c  # still a two-field tuple
    assert data is c.data and age is c.age and len(c) == 2
    assert NegativeCache({"x": torch.zeros(2)}, [0, 0]).filled is None  # hand-built: every row counts
    back = pickle.loads(pickle.dumps(c))
    assert torch.equal(back.filled, c.filled)
    assert c._replace(age=torch.ones(2)).filled is c.filled
    moved = c.to("meta")
    assert moved.data["id"].is_meta and moved.age.is_meta and moved.filled.is_meta
    assert negative_cache.NegativeCache._fields == ("data", "age")
