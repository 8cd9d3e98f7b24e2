"""Several steps give bit-for-bit the samples, losses and cache contents recorded from an earlier engine.

The recorded values (``data/recorded_steps.json``, one record per world size) pin the engine's numbers: a
change meant to leave behaviour alone (fewer collectives, fewer host reads, a refactor) must reproduce
every float bit at W = 1, 2 and 4 (uneven splits, an empty rank). Sampling and the cache's losses are the
same at every W by design; the in-batch products are not (a matmul over another number of rows may round
differently), hence a record per W. Each step's batch differs, so later steps see the rows
that earlier steps refreshed and inserted. Record again only for an intended change of the numbers:
``python tests/test_recorded_steps.py --record`` (and say why in the commit).
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

from engine_cases import Tower, global_batch, global_cache, make_handler, run_step
from sharded_negcache.testing import run_ranks

RECORD = Path(__file__).parent / "data" / "recorded_steps.json"
CACHE, BATCH, STEPS = 48, 12, 3
SPLITS = {1: [12], 2: [5, 7], 4: [3, 3, 6, 0]}
CONFIGS = {
    "sampling": dict(num_negatives=3),
    "ids_in_batch": dict(num_negatives=2, with_ids=True, in_batch_negatives=True, reduction="global_mean"),
    "top_k": dict(num_negatives=2, top_k=5),
}


def _bits(t: torch.Tensor) -> list:
    """Exact values: floats as hex strings (NaN and infinities included), integers as ints."""
    t = t.detach().reshape(-1)
    return [float(v).hex() for v in t.double().tolist()] if t.is_floating_point() else t.tolist()


def _cache_digest(rows: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(rows):
        h.update(key.encode())
        h.update(rows[key].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# Both ways rows reach their home rank must give the same bits: the eager fetch (rows ride with the partials,
# the default at these sizes) and the request/response fetch (eager_fetch_bytes=0).
FETCHES = {"eager": {}, "requested": {"eager_fetch_bytes": 0}}


def run_configs(rank: int, world_size: int) -> dict:
    fetches = FETCHES if world_size > 1 else {"eager": {}}
    return {(name, fetch): run_config(rank, world_size, name, **extra)
            for name in sorted(CONFIGS) for fetch, extra in fetches.items()}


def run_config(rank: int, world_size: int, name: str, **extra) -> dict:
    """STEPS steps of one configuration on this rank's slices of the global batches."""
    cfg = {**CONFIGS[name], **extra}
    with_ids = cfg.pop("with_ids", False)
    sizes = SPLITS[max(world_size, 1)]
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    tower = Tower()
    handler = make_handler(CACHE, with_ids=with_ids, seed=5, **cfg)
    handler.load_global_rows(global_cache(CACHE, tower, with_ids=with_ids))
    steps = []
    for s in range(STEPS):
        batch = global_batch(BATCH, tower, seed=11 + s, with_ids=with_ids)
        handler.comm.reset_counters()
        _, q_grad = run_step(handler, tower, batch, lo, hi, with_ids)
        res = handler.last_step
        collectives = sum(handler.comm.calls.values())
        steps.append({k: _bits(v) for k, v in {
            "training": res.training_loss, "interpretable": res.interpretable_loss, "lse": res.lse,
            "sampled": res.sampled_rows, "query_grad": q_grad,
        }.items()})
    return {"steps": steps, "cache": _cache_digest(handler.gather_global_rows()), "collectives": collectives}


def _joined(per_rank: list[dict]) -> dict:
    """Per-query values concatenated in global query order (rank order); the cache digest of rank 0."""
    steps = [{key: sum((r["steps"][s][key] for r in per_rank), []) for key in per_rank[0]["steps"][s]}
             for s in range(STEPS)]
    return {"steps": steps, "cache": per_rank[0]["cache"], "collectives": per_rank[0]["collectives"]}


def _run(world_size: int) -> dict:
    """Every configuration and fetch at ``world_size`` (one launch of the ranks)."""
    per_rank = [run_configs(0, 1)] if world_size == 1 else run_ranks(world_size, run_configs)
    return {key: _joined([r[key] for r in per_rank]) for key in per_rank[0]}


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_steps_match_the_recorded_bits(world_size: int) -> None:
    recorded, runs = json.loads(RECORD.read_text()), _run(world_size)
    for (name, fetch), run in runs.items():
        _check(run, recorded[name][str(world_size)], f"{name}/{fetch}", world_size)
    if world_size > 1:  # the last step's collectives: agreement, partials, stats (+ in-batch gathers)
        for name in sorted(CONFIGS):
            in_batch = 2 if CONFIGS[name].get("in_batch_negatives") else 0  # the gather and its backward all-reduce
            assert runs[name, "eager"]["collectives"] == 3 + in_batch, name
            assert runs[name, "requested"]["collectives"] == 6 + in_batch, name


def _check(got: dict, want: dict, name: str, world_size: int) -> None:
    for s in range(STEPS):
        for key, values in want["steps"][s].items():
            assert got["steps"][s][key] == values, (name, world_size, s, key)
    assert got["cache"] == want["cache"], (name, world_size)


if __name__ == "__main__" and "--record" in sys.argv:
    torch.set_num_threads(1)
    RECORD.parent.mkdir(exist_ok=True)
    runs = {w: _run(w) for w in SPLITS}
    RECORD.write_text(json.dumps({name: {str(w): {k: v for k, v in runs[w][name, "eager"].items() if k != "collectives"}
                                         for w in SPLITS} for name in sorted(CONFIGS)},
                                 indent=0) + "\n")
    print(f"wrote {RECORD}")
