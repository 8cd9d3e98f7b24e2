"""The per-(query, block) log-sum-exp of one score chunk, fused into one pass by ``torch.compile``.

Eagerly the block LSE is four passes over the chunk (max, subtract, exp, sum), about 30-50% of the
matrix product on an AVX2 CPU; compiled (inductor, C++/OpenMP on CPU) it is one read of the chunk.
The compiled function is built lazily, once per process, with dynamic shapes (a new batch size
does not recompile), only when a step scans at least ``MIN_COMPILE_SCORES`` scores (below that
the compile, seconds, would not pay off). Where compilation is unavailable (no C++ compiler, an
unsupported platform) the eager function runs and one warning says so.

``SHARDED_NEGCACHE_COMPILE=0`` disables compilation; ``=1`` compiles whatever the size.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Callable

import torch

__all__ = ["block_lse", "block_lse_eager", "compile_mode", "ENV_COMPILE", "MIN_COMPILE_SCORES"]

log = logging.getLogger("sharded_negcache")

ENV_COMPILE = "SHARDED_NEGCACHE_COMPILE"
MIN_COMPILE_SCORES = 1 << 22  # scores per step (B_g x rows per rank): 4M, e.g. 512 queries x 8K rows


def block_lse_eager(s3: torch.Tensor) -> torch.Tensor:
    """[B, blocks, block] scores (-inf for non-candidates) -> [B, blocks] log Σ exp (-inf if none).

    The max is per block, so a block's value does not depend on the chunk that holds it; ``s3`` is
    left unchanged (stage 2 reads the winners' scores from it).
    """
    bmax = s3.amax(dim=-1, keepdim=True)
    shift = torch.where(torch.isfinite(bmax), bmax, torch.zeros_like(bmax))
    return (s3 - shift).exp_().sum(dim=-1).log_().add_(shift.squeeze(-1))


class _Compiled:
    """The compiled block LSE of this process: built on first use; ``False`` once it has failed."""

    fn: Callable[[torch.Tensor], torch.Tensor] | None | bool = None
    compile_s: float | None = None


def compile_mode() -> str:
    """'off', 'on' (any size) or 'auto' (large scans only), from ``SHARDED_NEGCACHE_COMPILE``."""
    value = os.environ.get(ENV_COMPILE, "").strip().lower()
    if value in ("0", "false", "off", "no"):
        return "off"
    return "on" if value in ("1", "true", "on", "yes") else "auto"


def block_lse(s3: torch.Tensor, step_scores: int) -> torch.Tensor:
    """Block LSE of a chunk, compiled when the step is large enough (``step_scores``: B_g x rows)."""
    mode = compile_mode()
    if mode == "off" or _Compiled.fn is False or (mode == "auto" and step_scores < MIN_COMPILE_SCORES):
        return block_lse_eager(s3)
    if _Compiled.fn is None:
        t0 = time.perf_counter()
        try:
            fn = torch.compile(block_lse_eager, dynamic=True)
            out = fn(s3)
        except Exception as exc:  # noqa: BLE001 - any compiler failure means: run eagerly
            _Compiled.fn = False
            log.warning("sharded_negcache: torch.compile of the block log-sum-exp scan is unavailable (%s: %s); "
                        "scoring runs the eager ops (slower; set %s=0 to skip the attempt)",
                        type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "", ENV_COMPILE)
            return block_lse_eager(s3)
        _Compiled.fn, _Compiled.compile_s = fn, time.perf_counter() - t0
        log.info("sharded_negcache: compiled the block log-sum-exp scan in %.1f s (once per process; "
                 "set %s=0 to disable)", _Compiled.compile_s, ENV_COMPILE)
        return out
    try:
        return _Compiled.fn(s3)
    except Exception as exc:  # noqa: BLE001 - e.g. a recompile for a new shape failed
        _Compiled.fn = False
        log.warning("sharded_negcache: the compiled block log-sum-exp scan failed (%s); using the eager ops",
                    type(exc).__name__)
        return block_lse_eager(s3)
