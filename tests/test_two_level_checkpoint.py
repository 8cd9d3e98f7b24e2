"""Checkpoints of the two-level layout reshard across group counts (issue 14).

A 4 = 2x2 run (two groups of two ranks) trains two steps and saves; its third step is the reference.
The checkpoint is loaded as 4 = 4x1 (four groups of one rank: new group j reads saved group j mod 2)
and as 2 = 1x2 (the flat layout: group 0), and as 2x2 again after one byte of group 1's rows was
flipped. Checked: each new group holds its source group's rows bit for bit, groups that keep their
index continue exactly as the saved run (same samples and losses), copies draw their own stream, and
a corrupted group is refused on every rank of the job with every cache unchanged.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from dist_utils import run_ranks
from engine_cases import Tower, global_batch, global_cache, make_handler, run_step
from sharded_negcache.checkpoint import CacheCheckpoint, CheckpointError, load, save, source_group

CACHE, SEED, MARK = 16, 3, 4321.25
CONFIG = dict(with_ids=True, num_negatives=3, in_batch_negatives=True, seed=SEED)
SPLITS = {0: [[3, 5], [2, 6], [4, 2]], 1: [[2, 2], [1, 3], [4, 3]]}  # per group, per step, per rank of the group


def group_batch(group: int, step: int) -> dict:
    return global_batch(sum(SPLITS[group][step]), Tower(), seed=100 * group + step, with_ids=True)


def step_record(h, tower, group: int, step: int, lo: int, hi: int) -> dict:
    run_step(h, tower, group_batch(group, step), lo, hi, with_ids=True)
    r = h.last_step
    return {"sampled": r.sampled_rows, "training": r.training_loss, "lse": r.lse}


def save_and_reload(rank: int, world_size: int, root: str) -> dict:
    group, mine = rank // 2, rank % 2
    tower = Tower()
    h = make_handler(CACHE, shard_group_size=2, **CONFIG)
    rows = global_cache(CACHE, tower, seed=7 + group, with_ids=True)
    if group == 1:
        rows["x"][13, 2] = MARK  # a value found once in the checkpoint: rank 3's file, group 1's row 13
    h.load_global_rows(rows)
    span = lambda t: (sum(SPLITS[group][t][:mine]), sum(SPLITS[group][t][: mine + 1]))  # noqa: E731
    for t in (0, 1):
        step_record(h, tower, group, t, *span(t))
    save({"cache": CacheCheckpoint(h)}, f"{root}/ckpt")
    out = {"saved": h.gather_global_rows(), "next": step_record(h, tower, group, 2, *span(2))}

    # 4 = 4x1: new group j = rank reads saved group rank % 2; it sees the whole batch of that group
    four = make_handler(CACHE, shard_group_size=1, **CONFIG)
    load({"cache": CacheCheckpoint(four)}, f"{root}/ckpt")
    out["four_rows"] = {k: v.clone() for k, v in four.store.export_rows().items()}  # (views of the live rows)
    out["four_steps"] = four.steps_done
    out["four_next"] = step_record(four, tower, rank % 2, 2, 0, sum(SPLITS[rank % 2][2]))

    # a flipped byte in group 1's rows: every rank of both groups refuses, every cache unchanged
    if rank == 0:
        damaged = Path(root) / "damaged"
        shutil.copytree(f"{root}/ckpt", damaged)
        data = damaged / "__3_0.distcp"
        blob = bytearray(data.read_bytes())
        at = blob.find(torch.tensor([MARK]).numpy().tobytes())
        assert at >= 0
        blob[at] ^= 0x01
        data.write_bytes(bytes(blob))
    torch.distributed.barrier()
    again = make_handler(CACHE, shard_group_size=2, **CONFIG)
    again.load_global_rows(global_cache(CACHE, tower, seed=50 + group, with_ids=True))
    before = again.gather_global_rows()
    try:
        dcp.load({"cache": CacheCheckpoint(again)}, checkpoint_id=f"{root}/damaged")  # bare DCP: the row hashes
        out["damaged"] = "loaded"
    except CheckpointError as exc:
        out["damaged"] = str(exc)
    out["damaged_unchanged"] = again.steps_done == 0 and all(
        torch.equal(before[k], v) for k, v in again.gather_global_rows().items())
    return out


def load_flat(rank: int, world_size: int, root: str) -> dict:
    """2 = 1x2: the flat layout loads group 0 and continues it."""
    tower = Tower()
    h = make_handler(CACHE, **CONFIG)
    load({"cache": CacheCheckpoint(h)}, f"{root}/ckpt")
    out = {"rows": h.gather_global_rows(), "steps": h.steps_done}
    lo, hi = sum(SPLITS[0][2][:rank]), sum(SPLITS[0][2][: rank + 1])
    out["next"] = step_record(h, tower, 0, 2, lo, hi)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[list[dict], list[dict]]:
    root = str(tmp_path_factory.mktemp("two_level_ckpt"))
    four = run_ranks(4, save_and_reload, root, timeout=240)
    return four, run_ranks(2, load_flat, root, timeout=120)


def cat(records: list[dict]) -> dict:
    return {k: torch.cat([r[k] for r in records]) for k in records[0]}


def test_mapping():
    assert [source_group(j, 2) for j in range(4)] == [0, 1, 0, 1]  # growing: round-robin copies
    assert [source_group(j, 4) for j in range(2)] == [0, 1]  # shrinking: groups 0..n'-1 kept
    assert source_group(0, 1) == 0


def test_two_by_two_to_four_by_one(runs):
    four, _ = runs
    for rank, r in enumerate(four):
        saved = four[2 * (rank % 2)]["saved"]  # the whole cache of saved group rank % 2
        assert r["four_steps"] == 2
        for key, value in saved.items():
            assert torch.equal(r["four_rows"][key], value), (rank, key)
    for g in (0, 1):  # new groups 0 and 1 keep index, rows, seed and step: they continue the saved groups
        want = cat([four[2 * g]["next"], four[2 * g + 1]["next"]])
        got = four[g]["four_next"]
        assert (want["sampled"] >= 0).sum() > 5
        assert torch.equal(got["sampled"], want["sampled"]), g
        for key in ("training", "lse"):
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)
    for g in (2, 3):  # the copies: same rows and batch as group g - 2, their own random stream
        assert not torch.equal(four[g]["four_next"]["sampled"], four[g - 2]["four_next"]["sampled"]), g
        torch.testing.assert_close(four[g]["four_next"]["lse"], four[g - 2]["four_next"]["lse"])


def test_two_by_two_to_one_by_two(runs):
    four, flat = runs
    for rank, r in enumerate(flat):
        assert r["steps"] == 2
        for key, value in four[0]["saved"].items():
            assert torch.equal(r["rows"][key], value), (rank, key)
        want = four[rank]["next"]  # rank r of the flat run is rank r of saved group 0
        assert torch.equal(r["next"]["sampled"], want["sampled"]), rank
        for key in ("training", "lse"):
            torch.testing.assert_close(r["next"][key], want[key], rtol=1e-5, atol=1e-6)


def test_corrupted_group_is_refused_on_every_rank(runs):
    four, _ = runs
    messages = {r["damaged"] for r in four}
    assert len(messages) == 1, messages
    message = messages.pop()
    assert "the checkpoint is corrupted: 1 cache rows do not match their stored hash (rank 3: 1 rows from global " \
           "row 13)" in message, message
    assert all(r["damaged_unchanged"] for r in four)
