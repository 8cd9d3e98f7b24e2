"""Settings that every rank must share are checked across ranks: a rank that differs is named, with the field.

Three real gloo processes; in each case rank 2 is built with one setting different from ranks 0 and 1.
The first step must raise ``BatchRejected`` on *every* rank (no hang), naming the field and each rank's
value, with nothing written; the group stays usable (the next case runs on the same processes). All cases
run in one process group to pay the process start-up once.

A rank whose own configuration is invalid (a cache size that does not divide by the world size) raises
at construction; it cannot take part in a step, so the other ranks stop at their first collective with
``CollectiveFailed`` naming the step and the collective, within ``collective_timeout_s``.
"""
from __future__ import annotations

import time

import pytest
import torch

from engine_cases import DIM, FEAT
from sharded_negcache import BatchRejected, CollectiveFailed, FieldSpec, ShardedCacheLossHandler
from sharded_negcache.testing import run_ranks

WORLD, CACHE, ODD = 3, 24, 2  # rank 2 is the odd one out


def base_specs(x_dtype: torch.dtype = torch.float32, with_ids: bool = False) -> dict:
    s = {"x": FieldSpec((FEAT,), x_dtype), "embedding": FieldSpec((DIM,), torch.float32)}
    if with_ids:
        s["doc_id"] = FieldSpec((1,), torch.int64)
    return s


def _scale_two(s: torch.Tensor) -> torch.Tensor:
    return 2.0 * s


def _make_scale(c: float):
    def transform(s: torch.Tensor) -> torch.Tensor:  # same __qualname__ for every c
        return c * s

    return transform


# name -> (kwargs of ranks 0 and 1, kwargs of rank 2, expected text of the message)
CASES = {
    "seed": ({"seed": 5}, {"seed": 6}, "seed: rank 0=5, rank 1=5, rank 2=6"),
    "score_transform_scale": ({"score_transform": 3.0}, {"score_transform": 4.0},
                              "score_transform: rank 0='scale 3.0', rank 1='scale 3.0', rank 2='scale 4.0'"),
    "score_transform_kind": ({"score_transform": 2.0}, {"score_transform": _scale_two},
                             "score_transform: rank 0='scale 2.0', rank 1='scale 2.0', rank 2='_scale_two [-6.0, -4.0,"),
    "top_k": ({}, {"top_k": 2}, "top_k: rank 0=None, rank 1=None, rank 2=2"),
    "num_negatives": ({}, {"num_negatives": 2}, "num_negatives: rank 0=1, rank 1=1, rank 2=2"),
    "use_lru": ({}, {"use_lru": False}, "use_lru: rank 0=True, rank 1=True, rank 2=False"),
    "cache_size": ({}, {"cache_size": 2 * CACHE}, f"cache_size: rank 0={CACHE}, rank 1={CACHE}, rank 2={2 * CACHE}"),
    "block_size": ({"block_size": 4}, {"block_size": 8}, "block_size: rank 0=4, rank 1=4, rank 2=8"),
    "codec": ({}, {"embedding_codec": "bf16"}, "codec: rank 0='fp32', rank 1='fp32', rank 2='bf16'"),
    "in_batch_negatives": ({}, {"in_batch_negatives": True},
                           "in_batch_negatives: rank 0=False, rank 1=False, rank 2=True"),
    "nonfinite": ({}, {"nonfinite": "skip"}, "nonfinite: rank 0='raise', rank 1='raise', rank 2='skip'"),
    "specs_dtype": ({}, {"specs": base_specs(torch.float64)}, "specs: rank 0="),
    "doc_id_key": ({}, {"specs": base_specs(with_ids=True), "doc_id_key": "doc_id"},
                   "doc_id_key: rank 0=None, rank 1=None, rank 2='doc_id'"),
    "step": ({}, {"step": 1}, "step: rank 0=0, rank 1=0, rank 2=1"),
}
# Cases that must NOT be a disagreement (spec order) or that need more than a name to detect (closures).
PROBES = {
    "specs_order": ({}, {"specs": dict(reversed(list(base_specs().items())))}),
    "transform_closure": ({"score_transform": _make_scale(2.0)}, {"score_transform": _make_scale(5.0)}),
}


