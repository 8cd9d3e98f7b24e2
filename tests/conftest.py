"""Fixtures shared by the test modules.

Plain helpers that spawned ranks call too (specs, towers, cache contents, ``cache_state``) live in
``engine_cases.py``: a spawned process imports a test module by name and cannot use fixtures.
Multi-process runs use :func:`sharded_negcache.testing.run_ranks`.
"""
from __future__ import annotations

from typing import Callable

import pytest

from engine_cases import Tower, global_cache, make_handler
from sharded_negcache import ShardedCacheLossHandler


@pytest.fixture
def tower() -> Tower:
    """The fixed linear document tower of ``engine_cases`` (the same weights in every process)."""
    return Tower()


@pytest.fixture
def filled_handler(tower: Tower) -> Callable[..., ShardedCacheLossHandler]:
    """Factory: ``filled_handler(cache_size, **make_handler_kwargs)``, a handler loaded with
    ``global_cache(cache_size, tower)`` (slightly stale rows of ``tower``, every fifth row empty)."""

    def make(cache_size: int = 16, **kw) -> ShardedCacheLossHandler:
        h = make_handler(cache_size, **kw)
        h.load_global_rows(global_cache(cache_size, tower, with_ids=kw.get("with_ids", False)))
        return h

    return make
