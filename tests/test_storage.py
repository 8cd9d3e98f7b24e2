"""Compact storage: codecs within their error bounds, int8 scoring close to fp32, jagged fields exact
across ranks, host-resident features equivalent, small id dtypes kept, bad combinations refused."""
from __future__ import annotations

import pytest
import torch

from dist_utils import run_ranks
from sharded_negcache import BatchRejected, FieldSpec, JaggedFieldSpec, ShardedCacheLossHandler
from sharded_negcache import codecs
from sharded_negcache.codecs import make_codec


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
    monkeypatch.setattr(codecs, "_use_fbgemm", lambda t: False)
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
        h.update_cache_and_compute_loss(lambda f: emb[f["x"][:, 0]], q[None], q[None], {"x": torch.zeros(1, 1, dtype=torch.int64)})
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
def test_jagged_fields_survive_insert_refresh_fetch(world_size, fmt):
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


def test_int8_with_a_width_not_divisible_by_4_trains_with_empty_batches_at_two_ranks():
    got = run_ranks(2, unaligned_int8_run, timeout=120)
    for r in got:
        assert r["filled"] == 4 and len(r["steps"]) == 4
        assert all(torch.isfinite(torch.tensor(loss)) for loss, _, _ in r["steps"])
        assert r["steps"][1][2] == 1.0 and r["steps"][2][2] == 1.0  # the cache is full from step 1 on
    assert got[0]["steps"][1][1] == 4 * 2 and got[1]["steps"][1][1] == 4 * 2  # every draw found a row
    assert got[1]["steps"][2][1] == 0 and got[1]["steps"][2][0] == 0.0  # the empty rank: no draws, loss 0
