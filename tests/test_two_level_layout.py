"""Two-level layout (issue 14): W = 4 gloo ranks as 2 groups of G = 2, each group an independent cache.

One W = 4 run and one W = 2 reference run (two flat caches, one per group, seeded with the seed the
layout derives for that group) are fed the same per-group batches; each group's steps must equal the
reference's: sampled, refreshed and inserted rows, losses, gradients, the final cache, the bytes each
rank sends. The W = 4 run also checks what spans the world: global statistics, ``global_mean``, and
faults (a bad batch, a configuration mismatch, NaN from one rank's tower, a stalled rank) raising on
all four ranks with every cache unchanged.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import sharded_negcache
import two_level_cases
from engine_cases import DIM, make_handler
from sharded_negcache.layout import stream_seed
from sharded_negcache.topology import Topology
from two_level_cases import CACHE, SPLITS, G


@pytest.fixture(scope="module")
def runs() -> tuple[list[dict], list[dict]]:
    return two_level_cases.runs()


def test_layout_facts(runs):
    two, _ = runs
    for rank, r in enumerate(two):
        g = rank // G
        assert r["facts"] == (g, 2, G, rank % G, CACHE // G, [2 * g, 2 * g + 1], G)
        # one topology: W and the world rank, G and the shard rank, named as such by the topology and the comm
        assert r["topology"] == (4, rank, G, rank % G, g, 2, (2 * g, 2 * g + 1), [2 * g, 2 * g + 1], 4, rank, G, rank % G)


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
        # partials and rows never leave the group: the same bytes as the W = 2 run. The agreement spans all 4
        # ranks (its 3 int64 to 3 others per step); the queries and ids (4·DIM + 8 bytes a row) go to the one
        # other rank of the group, padded to the group's largest batch of the step (the flat W = 2 run instead
        # carries them inside its agreement, padded to the largest batch so far).
        steps = len(SPLITS[g])
        assert r["bytes"]["agree"] == 24 * 3 * steps, rank
        assert r["bytes"]["gather_queries"] == sum(max(s) for s in SPLITS[g]) * (4 * DIM + 8) * (G - 1), rank
        for tag, nbytes in want["bytes"].items():
            if tag not in ("agree", "gather_queries"):
                assert r["bytes"][tag] == nbytes, (rank, tag)
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


def test_only_rank_zero_of_the_job_logs(runs):
    two, _ = runs
    assert [len(r["logged"]) > 0 for r in two] == [True, False, False, False]
    assert {tag for tag, _, _ in two[0]["logged"]} >= {"cache/interpretable_prediction_loss", "cache/fill_fraction"}
    assert all(step == 1 for _, _, step in two[0]["logged"])


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
    one = Topology.build(None)  # no torch.distributed: one process, one group, no process group
    assert (one.world_size, one.rank, one.shard_size, one.shard_rank, one.group, one.num_groups, one.members) == \
        (1, 0, 1, 0, 0, 1, (0,))
    assert not one.distributed and not one.two_level and one.world_group is None
    assert Topology.build(1).shard_size == 1 and Topology.build(1).num_groups == 1
    for bad in (0, 2, -1, 1.0, True):
        with pytest.raises(ValueError, match="shard_group_size must be a positive int dividing the world size 1"):
            Topology.build(bad)
    h = make_handler(CACHE, shard_group_size=1)
    assert h.config()["shard_group_size"] == 1 and h.layout.stream_seed(9) == 9


def test_only_the_topology_reads_torch_distributed_state():
    """Ranks and sizes come from one Topology: no other module asks torch.distributed whether it is initialised."""
    package = Path(sharded_negcache.__file__).parent
    readers = sorted(str(p.relative_to(package)) for p in package.rglob("*.py")
                     if "is_initialized(" in p.read_text() or "dist.is_available(" in p.read_text())
    assert readers == ["topology.py"], readers
