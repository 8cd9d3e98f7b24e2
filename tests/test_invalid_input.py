"""Each invalid input raises a clear error naming the field, before anything is written.

After every failed call the cache (all rows, ages, flags), the step counter and the seed are exactly as
before. Single-process cases: bad batches, a bad document network output, bad configurations. Two-rank
cases run in one pair of gloo processes for the module (start-up paid once): one rank's bad batch, a
document tower failing on one rank, non-finite losses and reductions that differ between ranks make
every rank raise alike (no hang), naming the rank; ranks whose specs disagree are caught at the first step.
"""
from __future__ import annotations

import pytest
import torch

from engine_cases import DIM, FEAT, Tower, cache_state, changed, global_cache, make_handler, rank_batch, specs
from sharded_negcache import (
    BatchRejected,
    DocumentNetworkFailed,
    FieldSpec,
    NonFiniteLoss,
    ShardedCacheLossHandler,
)
from sharded_negcache.testing import run_ranks

CACHE = 16


def good_batch(n: int = 4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, FEAT, generator=g)
    return torch.randn(n, DIM, generator=g), torch.randn(n, DIM, generator=g), {"x": x}


def bad_cases():
    q, d, data = good_batch()
    nan_q = q.clone()
    nan_q[1, 2] = float("nan")
    inf_d = d.clone()
    inf_d[0, 0] = float("inf")
    return {
        "missing key": (q, d, {}, "missing ['x']"),
        "extra key": (q, d, {"x": data["x"], "y": data["x"]}, "unexpected ['y']"),
        "feature shape": (q, d, {"x": data["x"][:, :3]}, "document_data['x'] must have shape [4, 6]"),
        "feature dtype": (q, d, {"x": data["x"].double()}, "document_data['x'] must have dtype torch.float32"),
        "query width": (q[:, :5], d, data, "query_embeddings must have shape [batch, 8]"),
        "batch mismatch": (q, d[:3], data, "document_embeddings has 3 rows"),
        "too large": (*good_batch(CACHE + 1)[:2], good_batch(CACHE + 1)[2], "larger than a cache shard"),
        "wrong device": (q.to("meta"), d, data, "query_embeddings is on meta"),
        "nan query": (nan_q, d, data, "query_embeddings contain NaN or Inf"),
        "inf document": (q, inf_d, data, "document_embeddings contain NaN or Inf"),
        "not a tensor": (q, d, {"x": [[1.0]]}, "document_data['x'] must be a torch.Tensor"),
    }


@pytest.mark.parametrize("case", list(bad_cases()))
def test_bad_input_raises_and_leaves_cache_unchanged(case, filled_handler, tower):
    h = filled_handler(CACHE, device="cpu")
    q, d, data, message = bad_cases()[case]
    before = cache_state(h)
    with pytest.raises(BatchRejected, match="rank 0: .*" + message.replace("[", r"\[").replace("]", r"\]")):
        h.update_cache_and_compute_loss(tower, q, d, data)
    assert not changed(before, h)
    # the handler still works afterwards
    q, d, data = good_batch()
    h.update_cache_and_compute_loss(tower, q, d, data)
    assert h.steps_done == 1


def test_bad_document_network_output_leaves_cache_unchanged(filled_handler, tower):
    h = filled_handler(CACHE)
    before = cache_state(h)
    q, d, data = good_batch()
    with pytest.raises(ValueError, match="document_network must return"):
        h.update_cache_and_compute_loss(lambda f: tower(f)[:, :3], q, d, data)
    assert not changed(before, h)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(cache_size=0), "cache_size must be a positive int"),
        (dict(num_negatives=0), "num_negatives must be an int >= 1"),
        (dict(top_k=0), "top_k must be None or an int >= 1"),
        (dict(block_size=3), "block_size=3 must be positive and divide the rows per rank"),
        (dict(data_keys=("nope",)), r"data_keys \['nope'\] are not in specs"),
        (dict(data_keys="x"), "data_keys must be a sequence"),
        (dict(embedding_key="x"), "data_keys must not contain the embedding_key"),
        (dict(specs={"x": FieldSpec((FEAT,), torch.float32), "embedding": FieldSpec((2, 4), torch.float32)}),
         "must be a 1-D floating field"),
        (dict(doc_id_key="x"), "doc_id_key"),
        (dict(reduction="avg"), "reduction must be"),
        (dict(embedding_codec="int3"), "embedding_codec must be one of"),
    ],
)
def test_bad_configuration(kwargs, message):
    args = dict(specs=specs(), cache_size=CACHE, embedding_key="embedding", data_keys=("x",))
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=message):
        ShardedCacheLossHandler(**args)


def test_spec_shapes_accept_lists_tuples_and_sizes():
    for shape in ([4], (4,), torch.Size([4])):
        assert FieldSpec(shape, torch.float32).shape == (4,)


