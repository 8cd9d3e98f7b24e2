"""Two-level layout (issue 14): W = 4 gloo ranks as 2 groups of G = 2, each group an independent cache.

One W = 4 run and one W = 2 reference run (two flat caches, one per group, seeded with the seed the
layout derives for that group) are fed the same per-group batches; each group's steps must equal the
reference's: sampled, refreshed and inserted rows, losses, gradients, the final cache, the bytes each
rank sends. The W = 4 run also checks what spans the world: global statistics, ``global_mean``, and
faults (a bad batch, a configuration mismatch, NaN from one rank's tower, a stalled rank) raising on
all four ranks with every cache unchanged.
"""
from __future__ import annotations

import time

import pytest
import torch

from dist_utils import run_ranks
from engine_cases import DIM, Tower, global_batch, global_cache, make_handler, run_step
from sharded_negcache import BatchRejected, CollectiveFailed, NonFiniteRows
from sharded_negcache.groups import ShardGroups
from sharded_negcache.layout import stream_seed

CACHE, G, SEED = 16, 2, 5  # 8 rows per rank, blocks of 4
# per group, per step: the batch size of each rank of the group (zero included; the groups differ)
SPLITS = {0: [[3, 5], [0, 6], [4, 2]], 1: [[2, 2], [1, 1], [4, 3]]}
CONFIG = dict(with_ids=True, num_negatives=3, in_batch_negatives=True, reduction="global_mean")


def batches(group: int) -> list[dict]:
    return [global_batch(sum(s), Tower(), seed=100 * group + t, with_ids=True) for t, s in enumerate(SPLITS[group])]


def run_group(handler, group: int, rank: int) -> dict:
    """Three steps of ``group``'s batches on this rank (``rank`` within the group), from the group's own cache."""
    tower = Tower()
    handler.load_global_rows(global_cache(CACHE, tower, seed=7 + group, with_ids=True))
    steps = []
    for t, batch in enumerate(batches(group)):
        sizes = SPLITS[group][t]
        lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
        loss, qgrad = run_step(handler, tower, batch, lo, hi, with_ids=True)
        r = handler.last_step
        steps.append({
            "loss": loss, "qgrad": qgrad, "training": r.training_loss, "lse": r.lse, "sampled": r.sampled_rows,
            "refreshed": r.refreshed_rows, "inserted": r.inserted_rows, "metrics": r.metrics,
            "tower_grad": tower.lin.weight.grad.clone(),
        })
    return {"steps": steps, "cache": handler.gather_global_rows(), "bytes": dict(handler.comm.bytes_sent)}


def reference(rank: int, world_size: int) -> dict:
    """W = 2, flat: one cache per group in turn, seeded as the two-level layout seeds that group."""
    return {g: run_group(make_handler(CACHE, seed=stream_seed(SEED, g), **CONFIG), g, rank) for g in (0, 1)}


def _unchanged(h, before: dict, steps: int) -> bool:
    return h.steps_done == steps and all(torch.equal(before[k], v) for k, v in h.gather_global_rows().items())


def _expect(fn, exc_type) -> str:
    try:
        fn()
    except exc_type as exc:
        return str(exc)
    return "no error"


