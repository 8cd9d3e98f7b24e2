"""The handler as a module: its state_dict holds the cache and loads back exactly (or not at all), .to() and
dtype casts, evaluation modes that write nothing, autocast, DDP's buffer broadcast, TensorBoard logging.

The two-rank cases (evaluation with in-batch negatives, DDP with its default buffer broadcast) run in one
pair of gloo processes for the module.
"""
from __future__ import annotations

import gc

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from engine_cases import DIM, FEAT, Tower, cache_state, changed, global_batch, global_cache, make_handler, rank_batch
from sharded_negcache import BatchRejected, FieldSpec, ShardedCacheLossHandler
from sharded_negcache.testing import run_ranks

CACHE = 16


def batch(seed: int, n: int = 4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, DIM, generator=g), {"x": torch.randn(n, FEAT, generator=g)}


def step(h, tower, seed):
    q, data = batch(seed)
    with torch.no_grad():
        h.update_cache_and_compute_loss(tower, q, tower(data), data)
    return h.last_step


def test_state_dict_holds_the_cache_and_resumes_exactly():
    tower = Tower()
    a = make_handler(24, num_negatives=3, seed=13)
    a.load_global_rows(global_cache(24, tower))
    step(a, tower, 1)
    sd = a.state_dict()
    assert {"store.embeddings", "store.age", "store.filled", "store.features.x", "step_count", "seed"} <= set(sd)
    assert int(sd["step_count"]) == 1 and int(sd["seed"]) == 13

    b = make_handler(24, num_negatives=3, seed=0)  # seed and step come from the state_dict
    b.load_state_dict(sd)
    assert b.steps_done == 1
    ra, rb = step(a, tower, 2), step(b, tower, 2)
    assert torch.equal(ra.sampled_rows, rb.sampled_rows)
    assert torch.equal(ra.training_loss, rb.training_loss)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_to_moves_every_buffer():
    h = make_handler(24)
    h.to(torch.device("meta"))
    assert {t.device.type for t in h.buffers()} == {"meta"}
    assert h.device.type == "meta"


def test_cache_device_is_fixed_after_the_first_step():
    h = make_handler(24)  # no device given: follows the first batch (CPU here), then stays
    tower = Tower()
    step(h, tower, 0)
    q, data = batch(1)
    with pytest.raises(BatchRejected, match="query_embeddings is on meta but the cache is on cpu"):
        h.update_cache_and_compute_loss(tower, q.to("meta"), tower(data), data)


def test_writer_logs_the_reference_tags(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    tower = Tower()
    h = make_handler(24, num_negatives=2)
    h.load_global_rows(global_cache(24, tower))
    writer = SummaryWriter(str(tmp_path))
    q, data = batch(3)
    with torch.no_grad():
        h.update_cache_and_compute_loss(tower, q, tower(data), data, writer=(writer, 41))
        h.update_cache_and_compute_loss(tower, q, tower(data), data, writer=writer)
    writer.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"cache/interpretable_prediction_loss", "cache/staleness", "cache/fill_fraction",
            "cache/sampled_age_mean"} <= tags
    events = acc.Scalars("cache/interpretable_prediction_loss")
    assert [e.step for e in events] == [41, 1]  # explicit step, then the handler's step counter
    assert events[1].value == pytest.approx(h.last_step.interpretable_loss.mean().item(), rel=1e-5)
    fill = acc.Scalars("cache/fill_fraction")[-1].value
    assert fill == pytest.approx(h.store.filled.float().mean().item())


def test_gathered_rows_are_a_snapshot_that_later_steps_leave_alone():
    """gather_global_rows() returns copies: the rows a step rewrites (refreshed embeddings, inserted rows, ages)
    change in the cache but not in a snapshot taken before it."""
    tower = Tower(seed=3)  # a tower unlike the cached rows' one: every refreshed row changes
    h = make_handler(24, num_negatives=3)
    h.load_global_rows(global_cache(24, tower))
    snap = h.gather_global_rows()
    kept = {k: v.clone() for k, v in snap.items()}
    step(h, Tower(), 1)
    after = h.gather_global_rows()
    assert not torch.equal(after["embedding"], kept["embedding"])  # the step did rewrite rows
    for k, v in kept.items():
        assert torch.equal(snap[k], v), f"{k}: the snapshot changed with the cache"


