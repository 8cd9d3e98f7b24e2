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
