"""Shared pieces of the benchmarks: synthetic caches, a cheap document tower, timers, memory and byte counters.

Nothing here changes or wraps the engine. The engine's time split is read from its own profiler ranges
(``negcache/<stage>``, what a user's trace shows; :func:`stage_split`, :func:`split_from_stages`); the
benchmarks' own code (the alternative designs of ``bench_scaling``, the user's tower) is timed with
:class:`Sections`. Bytes are counted by wrapping the ``torch.distributed`` collectives from the benchmark
process for the benchmarks' own designs (:class:`WireCounter`); the engine's traffic is read from its own
public counters (``handler.comm.bytes_sent`` and ``handler.comm.calls``, per collective tag), never by
wrapping the engine's internals.

Memory is measured as resident set size (RSS) of the process, which covers torch's CPU allocator:
``reset_peak()`` writes ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0), which resets the kernel's
peak-RSS counter ``VmHWM`` to the current RSS; after the measured code, ``VmHWM - RSS_before`` is the
extra peak memory it touched. Freed heap memory is handed back first (``gc.collect`` and glibc
``malloc_trim``) so reused allocator caches do not hide growth.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import json
import os
import pickle
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
if str(REPO_ROOT) not in sys.path:  # runs from a checkout without `pip install -e .` (e.g. a GPU box)
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from sharded_negcache import testing  # noqa: E402

MB = 1 << 20
GLOBAL_BLOCK = 1 << 16  # synthetic rows are generated per global block: same contents for every W


# ---------------------------------------------------------------------------------------------
# synthetic cache, batches and the document tower
# ---------------------------------------------------------------------------------------------
def make_specs(dim: int, feat: int, emb_dtype: torch.dtype = torch.float32) -> dict:
    from sharded_negcache import FieldSpec

    return {"x": FieldSpec((feat,), torch.float32), "embedding": FieldSpec((dim,), emb_dtype)}


class CheapTower(torch.nn.Module):
    """A cheap document tower: ``normalize(x @ W)`` with a [feat, dim] weight (negligible next to scoring).

    Unit-norm outputs, like the synthetic cache rows: a re-encoded row stays a typical row, so sampling
    does not collapse onto the rows refreshed in earlier steps.
    """

    def __init__(self, feat: int, dim: int, seed: int = 1, device: str | torch.device = "cpu") -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter((torch.randn(feat, dim, generator=g) / feat**0.5).to(device))

    def forward(self, data: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.nn.functional.normalize(data["x"] @ self.weight, dim=-1)


def make_handler(cache_size: int, dim: int, feat: int, **kw: Any):
    """A handler over ``cache_size`` global rows with an ``x`` feature field; float scale 20 (folded)."""
    from sharded_negcache import ShardedCacheLossHandler

    kw.setdefault("score_transform", 20.0)
    kw.setdefault("num_negatives", 2)
    return ShardedCacheLossHandler(make_specs(dim, feat), cache_size, "embedding", ("x",), **kw)


def synthetic_rows(lo: int, hi: int, dim: int, feat: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Fully filled rows [lo, hi) of a global cache: unit embeddings, features, ages (export_rows shape).

    Generated per global block of 65536 rows from a generator keyed by the block, so a rank that builds
    only its own slice gets exactly the rows of the same slice of the whole cache.
    """
    n = hi - lo
    emb = torch.empty(n, dim)
    x = torch.empty(n, feat)
    age = torch.empty(n, dtype=torch.int64)
    for b in range(lo // GLOBAL_BLOCK, (hi - 1) // GLOBAL_BLOCK + 1):
        b_lo, b_hi = b * GLOBAL_BLOCK, (b + 1) * GLOBAL_BLOCK
        s, e = max(lo, b_lo), min(hi, b_hi)
        # CPU generators keep only the low 32 bits of a seed: cache blocks and batches use disjoint ranges
        g = torch.Generator().manual_seed(0x40000000 + (seed << 16) + b)
        blk_e = torch.randn(GLOBAL_BLOCK, dim, generator=g)
        blk_x = torch.randn(GLOBAL_BLOCK, feat, generator=g)
        blk_a = torch.randint(0, 1000, (GLOBAL_BLOCK,), generator=g)
        emb[s - lo : e - lo] = blk_e[s - b_lo : e - b_lo]
        x[s - lo : e - lo] = blk_x[s - b_lo : e - b_lo]
        age[s - lo : e - lo] = blk_a[s - b_lo : e - b_lo]
    emb = torch.nn.functional.normalize(emb, dim=-1)
    return {"embedding": emb, "x": x, "age": age, "filled": torch.ones(n, dtype=torch.bool)}


def fill_local(handler) -> None:
    """Fills this rank's shard with its slice of the synthetic global cache.

    Same result as ``handler.load_global_rows(synthetic_rows(0, cache_size))`` without materialising the
    whole cache on every rank (it calls the store's ``import_rows`` with this rank's slice only).
    """
    lay = handler.layout
    rows = synthetic_rows(lay.row_offset, lay.row_offset + lay.rows_per_rank, handler.schema.dim,
                          handler.schema.specs["x"].shape[0])
    handler.store.import_rows({k: v.to(handler.device) for k, v in rows.items()})


def make_batch(batch: int, dim: int, tower: CheapTower, seed: int, device: str | torch.device = "cpu"):
    """(queries with grad, positives' embeddings, document data) of one rank's batch."""
    g = torch.Generator().manual_seed(0x10000000 + seed)  # disjoint from the cache's seeds (low 32 bits)
    feat = tower.weight.shape[0]
    q = torch.nn.functional.normalize(torch.randn(batch, dim, generator=g), dim=-1).to(device)
    x = torch.randn(batch, feat, generator=g).to(device)
    with torch.no_grad():
        p = tower({"x": x})
    return q.requires_grad_(True), p, {"x": x}


# ---------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def rss_mb() -> float:
    return _status_kb("VmRSS") / 1024


def hwm_mb() -> float:
    """Peak RSS since start or since the last :func:`reset_peak`."""
    return _status_kb("VmHWM") / 1024


def trim() -> None:
    """Frees Python garbage and hands freed heap pages back to the OS (glibc)."""
    gc.collect()
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak() -> bool:
    """Resets VmHWM to the current RSS. Returns False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMeter:
    """``with PeakMeter() as m: ...`` then ``m.extra_mb`` = peak RSS during the block minus RSS before it."""

    def __enter__(self) -> "PeakMeter":
        trim()
        self.ok = reset_peak()
        self.before = rss_mb()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.peak = hwm_mb()
        self.extra_mb = self.peak - self.before if self.ok else float("nan")


# ---------------------------------------------------------------------------------------------
# time split: the benchmarks' own sections, and the engine's profiler ranges
# ---------------------------------------------------------------------------------------------
class Sections:
    """Exclusive time per named section (wall clock and process CPU time); nested sections pause their parent.

    For the benchmarks' own code (the alternative designs in ``bench_scaling``, the user's tower); the
    engine's split comes from its profiler ranges (:func:`stage_split`). CPU time (``time.process_time``:
    every thread of this process) is what a section costs this rank in work; wall time also holds waiting:
    for other ranks in collectives, and for a core when other jobs share the machine.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.cpu_seconds: dict[str, float] = defaultdict(float)
        self._stack: list[list[Any]] = []

    def reset(self) -> None:
        self.seconds.clear()
        self.cpu_seconds.clear()

    def push(self, name: str) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        if self._stack:
            top = self._stack[-1]
            self.seconds[top[0]] += now - top[1]
            self.cpu_seconds[top[0]] += cpu - top[2]
        self._stack.append([name, now, cpu])

    def pop(self) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        name, start, cpu_start = self._stack.pop()
        self.seconds[name] += now - start
        self.cpu_seconds[name] += cpu - cpu_start
        if self._stack:
            self._stack[-1][1] = now
            self._stack[-1][2] = cpu

    @contextlib.contextmanager
    def section(self, name: str):
        self.push(name)
        try:
            yield
        finally:
            self.pop()

    def wrap(self, name: str, fn: Callable) -> Callable:
        """``fn`` timed as section ``name`` on every call (the benchmarks wrap the user's tower with it)."""

        @functools.wraps(fn)
        def wrapped(*a: Any, **k: Any) -> Any:
            with self.section(name):
                return fn(*a, **k)

        return wrapped


