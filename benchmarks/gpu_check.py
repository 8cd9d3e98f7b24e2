"""One-GPU check of the engine: tests, a CUDA-vs-CPU equivalence check, and the single-rank benchmark at
card-filling sizes. Needs only torch (with CUDA); pytest is used when installed. Finishes in < 8 minutes.

Steps (each one reports and the script goes on, so one failure does not hide the rest):

1. environment: torch / CUDA versions, the device, free memory; ``import sharded_negcache`` must not
   import torchrec or fbgemm (checked in a fresh interpreter);
2. the engine's tests (``pytest tests -m "not slow"``, CPU tensors and gloo, which work on a GPU box)
   under a time limit; skipped with a message when pytest is not installed;
3. CUDA equivalence: one step of the same handler, cache and batch on CPU and on CUDA (fp32 codec):
   same log-partition, losses and (nearly all) sampled rows; then one bf16-codec step on CUDA;
4. benchmark on CUDA, ``embedding_codec='bf16'``, d=768, the largest cache of at most ``--max-rows``
   rows that fits in ``--mem-fraction`` of the free memory (8M rows x 768 bf16 = 12 GiB), global batch
   B = 512 ... 4096: handler step time (cheap document tower), the bare bf16 product and the bare fp32
   product of the same shapes (chunked: a full [B, rows] output does not fit), extra peak memory, and a
   ``chunk_bytes`` sweep. Configurations that would overrun the time budget are skipped (reported);
5. the fused Triton scan (``gpu_check_kernel.py``), bf16 and int8 rows, 4M x 768, B = 512 and 4096: its
   pass criteria (self-check trusted the kernel, agreement with torch, kernel time within 2x of the
   roofline) count towards the verdict. In a dry run on CPU it runs in triton's interpreter at tiny sizes
   (timings meaningless, not judged).

The short table is printed last. JSON goes to ``$OUT/gpu_check.json`` when ``OUT`` is set, else to
``benchmarks/results/gpu_check.json`` (or ``--out``).

Usage (GPU box):  ``bash benchmarks/gpu_check.sh``   (= ``python benchmarks/gpu_check.py``)
Dry run (CPU, tiny sizes, pytest --collect-only): ``PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh --dry-run``
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

try:
    import torch  # noqa: E402
except ImportError:
    print(f"gpu_check: this Python ({sys.executable}) has no torch; run it with a Python that has torch "
          "(e.g. PYTHON=/path/to/python bash benchmarks/gpu_check.sh)", file=sys.stderr)
    sys.exit(2)

from _common import MB, CheapTower, make_batch, make_handler, synthetic_rows, table, write_json  # noqa: E402

GiB = 1 << 30


class Budget:
    """Wall-clock budget of the whole script."""

    def __init__(self, seconds: float) -> None:
        self.start, self.seconds = time.monotonic(), seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# 1. environment
# ---------------------------------------------------------------------------------------------
def environment(device: str) -> dict:
    env = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda_build": torch.version.cuda,
           "cuda_available": torch.cuda.is_available(), "device": device}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info()
        env.update(gpu=props.name, gpu_total_gib=total / GiB, gpu_free_gib=free / GiB,
                   capability=f"{props.major}.{props.minor}", bf16_supported=torch.cuda.is_bf16_supported(),
                   tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    code = ("import sys, sharded_negcache; "
            "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in ('torchrec', 'fbgemm_gpu', 'fbgemm'))))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": _pythonpath()}, timeout=120)
    env["import_ok"] = proc.returncode == 0
    env["import_pulls_in"] = proc.stdout.strip() if proc.returncode == 0 else proc.stderr.strip()[-500:]
    env["core_imports_only_torch"] = proc.returncode == 0 and not proc.stdout.strip()
    env["torchrec_installed"] = importlib.util.find_spec("torchrec") is not None
    env["fbgemm_installed"] = importlib.util.find_spec("fbgemm_gpu") is not None
    return env


def _pythonpath() -> str:
    old = os.environ.get("PYTHONPATH")
    return str(ROOT) + (os.pathsep + old if old else "")


# ---------------------------------------------------------------------------------------------
# 2. tests
# ---------------------------------------------------------------------------------------------
def run_tests(timeout: float, dry_run: bool, extra: list[str]) -> dict:
    if importlib.util.find_spec("pytest") is None:
        msg = "pytest is not installed here: test suite skipped (install pytest, or carry its wheel)"
        log(msg)
        return {"status": "skipped", "reason": msg}
    cmd = [sys.executable, "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider", "-m", "not slow",
           "--continue-on-collection-errors", *extra]
    if dry_run:
        cmd.append("--collect-only")
    log(f"tests: {' '.join(cmd[2:])} (limit {timeout:.0f} s)")
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONPATH": _pythonpath()})
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"")
        out = out.decode() if isinstance(out, bytes) else out
        log(f"tests: time limit of {timeout:.0f} s reached")
        return {"status": "timeout", "seconds": time.monotonic() - t0, "tail": out[-2000:]}
    tail = (proc.stdout + proc.stderr).strip().splitlines()
    summary = tail[-1] if tail else ""
    status = "ok" if proc.returncode == 0 else ("no tests" if proc.returncode == 5 else "failed")
    log(f"tests: {status}: {summary}")
    return {"status": status, "returncode": proc.returncode, "summary": summary,
            "seconds": time.monotonic() - t0, "tail": "\n".join(tail[-40:])}


# ---------------------------------------------------------------------------------------------
# 3. equivalence CPU vs CUDA
# ---------------------------------------------------------------------------------------------
def equivalence(device: str, rows: int, dim: int, batch: int) -> dict:
    feat = 16
    out = {}
    res = {}
    for dev in ("cpu", device):
        torch.manual_seed(0)
        tower = CheapTower(feat, dim, device=dev)
        h = make_handler(rows, dim, feat, device=dev, seed=3, num_negatives=4)
        h.load_global_rows(synthetic_rows(0, rows, dim, feat))
        q, p, data = make_batch(batch, dim, CheapTower(feat, dim), seed=5)
        q, p = q.detach().to(dev).requires_grad_(True), p.to(dev)
        data = {k: v.to(dev) for k, v in data.items()}
        loss = h.update_cache_and_compute_loss(tower, q, p, data)
        loss.backward()
        r = h.last_step
        res[dev] = {"loss": float(loss.detach()), "lse": r.lse.cpu(), "rows": r.sampled_rows.cpu(),
                    "training": r.training_loss.cpu(), "qgrad": q.grad.cpu()}
    a, b = res["cpu"], res[device]
    out["lse_max_abs_diff"] = float((a["lse"] - b["lse"]).abs().max())
    same = (a["rows"] == b["rows"]).all(1)  # a query whose draw flipped on a near-tie has another negative
    out["training_max_abs_diff"] = float((a["training"] - b["training"])[same].abs().max()) if same.any() else 0.0
    out["qgrad_max_abs_diff"] = float((a["qgrad"] - b["qgrad"]).abs().max())
    out["sampled_rows_agree"] = float((a["rows"] == b["rows"]).float().mean())
    out["loss_cpu"], out["loss_dev"] = a["loss"], b["loss"]
    # rows can differ only where two candidates' keys tie to within float rounding
    out["ok"] = (out["lse_max_abs_diff"] < 1e-3 and out["training_max_abs_diff"] < 1e-3
                 and out["sampled_rows_agree"] >= 0.98)
    # bf16 codec on the device: a finite step
    tower = CheapTower(feat, dim, device=device)
    h = make_handler(rows, dim, feat, device=device, embedding_codec="bf16", num_negatives=4)
    h.load_global_rows(synthetic_rows(0, rows, dim, feat))
    q, p, data = make_batch(batch, dim, CheapTower(feat, dim), seed=6)
    loss = h.update_cache_and_compute_loss(tower, q.detach().to(device).requires_grad_(True), p.to(device),
                                           {k: v.to(device) for k, v in data.items()})
    out["bf16_loss_finite"] = bool(torch.isfinite(loss).item())
    out["bf16_sampled"] = int((h.last_step.sampled_rows >= 0).sum())
    out["ok"] = out["ok"] and out["bf16_loss_finite"] and out["bf16_sampled"] > 0
    return out


# ---------------------------------------------------------------------------------------------
# 4. benchmark
# ---------------------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def fill_in_place(handler, seed: int = 0, piece: int = 1 << 20) -> None:
    """Fills every row of the (device) store in place: unit-norm embeddings, features, ages, filled.

    Equivalent to ``load_global_rows`` with random rows, without a whole-cache fp32 copy (25 GiB at 8M x 768).
    """
    st = handler.store
    g = torch.Generator(device=st.device).manual_seed(seed)
    with torch.no_grad():
        for s in range(0, st.rows, piece):
            e = min(s + piece, st.rows)
            x = torch.randn(e - s, handler.schema.dim, device=st.device, generator=g)
            st.embeddings[s:e] = st.codec.encode(torch.nn.functional.normalize(x, dim=-1))
            st.feature("x")[s:e] = torch.randn(e - s, st.feature("x").shape[1], device=st.device, generator=g)
        st.age.copy_(torch.randint(0, 1000, (st.rows,), device=st.device, generator=g))
        st.filled.fill_(True)


def pick_rows(device: str, dim: int, feat: int, max_rows: int, fraction: float, min_rows: int) -> int:
    per_row = dim * 2 + feat * 4 + 8 + 1  # bf16 embedding, float features, int64 age, bool filled
    if device != "cuda":
        return min_rows
    free, _ = torch.cuda.mem_get_info()
    rows = max_rows
    while rows > min_rows and rows * per_row > fraction * free:
        rows //= 2
    return rows


def _timeit(fn, device: str, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def bare_products(q: torch.Tensor, emb: torch.Tensor, device: str, reps: int, out_bytes: int = 1 * GiB) -> dict:
    """The bare [B, d] x [d, rows] product, chunked to ``out_bytes`` of fp32 output: bf16 and fp32 (decoded)."""
    b = q.shape[0]
    chunk = max(1, out_bytes // (4 * b))
    qb, qf = q.to(emb.dtype), q.float()

    def bf16() -> None:
        for s in range(0, emb.shape[0], chunk):
            r = qb @ emb[s : s + chunk].t()
            del r

    def fp32() -> None:
        for s in range(0, emb.shape[0], chunk):
            r = qf @ emb[s : s + chunk].float().t()
            del r

    bf16()
    fp32()
    return {"bare_bf16_s": min(_timeit(bf16, device, reps)), "bare_fp32_s": min(_timeit(fp32, device, reps))}


def benchmark(device: str, args: argparse.Namespace, budget: Budget, out: dict) -> dict:
    """Fills ``out`` as it goes (so an interrupted run still reports what it measured)."""
    dim, feat = args.dim, 16
    rows = pick_rows(device, dim, feat, args.max_rows, args.mem_fraction, args.min_rows)
    log(f"benchmark: {rows:,} rows x {dim} bf16 on {device} "
        f"({rows * dim * 2 / GiB:.1f} GiB of embeddings)")
    tower = CheapTower(feat, dim, device=device)
    handler = make_handler(rows, dim, feat, device=device, embedding_codec="bf16")
    fill_in_place(handler)
    sync(device)
    from sharded_negcache.handler import DEFAULT_CHUNK_BYTES

    default_chunk = handler.chunk_bytes or DEFAULT_CHUNK_BYTES.get(torch.device(device).type, DEFAULT_CHUNK_BYTES["cpu"])
    points, skipped = [], []
    out.update({"rows": rows, "dim": dim, "codec": "bf16", "default_chunk_mb": default_chunk / MB,
                "points": points, "skipped": skipped})
    chunk_list = sorted({default_chunk, *(int(c * MB) for c in args.chunk_mb)})
    plan = [(b, default_chunk) for b in args.batches]
    plan += [(args.sweep_batch, c) for c in chunk_list if c != default_chunk]
    est_per_pair = None
    for b, chunk in plan:
        pairs = b * rows
        if est_per_pair is not None:
            projected = est_per_pair * pairs * (args.reps + 1) * 3 + 5
            if projected > budget.left() - args.reserve_s:
                skipped.append({"batch": b, "chunk_mb": chunk / MB, "projected_s": projected})
                log(f"skip B={b} chunk={chunk / MB:g}MB: projected {projected:.0f} s, {budget.left():.0f} s left")
                continue
        handler.chunk_bytes = chunk  # a plain attribute read at every step (benchmark only)
        batches = [make_batch(b, dim, CheapTower(feat, dim), seed=100 + i) for i in range(args.reps + 1)]
        batches = [(q.detach().to(device).requires_grad_(True), p.to(device), {k: v.to(device) for k, v in d.items()})
                   for q, p, d in batches]
        it = iter(batches)

        def step() -> None:
            q, p, d = next(it)
            handler.update_cache_and_compute_loss(tower, q, p, d)

        try:
            step()  # warm-up
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            times = _timeit(step, device, args.reps)
            peak_mb = (torch.cuda.max_memory_allocated() - base) / MB if device == "cuda" else float("nan")
            bare = bare_products(batches[0][0].detach(), handler.store.embeddings, device, args.reps) \
                if chunk == default_chunk else {}
        except torch.cuda.OutOfMemoryError as exc:  # type: ignore[attr-defined]
            log(f"B={b} chunk={chunk / MB:g}MB: out of memory ({exc})")
            skipped.append({"batch": b, "chunk_mb": chunk / MB, "error": "oom"})
            torch.cuda.empty_cache()
            continue
        t = min(times)
        est_per_pair = max(est_per_pair or 0.0, t / pairs)
        pt = {"batch": b, "rows": rows, "dim": dim, "chunk_mb": chunk / MB, "handler_s": t, "handler_all_s": times,
              "extra_peak_mb": peak_mb, "tflops_handler": 2 * pairs * dim / t / 1e12, **bare}
        if bare:
            pt["handler_over_bare_bf16"] = t / bare["bare_bf16_s"]
            pt["handler_over_bare_fp32"] = t / bare["bare_fp32_s"]
        points.append(pt)
        log(f"B={b} chunk={chunk / MB:g}MB: step {1e3 * t:.1f} ms" +
            (f", bare bf16 {1e3 * bare['bare_bf16_s']:.1f} ms, bare fp32 {1e3 * bare['bare_fp32_s']:.1f} ms" if bare else ""))
    return out


# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, pytest --collect-only")
    ap.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget of the whole script")
    ap.add_argument("--reserve-s", type=float, default=150.0,
                    help="kept free at the end of the benchmark for the kernel check (step 5) and the report")
    ap.add_argument("--test-timeout", type=float, default=200.0)
    ap.add_argument("--no-tests", action="store_true")
    ap.add_argument("--pytest-args", default="", help="extra pytest arguments (one string)")
    ap.add_argument("--max-rows", type=int, default=8 << 20)
    ap.add_argument("--min-rows", type=int, default=1 << 20)
    ap.add_argument("--mem-fraction", type=float, default=0.5, help="share of free GPU memory for the cache")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--batches", default="512,1024,2048,4096")
    ap.add_argument("--sweep-batch", type=int, default=2048)
    ap.add_argument("--chunk-mb", default="64,512", help="chunk_bytes sweep (MB) besides the default")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.chunk_mb = [float(c) for c in args.chunk_mb.split(",") if c]
    budget = Budget(args.budget_s)
    out_path = args.out or (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT")
                            else HERE / "results" / "gpu_check.json")

    if torch.cuda.is_available() and not args.dry_run:
        device = "cuda"
    elif args.dry_run:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":  # the kernel step runs in triton's interpreter (before triton is imported)
            os.environ.setdefault("TRITON_INTERPRET", "1")
        args.max_rows = args.min_rows = 1 << 16
        args.dim, args.batches, args.sweep_batch, args.chunk_mb, args.reps = 64, [128, 256], 256, [2.0], 2
        args.test_timeout = min(args.test_timeout, 120)
        log(f"dry run on {device}: tiny sizes, tests collected only")
    else:
        print(f"gpu_check: no CUDA device (torch {torch.__version__}, built with CUDA {torch.version.cuda}, "
              f"torch.cuda.is_available() is False). Run it on a machine with one CUDA GPU, or pass --dry-run "
              f"to exercise the script on CPU with tiny sizes.", file=sys.stderr)
        return 2

    result: dict = {"script": "gpu_check", "dry_run": args.dry_run, "budget_s": args.budget_s}
    ok = True
    try:
        result["environment"] = env = environment(device)
        log("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()))
        if not env["core_imports_only_torch"]:
            log("WARNING: importing sharded_negcache pulled in: " + env["import_pulls_in"])
            ok = False
    except Exception as exc:  # keep going: the other checks still say something
        result["environment"] = {"error": f"{type(exc).__name__}: {exc}"}
        ok = False
    if args.no_tests:
        result["tests"] = {"status": "skipped", "reason": "--no-tests"}
    else:
        limit = min(args.test_timeout, max(budget.left() - 150, 30))
        result["tests"] = run_tests(limit, args.dry_run, args.pytest_args.split())
        ok = ok and result["tests"]["status"] in ("ok", "skipped")
    try:
        log("equivalence CPU vs " + device)
        eq = equivalence(device, 1 << 15 if not args.dry_run else 1 << 12, 64, 256 if not args.dry_run else 64)
        result["equivalence"] = eq
        log(f"equivalence: {'ok' if eq['ok'] else 'MISMATCH'} ({eq})")
        ok = ok and eq["ok"]
    except Exception:
        result["equivalence"] = {"ok": False, "error": traceback.format_exc()[-2000:]}
        log("equivalence: error\n" + result["equivalence"]["error"])
        ok = False
    write_json(out_path, result)  # partial results first, in case the benchmark is cut short
    result["bench"] = {"points": []}
    try:
        benchmark(device, args, budget, result["bench"])
    except KeyboardInterrupt:  # the wrapper's time limit (SIGINT): report what was measured
        result["bench"]["interrupted"] = True
        log("benchmark: interrupted by the time limit; reporting what was measured")
        ok = False
    except Exception:
        result["bench"]["error"] = traceback.format_exc()[-2000:]
        log("benchmark: error\n" + result["bench"]["error"])
        ok = False
    try:
        import gpu_check_kernel as K

        if importlib.util.find_spec("triton") is None:
            result["kernel"] = {"status": "skipped", "reason": "triton is not installed"}
        elif budget.left() < 45:
            result["kernel"] = {"status": "skipped", "reason": f"{budget.left():.0f} s of the budget left"}
        else:
            log("fused Triton scan (bf16, int8) vs torch path vs bare bf16 product, with pass criteria")
            if args.dry_run or device != "cuda":
                kr = K.run(device, 512, 32, [0, 6], 1, "h100-sxm", ("bf16", "int8"), 64)
                kernel_ok = all(p["kernel_trusted"] and p["lse_ok"] for p in kr["points"])  # interpreter: no timing
            else:
                kr = K.run(device, 4 << 20, args.dim, [512, 4096], args.reps, "h100-sxm", ("bf16", "int8"))
                kernel_ok = kr["ok"]
            result["kernel"] = kr
            print(K.report(kr), flush=True)
            ok = ok and kernel_ok
    except Exception:
        result["kernel"] = {"error": traceback.format_exc()[-2000:]}
        log("kernel: error\n" + result["kernel"]["error"])
        ok = False
    result["device"] = result.get("environment", {}).get("gpu", device)
    result["ok"] = ok
    result["seconds"] = budget.elapsed()
    write_json(out_path, result)

    # ---- the short table, last ----
    print()
    env = result.get("environment", {})
    print(f"gpu_check on {result['device']} (torch {torch.__version__}, CUDA {torch.version.cuda}): "
          f"core imports only torch: {env.get('core_imports_only_torch')}; tests: "
          f"{result['tests'].get('status')} {result['tests'].get('summary', result['tests'].get('reason', ''))}; "
          f"CPU/CUDA equivalence: {result.get('equivalence', {}).get('ok')}")
    pts = result["bench"].get("points", [])
    if pts:
        rows = [{"B": p["batch"], "rows": f"{p['rows'] / (1 << 20):g}M", "d": p["dim"], "chunk_MB": p["chunk_mb"],
                 "step_ms": 1e3 * p["handler_s"], "bare_bf16_ms": 1e3 * p.get("bare_bf16_s", float("nan")),
                 "bare_fp32_ms": 1e3 * p.get("bare_fp32_s", float("nan")),
                 "step/bare_fp32": p.get("handler_over_bare_fp32", float("nan")),
                 "TFLOP/s": p["tflops_handler"], "extra_peak_MB": p["extra_peak_mb"]} for p in pts]
        print(table(rows, list(rows[0]), f"single-rank step, bf16 cache, {result['bench'].get('rows', 0):,} rows "
                                         f"(min of {args.reps}); JSON: {out_path}"))
    for s in result["bench"].get("skipped", []):
        print(f"skipped: {s}")
    print(f"gpu_check {'PASSED' if ok else 'FAILED'} in {result['seconds']:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
