"""The handler's fixed cost per step: a cache step against an in-batch softmax step in the same processes.

Both steps run the same towers (linear query and document towers over random features) and the same
batch; they differ only in the loss:

- **in-batch**: the positives of every rank gathered with gradient (``torch.distributed.nn.all_gather``),
  ``cross_entropy(T * q @ P^T)`` with each query's own positive as the label, then backward;
- **cache**: ``ShardedCacheLossHandler`` over a full cache (``num_negatives`` draws re-encoded by the
  document tower), then backward.

The two are interleaved (cache, in-batch, cache, ...) so that load changes hit both alike; the table
quotes medians over the repeats, each repeat taking the slowest rank (the job's step). ``overhead = cache -
in-batch`` is what the cache costs beyond the in-batch softmax, and ``fixed = overhead - score`` what it
costs beyond that and its own scan (the handler's fixed cost), repeat by repeat. ``score`` is the slowest
rank's scan by the clock: a rank whose scan ends first waits for the others at the partials exchange, so
the job's scan takes the longest rank's. At W > 1 each case runs with the eager fetch (rows ride with the
partials: 3 collectives) and without it (``eager_fetch_bytes=0``: request/response, 6 collectives).

Each rank and its gloo threads run pinned to one core (``--no-pin`` leaves them free), for both steps: with
as many ranks as cores, unpinned threads migrate and wake each other late, and a collective then waits on
the OS scheduler rather than on the wire (a deployment gives each rank its own cores).
The handler's stages (its ``negcache/<stage>`` ranges) are timed two ways: by the clock during the timed
repeats (``sharded_negcache.stages.stage_times``: two clock reads per stage), and by a profiled run, which
shows where the time goes but charges every tensor op the profiler's own few microseconds (a step at 16
queries runs a few hundred ops, so the profiled totals run high). The engine's own counters give the
collectives launched per step (``Comm.calls``). On CUDA, host synchronisations per step
are counted with ``torch.cuda.set_sync_debug_mode("warn")``; on CPU there is no stream to stall, and
``docs/design.md`` lists the sync points a GPU step would have.

Usage: ``python benchmarks/bench_overhead.py [--repeats 40] [--worlds 1,2] [--cases 16:4K,256:64K]``;
writes ``benchmarks/results/overhead.json``.
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Any

import torch
import torch.nn.functional as F

from _common import (
    RESULTS_DIR,
    CheapTower,
    fill_local,
    machine_info,
    make_handler,
    parse_sizes,
    pin_to_core,
    run_ranks,
    table,
    write_json,
)

DIM, FEAT, SCALE, DRAWS = 128, 64, 20.0, 2


def _batch(rank: int, step: int, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0x20000000 + 7919 * step + rank)
    return torch.randn(batch, FEAT, generator=g).to(device), torch.randn(batch, FEAT, generator=g).to(device)


def _in_batch_loss(q: torch.Tensor, p: torch.Tensor, world: int, rank: int) -> torch.Tensor:
    """MNRL over the global batch: each query against every rank's positives (gathered with gradient)."""
    if world > 1:
        import torch.distributed.nn.functional as dnn

        everyone = torch.cat(dnn.all_gather(p), dim=0)
    else:
        everyone = p
    labels = torch.arange(q.shape[0], device=q.device) + rank * q.shape[0]
    return F.cross_entropy(SCALE * q @ everyone.T, labels)


