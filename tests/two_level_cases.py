"""The two-level layout's multi-process runs (issue 14), shared by its test modules: one W = 4 run as
2 groups of 2 and one W = 2 flat reference run, each started once per test session.

Process start-up dominates these tests on a small machine, so each run checks several things:
``two_level`` (4 ranks) runs each group's steps, the same-input streams, a checkpoint saved as 2x2 and
loaded as 4x1 and damaged, the faults, and last a stalled rank; ``reference`` (2 ranks) runs both
groups' batches as flat W = 2 caches and loads the 2x2 checkpoint as 1x2.
"""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from engine_cases import DIM, ScalarRecorder, Tower, global_batch, global_cache, make_handler, run_step
from sharded_negcache import BatchRejected, CollectiveFailed, NonFiniteRows
from sharded_negcache.checkpoint import CacheCheckpoint, CheckpointError, load, save
from sharded_negcache.layout import stream_seed
from sharded_negcache.testing import run_ranks

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


def reference(rank: int, world_size: int, root: str) -> dict:
    """W = 2, flat: one cache per group in turn, seeded as the two-level layout seeds that group; then the
    2x2 checkpoint loaded as 1x2. The flat run fetches rows by request and response, as the two-level layout
    does (its statistics span the world while rows stay in the group), so their per-collective bytes compare."""
    out = {g: run_group(make_handler(CACHE, seed=stream_seed(SEED, g), eager_fetch_bytes=0, **CONFIG), g, rank)
           for g in (0, 1)}
    out["checkpoint"] = load_flat(rank, root)
    return out


def _unchanged(h, before: dict, steps: int) -> bool:
    return h.steps_done == steps and all(torch.equal(before[k], v) for k, v in h.gather_global_rows().items())


def expect_error(fn, exc_type) -> str:
    try:
        fn()
    except exc_type as exc:
        return str(exc)
    return "no error"


def two_level(rank: int, world_size: int, root: str) -> dict:
    group, mine = rank // G, rank % G
    h = make_handler(CACHE, seed=SEED, shard_group_size=G, **CONFIG)
    t, c = h.topology, h.comm
    out = {"facts": (h.layout.group, h.layout.num_groups, h.layout.shard_size, h.layout.shard_rank, h.layout.rows_per_rank,
                     h.comm.members, h.config()["shard_group_size"]),
           "topology": (t.world_size, t.rank, t.shard_size, t.shard_rank, t.group, t.num_groups, t.members,
                        dist.get_process_group_ranks(t.shard_group), c.world_size, c.rank, c.shard_size, c.shard_rank)}
    out.update(run_group(h, group, mine))
    tower = Tower()
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(rank))
    data, q = {"x": x, "doc_id": torch.tensor([[rank], [rank + 1]])}, torch.randn(2, DIM)

    # the same cache and batches in both groups: the groups' random streams must differ
    same = make_handler(CACHE, seed=SEED, shard_group_size=G, **CONFIG)
    same.load_global_rows(global_cache(CACHE, tower, seed=7, with_ids=True))
    run_step(same, tower, batches(0)[1], *[(0, 0), (0, 6)][mine], with_ids=True)
    out["same_input_sampled"] = same.last_step.sampled_rows
    # metrics are global: only rank 0 of the job writes them, not rank 0 of every group
    log = ScalarRecorder()
    same.update_cache_and_compute_loss(tower, q, tower(data), data, writer=log)
    out["logged"] = log.calls

    # faults: each raises on all four ranks and leaves every cache as it was
    before, steps = h.gather_global_rows(), h.steps_done
    bad_q = torch.randn(2, DIM + 1) if rank == 3 else q
    out["bad_batch"] = expect_error(lambda: h.update_cache_and_compute_loss(tower, bad_q, tower(data), data), BatchRejected)
    out["bad_batch_unchanged"] = _unchanged(h, before, steps)
    nan_tower = (lambda d: tower(d) * float("nan")) if rank == 1 else tower
    out["nan"] = expect_error(lambda: h.update_cache_and_compute_loss(nan_tower, q, tower(data), data), NonFiniteRows)
    out["nan_unchanged"] = _unchanged(h, before, steps)
    odd = make_handler(CACHE, seed=SEED, shard_group_size=G, **{**CONFIG, "num_negatives": 2 if rank == 2 else 3})
    out["config"] = expect_error(lambda: odd.update_cache_and_compute_loss(tower, q, tower(data), data), BatchRejected)
    out["group_size"] = expect_error(lambda: make_handler(CACHE, shard_group_size=4 if rank == 0 else 2), ValueError)

    out["checkpoint"] = checkpoint_part(rank, root)

    # last: rank 3 stalls in its tower; every rank fails fast naming the collective, none hangs
    slow = make_handler(CACHE, seed=SEED, shard_group_size=G, collective_timeout_s=3.0, **CONFIG)
    slow.load_global_rows(global_cache(CACHE, tower, seed=7, with_ids=True))
    stall = (lambda d: (time.sleep(6), tower(d))[1]) if rank == 3 else tower
    start = time.monotonic()
    out["stalled"] = expect_error(lambda: slow.update_cache_and_compute_loss(stall, q, tower(data), data), CollectiveFailed)
    out["stalled_s"] = time.monotonic() - start
    return out


