"""Compact storage: codecs within their error bounds, int8 scoring close to fp32, jagged fields exact
across ranks, host-resident features equivalent, small id dtypes kept, bad combinations refused.

What reaches the storage is checked or detached first: rows a codec cannot represent (fp16 above 65504,
bf16 overflow, int8/int4 whose scale or bias overflow) are a rejected batch under ``nonfinite='raise'``
and a skipped, counted row under ``'skip'``, for inserted positives and re-encoded rows; a jagged
``(padded, lengths)`` field with bad lengths on one rank is refused by every rank, the cache unchanged;
float features that require grad are stored detached. The two-rank cases share one pair of gloo processes.
"""
from __future__ import annotations

import pytest
import torch

from engine_cases import DIM as EMB_DIM
from engine_cases import FEAT, Tower, global_cache, make_handler
from sharded_negcache import (
    BatchRejected,
    FieldSpec,
    JaggedFieldSpec,
    NonFiniteRows,
    ShardedCacheLossHandler,
    codecs,
)
from sharded_negcache.codecs import make_codec
from sharded_negcache.testing import run_ranks


def rows(n=64, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * torch.rand(n, 1, generator=g) * 4


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16", "int8", "int4"])
def test_codec_round_trip_within_bound(name):
    c = make_codec(name)
    x = rows()
    y = c.decode(c.encode(x), x.shape[1])
    err = (y - x).abs()
    span = (x.amax(1) - x.amin(1)).unsqueeze(1)
    bound = {
        "fp32": torch.zeros_like(x),
        "bf16": x.abs() * 2.0**-8,
        "fp16": x.abs() * 2.0**-11,
        "int8": span / 510 + 1e-6,
        "int4": span / 30 * (1 + 2.0**-10) + x.abs().amax(1, keepdim=True) * 2.0**-10,
    }[name]
    assert torch.all(err <= bound), (name, (err - bound).max())
    assert c.encode(x).shape == (64, c.width(32))


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_torch_path_writes_fbgemm_bytes(name, monkeypatch):
    c = make_codec(name)
    x = rows(seed=3)
    with_fbgemm = c.encode(x)
    monkeypatch.setattr(codecs, "use_fbgemm", lambda t: False)
    pure = c.encode(x)
    assert torch.equal(pure, with_fbgemm)
    torch.testing.assert_close(c.decode(pure, 32), c.decode(with_fbgemm, 32))


def test_codec_field_combinations_refused():
    specs = {"x": FieldSpec((2,), torch.float32), "embedding": FieldSpec((30,), torch.float32)}
    with pytest.raises(ValueError, match="'int4' needs an embedding width divisible by 4, got 30"):
        ShardedCacheLossHandler(specs, 8, "embedding", ("x",), embedding_codec="int4")
    with pytest.raises(ValueError, match="vocab_size=4294967296 does not fit dtype torch.int32"):
        FieldSpec((4,), torch.int32, vocab_size=1 << 32)
    with pytest.raises(ValueError, match="vocab_size needs an integer dtype"):
        JaggedFieldSpec(8, torch.float32, vocab_size=10)


def softmax_probs(emb: torch.Tensor, q: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.softmax(scale * emb @ q, 0)


def test_int8_sampling_close_to_fp32():
    """Exact total-variation distance of the sampler's distribution under int8 vs fp32 scoring < 0.01;
    the int8 sampler's empirical frequencies (40000 draws) are within 0.03 of the fp32 softmax."""
    d, n, scale = 64, 64, 12.0
    g = torch.Generator().manual_seed(1)
    emb = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    q = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    c = make_codec("int8")
    decoded = c.decode(c.encode(emb), d)
    p32, p8 = softmax_probs(emb, q, scale), softmax_probs(decoded, q, scale)
    assert 0.5 * (p32 - p8).abs().sum() < 0.01

    specs = {"x": FieldSpec((1,), torch.int64), "embedding": FieldSpec((d,), torch.float32)}
    h = ShardedCacheLossHandler(specs, n, "embedding", ("x",), score_transform=scale, num_negatives=40000,
                                embedding_codec="int8", seed=4, block_size=8)
    h.load_global_rows({"x": torch.arange(n).unsqueeze(1), "embedding": emb, "age": torch.zeros(n, dtype=torch.int64),
                        "filled": torch.ones(n, dtype=torch.bool)})
    with torch.no_grad():
        h.update_cache_and_compute_loss(lambda f: emb[f["x"][:, 0]], q[None], q[None],
                                        {"x": torch.zeros(1, 1, dtype=torch.int64)})
    freq = torch.bincount(h.last_step.sampled_rows[0], minlength=n).double() / 40000
    assert 0.5 * (freq - p32.double()).abs().sum() < 0.03


# ---- jagged fields across ranks ---------------------------------------------------------------
VOCAB, DIM, CACHE = 50, 8, 24


def token_table() -> torch.Tensor:
    return torch.randn(VOCAB, DIM, generator=torch.Generator().manual_seed(9))


def make_docs(step: int, rank: int, n: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    lengths = torch.randint(1, 7, (n,), generator=g)
    tokens = [torch.randint(0, VOCAB, (int(k),), generator=g, dtype=torch.int32) for k in lengths]
    doc_ids = torch.randint(0, 10**6, (n, 1), generator=g)
    return tokens, doc_ids


class TokenTower:
    """Mean of token vectors; records what it received (as lists of token tensors)."""

    def __init__(self, fmt: str) -> None:
        self.table, self.fmt, self.seen = token_table(), fmt, []

    def rows(self, value) -> list[torch.Tensor]:
        if self.fmt == "kjt":
            assert type(value).__name__ == "KeyedJaggedTensor" and value.keys() == ["tokens"]
            return list(torch.split(value.values(), value.lengths().tolist()))
        if self.fmt == "padded":
            padded, lengths = value
            assert padded.shape[1] == 6
            return [padded[i, : int(k)] for i, k in enumerate(lengths)]
        return list(value)

    def embed(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([self.table[t.long()].mean(0) for t in tokens])

    def __call__(self, data):
        tokens = self.rows(data["tokens"])
        assert all(t.dtype == torch.int32 for t in tokens), "int32 ids must not be widened"
        self.seen.append((tokens, data["doc"]))
        return self.embed(tokens)


def jagged_run(rank: int, world_size: int, fmt: str, host: bool) -> dict:
    specs = {
        "tokens": JaggedFieldSpec(6, torch.int32, vocab_size=VOCAB, mean_length=1, format=fmt),  # tiny pool: compacts and grows
        "doc": FieldSpec((1,), torch.int64),
        "embedding": FieldSpec((DIM,), torch.float32),
    }
    h = ShardedCacheLossHandler(specs, CACHE, "embedding", ("tokens", "doc"), score_transform=2.0, num_negatives=3,
                                seed=5, block_size=2, host_features=("tokens",) if host else ())
    tower = TokenTower(fmt)
    inserted = {}
    for step in range(6):
        tokens, doc = make_docs(step, rank, 5 - (rank + step) % 3)
        data = {"tokens": tokens, "doc": doc}
        if fmt == "kjt":
            from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
            data["tokens"] = KeyedJaggedTensor(keys=["tokens"], values=torch.cat(tokens),
                                               lengths=torch.tensor([t.numel() for t in tokens]))
        elif fmt == "padded":
            padded = torch.zeros(len(tokens), 6, dtype=torch.int32)
            for i, t in enumerate(tokens):
                padded[i, : t.numel()] = t
            data["tokens"] = (padded, torch.tensor([t.numel() for t in tokens]))
        q = torch.randn(len(tokens), DIM, generator=torch.Generator().manual_seed(step))
        with torch.no_grad():
            h.update_cache_and_compute_loss(tower, q, tower.embed(tokens), data)
        for t, d in zip(tokens, doc[:, 0].tolist()):
            inserted[d] = t.tolist()
    return {"inserted": inserted, "seen": tower.seen, "cache": h.gather_global_rows(),
            "pool": h.store.feature("tokens").values.numel(), "device": str(h.store.feature("tokens").values.device)}


@pytest.mark.parametrize("world_size,fmt", [(2, "kjt"), (3, "list"), (2, "padded")])
def test_jagged_fields_survive_insert_refresh_fetch(world_size, fmt, request):
    if world_size == 2:
        results = [r[fmt] for r in request.getfixturevalue("two_ranks")]
    else:
        results = run_ranks(world_size, jagged_run, fmt, False)
    inserted = {}
    for r in results:
        inserted.update(r["inserted"])
    cache = results[0]["cache"]
    filled = cache["filled"]
    assert filled.sum() > CACHE // 2
    for i in torch.nonzero(filled)[:, 0].tolist():  # every stored row is exactly a document that was inserted
        n = int(cache["tokens:lengths"][i])
        assert cache["tokens"][i, :n].tolist() == inserted[int(cache["doc"][i, 0])]
        assert torch.all(cache["tokens"][i, n:] == 0)
    fetched = 0
    for r in results:  # every row the tower re-encoded carried the tokens of its document
        for tokens, doc in r["seen"]:
            for t, d in zip(tokens, doc[:, 0].tolist()):
                if d in inserted:
                    fetched += 1
                    assert t.tolist() == inserted[d]
    assert fetched > 10
    assert max(r["pool"] for r in results) > CACHE // world_size * 1.25  # the pool grew past its first size


def test_host_resident_features_give_the_same_steps():
    a, b = jagged_run(0, 1, "list", False), jagged_run(0, 1, "list", True)
    assert b["device"] == "cpu"
    for key in a["cache"]:
        assert torch.equal(a["cache"][key], b["cache"][key]), key
    assert [[t.tolist() for t in s[0]] for s in a["seen"]] == [[t.tolist() for t in s[0]] for s in b["seen"]]


def test_small_id_dtypes_are_kept():
    specs = {"ids": FieldSpec((4,), torch.int32, vocab_size=100), "embedding": FieldSpec((4,), torch.float32)}
    h = ShardedCacheLossHandler(specs, 8, "embedding", ("ids",))
    assert h.store.feature("ids").dtype == torch.int32


@pytest.mark.parametrize("bad,message", [
    ({"ids": torch.tensor([[1, 2, 3, 100]], dtype=torch.int32)}, r"holds id 100 outside \[0, 100\)"),
    ({"ids": torch.tensor([[1, 2, 3, -1]], dtype=torch.int32)}, r"holds id -1 outside \[0, 100\)"),
    ({"ids": torch.tensor([[1, 2, 3, 4]], dtype=torch.int64)}, "must have dtype torch.int32"),
])
def test_ids_out_of_range_refused_before_writing(bad, message):
    specs = {"ids": FieldSpec((4,), torch.int32, vocab_size=100), "embedding": FieldSpec((4,), torch.float32)}
    h = ShardedCacheLossHandler(specs, 8, "embedding", ("ids",))
    before = h.store.export_rows()
    with pytest.raises(BatchRejected, match=message):
        h.update_cache_and_compute_loss(lambda f: None, torch.ones(1, 4), torch.ones(1, 4), bad)
    assert all(torch.equal(v, h.store.export_rows()[k]) for k, v in before.items())


def test_jagged_length_over_max_refused():
    specs = {"t": JaggedFieldSpec(3, torch.int64), "embedding": FieldSpec((4,), torch.float32)}
    h = ShardedCacheLossHandler(specs, 8, "embedding", ("t",))
    with pytest.raises(BatchRejected, match="has a row of length 4 over max_length 3"):
        h.update_cache_and_compute_loss(lambda f: None, torch.ones(2, 4), torch.ones(2, 4),
                                        {"t": [torch.arange(2), torch.arange(4)]})
    assert not h.store.filled.any()


def test_eviction_order_is_empty_rows_first_then_oldest_then_lowest_slot():
    """``oldest_slots`` against the order written as one sort key (the former implementation): empty rows
    first (older first among them), then the highest age, ties to the lowest slot; on random shards with
    many ties, every n."""
    from sharded_negcache.store import ShardStore

    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        rows = int(torch.randint(1, 120, (), generator=g))
        store = ShardStore(rows, 4, {}, make_codec(torch.float32), "cpu")
        store.age.copy_(torch.randint(-1, 5, (rows,), generator=g))
        store.filled.copy_(torch.rand(rows, generator=g) < 0.7)
        slot = torch.arange(rows)
        key = (~store.filled).to(torch.int64) * (1 << 62) + (store.age + 1) * rows + (rows - 1 - slot)
        for n in {0, 1, rows // 2, rows}:
            assert torch.equal(store.oldest_slots(n), torch.topk(key, n, sorted=True).indices), (trial, n)


@pytest.mark.parametrize("d", [17, 18, 50])
def test_int8_rows_of_any_width_decode_from_any_row_and_empty_slices(d):
    """The int8 layout [d bytes | scale | bias] puts a row's fp32 scale at byte d of the row: decoding must
    not depend on the slice's offset being a multiple of 4 (one row at an odd offset, no rows at all)."""
    c, x = make_codec("int8"), rows(n=8, d=d)
    stored = c.encode(x)
    want = c.decode(stored, d)
    assert torch.all((want - x).abs() <= (x.amax(1) - x.amin(1)).unsqueeze(1) / 510 + 1e-6)
    for lo, hi in [(1, 2), (3, 6), (5, 5), (0, 0), (8, 8)]:
        assert torch.equal(c.decode(stored[lo:hi], d), want[lo:hi]), (lo, hi)


def unaligned_int8_run(rank: int, world_size: int) -> dict:
    """W = 2, width 17, int8: a step where rank 1 has no queries (empty cache: nothing to decode), then steps
    on a full cache, rank 1 again with an empty batch and then with queries."""
    specs = {"x": FieldSpec((3,), torch.float32), "embedding": FieldSpec((17,), torch.float32)}
    h = ShardedCacheLossHandler(specs, 8, "embedding", ("x",), score_transform=2.0, num_negatives=2,
                                embedding_codec="int8", block_size=2)
    tower = torch.nn.Linear(3, 17)
    torch.manual_seed(0)
    torch.nn.init.normal_(tower.weight)
    net = lambda data: tower(data["x"])  # noqa: E731
    out = []
    for step, n in enumerate([(3, 0), (4, 4), (3, 0), (2, 3)]):
        g = torch.Generator().manual_seed(10 * step + rank)
        b = n[rank]
        q, x = torch.randn(b, 17, generator=g), torch.randn(b, 3, generator=g)
        with torch.no_grad():
            loss = h.update_cache_and_compute_loss(net, q, net({"x": x}), {"x": x})
        out.append((loss.item(), int((h.last_step.sampled_rows >= 0).sum()), h.last_step.metrics["fill_fraction"]))
    return {"steps": out, "filled": int(h.store.filled.sum())}


def test_int8_with_a_width_not_divisible_by_4_trains_with_empty_batches_at_two_ranks(two_ranks):
    got = [r["int8"] for r in two_ranks]
    for r in got:
        assert r["filled"] == 4 and len(r["steps"]) == 4
        assert all(torch.isfinite(torch.tensor(loss)) for loss, _, _ in r["steps"])
        assert r["steps"][1][2] == 1.0 and r["steps"][2][2] == 1.0  # the cache is full from step 1 on
    assert got[0]["steps"][1][1] == 4 * 2 and got[1]["steps"][1][1] == 4 * 2  # every draw found a row
    assert got[1]["steps"][2][1] == 0 and got[1]["steps"][2][0] == 0.0  # the empty rank: no draws, loss 0


# ---- the engine_cases handler (width EMB_DIM) with codecs that cannot store every finite row -------------
CODEC_CACHE = 16


def raw_state(h: ShardedCacheLossHandler) -> dict:
    """Every buffer as stored (codec bytes, not decoded), cloned."""
    return {k: v.clone() for k, v in h.state_dict().items()}


def same_state(before: dict, h: ShardedCacheLossHandler) -> bool:
    after = h.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# ---- the codec says which rows it can store ---------------------------------------------------
def _row(*values: float, d: int = EMB_DIM) -> torch.Tensor:
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
    decoded = codec.decode(codec.encode(torch.stack(good)), EMB_DIM)
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
    q, d, x = torch.randn(4, EMB_DIM, generator=g), torch.randn(4, EMB_DIM, generator=g), torch.randn(4, FEAT, generator=g)
    d[2, 0] = UNSTORABLE_POSITIVE[name]
    if name == "int8":
        d[2, 1] = -3.0e38
    assert bool(torch.isfinite(d).all())
    return q, d, {"x": x}


@pytest.mark.parametrize("name", sorted(UNSTORABLE_POSITIVE))
def test_unstorable_positive_is_a_rejected_batch_under_raise(name, filled_handler, tower):
    h = filled_handler(CODEC_CACHE, embedding_codec=name)
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
    h = make_handler(CODEC_CACHE, embedding_codec=name, nonfinite="skip")  # empty cache: nothing sampled
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
    rows = global_cache(CODEC_CACHE, tower, empty_every=CODEC_CACHE + 1)  # every row filled
    rows["x"][::2, 0] = 9.0  # even rows re-encode to 1e5
    return rows


def refresh_step(rank: int, world_size: int, policy: str) -> dict:
    """One step over a cache whose even rows re-encode to a value the fp16 codec cannot store."""
    tower = HugeTower()
    h = make_handler(CODEC_CACHE, num_negatives=4, nonfinite=policy, seed=2, embedding_codec="fp16")
    h.load_global_rows(huge_cache(tower))
    before = raw_state(h)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(3, FEAT, generator=g)
    q = torch.randn(3, EMB_DIM, generator=g, requires_grad=True)
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


# ---- features are stored detached ------------------------------------------------------------
def test_feature_requiring_grad_does_not_join_the_graph(filled_handler, tower):
    h = filled_handler(CODEC_CACHE, num_negatives=2)
    g = torch.Generator().manual_seed(5)
    for step in range(3):  # the later steps re-encode rows whose features came from a graph
        x = torch.randn(4, FEAT, generator=g).requires_grad_(True)
        q = torch.randn(4, EMB_DIM, generator=g, requires_grad=True)
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


# ---- one rank's bad jagged batch or unstorable positive: every rank refuses ---------------------
JSPECS = {"t": JaggedFieldSpec(4, torch.int64, vocab_size=50, format="list"), "embedding": FieldSpec((EMB_DIM,), torch.float32)}

BAD_JAGGED = {  # (padded, lengths) on rank 1 -> phrase of the error
    "negative": ((torch.ones(3, 4, dtype=torch.int64), torch.tensor([2, -1, 3])), "negative length -1"),
    "over max_length": ((torch.ones(3, 6, dtype=torch.int64), torch.tensor([2, 5, 1])), "over max_length 4"),
    "over padded width": ((torch.ones(3, 2, dtype=torch.int64), torch.tensor([2, 3, 1])), "exceed the padded width 2"),
    "rows differ": ((torch.ones(3, 4, dtype=torch.int64), torch.tensor([2, 1])), "2 lengths for 3 padded rows"),
    "float lengths": ((torch.ones(3, 4, dtype=torch.int64), torch.tensor([2.0, 1.5, 1.0])), "integer lengths"),
}


def jagged_tower(data: dict) -> torch.Tensor:
    return torch.stack([torch.full((EMB_DIM,), 0.1 * float(t.sum()) + 0.01) for t in data["t"]])


def refusal_cases(rank: int, world_size: int) -> dict:
    h = ShardedCacheLossHandler(JSPECS, CODEC_CACHE, "embedding", ("t",), score_transform=2.0, block_size=4)
    g = torch.Generator().manual_seed(rank)

    def good(n: int):
        tokens = [torch.randint(0, 50, (int(k),), generator=g) for k in torch.randint(1, 5, (n,), generator=g)]
        q = torch.randn(n, EMB_DIM, generator=g)
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
    h16 = make_handler(CODEC_CACHE, embedding_codec="fp16")
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


@pytest.mark.parametrize("case", list(BAD_JAGGED))
def test_bad_jagged_lengths_on_one_rank_are_refused_by_every_rank(two_ranks, case):
    phrase = BAD_JAGGED[case][1]
    for rank, r in enumerate(r["refusals"] for r in two_ranks):
        outcome, unchanged, steps = r["cases"][case]
        assert "rank 1: document_data['t']" in outcome and phrase in outcome, (rank, outcome)
        assert "rank 0:" not in outcome
        assert unchanged and steps == 1, f"rank {rank} wrote part of a rejected batch"


def test_good_step_after_bad_jagged_batches(two_ranks):
    for r in (r["refusals"] for r in two_ranks):
        assert r["after"] == (2, 5, True)


def test_unstorable_positive_on_one_rank_is_refused_by_every_rank(two_ranks):
    for r in (r["refusals"] for r in two_ranks):
        message, unchanged = r["fp16_one_rank"]
        assert "rank 1: document_embeddings hold values the 'fp16' embedding codec cannot store" in message
        assert "rank 0:" not in message and unchanged


def test_unstorable_reencoded_rows_skipped_across_ranks(two_ranks):
    _check_refresh_skip([r["refusals"]["refresh_skip"] for r in two_ranks])


def two_rank_cases(rank: int, world_size: int) -> dict:
    """Every two-rank case of this module in one process pair (start-up is paid once)."""
    return {"kjt": jagged_run(rank, world_size, "kjt", False), "padded": jagged_run(rank, world_size, "padded", False),
            "int8": unaligned_int8_run(rank, world_size), "refusals": refusal_cases(rank, world_size)}


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return run_ranks(2, two_rank_cases, timeout=240)
