"""Corpus mode measured on one process: prefill throughput, and the step under each re-encoding choice.

The document tower is a two-layer MLP (``--feat`` → 4·dim → dim, normalised), heavy enough that its
forward and backward on the re-encoded rows are a visible part of the step, as with a transformer. Per
setting: median wall ms of ``update_cache_and_compute_loss`` + backward over ``--steps`` steps (after
one warm-up step), the tower's share (its rows and its time, timed inside the callable, backward
excluded), and prefill's documents per second. Everything runs on one thread.

Usage: ``.venv/bin/python benchmarks/bench_corpus.py [--docs 32768 --batch 64 --draws 8 --steps 8]``.
Writes ``results/corpus.json``.
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Any

import torch

from _common import RESULTS_DIR, machine_info, median, table, write_json

DIM = 128


class MLPTower(torch.nn.Module):
    """normalize(W2 · gelu(W1 · x)): a tower whose cost scales with the rows it encodes."""

    def __init__(self, feat: int, dim: int) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.net = torch.nn.Sequential(torch.nn.Linear(feat, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim))
        self.rows, self.seconds = 0, 0.0

    def forward(self, data: dict[str, torch.Tensor]) -> torch.Tensor:
        start = time.perf_counter()
        out = torch.nn.functional.normalize(self.net(data["x"]), dim=-1)
        self.rows += data["x"].shape[0]
        self.seconds += time.perf_counter() - start
        return out


def make(docs: int, feat: int, draws: int, **kw: Any):
    from sharded_negcache import FieldSpec, ShardedCacheLossHandler

    specs = {"x": FieldSpec((feat,), torch.float32), "doc_id": FieldSpec((1,), torch.int64),
             "embedding": FieldSpec((DIM,), torch.float32)}
    return ShardedCacheLossHandler(specs, docs, "embedding", ("x",), doc_id_key="doc_id", score_transform=20.0,
                                   num_negatives=draws, cache_mode="corpus", **kw)


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.docs, args.feat, generator=g)
    ids = torch.arange(args.docs, dtype=torch.int64)
    settings = [("all", 0), (0.25, 0), ("none", 0), ("none", 256), ("all", 256)]
    out = []
    for reencode, budget in settings:
        tower = MLPTower(args.feat, DIM)
        h = make(args.docs, args.feat, args.draws, reencode_negatives=reencode, refresh_budget=budget)
        start = time.perf_counter()
        h.prefill(ids, {"x": x}, tower, batch_size=512, progress=False)
        prefill_s = time.perf_counter() - start
        walls, tower_rows, tower_s = [], [], []
        for step in range(args.steps + 1):
            pick = torch.randint(0, args.docs, (args.batch,), generator=g)
            q = torch.nn.functional.normalize(torch.randn(args.batch, DIM, generator=g), dim=-1).requires_grad_(True)
            data = {"x": x[pick], "doc_id": ids[pick].view(-1, 1)}
            tower.rows, tower.seconds = 0, 0.0
            start = time.perf_counter()
            loss = h.update_cache_and_compute_loss(tower, q, tower(data), data)
            loss.backward()
            if step:  # step 0 warms up
                walls.append(time.perf_counter() - start)
                tower_rows.append(tower.rows - args.batch)
                tower_s.append(tower.seconds)
        out.append({"reencode": str(reencode), "budget": budget, "step_ms": 1e3 * median(walls),
                    "tower_rows": median(tower_rows), "tower_fwd_ms": 1e3 * median(tower_s),
                    "prefill_s": prefill_s, "prefill_docs_per_s": args.docs / prefill_s})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=32768)
    ap.add_argument("--feat", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--draws", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = measure(args)
    print(table(rows, ["reencode", "budget", "step_ms", "tower_rows", "tower_fwd_ms", "prefill_s", "prefill_docs_per_s"],
                f"corpus mode, {args.docs} docs, B={args.batch}, m={args.draws}, d={DIM}, MLP tower "
                f"{args.feat}->{4 * DIM}->{DIM}, 1 thread"))
    write_json(RESULTS_DIR / "corpus.json", {"machine": machine_info(), "load_average": os.getloadavg(),
                                             "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