def _sync_count(fn) -> int:
    """Host synchronisations ``fn()`` makes on CUDA (each one a warning in sync-debug mode)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def _rank_main(rank: int, world: int, batch: int, cache_size: int, repeats: int, eager: bool,
               pin: bool) -> dict[str, Any]:
    from sharded_negcache.stages import STAGE_PREFIX, STAGES, stage_times

    if pin:
        pin_to_core(rank)
    device = torch.device("cuda", rank) if torch.cuda.is_available() else torch.device("cpu")
    handler = make_handler(cache_size, DIM, FEAT, num_negatives=DRAWS, device=device,
                           **({} if eager else {"eager_fetch_bytes": 0}))
    fill_local(handler)
    q_tower = CheapTower(FEAT, DIM, seed=2, device=device)
    d_tower = CheapTower(FEAT, DIM, seed=3, device=device)
    params = list(q_tower.parameters()) + list(d_tower.parameters())

    def cache_step(step: int) -> None:
        xq, xd = _batch(rank, step, batch, device)
        q, p = q_tower({"x": xq}), d_tower({"x": xd})
        handler(d_tower, q, p, {"x": xd}).backward()

    def in_batch_step(step: int) -> None:
        xq, xd = _batch(rank, step, batch, device)
        q, p = q_tower({"x": xq}), d_tower({"x": xd})
        _in_batch_loss(q, p, world, rank).backward()

    def timed(fn, step: int) -> float:
        for t in params:
            t.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if world > 1:
            torch.distributed.barrier()
        t0 = time.perf_counter()
        fn(step)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    for s in range(3):  # warm-up: the CPU kernel's first call, allocator caches
        timed(cache_step, s)
        timed(in_batch_step, s)
    cache_t, in_batch_t, steps = [], [], []
    handler.comm.reset_counters()
    for s in range(repeats):
        with stage_times() as clock:  # the stages by the clock (two clock reads per stage; no per-op cost)
            cache_t.append(timed(cache_step, 100 + s))
        steps.append(dict(clock))
        in_batch_t.append(timed(in_batch_step, 100 + s))
    calls = dict(handler.comm.calls)
    clock = {k: sum(st.get(k, 0.0) for st in steps) / repeats for k in STAGES}

    stage_steps = max(5, repeats // 4)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for s in range(stage_steps):
            timed(cache_step, 1000 + s)
    stages = dict.fromkeys(STAGES, 0.0)
    for e in prof.events():
        if e.name.startswith(STAGE_PREFIX) and e.name[len(STAGE_PREFIX):] in stages:
            stages[e.name[len(STAGE_PREFIX):]] += e.cpu_time_total / 1e6 / stage_steps

    syncs = _sync_count(lambda: cache_step(2000)) if device.type == "cuda" else None
    return {
        "cache_s": cache_t, "in_batch_s": in_batch_t, "stages_s": stages, "clock_s": clock,
        "score_s": [st.get("score", 0.0) for st in steps],
        "collective_calls": {k: v / repeats for k, v in calls.items()}, "cuda_syncs_per_step": syncs,
    }


def run_case(world: int, batch: int, cache_size: int, repeats: int, eager: bool = True,
             pin: bool = True) -> dict[str, Any]:
    per_rank = run_ranks(world, _rank_main, batch, cache_size, repeats, eager, pin, threads=1, use_dist=world > 1)
    # the step time of the job is the slowest rank's, repeat by repeat
    cache = [max(r["cache_s"][i] for r in per_rank) for i in range(repeats)]
    in_batch = [max(r["in_batch_s"][i] for r in per_rank) for i in range(repeats)]
    overhead = [c - b for c, b in zip(cache, in_batch)]
    # the job's scan lasts as long as its slowest rank's: a faster rank waits for it at the partials exchange
    score = [max(r["score_s"][i] for r in per_rank) for i in range(repeats)]
    fixed = [o - sc for o, sc in zip(overhead, score)]
    stages = per_rank[0]["stages_s"]
    return {
        "world": world, "pinned": pin, "rows_by": "eager" if eager and world > 1 else ("request" if world > 1 else "local"),
        "queries_per_rank": batch, "cache_rows": cache_size, "repeats": repeats,
        "cache_ms": 1e3 * statistics.median(cache), "in_batch_ms": 1e3 * statistics.median(in_batch),
        "overhead_ms": 1e3 * statistics.median(overhead),
        "stages_ms": {k: 1e3 * v for k, v in stages.items()},
        "stages_total_ms": 1e3 * sum(stages.values()),
        "clock_ms": {k: 1e3 * v for k, v in per_rank[0]["clock_s"].items()},
        "clock_total_ms": 1e3 * sum(per_rank[0]["clock_s"].values()),
        "score_ms": 1e3 * statistics.median(score),
        "fixed_ms": 1e3 * statistics.median(fixed),
        "collectives_per_step": sum(per_rank[0]["collective_calls"].values()),
        "collective_calls": per_rank[0]["collective_calls"],
        "cuda_syncs_per_step": per_rank[0]["cuda_syncs_per_step"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--worlds", default="1,2")
    ap.add_argument("--cases", default="16:4K,256:64K", help="queries per rank : cache rows, comma-separated")
    ap.add_argument("--out", default=str(RESULTS_DIR / "overhead.json"))
    ap.add_argument("--no-pin", dest="pin", action="store_false",
                    help="leave the ranks' threads unbound (default: each rank and its gloo threads on one core)")
    ap.add_argument("--eager-only", action="store_true", help="skip the request/response fetch rows at W > 1")
    args = ap.parse_args()
    cases = [(int(b), parse_sizes(rows)[0]) for b, rows in (c.split(":") for c in args.cases.split(","))]
    load_before = machine_info().get("loadavg_1m")
    rows = []
    for batch, rows_n in cases:
        for world in (int(w) for w in args.worlds.split(",")):
            for eager in ((True, False) if world > 1 and not args.eager_only else (True,)):
                r = run_case(world, batch, rows_n, args.repeats, eager, args.pin)
                r["fixed_vs_score"] = r["fixed_ms"] / r["score_ms"] if r["score_ms"] else float("nan")
                rows.append(r)
                print(f"W={world} B={batch} rows={rows_n} rows_by={r['rows_by']}: cache {r['cache_ms']:.2f} ms, in-batch "
                      f"{r['in_batch_ms']:.2f} ms, overhead {r['overhead_ms']:.2f} ms, "
                      f"{r['collectives_per_step']:.0f} collectives", flush=True)
    print()
    print(table(rows, ["world", "rows_by", "queries_per_rank", "cache_rows", "cache_ms", "in_batch_ms", "overhead_ms",
                       "stages_total_ms", "clock_total_ms", "score_ms", "fixed_ms", "fixed_vs_score", "collectives_per_step"],
                title="cache step vs in-batch step (medians over interleaved repeats; slowest rank per repeat)"))
    stage_rows = [{"world": r["world"], "rows_by": r["rows_by"], "B": r["queries_per_rank"], "rows": r["cache_rows"],
                   **{k: v for k, v in r["stages_ms"].items()}} for r in rows]
    print()
    print(table(stage_rows, ["world", "rows_by", "B", "rows", *rows[0]["stages_ms"]],
                title="handler stages by the profiler, ms per step (rank 0; each op pays the profiler's cost)"))
    clock_rows = [{"world": r["world"], "rows_by": r["rows_by"], "B": r["queries_per_rank"], "rows": r["cache_rows"],
                   **r["clock_ms"]} for r in rows]
    print()
    print(table(clock_rows, ["world", "rows_by", "B", "rows", *rows[0]["clock_ms"]],
                title="handler stages by the clock, ms per step (rank 0, the timed repeats)"))
    info = machine_info()
    info["loadavg_1m_before"] = load_before
    write_json(__import__("pathlib").Path(args.out), {"machine": info, "dim": DIM, "draws": DRAWS, "rows": rows})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
