"""Property test (issue 12): random sequences of valid and invalid calls on 2 gloo ranks.

Hypothesis draws a sequence of operations: good steps (batch sizes per rank, zero included), batches
with one bad field on one rank, a document tower that fails on one rank (raises, wrong shape, a tuple),
evaluation calls (``handler.eval()``), and a save / load in between (plain ``state_dict`` into a new
handler, or ``sharded_negcache.checkpoint`` through DCP). After every call the test process checks,
from every rank's record:

- all ranks agree on the outcome (the same exception and message, or success) and on the step;
- no stored embedding of a filled row is NaN/Inf;
- a rejected call, an evaluation and a save/load leave every shard exactly as it was;
- after a good step, fill, ages and the documents in each row are what an independent model of the
  cache policy predicts (refresh of the sampled rows under LRU, inserts into the oldest rows: empty
  first, then highest age, ties to the lowest slot, then every age + 1), and every sampled row was
  filled before the step.

The two ranks are a :class:`test_properties.RankPool` of size 2, started once for the module.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sharded_negcache import (
    BatchRejected, DocumentNetworkFailed, FieldSpec, NonFiniteLoss, NonFiniteRows, ShardedCacheLossHandler,
)
from test_properties import RankPool

WORLD = 2
BAD_FIELDS = ("dtype", "missing", "nan_query", "too_large", "width")
TOWER_FAILURES = ("raises", "shape", "tuple")
EXPECTED = (BatchRejected, DocumentNetworkFailed, NonFiniteRows, NonFiniteLoss)


# ---- scenarios -----------------------------------------------------------------------------------
@st.composite
def sequences(draw) -> dict:
    n = draw(st.sampled_from([2, 4]))
    sizes = st.lists(st.integers(0, n), min_size=WORLD, max_size=WORLD)
    rank = st.integers(0, WORLD - 1)
    op = st.one_of(
        st.tuples(st.just("step"), sizes),
        st.tuples(st.just("bad"), sizes, rank, st.sampled_from(BAD_FIELDS)),
        st.tuples(st.just("tower"), sizes, rank, st.sampled_from(TOWER_FAILURES)),
        st.tuples(st.just("eval"), sizes),
        st.tuples(st.just("reload"), st.sampled_from(["state_dict", "checkpoint"])),
    )
    return {
        "world": WORLD, "rows": n, "dim": draw(st.integers(1, 3)), "feat": draw(st.integers(1, 2)),
        "use_lru": draw(st.booleans()), "num_negatives": draw(st.integers(1, 2)),
        "in_batch": draw(st.booleans()), "seed": draw(st.integers(0, 2**16)),
        "ops": [("step", [n, n])] + draw(st.lists(op, min_size=2, max_size=6)),
    }


def build(case: dict, group) -> ShardedCacheLossHandler:
    specs = {"x": FieldSpec((case["feat"],), torch.float32), "key": FieldSpec((1,), torch.int64),
             "embedding": FieldSpec((case["dim"],), torch.float32)}
    return ShardedCacheLossHandler(
        specs, WORLD * case["rows"], "embedding", ("x", "key"), score_transform=2.0,
        num_negatives=case["num_negatives"], seed=case["seed"] % 997, use_lru=case["use_lru"],
        process_group=group, in_batch_negatives=case["in_batch"], collective_timeout_s=20.0,
    )


class FailingTower(torch.nn.Module):
    """A fixed linear tower; ``fail`` makes it raise or return a wrong output."""

    def __init__(self, case: dict) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(case["seed"])
        self.lin = torch.nn.Linear(case["feat"], case["dim"])
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(case["dim"], case["feat"], generator=g))
        self.fail: str | None = None

    def forward(self, data: dict) -> torch.Tensor:
        out = self.lin(data["x"])
        if self.fail == "raises":
            raise RuntimeError("tower exploded")
        if self.fail == "shape":
            return torch.cat([out, out[:1]])
        if self.fail == "tuple":
            return out, out
        return out


def make_batch(case: dict, index: int, rank: int, op: tuple):
    """This rank's inputs for operation ``index`` (one bad field if ``op`` says so for this rank)."""
    b = op[1][rank]
    bad = op[3] if op[0] == "bad" and op[2] == rank else None
    if bad == "too_large":
        b = case["rows"] + 1
    if bad == "nan_query":
        b = max(b, 1)
    g = torch.Generator().manual_seed(case["seed"] * 1000 + index * 10 + rank)
    x = torch.randn(b, case["feat"], generator=g)
    key = (1000 * (index + 1) + 100 * rank + torch.arange(b)).unsqueeze(1)
    q = torch.randn(b, case["dim"], generator=g)
    data = {"x": x, "key": key}
    if bad == "dtype":
        data["x"] = x.double()
    elif bad == "missing":
        del data["key"]
    elif bad == "nan_query":
        q[0, 0] = float("nan")
    elif bad == "width":
        q = torch.cat([q, q[:, :1]], 1)
    return q, data


