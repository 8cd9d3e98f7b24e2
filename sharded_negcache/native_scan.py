"""The CPU scan kernel (``csrc/scan.cpp``): one pass per query over a score chunk that masks, reduces each
block to its log-sum-exp, runs stage 1 of the sampler and copies new winners' blocks for stage 2; and the
fused scan (:func:`fused_scan`), which does the same straight from the rows, computing each block's
scores for a group of queries in registers and reducing them while they are in L1 (no score chunk).

Why native code: on CPU the product runs at the FMA peak, and the eager block LSE (max, subtract, exp,
sum as separate passes) and inductor's fused loop (its exp) cost a large share of it
(benchmarks/results/cpu_scan.md). The kernel's exp is the Cephes exp2f polynomial on the shifted scores (<= 0),
and the Gumbel noise of stage 1 (a hash and two logs per query, block and draw) moves out of a dozen int64
tensor ops per chunk into the same loop.

Built like a library, not inside a step: :func:`load` (called when the CPU backend is resolved, by
:func:`available`, or by ``python -m sharded_negcache.build``) compiles it once per machine, source and
compiler (``$CXX`` else ``g++``: GCC >= 9 or clang; ``-O3 -march=native -fopenmp``) into a cache directory
(:func:`cache_dirs`) under a file lock, writes it and its SHA-256 under private names, fsyncs and renames
them into place. A library is loaded only when its bytes match that digest (a truncated file would SIGBUS
at load) and, once loaded, only when it reports this build's id (a foreign or stale library); otherwise it
is rebuilt. It is called through ctypes (the call releases the GIL; it runs on ``torch.get_num_threads()``
threads) by the wrappers below, which check every argument (dtype, shape, strides, device: TypeError or
ValueError naming it) before a pointer reaches the kernel: a wrong one would corrupt memory, not raise.
(Plain checked functions rather than ``torch.library`` custom ops: the kernel is CPU-only, runs under
no_grad outside any compiled graph, mutates its state in place and returns Python ints, so the dispatcher
would add per-call cost and fake/autograd registrations nothing uses; a torch C++ extension would tie the
build to torch's headers and ABI and take far longer to compile.)
Where no compiler works, one warning names the compiler, its version, the reason and the fix, and the
torch ops run instead; :func:`build_info` reports what was built and loaded, or why not.
``SHARDED_NEGCACHE_NATIVE=0`` disables it; ``SHARDED_NEGCACHE_NATIVE_ARCH`` replaces ``native`` in
``-march=`` (a cluster of mixed CPUs that must produce the same bits on every rank can build for their
common subset, e.g. ``x86-64-v3``).
"""
from __future__ import annotations

import _ctypes
import ctypes
import fcntl
import hashlib
import logging
import operator
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

__all__ = ["ENV_NATIVE", "ENV_ARCH", "ENV_CACHE_DIR", "GCC_MIN", "SIGNATURES", "BuildError", "enabled", "available",
           "load", "build_info", "cache_dirs", "cpu_flags", "ChunkMasks", "Stage1", "scan_chunk", "pack_queries",
           "fused_scan", "fused_topk", "pick", "draws", "row_lse", "gumbel", "exp_nonpositive"]

log = logging.getLogger("sharded_negcache")

ENV_NATIVE = "SHARDED_NEGCACHE_NATIVE"
ENV_ARCH = "SHARDED_NEGCACHE_NATIVE_ARCH"  # -march= value (default native; e.g. x86-64-v3 for an AVX2 build)
ENV_CACHE_DIR = "SHARDED_NEGCACHE_CACHE_DIR"
SOURCE = Path(__file__).with_name("csrc") / "scan.cpp"
GCC_MIN = 9  # __builtin_convertvector (GCC 9); C++17; the lane shuffles use __builtin_shuffle (any GCC)
_COMPILE_TIMEOUT_S = 300

# The kernel's entry points: (result type, [(parameter, ctypes type), ...]) in the order of their declarations
# in csrc/scan.cpp (tests/test_native_scan.py parses the source and compares names and types). The wrappers
# pass arguments by these names (_call), so no call site depends on a position.
_P, _I64, _INT, _U32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_uint32
_MASKS = [("filled", _P), ("row_ids", _P), ("excl_sorted", _P), ("excl_query", _P), ("n_excl", _I64)]
_STAGE1 = [("keys", _P), ("m", _I64), ("first_block", _I64), ("best_key", _P), ("best_row", _P), ("row0", _I64),
           ("win_scores", _P), ("win_lse", _P)]