def build(rank: int, same: dict, odd: dict) -> ShardedCacheLossHandler:
    kw = dict(odd if rank == ODD else same)
    specs = kw.pop("specs", base_specs())
    step = kw.pop("step", 0)
    kw.setdefault("block_size", 4)
    kw.setdefault("collective_timeout_s", 20.0)
    h = ShardedCacheLossHandler(specs, kw.pop("cache_size", CACHE), "embedding", ("x",), **kw)
    if step:  # as if this rank had resumed from a different checkpoint
        state = h.state_dict()
        state["step_count"] = torch.tensor(step)
        h.load_state_dict(state)
    return h


def one_step(h: ShardedCacheLossHandler, rank: int) -> None:
    g = torch.Generator().manual_seed(rank)
    spec = h.schema.specs["x"]
    data = {"x": torch.randn(2, FEAT, generator=g).to(spec.dtype)}
    if h.schema.doc_id_key:
        data["doc_id"] = torch.tensor([[rank], [rank + 10]])
    tower = torch.nn.Linear(FEAT, DIM)
    q = torch.randn(2, DIM, generator=g, requires_grad=True)
    loss = h.update_cache_and_compute_loss(lambda f: tower(f["x"].float()), q, torch.randn(2, DIM, generator=g), data)
    loss.backward()


def agreement_cases(rank: int, world_size: int) -> dict:
    out = {}
    for name, (same, odd, *_) in {**CASES, **PROBES}.items():
        h = build(rank, same, odd)
        step_before = h.steps_done
        try:
            one_step(h, rank)
            out[name] = {"message": None}
        except BatchRejected as exc:
            rows = h.store.export_rows()
            out[name] = {"message": str(exc), "unchanged": not rows["filled"].any() and h.steps_done == step_before}
    # the group is still usable after all those rejections
    h = build(rank, {}, {})
    one_step(h, rank)
    out["after"] = h.steps_done
    # last: rank 2's cache size does not divide by the world size -> it raises at construction and leaves
    try:
        h = build(rank, {"collective_timeout_s": 5.0}, {"cache_size": CACHE + 1})
    except ValueError as exc:
        out["indivisible"] = {"error": f"{type(exc).__name__}: {exc}"}
        return out
    start = time.monotonic()
    try:
        one_step(h, rank)
        out["indivisible"] = {"error": None}
    except CollectiveFailed as exc:
        out["indivisible"] = {"error": f"{type(exc).__name__}: {exc}", "seconds": time.monotonic() - start}
    return out


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_ranks(WORLD, agreement_cases, timeout=150)


@pytest.mark.parametrize("case", list(CASES))
def test_disagreement_is_named_on_every_rank(results, case):
    expected = CASES[case][2]
    for rank, r in enumerate(results):
        got = r[case]
        assert got["message"] is not None, f"rank {rank}: {case} differing on rank 2 was not detected"
        assert got["message"].startswith("ranks disagree on the cache configuration, cache unchanged; ")
        assert expected in got["message"], got["message"]
        assert got["unchanged"], f"rank {rank} wrote to its cache or advanced its step"
    assert len({r[case]["message"] for r in results}) == 1  # the same message on every rank


def test_group_still_works_after_rejections(results):
    assert [r["after"] for r in results] == [1] * WORLD


def test_invalid_local_cache_size_stops_every_rank(results):
    odd = results[ODD]["indivisible"]["error"]
    assert odd.startswith("ValueError: cache_size=25 does not divide by the world size 3"), odd
    for rank in (0, 1):
        got = results[rank]["indivisible"]
        assert got["error"] is not None and got["error"].startswith(
            f"CollectiveFailed: step 0: collective 'agree' on rank {rank} of 3"), got
        assert got["seconds"] < 5.0 + 10.0  # the collective timeout plus slack; never a hang


def test_specs_in_a_different_order_are_not_a_disagreement(results):
    for r in results:
        message = r["specs_order"]["message"]
        assert message is None, message  # the same specs in another order are the same configuration


def test_different_transform_closures_are_detected(results):
    for r in results:
        message = r["transform_closure"]["message"]
        assert message is not None and "score_transform: " in message
