"""Corpus mode on one process: prefill, positives refreshing their own rows, the refresh budget, duplicate
exclusion, the re-encoding choices (Monte Carlo gradient against autograd of the full softmax) and extra
negatives (loss and gradients against a cross-entropy computed here). Several ranks: test_corpus_dist.py."""
from __future__ import annotations

import pytest
import torch

from corpus_cases import DIM, FEAT, N_DOCS, Recorder, Tower, corpus, corpus_handler, rows_by_id
from engine_cases import make_handler
from sharded_negcache import ShardedCacheLossHandler
from sharded_negcache.handler import BatchRejected, DocumentNetworkFailed

SCALE = 0.8


def step_data(ids: torch.Tensor, x: torch.Tensor, which: list[int]) -> dict:
    return {"x": x[which], "doc_id": ids[which].view(-1, 1)}


def snapshot(h: ShardedCacheLossHandler) -> dict:
    """A copy of the whole cache (a one-rank gather returns views of the live rows)."""
    return {k: v.clone() for k, v in h.gather_global_rows().items()}


def same_rows(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


# ---- prefill ---------------------------------------------------------------------------------
def test_prefill_encodes_each_document_once_in_batches_under_inference_mode():
    tower, (ids, x) = Tower(), corpus()
    h = corpus_handler()
    enc = Recorder(tower)
    h.prefill(ids, {"x": x}, enc, batch_size=5)
    assert sorted(enc.docs) == sorted(2 if i == 7 else i for i in range(N_DOCS))  # doc 7 is a copy of doc 2
    assert enc.calls == [5, 5, 5, 5, 2] and all(enc.inference)
    rows = h.gather_global_rows()
    assert int(rows["filled"].sum()) == N_DOCS
    where = rows_by_id(rows)
    assert sorted(where) == ids.tolist()
    with torch.no_grad():
        want = tower({"x": x})
    for i, doc in enumerate(ids.tolist()):
        torch.testing.assert_close(rows["embedding"][where[doc]], want[i])
        torch.testing.assert_close(rows["x"][where[doc]], x[i])
    assert rows["age"].eq(0).all()
    # without exclude_duplicates each row's exclusion key is its own id
    assert torch.equal(rows["corpus_key"][rows["filled"]], rows["doc_id"][rows["filled"]])


def test_prefill_accepts_a_jagged_field_as_lists():
    from sharded_negcache import FieldSpec
    from sharded_negcache.jagged import JaggedFieldSpec

    specs = {"tok": JaggedFieldSpec(5, torch.int64, format="list"), "doc_id": FieldSpec((1,), torch.int64),
             "embedding": FieldSpec((DIM,), torch.float32)}
    h = ShardedCacheLossHandler(specs, 8, "embedding", ("tok",), doc_id_key="doc_id", cache_mode="corpus",
                                block_size=4)
    docs = [[1, 2], [3], [4, 5, 6], [7, 8, 9, 10]]

    def encode(data):  # embedding = (length, sum of ids, 0, ...)
        out = torch.zeros(len(data["tok"]), DIM)
        for i, t in enumerate(data["tok"]):
            out[i, 0], out[i, 1] = t.numel(), t.sum()
        return out

    h.prefill(torch.tensor([40, 10, 30, 20]), {"tok": docs}, encode, batch_size=3)
    rows = h.gather_global_rows()
    where = rows_by_id(rows)
    for doc, toks in zip([40, 10, 30, 20], docs):
        assert rows["embedding"][where[doc], :2].tolist() == [len(toks), sum(toks)]
        assert rows["tok"][where[doc], : len(toks)].tolist() == toks


@pytest.mark.parametrize("case, match", [
    ("too_many", "cache_size is 32"),
    ("repeated", "doc_ids must be distinct"),
    ("missing_field", "lacks the data_keys fields"),
    ("short_field", r"document_data\['x'\] must have shape \[22, 6\]"),
    ("float_ids", "doc_ids must be a 1-D int64"),
    ("batch_size", "batch_size must be an int >= 1"),
])
def test_prefill_rejects_bad_input_before_writing(case, match):
    tower, (ids, x) = Tower(), corpus()
    h = corpus_handler()
    h.prefill(ids[:4], {"x": x[:4]}, tower)
    before = snapshot(h)
    args, kw = (ids, {"x": x}), {}
    if case == "too_many":
        big_ids, big_x = corpus(33)
        args = (big_ids, {"x": big_x})
    elif case == "repeated":
        args = (torch.cat([ids[:3], ids[:1]]), {"x": x[:4]})
    elif case == "missing_field":
        args = (ids, {"y": x})
    elif case == "short_field":
        args = (ids, {"x": x[:5]})
    elif case == "float_ids":
        args = (ids.float(), {"x": x})
    elif case == "batch_size":
        kw = {"batch_size": 0}
    with pytest.raises(ValueError, match=match):
        h.prefill(*args, tower, **kw)
    assert same_rows(before, h.gather_global_rows())


@pytest.mark.parametrize("bad", ["raises", "nan", "shape"])
def test_failing_encoder_leaves_the_cache_unchanged(bad):
    tower, (ids, x) = Tower(), corpus()
    h = corpus_handler()
    h.prefill(ids[:4], {"x": x[:4]}, tower)
    before = snapshot(h)
    encode = {"raises": Recorder(tower, fail=True), "nan": lambda d: tower(d) * float("nan"),
              "shape": lambda d: tower(d)[:, :3]}[bad]
    with pytest.raises(DocumentNetworkFailed, match="prefill: encode_fn failed on rank 0"):
        h.prefill(ids, {"x": x}, encode, batch_size=8)
    assert same_rows(before, h.gather_global_rows())


def test_options_are_checked_at_construction():
    with pytest.raises(ValueError, match="needs doc_id_key"):
        make_handler(16, cache_mode="corpus")
    with pytest.raises(ValueError, match="cache_mode must be"):
        make_handler(16, cache_mode="fifo")
    for bad in ("some", 0.0, 1.5, 1):
        with pytest.raises(ValueError, match="reencode_negatives must be"):
            make_handler(16, reencode_negatives=bad)
    with pytest.raises(ValueError, match="need cache_mode='corpus'"):
        make_handler(16, refresh_budget=2)
    with pytest.raises(ValueError, match="refresh_budget must be an int"):
        corpus_handler(refresh_budget=-1)
    with pytest.raises(ValueError, match="prefill needs cache_mode='corpus'"):
        make_handler(16, with_ids=True).prefill(torch.arange(3), {"x": torch.zeros(3, FEAT)}, Tower())


# ---- steps -------------------------------------------------------------------------------------
def test_positives_refresh_their_own_rows_and_nothing_is_inserted():
    tower, (ids, x) = Tower(), corpus()
    h = corpus_handler(reencode_negatives="none")  # no sampled refresh: only the positives write
    h.prefill(ids, {"x": x}, tower)
    before = snapshot(h)
    which = [4, 11, 4]  # the same document twice: the first occurrence wins
    data = step_data(ids, x, which)
    positives = torch.randn(3, DIM)
    h.update_cache_and_compute_loss(tower, torch.randn(3, DIM), positives, data)
    after = h.gather_global_rows()
    where = rows_by_id(after)
    changed = (after["embedding"] != before["embedding"]).any(1).nonzero().flatten().tolist()
    assert changed == sorted({where[int(ids[4])], where[int(ids[11])]})
    torch.testing.assert_close(after["embedding"][where[int(ids[4])]], positives[0])
    torch.testing.assert_close(after["embedding"][where[int(ids[11])]], positives[1])
    assert torch.equal(after["filled"], before["filled"]) and torch.equal(after["x"], before["x"])
    assert h.last_step.inserted_rows.numel() == 0
    assert sorted(h.last_step.refreshed_rows.tolist()) == changed
    # ages count steps since a row was last encoded
    assert after["age"][changed].eq(0).all() and after["age"][after["filled"]].sum() == N_DOCS - 2


def test_unknown_positive_is_rejected_and_nothing_written():
    tower, (ids, x) = Tower(), corpus()
    h = corpus_handler()
    h.prefill(ids, {"x": x}, tower)
    before, steps = snapshot(h), h.steps_done
    data = {"x": x[:2], "doc_id": torch.tensor([[int(ids[0])], [5]])}
    with pytest.raises(BatchRejected, match=r"holds 1 id\(s\) not in the corpus \(e.g. \[5\]"):
        h.update_cache_and_compute_loss(tower, torch.randn(2, DIM), tower(data), data)
    assert same_rows(before, h.gather_global_rows()) and h.steps_done == steps
    fresh = corpus_handler()  # never prefilled: every id is unknown
    with pytest.raises(BatchRejected, match="call prefill first"):
        fresh.update_cache_and_compute_loss(tower, torch.randn(2, DIM), tower(data), data)


@pytest.mark.parametrize("exclude_duplicates", [False, True])
def test_own_positive_and_its_duplicates_are_excluded(exclude_duplicates):
    """Doc 7 is an exact copy of doc 2. Unit embeddings, the query along doc 2's: its copy scores highest of all."""
    tower, (ids, x) = Tower(), corpus()
    unit = lambda d: torch.nn.functional.normalize(tower(d), dim=1)  # noqa: E731
    h = corpus_handler(score_transform=SCALE, num_negatives=2000, exclude_duplicates=exclude_duplicates)
    h.prefill(ids, {"x": x}, unit)
    rows = h.gather_global_rows()
    where = rows_by_id(rows)
    own, copy = where[int(ids[2])], where[int(ids[7])]
    data = step_data(ids, x, [2])
    with torch.no_grad():
        q = unit({"x": x[[2]]}) * 5
    result = h.score(unit, q, unit(data), data)
    sampled = set(result.sampled_rows.flatten().tolist())
    assert own not in sampled
    assert (copy in sampled) is not exclude_duplicates
    keep = rows["filled"].clone()
    keep[own] = False
    if exclude_duplicates:
        keep[copy] = False
        assert int(rows["corpus_key"][copy]) == int(ids[2])  # the group's key: its smallest id
    lse = torch.logsumexp(SCALE * (q @ rows["embedding"][keep].t()), 1)
    torch.testing.assert_close(result.lse.float(), lse, rtol=1e-5, atol=1e-5)


def test_refresh_budget_rewrites_the_stalest_rows_each_step():
    tower, (ids, x) = Tower(), corpus()
    h = corpus_handler(reencode_negatives="none", refresh_budget=3)
    h.prefill(ids, {"x": x}, tower)
    newer = Tower(seed=5)  # the tower moved: refreshed rows are recognisable
    with torch.no_grad():
        old, new = tower({"x": x}), newer({"x": x})
    for step, expect in enumerate([[0, 1, 2], [3, 4, 5]]):  # all ages 0: ties to the lowest slot; then age 1 first
        data = step_data(ids, x, [20])
        positive = torch.randn(1, DIM)
        h.update_cache_and_compute_loss(newer, torch.randn(1, DIM), positive, data)
        rows = h.gather_global_rows()
        where = rows_by_id(rows)
        refreshed = [i for i in range(step * 3 + 3)]
        for i in range(N_DOCS):
            got = rows["embedding"][where[int(ids[i])]]
            if i == 20:
                torch.testing.assert_close(got, positive[0])
            elif i in refreshed:
                torch.testing.assert_close(got, new[i])
            else:
                torch.testing.assert_close(got, old[i])
        assert rows["age"][[where[int(ids[i])] for i in expect]].eq(0).all()


# ---- the re-encoding choice: Monte Carlo mean gradient against autograd of the full softmax -----------
DRAWS, CACHE = 40000, 32


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def gradient_case(reencode):
    tower = Tower()
    g = torch.Generator().manual_seed(21)
    x = torch.randn(CACHE - 4, FEAT, generator=g)
    ids = torch.arange(x.shape[0], dtype=torch.int64) * 7
    h = corpus_handler(CACHE, score_transform=SCALE, num_negatives=DRAWS, seed=9, reencode_negatives=reencode)
    h.prefill(ids, {"x": x}, tower)  # fresh: cached embeddings are the current tower's
    pick = [0, 5, 9]
    q = (torch.randn(3, DIM, generator=g) * 0.8).requires_grad_(True)
    calls = []

    def network(data):
        calls.append(data["x"].shape[0])
        return tower(data)

    params = [q, tower.lin.weight]
    loss = h.update_cache_and_compute_loss(network, q, tower({"x": x[pick]}), step_data(ids, x, pick))
    estimated = torch.autograd.grad(loss, params)
    emb = tower({"x": x})
    s_pos = SCALE * (q * emb[pick]).sum(1)
    scores = (SCALE * q @ emb.t()).masked_fill(torch.nn.functional.one_hot(torch.tensor(pick), x.shape[0]).bool(),
                                               float("-inf"))  # the positive's own row is not a candidate
    full = -torch.log_softmax(torch.cat([s_pos[:, None], scores], 1), 1)[:, 0].mean()
    exact = torch.autograd.grad(full, params, retain_graph=True)
    p = torch.sigmoid(s_pos - torch.logsumexp(scores, 1)).detach()
    positive_only = torch.autograd.grad((-(1 - p) * s_pos).mean(), tower.lin.weight)[0]
    return h, calls, estimated, exact, positive_only


def test_reencode_none_has_the_full_softmax_query_gradient_and_no_tower_gradient_from_negatives():
    h, calls, (g_q, g_w), (exact_q, _), positive_only = gradient_case("none")
    assert calls == []  # the tower never runs for negatives
    assert rel_err(g_q, exact_q) < 0.02
    torch.testing.assert_close(g_w, positive_only, rtol=1e-4, atol=1e-6)  # the tower learns from positives only
    assert h.last_step.metrics["sampled"] == 0  # staleness is known for re-encoded draws only


def test_reencode_fraction_keeps_both_gradients_unbiased():
    h, calls, (g_q, g_w), (exact_q, exact_w), positive_only = gradient_case(0.5)
    assert rel_err(g_q, exact_q) < 0.02
    assert rel_err(g_w, exact_w) < 0.03  # weight 1 / f on the re-encoded draws; without it about 0.5 off
    assert rel_err(positive_only, exact_w) > 0.2  # the negatives' share of the tower gradient is large here
    chosen = h.last_step.metrics["sampled"]
    assert abs(chosen - 0.5 * 3 * DRAWS) < 5 * (3 * DRAWS * 0.25) ** 0.5  # binomial, 5 standard deviations


# ---- extra negatives ------------------------------------------------------------------------------------
def test_extra_negatives_loss_and_gradients_match_cross_entropy():
    """An empty streaming cache leaves positive + extra negatives: the loss is exact, no sampling."""
    g = torch.Generator().manual_seed(2)
    h = make_handler(16, score_transform=SCALE)
    q = torch.randn(3, DIM, generator=g).requires_grad_(True)
    pos = torch.randn(3, DIM, generator=g).requires_grad_(True)
    extra = torch.randn(3, 2, DIM, generator=g).requires_grad_(True)
    data = {"x": torch.randn(3, FEAT, generator=g)}
    loss = h.update_cache_and_compute_loss(Tower(), q, pos, data, extra_negatives=extra)
    got = torch.autograd.grad(loss, [q, pos, extra])
    logits = torch.cat([SCALE * (q * pos).sum(1, keepdim=True), SCALE * torch.einsum("bd,bnd->bn", q, extra)], 1)
    ce = -torch.log_softmax(logits, 1)[:, 0]
    torch.testing.assert_close(h.last_step.interpretable_loss, ce.detach())
    for a, b in zip(got, torch.autograd.grad(ce.mean(), [q, pos, extra])):
        torch.testing.assert_close(a, b)
    with pytest.raises(BatchRejected, match=r"extra_negatives must have shape \[3, n, 8\]"):
        h.update_cache_and_compute_loss(Tower(), q, pos, data, extra_negatives=extra[:, 0])


def test_reencode_none_in_a_streaming_cache_has_the_full_softmax_query_gradient():
    from test_gradient_unbiased import fresh_cache

    tower = Tower()
    rows = fresh_cache(tower)
    h = make_handler(CACHE, score_transform=SCALE, num_negatives=DRAWS, seed=9, reencode_negatives="none")
    h.load_global_rows(rows)
    g = torch.Generator().manual_seed(4)
    q = (torch.randn(3, DIM, generator=g) * 0.8).requires_grad_(True)
    x_pos = torch.randn(3, FEAT, generator=g)
    calls = []
    loss = h.update_cache_and_compute_loss(lambda d: calls.append(1) or tower(d), q, tower({"x": x_pos}), {"x": x_pos})
    (g_q,) = torch.autograd.grad(loss, [q])
    cache_emb = tower({"x": rows["x"][rows["filled"]]})
    logits = torch.cat([SCALE * (q * tower({"x": x_pos})).sum(1, keepdim=True), SCALE * q @ cache_emb.t()], 1)
    (exact,) = torch.autograd.grad(-torch.log_softmax(logits, 1)[:, 0].mean(), [q])
    assert calls == [] and rel_err(g_q, exact) < 0.02


def test_a_nan_in_the_refresh_budget_raises_before_any_write():
    from sharded_negcache.handler import NonFiniteRows

    tower, (ids, x) = Tower(), corpus()
    h = corpus_handler(reencode_negatives="none", refresh_budget=2)
    h.prefill(ids, {"x": x}, tower)
    before, steps = snapshot(h), h.steps_done
    nan_without_grad = lambda d: tower(d) * (1.0 if torch.is_grad_enabled() else float("nan"))  # noqa: E731
    data = step_data(ids, x, [3])
    with pytest.raises(NonFiniteRows, match="cache unchanged"):
        h.update_cache_and_compute_loss(nan_without_grad, torch.randn(1, DIM), tower(data), data)
    assert same_rows(before, snapshot(h)) and h.steps_done == steps


def test_extra_negatives_of_the_wrong_kind_are_rejected_by_name():
    h = make_handler(16, score_transform=SCALE)
    q, pos, data = torch.randn(2, DIM), torch.randn(2, DIM), {"x": torch.randn(2, FEAT)}
    for bad, match in [([1, 2], "extra_negatives must be a floating tensor"),
                       (torch.full((2, 1, DIM), float("nan")), "extra_negatives contain NaN or Inf"),
                       (torch.zeros(2, 1, DIM, dtype=torch.int64), "extra_negatives must be a floating tensor")]:
        with pytest.raises(BatchRejected, match=match):
            h.update_cache_and_compute_loss(Tower(), q, pos, data, extra_negatives=bad)
    assert h.steps_done == 0


def test_content_keys_group_exact_duplicates_only():
    from sharded_negcache.corpus import content_keys
    from sharded_negcache.jagged import Jagged

    toks = [[1, 2], [1, 2, 0], [1, 2], [5], [1, 2, 0], [1, 2]]  # [1, 2] and [1, 2, 0] pad alike; lengths differ
    x = torch.tensor([[0.5], [0.5], [0.5], [0.5], [0.5], [-0.5]])  # the last [1, 2] differs in another field
    tok = Jagged(torch.tensor([len(t) for t in toks]), torch.tensor([v for t in toks for v in t]))
    ids = torch.tensor([30, 31, 12, 40, 9, 7])
    assert content_keys({"tok": tok, "x": x}, ids).tolist() == [12, 9, 12, 40, 9, 7]
