"""Corpus mode on real gloo ranks: W = 1, 2, 4 and the 2x2 two-level layout in one 4-rank launch.

Prefill splits the encoding over a group's ranks (each document once per group); positives refresh
their own rows at the owning rank; an unknown id, different corpora and a failing encoder raise the same
error on every rank with nothing written; a W = 2 checkpoint reloads on 4, 1 and 2x2 ranks with the id
index rebuilt from the rows; extra negatives with in-batch negatives match a cross-entropy computed here.
"""
from __future__ import annotations

import pytest
import torch

from corpus_cases import N_DOCS, Tower, corpus, corpus_layouts, extra_inputs, positives_of, rows_by_id
from sharded_negcache.testing import run_ranks

GROUPS = {"w1": [[0]], "w2": [[0, 1]], "w4": [[0, 1, 2, 3]], "2x2": [[0, 1], [2, 3]]}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_ranks(4, corpus_layouts, str(tmp_path_factory.mktemp("corpus")), timeout=240)


def reference() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tower, (ids, x) = Tower(), corpus()
    with torch.no_grad():
        return ids, x, tower({"x": x})


@pytest.mark.parametrize("layout", list(GROUPS))
def test_prefill_encodes_each_document_once_per_group(results, layout):
    ids, x, emb = reference()
    for members in GROUPS[layout]:
        docs = sorted(d for r in members for d in results[r][layout]["docs"])
        assert docs == sorted(2 if i == 7 else i for i in range(N_DOCS))  # doc 7 is a copy of doc 2
        for r in members:
            res = results[r][layout]
            assert len(res["docs"]) in (N_DOCS // len(members), -(-N_DOCS // len(members)))  # balanced
            assert max(res["calls"]) <= 4 and all(res["inference"])
            rows = res["rows"]
            where = rows_by_id(rows)
            assert sorted(where) == ids.tolist()
            for i, doc in enumerate(ids.tolist()):
                torch.testing.assert_close(rows["embedding"][where[doc]], emb[i])


@pytest.mark.parametrize("layout", list(GROUPS))
def test_positives_refresh_their_rows_at_the_owner(results, layout):
    ids, x, emb = reference()
    for members in GROUPS[layout]:
        before, after = results[members[0]][layout]["rows"], results[members[0]][layout]["after"]
        where = rows_by_id(before)
        expected = {}
        for r in members:
            which, positives = positives_of(r)
            for i, p in zip(which, positives):
                expected.setdefault(where[int(ids[i])], p)  # the lowest rank's positive wins a shared document
            sampled = results[r][layout]["sampled"]
            for q, i in enumerate(which):  # a query's own positive is never its negative
                assert where[int(ids[i])] not in sampled[q].tolist()
        # sampled rows were re-encoded by the same tower: the same values up to rounding (other batch shapes)
        moved = ~torch.isclose(after["embedding"], before["embedding"], rtol=1e-5, atol=1e-6)
        assert moved.any(1).nonzero().flatten().tolist() == sorted(expected)
        for row, p in expected.items():
            torch.testing.assert_close(after["embedding"][row], p)
        assert torch.equal(after["filled"], before["filled"])
        for r in members:  # every group holds the same whole cache on each of its ranks
            assert torch.equal(results[r][layout]["after"]["embedding"], after["embedding"])


@pytest.mark.parametrize("layout", list(GROUPS))
def test_unknown_id_raises_on_every_rank(results, layout):
    size = sum(len(m) for m in GROUPS[layout])
    for r in range(size):
        msg = results[r][layout]["unknown"]
        assert f"rank {size - 1}: document_data['doc_id'] holds 1 id(s) not in the corpus (e.g. [7]" in msg
        assert results[r][layout]["unknown_unchanged"]


def test_bad_prefill_raises_on_every_rank_and_writes_nothing(results):
    for r in (0, 1):
        res = results[r]["w2"]
        assert "ranks passed different doc_ids" in res["different_ids"]
        assert "prefill: encode_fn failed on rank 1: RuntimeError: encoder broke" in res["encoder_failed"]
        assert res["failed_unchanged"]


@pytest.mark.parametrize("layout", ["w4", "w1", "2x2"])
def test_checkpoint_reshards_and_the_index_follows_the_rows(results, layout):
    ids, x, emb = reference()
    saved = results[0]["w2"]["after"]
    where = rows_by_id(saved)
    for members in GROUPS[layout]:
        loaded = results[members[0]]["loaded_" + layout]
        for key, value in saved.items():
            assert torch.equal(loaded["rows"][key], value), key
        moved = ~torch.isclose(loaded["after"]["embedding"], saved["embedding"], rtol=1e-5, atol=1e-6)
        changed = moved.any(1).nonzero().flatten().tolist()
        if members[0] == 0:  # rank 0 stepped with doc 9 as its positive: its saved row took the marker
            assert changed == [where[int(ids[9])]]
            assert torch.equal(loaded["after"]["embedding"][where[int(ids[9])]], torch.full((8,), 0.25))
        else:
            assert changed == []


def test_extra_negatives_with_in_batch_negatives_match_cross_entropy(results):
    """Candidates of each query: its positive, the group's other positives, every extra negative of the group."""
    inputs = [{k: v.requires_grad_(True) for k, v in extra_inputs(r).items()} for r in (0, 1)]
    q = torch.cat([i["q"] for i in inputs])
    pos = torch.cat([i["pos"] for i in inputs])
    extra = torch.cat([i["extra"].reshape(-1, 8) for i in inputs])
    own_pos = torch.eye(q.shape[0], dtype=torch.bool)
    batch = (0.8 * q @ pos.t()).masked_fill(own_pos, float("-inf"))
    logits = torch.cat([0.8 * (q * pos).sum(1, keepdim=True), batch, 0.8 * q @ extra.t()], 1)
    ce = -torch.log_softmax(logits, 1)[:, 0]
    total = ce[:2].mean() + ce[2:].mean()  # each rank's loss is the mean over its queries; gradients add up
    total.backward()
    for r, (lo, hi) in zip((0, 1), ((0, 2), (2, 5))):
        got = results[r]["w2"]["extra"]
        torch.testing.assert_close(got["ce"], ce[lo:hi].detach())
        for key in ("q", "pos", "extra"):
            torch.testing.assert_close(got[key], inputs[r][key].grad, msg=f"rank {r} {key}")
