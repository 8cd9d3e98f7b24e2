"""The two-level layout measured (issue 14): W = 4 gloo ranks as 4 groups of 1, 2 groups of 2, and flat.

Every rank holds the same ``--rows`` rows and ``--batch`` queries per step in every layout; a group
of G ranks therefore holds a cache of G x rows and each rank scores G x batch queries. Measured per
rank and step: process CPU time of ``update_cache_and_compute_loss`` + backward (4 processes on a
2-core machine are oversubscribed: wall time measures the oversubscription, CPU time the work), and
the bytes of each collective from the engine's counters. Next to them, the communication model's
prediction (``comm_model.predict_two_level`` with the scoring rate calibrated in
``results/comm_model.json``): scoring CPU time and bytes.

Usage: ``.venv/bin/python benchmarks/bench_two_level.py [--rows 65536 --batch 128 --steps 5]``.
Writes ``results/two_level.json`` (run by ``run_all.py`` after the scaling benchmark and the model).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from _common import (
    RESULTS_DIR,
    CheapTower,
    fill_local,
    machine_info,
    make_batch,
    make_handler,
    median,
    run_ranks,
    table,
    write_json,
)
from comm_model import predict_two_level

WORLD, DIM, FEAT, DRAWS = 4, 128, 16, 2
GROUPS = (1, 2, 4)


def measure(rank: int, world: int, rows: int, batch: int, steps: int) -> list[dict[str, Any]]:
    """Per layout: this rank's CPU and wall seconds per step and bytes per step by tag."""
    tower = CheapTower(FEAT, DIM)
    out = []
    for g in GROUPS:
        h = make_handler(g * rows, DIM, FEAT, num_negatives=DRAWS, shard_group_size=g, seed=0)
        fill_local(h)
        cpu, wall, sent = [], [], []
        for step in range(steps + 1):  # step 0 warms up
            q, p, data = make_batch(batch, DIM, tower, seed=1000 * step + rank)
            before = dict(h.comm.bytes_sent)
            c0, w0 = time.process_time(), time.perf_counter()
            h.update_cache_and_compute_loss(tower, q, p, data).backward()
            c1, w1 = time.process_time(), time.perf_counter()
            if step:
                cpu.append(c1 - c0)
                wall.append(w1 - w0)
                sent.append({k: v - before.get(k, 0) for k, v in h.comm.bytes_sent.items()})
        tags = sorted({k for s in sent for k in s})
        out.append({"G": g, "cpu_s": median(cpu), "wall_s": median(wall),
                    "bytes_by_tag": {k: sum(s.get(k, 0) for s in sent) / len(sent) for k in tags}})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1 << 16, help="rows per rank")
    ap.add_argument("--batch", type=int, default=128, help="queries per rank and step")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test): 8K rows, 32 queries, 2 steps")
    ap.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="reads comm_model.json, writes two_level.json")
    args = ap.parse_args()
    if args.quick:
        args.rows, args.batch, args.steps = 8192, 32, 2
    per_rank = run_ranks(WORLD, measure, args.rows, args.batch, args.steps)
    model = json.loads((args.out_dir / "comm_model.json").read_text())
    cal, bw, alpha = model["calibration"], model["bandwidth_gbs"] * 1e9, model["latency_us"] * 1e-6
    row_bytes = FEAT * 4 + DIM * 4 + 8
    rows_out = []
    for i, g in enumerate(GROUPS):
        got = [r[i] for r in per_rank]
        pred = predict_two_level(WORLD, g, args.batch, args.rows, DIM, DRAWS, row_bytes, cal["t_pair_s"],
                                 cal["local_s"], cal["byte_factors"], bw, alpha, 4, cal["t_query_s"])
        measured_bytes = median([sum(r["bytes_by_tag"].values()) for r in got])
        rows_out.append({
            "layout": "flat" if g == WORLD else f"{WORLD // g} groups of {g}", "G": g,
            "rows_per_group": g * args.rows, "queries_scored_per_rank": g * args.batch,
            "cpu_ms": 1e3 * median([r["cpu_s"] for r in got]), "wall_ms": 1e3 * median([r["wall_s"] for r in got]),
            "model_scoring_ms": 1e3 * pred["scoring_s"], "bytes_per_rank": measured_bytes,
            "model_bytes": pred["bytes_per_rank"], "bytes_by_tag_rank0": got[0]["bytes_by_tag"],
        })
    cols = ["layout", "G", "rows_per_group", "queries_scored_per_rank", "cpu_ms", "model_scoring_ms", "wall_ms",
            "bytes_per_rank", "model_bytes"]
    print(table(rows_out, cols, title=f"W = {WORLD} gloo ranks, {args.rows} rows and {args.batch} queries per rank, "
                                      f"d = {DIM}, m = {DRAWS}; median over {args.steps} steps, per rank"))
    write_json(args.out_dir / "two_level.json", {
        "config": {"world": WORLD, "rows_per_rank": args.rows, "batch_per_rank": args.batch, "steps": args.steps,
                   "dim": DIM, "feat": FEAT, "draws": DRAWS, "threads_per_rank": 1},
        "machine": machine_info(), "rows": rows_out, "per_rank": per_rank})


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