SPLIT_KEYS = ("scoring", "collectives", "fetch", "reencode", "writeback", "other")

# The engine's profiler ranges (``negcache/<stage>``) folded into SPLIT_KEYS. The stages that are a
# collective and little else go to 'collectives' (agree: all-gather of the step's agreement; gather:
# all-gather of the queries; partials: all-to-all of the scan's partial results and their merge; stats:
# all-reduce of the metrics), each with its wait for the slowest rank. 'fetch' and 'writeback' keep the
# all-to-alls they contain (row counts, row ids and rows; fresh embeddings back to their owners): the
# profiler shows gloo's work on its own threads, not the caller's wait, so a range cannot be split into
# its local work and its collectives. 'losses' and the time outside every range (validation, step
# bookkeeping) are 'other'.
STAGE_TO_SPLIT = {
    "agree": "collectives", "gather": "collectives", "score": "scoring", "partials": "collectives",
    "fetch": "fetch", "reencode": "reencode", "losses": "other", "stats": "collectives",
    "write_back": "writeback", "insert": "writeback",
}

_LSE_OPS = ("aten::amax", "aten::exp_", "aten::sum", "aten::log_")


def stage_split(prof: Any) -> dict[str, float]:
    """Seconds in each engine range of a profile (summed over the profiled steps): the one place that reads
    the ``negcache/<stage>`` ranges.

    ``prof`` is a finished ``torch.profiler.profile(activities=[ProfilerActivity.CPU])``. Returns every
    stage of ``handler.STAGES`` (0 where absent), plus ``score.matmul`` (the ``aten::mm`` calls inside the
    score range) and ``score.lse`` (the native kernel's ``negcache/score.kernel`` ranges: block LSEs,
    stage 1 and the winners' copies, and with the fused scan the products too; or the eager block-LSE ops
    where the kernel is off), which are parts
    of ``score``. Range times are wall time on the calling thread (the profiler's
    ``cpu_time_total``), waiting for other ranks included.
    """
    from sharded_negcache.handler import STAGE_PREFIX, STAGES
    from sharded_negcache.scoring import KERNEL_RANGE

    out = {s: 0.0 for s in STAGES}
    mm = lse = 0.0
    for e in prof.events():
        if e.name == KERNEL_RANGE:
            lse += e.cpu_time_total / 1e6
        elif e.name.startswith(STAGE_PREFIX) and e.name[len(STAGE_PREFIX):] in out:
            out[e.name[len(STAGE_PREFIX):]] += e.cpu_time_total / 1e6
        elif e.name == "aten::mm" or e.name in _LSE_OPS or e.name.startswith("Torch-Compiled Region"):
            chain, parent = [], e.cpu_parent
            while parent is not None:
                chain.append(parent.name)
                parent = parent.cpu_parent
            if STAGE_PREFIX + "score" not in chain or any(n.startswith("Torch-Compiled Region") for n in chain):
                continue
            if e.name == "aten::mm":
                mm += e.cpu_time_total / 1e6
            elif e.name.startswith("Torch-Compiled Region") or "aten::logsumexp" not in chain:
                lse += e.cpu_time_total / 1e6
    out["score.matmul"], out["score.lse"] = mm, lse
    return out


