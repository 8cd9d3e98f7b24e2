"""Real multi-process runs for tests: W gloo processes on CPU, each running a function, results returned.

No mocks of collectives: every rank is a spawned Python process with its own ``torch.distributed``.
"""
from __future__ import annotations

import os
import pickle
import socket
import tempfile
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp

DEFAULT_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    result: Any
    try:
        if world_size > 0:
            dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = ("ok", fn(rank, world_size, *args))
    except BaseException as exc:  # reported to the test, which re-raises
        result = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def run_ranks(world_size: int, fn: Callable, *args: Any, timeout: float = DEFAULT_TIMEOUT_S, allow_errors: bool = False) -> list:
    """Runs ``fn(rank, world_size, *args)`` in ``world_size`` gloo processes; returns the results by rank.

    A rank that raised makes this raise (or, with ``allow_errors``, its slot holds ``("error", text)``,
    and a rank that died without a result holds ``("died", exit code)``).
    ``fn`` must be importable (a module-level function).
    """
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, out_dir)) for r in range(world_size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
        if hung:
            raise TimeoutError(f"ranks {hung} did not finish within {timeout} s")
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
