"""Failure modes are as defined as the happy path: non-finite tower output, dead or stalled ranks,
caches that cannot fit. Real gloo processes; a dead or stalled rank is a real one."""
from __future__ import annotations

import os
import time

import pytest
import torch

from engine_cases import DIM, FEAT, Tower, global_cache, make_handler
from sharded_negcache import CacheTooLarge, CollectiveFailed, FieldSpec, NonFiniteRows, ShardedCacheLossHandler
from sharded_negcache.testing import run_ranks

CACHE = 16


class PoisonTower(Tower):
    """Returns NaN for rows whose first feature is above a threshold (a diverging tower)."""

    def forward(self, data):
        out = super().forward(data)
        bad = data["x"][:, 0] > 5.0
        return torch.where(bad.unsqueeze(1), torch.full_like(out, float("nan")), out)


def poisoned_cache(tower: Tower) -> dict:
    rows = global_cache(CACHE, tower, empty_every=CACHE + 1)  # all rows filled
    rows["x"][::2, 0] = 9.0  # every even row re-encodes to NaN
    return rows


def nonfinite_step(rank: int, world_size: int, policy: str) -> dict:
    tower = PoisonTower()
    h = make_handler(CACHE, num_negatives=4, nonfinite=policy, seed=2)
    h.load_global_rows(poisoned_cache(tower))
    before = h.gather_global_rows()
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(3, FEAT, generator=g)
    if policy == "skip":
        x[0, 0] = 9.0  # this rank's first positive is NaN as well (under 'raise' that is a rejected batch)
    q = torch.randn(3, DIM, generator=g, requires_grad=True)
    try:
        loss = h.update_cache_and_compute_loss(tower, q, tower({"x": x}), {"x": x})
    except NonFiniteRows as exc:
        return {"raised": str(exc), "unchanged": all(torch.equal(before[k], v) for k, v in h.gather_global_rows().items())}
    loss.backward()
    r = h.last_step
    return {"loss": loss.item(), "grad_finite": bool(torch.isfinite(q.grad).all()), "metrics": r.metrics,
            "sampled": r.sampled_rows, "refreshed": r.refreshed_rows, "inserted": r.inserted_rows,
            "after": h.gather_global_rows(), "before": before}


def test_nonfinite_rows_raise_on_every_rank_by_default():
    for r in run_ranks(2, nonfinite_step, "raise"):
        assert "produced NaN/Inf" in r["raised"] and "cache unchanged" in r["raised"]
        assert r["unchanged"]


def test_nonfinite_rows_are_skipped_and_counted():
    results = run_ranks(2, nonfinite_step, "skip")
    sampled = torch.cat([r["sampled"] for r in results])
    bad_draws = (sampled >= 0) & (sampled % 2 == 0)
    assert bad_draws.any(), "the test needs draws of poisoned rows"
    refreshed = torch.cat([r["refreshed"] for r in results])
    assert refreshed.numel() > 0 and torch.all(refreshed % 2 == 1), "a poisoned row was refreshed"
    # one NaN positive per rank is not inserted; each rank inserted its 2 finite positives
    assert all(r["inserted"].numel() == 2 for r in results)
    after = results[0]["after"]
    assert torch.isfinite(after["embedding"]).all()
    unique_bad = torch.unique(sampled[bad_draws]).numel()
    want = 2 + sum(torch.unique(r["sampled"][(r["sampled"] >= 0) & (r["sampled"] % 2 == 0)]).numel() for r in results)
    assert results[0]["metrics"]["rejected_rows"] == want >= 2 + unique_bad
    for r in results:
        assert r["grad_finite"] and abs(r["loss"]) < 1e6


def stalled_or_dead(rank: int, world_size: int, mode: str) -> dict:
    tower = Tower()
    h = make_handler(CACHE, collective_timeout_s=3.0)
    h.load_global_rows(global_cache(CACHE, tower))

    def tower_fn(data):
        if rank == 1:
            if mode == "dead":
                os._exit(17)
            time.sleep(18)  # longer than the 15 s bound below: a wait for the stalled rank fails it
        return tower(data)

    g = torch.Generator().manual_seed(rank)
    x = torch.randn(2, FEAT, generator=g)
    start = time.monotonic()
    try:
        h.update_cache_and_compute_loss(tower_fn, torch.randn(2, DIM, generator=g), tower({"x": x}), {"x": x})
    except CollectiveFailed as exc:
        return {"error": str(exc), "seconds": time.monotonic() - start}
    return {"error": None}


@pytest.mark.parametrize("mode", ["stalled", "dead"])
def test_lost_rank_fails_fast_naming_step_and_collective(mode):
    results = run_ranks(2, stalled_or_dead, mode, timeout=60, allow_errors=True)
    r0 = results[0]
    assert r0["error"] is not None
    assert "step 0: collective 'stats'" in r0["error"]
    assert r0["seconds"] < 15  # the 3 s timeout, plus slack for a loaded machine; never the 18 s stall
    if mode == "dead":
        assert results[1] == ("died", 17)


def test_cache_that_cannot_fit_is_refused_at_construction():
    specs = {"x": FieldSpec((512,), torch.int64), "embedding": FieldSpec((768,), torch.float32)}
    with pytest.raises(CacheTooLarge, match=r"needs [0-9.]+ GiB on cpu \(7177 bytes per row\)"):
        ShardedCacheLossHandler(specs, 1 << 34, "embedding", ("x",))
