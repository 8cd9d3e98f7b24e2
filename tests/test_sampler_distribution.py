"""The sampler's frequencies match the softmax over each query's candidates (chi-square tests).

Tolerance: each query's chi-square p-value must exceed 1e-3 (the randomness is keyed by the seed, so
the test is deterministic; a sampler off by a few percent on any row fails it, see the power check).
Cases: plain (several chunks and blocks, empty rows), exact top_k, the document-id exclusion, and
two gloo ranks (the cross-rank combination of local winners).
"""
from __future__ import annotations

import pytest
import torch

from engine_cases import DIM, Tower, global_cache, make_handler
from sharded_negcache.testing import run_ranks

CACHE, DRAWS, QUERIES = 64, 6000, 3
SCALE = 0.3  # flat enough that 17 to 49 rows carry real probability


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test of counts against probabilities; cells with expectation < 5 are pooled."""
    total = counts.sum()
    expected = probs.double() * total
    small = expected < 5
    obs = torch.cat([counts[~small].double(), counts[small].double().sum().unsqueeze(0)])
    exp = torch.cat([expected[~small], expected[small].sum().unsqueeze(0)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    assert torch.all(obs[exp == 0] == 0)
    stat = ((obs - exp) ** 2 / exp).sum()
    dof = obs.numel() - 1
    return torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), stat / 2).item()


def expected_probs(rows: dict, q: torch.Tensor, top_k: int | None, excluded_id: int | None) -> torch.Tensor:
    """Softmax over the candidates, computed directly from the whole cache."""
    a = SCALE * rows["embedding"] @ q
    ok = rows["filled"].clone()
    if excluded_id is not None:
        ok &= rows["doc_id"][:, 0] != excluded_id
    a = a.masked_fill(~ok, float("-inf"))
    if top_k is not None:
        keep = torch.zeros_like(ok)
        keep[a.topk(top_k).indices] = True
        a = a.masked_fill(~keep, float("-inf"))
    return torch.softmax(a.double(), 0)


def sample(rank: int, world_size: int, top_k, with_ids: bool) -> dict:
    tower = Tower()
    h = make_handler(CACHE, with_ids=with_ids, score_transform=SCALE, num_negatives=DRAWS, top_k=top_k,
                     seed=3, chunk_bytes=4 * QUERIES * 16)  # 16-row chunks: several chunks and blocks per rank
    rows = global_cache(CACHE, tower, empty_every=7, with_ids=with_ids)
    h.load_global_rows(rows)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(QUERIES, DIM, generator=g) * 0.7
    data = {"x": torch.randn(QUERIES, 6, generator=g)}
    if with_ids:
        data["doc_id"] = torch.tensor([[1], [2], [3]])
    lo, hi = (0, QUERIES) if world_size == 1 else ((0, 1) if rank == 0 else (1, QUERIES))
    mine = {k: v[lo:hi] for k, v in data.items()}
    with torch.no_grad():
        h.update_cache_and_compute_loss(tower, q[lo:hi], tower(mine), mine)
    return {"sampled": h.last_step.sampled_rows, "rows": rows, "q": q, "ids": data.get("doc_id")}


def check(results: list[dict], top_k, with_ids: bool) -> None:
    sampled = torch.cat([r["sampled"] for r in results])
    rows, q, ids = results[0]["rows"], results[0]["q"], results[0]["ids"]
    for i in range(QUERIES):
        probs = expected_probs(rows, q[i], top_k, None if ids is None else int(ids[i, 0]))
        counts = torch.bincount(sampled[i], minlength=CACHE)
        assert counts[probs == 0].sum() == 0, "a row outside the candidates was sampled"
        assert chi_square_pvalue(counts, probs) > 1e-3


@pytest.mark.parametrize("top_k,with_ids", [(None, False), (6, False), (None, True), (6, True)])
def test_frequencies_match_softmax_single_process(top_k, with_ids):
    check([sample(0, 1, top_k, with_ids)], top_k, with_ids)


def test_frequencies_match_softmax_two_ranks():
    check(run_ranks(2, sample, None, False), None, False)


def test_chi_square_has_power():
    """The same counts are rejected against a softmax at a temperature 10% off."""
    r = sample(0, 1, None, False)
    probs = expected_probs(r["rows"], r["q"][0] * 1.1, None, None)
    counts = torch.bincount(r["sampled"][0], minlength=CACHE)
    assert chi_square_pvalue(counts, probs) < 1e-6