_FUSED_ROWS = [("qp", _P), ("b", _I64), ("d", _I64), ("rows", _P), ("n", _I64), ("ld", _I64)]
SIGNATURES: dict[str, tuple[Any, list[tuple[str, Any]]]] = {
    "negcache_scan_chunk": (_I64, [("s", _P), ("b", _I64), ("n", _I64), ("ld", _I64), ("bs", _I64), *_MASKS,
                                   ("lse_out", _P), ("ld_lse", _I64), *_STAGE1, ("nthreads", _INT)]),
    "negcache_fused_scan": (_I64, [*_FUSED_ROWS, ("bs", _I64), *_MASKS, ("lse_out", _P), ("ld_lse", _I64), *_STAGE1,
                                   ("nthreads", _INT)]),
    "negcache_fused_topk": (None, [*_FUSED_ROWS, ("tile", _I64), *_MASKS, ("k", _I64), ("best_val", _P),
                                   ("best_row", _P), ("row0", _I64), ("nthreads", _INT)]),
    "negcache_pack_queries": (_I64, [("q", _P), ("b", _I64), ("d", _I64), ("out", _P)]),
    "negcache_check_exclusions": (_I64, [("excl_sorted", _P), ("excl_query", _P), ("n_excl", _I64), ("b", _I64)]),
    "negcache_query_group": (_I64, []),
    "negcache_variant": (ctypes.c_char_p, []),
    "negcache_build_id": (ctypes.c_uint64, []),
    "negcache_pick": (None, [("win_scores", _P), ("win_lse", _P), ("u", _P), ("best_key", _P), ("pairs", _I64),
                             ("bs", _I64), ("best_row", _P), ("row_offset", _I64), ("nthreads", _INT)]),
    "negcache_row_lse": (None, [("x", _P), ("rows", _I64), ("n", _I64), ("out", _P), ("nthreads", _INT)]),
    "negcache_draws": (None, [("key_base", _U32), ("uniform_base", _U32), ("b", _I64), ("m", _I64), ("keys", _P),
                              ("u", _P)]),
    "negcache_gumbel": (None, [("keys", _P), ("n_keys", _I64), ("items", _P), ("n_items", _I64), ("out", _P)]),
    "negcache_exp_nonpositive": (None, [("x", _P), ("n", _I64), ("out", _P)]),
}
_PARAMETERS = {fn: tuple(name for name, _ in params) for fn, (_, params) in SIGNATURES.items()}


# ---- build and load -----------------------------------------------------------------------------------
class BuildError(RuntimeError):
    """The kernel cannot be built or loaded here: which compiler (path and version line), why, and the fix."""

    def __init__(self, compiler: Compiler | None, reason: str, fix: str) -> None:
        self.compiler, self.reason, self.fix = compiler, reason, fix
        who = f"{compiler.path} ({compiler.version})" if compiler else "no compiler"
        super().__init__(f"{who}: {reason}. Fix: {fix}")


@dataclass(frozen=True)
class Compiler:
    """The C++ compiler a build uses: its path, the first line of ``--version``, family and major version."""

    path: str
    version: str
    family: str  # "gcc", "clang" or "unknown"
    major: int | None
    version_text: str  # all of --version (part of the build id)


def _compiler() -> Compiler:
    """``$CXX``, else g++, else c++, with its version checked: GCC >= GCC_MIN (clang: tried as it is)."""
    name = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not name:
        raise BuildError(None, "no C++ compiler: no g++ or c++ on PATH and CXX is not set",
                         f"install g++ (GCC >= {GCC_MIN}, e.g. apt-get install g++) or set CXX to a C++17 compiler")
    path = shutil.which(name) or name
    try:
        text = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise BuildError(None, f"the compiler {name!r} cannot be run ({exc})",
                         f"set CXX to an installed C++17 compiler (GCC >= {GCC_MIN}) or install g++") from None
    first = text.strip().splitlines()[0] if text.strip() else "version unknown"
    if "clang" in text.lower():
        family, found = "clang", re.search(r"version (\d+)\.", text)
    elif re.search(r"(?<![\w+])(g\+\+|gcc|GCC)(?![\w+])", first) or "Free Software Foundation" in text:
        family, found = "gcc", (re.findall(r"(\d+)\.\d+(?:\.\d+)?", first) or [None])[-1]
    else:
        family, found = "unknown", None
    major = int(found.group(1) if isinstance(found, re.Match) else found) if found else None
    compiler = Compiler(path, first, family, major, text)
    if family == "gcc" and major is not None and major < GCC_MIN:
        need = f"GCC {major} is too old: the kernel needs GCC >= {GCC_MIN} (C++17 with __builtin_convertvector)"
        raise BuildError(compiler, need, f"install g++ {GCC_MIN} or newer and set CXX to it (e.g. CXX=g++-12)")
    return compiler