def test_new_errors_are_the_kinds_users_already_catch():
    assert issubclass(DocumentNetworkFailed, ValueError)  # a bad tower output was a ValueError before
    assert issubclass(NonFiniteLoss, FloatingPointError)  # as NonFiniteRows


# ---- two ranks: every case of this module in one process pair ----------------------------------------
def one_rank_bad(rank: int) -> dict:
    """Rank 1's feature has the wrong dtype."""
    tower = Tower()
    h = make_handler(CACHE)
    h.load_global_rows(global_cache(CACHE, tower))
    before = cache_state(h)
    q, d, data = good_batch(3)
    if rank == 1:
        data = {"x": data["x"].to(torch.float16)}
    try:
        h.update_cache_and_compute_loss(tower, q, d, data)
        return {"raised": None}
    except BatchRejected as exc:
        return {"raised": str(exc), "unchanged": not changed(before, h)}


def widths_differ(rank: int) -> str:
    dim = DIM if rank == 0 else DIM + 1
    s = {"x": FieldSpec((FEAT,), torch.float32), "embedding": FieldSpec((dim,), torch.float32)}
    h = ShardedCacheLossHandler(s, CACHE, "embedding", ("x",))
    g = torch.Generator().manual_seed(rank)
    q, d = torch.randn(2, dim, generator=g), torch.randn(2, dim, generator=g)
    try:
        h.update_cache_and_compute_loss(lambda f: f["x"], q, d, {"x": torch.randn(2, FEAT, generator=g)})
    except BatchRejected as exc:
        return str(exc)
    return "no error"


def _bad_output(kind: str, out: torch.Tensor):
    if kind == "raises":
        raise RuntimeError("tower exploded")
    return {
        "wrong_width": lambda: torch.cat([out, out[:, :1]], 1),
        "extra_rows": lambda: torch.cat([out, out[:1]]),
        "missing_rows": lambda: out[1:],
        "tuple": lambda: (out, out),
        "not_a_tensor": lambda: out.tolist(),
        "integer": lambda: out.long(),
    }[kind]()


TOWER_KINDS = {  # kind -> text every rank's message must contain
    "raises": "RuntimeError: tower exploded",
    "wrong_width": f", {DIM + 1}]",
    "extra_rows": "got shape [",
    "missing_rows": "got shape [",
    "tuple": "got tuple",
    "not_a_tensor": "got list",
    "integer": "torch.int64",
}


def tower_failures(rank: int, in_batch: bool) -> dict:
    """A document tower that fails on rank 1 only, each way in TOWER_KINDS; then a good step."""
    tower, out = Tower(), {}
    for kind in TOWER_KINDS:
        h = make_handler(CACHE, num_negatives=2, in_batch_negatives=in_batch, collective_timeout_s=20.0)
        h.load_global_rows(global_cache(CACHE, tower))
        before = cache_state(h)

        def failing(data, kind=kind):
            result = tower(data)
            return _bad_output(kind, result) if rank == 1 else result

        q, data = rank_batch(rank, 0)
        q.requires_grad_(True)
        try:
            h.update_cache_and_compute_loss(failing, q, tower(data), data)
            rec = {"error": None}
        except Exception as exc:  # noqa: BLE001 - the test records whatever was raised
            rec = {"error": f"{type(exc).__name__}: {exc}", "unchanged": not changed(before, h)}
        # the next, good step works and the ranks agree on it
        q, data = rank_batch(rank, 1)
        q.requires_grad_(True)
        loss = h.update_cache_and_compute_loss(tower, q, tower(data), data)
        loss.backward()
        rec.update(after_ok=bool(torch.isfinite(loss)), steps=h.steps_done, fill=h.last_step.metrics["fill_fraction"])
        out[kind] = rec
    return out


