"""Checkpoints of the two-level layout reshard across group counts (issue 14).

A 4 = 2x2 run (two groups of two ranks) trains two steps and saves; its third step is the reference. The
checkpoint is loaded as 4 = 4x1 (four groups of one rank: new group j reads saved group j mod 2), which saves
again and is loaded back as 2x2 (groups 0 and 1 of the four), as 2 = 1x2 (the flat layout: group 0), and as
2x2 again after one byte of group 1's rows was flipped. Checked: each new group holds its source group's rows
bit for bit, groups that keep their index continue exactly as the saved run (same samples and losses), copies
draw their own stream, and a corrupted group is refused on every rank of the job with every cache unchanged.
"""
from __future__ import annotations

import pytest
import torch

import two_level_cases
from sharded_negcache.checkpoint import source_group


@pytest.fixture(scope="module")
def runs() -> tuple[list[dict], list[dict]]:
    four, flat = two_level_cases.runs()
    return [r["checkpoint"] for r in four], [r["checkpoint"] for r in flat]


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


def test_four_by_one_back_to_two_by_two(runs):
    four, _ = runs
    for rank, r in enumerate(four):
        assert r["back_steps"] == 3
        for key, value in four[rank // 2]["four_after"].items():  # new group rank // 2 = saved group rank // 2
            assert torch.equal(r["back_rows"][key], value), (rank, key)
    assert not torch.equal(four[0]["back_rows"]["embedding"], four[2]["back_rows"]["embedding"])


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