def _flags() -> tuple[str, ...]:
    arch = os.environ.get(ENV_ARCH, "").strip() or "native"
    return ("-O3", f"-march={arch}", "-fopenmp", "-std=c++17", "-ffp-contract=fast", "-fPIC", "-shared")


def cache_dirs() -> list[Path]:
    """Where the built kernel is kept, in order: ``$SHARDED_NEGCACHE_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/sharded_negcache`` or ``~/.cache/sharded_negcache``; where that is not writable, a private
    temp directory (``$TMPDIR/sharded_negcache-<uid>``)."""
    explicit = os.environ.get(ENV_CACHE_DIR)
    if explicit:
        first = Path(explicit)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        first = Path(base) / "sharded_negcache"
    return [first, Path(tempfile.gettempdir()) / f"sharded_negcache-{os.getuid()}"]


def cpu_flags() -> list[str]:
    """The CPU's feature flags (``/proc/cpuinfo``): ``-march=native`` code built on one CPU must not be loaded on
    another, so they are part of the build id."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith(("flags", "Features"))), "")
        return line.split(":", 1)[1].split() if ":" in line else []
    except OSError:
        return [platform.processor()]


def _build_id(compiler: Compiler) -> tuple[str, int]:
    """(file key, build id) of the kernel this process needs: a digest of the source, the flags, the compiler's
    version and the CPU. The id is compiled into the library (``negcache_build_id``) and checked after loading."""
    digest = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(_flags()), compiler.version_text,
                                        " ".join(cpu_flags()), platform.machine()]).encode()).hexdigest()
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


def _compile_error(compiler: Compiler, stderr: str, log_path: Path) -> BuildError:
    """The failed compile as one message: the first error line (whole), where the full output is, the fix."""
    lines = stderr.splitlines()
    first = next((line.strip() for line in lines if "error" in line), lines[-1].strip() if lines else "no output")
    if "omp.h" in stderr or "-lgomp" in stderr or "fopenmp" in stderr:
        fix = ("install the compiler's OpenMP support (libgomp: e.g. apt-get install g++, which brings it) or set "
               "CXX to a compiler with -fopenmp")
    else:
        fix = f"set CXX to GCC >= {GCC_MIN} (or clang with OpenMP); the compiler's full output is in {log_path}"
    return BuildError(compiler, f"failed to compile {SOURCE.name}: {first}", fix)


def _compile(compiler: Compiler, build_id: int, target: Path) -> None:
    """Compiles the kernel into ``target``, then its digest beside it, each written under a private name,
    flushed to disk and renamed into place: after a crash or power loss a reader finds the whole library and
    its digest, or a library without a matching digest, which is rebuilt. A failure's full output goes to
    ``scan-<key>.log`` beside it."""
    tmp, tmp_digest = (target.with_name(f".{target.name}-{os.getpid()}{ext}") for ext in (".build", ".sha256"))
    log_path = target.with_suffix(".log")
    try:
        try:
            proc = subprocess.run([compiler.path, *_flags(), f"-DNEGCACHE_BUILD_ID={build_id}ULL", str(SOURCE),
                                   "-o", str(tmp)], capture_output=True, text=True, timeout=_COMPILE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise BuildError(compiler, f"the compile did not finish in {_COMPILE_TIMEOUT_S} s", "retry on a less "
                             "loaded machine, or build ahead with python -m sharded_negcache.build") from None
        if proc.returncode != 0:
            log_path.write_text(proc.stderr)
            raise _compile_error(compiler, proc.stderr, log_path)
        log_path.unlink(missing_ok=True)
        _fsync(tmp)
        tmp_digest.write_text(hashlib.sha256(tmp.read_bytes()).hexdigest())
        _fsync(tmp_digest)
        os.replace(tmp, target)
        os.replace(tmp_digest, _digest_file(target))
        _fsync(target.parent)  # the renames themselves reach the disk
    finally:
        tmp.unlink(missing_ok=True)
        tmp_digest.unlink(missing_ok=True)


def _build(compiler: Compiler, key: str, build_id: int, *, rebuild: bool = False) -> tuple[Path, bool]:
    """(path, compiled now) of a complete library of this build, compiled here if no directory holds one (or
    ``rebuild``).

    The build runs under a file lock: ranks of a node starting together wait for one compile. A directory
    where the lock file cannot be created (not creatable, read-only, not writable) is skipped: this is what
    finds an unwritable directory, for root as well (which ignores permission bits but not a read-only mount)."""
    problems = []
    for out_dir in cache_dirs():
        target = out_dir / f"scan-{key}.so"
        if not rebuild and _intact(target):
            return target, False
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
                if target.exists() and not rebuild:
                    log.warning("sharded_negcache: %s is damaged or not this build of the kernel; rebuilding it",
                                target)
                _compile(compiler, build_id, target)
                return target, True
            return target, False
    raise BuildError(compiler, "no writable directory for the built kernel (" + "; ".join(problems) + ")",
                     f"set {ENV_CACHE_DIR} to a writable directory")


def _open(compiler: Compiler, path: Path, build_id: int) -> ctypes.CDLL | None:
    """The library at ``path`` loaded, or None (unloaded again) when it is not this build (no or another id)."""
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise BuildError(compiler, f"the built library does not load ({exc})",
                         "install the OpenMP runtime the compiler links (libgomp), or set CXX to another compiler"
                         ) from None
    try:
        lib.negcache_build_id.restype = ctypes.c_uint64
        if lib.negcache_build_id() == build_id:
            return lib
    except AttributeError:
        pass
    _ctypes.dlclose(lib._handle)
    return None


@dataclass
class _Kernel:
    """This process's kernel: the library once loaded, or why not; what was built and how."""

    lib: ctypes.CDLL | None = None
    tried: bool = False
    error: str | None = None
    compiler: Compiler | None = None
    flags: tuple[str, ...] | None = None
    path: Path | None = None
    build_id: int | None = None
    built: bool | None = None
    variant: str | None = None
    load_s: float | None = None