def _huge_step(nonfinite: str):
    """8 queries scaled so that each per-query loss is finite (about 1e38) but their float32 sum is not."""
    tower = Tower()
    h = make_handler(16, num_negatives=2, nonfinite=nonfinite)
    h.load_global_rows(global_cache(16, tower))
    before = {k: v.clone() for k, v in h.store.export_rows().items()}
    q, data = batch(0, n=8)
    q = (q.sign() * 7e36).requires_grad_(True)
    return h, tower, q, data, before


def test_finite_losses_whose_reduction_overflows_raise_nonfinite_loss():
    from sharded_negcache import NonFiniteLoss

    h, tower, q, data, before = _huge_step("raise")
    with pytest.raises(NonFiniteLoss, match=r"step 0: .*8 queries .*cache unchanged"):
        h.update_cache_and_compute_loss(tower, q, tower(data), data)
    assert h.steps_done == 0
    for k, v in h.store.export_rows().items():
        assert torch.equal(v, before[k]), k


def test_finite_losses_whose_reduction_overflows_are_skipped_and_counted():
    h, tower, q, data, _ = _huge_step("skip")
    loss = h.update_cache_and_compute_loss(tower, q, tower(data), data)
    per_query = h.last_step.training_loss
    assert torch.isfinite(loss) and loss.item() == 0.0  # every query of the overflowing rank is left out
    assert h.last_step.metrics["nonfinite_queries"] == 8.0 and h.steps_done == 1
    assert torch.equal(per_query, torch.zeros(8))


def test_config_holds_every_setting_that_changes_the_numbers():
    h = make_handler(CACHE, reduction="global_mean", reencode_on_every_rank=True)
    cfg = h.config()
    assert cfg["reduction"] == "global_mean" and cfg["reencode_on_every_rank"] is True
    for key in ("block_size", "nonfinite", "score_transform", "in_batch_negatives", "top_k", "num_negatives",
                "use_lru", "codec", "seed", "step", "specs", "cache_size"):
        assert key in cfg, key


# ---- two ranks: evaluation with in-batch negatives, DDP's buffer broadcast ---------------------------
def evaluation_in_batch(rank: int) -> dict:
    """Evaluation with in-batch negatives at two ranks: the same loss as a training twin, nothing written."""
    tower = Tower()
    train, ev = (make_handler(CACHE, num_negatives=2, in_batch_negatives=True, collective_timeout_s=20.0)
                 for _ in range(2))
    for h in (train, ev):
        h.load_global_rows(global_cache(CACHE, tower))
    q, data = rank_batch(rank, 0)
    want = train.update_cache_and_compute_loss(tower, q, tower(data), data).item()
    before = cache_state(ev)
    ev.eval()
    with torch.inference_mode():
        got = ev.update_cache_and_compute_loss(tower, q, tower(data), data).item()
    return {"want": want, "got": got, "unchanged": not changed(before, ev),
            "sampled_equal": torch.equal(ev.last_step.sampled_rows, train.last_step.sampled_rows)}


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


def two_rank_cases(rank: int, world_size: int) -> dict:
    return {"eval": evaluation_in_batch(rank), "ddp": ddp_defaults(rank)}


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return run_ranks(2, two_rank_cases, timeout=240)


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


# ---- dtype casts leave the cache as its codec stores it ------------------------------------------------
def _store_dtypes(h) -> dict:
    return {k: v.dtype for k, v in h.store.state_dict().items()}


@pytest.mark.parametrize("cast", ["to_bf16", "half", "double", "float_to_fp16_then_back"])
@pytest.mark.parametrize("codec", ["fp32", "bf16", "int8"])
def test_dtype_casts_leave_the_cache_as_stored(cast, codec, filled_handler, tower):
    h = filled_handler(CACHE, embedding_codec=codec)
    want, rows = _store_dtypes(h), {k: v.clone() for k, v in h.store.state_dict().items()}
    {"to_bf16": lambda: h.to(torch.bfloat16), "half": h.half, "double": h.double,
     "float_to_fp16_then_back": lambda: h.to(torch.float16).float()}[cast]()
    assert _store_dtypes(h) == want
    for k, v in h.store.state_dict().items():
        assert torch.equal(v, rows[k]), k
    q, data = rank_batch(0, 0)
    with torch.no_grad():
        h.update_cache_and_compute_loss(tower, q, tower(data), data)
    assert h.steps_done == 1


