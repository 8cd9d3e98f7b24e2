"""Issue 12 (hardening), items 2, 5, 7-12: each failure an adversarial run found, kept fixed.

Two-rank cases run in real gloo processes (one process pair for the module, to pay start-up once);
single-process cases check module behaviour (dtype casts, eval mode, autocast, state_dict loading).
Every failing call must leave the cache exactly as it was, on every rank.
"""
from __future__ import annotations

import gc

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_utils import run_ranks
from engine_cases import DIM, FEAT, Tower, global_cache, make_handler
from sharded_negcache import (
    BatchRejected, DocumentNetworkFailed, FieldSpec, NonFiniteLoss, ShardedCacheLossHandler,
)

CACHE = 16


def snapshot(h) -> dict:
    rows = {k: v.clone() for k, v in h.store.export_rows().items()}
    rows["step"] = torch.tensor(h.steps_done)
    rows["seed"] = h.seed.clone()
    return rows


def unchanged(before: dict, h) -> bool:
    after = snapshot(h)
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def batch(rank: int, step: int, n: int = 3):
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(n, DIM, generator=g), {"x": torch.randn(n, FEAT, generator=g)}


# ---- item 2: a document tower that fails on one rank only ------------------------------------------
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
    tower, out = Tower(), {}
    for kind in TOWER_KINDS:
        h = make_handler(CACHE, num_negatives=2, in_batch_negatives=in_batch, collective_timeout_s=20.0)
        h.load_global_rows(global_cache(CACHE, tower))
        before = snapshot(h)

        def failing(data, kind=kind):
            result = tower(data)
            return _bad_output(kind, result) if rank == 1 else result

        q, data = batch(rank, 0)
        q.requires_grad_(True)
        try:
            h.update_cache_and_compute_loss(failing, q, tower(data), data)
            rec = {"error": None}
        except Exception as exc:  # noqa: BLE001 - the test records whatever was raised
            rec = {"error": f"{type(exc).__name__}: {exc}", "unchanged": unchanged(before, h)}
        # the next, good step works and the ranks agree on it
        q, data = batch(rank, 1)
        q.requires_grad_(True)
        loss = h.update_cache_and_compute_loss(tower, q, tower(data), data)
        loss.backward()
        rec.update(after_ok=bool(torch.isfinite(loss)), steps=h.steps_done, fill=h.last_step.metrics["fill_fraction"])
        out[kind] = rec
    return out


def evaluation_in_batch(rank: int) -> dict:
    """Evaluation with in-batch negatives at two ranks: the same loss as a training twin, nothing written."""
    tower = Tower()
    train, ev = (make_handler(CACHE, num_negatives=2, in_batch_negatives=True, collective_timeout_s=20.0)
                 for _ in range(2))
    for h in (train, ev):
        h.load_global_rows(global_cache(CACHE, tower))
    q, data = batch(rank, 0)
    want = train.update_cache_and_compute_loss(tower, q, tower(data), data).item()
    before = snapshot(ev)
    ev.eval()
    with torch.inference_mode():
        got = ev.update_cache_and_compute_loss(tower, q, tower(data), data).item()
    return {"want": want, "got": got, "unchanged": unchanged(before, ev),
            "sampled_equal": torch.equal(ev.last_step.sampled_rows, train.last_step.sampled_rows)}


def two_rank_cases(rank: int, world: int) -> dict:
    """Every two-rank case of this module in one process pair (start-up is paid once)."""
    return {"cache": tower_failures(rank, False), "in_batch": tower_failures(rank, True),
            "numeric": numeric_cases(rank), "eval": evaluation_in_batch(rank), "ddp": ddp_defaults(rank)}


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return run_ranks(2, two_rank_cases, timeout=240)


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