_kernel = _Kernel()
_load_lock = threading.Lock()


def load(*, rebuild: bool = False) -> bool:
    """Builds (``rebuild``: even when a complete library exists) and loads the kernel now, once per process; True
    when it is loaded. A failure is logged as one warning (compiler, version, reason, fix) and reported by
    :func:`build_info`; it is not retried unless ``rebuild``. Ignores ``SHARDED_NEGCACHE_NATIVE`` (an explicit
    request); a process that already loaded the kernel keeps it (the same build)."""
    with _load_lock:
        if (_kernel.lib is not None or _kernel.tried) and not rebuild:
            return _kernel.lib is not None
        _kernel.tried, t0 = True, time.perf_counter()
        try:
            _kernel.compiler = compiler = _compiler()
            _kernel.flags = _flags()
            key, build_id = _build_id(compiler)
            path, built = _build(compiler, key, build_id, rebuild=rebuild)
            lib = _open(compiler, path, build_id)
            if lib is None:  # complete, but stale or foreign (its digest written with it): replace it
                log.warning("sharded_negcache: %s is damaged or not this build of the kernel; rebuilding it", path)
                path, built = _build(compiler, key, build_id, rebuild=True)
                lib = _open(compiler, path, build_id)
            if lib is None:
                raise BuildError(compiler, f"{path} does not hold this build of the kernel even after a rebuild",
                                 f"remove {path.parent} and retry")
        except Exception as exc:  # noqa: BLE001 - any build or load failure means: the torch ops
            reason = exc if isinstance(exc, BuildError) else f"{type(exc).__name__}: {exc}"
            _kernel.error = f"the native CPU scan kernel is unavailable: {reason}"
            log.warning("sharded_negcache: %s. Scoring runs the torch ops (slower); set %s=0 to skip the attempt, "
                        "or run python -m sharded_negcache.build for a report", _kernel.error, ENV_NATIVE)
            return _kernel.lib is not None
        for name, (restype, params) in SIGNATURES.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, [t for _, t in params]
        if _kernel.lib is None:
            _kernel.lib = lib
        _kernel.error = None
        _kernel.path, _kernel.build_id, _kernel.built = path, build_id, built
        _kernel.variant = lib.negcache_variant().decode()
        _kernel.load_s = time.perf_counter() - t0
        log.info("sharded_negcache: native CPU scan kernel %s in %.2f s (%s, %s)", "built" if built else "loaded",
                 _kernel.load_s, path, _kernel.variant)
        return True


