"""Cost of top-k mode's tie rule (the lower global row wins) on the torch path: a chunk's k best with the rule
(``scoring.chunk_top_k``: top-(k+1), ties at the k-th redone) and by a stable sort, against ``torch.topk``
(which leaves ties unspecified); and the whole top-k scan, torch path and fused C++ kernel.

One process, one thread by default; prints a table and writes ``results/topk_ties.json``.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from _common import RESULTS_DIR, make_handler, synthetic_rows


def best_of(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--ks", default="2,16,64")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from sharded_negcache.scoring import chunk_top_k, score_shard

    handler = make_handler(args.rows, args.dim, 16, device="cpu")
    handler.load_global_rows(synthetic_rows(0, args.rows, args.dim, 16))
    q = torch.randn(args.batch, args.dim, generator=torch.Generator().manual_seed(0))
    chunk = handler.chunk_rows(args.batch)
    scores = q @ handler.store.decode(0, min(chunk, args.rows)).t()
    out = []
    print(f"{args.rows} rows, B = {args.batch}, d = {args.dim}, chunk {scores.shape[1]} rows, {args.threads} thread(s)")
    print(f"{'k':>4} {'chunk topk ms':>14} {'chunk rule ms':>14} {'chunk stable sort ms':>21} {'torch scan ms':>14} "
          f"{'fused scan ms':>14}")
    for k in map(int, args.ks.split(",")):
        topk = best_of(lambda: scores.topk(k, dim=1), args.reps)
        rule = best_of(lambda: chunk_top_k(scores, k), args.reps)
        stable = best_of(lambda: scores.sort(dim=1, descending=True, stable=True), args.reps)
        scan = {be: best_of(lambda: score_shard(handler.store, handler.layout, q, handler.score_fn, num_draws=1,
                                                top_k=k, seed=0, step=0, chunk_rows=chunk, backend=be), args.reps)
                for be in ("torch", "native")}
        out.append({"k": k, "chunk_topk_s": topk, "chunk_rule_s": rule, "chunk_stable_sort_s": stable,
                    "torch_scan_s": scan["torch"], "fused_scan_s": scan["native"]})
        print(f"{k:>4} {topk * 1e3:>14.2f} {rule * 1e3:>14.2f} {stable * 1e3:>21.2f} "
              f"{scan['torch'] * 1e3:>14.2f} {scan['native'] * 1e3:>14.2f}")
    RESULTS_DIR.mkdir(exist_ok=True)
    meta = {"args": vars(args), "load_average": __import__("os").getloadavg(), "torch": torch.__version__}
    (RESULTS_DIR / "topk_ties.json").write_text(json.dumps({**meta, "rows": out}, indent=1))


if __name__ == "__main__":
    main()