# ---- checkpoints: 2x2 saved, loaded as 4x1 (W = 4), 1x2 (W = 2) and damaged ----------------------
CK_SEED, MARK = 3, 4321.25
CK_CONFIG = dict(with_ids=True, num_negatives=3, in_batch_negatives=True, seed=CK_SEED)
CK_SPLITS = {0: [[3, 5], [2, 6], [4, 2]], 1: [[2, 2], [1, 3], [4, 3]]}  # per group, per step, per rank of the group


def group_batch(group: int, step: int) -> dict:
    return global_batch(sum(CK_SPLITS[group][step]), Tower(), seed=100 * group + step, with_ids=True)


def step_record(h, tower, group: int, step: int, lo: int, hi: int) -> dict:
    run_step(h, tower, group_batch(group, step), lo, hi, with_ids=True)
    r = h.last_step
    return {"sampled": r.sampled_rows, "training": r.training_loss, "lse": r.lse}


def checkpoint_part(rank: int, root: str) -> dict:
    group, mine = rank // 2, rank % 2
    tower = Tower()
    h = make_handler(CACHE, shard_group_size=2, **CK_CONFIG)
    rows = global_cache(CACHE, tower, seed=7 + group, with_ids=True)
    if group == 1:
        rows["x"][13, 2] = MARK  # a value found once in the checkpoint: rank 3's file, group 1's row 13
    h.load_global_rows(rows)
    span = lambda t: (sum(CK_SPLITS[group][t][:mine]), sum(CK_SPLITS[group][t][: mine + 1]))  # noqa: E731
    for t in (0, 1):
        step_record(h, tower, group, t, *span(t))
    save({"cache": CacheCheckpoint(h)}, f"{root}/ckpt")
    out = {"saved": h.gather_global_rows(), "next": step_record(h, tower, group, 2, *span(2))}

    # 4 = 4x1: new group j = rank reads saved group rank % 2; it sees the whole batch of that group
    four = make_handler(CACHE, shard_group_size=1, **CK_CONFIG)
    load({"cache": CacheCheckpoint(four)}, f"{root}/ckpt")
    out["four_rows"] = {k: v.clone() for k, v in four.store.export_rows().items()}  # (views of the live rows)
    out["four_steps"] = four.steps_done
    out["four_next"] = step_record(four, tower, rank % 2, 2, 0, sum(CK_SPLITS[rank % 2][2]))

    # and back: 4x1 saved (groups 1-3 under their own names), loaded as 2x2 (new group j reads group j)
    save({"cache": CacheCheckpoint(four)}, f"{root}/ckpt41")
    out["four_after"] = {k: v.clone() for k, v in four.store.export_rows().items()}
    back = make_handler(CACHE, shard_group_size=2, **CK_CONFIG)
    load({"cache": CacheCheckpoint(back)}, f"{root}/ckpt41")
    out["back_rows"], out["back_steps"] = back.gather_global_rows(), back.steps_done

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
    again = make_handler(CACHE, shard_group_size=2, **CK_CONFIG)
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


def load_flat(rank: int, root: str) -> dict:
    """2 = 1x2: the flat layout loads group 0 and continues it."""
    tower = Tower()
    h = make_handler(CACHE, **CK_CONFIG)
    load({"cache": CacheCheckpoint(h)}, f"{root}/ckpt")
    out = {"rows": h.gather_global_rows(), "steps": h.steps_done}
    lo, hi = sum(CK_SPLITS[0][2][:rank]), sum(CK_SPLITS[0][2][: rank + 1])
    out["next"] = step_record(h, tower, 0, 2, lo, hi)
    return out


@functools.lru_cache(maxsize=None)
def runs() -> tuple[list[dict], list[dict]]:
    """(the W = 4 two-level run's results by rank, the W = 2 reference's), computed once per session."""
    root = tempfile.mkdtemp(prefix="two_level_")
    atexit.register(shutil.rmtree, root, True)
    return run_ranks(4, two_level, root, timeout=240), run_ranks(2, reference, root, timeout=120)
