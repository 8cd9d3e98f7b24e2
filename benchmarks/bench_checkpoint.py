"""What binding a checkpoint's files together costs: save / load time and the sha256 share of it.

One process (no torch.distributed), a cache of ``--rows`` rows (d = 128 fp32 embeddings, a 16-float
feature field), every row filled. Measured: ``save`` and ``load`` wall time, and the time to digest
the written files (what save and load add; with W ranks each digests 1/W of the files). Prints a
table and writes ``results/checkpoint.json``.

    .venv/bin/python benchmarks/bench_checkpoint.py [--rows 131072 262144] [--repeat 3] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from sharded_negcache import FieldSpec, ShardedCacheLossHandler  # noqa: E402
from sharded_negcache.checkpoint import CacheCheckpoint, file_sha256, load, save  # noqa: E402

DIM, FEAT = 128, 16


def make(rows: int, seed: int) -> ShardedCacheLossHandler:
    specs = {"x": FieldSpec((FEAT,), torch.float32), "embedding": FieldSpec((DIM,), torch.float32)}
    return ShardedCacheLossHandler(specs, rows, "embedding", ("x",), seed=seed)


def measure(rows: int, repeat: int) -> dict:
    h = make(rows, 0)
    g = torch.Generator().manual_seed(0)
    h.load_global_rows({"x": torch.randn(rows, FEAT, generator=g), "embedding": torch.randn(rows, DIM, generator=g),
                        "age": torch.randint(0, 100, (rows,), generator=g), "filled": torch.ones(rows, dtype=torch.bool)})
    best = {"save_s": float("inf"), "load_s": float("inf"), "digest_s": float("inf")}
    size = 0
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "ckpt"
            t0 = time.perf_counter()
            save({"cache": CacheCheckpoint(h)}, path)
            t1 = time.perf_counter()
            other = make(rows, 1)
            t2 = time.perf_counter()
            load({"cache": CacheCheckpoint(other)}, path)
            t3 = time.perf_counter()
            files = [f for f in path.iterdir() if f.name != "negcache_manifest.json"]
            size = sum(f.stat().st_size for f in files)
            t4 = time.perf_counter()
            for f in files:
                file_sha256(f)
            t5 = time.perf_counter()
            assert torch.equal(other.store.embeddings, h.store.embeddings)
        for key, value in (("save_s", t1 - t0), ("load_s", t3 - t2), ("digest_s", t5 - t4)):
            best[key] = min(best[key], value)
    return {"rows": rows, "bytes": size, **best, "sha256_MB_per_s": size / (1 << 20) / best["digest_s"],
            "digest_share_of_save": best["digest_s"] / best["save_s"], "digest_share_of_load": best["digest_s"] / best["load_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[131072])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = [measure(r, args.repeat) for r in args.rows]
    print(f"{'rows':>8} {'MB':>7} {'save s':>7} {'load s':>7} {'digest s':>9} {'MB/s':>6} {'% save':>7} {'% load':>7}")
    for r in results:
        print(f"{r['rows']:>8} {r['bytes'] / 2**20:>7.1f} {r['save_s']:>7.3f} {r['load_s']:>7.3f} {r['digest_s']:>9.3f} "
              f"{r['sha256_MB_per_s']:>6.0f} {100 * r['digest_share_of_save']:>6.1f}% {100 * r['digest_share_of_load']:>6.1f}%")
    args.out.mkdir(parents=True, exist_ok=True)
    cpu = platform.processor()
    if Path("/proc/cpuinfo").exists():
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    machine = f"{cpu}, {os.cpu_count()} cores, 1 torch thread, torch {torch.__version__}"
    (args.out / "checkpoint.json").write_text(json.dumps({"machine": machine, "command": " ".join(sys.argv),
                                                          "results": results}, indent=1))


if __name__ == "__main__":
    main()