def two_level(rank: int, world_size: int) -> dict:
    group, mine = rank // G, rank % G
    h = make_handler(CACHE, seed=SEED, shard_group_size=G, **CONFIG)
    out = {"facts": (h.layout.group, h.layout.num_groups, h.layout.world_size, h.layout.rank, h.layout.rows_per_rank,
                     h.comm.members, h.config()["shard_group_size"])}
    out.update(run_group(h, group, mine))
    tower = Tower()
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(rank))
    data, q = {"x": x, "doc_id": torch.tensor([[rank], [rank + 1]])}, torch.randn(2, DIM)

    # the same cache and batches in both groups: the groups' random streams must differ
    same = make_handler(CACHE, seed=SEED, shard_group_size=G, **CONFIG)
    same.load_global_rows(global_cache(CACHE, tower, seed=7, with_ids=True))
    run_step(same, tower, batches(0)[1], *[(0, 0), (0, 6)][mine], with_ids=True)
    out["same_input_sampled"] = same.last_step.sampled_rows

    # faults: each raises on all four ranks and leaves every cache as it was
    before, steps = h.gather_global_rows(), h.steps_done
    bad_q = torch.randn(2, DIM + 1) if rank == 3 else q
    out["bad_batch"] = _expect(lambda: h.update_cache_and_compute_loss(tower, bad_q, tower(data), data), BatchRejected)
    out["bad_batch_unchanged"] = _unchanged(h, before, steps)
    nan_tower = (lambda d: tower(d) * float("nan")) if rank == 1 else tower
    out["nan"] = _expect(lambda: h.update_cache_and_compute_loss(nan_tower, q, tower(data), data), NonFiniteRows)
    out["nan_unchanged"] = _unchanged(h, before, steps)
    odd = make_handler(CACHE, seed=SEED, shard_group_size=G, **{**CONFIG, "num_negatives": 2 if rank == 2 else 3})
    out["config"] = _expect(lambda: odd.update_cache_and_compute_loss(tower, q, tower(data), data), BatchRejected)
    out["group_size"] = _expect(lambda: make_handler(CACHE, shard_group_size=4 if rank == 0 else 2), ValueError)

    # last: rank 3 stalls in its tower; every rank fails fast naming the collective, none hangs
    slow = make_handler(CACHE, seed=SEED, shard_group_size=G, collective_timeout_s=3.0, **CONFIG)
    slow.load_global_rows(global_cache(CACHE, tower, seed=7, with_ids=True))
    stall = (lambda d: (time.sleep(6), tower(d))[1]) if rank == 3 else tower
    start = time.monotonic()
    out["stalled"] = _expect(lambda: slow.update_cache_and_compute_loss(stall, q, tower(data), data), CollectiveFailed)
    out["stalled_s"] = time.monotonic() - start
    return out


@pytest.fixture(scope="module")
def runs() -> tuple[list[dict], list[dict]]:
    return run_ranks(4, two_level, timeout=240), run_ranks(2, reference, timeout=120)


