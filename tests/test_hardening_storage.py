"""Issue 12, items 3, 4 and 6: what reaches the cache's storage is checked or detached first.

- 3: a jagged ``(padded, lengths)`` field with a negative length (or one above ``max_length`` or the
  padded width, or lengths that do not match the rows) is a rejected batch on every rank, the cache
  unchanged; a good step afterwards works (two gloo ranks, the bad batch on one).
- 4: finite embeddings that the storage codec cannot represent (fp16 above 65504, bf16 overflow,
  int8/int4 whose scale or bias overflow) are a rejected batch under ``nonfinite='raise'`` and a
  skipped, counted row under ``'skip'``, for inserted positives and for re-encoded (refreshed) rows.
- 6: a float feature that requires grad is stored detached: the buffers never join the graph.
"""
from __future__ import annotations

import pytest
import torch

from dist_utils import run_ranks
from engine_cases import DIM, FEAT, Tower, global_cache, make_handler
from sharded_negcache import BatchRejected, FieldSpec, JaggedFieldSpec, NonFiniteRows, ShardedCacheLossHandler
from sharded_negcache.codecs import make_codec

CACHE = 16


def raw_state(h: ShardedCacheLossHandler) -> dict:
    """Every buffer as stored (codec bytes, not decoded), cloned."""
    return {k: v.clone() for k, v in h.state_dict().items()}


def same_state(before: dict, h: ShardedCacheLossHandler) -> bool:
    after = h.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# ---- item 4: the codec says which rows it can store -------------------------------------------
def _row(*values: float, d: int = DIM) -> torch.Tensor:
    out = torch.zeros(d)
    out[: len(values)] = torch.tensor(values, dtype=torch.float64).float()
    return out


# codec -> (rows it can store, rows it cannot), each decided by hand from the storage format.
STORABLE = {
    # fp32 stores every finite float32.
    "fp32": ([_row(3.0e38, -3.0e38)], [_row(float("inf")), _row(float("nan"))]),
    # fp16's largest value is 65504; 65519 rounds down to it, 65520 (half an ulp above) rounds to inf.
    "fp16": ([_row(65504.0), _row(-65519.0)], [_row(65520.0), _row(7e4), _row(1.0, float("nan"))]),
    # bf16's largest value is (2 - 2^-7) * 2^127 = 3.3895e38; 3.4e38 is past the rounding midpoint.
    "bf16": ([_row(3.38e38)], [_row(3.4e38), _row(-3.4e38)]),
    # int8 keeps scale = (max - min) / 255 in fp32: a range of 6e38 overflows it.
    "int8": ([_row(1.0e38, -1.0e38)], [_row(3.0e38, -3.0e38)]),
    # int4 keeps scale = (max - min) / 15 and bias = min in fp16: scale above 65504 (a range of 2e6) or
    # a bias below -65504 overflow; a range of 9e5 (scale 6e4) is fine.
    "int4": ([_row(9.0e5), _row(-6.0e4, 0.0)], [_row(2.0e6), _row(-7.0e4, 0.0)]),
}


