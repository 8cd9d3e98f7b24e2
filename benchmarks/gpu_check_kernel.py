"""The fused Triton scan on one GPU, with pass criteria: kernel vs the torch path vs the bare bf16 product.

For each codec (bf16 and int8: what a GPU user picks) and global batch B, on one shard of R rows x d (fully
filled, blocks of 256), it
  * records whether the engine's self-check trusted the kernel (else every step would run torch: a FAIL);
  * compares the kernel's block LSEs over a slice with torch on the kernel's own rounded operands (only the
    summation order and exp/log may differ: within 4 d 2^-24 sum|q r| + 1e-5);
  * runs ``score_shard`` on both backends: per-query LSE within the stated bound
    (``triton_scan.score_error_bound`` x 1.05 x scale, unit-norm rows and queries), sampled rows identical in
    >= 97% of draws (rounding the queries to bf16 changes ~1% of draws: CPU emulation at 32K x 768);
  * times the block-LSE kernel alone and passes only if it is within 2x of :func:`roofline`'s prediction
    (the model of docs/design.md, Triton section: HBM, L2 and shared-memory traffic, MMA and ALU work);
  * times ``score_shard`` on both backends and the bare bf16 product, for the table.

Needs only torch with CUDA and triton (what torch 2.11 wheels install); nothing is downloaded; ~10 GB of GPU
memory at the default 4M x 768. ``--dry-run`` runs the same code on CPU at tiny sizes in triton's interpreter
(``TRITON_INTERPRET=1``, set before triton is imported): it exercises the path and the agreement criteria,
its timings mean nothing. Called by ``gpu_check.py`` (step 5) or alone:
``python benchmarks/gpu_check_kernel.py [--dry-run]``.
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

# Stated GPU models: dense peaks from the vendors' data sheets; L2 bandwidth is no vendor figure (microbenchmarks
# report 5.5-7.3 TB/s on H100): 7 TB/s is assumed. Shared memory: 128 B/clock/SM; MUFU: 16 ex2/clock/SM; FP32:
# 128 lanes/clock/SM; the clock is the one the bf16 peak is quoted at.
GPUS = {
    "h100-sxm": {"name": "H100 SXM5 80GB", "hbm_tbs": 3.35, "l2_tbs": 7.0, "bf16_tflops": 989.0, "fp32_tflops": 67.0,
                 "sms": 132, "clock_ghz": 1.83},
    "h200": {"name": "H200 141GB", "hbm_tbs": 4.8, "l2_tbs": 7.0, "bf16_tflops": 989.0, "fp32_tflops": 67.0,
             "sms": 132, "clock_ghz": 1.83},
}
ROW_BYTES = {"fp32": lambda d: 4 * d, "bf16": lambda d: 2 * d, "fp16": lambda d: 2 * d, "int8": lambda d: d + 8,
             "int4": lambda d: d // 2 + 4}
# pass criteria
TIME_FACTOR = 2.0  # block-LSE kernel time <= 2 x the roofline's prediction
SAME_ROWS = 0.97  # sampled rows identical to the torch path's in >= 97% of draws: rounding the queries (and
# int8 rows) to bf16 changes ~1% of draws on CPU emulation (32K x 768 rows, B = 256, m = 4: 99.0% identical)
EXACT_OPERANDS_ULPS = 4  # block LSEs vs torch on the kernel's own rounded operands: 4 d 2^-24 sum|q r| + 1e-5


def roofline(b: int, rows: int, d: int, codec: str, bs: int, gpu: dict) -> dict:
    """The block-LSE kernel's traffic and time on paper (docs/design.md, Triton section). A program keeps its
    BLOCK_Q x d query tile on chip and streams a slab of row tiles; per pass: bytes from HBM (rows once, as the
    programs in flight share a slab), bytes from L2 (rows once per query tile, queries once per program, LSEs),
    shared-memory bytes (per (query tile, row tile): the MMA reads both tiles, the row tile is written once),
    MMA FLOPs (padded tiles), and ALU work that does not overlap the MMA here (one warpgroup per SM): exp per
    score on the MUFU, int8/int4 decode (3 FP32 ops per element per query tile). Predicted time =
    max(FLOPs / peak, HBM / BW, L2 / BW_L2, SMEM / BW_SMEM) + ALU."""
    from sharded_negcache import triton_scan as T

    t = T.tiles(codec, d, bs)
    da, db = T.depth_split(d)
    cb = 4 if codec == "fp32" else 2
    n_qt, blocks = -(-b // t.block_q), rows // bs
    per_prog = -(-blocks // max(1, min(blocks, -(-T.PROGRAMS_TARGET // n_qt))))
    programs = n_qt * -(-blocks // per_prog)
    rb = ROW_BYTES[codec](d)
    q_bytes, lse_bytes = programs * t.block_q * d * cb, b * blocks * 4
    hbm = rows * rb + q_bytes + lse_bytes
    l2 = n_qt * rows * rb + q_bytes + lse_bytes
    smem = n_qt * (rows / t.block_r) * (t.block_q + 2 * t.block_r) * d * cb
    flops = 2.0 * n_qt * t.block_q * rows * (da + db)
    clock = gpu["clock_ghz"] * 1e9
    peak = (gpu["fp32_tflops"] if codec == "fp32" else gpu["bf16_tflops"]) * 1e12
    exp_s = n_qt * t.block_q * rows / (16 * gpu["sms"] * clock)
    decode_s = (3.0 * n_qt * rows * d / (128 * gpu["sms"] * clock)) if codec in ("int8", "int4") else 0.0
    terms = {"mma_ms": 1e3 * flops / peak, "hbm_ms": 1e3 * hbm / (gpu["hbm_tbs"] * 1e12),
             "l2_ms": 1e3 * l2 / (gpu["l2_tbs"] * 1e12), "smem_ms": 1e3 * smem / (128 * gpu["sms"] * clock)}
    return {"tiles": f"{t.block_q}x{t.block_r}", "hbm_gb": hbm / 1e9, "l2_gb": l2 / 1e9, "smem_gb": smem / 1e9,
            **terms, "alu_ms": 1e3 * (exp_s + decode_s), "floor_ms": 1e3 * 2.0 * b * rows * d / peak,
            "pred_ms": max(terms.values()) + 1e3 * (exp_s + decode_s)}


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


def _exact_operand_check(q: torch.Tensor, h, codec: str, bs: int, n_rows: int) -> tuple[float, float]:
    """(max error, tolerance) of the kernel's block LSEs over the first ``n_rows`` rows against torch on the
    kernel's own operands (queries rounded to the compute dtype, rows decoded and, for int8/int4, rounded to
    bf16): only the summation order and exp/log differ."""
    from sharded_negcache import triton_scan

    st, dim = h.store, h.store.dim
    rows = triton_scan.StoredRows.of(st.embeddings[:n_rows], codec, dim, st.filled[:n_rows], None)
    got = triton_scan.block_lse(q, rows, bs, None)
    qc = triton_scan.prepare_queries(q, codec).float()
    dec = st.decode(0, n_rows).to(triton_scan.COMPUTE_DTYPE[codec]).float()
    want = torch.logsumexp((qc @ dec.t()).view(q.shape[0], -1, bs), dim=-1)
    mag = (qc.abs() @ dec.abs().t()).view(q.shape[0], -1, bs).amax(-1)
    tol = EXACT_OPERANDS_ULPS * dim * 2.0**-24 * mag + 1e-5
    return float((got - want).abs().max()), float(tol.min()) if bool(((got - want).abs() <= tol).all()) else -1.0


def run(device: str, rows: int, dim: int, batches: list[int], reps: int, gpu_key: str,
        codecs: tuple[str, ...] = ("bf16", "int8"), bs: int = 256) -> dict:
    """Per codec and batch: the self-check's verdict, the kernel against torch (exact operands on a slice, then
    the whole scan: LSE within the stated bound, sampled rows), the block-LSE kernel's time against the
    roofline, and score_shard's time on both backends next to the bare bf16 product."""
    from sharded_negcache import triton_scan
    from sharded_negcache.scoring import score_shard

    gpu = GPUS[gpu_key]
    points = []
    for codec in codecs:
        h = make_handler(rows, dim, 16, device=device, embedding_codec=codec, block_size=bs)
        g = torch.Generator(device=device).manual_seed(0)
        piece = 1 << 18
        for s in range(0, rows, piece):  # fill in place, unit-norm rows, generated on the device
            e = torch.nn.functional.normalize(torch.randn(min(piece, rows - s), dim, generator=g, device=device), dim=1)
            h.store.embeddings[s : s + e.shape[0]] = h.store.codec.encode(e)
        h.store.filled.fill_(True)
        for b in batches:
            q = torch.nn.functional.normalize(torch.randn(b, dim, generator=g, device=device), dim=1)
            chunk = h.chunk_rows(b)
            kw = dict(num_draws=2, top_k=None, seed=1, step=0, chunk_rows=chunk)
            with torch.no_grad():
                scan = {be: (lambda be=be, h=h: score_shard(h.store, h.layout, q, h.score_fn, backend=be, **kw))
                        for be in ("torch", "triton")}
                res = {be: fn() for be, fn in scan.items()}
                trusted = triton_scan.TRUSTED.get((str(q.device), codec, dim, bs), False)
                qs = h.score_fn.prepare_queries(q)
                st = triton_scan.StoredRows.of(h.store.embeddings, codec, dim, h.store.filled, None)
                t_kernel = _best(lambda: triton_scan.block_lse(qs, st, bs, None), device, reps) if b else 0.0
                t_tri, t_torch = _best(scan["triton"], device, reps), _best(scan["torch"], device, reps)
                qb, emb = q.to(torch.bfloat16), h.store.decode(0, min(rows, chunk)).to(torch.bfloat16)

                def bare() -> None:
                    for _ in range(0, rows, emb.shape[0]):
                        r = qb @ emb.t()
                        del r

                t_bare = _best(bare, device, reps)
                exact_err, exact_tol = _exact_operand_check(qs, h, codec, bs, min(rows, 64 * bs)) if b else (0.0, 1.0)
            # unit-norm rows (int8: within its rounding) and queries of norm = the scale: sum |q r| <= 1.05 scale
            bound = triton_scan.score_error_bound(codec, dim) * 1.05 * float(h.score_fn.scale) + 1e-5
            lse_err = float((res["triton"].lse - res["torch"].lse).abs().max()) if b else 0.0
            same_rows = float((res["triton"].win_row == res["torch"].win_row).float().mean()) if b else 1.0
            model = roofline(b, rows, dim, codec, bs, gpu) if b else {"pred_ms": 0.0}
            pt = {"codec": codec, "batch": b, "rows": rows, "dim": dim, "kernel_trusted": bool(trusted) or b == 0,
                  "kernel_ms": 1e3 * t_kernel, "triton_ms": 1e3 * t_tri, "torch_ms": 1e3 * t_torch,
                  "bare_bf16_ms": 1e3 * t_bare, "exact_err": exact_err, "exact_tol": exact_tol,
                  "exact_ok": exact_tol >= 0, "lse_max_err": lse_err, "lse_bound": bound, "lse_ok": lse_err <= bound,
                  "same_rows_frac": same_rows, "rows_ok": same_rows >= SAME_ROWS,
                  "time_ok": b == 0 or 1e3 * t_kernel <= TIME_FACTOR * model["pred_ms"], **model}
            pt["ok"] = all(pt[k] for k in ("kernel_trusted", "exact_ok", "lse_ok", "rows_ok", "time_ok"))
            points.append(pt)
        del h
        if device == "cuda":
            torch.cuda.empty_cache()
    return {"device": device, "gpu_model": gpu, "points": points, "ok": all(p["ok"] for p in points),
            "criteria": f"per codec and batch: the self-check trusted the kernel (no fallback); block LSEs on the "
                        f"kernel's own rounded operands within {EXACT_OPERANDS_ULPS} d 2^-24 sum|q r| + 1e-5; "
                        f"per-query LSE within the stated bound; sampled rows identical in >= {SAME_ROWS:.0%} of "
                        f"draws; block-LSE kernel time <= {TIME_FACTOR:g} x the roofline prediction"}