def test_device_moves_still_move_the_cache():
    h = make_handler(CACHE)
    h.to("meta", torch.float16)
    assert {t.device.type for t in h.store.state_dict().values()} == {"meta"}
    assert h.store.embeddings.dtype == torch.float32


# ---- evaluation writes nothing ---------------------------------------------------------------------
def _twin_handlers():
    tower = Tower()
    a, b = (make_handler(CACHE, num_negatives=2, seed=4) for _ in range(2))
    for h in (a, b):
        h.load_global_rows(global_cache(CACHE, tower))
    return tower, a, b


@pytest.mark.parametrize("mode", ["eval", "inference_mode", "score"])
def test_evaluation_computes_the_loss_and_writes_nothing(mode):
    tower, train, ev = _twin_handlers()
    q, data = rank_batch(0, 0)
    d = tower(data)
    with torch.no_grad():
        want_loss = train.update_cache_and_compute_loss(tower, q, d, data)
    want = train.last_step
    before = cache_state(ev)
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
    assert not changed(before, ev), "evaluation wrote the cache or advanced the step"
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
    q, data = rank_batch(0, 0)
    q.requires_grad_(True)
    result = h.score(tower, q, tower(data), data)
    result.loss.backward()
    assert q.grad is not None and torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0
    assert tower.lin.weight.grad is not None  # the re-encoded negatives carry the tower's gradient


def test_no_grad_in_train_mode_still_writes():
    """Documented choice (design §6): the module's mode decides, as for BatchNorm's running statistics."""
    tower, h, _ = _twin_handlers()
    q, data = rank_batch(0, 0)
    with torch.no_grad():
        h.update_cache_and_compute_loss(tower, q, tower(data), data)
    assert h.steps_done == 1 and h.last_step.inserted_rows.numel() == 3


# ---- the caller's autocast does not change the scoring precision ------------------------------------
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


# ---- a state_dict that does not fit changes nothing ---------------------------------------------------
def test_loading_another_shard_size_changes_nothing():
    tower = Tower()
    big, small = make_handler(2 * CACHE, seed=9), make_handler(CACHE, seed=1)
    small.load_global_rows(global_cache(CACHE, tower))
    for s in range(2):
        q, data = rank_batch(0, s)
        with torch.no_grad():
            small.update_cache_and_compute_loss(tower, q, tower(data), data)
            big.update_cache_and_compute_loss(tower, q, tower(data), data)
    big.step_count.fill_(5)
    before = cache_state(small)
    with pytest.raises(ValueError, match=r"store\.embeddings.*\[32, 8\].*\[16, 8\].*nothing was loaded"):
        small.load_state_dict(big.state_dict())
    assert not changed(before, small) and small.steps_done == 2 and int(small.seed) == 1


def test_loading_a_state_dict_with_missing_keys_changes_nothing():
    small = make_handler(CACHE, seed=1)
    sd = small.state_dict()
    sd["step_count"] = torch.tensor(7)
    del sd["store.age"]
    before = cache_state(small)
    with pytest.raises(ValueError, match=r"missing \['store\.age'\]"):
        small.load_state_dict(sd)
    assert not changed(before, small)
    small.load_state_dict(sd, strict=False)  # non-strict: the user asked for a partial load
    assert small.steps_done == 7


def test_step_result_names_the_reencoded_rows_and_the_towers_embeddings_of_them():
    tower = Tower()
    rows = global_cache(32, tower)
    h = make_handler(32, num_negatives=3)
    h.load_global_rows(rows)
    batch = global_batch(6, tower)
    q = batch["q"].clone().requires_grad_(True)
    h.update_cache_and_compute_loss(tower, q, tower({"x": batch["x"]}), {"x": batch["x"]})
    res = h.last_step
    sampled = res.sampled_rows[res.sampled_rows >= 0]
    assert sampled.numel() > 0
    assert torch.equal(res.reencoded_rows, torch.unique(sampled))  # every distinct sampled row, ascending
    with torch.no_grad():
        want = tower({"x": rows["x"][res.reencoded_rows]})
    torch.testing.assert_close(res.reencoded.detach(), want, rtol=0, atol=0)  # the tower's output for those rows
    assert res.reencoded.requires_grad  # as the loss scored them: the tower's gradient flows through them
