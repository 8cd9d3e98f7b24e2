"""sharded_negcache.testing.run_ranks: real gloo ranks, results by rank, errors and hangs reported."""
from __future__ import annotations

import time

import pytest

from sharded_negcache.testing import run_ranks


def fail(rank: int, world_size: int, what: str) -> None:
    raise ValueError(f"{what} on rank {rank} of {world_size}")


def test_a_failing_rank_is_reported_with_its_traceback():
    # results by rank over real gloo groups are what every other multi-process test checks
    [got] = run_ranks(1, fail, "boom", allow_errors=True, use_dist=False, timeout=60)
    assert got[0] == "error" and "ValueError: boom on rank 0 of 1" in got[1] and "Traceback" in got[1]


def sleep_forever(rank: int, world_size: int) -> None:
    time.sleep(600)


def test_a_hung_rank_is_killed_after_the_timeout():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[0\] did not finish within 5 s"):
        run_ranks(1, sleep_forever, timeout=5, use_dist=False)
    assert time.monotonic() - start < 60


@pytest.mark.parametrize("world_size", [0, -1, 1.5])
def test_world_size_must_be_a_positive_int(world_size):
    with pytest.raises(ValueError, match="world_size must be an int >= 1"):
        run_ranks(world_size, sleep_forever)
