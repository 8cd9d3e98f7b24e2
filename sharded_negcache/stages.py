"""The protocol's stages as named ranges: profiler ranges always, wall-clock totals on request.

Every stage of a step runs inside ``stage(name)``: a profiler range ``negcache/<name>`` (users' traces in
Chrome or TensorBoard show each protocol step), and, inside :func:`stage_times`, a clock reading. The clock
costs two ``perf_counter`` calls per stage; the profiler pays a few microseconds per tensor op, which at small
batches (a few hundred ops a step) inflates the very cost it measures. The range is opened only while a
profiler runs: ``record_function`` costs a few microseconds even when nothing records it.
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Iterator

import torch
from torch.profiler import record_function

__all__ = ["STAGE_PREFIX", "STAGES", "stage", "stage_times", "traced"]

# Profiler range names of the protocol steps, in order (``negcache/agree`` ... ``negcache/insert``).
STAGE_PREFIX = "negcache/"
STAGES = ("agree", "gather", "score", "partials", "fetch", "reencode", "losses", "stats", "write_back", "insert")

_clock: dict[str, float] | None = None  # seconds per stage while a stage_times() block runs


_UNTRACED = contextlib.nullcontext()


def traced(name: str) -> contextlib.AbstractContextManager:
    """The profiler range ``name`` while a profiler runs; otherwise a context that costs nothing."""
    return record_function(name) if torch.autograd._profiler_enabled() else _UNTRACED


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """The range ``negcache/<name>``, also timed by the clock inside :func:`stage_times`."""
    with traced(f"{STAGE_PREFIX}{name}"):
        if _clock is None:
            yield
            return
        start = time.perf_counter()
        try:
            yield
        finally:
            _clock[name] += time.perf_counter() - start


@contextlib.contextmanager
def stage_times() -> Iterator[dict[str, float]]:
    """Seconds spent in each stage by the steps run inside the block (this process; blocks do not nest)."""
    global _clock
    if _clock is not None:
        raise RuntimeError("stage_times() blocks do not nest")
    _clock = defaultdict(float)
    try:
        yield _clock
    finally:
        _clock = None