def split_from_stages(stages: dict[str, float], total: float, steps: int = 1) -> dict[str, float]:
    """Per-step seconds of each SPLIT_KEYS entry from :func:`stage_split`'s ranges (``STAGE_TO_SPLIT``);
    'other' also takes the step time outside every range (``total``: wall seconds of the profiled steps)."""
    out = dict.fromkeys(SPLIT_KEYS, 0.0)
    for stage, key in STAGE_TO_SPLIT.items():
        out[key] += stages.get(stage, 0.0) / steps
    out["other"] += max(total - sum(stages.get(s, 0.0) for s in STAGE_TO_SPLIT), 0.0) / steps
    return out


def split_of(sections: Sections, total: float, steps: int, cpu: bool = False) -> dict[str, float]:
    """Per-step seconds of each split key from a :class:`Sections`; 'other' is the step total minus the
    named sections. ``cpu``: CPU seconds (then ``total`` must be the step's CPU time too)."""
    src = sections.cpu_seconds if cpu else sections.seconds
    out = {k: src.get(k, 0.0) / steps for k in SPLIT_KEYS if k != "other"}
    out["other"] = max(total / steps - sum(out.values()), 0.0)
    return out


# ---------------------------------------------------------------------------------------------
# bytes on the wire, counted by wrapping torch.distributed
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def patched(items: Iterable[tuple[Any, str, Any]]):
    """Temporarily sets ``setattr(obj, name, value)`` for each item; restores on exit."""
    saved = []
    try:
        for obj, name, value in items:
            saved.append((obj, name, getattr(obj, name)))
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class WireCounter:
    """Counts the bytes this rank hands to other ranks in the ``torch.distributed`` collectives that the
    benchmark's own code calls (the alternative designs of ``bench_scaling``).

    Rule (the same as the engine's ``Comm``): all-gather counts this rank's input once per other rank;
    all-to-all counts the rows sent to other ranks; all-reduce and broadcast count the tensor once.
    (A ring all-reduce physically sends about 2(W-1)/W times the tensor; the order in W is the same.)
    Use as a context manager; ``bytes`` maps the collective's name to bytes; ``calls`` counts calls.
    It wraps the functions of the ``torch.distributed`` module, so it sees only calls that look them up
    there: for the engine read ``handler.comm.bytes_sent`` / ``handler.comm.calls`` instead.
    """

    NAMES = ("all_gather_into_tensor", "all_gather_single", "all_gather", "all_to_all_single",
             "all_reduce", "broadcast", "all_gather_object")

    def __init__(self) -> None:
        self.bytes: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()

    @property
    def total(self) -> int:
        return sum(self.bytes.values())

    def _count(self, name: str, args: tuple, kwargs: dict) -> None:
        import torch.distributed as dist

        group = kwargs.get("group")
        w = dist.get_world_size(group)
        rank = dist.get_rank(group)
        self.calls[name] += 1
        if name in ("all_gather_into_tensor", "all_gather_single"):
            inp = args[1] if len(args) > 1 else kwargs["input_tensor"]
            self.bytes[name] += _nbytes(inp) * (w - 1)
        elif name == "all_gather":
            inp = args[1] if len(args) > 1 else kwargs["tensor"]
            self.bytes[name] += _nbytes(inp) * (w - 1)
        elif name == "all_to_all_single":
            inp = args[1] if len(args) > 1 else kwargs["input"]
            splits = args[3] if len(args) > 3 else kwargs.get("input_split_sizes")
            if inp.shape[0] == 0:
                return
            row = _nbytes(inp) // inp.shape[0]
            if splits is None:
                self.bytes[name] += row * inp.shape[0] * (w - 1) // w
            else:
                self.bytes[name] += row * (sum(splits) - splits[rank])
        elif name in ("all_reduce", "broadcast"):
            t = args[0] if args else kwargs["tensor"]
            self.bytes[name] += _nbytes(t)
        elif name == "all_gather_object":
            self.bytes[name] += len(pickle.dumps(args[1] if len(args) > 1 else kwargs["obj"])) * (w - 1)

    def __enter__(self) -> "WireCounter":
        import torch.distributed as dist

        items = []
        for name in self.NAMES:
            fn = getattr(dist, name, None)
            if fn is None:
                continue

            def make(fn: Callable, name: str) -> Callable:
                @functools.wraps(fn)
                def counted(*args: Any, **kwargs: Any) -> Any:
                    self._count(name, args, kwargs)
                    return fn(*args, **kwargs)

                return counted

            items.append((dist, name, make(fn, name)))
        self._ctx = patched(items)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)