def _export(h: ShardedCacheLossHandler) -> dict:
    return {k: v.detach().numpy().copy() for k, v in h.store.export_rows().items()}


def run_sequence(rank: int, case: dict, group) -> list[dict]:
    """Runs the scenario on this rank; per operation, the outcome and the shard before and after."""
    from sharded_negcache import checkpoint

    torch.manual_seed(0)
    h, tower, out = build(case, group), FailingTower(case), []
    for index, op in enumerate(case["ops"]):
        rec = {"before": _export(h), "step_before": h.steps_done}
        try:
            if op[0] == "reload":
                fresh = build(case, group)
                if op[1] == "state_dict":
                    fresh.load_state_dict(h.state_dict())
                else:
                    path = os.path.join(case["dir"], f"ck{index}")
                    checkpoint.save({"cache": checkpoint.CacheCheckpoint(h)}, path, process_group=group)
                    checkpoint.load({"cache": checkpoint.CacheCheckpoint(fresh)}, path, process_group=group)
                h = fresh
                rec["outcome"] = "ok"
            else:
                q, data = make_batch(case, index, rank, op)
                q.requires_grad_(True)
                tower.fail = op[3] if op[0] == "tower" and op[2] == rank else None
                d = tower.lin(data["x"].float()) if "x" in data else torch.zeros(q.shape[0], case["dim"])
                h.train(op[0] != "eval")
                loss = h.update_cache_and_compute_loss(tower, q, d, data)
                loss.backward()
                r = h.last_step
                rec.update(outcome="ok", loss_finite=bool(torch.isfinite(loss)), sampled=r.sampled_rows.numpy(),
                           refreshed=r.refreshed_rows.numpy(), inserted=r.inserted_rows.numpy(),
                           keys=data["key"][:, 0].numpy())
        except EXPECTED as exc:
            rec["outcome"] = f"{type(exc).__name__}: {exc}"
        rec["after"], rec["step_after"] = _export(h), h.steps_done
        out.append(rec)
    return out


# ---- the independent model and the checks --------------------------------------------------------
class Model:
    """The cache policy of design §4 on global rows, written from the design, not from the engine."""

    def __init__(self, case: dict) -> None:
        self.n, self.lru = case["rows"], case["use_lru"]
        size = WORLD * self.n
        self.filled = np.zeros(size, dtype=bool)
        self.age = np.zeros(size, dtype=np.int64)
        self.key = np.zeros(size, dtype=np.int64)

    def step(self, refreshed: set[int], inserted_keys: list[list[int]]) -> None:
        if self.lru:
            for j in refreshed:
                self.age[j] = -1
        for r, keys in enumerate(inserted_keys):
            lo = r * self.n
            order = sorted(range(self.n), key=lambda s: (bool(self.filled[lo + s]), -self.age[lo + s], s))
            for s, k in zip(order, keys):
                self.filled[lo + s], self.age[lo + s], self.key[lo + s] = True, -1, k
        self.age += 1


def _cat(recs: list[dict], when: str) -> dict:
    return {k: np.concatenate([r[when][k] for r in recs]) for k in recs[0][when]}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k], equal_nan=True) for k in a)


