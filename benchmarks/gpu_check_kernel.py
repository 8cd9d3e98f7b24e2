"""The fused Triton scan on one GPU: kernel vs the torch path vs the bare bf16 product, and a roofline.

For each global batch B, on one shard of R rows x d (bf16 codec, fully filled), it times
  * ``triton``: ``score_shard(..., backend="triton")`` (block-LSE kernel, stage 1, stage-2 kernel);
  * ``torch``: ``score_shard(..., backend="torch")`` (decode chunk to fp32, product, block LSE, sampling);
  * ``bare bf16``: ``q @ E.T`` in bf16, chunk by chunk (scores written, then dropped),
checks that the two backends agree (block-LSE-derived ``lse`` within the kernel's stated bf16 bound,
sampled rows equal where stage 1 is not a near tie) and prints a roofline model of each path next to
the measurement, with the model's assumptions (an H100-class GPU unless ``--gpu`` says otherwise).

``--dry-run`` runs the same code on CPU at tiny sizes with triton's interpreter (``TRITON_INTERPRET=1``,
set here before triton is imported): it exercises the path, its timings mean nothing. Called by
``gpu_check.py`` (step 4) or alone: ``python benchmarks/gpu_check_kernel.py [--dry-run]``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if "--dry-run" in sys.argv[1:]:
    os.environ.setdefault("TRITON_INTERPRET", "1")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from _common import make_handler, table  # noqa: E402

# Stated GPU models (dense peaks from the vendors' data sheets; achieved is typically 70-85% of them).
GPUS = {
    "h100-sxm": {"name": "H100 SXM5 80GB", "hbm_tbs": 3.35, "bf16_tflops": 989.0, "tf32_tflops": 495.0,
                 "fp32_tflops": 67.0},
    "h200": {"name": "H200 141GB", "hbm_tbs": 4.8, "bf16_tflops": 989.0, "tf32_tflops": 495.0, "fp32_tflops": 67.0},
}


def roofline(b: int, rows: int, d: int, gpu: dict, block: int = 256, block_q: int = 64, m: int = 2) -> dict:
    """Bytes moved to/from HBM and FLOPs of one scan per path; predicted time = max(bytes / bandwidth,
    FLOPs / peak) per pass, summed over the path's passes."""
    bw = gpu["hbm_tbs"] * 1e12
    mm = 2.0 * b * rows * d
    scores = b * rows

    def t(bytes_: float, flops: float, peak_tflops: float) -> float:
        return max(bytes_ / bw, flops / (peak_tflops * 1e12))

    # bare bf16 product, chunked: rows read once, bf16 scores written once
    bare_bytes = rows * d * 2 + scores * 2
    bare = t(bare_bytes, mm, gpu["bf16_tflops"])
    # torch path: decode chunk bf16 -> fp32 (read 2, write 4 per element), fp32 product (TF32 off: the
    # library keeps exact fp32 scores), fp32 scores written (4), block LSE compiled or eager: read the
    # scores once (fused) or four passes (eager: amax, sub+exp in place = read+write, sum)
    decode = t(rows * d * 6, 0, gpu["fp32_tflops"])
    product = t(rows * d * 4 + scores * 4, mm, gpu["fp32_tflops"])
    lse_fused, lse_eager = t(scores * 4, 0, 1), t(scores * 16, 0, 1)
    torch_path = decode + product + lse_eager
    # triton: bf16 rows read once per wave of query tiles (programs of one block run together, so the
    # rows come from L2 for the other query tiles: bytes counted once), queries per program from L2,
    # only [B, rows / block] fp32 LSEs written; bf16 tensor cores
    tri_bytes = rows * d * 2 + b * d * 4 + b * (rows // block) * 4
    triton_path = t(tri_bytes, mm, gpu["bf16_tflops"])
    worst_bytes = rows * d * 2 * -(-b // block_q) + b * (rows // block) * 4  # no L2 reuse at all
    return {
        "flops": mm, "bare_bf16_bytes": bare_bytes, "triton_bytes": tri_bytes, "triton_bytes_no_l2_reuse": worst_bytes,
        "pred_bare_bf16_ms": 1e3 * bare, "pred_torch_ms": 1e3 * torch_path,
        "pred_torch_fused_lse_ms": 1e3 * (decode + product + lse_fused), "pred_triton_ms": 1e3 * triton_path,
        "pred_triton_no_l2_ms": 1e3 * t(worst_bytes, mm, gpu["bf16_tflops"]),
    }


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _best(fn, device: str, reps: int) -> float:
    fn()
    _sync(device)
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return min(out)


def run(device: str, rows: int, dim: int, batches: list[int], reps: int, gpu_key: str) -> dict:
    from sharded_negcache import triton_scan
    from sharded_negcache.scoring import score_shard

    gpu = GPUS[gpu_key]
    h = make_handler(rows, dim, 16, device=device, embedding_codec="bf16")
    g = torch.Generator(device="cpu").manual_seed(0)
    piece = 1 << 18
    for s in range(0, rows, piece):  # fill in place, unit-norm rows
        e = torch.nn.functional.normalize(torch.randn(min(piece, rows - s), dim, generator=g), dim=1)
        h.store.embeddings[s : s + e.shape[0]] = h.store.codec.encode(e.to(device))
    h.store.filled.fill_(True)
    points = []
    for b in batches:
        q = torch.nn.functional.normalize(torch.randn(b, dim, generator=g), dim=1).to(device)
        chunk = h._chunk_rows(b)
        kw = dict(num_draws=2, top_k=None, seed=1, step=0, chunk_rows=chunk)
        with torch.no_grad():
            res = {be: score_shard(h.store, h.layout, q, h.score_fn, backend=be, **kw) for be in ("torch", "triton")}
            t_tri = _best(lambda: score_shard(h.store, h.layout, q, h.score_fn, backend="triton", **kw), device, reps)
            t_torch = _best(lambda: score_shard(h.store, h.layout, q, h.score_fn, backend="torch", **kw), device, reps)
            qb, emb = q.to(torch.bfloat16), h.store.embeddings

            def bare() -> None:
                for s in range(0, rows, chunk):
                    r = qb @ emb[s : s + chunk].t()
                    del r

            t_bare = _best(bare, device, reps)
        # agreement: LSE within the stated bound (scale folded: |q| = scale, |row| = 1)
        bound = triton_scan.score_error_bound("bf16", dim) * float(h.score_fn.scale) + 1e-5
        lse_err = float((res["triton"].lse - res["torch"].lse).abs().max()) if b else 0.0
        same_rows = float((res["triton"].win_row == res["torch"].win_row).float().mean()) if b else 1.0
        from sharded_negcache import scoring

        trusted = bool(scoring._TRITON_CHECKED) and all(scoring._TRITON_CHECKED.values())  # else it ran torch
        pt = {"batch": b, "rows": rows, "dim": dim, "kernel_trusted": trusted, "triton_ms": 1e3 * t_tri, "torch_ms": 1e3 * t_torch,
              "bare_bf16_ms": 1e3 * t_bare, "triton/bare": t_tri / t_bare, "torch/bare": t_torch / t_bare,
              "lse_max_err": lse_err, "lse_bound": bound, "lse_ok": lse_err <= bound, "same_rows_frac": same_rows,
              **roofline(b, rows, dim, gpu)}
        points.append(pt)
    return {"device": device, "gpu_model": gpu, "points": points,
            "assumptions": "dense peaks, HBM bandwidth as stated; a pass costs max(bytes/BW, FLOPs/peak); the torch "
                           "path runs its product in fp32 (exact scores, TF32 off) and its block LSE eagerly on CUDA "
                           "(torch.compile is used on CPU); the kernel's rows come from HBM once per block "
                           "(L2 serves the other query tiles), the no-L2 line is the worst case"}


def report(result: dict) -> str:
    gpu = result["gpu_model"]
    rows = [{"B": p["batch"], "rows": p["rows"], "d": p["dim"], "self_check": p["kernel_trusted"],
             "triton_ms": p["triton_ms"], "torch_ms": p["torch_ms"], "bare_bf16_ms": p["bare_bf16_ms"],
             "pred_triton_ms": p["pred_triton_ms"], "pred_torch_ms": p["pred_torch_ms"],
             "pred_bare_ms": p["pred_bare_bf16_ms"], "lse_err": p["lse_max_err"], "lse_bound": p["lse_bound"],
             "same_rows": p["same_rows_frac"]} for p in result["points"]]
    head = (f"Roofline model: {gpu['name']}, HBM {gpu['hbm_tbs']} TB/s, bf16 {gpu['bf16_tflops']:g} TFLOP/s dense, "
            f"fp32 {gpu['fp32_tflops']:g} TFLOP/s; {result['assumptions']}")
    return head + "\n" + table(rows, list(rows[0]), f"fused Triton scan vs torch path vs bare bf16 product on "
                                                   f"{result['device']} (min of reps)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, triton interpreter, tiny sizes")
    ap.add_argument("--rows", type=int, default=4 << 20)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--batches", default="512,2048,4096")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--gpu", default="h100-sxm", choices=sorted(GPUS))
    args = ap.parse_args(argv)
    if args.dry_run:
        device, rows, dim, batches, reps = "cpu", 512, 32, [0, 1, 6], 1
    elif torch.cuda.is_available():
        device, rows, dim, batches, reps = "cuda", args.rows, args.dim, [int(b) for b in args.batches.split(",")], args.reps
    else:
        print("gpu_check_kernel: no CUDA device; pass --dry-run to exercise it on CPU", file=sys.stderr)
        return 2
    result = run(device, rows, dim, batches, reps, args.gpu)
    print(report(result))
    print("model at full size (no measurement):")
    print(table([{"B": b, **{k: v for k, v in roofline(b, args.rows, args.dim, GPUS[args.gpu]).items()
                             if k.startswith("pred")}} for b in (512, 2048, 4096)],
                ["B", "pred_bare_bf16_ms", "pred_torch_ms", "pred_torch_fused_lse_ms", "pred_triton_ms",
                 "pred_triton_no_l2_ms"], f"{args.rows:,} rows x {args.dim}, bf16 rows"))
    ok = all(p["lse_ok"] and (p["kernel_trusted"] or p["batch"] == 0) for p in result["points"])
    print(f"gpu_check_kernel {'PASSED' if ok else 'FAILED'} ({'dry run: timings are the interpreter' if args.dry_run else device})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
