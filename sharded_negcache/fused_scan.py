"""The per-(query, block) log-sum-exp of one score chunk, fused into one pass by ``torch.compile``.

Eagerly the block LSE is four passes over the chunk (max, subtract, exp, sum), about 30-50% of the
matrix product on an AVX2 CPU; compiled (inductor, C++/OpenMP on CPU) it is one read of the chunk.
The compiled function is built lazily, once per process, with dynamic shapes (a new batch size
does not recompile), only when a step scores at least ``MIN_COMPILE_SCORES`` (global batch x global
cache size: the same decision on every rank and for every world size, so compiled and eager values,
which differ in the last bits, never mix in one run; below that the compile, seconds, would not
pay off). Where compilation is unavailable (no C++ compiler, an
unsupported platform) the eager function runs and one warning says so.

``SHARDED_NEGCACHE_COMPILE=0`` disables compilation; ``=1`` compiles whatever the size.
"""
from __future__ import annotations

import functools
import logging
import os
import time
from typing import Callable

import torch

__all__ = ["block_lse", "block_lse_eager", "compile_mode", "ENV_COMPILE", "MIN_COMPILE_SCORES"]

log = logging.getLogger("sharded_negcache")

ENV_COMPILE = "SHARDED_NEGCACHE_COMPILE"
MIN_COMPILE_SCORES = 1 << 22  # B_g x cache_size: 4M, e.g. 512 queries x 8K rows


def block_lse_eager(scores: torch.Tensor, block: int) -> torch.Tensor:
    """[B, n·block] scores (-inf for non-candidates) -> [B, n] log Σ exp per block (-inf if none).

    The max is per block, so a block's value does not depend on the chunk that holds it; ``scores``
    is left unchanged (stage 2 reads the winners' scores from it).
    """
    s3 = scores.view(scores.shape[0], -1, block)
    bmax = s3.amax(dim=-1, keepdim=True)
    shift = torch.where(torch.isfinite(bmax), bmax, torch.zeros_like(bmax))
    return (s3 - shift).exp_().sum(dim=-1).log_().add_(shift.squeeze(-1))


class _Compiled:
    """This process's compiled block LSE per block size; ``failed`` once compilation has failed."""

    fns: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {}
    failed = False
    compile_s: float | None = None


def compile_mode() -> str:
    """'off', 'on' (any size) or 'auto' (large steps only), from ``SHARDED_NEGCACHE_COMPILE``."""
    value = os.environ.get(ENV_COMPILE, "").strip().lower()
    if value in ("0", "false", "off", "no"):
        return "off"
    return "on" if value in ("1", "true", "on", "yes") else "auto"


def _fallback(scores: torch.Tensor, block: int, exc: Exception, what: str) -> torch.Tensor:
    _Compiled.failed = True
    msg = str(exc).splitlines()[0][:200] if str(exc) else ""
    log.warning("sharded_negcache: %s (%s: %s); scoring runs the eager ops from now on (slower; set %s=0 to "
                "skip the attempt)", what, type(exc).__name__, msg, ENV_COMPILE)
    return block_lse_eager(scores, block)


def block_lse(scores: torch.Tensor, block: int, step_scores: int) -> torch.Tensor:
    """Block LSE of a [B, n·block] chunk; compiled when the step is large enough (``step_scores``:
    B_g x cache_size). The chunk stays 2-D on the compiled side so that no dimension is 1 (dynamo
    specialises size-1 dimensions: a one-block chunk would recompile)."""
    mode = compile_mode()
    if mode == "off" or _Compiled.failed or (mode == "auto" and step_scores < MIN_COMPILE_SCORES):
        return block_lse_eager(scores, block)
    fn = _Compiled.fns.get(block)
    if fn is None:
        t0 = time.perf_counter()
        try:
            fn = torch.compile(functools.partial(block_lse_eager, block=block), dynamic=True)
            out = fn(scores)
        except Exception as exc:  # noqa: BLE001 - any compiler failure means: run eagerly
            return _fallback(scores, block, exc, "torch.compile of the block log-sum-exp scan is unavailable")
        _Compiled.fns[block], _Compiled.compile_s = fn, time.perf_counter() - t0
        log.info("sharded_negcache: compiled the block log-sum-exp scan in %.1f s (once per process and block "
                 "size; set %s=0 to disable)", _Compiled.compile_s, ENV_COMPILE)
        return out
    try:
        return fn(scores)
    except Exception as exc:  # noqa: BLE001 - e.g. a recompile for a new shape failed
        return _fallback(scores, block, exc, "the compiled block log-sum-exp scan failed")
