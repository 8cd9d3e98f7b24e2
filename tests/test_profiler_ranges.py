"""Each protocol step shows up as a named range in a user's profiler trace."""
from __future__ import annotations

from torch.profiler import ProfilerActivity, profile

from engine_cases import Tower, global_batch, global_cache, make_handler, run_step
from sharded_negcache.handler import STAGE_PREFIX, STAGES


def test_every_protocol_step_is_a_profiler_range():
    tower = Tower()
    handler = make_handler(16, num_negatives=2)
    handler.load_global_rows(global_cache(16, tower))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_step(handler, tower, global_batch(5, tower), 0, 5)
    names = [e.name for e in prof.events() if e.name.startswith(STAGE_PREFIX)]
    assert [n for n in names if n in {STAGE_PREFIX + s for s in STAGES}] == [STAGE_PREFIX + s for s in STAGES]
    # the score range encloses the chunk products: its CPU time is not empty
    score = [e for e in prof.events() if e.name == STAGE_PREFIX + "score"]
    assert len(score) == 1 and score[0].cpu_time_total > 0


def test_stage_times_clock_every_stage_within_the_step():
    import time

    import pytest

    from sharded_negcache.stages import stage_times

    tower = Tower()
    handler = make_handler(16, num_negatives=2)
    handler.load_global_rows(global_cache(16, tower))
    run_step(handler, tower, global_batch(5, tower), 0, 5)  # warm-up
    with stage_times() as clock:
        start = time.perf_counter()
        for seed in range(3):
            run_step(handler, tower, global_batch(5, tower, seed=seed), 0, 5)
        elapsed = time.perf_counter() - start
        with pytest.raises(RuntimeError, match="do not nest"):
            with stage_times():
                pass
    assert set(clock) == set(STAGES)  # a training step runs every stage
    assert all(t > 0 for t in clock.values()), clock
    assert sum(clock.values()) <= elapsed  # disjoint ranges inside the steps
    with stage_times() as again:  # outside a block nothing is recorded; a new block starts empty
        pass
    assert dict(again) == {}