def enabled() -> bool:
    """False where ``SHARDED_NEGCACHE_NATIVE`` turns the kernel off (0, false, off, no): an override of any request."""
    return os.environ.get(ENV_NATIVE, "").strip().lower() not in ("0", "false", "off", "no")


def available(device: torch.device) -> bool:
    """True when the kernel can scan chunks on ``device``: a CPU device, not disabled, and built and loaded (by
    this call the first time: resolve the backend before a step so the build is not inside one)."""
    return device.type == "cpu" and enabled() and load()


def build_info() -> dict[str, Any]:
    """What this process built and loaded, or why not, for ``config()`` and benchmark records; the same keys
    always (None where not known): enabled, loaded, failed, reason, compiler, compiler_version, flags, variant,
    path, build_id, built (compiled by this process, not found in the cache), load_s."""
    k = _kernel
    if k.lib is not None:
        reason = None
    elif not enabled():
        reason = f"{ENV_NATIVE} turns it off"
    else:
        reason = k.error or "not loaded yet (resolving the CPU backend, native_scan.load() or python -m " \
                            "sharded_negcache.build builds it)"
    return {"enabled": enabled(), "loaded": k.lib is not None, "failed": k.tried and k.lib is None, "reason": reason,
            "compiler": k.compiler.path if k.compiler else None,
            "compiler_version": k.compiler.version if k.compiler else None,
            "flags": " ".join(k.flags or _flags()), "variant": k.variant, "path": str(k.path) if k.path else None,
            "build_id": f"{k.build_id:015x}" if k.build_id is not None else None, "built": k.built,
            "load_s": k.load_s}


def _call(fn: str, **args: Any) -> Any:
    """Calls entry point ``fn`` with ``args`` by parameter name (SIGNATURES); loads the kernel if needed."""
    if _kernel.lib is None and not load():
        raise RuntimeError(_kernel.error or "the native CPU scan kernel is not loaded")
    names = _PARAMETERS[fn]
    if len(args) != len(names) or not all(name in args for name in names):
        raise TypeError(f"{fn} takes {list(names)}, got {sorted(args)}")
    return getattr(_kernel.lib, fn)(*[args[name] for name in names])