def check_sequence(case: dict, per_rank: list[list[dict]]) -> None:
    model = Model(case)
    for index, op in enumerate(case["ops"]):
        where = f"op {index} {op}"
        recs = [r[index] for r in per_rank]
        outcomes = [r["outcome"] for r in recs]
        assert len(set(outcomes)) == 1, f"{where}: ranks disagree: {outcomes}"
        assert len({r["step_after"] for r in recs}) == 1, f"{where}: steps differ"
        before, after = _cat(recs, "before"), _cat(recs, "after")
        assert np.isfinite(after["embedding"][after["filled"]]).all(), f"{where}: NaN/Inf stored"
        outcome = outcomes[0]
        if op[0] == "bad":
            assert outcome.startswith("BatchRejected: ") and f"rank {op[2]}: " in outcome, f"{where}: {outcome}"
            assert f"rank {1 - op[2]}: " not in outcome
        if op[0] == "tower" and outcome != "ok":
            assert outcome.startswith(f"DocumentNetworkFailed: step {recs[0]['step_before']}: document_network "
                                      f"failed on rank {op[2]}: "), f"{where}: {outcome}"
        if op[0] == "tower" and outcome == "ok":  # the failing rank sampled nothing, so its tower was not called
            assert (recs[op[2]]["sampled"] < 0).all(), f"{where}: a failing tower went unnoticed"
        if op[0] in ("step", "eval", "reload"):
            assert outcome == "ok", f"{where}: {outcome}"
        if outcome != "ok" or op[0] in ("eval", "reload"):
            assert _same(before, after), f"{where}: the cache changed"
            assert all(r["step_after"] == r["step_before"] for r in recs), f"{where}: the step moved"
            continue
        # a good step: sampled rows were filled, the model predicts fill, ages and documents
        for r in recs:
            drawn = r["sampled"][r["sampled"] >= 0]
            assert model.filled[drawn].all(), f"{where}: sampled an empty row"
            assert r["loss_finite"]
        refreshed = {int(j) for r in recs for j in r["sampled"].ravel() if j >= 0}
        reported = sorted(int(j) for r in recs for j in r["refreshed"])
        assert reported == sorted(refreshed), f"{where}: refreshed {reported}, sampled {sorted(refreshed)}"
        model.step(refreshed, [r["keys"].tolist() for r in recs])
        assert np.array_equal(after["filled"], model.filled), f"{where}: fill {after['filled']} vs {model.filled}"
        assert np.array_equal(after["age"], model.age), f"{where}: ages {after['age']} vs {model.age}"
        assert np.array_equal(after["key"][model.filled, 0], model.key[model.filled]), f"{where}: documents"
        assert all(r["step_after"] == r["step_before"] + 1 for r in recs)


# ---- the test ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pool():
    p = RankPool(WORLD)
    yield p
    p.close()


def test_random_call_sequences_keep_the_cache_consistent(pool):
    root = tempfile.mkdtemp(prefix="negcache-prop-")

    @settings(max_examples=25, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(case=sequences())
    def check(case):
        case.update(runner=run_sequence, dir=os.path.join(root, uuid.uuid4().hex))
        check_sequence(case, pool.run(case))

    try:
        check()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_checker_catches_a_wrong_age():
    """The model is not vacuous: an age off by one after a good step is reported."""
    case = {"world": WORLD, "rows": 2, "use_lru": True, "ops": [("step", [1, 1])]}
    blank = {"embedding": np.zeros((2, 1), np.float32), "age": np.zeros(2, np.int64),
             "filled": np.zeros(2, bool), "key": np.zeros((2, 1), np.int64)}
    recs = []
    for r in range(WORLD):
        after = {k: v.copy() for k, v in blank.items()}
        after["filled"][0], after["key"][0, 0], after["age"][1] = True, 10 + r, 1  # empty rows age too
        recs.append([{"outcome": "ok", "step_before": 0, "step_after": 1, "before": blank, "after": after,
                      "sampled": np.full((1, 1), -1), "refreshed": np.zeros(0, np.int64),
                      "keys": np.array([10 + r]), "loss_finite": True}])
    check_sequence(case, recs)  # consistent: item into slot 0, age 0 after the tick
    recs[1][0]["after"]["age"][1] = 2
    with pytest.raises(AssertionError, match="ages"):
        check_sequence(case, recs)