# ---------------------------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------------------------
def run_ranks(world: int, fn: Callable, *args: Any, threads: int = 1, use_dist: bool = True,
              timeout: float = 900.0) -> list:
    """:func:`sharded_negcache.testing.run_ranks` with the benchmarks' default timeout (runs take minutes)."""
    return testing.run_ranks(world, fn, *args, threads=threads, use_dist=use_dist, timeout=timeout)


def pin_to_core(rank: int) -> int | None:
    """Binds every thread of this process (the main thread, and gloo's already running) to core
    ``rank mod cores``, as a deployment with a core set per rank does; threads started later inherit it.

    Without it, on a machine with as many cores as ranks, each rank's main thread and its gloo threads
    migrate across cores and wake each other up late (a collective then waits for the OS scheduler, not
    for the wire). Returns the core, or None where affinity cannot be set (not Linux)."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    core = sorted(os.sched_getaffinity(0))[rank % len(os.sched_getaffinity(0))]
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            os.sched_setaffinity(int(tid), {core})
    return core


def in_fresh_process(fn: Callable, *args: Any, threads: int = 1, timeout: float = 900.0) -> Any:
    """``fn(0, 1, *args)`` in one fresh process without torch.distributed (clean peak-memory counters)."""
    return run_ranks(1, fn, *args, threads=threads, use_dist=False, timeout=timeout)[0]


# ---------------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "default_torch_threads": torch.get_num_threads(),
    }
    with contextlib.suppress(OSError):
        info["loadavg_1m"] = os.getloadavg()[0]
    info.update(engine_version())
    return info


def engine_version() -> dict[str, Any]:
    """The engine's commit and whether its files differ from it (read-only git calls)."""
    import subprocess

    out: dict[str, Any] = {}
    with contextlib.suppress(Exception):
        out["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                                           capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "sharded_negcache"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout
        out["engine_modified_files"] = [line[3:] for line in dirty.splitlines() if line.strip()]
    return out


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor()


def fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != v:
            return "nan"
        if v == 0:
            return "0"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.3g}"
    if isinstance(v, int) and abs(v) >= 10000:
        return f"{v:,}"
    return str(v)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str | None = None) -> str:
    """A fixed-width text table of ``rows`` (dicts) restricted to ``columns``."""
    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = [] if title is None else [title]
    lines.append("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False, default=str) + "\n")
    tmp.replace(path)


def size_label(rows: int) -> str:
    if rows % (1 << 20) == 0:
        return f"{rows >> 20}M"
    if rows % (1 << 10) == 0:
        return f"{rows >> 10}K"
    return str(rows)


def parse_sizes(text: str) -> list[int]:
    """'16K,128K,1M' -> [16384, 131072, 1048576] (K = 1024, M = 1024**2)."""
    out = []
    for part in text.split(","):
        part = part.strip().upper()
        mult = 1
        if part.endswith("K"):
            mult, part = 1 << 10, part[:-1]
        elif part.endswith("M"):
            mult, part = 1 << 20, part[:-1]
        out.append(int(float(part) * mult))
    return out


def median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return float("nan") if n == 0 else (s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2]))