# ---- argument checks: a wrong pointer, length or stride would corrupt memory in the kernel, not raise ----
def _int(name: str, value: Any, minimum: int = 0, maximum: int | None = None) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got a bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def _tensor(name: str, t: Any, dtypes: tuple[torch.dtype, ...], shape: tuple[int | None, ...], *,
            row_major: bool = False) -> torch.Tensor:
    """``t`` checked: a CPU tensor of one of ``dtypes`` and ``shape`` (None: any size), contiguous, or with
    ``row_major`` a 2-D view whose rows have unit column stride and do not overlap (the kernel reads row r at
    ``data + r * stride(0)``)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {' or '.join(str(d) for d in dtypes)}, got {t.dtype}")
    if not t.is_cpu:
        raise ValueError(f"{name} must be on the CPU (the kernel reads host memory), got device {t.device}")
    sizes = t.shape
    if len(sizes) != len(shape) or not all(want is None or got == want for got, want in zip(sizes, shape)):
        expected = "[" + ", ".join("*" if want is None else str(want) for want in shape) + "]"
        raise ValueError(f"{name} must have shape {expected}, got {list(sizes)}")
    if row_major:
        rows, cols = t.shape
        if (cols > 1 and t.stride(1) != 1) or (rows > 1 and t.stride(0) < cols):
            raise ValueError(f"{name} must be a row-major view (unit column stride, rows apart), got strides "
                             f"{tuple(t.stride())}")
    elif not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {tuple(t.stride())} for shape {list(t.shape)}")
    return t


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


_F32, _I64T = (torch.float32,), (torch.int64,)


class ChunkMasks(NamedTuple):
    """What a chunk's scan masks: ``filled`` [n] bool (None: every row has a value), and each query's own
    positive: the rows' doc ids ``row_ids`` [n] int64, the queries' ids ``excl_sorted`` ascending (int64) and
    the query of each ``excl_query`` (None: nothing to exclude; row_ids alone excludes nothing)."""

    filled: torch.Tensor | None = None
    row_ids: torch.Tensor | None = None
    excl_sorted: torch.Tensor | None = None
    excl_query: torch.Tensor | None = None

    def kernel_args(self, n: int, b: int) -> dict[str, Any]:
        """The kernel's mask arguments for a chunk of ``n`` rows and ``b`` queries, each checked."""
        if self.filled is not None:
            _tensor("masks.filled", self.filled, (torch.bool, torch.uint8), (n,))
        if self.row_ids is not None:
            _tensor("masks.row_ids", self.row_ids, _I64T, (n,))
        if (self.excl_sorted is None) != (self.excl_query is None):
            raise ValueError("masks.excl_sorted and masks.excl_query must be given together (or both be None)")
        n_excl = 0
        if self.excl_sorted is not None:
            if self.row_ids is None:
                raise ValueError("masks.excl_sorted needs masks.row_ids (the rows' doc ids it is compared with)")
            ids = _tensor("masks.excl_sorted", self.excl_sorted, _I64T, (None,))
            n_excl = ids.numel()
            query = _tensor("masks.excl_query", self.excl_query, _I64T, (n_excl,))
            bad = _call("negcache_check_exclusions", excl_sorted=ids.data_ptr(), excl_query=query.data_ptr(),
                        n_excl=n_excl, b=_int("b", b))  # one pass in C: two torch reductions cost more than a scan
            if bad == 1:
                raise ValueError(f"masks.excl_query must hold query indices in [0, {b}), got values in "
                                 f"[{int(query.min())}, {int(query.max())}]")
            if bad == 2:
                raise ValueError("masks.excl_sorted must be sorted ascending (the kernel binary-searches it)")
        return {"filled": _ptr(self.filled), "row_ids": _ptr(self.row_ids), "excl_sorted": _ptr(self.excl_sorted),
                "excl_query": _ptr(self.excl_query), "n_excl": n_excl}


class Stage1(NamedTuple):
    """The sampler's running state across a scan's chunks: draw ``keys``, ``best_key``, ``best_row`` [B, m]
    (int64, float32, int64) and, for the deferred stage 2, ``win_scores`` [B·m, block] and ``win_lse`` [B·m]
    (float32; both None: no copies)."""

    keys: torch.Tensor
    best_key: torch.Tensor
    best_row: torch.Tensor
    win_scores: torch.Tensor | None = None
    win_lse: torch.Tensor | None = None

    def kernel_args(self, b: int, block: int, first_block: int, row0: int) -> dict[str, Any]:
        """The kernel's stage-1 arguments for ``b`` queries and blocks of ``block`` rows, each checked."""
        m = _tensor("state.keys", self.keys, _I64T, (b, None)).shape[1]
        _tensor("state.best_key", self.best_key, _F32, (b, m))
        _tensor("state.best_row", self.best_row, _I64T, (b, m))
        if (self.win_scores is None) != (self.win_lse is None):
            raise ValueError("state.win_scores and state.win_lse must be given together (or both be None)")
        if self.win_scores is not None:
            _tensor("state.win_scores", self.win_scores, _F32, (b * m, block))
            _tensor("state.win_lse", self.win_lse, _F32, (b * m,))
        return {"keys": self.keys.data_ptr(), "m": m, "first_block": _int("first_block", first_block),
                "best_key": self.best_key.data_ptr(), "best_row": self.best_row.data_ptr(),
                "row0": _int("row0", row0), "win_scores": _ptr(self.win_scores), "win_lse": _ptr(self.win_lse)}


def _of(name: str, value: Any, kind: type) -> Any:
    if not isinstance(value, kind):
        raise TypeError(f"{name} must be a native_scan.{kind.__name__}, got {type(value).__name__}")
    return value


def _lse_out(lse_out: Any, b: int, blocks: int) -> dict[str, Any]:
    _tensor("lse_out", lse_out, _F32, (b, blocks), row_major=True)
    return {"lse_out": lse_out.data_ptr(), "ld_lse": lse_out.stride(0)}


def _blocks(name: str, n: int, block: int) -> int:
    if n % block:
        raise ValueError(f"{name} has {n} rows of scores, not a multiple of block={block}")
    return n // block


