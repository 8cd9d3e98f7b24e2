"""The CPU scan kernel (``csrc/scan.cpp``): one pass per query over a score chunk that masks, reduces each
block to its log-sum-exp, runs stage 1 of the sampler and copies new winners' blocks for stage 2; and the
fused scan (:func:`fused_scan`), which does the same straight from the rows, computing each block's
scores for a group of queries in registers and reducing them while they are in L1 (no score chunk).

Why native code: on CPU the product runs at the FMA peak, and the eager block LSE (max, subtract, exp,
sum as separate passes) costs 40-70% of it; inductor's fused loop still spends ~0.5 ns per score in
its exp. The kernel's exp is the Cephes exp2f polynomial on the shifted scores (<= 0), ~0.24 ns per
score with the block maxima, and the Gumbel noise of stage 1 (a hash and two logs per query, block and
draw) moves out of a dozen int64 tensor ops per chunk into the same loop.

Built once per machine and source (``g++ -O3 -march=native -fopenmp``, ~1.3 s) into a cache directory
(``$SHARDED_NEGCACHE_CACHE_DIR``, else ``$XDG_CACHE_HOME/sharded_negcache`` or ``~/.cache/...``; where that
is not writable, ``$TMPDIR/sharded_negcache-<uid>``) under a file lock, with its SHA-256 beside it. A library
is loaded only when its bytes match that digest (a truncated file would SIGBUS at load) and, once loaded, only
when it reports this build's id (a foreign or stale library); otherwise it is rebuilt. Then it is
loaded with ctypes (the call releases the GIL; it runs on ``torch.get_num_threads()`` threads). Where no
compiler works, one warning and the torch ops run instead. ``SHARDED_NEGCACHE_NATIVE=0`` disables it;
``SHARDED_NEGCACHE_NATIVE_ARCH`` replaces ``native`` in ``-march=`` (a cluster of mixed CPUs that must
produce the same bits on every rank can build for their common subset, e.g. ``x86-64-v3``).
"""
from __future__ import annotations

import ctypes
import fcntl
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import _ctypes
import torch

__all__ = ["ENV_NATIVE", "ENV_ARCH", "enabled", "available", "ChunkMasks", "Stage1", "scan_chunk", "pack_queries", "fused_scan",
           "fused_topk", "pick", "draws", "row_lse", "gumbel", "exp_nonpositive", "build_info"]

log = logging.getLogger("sharded_negcache")

ENV_NATIVE = "SHARDED_NEGCACHE_NATIVE"
ENV_ARCH = "SHARDED_NEGCACHE_NATIVE_ARCH"  # -march= value (default native; e.g. x86-64-v3 for an AVX2 build)
SOURCE = Path(__file__).with_name("csrc") / "scan.cpp"


def _flags() -> tuple[str, ...]:
    arch = os.environ.get(ENV_ARCH, "").strip() or "native"
    return ("-O3", f"-march={arch}", "-fopenmp", "-std=c++17", "-ffp-contract=fast", "-fPIC", "-shared")


_P, _I64 = ctypes.c_void_p, ctypes.c_int64


class _Lib:
    """This process's loaded kernel: ``lib`` (None until tried), ``failed`` after a failed build or load."""

    lib: ctypes.CDLL | None = None
    failed = False
    build_s: float | None = None
    path: Path | None = None


def enabled() -> bool:
    """False where ``SHARDED_NEGCACHE_NATIVE`` turns the kernel off (0, false, off, no): an override of any request."""
    return os.environ.get(ENV_NATIVE, "").strip().lower() not in ("0", "false", "off", "no")


def _cache_dir() -> Path:
    explicit = os.environ.get("SHARDED_NEGCACHE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sharded_negcache"


def _cpu_flags() -> str:
    """The CPU's feature list: ``-march=native`` code built on one CPU must not be loaded on another."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def _build_id(compiler: str) -> tuple[str, int]:
    """(file key, build id) of the kernel this process needs: a digest of the source, the flags, the compiler's
    version and the CPU. The id is compiled into the library (``negcache_build_id``) and checked after loading."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    digest = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(_flags()), version, _cpu_flags(),
                                        platform.machine()]).encode()).hexdigest()
    return digest[:20], int(digest[:15], 16)