@pytest.mark.parametrize("name", sorted(STORABLE))
def test_codec_storable_rows_match_the_format(name):
    codec = make_codec(name)
    good, bad = STORABLE[name]
    x = torch.stack(good + bad)
    want = torch.tensor([True] * len(good) + [False] * len(bad))
    assert torch.equal(codec.storable(x), want)
    # The good rows really do come back finite, the bad ones do not (independent of ``storable``).
    decoded = codec.decode(codec.encode(torch.stack(good)), DIM)
    assert bool(torch.isfinite(decoded).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_finite_rows_is_exact_when_a_finite_row_overflows_its_sum(dtype):
    """finite_rows first sums each row: a finite row whose sum overflows (two values near the format's top)
    must still count as finite, and a NaN or Inf anywhere as not; an all-finite batch takes the one-pass path."""
    from sharded_negcache.codecs import finite_rows

    big = torch.finfo(dtype).max * 0.75
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([[big, big, 0.0], [1.0, 2.0, 3.0], [inf, 0.0, 0.0], [-inf, inf, 1.0], [0.0, nan, 0.0],
                      [-big, -big, 1.0]], dtype=dtype)
    assert not bool(torch.isfinite(x[[0, 5]].sum(1)).any())  # the case: the sums overflow
    assert finite_rows(x).tolist() == [True, True, False, False, False, True]
    assert finite_rows(x[[1, 0]]).tolist() == [True, True] and finite_rows(x[1:2]).tolist() == [True]
    assert finite_rows(x[:0]).tolist() == []


# A batch of 4 positives whose third row the codec cannot store (all finite in fp32).
UNSTORABLE_POSITIVE = {"fp16": 7e4, "bf16": 3.4e38, "int8": 3.0e38, "int4": 2.0e6}


def codec_batch(name: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    g = torch.Generator().manual_seed(4)
    q, d, x = torch.randn(4, DIM, generator=g), torch.randn(4, DIM, generator=g), torch.randn(4, FEAT, generator=g)
    d[2, 0] = UNSTORABLE_POSITIVE[name]
    if name == "int8":
        d[2, 1] = -3.0e38
    assert bool(torch.isfinite(d).all())
    return q, d, {"x": x}


@pytest.mark.parametrize("name", sorted(UNSTORABLE_POSITIVE))
def test_unstorable_positive_is_a_rejected_batch_under_raise(name):
    tower = Tower()
    h = make_handler(CACHE, embedding_codec=name)
    h.load_global_rows(global_cache(CACHE, tower))
    before = raw_state(h)
    q, d, data = codec_batch(name)
    with pytest.raises(BatchRejected, match=f"rank 0: document_embeddings hold values the '{name}' embedding codec cannot store"):
        h.update_cache_and_compute_loss(tower, q, d, data)
    assert same_state(before, h)
    h.update_cache_and_compute_loss(tower, q[:2], d[:2], {"x": data["x"][:2]})  # a good batch still works
    assert h.steps_done == 1


@pytest.mark.parametrize("name", sorted(UNSTORABLE_POSITIVE))
def test_unstorable_positive_is_skipped_and_counted_under_skip(name):
    tower = Tower()
    h = make_handler(CACHE, embedding_codec=name, nonfinite="skip")  # empty cache: nothing sampled
    q, d, data = codec_batch(name)
    h.update_cache_and_compute_loss(tower, q, d, data)
    r = h.last_step
    assert r.metrics["rejected_rows"] == 1
    assert r.inserted_rows.numel() == 3 and int(h.store.filled.sum()) == 3
    stored = h.store.export_rows()
    assert bool(torch.isfinite(stored["embedding"]).all())
    # The three stored positives are the other rows, item i into the i-th oldest (empty) row.
    kept = torch.tensor([0, 1, 3])
    torch.testing.assert_close(stored["x"][r.inserted_rows], data["x"][kept])
    assert float(r.training_loss[2]) == 0.0  # the skipped row's query is left out of the loss


class HugeTower(Tower):
    """A tower that blows rows whose first feature is above 5 up to 1e5 (fp16 cannot store them)."""

    def forward(self, data):
        out = super().forward(data)
        return torch.where((data["x"][:, 0] > 5.0).unsqueeze(1), torch.full_like(out, 1e5), out)


def huge_cache(tower: Tower) -> dict:
    rows = global_cache(CACHE, tower, empty_every=CACHE + 1)  # every row filled
    rows["x"][::2, 0] = 9.0  # even rows re-encode to 1e5
    return rows


def refresh_step(rank: int, world_size: int, policy: str) -> dict:
    """One step over a cache whose even rows re-encode to a value the fp16 codec cannot store."""
    tower = HugeTower()
    h = make_handler(CACHE, num_negatives=4, nonfinite=policy, seed=2, embedding_codec="fp16")
    h.load_global_rows(huge_cache(tower))
    before = raw_state(h)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(3, FEAT, generator=g)
    q = torch.randn(3, DIM, generator=g, requires_grad=True)
    try:
        loss = h.update_cache_and_compute_loss(tower, q, tower({"x": x}), {"x": x})
    except NonFiniteRows as exc:
        return {"raised": str(exc), "unchanged": same_state(before, h)}
    loss.backward()
    r = h.last_step
    return {"loss": loss.item(), "grad_finite": bool(torch.isfinite(q.grad).all()), "sampled": r.sampled_rows,
            "refreshed": r.refreshed_rows, "rejected": r.metrics["rejected_rows"],
            "finite": bool(torch.isfinite(h.gather_global_rows()["embedding"]).all())}


def _check_refresh_skip(results: list[dict]) -> None:
    sampled = torch.cat([r["sampled"] for r in results])
    bad = (sampled >= 0) & (sampled % 2 == 0)
    assert bad.any(), "the test needs draws of rows that re-encode to 1e5"
    refreshed = torch.cat([r["refreshed"] for r in results])
    assert refreshed.numel() > 0 and bool((refreshed % 2 == 1).all()), "an unstorable row was refreshed"
    # each home rank counts its unique unstorable sampled rows
    want = sum(torch.unique(r["sampled"][(r["sampled"] >= 0) & (r["sampled"] % 2 == 0)]).numel() for r in results)
    for r in results:
        assert r["rejected"] == want and r["finite"] and r["grad_finite"] and abs(r["loss"]) < 1e6


def test_unstorable_reencoded_rows_raise_under_raise():
    r = refresh_step(0, 1, "raise")
    assert "cache unchanged" in r["raised"] and r["unchanged"]


def test_unstorable_reencoded_rows_are_not_refreshed_under_skip():
    _check_refresh_skip([refresh_step(0, 1, "skip")])


# ---- item 6: features are stored detached -----------------------------------------------------
def test_feature_requiring_grad_does_not_join_the_graph():
    tower = Tower()
    h = make_handler(CACHE, num_negatives=2)
    h.load_global_rows(global_cache(CACHE, tower))
    g = torch.Generator().manual_seed(5)
    for step in range(3):  # the later steps re-encode rows whose features came from a graph
        x = torch.randn(4, FEAT, generator=g).requires_grad_(True)
        q = torch.randn(4, DIM, generator=g, requires_grad=True)
        loss = h.update_cache_and_compute_loss(tower, q, tower({"x": x}), {"x": x})
        feature = h.store.feature("x")
        assert not feature.requires_grad and feature.grad_fn is None, step
        assert not h.store.embeddings.requires_grad and h.store.embeddings.grad_fn is None
        assert all(not b.requires_grad for b in h.buffers())
        loss.backward()
        assert q.grad is not None and bool(torch.isfinite(q.grad).all())
    assert (h.last_step.sampled_rows >= 0).any()
    torch.testing.assert_close(h.store.feature("x")[h.layout.to_local(h.last_step.inserted_rows)], x.detach())


def test_jagged_float_feature_requiring_grad_is_stored_detached():
    specs = {"t": JaggedFieldSpec(4, torch.float32), "embedding": FieldSpec((4,), torch.float32)}
    h = ShardedCacheLossHandler(specs, 8, "embedding", ("t",))
    vals = [torch.ones(2, requires_grad=True), torch.ones(3, requires_grad=True)]
    h.update_cache_and_compute_loss(lambda f: None, torch.ones(2, 4), torch.ones(2, 4), {"t": vals})
    column = h.store.feature("t")
    assert not column.values.requires_grad and column.values.grad_fn is None


# ---- item 3 (and 4 across ranks): one rank's bad jagged batch, every rank refuses ---------------
JSPECS = {"t": JaggedFieldSpec(4, torch.int64, vocab_size=50, format="list"), "embedding": FieldSpec((DIM,), torch.float32)}

BAD_JAGGED = {  # (padded, lengths) on rank 1 -> phrase of the error
    "negative": ((torch.ones(3, 4, dtype=torch.int64), torch.tensor([2, -1, 3])), "negative length -1"),
    "over max_length": ((torch.ones(3, 6, dtype=torch.int64), torch.tensor([2, 5, 1])), "over max_length 4"),
    "over padded width": ((torch.ones(3, 2, dtype=torch.int64), torch.tensor([2, 3, 1])), "exceed the padded width 2"),
    "rows differ": ((torch.ones(3, 4, dtype=torch.int64), torch.tensor([2, 1])), "2 lengths for 3 padded rows"),
    "float lengths": ((torch.ones(3, 4, dtype=torch.int64), torch.tensor([2.0, 1.5, 1.0])), "integer lengths"),
}


def jagged_tower(data: dict) -> torch.Tensor:
    return torch.stack([torch.full((DIM,), 0.1 * float(t.sum()) + 0.01) for t in data["t"]])


def jagged_worker(rank: int, world_size: int) -> dict:
    h = ShardedCacheLossHandler(JSPECS, CACHE, "embedding", ("t",), score_transform=2.0, block_size=4)
    g = torch.Generator().manual_seed(rank)

    def good(n: int):
        tokens = [torch.randint(0, 50, (int(k),), generator=g) for k in torch.randint(1, 5, (n,), generator=g)]
        q = torch.randn(n, DIM, generator=g)
        return q, jagged_tower({"t": tokens}), {"t": tokens}

    h.update_cache_and_compute_loss(jagged_tower, *good(3))  # something in the cache
    out: dict = {"cases": {}}
    for case, (value, _) in BAD_JAGGED.items():
        before = raw_state(h)
        q, d, data = good(3)
        if rank == 1:
            data = {"t": value}
        try:
            h.update_cache_and_compute_loss(jagged_tower, q, d, data)
            outcome = "accepted"
        except BatchRejected as exc:
            outcome = str(exc)
        out["cases"][case] = (outcome, same_state(before, h), h.steps_done)
    # a positive the fp16 codec cannot store, on rank 1 only
    h16 = make_handler(CACHE, embedding_codec="fp16")
    before = raw_state(h16)
    q, d, data = codec_batch("fp16")
    if rank == 0:
        d[2, 0] = 1.0
    try:
        h16.update_cache_and_compute_loss(Tower(), q, d, data)
        out["fp16_one_rank"] = ("accepted", same_state(before, h16))
    except BatchRejected as exc:
        out["fp16_one_rank"] = (str(exc), same_state(before, h16))
    h.update_cache_and_compute_loss(jagged_tower, *good(2))  # a good step afterwards, on every rank
    out["after"] = (h.steps_done, int(h.store.filled.sum()), bool((h.store.feature("t").lengths >= 0).all()))
    out["refresh_skip"] = refresh_step(rank, world_size, "skip")
    return out


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return run_ranks(2, jagged_worker, timeout=120)


@pytest.mark.parametrize("case", list(BAD_JAGGED))
def test_bad_jagged_lengths_on_one_rank_are_refused_by_every_rank(two_ranks, case):
    phrase = BAD_JAGGED[case][1]
    for rank, r in enumerate(two_ranks):
        outcome, unchanged, steps = r["cases"][case]
        assert "rank 1: document_data['t']" in outcome and phrase in outcome, (rank, outcome)
        assert "rank 0:" not in outcome
        assert unchanged and steps == 1, f"rank {rank} wrote part of a rejected batch"


def test_good_step_after_bad_jagged_batches(two_ranks):
    for r in two_ranks:
        assert r["after"] == (2, 5, True)


def test_unstorable_positive_on_one_rank_is_refused_by_every_rank(two_ranks):
    for r in two_ranks:
        message, unchanged = r["fp16_one_rank"]
        assert "rank 1: document_embeddings hold values the 'fp16' embedding codec cannot store" in message
        assert "rank 0:" not in message and unchanged


def test_unstorable_reencoded_rows_skipped_across_ranks(two_ranks):
    _check_refresh_skip([r["refresh_skip"] for r in two_ranks])
