"""The engine's invariants (``test_properties.check_case``) hold in each group of the two-level layout.

Four gloo ranks as two groups of two (``shard_group_size=2``): hypothesis draws a two-rank scenario
and a second list of batch sizes; group 0 runs the scenario, group 1 the same scenario with its own
batch sizes (hence other positives and queries), at the same time, on caches of the same size. Each
group's shards are checked exactly as a two-rank run's: inserts, evictions, ages, refreshes, sampled
rows and their LSE, losses. The towers never diverge here: NaN rows raise or are counted over the
whole job, which the per-group checker cannot predict; ``test_two_level_layout`` covers those faults.
"""
from __future__ import annotations

import functools
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import Phase, example, given, settings
from hypothesis import strategies as st

import test_properties as props
from sharded_negcache.testing import free_port

G = 2


def _two_level(handler_class, *args, **kw):
    handler = handler_class(*args, shard_group_size=G, **kw)
    assert (handler.layout.num_groups, handler.layout.shard_size, handler.comm.world_size) == (2, G, props.POOL)
    return handler


def _worker(rank: int, port: int, inbox, outbox) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=props.POOL)
    # run_case builds the handler through this name: every handler of these scenarios is two-level
    props.ShardedCacheLossHandler = functools.partial(_two_level, props.ShardedCacheLossHandler)
    while True:
        job = inbox.get()
        if job is None:
            break
        case = job["case"] if rank < G else {**job["case"], "batches": job["other"]}
        try:
            outbox.put((rank, "ok", props.run_case(rank % G, case)))
        except BaseException as exc:  # reported to the test
            outbox.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    dist.destroy_process_group()


class GroupPool(props.RankPool):
    """test_properties' pool of four ranks, running the two-level worker."""

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self.inboxes = [ctx.Queue() for _ in range(props.POOL)]
        self.outbox = ctx.Queue()
        port = free_port()
        self.procs = [ctx.Process(target=_worker, args=(r, port, self.inboxes[r], self.outbox), daemon=True)
                      for r in range(props.POOL)]
        for p in self.procs:
            p.start()


@pytest.fixture(scope="module")
def pool():
    p = GroupPool()
    yield p
    p.close()


@st.composite
def two_groups(draw) -> dict:
    case = {**draw(props.scenarios(G)), "poison_mod": 0}
    rows, steps = case["rows"], len(case["batches"])
    other = draw(st.lists(st.lists(st.integers(0, rows), min_size=G, max_size=G), min_size=steps, max_size=steps))
    return {"world": props.POOL, "case": case, "other": other}


def check(job: dict, per_rank: list) -> None:
    props.check_case(job["case"], per_rank[:G])
    props.check_case({**job["case"], "batches": job["other"]}, per_rank[G:])


FIXED = props.fixed(G, poison_mod=0, top_k=3, in_batch=True)


@settings(max_examples=12, phases=[Phase.explicit, Phase.generate], **props.COMMON)
@example(job={"world": props.POOL, "case": FIXED, "other": [[1, 4], [3, 0], [2, 2]]})
@given(job=two_groups())
def test_invariants_hold_in_each_group(pool, job):
    check(job, pool.run(job))