def report(result: dict) -> str:
    gpu = result["gpu_model"]
    rows = [{"codec": p["codec"], "B": p["batch"], "rows": p["rows"], "d": p["dim"], "trusted": p["kernel_trusted"],
             "kernel_ms": p["kernel_ms"], "pred_ms": p["pred_ms"], "floor_ms": p.get("floor_ms", 0.0),
             "triton_ms": p["triton_ms"], "torch_ms": p["torch_ms"], "bare_bf16_ms": p["bare_bf16_ms"],
             "exact_err": p["exact_err"], "lse_err": p["lse_max_err"], "lse_bound": p["lse_bound"],
             "same_rows": p["same_rows_frac"], "ok": p["ok"]} for p in result["points"]]
    head = (f"Roofline model: {gpu['name']}, HBM {gpu['hbm_tbs']} TB/s, L2 {gpu['l2_tbs']} TB/s (assumed), bf16 "
            f"{gpu['bf16_tflops']:g} TFLOP/s dense, {gpu['sms']} SMs at {gpu['clock_ghz']} GHz. "
            f"Criteria: {result['criteria']}")
    return head + "\n" + table(rows, list(rows[0]), f"fused Triton scan vs torch path vs bare bf16 product on "
                                                    f"{result['device']} (min of reps)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, triton interpreter, tiny sizes")
    ap.add_argument("--rows", type=int, default=4 << 20)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--batches", default="512,4096")
    ap.add_argument("--codecs", default="bf16,int8")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--gpu", default="h100-sxm", choices=sorted(GPUS))
    args = ap.parse_args(argv)
    codecs = tuple(args.codecs.split(","))
    if args.dry_run:
        device, rows, dim, batches, reps, bs = "cpu", 512, 32, [0, 6], 1, 64
    elif torch.cuda.is_available():
        batches = [int(b) for b in args.batches.split(",")]
        device, rows, dim, reps, bs = "cuda", args.rows, args.dim, args.reps, 256
    else:
        print("gpu_check_kernel: no CUDA device; pass --dry-run to exercise it on CPU", file=sys.stderr)
        return 2
    result = run(device, rows, dim, batches, reps, args.gpu, codecs, bs)
    print(report(result))
    print("model at full size (no measurement):")
    print(table([{"codec": c, "B": b, **roofline(b, args.rows, args.dim, c, 256, GPUS[args.gpu])}
                 for c in codecs for b in (512, 4096)],
                ["codec", "B", "tiles", "hbm_gb", "l2_gb", "smem_gb", "mma_ms", "hbm_ms", "l2_ms", "smem_ms", "alu_ms",
                 "floor_ms", "pred_ms"], f"{args.rows:,} rows x {args.dim}"))
    # the interpreter truncates fp32 -> bf16 (the GPU rounds to nearest): a dry run checks trust and the stated bound
    ok = result["ok"] or args.dry_run and all(p["kernel_trusted"] and p["lse_ok"] for p in result["points"])
    what = "dry run: timings are the interpreter, only the self-check and the stated bound count" \
        if args.dry_run else device
    print(f"gpu_check_kernel {'PASSED' if ok else 'FAILED'} ({what})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
