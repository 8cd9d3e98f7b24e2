"""compat.filter_fns.IsInCacheFilterFn: scalar, 2-D and 3-D fields, several keys, empty rows never match."""
from __future__ import annotations

import pytest
import torch

from sharded_negcache.compat import filter_fns
from sharded_negcache.compat.negative_cache import CacheManager, FixedLenFeature, NegativeCache


def test_two_d_fields_must_match_on_every_key():
    cache = NegativeCache(
        {"a": torch.tensor([[1, 2], [3, 4], [5, 6]]), "b": torch.tensor([[0], [1], [0]])}, torch.zeros(3)
    )
    new = {"a": torch.tensor([[3, 4], [3, 4], [2, 1], [5, 6]]), "b": torch.tensor([[1], [0], [0], [0]])}
    both = filter_fns.IsInCacheFilterFn(keys=("a", "b"))(cache, new)
    assert both.tolist() == [False, True, True, False]  # [3,4]/0 is no row; [2,1] is no row
    only_a = filter_fns.IsInCacheFilterFn(keys=("a",))(cache, new)
    assert only_a.tolist() == [False, False, True, False]


def test_scalar_fields():
    cache = NegativeCache({"id": torch.tensor([7, 8, 9])}, [0, 0, 0])
    mask = filter_fns.IsInCacheFilterFn(["id"])(cache, {"id": torch.tensor([8, 1, 9, 9])})
    assert mask.tolist() == [False, True, False, False]


def test_three_d_fields_compare_every_element():
    rows = torch.arange(16).reshape(2, 2, 2, 2)
    cache = NegativeCache({"m": rows}, torch.zeros(2))
    almost = rows[1].clone()
    almost[1, 1, 1] = -1
    mask = filter_fns.IsInCacheFilterFn(("m",))(cache, {"m": torch.stack([rows[1], almost, rows[0]])})
    assert mask.tolist() == [False, True, False]


def test_float_fields_match_exactly():
    cache = NegativeCache({"f": torch.tensor([[0.5], [1.5]])}, [0, 0])
    mask = filter_fns.IsInCacheFilterFn(("f",))(cache, {"f": torch.tensor([[1.5], [1.25]])})
    assert mask.tolist() == [False, True]


def test_empty_rows_are_not_cached_documents():
    m = CacheManager({"id": FixedLenFeature([1], torch.int64)}, cache_size=3)
    cache = m.init_cache()  # zero rows, none filled
    fn = filter_fns.IsInCacheFilterFn(("id",))
    zero = {"id": torch.tensor([[0]])}
    assert fn(cache, zero).tolist() == [True]
    cache = m.update_cache(cache, new_items=zero)
    assert fn(cache, zero).tolist() == [False]


def test_bad_keys():
    cache = NegativeCache({"id": torch.tensor([1])}, [0])
    with pytest.raises(ValueError, match="keys"):
        filter_fns.IsInCacheFilterFn(())
    with pytest.raises(ValueError, match="keys"):
        filter_fns.IsInCacheFilterFn("id")
    with pytest.raises(ValueError, match="'nope'.*cache.data"):
        filter_fns.IsInCacheFilterFn(("nope",))(cache, {"nope": torch.tensor([1])})
    with pytest.raises(ValueError, match="'id'.*new_items"):
        filter_fns.IsInCacheFilterFn(("id",))(cache, {"other": torch.tensor([1])})
    with pytest.raises(ValueError, match=r"new_items\['id'\] rows have shape"):
        filter_fns.IsInCacheFilterFn(("id",))(cache, {"id": torch.tensor([[1, 2]])})