def test_layout_facts(runs):
    two, _ = runs
    for rank, r in enumerate(two):
        g = rank // G
        assert r["facts"] == (g, 2, G, rank % G, CACHE // G, [2 * g, 2 * g + 1], G)


def test_each_group_equals_a_two_rank_run(runs):
    two, ref = runs
    for rank, r in enumerate(two):
        g, mine = rank // G, rank % G
        want = ref[mine][g]
        sampled = 0
        for t, (got, exp) in enumerate(zip(r["steps"], want["steps"])):
            where = f"rank {rank} step {t}"
            for key in ("sampled", "refreshed", "inserted"):
                assert torch.equal(got[key], exp[key]), (where, key)
            sampled += int((got["sampled"] >= 0).sum())
            torch.testing.assert_close(got["training"], exp["training"], rtol=0, atol=0, msg=where)
            torch.testing.assert_close(got["lse"], exp["lse"], rtol=0, atol=0, msg=where)
            # global_mean over the world (W / B_world) against the group's (G / B_group): the gradients scale by it
            b_world, b_group = sum(map(sum, (SPLITS[0][t], SPLITS[1][t]))), sum(SPLITS[g][t])
            want_loss = got["training"].sum() * 4 / b_world
            assert got["loss"].item() == pytest.approx(want_loss.item(), rel=1e-6), where
            assert exp["loss"].item() == pytest.approx((exp["training"].sum() * 2 / b_group).item(), rel=1e-6)
            if got["qgrad"] is not None and got["qgrad"].numel():
                ratio = (4 / b_world) / (2 / b_group)
                torch.testing.assert_close(got["qgrad"], exp["qgrad"] * ratio, rtol=1e-5, atol=1e-7, msg=where)
        assert sampled > 0, f"rank {rank}: nothing was sampled, the comparison would be vacuous"
        for key, value in want["cache"].items():
            assert torch.equal(r["cache"][key], value), (rank, key)
        # queries, partials and rows never leave the group: the same bytes as the W = 2 run; the agreement spans 4
        for tag, nbytes in want["bytes"].items():
            assert r["bytes"][tag] == (nbytes * 3 if tag == "agree" else nbytes), (rank, tag)
    assert not torch.equal(two[0]["cache"]["embedding"], two[2]["cache"]["embedding"])  # independent caches


def test_statistics_span_the_world(runs):
    two, ref = runs
    for t in range(3):
        per_group = [ref[0][g]["steps"][t]["metrics"] for g in (0, 1)]
        counts = [sum(SPLITS[g][t]) for g in (0, 1)]
        got = [r["steps"][t]["metrics"] for r in two]
        assert all(m == got[0] for m in got)
        assert got[0]["sampled"] == per_group[0]["sampled"] + per_group[1]["sampled"]
        assert got[0]["fill_fraction"] == pytest.approx((per_group[0]["fill_fraction"] + per_group[1]["fill_fraction"]) / 2)
        il = sum(m["interpretable_loss"] * c for m, c in zip(per_group, counts)) / sum(counts)
        assert got[0]["interpretable_loss"] == pytest.approx(il, rel=1e-6)


def test_groups_draw_from_distinct_streams(runs):
    two, _ = runs
    a, b = two[1]["same_input_sampled"], two[3]["same_input_sampled"]  # rank 1 of each group: 6 queries, 3 draws
    assert (a >= 0).sum() > 10 and (b >= 0).sum() > 10
    assert not torch.equal(a, b)


def test_faults_raise_on_every_rank_and_leave_caches_unchanged(runs):
    two, _ = runs
    for rank, r in enumerate(two):
        assert r["bad_batch"].startswith("batch rejected, cache unchanged; rank 3: "), r["bad_batch"]
        assert "query_embeddings" in r["bad_batch"]
        assert "produced NaN/Inf" in r["nan"] and "cache unchanged" in r["nan"], r["nan"]
        assert r["bad_batch_unchanged"] and r["nan_unchanged"]
        assert "ranks disagree on the cache configuration" in r["config"], r["config"]
        assert "num_negatives: rank 0=3, rank 1=3, rank 2=2, rank 3=3" in r["config"]
        assert "ranks disagree on shard_group_size (by rank: [4, 2, 2, 2]" in r["group_size"], r["group_size"]
        assert "collective" in r["stalled"] and r["stalled_s"] < 6 + 3 + 10, (rank, r["stalled"], r["stalled_s"])
    # they time out after 3 s, long before rank 3 wakes up: group 0 in the world's statistics, rank 2 already
    # in its group's in-batch gather
    for rank, where in ((0, "stats"), (1, "stats"), (2, "gather_positives")):
        assert two[rank]["stalled"].startswith(f"step 0: collective '{where}' on rank {rank} of 4 (rank {rank % 2} "
                                               "of its shard group) did not complete within 3 s"), two[rank]["stalled"]
        assert two[rank]["stalled_s"] < 3 + 10


def test_seed_derivation_and_validation():
    assert stream_seed(5, 0) == 5 and stream_seed(2**40 + 3, 0) == 2**40 + 3  # group 0: the user's seed
    assert stream_seed(5, 1) == 5 + 0x9E3779B9
    assert stream_seed(5, 3) == (5 + 3 * 0x9E3779B9) % 2**32
    for seed in (0, 5, 2**32 - 1, 2**40):
        assert len({stream_seed(seed, g) % 2**32 for g in range(4096)}) == 4096  # the sampler reads 32 bits
    assert ShardGroups.build(None).group_size == 1 and ShardGroups.build(1).count == 1
    for bad in (0, 2, -1, 1.0, True):
        with pytest.raises(ValueError, match="shard_group_size must be a positive int dividing the world size 1"):
            ShardGroups.build(bad)
    h = make_handler(CACHE, shard_group_size=1)
    assert h.config()["shard_group_size"] == 1 and h.layout.stream_seed(9) == 9