def _sqrt_scores(s: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(s)  # NaN for negative dot products


def numeric_cases(rank: int) -> dict:
    """Scores that overflow on one rank (raise / skip), a NaN score transform, reductions that differ."""
    tower, out = Tower(), {}
    cases = {
        "huge_raise": dict(nonfinite="raise"),
        "huge_skip": dict(nonfinite="skip"),
        "nan_transform": dict(nonfinite="raise", score_transform=_sqrt_scores),
    }
    for name, kw in cases.items():
        h = make_handler(CACHE, num_negatives=2, collective_timeout_s=20.0, **kw)
        h.load_global_rows(global_cache(CACHE, tower))
        before = cache_state(h)
        q, data = rank_batch(rank, 0)
        if name.startswith("huge") and rank == 1:
            q[0] = 1e38  # finite, but its scores overflow
        q.requires_grad_(True)
        try:
            loss = h.update_cache_and_compute_loss(tower, q, tower(data), data)
            loss.backward()
            r = h.last_step
            out[name] = {"error": None, "loss": loss.item(), "grad_finite": bool(torch.isfinite(q.grad).all()),
                         "tower_grad_finite": all(bool(torch.isfinite(p.grad).all()) for p in tower.parameters()
                                                  if p.grad is not None),
                         "training": r.training_loss, "metrics": dict(r.metrics), "steps": h.steps_done}
        except Exception as exc:  # noqa: BLE001
            out[name] = {"error": f"{type(exc).__name__}: {exc}", "unchanged": not changed(before, h)}
        tower.zero_grad()
    h = make_handler(CACHE, reduction="mean" if rank == 0 else "sum", collective_timeout_s=20.0)
    before = cache_state(h)
    q, data = rank_batch(rank, 0)
    try:
        h.update_cache_and_compute_loss(tower, q, tower(data), data)
        out["reduction"] = {"error": None}
    except BatchRejected as exc:
        out["reduction"] = {"error": str(exc), "unchanged": not changed(before, h)}
    return out


def two_rank_cases(rank: int, world_size: int) -> dict:
    return {"one_bad": one_rank_bad(rank), "widths": widths_differ(rank), "cache": tower_failures(rank, False),
            "in_batch": tower_failures(rank, True), "numeric": numeric_cases(rank)}


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return run_ranks(2, two_rank_cases, timeout=240)


def test_one_bad_rank_stops_every_rank(two_ranks):
    for r in (r["one_bad"] for r in two_ranks):
        assert r["raised"] is not None and "rank 1: document_data['x'] must have dtype torch.float32" in r["raised"]
        assert "rank 0" not in r["raised"]
        assert r["unchanged"]


def test_different_embedding_widths_across_ranks(two_ranks):
    for message in (r["widths"] for r in two_ranks):
        assert "ranks disagree on the cache configuration" in message
        assert "specs" in message and "rank 1=" in message


@pytest.mark.parametrize("variant", ["cache", "in_batch"])
@pytest.mark.parametrize("kind", list(TOWER_KINDS))
def test_tower_failing_on_one_rank_fails_every_rank_alike(two_ranks, variant, kind):
    tower_results = [r[variant] for r in two_ranks]
    msgs = [r[kind]["error"] for r in tower_results]
    assert all(m is not None for m in msgs), msgs
    assert msgs[0] == msgs[1], msgs  # the same error on every rank
    assert msgs[0].startswith("DocumentNetworkFailed: step 0: document_network failed on rank 1"), msgs[0]
    assert "rank 0" not in msgs[0]
    assert TOWER_KINDS[kind] in msgs[0], msgs[0]
    assert "cache unchanged" in msgs[0]
    for r in tower_results:
        assert r[kind]["unchanged"], f"{kind}: the cache or the step changed"
        assert r[kind]["after_ok"] and r[kind]["steps"] == 1
    assert tower_results[0][kind]["fill"] == tower_results[1][kind]["fill"]


@pytest.fixture(scope="module")
def numeric_results(two_ranks) -> list[dict]:
    return [r["numeric"] for r in two_ranks]


@pytest.mark.parametrize("case", ["huge_raise", "nan_transform"])
def test_nonfinite_loss_raises_on_every_rank(numeric_results, case):
    msgs = [r[case]["error"] for r in numeric_results]
    assert msgs[0] is not None and msgs[0] == msgs[1], msgs
    assert msgs[0].startswith("NonFiniteLoss: step 0: "), msgs[0]
    assert "cache unchanged" in msgs[0]
    want = "1 query" if case == "huge_raise" else "6 queries"
    assert want in msgs[0], msgs[0]
    assert all(r[case]["unchanged"] for r in numeric_results)


def test_nonfinite_loss_is_skipped_and_counted(numeric_results):
    r0, r1 = (r["huge_skip"] for r in numeric_results)
    assert r0["error"] is None and r1["error"] is None, (r0, r1)
    for r in (r0, r1):
        assert r["metrics"]["nonfinite_queries"] == 1.0  # the same global count on every rank
        assert r["steps"] == 1
        assert r["grad_finite"] and r["tower_grad_finite"]
        assert torch.isfinite(torch.tensor(r["loss"]))
    assert r1["training"][0] == 0.0  # the overflowing query is left out of the loss
    assert torch.isfinite(r1["training"]).all() and (r1["training"][1:] != 0).all()
    # the loss is the mean of the per-query losses, the left-out query counting as 0
    assert r1["loss"] == pytest.approx(r1["training"].sum().item() / 3, rel=1e-6)


def test_different_reduction_is_rejected_on_every_rank(numeric_results):
    for r in numeric_results:
        got = r["reduction"]
        assert got["error"] is not None, "reduction differing between ranks was accepted"
        assert "reduction: rank 0='mean', rank 1='sum'" in got["error"], got["error"]
        assert got["unchanged"]


def indivisible(rank: int, world_size: int) -> str:
    try:
        make_handler(16, block_size=1)
    except ValueError as exc:
        return str(exc)
    return "no error"


def test_cache_size_must_divide_by_world_size():
    for message in run_ranks(3, indivisible, timeout=60):
        assert "cache_size=16 does not divide by the world size 3" in message