# ---- the entry points ------------------------------------------------------------------------------------
def scan_chunk(scores: torch.Tensor, block: int, lse_out: torch.Tensor, masks: ChunkMasks, state: Stage1, *,
               first_block: int, row0: int) -> int:
    """Scans ``scores`` [B, n] in place (see ``negcache_scan_chunk`` in csrc/scan.cpp) and returns how many
    (query, draw) winners changed. ``scores`` (float32) and ``lse_out`` [B, n / block] (float32) are row-major
    views (``lse_out`` a slice of the step's block LSEs); the chunk's first block has global id ``first_block``
    and its first row is local row ``row0``."""
    block = _int("block", block, 1)
    _tensor("scores", scores, _F32, (None, None), row_major=True)
    b, n = scores.shape
    return _call("negcache_scan_chunk", s=scores.data_ptr(), b=b, n=n, ld=scores.stride(0), bs=block,
                 **_of("masks", masks, ChunkMasks).kernel_args(n, b),
                 **_lse_out(lse_out, b, _blocks("scores", n, block)),
                 **_of("state", state, Stage1).kernel_args(b, block, first_block, row0),
                 nthreads=torch.get_num_threads())


def _query_group() -> int:
    return _call("negcache_query_group")


def pack_queries(q: torch.Tensor) -> torch.Tensor:
    """Queries [b, d] (floating point, converted to float32) in the fused scan's layout: ceil(b / G) groups of
    [d, G], lane = query, zero-padded (G: ``negcache_query_group``, two vectors of the target's width)."""
    if not isinstance(q, torch.Tensor) or not q.is_floating_point():
        raise TypeError(f"q must be a floating-point torch.Tensor, got {getattr(q, 'dtype', type(q).__name__)}")
    q = _tensor("q", q.float().contiguous(), _F32, (None, None))
    group = _query_group()
    out = torch.empty(-(-q.shape[0] // group) * q.shape[1] * group)
    _call("negcache_pack_queries", q=q.data_ptr(), b=q.shape[0], d=q.shape[1], out=out.data_ptr())
    return out


def _rows_args(packed: torch.Tensor, b: int, rows: torch.Tensor) -> dict[str, Any]:
    """The fused kernels' (packed queries, b, d, rows, n, row stride) arguments, checked."""
    b = _int("b", b)
    n, d = _tensor("rows", rows, _F32, (None, None), row_major=True).shape
    group = _query_group()
    _tensor("packed", packed, _F32, (-(-b // group) * d * group,))  # pack_queries of b queries of dimension d
    return {"qp": packed.data_ptr(), "b": b, "d": d, "rows": rows.data_ptr(), "n": n, "ld": rows.stride(0)}


def fused_scan(packed: torch.Tensor, b: int, rows: torch.Tensor, block: int, lse_out: torch.Tensor, masks: ChunkMasks,
               state: Stage1, *, first_block: int, row0: int) -> int:
    """:func:`scan_chunk` without a score chunk: scores the ``b`` queries of ``packed`` (:func:`pack_queries`)
    against ``rows`` [n, d] (float32, a row-major view) block by block inside the kernel (see
    ``negcache_fused_scan`` in csrc/scan.cpp). Same effects as :func:`scan_chunk`; returns how many times a
    winner improved."""
    block = _int("block", block, 1)
    args = _rows_args(packed, b, rows)
    b, n = args["b"], args["n"]
    return _call("negcache_fused_scan", **args, bs=block, **_of("masks", masks, ChunkMasks).kernel_args(n, b),
                 **_lse_out(lse_out, b, _blocks("rows", n, block)),
                 **_of("state", state, Stage1).kernel_args(b, block, first_block, row0),
                 nthreads=torch.get_num_threads())


def fused_topk(packed: torch.Tensor, b: int, rows: torch.Tensor, tile: int, best_val: torch.Tensor,
               best_row: torch.Tensor, masks: ChunkMasks, *, row0: int) -> None:
    """Folds ``rows`` [n, d] (float32, a row-major view) into each query's running top-k ``best_val`` /
    ``best_row`` [b, k] (float32 / int64, contiguous, -inf / -1 where empty; left in heap order: sort after the
    last chunk), scoring ``tile`` rows at a time for the ``b`` queries of ``packed`` inside the kernel; masks as
    :func:`fused_scan`; a row enters as ``row0`` + its index; among equal values the lower row wins."""
    tile = _int("tile", tile, 1)
    args = _rows_args(packed, b, rows)
    k = _tensor("best_val", best_val, _F32, (args["b"], None)).shape[1]
    if k < 1:
        raise ValueError(f"best_val must have k >= 1 columns, got shape {list(best_val.shape)}")
    _tensor("best_row", best_row, _I64T, (args["b"], k))
    _call("negcache_fused_topk", **args, tile=tile, **_of("masks", masks, ChunkMasks).kernel_args(args["n"], args["b"]),
          k=k, best_val=best_val.data_ptr(), best_row=best_row.data_ptr(), row0=_int("row0", row0),
          nthreads=torch.get_num_threads())


def pick(win_scores: torch.Tensor, win_lse: torch.Tensor, u: torch.Tensor, best_key: torch.Tensor,
         best_row: torch.Tensor, row_offset: int = 0) -> None:
    """Stage 2 for the final winners (``scoring.pick_in_block`` in the kernel): where ``best_key`` [P] is finite,
    adds to ``best_row`` [P] (the winning block's first row) the row inside it, plus ``row_offset`` (the shard's
    first global row); sets -1 where it is not (nothing drawn). ``win_scores`` [P, block] (block >= 1), the rest
    [P]; float32 except ``best_row`` (int64); all contiguous."""
    pairs, bs = _tensor("win_scores", win_scores, _F32, (None, None)).shape
    if bs < 1:
        raise ValueError(f"win_scores must have block >= 1 columns, got shape {list(win_scores.shape)}")
    for name, t in (("win_lse", win_lse), ("u", u), ("best_key", best_key)):
        _tensor(name, t, _F32, (pairs,))
    _tensor("best_row", best_row, _I64T, (pairs,))
    _call("negcache_pick", win_scores=win_scores.data_ptr(), win_lse=win_lse.data_ptr(), u=u.data_ptr(),
          best_key=best_key.data_ptr(), pairs=pairs, bs=bs, best_row=best_row.data_ptr(),
          row_offset=_int("row_offset", row_offset), nthreads=torch.get_num_threads())


def row_lse(x: torch.Tensor) -> torch.Tensor:
    """log Σ exp over each row of a float32 [rows, n] tensor (-inf for a row without candidates)."""
    x = _tensor("x", x, _F32, (None, None), row_major=True).contiguous()
    out = torch.empty(x.shape[0])
    _call("negcache_row_lse", x=x.data_ptr(), rows=x.shape[0], n=x.shape[1], out=out.data_ptr(),
          nthreads=torch.get_num_threads())
    return out


def draws(key_base: int, uniform_base: int, b: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``keyed_random.draw_keys`` of queries 0..b-1 for the stream based at ``key_base`` ([b, m] int64) and
    the uniforms of the stream based at ``uniform_base`` ([b, m] float32), in one call (bit-identical). The
    bases are 32-bit words (``keyed_random.stream_base``)."""
    key_base = _int("key_base", key_base, 0, 0xFFFFFFFF)
    uniform_base = _int("uniform_base", uniform_base, 0, 0xFFFFFFFF)
    b, m = _int("b", b), _int("m", m)
    keys, u = torch.empty((b, m), dtype=torch.int64), torch.empty((b, m))
    _call("negcache_draws", key_base=key_base, uniform_base=uniform_base, b=b, m=m, keys=keys.data_ptr(),
          u=u.data_ptr())
    return keys, u


def _integers(name: str, t: Any) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex():
        raise TypeError(f"{name} must be an integer torch.Tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    return _tensor(name, t.reshape(-1).to(torch.int64).contiguous(), _I64T, (None,))


def gumbel(keys: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """The kernel's Gumbel noise [keys, items] for int64 keys and 32-bit item ids (``keyed_random.gumbel``)."""
    keys, items = _integers("keys", keys), _integers("items", items)
    out = torch.empty(keys.numel(), items.numel())
    _call("negcache_gumbel", keys=keys.data_ptr(), n_keys=keys.numel(), items=items.data_ptr(),
          n_items=items.numel(), out=out.data_ptr())
    return out


def exp_nonpositive(x: torch.Tensor) -> torch.Tensor:
    """The kernel's exp for x <= 0 (elementwise, a floating-point tensor, flattened), for tests of its polynomial."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    x = _tensor("x", x.reshape(-1).float().contiguous(), _F32, (None,))
    out = torch.empty_like(x)
    _call("negcache_exp_nonpositive", x=x.data_ptr(), n=x.numel(), out=out.data_ptr())
    return out
