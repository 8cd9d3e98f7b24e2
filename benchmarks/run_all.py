"""Every CPU benchmark in one command: the step benchmark, the scaling benchmark and the communication model.

    .venv/bin/python benchmarks/run_all.py            # full sizes, about 10 minutes on 2 idle cores
    .venv/bin/python benchmarks/run_all.py --quick    # tiny sizes, smoke test (about 4 minutes)

Writes into ``benchmarks/results/`` (or ``--out-dir``): ``step.json``/``step.png`` (bench_step.py),
``scaling.json``, ``scaling_weak.png``, ``scaling_strong.png``, ``scaling_bytes.png`` (bench_scaling.py),
``comm_model.json``/``comm_model.png``/``comm_model_two_level.png`` (comm_model.py), ``two_level.json``
(bench_two_level.py), and ``run_all.json`` (commands, exit codes, times).
Each script runs in its own interpreter; the tables they print are repeated here.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from _common import RESULTS_DIR, machine_info, write_json

HERE = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    ap.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    ap.add_argument("--skip", default="", help="comma-separated: step,scaling,two_level")
    args = ap.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    quick = ["--quick"] if args.quick else []
    jobs = [
        ("step", [sys.executable, str(HERE / "bench_step.py"), *quick, "--out", str(args.out_dir / "step.json")]),
        ("scaling", [sys.executable, str(HERE / "bench_scaling.py"), *quick, "--out-dir", str(args.out_dir)]),
        ("two_level", [sys.executable, str(HERE / "bench_two_level.py"), *quick, "--out-dir", str(args.out_dir)]),
    ]
    record = {"machine": machine_info(), "quick": args.quick, "jobs": []}
    t_all = time.perf_counter()
    rc_all = 0
    for name, cmd in jobs:
        if name in skip:
            continue
        print(f"=== {name}: {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd)
        dt = time.perf_counter() - t0
        print(f"=== {name}: exit {rc} after {dt:.0f} s", flush=True)
        record["jobs"].append({"name": name, "cmd": cmd, "returncode": rc, "seconds": dt})
        rc_all = rc_all or rc
    record["seconds"] = time.perf_counter() - t_all
    record["machine"]["loadavg_1m_end"] = machine_info().get("loadavg_1m")
    write_json(args.out_dir / "run_all.json", record)
    print(f"run_all: {'ok' if rc_all == 0 else 'FAILED'} in {record['seconds']:.0f} s; results in {args.out_dir}")
    return rc_all


if __name__ == "__main__":
    sys.exit(main())