# ---------------------------------------------------------------------------------------------
# the protocol's bytes per step (design §3), used as a cache-size-free ceiling and by the model
# ---------------------------------------------------------------------------------------------
def protocol_bytes(world: int, batch: int, draws: int, dim: int, row_bytes: int,
                   rows_requested: float | None = None, rows_served: float | None = None,
                   query_bytes: int = 4) -> dict[str, float]:
    """Bytes one rank sends per step in sampling mode (design §3), every rank holding ``batch`` queries.

    ``rows_requested``: distinct sampled rows this rank asks the other ranks for; ``rows_served``: rows
    the other ranks ask this rank for. Both default to the expectation without duplicates and with
    owners uniform over ranks, ``batch * draws * (W-1)/W``; the upper bounds are ``batch * draws`` and
    ``(W-1) * batch * draws``. Tags follow the engine's ``Comm`` counters. No term depends on the
    cache size.
    """
    w1 = world - 1
    expect = batch * draws * w1 / world
    req = expect if rows_requested is None else rows_requested
    srv = expect if rows_served is None else rows_served
    return {
        "agree": 3 * 8 * w1,
        "gather_queries": batch * dim * query_bytes * w1,  # inside the agreement's all-gather (flat layout)
        "partials": batch * w1 * (1 + 2 * draws) * 8,
        "row_ids": batch * draws * 8 * w1,  # requests padded to this rank's draw capacity, to every other rank
        "row_fetch": srv * row_bytes,
        "write_back": req * dim * 4,
        "stats": 9 * 8,  # the statistics all-reduce: nine float64 sums
    }