# ---- items 5 and 12, two ranks -----------------------------------------------------------------
def _sqrt_scores(s: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(s)  # NaN for negative dot products


def numeric_cases(rank: int) -> dict:
    tower, out = Tower(), {}
    cases = {
        "huge_raise": dict(nonfinite="raise"),
        "huge_skip": dict(nonfinite="skip"),
        "nan_transform": dict(nonfinite="raise", score_transform=_sqrt_scores),
    }
    for name, kw in cases.items():
        h = make_handler(CACHE, num_negatives=2, collective_timeout_s=20.0, **kw)
        h.load_global_rows(global_cache(CACHE, tower))
        before = snapshot(h)
        q, data = batch(rank, 0)
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
            out[name] = {"error": f"{type(exc).__name__}: {exc}", "unchanged": unchanged(before, h)}
        tower.zero_grad()
    # item 12: different reductions on the two ranks
    h = make_handler(CACHE, reduction="mean" if rank == 0 else "sum", collective_timeout_s=20.0)
    before = snapshot(h)
    q, data = batch(rank, 0)
    try:
        h.update_cache_and_compute_loss(tower, q, tower(data), data)
        out["reduction"] = {"error": None}
    except BatchRejected as exc:
        out["reduction"] = {"error": str(exc), "unchanged": unchanged(before, h)}
    return out


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


def test_new_errors_are_the_kinds_users_already_catch():
    assert issubclass(DocumentNetworkFailed, ValueError)  # a bad tower output was a ValueError before
    assert issubclass(NonFiniteLoss, FloatingPointError)  # as NonFiniteRows


def test_config_holds_every_setting_that_changes_the_numbers():
    h = make_handler(CACHE, reduction="global_mean", reencode_on_every_rank=True)
    cfg = h.config()
    assert cfg["reduction"] == "global_mean" and cfg["reencode_on_every_rank"] is True
    for key in ("block_size", "nonfinite", "score_transform", "in_batch_negatives", "top_k", "num_negatives",
                "use_lru", "codec", "seed", "step", "specs", "cache_size"):
        assert key in cfg, key


# ---- item 7: DDP with default broadcast_buffers must not copy rank 0's shard -----------------------
class WithCache(torch.nn.Module):
    """A two-tower model that owns its cache handler (so DDP sees the handler as a submodule)."""

    def __init__(self) -> None:
        super().__init__()
        self.query = torch.nn.Linear(FEAT, DIM)
        self.doc = torch.nn.Linear(FEAT, DIM)
        self.cache = make_handler(CACHE, with_ids=True, num_negatives=2)

    def forward(self, qx: torch.Tensor, data: dict) -> torch.Tensor:
        return self.cache(lambda f: self.doc(f["x"]), self.query(qx), self.doc(data["x"]), data)


def ddp_defaults(rank: int) -> dict:
    torch.manual_seed(0)
    inner = WithCache()
    rows = global_cache(CACHE, Tower(), empty_every=CACHE + 1, with_ids=True)  # as if resumed before wrapping
    rows["doc_id"] = (1000 * (torch.arange(CACHE) // (CACHE // 2)) + 900 + torch.arange(CACHE)).unsqueeze(1)
    inner.cache.load_global_rows(rows)  # rank r's rows hold ids 1000 r + ...
    model = DDP(inner)  # broadcast_buffers=True: DDP's default (its constructor broadcasts rank 0's buffers)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(2):
        g = torch.Generator().manual_seed(10 * step + rank)
        qx, x = torch.randn(3, FEAT, generator=g), torch.randn(3, FEAT, generator=g)
        ids = (1000 * rank + 10 * step + torch.arange(3)).unsqueeze(1)  # the rank is in the id
        loss = model(qx, {"x": x, "doc_id": ids})
        opt.zero_grad()
        loss.backward()
        opt.step()
    store = model.module.cache.store
    ids = store.feature("doc_id")[store.filled].flatten()
    out = {"ids": ids, "in_state_dict": "cache.store.embeddings" in model.module.state_dict(),
           "buffers": {n for n, _ in model.module.named_buffers()},
           "params": [p.detach().clone() for p in model.parameters()]}
    del model, opt  # release DDP before the process group (torch 2.13 + gloo can abort at exit otherwise)
    gc.collect()
    return out


def test_ddp_buffer_broadcast_leaves_each_shard_alone(two_ranks):
    results = [r["ddp"] for r in two_ranks]
    for rank, r in enumerate(results):
        assert r["ids"].numel() == 8  # 2 of the resumed rows and the 6 inserted ones
        assert torch.all(r["ids"] // 1000 == rank), f"rank {rank} holds another rank's rows: {r['ids'].tolist()}"
    for r in results:
        assert r["in_state_dict"]
        assert not any(n.startswith("cache.store.") for n in r["buffers"]), r["buffers"]
    for a, b in zip(results[0]["params"], results[1]["params"]):
        assert torch.equal(a, b)  # DDP still trains the towers in step


# ---- item 8: dtype casts leave the cache as its codec stores it ----------------------------------------
def _store_dtypes(h) -> dict:
    return {k: v.dtype for k, v in h.store.state_dict().items()}


@pytest.mark.parametrize("cast", ["to_bf16", "half", "double", "float_to_fp16_then_back"])
@pytest.mark.parametrize("codec", ["fp32", "bf16", "int8"])
def test_dtype_casts_leave_the_cache_as_stored(cast, codec):
    tower = Tower()
    h = make_handler(CACHE, embedding_codec=codec)
    h.load_global_rows(global_cache(CACHE, tower))
    want, rows = _store_dtypes(h), {k: v.clone() for k, v in h.store.state_dict().items()}
    {"to_bf16": lambda: h.to(torch.bfloat16), "half": h.half, "double": h.double,
     "float_to_fp16_then_back": lambda: h.to(torch.float16).float()}[cast]()
    assert _store_dtypes(h) == want
    for k, v in h.store.state_dict().items():
        assert torch.equal(v, rows[k]), k
    q, data = batch(0, 0)
    with torch.no_grad():
        h.update_cache_and_compute_loss(tower, q, tower(data), data)
    assert h.steps_done == 1


def test_device_moves_still_move_the_cache():
    h = make_handler(CACHE)
    h.to("meta", torch.float16)
    assert {t.device.type for t in h.store.state_dict().values()} == {"meta"}
    assert h.store.embeddings.dtype == torch.float32


# ---- item 9: evaluation writes nothing -------------------------------------------------------------
def _twin_handlers():
    tower = Tower()
    a, b = (make_handler(CACHE, num_negatives=2, seed=4) for _ in range(2))
    for h in (a, b):
        h.load_global_rows(global_cache(CACHE, tower))
    return tower, a, b


@pytest.mark.parametrize("mode", ["eval", "inference_mode", "score"])
def test_evaluation_computes_the_loss_and_writes_nothing(mode):
    tower, train, ev = _twin_handlers()
    q, data = batch(0, 0)
    d = tower(data)
    with torch.no_grad():
        want_loss = train.update_cache_and_compute_loss(tower, q, d, data)
    want = train.last_step
    before = snapshot(ev)
    calls = []

    def counting(f):
        calls.append(f["x"].shape[0])
        return tower(f)

    if mode == "eval":
        ev.eval()
        loss, got = ev.update_cache_and_compute_loss(counting, q, d, data), None
    elif mode == "inference_mode":
        with torch.inference_mode():
            loss, got = ev.update_cache_and_compute_loss(counting, q, d, data), None
    else:
        got = ev.score(counting, q, d, data)
        loss = got.loss
    got = got or ev.last_step
    assert unchanged(before, ev), "evaluation wrote the cache or advanced the step"
    assert calls, "the tower was not called on the sampled rows"
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-6)
    assert torch.equal(got.sampled_rows, want.sampled_rows)
    assert torch.allclose(got.lse, want.lse)
    assert got.metrics["interpretable_loss"] == pytest.approx(want.metrics["interpretable_loss"], rel=1e-6)
    assert got.refreshed_rows.numel() == 0 and got.inserted_rows.numel() == 0
    # a training step after evaluation is the step that would have come without it
    ev.train()
    ev.update_cache_and_compute_loss(tower, q, d.detach(), data)
    assert torch.equal(ev.last_step.sampled_rows, want.sampled_rows)
    for k, v in ev.state_dict().items():
        assert torch.equal(v, train.state_dict()[k]), k


def test_evaluation_with_in_batch_negatives_on_two_ranks(two_ranks):
    for r in (r["eval"] for r in two_ranks):
        assert r["unchanged"] and r["sampled_equal"]
        assert r["got"] == pytest.approx(r["want"], rel=1e-6)


def test_score_keeps_the_gradient():
    tower, _, h = _twin_handlers()
    q, data = batch(0, 0)
    q.requires_grad_(True)
    result = h.score(tower, q, tower(data), data)
    result.loss.backward()
    assert q.grad is not None and torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0
    assert tower.lin.weight.grad is not None  # the re-encoded negatives carry the tower's gradient


def test_no_grad_in_train_mode_still_writes():
    """Documented choice (design §6): the module's mode decides, as for BatchNorm's running statistics."""
    tower, h, _ = _twin_handlers()
    q, data = batch(0, 0)
    with torch.no_grad():
        h.update_cache_and_compute_loss(tower, q, tower(data), data)
    assert h.steps_done == 1 and h.last_step.inserted_rows.numel() == 3


# ---- item 10: the caller's autocast does not change the scoring precision ----------------------------
def test_autocast_does_not_lower_the_scoring_precision():
    specs_ = {"x": FieldSpec((FEAT,), torch.float32), "embedding": FieldSpec((64,), torch.float32)}
    a, b = (ShardedCacheLossHandler(specs_, 64, "embedding", ("x",), score_transform=20.0, num_negatives=2)
            for _ in range(2))
    g = torch.Generator().manual_seed(3)
    rows = {"x": torch.randn(64, FEAT, generator=g), "embedding": torch.randn(64, 64, generator=g) / 8,
            "age": torch.zeros(64, dtype=torch.int64), "filled": torch.ones(64, dtype=torch.bool)}
    a.load_global_rows(rows)
    b.load_global_rows(rows)
    q, d = torch.randn(5, 64, generator=g) / 8, torch.randn(5, 64, generator=g) / 8
    data = {"x": torch.randn(5, FEAT, generator=g)}
    lin = torch.nn.Linear(FEAT, 64)
    with torch.no_grad():
        a.update_cache_and_compute_loss(lambda f: lin(f["x"]), q, d, data)
        with torch.autocast("cpu", torch.bfloat16):
            b.update_cache_and_compute_loss(lambda f: lin(f["x"]), q, d, data)
    want, got = a.last_step, b.last_step
    # independent fp64 log-partition of the same scores
    lse64 = torch.logsumexp(20.0 * q.double() @ rows["embedding"].double().t(), 1)
    assert torch.allclose(want.lse.double(), lse64, atol=1e-5)
    assert torch.allclose(got.lse, want.lse, atol=1e-6, rtol=0), (got.lse - want.lse).abs().max()
    assert torch.equal(got.sampled_rows, want.sampled_rows)
    assert torch.allclose(got.prob_positive, want.prob_positive, atol=1e-6)


# ---- item 11: a state_dict of another shard size changes nothing --------------------------------------
def test_loading_another_shard_size_changes_nothing():
    tower = Tower()
    big, small = make_handler(2 * CACHE, seed=9), make_handler(CACHE, seed=1)
    small.load_global_rows(global_cache(CACHE, tower))
    for s in range(2):
        q, data = batch(0, s)
        with torch.no_grad():
            small.update_cache_and_compute_loss(tower, q, tower(data), data)
            big.update_cache_and_compute_loss(tower, q, tower(data), data)
    big.step_count.fill_(5)
    before = snapshot(small)
    with pytest.raises(ValueError, match=r"store\.embeddings.*\[32, 8\].*\[16, 8\].*nothing was loaded"):
        small.load_state_dict(big.state_dict())
    assert unchanged(before, small) and small.steps_done == 2 and int(small.seed) == 1


def test_loading_a_state_dict_with_missing_keys_changes_nothing():
    small = make_handler(CACHE, seed=1)
    sd = small.state_dict()
    sd["step_count"] = torch.tensor(7)
    del sd["store.age"]
    before = snapshot(small)
    with pytest.raises(ValueError, match=r"missing \['store\.age'\]"):
        small.load_state_dict(sd)
    assert unchanged(before, small)
    small.load_state_dict(sd, strict=False)  # non-strict: the user asked for a partial load
    assert small.steps_done == 7
