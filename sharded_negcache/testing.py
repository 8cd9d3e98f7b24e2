"""Real multi-process runs for tests and benchmarks: W gloo processes on CPU, each running a function.

No mocks of collectives: every rank is a freshly spawned Python process with its own
``torch.distributed`` (gloo), so a test sees what a real job sees, hangs included (a timeout ends them).
Public, like ``torch.testing``: the package's tests and benchmarks share it, and a user can test code
that uses the cache the same way. Not imported by ``import sharded_negcache``.
"""
from __future__ import annotations

import os
import pickle
import socket
import tempfile
import time
import traceback
from typing import Any, Callable

__all__ = ["run_ranks", "free_port", "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = 120.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a rendezvous or ``MASTER_PORT``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, threads: int, use_dist: bool, fn: Callable, args: tuple,
            out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from .topology import is_distributed

    torch.set_num_threads(threads)
    result: Any
    try:
        if use_dist:
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                              WORLD_SIZE=str(world_size))
            dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = ("ok", fn(rank, world_size, *args))
    except BaseException as exc:  # reported to the caller, which raises
        result = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    finally:
        if is_distributed():
            dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def run_ranks(world_size: int, fn: Callable, *args: Any, timeout: float = DEFAULT_TIMEOUT_S,
              allow_errors: bool = False, threads: int = 1, use_dist: bool = True) -> list:
    """Runs ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes; returns the results by rank.

    Each process sets ``torch.set_num_threads(threads)`` and, with ``use_dist``, joins a gloo process group
    of ``world_size`` ranks (destroyed after ``fn``). ``fn`` and ``args`` must pickle (``fn`` a module-level
    function). All ranks must finish within ``timeout`` seconds in total, else ``TimeoutError`` (the
    processes are killed). A rank that raised makes this raise ``RuntimeError`` with its traceback; with
    ``allow_errors`` its slot holds ``("error", text)`` instead, and a rank that exited without a result
    holds ``("died", exit code)``.
    """
    import torch.multiprocessing as mp

    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        procs = [ctx.Process(target=_worker, args=(r, world_size, port, threads, use_dist, fn, args, out_dir))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(deadline - time.monotonic(), 0.0))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        if hung:
            raise TimeoutError(f"ranks {hung} did not finish within {timeout:.0f} s")
        results = []
        for r in range(world_size):
            path = os.path.join(out_dir, f"rank{r}.pkl")
            if not os.path.exists(path):
                if allow_errors:
                    results.append(("died", procs[r].exitcode))
                    continue
                raise RuntimeError(f"rank {r} exited with code {procs[r].exitcode} without a result")
            with open(path, "rb") as f:
                status, value = pickle.load(f)
            if status == "error" and not allow_errors:
                raise RuntimeError(f"rank {r} failed: {value}")
            results.append(value if status == "ok" else ("error", value))
        return results
