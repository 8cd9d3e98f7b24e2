"""Each invalid input raises a clear error naming the field, before anything is written.

After every failed call the cache (all rows, ages, flags) and the step counter are exactly as before.
Two-rank cases: one rank's bad batch makes every rank raise (no hang), naming the rank; ranks whose
specs disagree are caught at the first step.
"""
from __future__ import annotations

import pytest
import torch

from dist_utils import run_ranks
from engine_cases import DIM, FEAT, Tower, global_cache, make_handler, specs
from sharded_negcache import BatchRejected, FieldSpec, ShardedCacheLossHandler

CACHE = 16


def snapshot(h) -> dict:
    rows = {k: v.clone() for k, v in h.store.export_rows().items()}
    rows["step"] = torch.tensor(h.steps_done)
    return rows


def assert_unchanged(before: dict, h) -> None:
    after = snapshot(h)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k


def good_batch(n: int = 4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, FEAT, generator=g)
    return torch.randn(n, DIM, generator=g), torch.randn(n, DIM, generator=g), {"x": x}


def bad_cases():
    q, d, data = good_batch()
    nan_q = q.clone(); nan_q[1, 2] = float("nan")
    inf_d = d.clone(); inf_d[0, 0] = float("inf")
    return {
        "missing key": (q, d, {}, "missing ['x']"),
        "extra key": (q, d, {"x": data["x"], "y": data["x"]}, "unexpected ['y']"),
        "feature shape": (q, d, {"x": data["x"][:, :3]}, "document_data['x'] must have shape [4, 6]"),
        "feature dtype": (q, d, {"x": data["x"].double()}, "document_data['x'] must have dtype torch.float32"),
        "query width": (q[:, :5], d, data, "query_embeddings must have shape [batch, 8]"),
        "batch mismatch": (q, d[:3], data, "document_embeddings has 3 rows"),
        "too large": (*good_batch(CACHE + 1)[:2], good_batch(CACHE + 1)[2], "larger than a cache shard"),
        "wrong device": (q.to("meta"), d, data, "query_embeddings is on meta"),
        "nan query": (nan_q, d, data, "query_embeddings contain NaN or Inf"),
        "inf document": (q, inf_d, data, "document_embeddings contain NaN or Inf"),
        "not a tensor": (q, d, {"x": [[1.0]]}, "document_data['x'] must be a torch.Tensor"),
    }


@pytest.mark.parametrize("case", list(bad_cases()))
def test_bad_input_raises_and_leaves_cache_unchanged(case):
    tower = Tower()
    h = make_handler(CACHE, device="cpu")
    h.load_global_rows(global_cache(CACHE, tower))
    q, d, data, message = bad_cases()[case]
    before = snapshot(h)
    with pytest.raises(BatchRejected, match="rank 0: .*" + message.replace("[", r"\[").replace("]", r"\]")):
        h.update_cache_and_compute_loss(tower, q, d, data)
    assert_unchanged(before, h)
    # the handler still works afterwards
    q, d, data = good_batch()
    h.update_cache_and_compute_loss(tower, q, d, data)
    assert h.steps_done == 1


def test_bad_document_network_output_leaves_cache_unchanged():
    tower = Tower()
    h = make_handler(CACHE)
    h.load_global_rows(global_cache(CACHE, tower))
    before = snapshot(h)
    q, d, data = good_batch()
    with pytest.raises(ValueError, match="document_network must return"):
        h.update_cache_and_compute_loss(lambda f: tower(f)[:, :3], q, d, data)
    assert_unchanged(before, h)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(cache_size=0), "cache_size must be a positive int"),
        (dict(num_negatives=0), "num_negatives must be an int >= 1"),
        (dict(top_k=0), "top_k must be None or an int >= 1"),
        (dict(block_size=3), "block_size=3 must be positive and divide the rows per rank"),
        (dict(data_keys=("nope",)), r"data_keys \['nope'\] are not in specs"),
        (dict(data_keys="x"), "data_keys must be a sequence"),
        (dict(embedding_key="x"), "data_keys must not contain the embedding_key"),
        (dict(specs={"x": FieldSpec((FEAT,), torch.float32), "embedding": FieldSpec((2, 4), torch.float32)}),
         "must be a 1-D floating field"),
        (dict(doc_id_key="x"), "doc_id_key"),
        (dict(reduction="avg"), "reduction must be"),
        (dict(embedding_codec="int3"), "embedding_codec must be one of"),
    ],
)
def test_bad_configuration(kwargs, message):
    args = dict(specs=specs(), cache_size=CACHE, embedding_key="embedding", data_keys=("x",))
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=message):
        ShardedCacheLossHandler(**args)


def test_spec_shapes_accept_lists_tuples_and_sizes():
    for shape in ([4], (4,), torch.Size([4])):
        assert FieldSpec(shape, torch.float32).shape == (4,)


# ---- several ranks --------------------------------------------------------------------------
def one_rank_bad(rank: int, world_size: int) -> dict:
    tower = Tower()
    h = make_handler(CACHE)
    h.load_global_rows(global_cache(CACHE, tower))
    before = snapshot(h)
    q, d, data = good_batch(3)
    if rank == 1:
        data = {"x": data["x"].to(torch.float16)}
    try:
        h.update_cache_and_compute_loss(tower, q, d, data)
        return {"raised": None}
    except BatchRejected as exc:
        unchanged = all(torch.equal(before[k], snapshot(h)[k]) for k in before)
        return {"raised": str(exc), "unchanged": unchanged}


def test_one_bad_rank_stops_every_rank():
    results = run_ranks(2, one_rank_bad, timeout=60)
    for r in results:
        assert r["raised"] is not None and "rank 1: document_data['x'] must have dtype torch.float32" in r["raised"]
        assert "rank 0" not in r["raised"]
        assert r["unchanged"]


def widths_differ(rank: int, world_size: int) -> str:
    dim = DIM if rank == 0 else DIM + 1
    s = {"x": FieldSpec((FEAT,), torch.float32), "embedding": FieldSpec((dim,), torch.float32)}
    h = ShardedCacheLossHandler(s, CACHE, "embedding", ("x",))
    g = torch.Generator().manual_seed(rank)
    q, d = torch.randn(2, dim, generator=g), torch.randn(2, dim, generator=g)
    try:
        h.update_cache_and_compute_loss(lambda f: f["x"], q, d, {"x": torch.randn(2, FEAT, generator=g)})
    except BatchRejected as exc:
        return str(exc)
    return "no error"


def test_different_embedding_widths_across_ranks():
    for message in run_ranks(2, widths_differ, timeout=60):
        assert "ranks disagree on the cache configuration" in message
        assert "specs" in message and "rank 1=" in message


def indivisible(rank: int, world_size: int) -> str:
    try:
        make_handler(16, block_size=1)
    except ValueError as exc:
        return str(exc)
    return "no error"


def test_cache_size_must_divide_by_world_size():
    for message in run_ranks(3, indivisible, timeout=60):
        assert "cache_size=16 does not divide by the world size 3" in message