def _digest_file(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _intact(path: Path) -> bool:
    """The library is complete: its bytes hash to the digest written beside it once it was in place (a file
    truncated by a crash, or anything else under the kernel's name, is not; loading one could SIGBUS)."""
    try:
        return _digest_file(path).read_text().strip() == hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return False


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _compile(compiler: str, build_id: int, target: Path) -> None:
    """Compiles the kernel into ``target``, then its digest beside it, each written under a private name,
    flushed to disk and renamed into place: after a crash or power loss a reader finds the whole library and
    its digest, or a library without a matching digest, which is rebuilt."""
    tmp, tmp_digest = (target.with_name(f".{target.name}-{os.getpid()}{ext}") for ext in (".build", ".sha256"))
    try:
        proc = subprocess.run([compiler, *_flags(), f"-DNEGCACHE_BUILD_ID={build_id}ULL", str(SOURCE), "-o", str(tmp)],
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
            errors = [line for line in proc.stderr.splitlines() if "error" in line] or proc.stderr.splitlines()[-1:]
            raise RuntimeError(f"{compiler} ({version}) failed: {errors[0].strip() if errors else proc.returncode} "
                               "(the kernel needs a C++17 compiler with OpenMP and GCC vector extensions: g++ or clang)")
        _fsync(tmp)
        tmp_digest.write_text(hashlib.sha256(tmp.read_bytes()).hexdigest())
        _fsync(tmp_digest)
        os.replace(tmp, target)
        os.replace(tmp_digest, _digest_file(target))
        _fsync(target.parent)  # the renames themselves reach the disk
    finally:
        tmp.unlink(missing_ok=True)
        tmp_digest.unlink(missing_ok=True)


def _cache_dirs() -> list[Path]:
    """Where the built kernel is kept: the cache directory, then (unwritable there) a private temp directory."""
    return [_cache_dir(), Path(tempfile.gettempdir()) / f"sharded_negcache-{os.getuid()}"]


def _build(compiler: str, key: str, build_id: int, *, rebuild: bool = False) -> Path:
    """The path of a complete library of this build, compiled here if no directory holds one (or ``rebuild``).

    The build runs under a file lock: ranks of a node starting together wait for one compile. A directory
    where the lock file cannot be created (not creatable, read-only, not writable) is skipped: this is what
    finds an unwritable directory, for root as well (which ignores permission bits but not a read-only mount)."""
    problems = []
    for out_dir in _cache_dirs():
        target = out_dir / f"scan-{key}.so"
        if not rebuild and _intact(target):
            return target
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            lock = open(out_dir / f"scan-{key}.lock", "a")
        except OSError as exc:
            problems.append(f"{out_dir}: {exc.strerror or exc}")
            log.info("sharded_negcache: cannot build the kernel in %s (%s); trying the next directory", out_dir, exc)
            continue
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if rebuild or not _intact(target):  # another process may have built it while this one waited
                if target.exists():
                    log.warning("sharded_negcache: %s is damaged or not this build of the kernel; rebuilding it",
                                target)
                _compile(compiler, build_id, target)
            return target
    raise RuntimeError("no writable directory for the built kernel (" + "; ".join(problems) + ")")


def _open(path: Path, build_id: int) -> ctypes.CDLL | None:
    """The library at ``path`` loaded, or None (unloaded again) when it is not this build (no or another id)."""
    lib = ctypes.CDLL(str(path))
    try:
        lib.negcache_build_id.restype = ctypes.c_uint64
        if lib.negcache_build_id() == build_id:
            return lib
    except AttributeError:
        pass
    _ctypes.dlclose(lib._handle)
    return None


def _load() -> ctypes.CDLL | None:
    if _Lib.lib is not None or _Lib.failed:
        return _Lib.lib
    t0 = time.perf_counter()
    try:
        compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
        if compiler is None:
            raise RuntimeError("no C++ compiler (g++ or $CXX) on PATH")
        key, build_id = _build_id(compiler)
        path = _build(compiler, key, build_id)
        lib = _open(path, build_id)
        if lib is None:  # complete, but stale or foreign (its digest written with it): replace it
            path = _build(compiler, key, build_id, rebuild=True)
            lib = _open(path, build_id)
        if lib is None:
            raise RuntimeError(f"{path} does not hold this build of the kernel even after a rebuild")
    except Exception as exc:  # noqa: BLE001 - any build or load failure means: the torch ops
        _Lib.failed = True
        log.warning("sharded_negcache: the native CPU scan kernel is unavailable (%s); scoring runs the torch ops "
                    "(slower; set %s=0 to skip the attempt)", str(exc).splitlines()[0][:300], ENV_NATIVE)
        return None
    lib.negcache_scan_chunk.restype = _I64
    lib.negcache_scan_chunk.argtypes = [_P, _I64, _I64, _I64, _I64, _P, _P, _P, _P, _I64, _P, _I64, _P, _I64, _I64,
                                        _P, _P, _I64, _P, _P, ctypes.c_int]
    lib.negcache_fused_scan.restype = _I64
    lib.negcache_fused_scan.argtypes = [_P, _I64, _I64, _P, _I64, _I64, _I64, _P, _P, _P, _P, _I64, _P, _I64, _P, _I64,
                                        _I64, _P, _P, _I64, _P, _P, ctypes.c_int]
    lib.negcache_fused_topk.argtypes = [_P, _I64, _I64, _P, _I64, _I64, _I64, _P, _P, _P, _P, _I64, _I64, _P, _P, _I64,
                                        ctypes.c_int]
    lib.negcache_pack_queries.restype = _I64
    lib.negcache_pack_queries.argtypes = [_P, _I64, _I64, _P]
    lib.negcache_query_group.restype = _I64
    lib.negcache_pick.argtypes = [_P, _P, _P, _P, _I64, _I64, _P, _I64, ctypes.c_int]
    lib.negcache_row_lse.argtypes = [_P, _I64, _I64, _P, ctypes.c_int]
    lib.negcache_draws.argtypes = [ctypes.c_uint32, ctypes.c_uint32, _I64, _I64, _P, _P]
    lib.negcache_gumbel.argtypes = [_P, _I64, _P, _I64, _P]
    lib.negcache_exp_nonpositive.argtypes = [_P, _I64, _P]
    _Lib.lib, _Lib.path, _Lib.build_s = lib, path, time.perf_counter() - t0
    log.info("sharded_negcache: native CPU scan kernel ready in %.2f s (%s)", _Lib.build_s, path)
    return lib


def available(device: torch.device) -> bool:
    """True when the kernel can scan chunks on ``device`` (builds or loads it on first use)."""
    return device.type == "cpu" and enabled() and _load() is not None


def build_info() -> dict:
    """What the benchmarks record: whether it loaded, where from, and how long the first load took."""
    return {"enabled": enabled(), "loaded": _Lib.lib is not None, "failed": _Lib.failed, "load_s": _Lib.build_s,
            "path": str(_Lib.path) if _Lib.path else None}


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class ChunkMasks(NamedTuple):
    """What a chunk's scan masks: ``filled`` [n] bool (None: every row has a value), and each query's own
    positive: the rows' doc ids ``row_ids`` [n] int64, the queries' ids ``excl_sorted`` ascending (int64) and
    the query of each ``excl_query`` (all three None: nothing to exclude)."""

    filled: torch.Tensor | None = None
    row_ids: torch.Tensor | None = None
    excl_sorted: torch.Tensor | None = None
    excl_query: torch.Tensor | None = None

    def args(self) -> tuple:
        """The kernel's (filled, row_ids, excl_sorted, excl_query, n_excl) arguments."""
        for t in self:
            assert t is None or t.is_contiguous()
        n_excl = 0 if self.excl_sorted is None else self.excl_sorted.numel()
        return (*(_ptr(t) for t in self), n_excl)


class Stage1(NamedTuple):
    """The sampler's running state across a scan's chunks: draw ``keys``, ``best_key``, ``best_row`` [B, m]
    (int64, float32, int64) and, for the deferred stage 2, ``win_scores`` [B·m, block] and ``win_lse`` [B·m]
    (or None: no copies)."""

    keys: torch.Tensor
    best_key: torch.Tensor
    best_row: torch.Tensor
    win_scores: torch.Tensor | None = None
    win_lse: torch.Tensor | None = None

    def args(self, first_block: int, row0: int) -> tuple:
        """The kernel's (keys, m, first_block, best_key, best_row, row0, win_scores, win_lse) arguments."""
        for t in self:
            assert t is None or t.is_contiguous()
        m = self.keys.shape[1] if self.keys.dim() == 2 else 0
        return (self.keys.data_ptr(), m, first_block, self.best_key.data_ptr(), self.best_row.data_ptr(), row0,
                _ptr(self.win_scores), _ptr(self.win_lse))


def scan_chunk(scores: torch.Tensor, block: int, lse_out: torch.Tensor, masks: ChunkMasks, state: Stage1, *,
               first_block: int, row0: int) -> int:
    """Scans ``scores`` [B, n] in place (see ``negcache_scan_chunk`` in csrc/scan.cpp) and returns how many
    (query, draw) winners changed. ``lse_out`` is a [B, n / block] view with unit column stride (a slice of
    the step's block LSEs); the chunk's first block has global id ``first_block`` and its first row is local
    row ``row0``."""
    b, n = scores.shape
    assert scores.dtype == torch.float32 and scores.stride(1) == 1 and n % block == 0 and lse_out.stride(1) == 1
    return _Lib.lib.negcache_scan_chunk(
        scores.data_ptr(), b, n, scores.stride(0), block, *masks.args(), lse_out.data_ptr(), lse_out.stride(0),
        *state.args(first_block, row0), torch.get_num_threads())


def pack_queries(q: torch.Tensor) -> torch.Tensor:
    """Queries [b, d] (float32) in the fused scan's layout: ceil(b / G) groups of [d, G], lane = query,
    zero-padded (G: ``negcache_query_group``, two vectors of the target's width)."""
    q = q.float().contiguous()
    group = _Lib.lib.negcache_query_group()
    out = torch.empty(-(-q.shape[0] // group) * q.shape[1] * group)
    _Lib.lib.negcache_pack_queries(q.data_ptr(), q.shape[0], q.shape[1], out.data_ptr())
    return out


def _rows_args(packed: torch.Tensor, b: int, rows: torch.Tensor) -> tuple:
    """The fused kernels' (packed queries, b, d, rows, n, row stride) arguments."""
    n, d = rows.shape
    group = _Lib.lib.negcache_query_group()
    assert rows.dtype == torch.float32 and rows.stride(1) == 1 and packed.numel() == -(-b // group) * d * group
    return packed.data_ptr(), b, d, rows.data_ptr(), n, rows.stride(0)


def fused_scan(packed: torch.Tensor, b: int, rows: torch.Tensor, block: int, lse_out: torch.Tensor, masks: ChunkMasks,
               state: Stage1, *, first_block: int, row0: int) -> int:
    """:func:`scan_chunk` without a score chunk: scores the ``b`` queries of ``packed`` (:func:`pack_queries`)
    against ``rows`` [n, d] (float32, unit column stride) block by block inside the kernel (see
    ``negcache_fused_scan`` in csrc/scan.cpp). Same effects as :func:`scan_chunk`; returns how many times a
    winner improved."""
    assert rows.shape[0] % block == 0 and lse_out.stride(1) == 1
    return _Lib.lib.negcache_fused_scan(
        *_rows_args(packed, b, rows), block, *masks.args(), lse_out.data_ptr(), lse_out.stride(0),
        *state.args(first_block, row0), torch.get_num_threads())


def fused_topk(packed: torch.Tensor, b: int, rows: torch.Tensor, tile: int, best_val: torch.Tensor,
               best_row: torch.Tensor, masks: ChunkMasks, *, row0: int) -> None:
    """Folds ``rows`` [n, d] (float32, unit column stride) into each query's running top-k ``best_val`` /
    ``best_row`` [b, k] (float32 / int64, -inf / -1 where empty; left in heap order: sort after the last
    chunk), scoring ``tile`` rows at a time for the ``b`` queries of ``packed`` inside the kernel; masks as
    :func:`fused_scan`; a row enters as ``row0`` + its index; among equal values the lower row wins."""
    assert tile > 0 and best_val.is_contiguous() and best_row.is_contiguous()
    _Lib.lib.negcache_fused_topk(
        *_rows_args(packed, b, rows), tile, *masks.args(), best_val.shape[1], best_val.data_ptr(), best_row.data_ptr(),
        row0, torch.get_num_threads())


def pick(win_scores: torch.Tensor, win_lse: torch.Tensor, u: torch.Tensor, best_key: torch.Tensor,
         best_row: torch.Tensor, row_offset: int = 0) -> None:
    """Stage 2 for the final winners (``scoring.pick_in_block`` in the kernel): where ``best_key`` [P] is finite,
    adds to ``best_row`` [P] (the winning block's first row) the row inside it, plus ``row_offset`` (the shard's
    first global row); sets -1 where it is not (nothing drawn). ``win_scores`` [P, block], the rest [P]."""
    for t in (win_scores, win_lse, u, best_key, best_row):
        assert t.is_contiguous() and t.device.type == "cpu"
    pairs, bs = win_scores.shape
    _Lib.lib.negcache_pick(win_scores.data_ptr(), win_lse.data_ptr(), u.data_ptr(), best_key.data_ptr(), pairs, bs,
                           best_row.data_ptr(), row_offset, torch.get_num_threads())


def row_lse(x: torch.Tensor) -> torch.Tensor:
    """log Σ exp over each row of a float32 [rows, n] tensor (-inf for a row without candidates)."""
    x = x.contiguous()
    out = torch.empty(x.shape[0])
    _Lib.lib.negcache_row_lse(x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr(), torch.get_num_threads())
    return out


def draws(key_base: int, uniform_base: int, b: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``keyed_random.draw_keys`` of queries 0..b-1 for the stream based at ``key_base`` ([b, m] int64) and
    the uniforms of the stream based at ``uniform_base`` ([b, m] float32), in one call (bit-identical)."""
    keys, u = torch.empty((b, m), dtype=torch.int64), torch.empty((b, m))
    _Lib.lib.negcache_draws(key_base, uniform_base, b, m, keys.data_ptr(), u.data_ptr())
    return keys, u


def gumbel(keys: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """The kernel's Gumbel noise [keys, items] for int64 keys and 32-bit item ids (``keyed_random.gumbel``)."""
    keys, items = keys.reshape(-1).to(torch.int64).contiguous(), items.reshape(-1).to(torch.int64).contiguous()
    out = torch.empty(keys.numel(), items.numel())
    _Lib.lib.negcache_gumbel(keys.data_ptr(), keys.numel(), items.data_ptr(), items.numel(), out.data_ptr())
    return out


def exp_nonpositive(x: torch.Tensor) -> torch.Tensor:
    """The kernel's exp for x <= 0 (elementwise), for tests of its polynomial."""
    x = x.reshape(-1).float().contiguous()
    out = torch.empty_like(x)
    _Lib.lib.negcache_exp_nonpositive(x.data_ptr(), x.numel(), out.data_ptr())
    return out
