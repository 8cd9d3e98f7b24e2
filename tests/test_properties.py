"""Property-based tests (hypothesis) of the engine's invariants, for world sizes 1 to 4.

Hypothesis draws whole scenarios: rows per rank, block size, widths, batch sizes per rank and step (zero
included), LRU or FIFO, the non-finite policy, document ids (exclusion), top-k, negatives, score scale,
in-batch negatives, a pre-filled cache or an empty one, and a document tower that "diverges" (returns
NaN) for some rows at some steps. Every rank runs the scenario; the test process checks, step by step,
from every rank's shard before and after and what the step reported:

- every filled row holds what was inserted (this step's finite positives, in the documented slots) or
  refreshed (the current tower's embedding of its own features), or is unchanged; no row empties, and
  no stored embedding is NaN/Inf;
- ages follow the policy: written rows 0, the rest one older; FIFO leaves refreshed rows' ages alone;
  inserts go to the oldest rows (empty first, then highest age, ties to the lowest slot);
- every sampled row was filled before the step and does not hold the query's own document; with top_k it
  is among the query's k best; a query draws nothing only when it has no candidate;
- the refreshed rows are exactly the sampled rows with a finite re-encoding; the step's LSE equals the
  log-partition over the candidates; ``rejected_rows`` counts the NaN rows;
- the losses and gradients are finite; under nonfinite='raise' a NaN step raises on every rank and leaves
  every shard unchanged.

World size 1 runs in this process. For 2-4 ranks, four real gloo processes are started once and kept
for the module (the 2- and 3-rank cases run on subgroups, so ``process_group=`` is exercised too): the
cost of process start-up is paid once, not per example. The same pool runs the last section: random
sequences of valid and invalid calls (bad batches, failing towers, evaluation, save / load) on 2 ranks,
checked against an independent model of the cache policy.
"""
from __future__ import annotations

import math
import os
import queue
import shutil
import tempfile
import traceback
import uuid

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from sharded_negcache import (
    BatchRejected,
    DocumentNetworkFailed,
    FieldSpec,
    NonFiniteLoss,
    NonFiniteRows,
    ShardedCacheLossHandler,
)
from sharded_negcache.testing import free_port

NDOC = 4  # document ids 0..3: exclusions are frequent
POOL = 4
STEP_TIMEOUT_S = 20.0  # collective timeout inside the ranks; a broken case fails, never hangs
CASE_TIMEOUT_S = 90.0


# ---- scenarios -----------------------------------------------------------------------------------
@st.composite
def scenarios(draw, world: int) -> dict:
    rows = draw(st.sampled_from([2, 4, 8]))
    steps = draw(st.integers(1, 4))
    return {
        "world": world,
        "rows": rows,
        "block": draw(st.sampled_from([None] + [b for b in (1, 2, 4) if rows % b == 0])),
        "dim": draw(st.integers(1, 4)),
        "feat": draw(st.integers(1, 3)),
        "use_lru": draw(st.booleans()),
        "nonfinite": draw(st.sampled_from(["skip", "raise"])),
        "with_ids": draw(st.booleans()),
        "top_k": draw(st.none() | st.integers(1, rows * world + 1)),
        "num_negatives": draw(st.integers(1, 3)),
        "scale": draw(st.sampled_from([None, 0.5, 3.0])),
        "in_batch": draw(st.booleans()),
        "poison_mod": draw(st.sampled_from([0, 0, 2, 3, 5])),  # 0: the tower never diverges
        "prefill": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
        "batches": draw(st.lists(st.lists(st.integers(0, rows), min_size=world, max_size=world),
                                 min_size=steps, max_size=steps)),
    }


def poisoned(case: dict, step: int, keys: torch.Tensor) -> torch.Tensor:
    """Rows (by their unique key) for which the tower returns NaN at ``step``."""
    mod = case["poison_mod"]
    if not mod:
        return torch.zeros(keys.shape, dtype=torch.bool)
    return (keys * 7 + step * 13) % mod == 0


class Tower(torch.nn.Module):
    """A fixed linear document tower that returns NaN for the poisoned rows of the current step."""

    def __init__(self, case: dict) -> None:
        super().__init__()
        self.case, self.step = case, 0
        g = torch.Generator().manual_seed(case["seed"] + 1)
        self.lin = torch.nn.Linear(case["feat"], case["dim"])
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(case["dim"], case["feat"], generator=g) * 0.5)
            self.lin.bias.copy_(torch.randn(case["dim"], generator=g) * 0.1)

    def forward(self, data: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.lin(data["x"])
        bad = poisoned(self.case, self.step, data["key"][:, 0])
        return torch.where(bad.unsqueeze(1), torch.full_like(out, float("nan")), out)


def make_inputs(case: dict) -> dict:
    """Every tensor of the scenario, deterministic in the case (built identically in every process)."""
    g = torch.Generator().manual_seed(case["seed"])
    world, rows, d, f = case["world"], case["rows"], case["dim"], case["feat"]
    size = world * rows
    init = None
    if case["prefill"]:
        x = torch.randn(size, f, generator=g)
        tower = Tower(case)
        with torch.no_grad():
            emb = tower.lin(x) + 0.1 * torch.randn(size, d, generator=g)
        init = {"x": x, "key": 1000 + torch.arange(size).unsqueeze(1), "embedding": emb,
                "age": torch.randint(0, 6, (size,), generator=g), "filled": torch.rand(size, generator=g) < 0.7}
        if case["with_ids"]:
            init["doc_id"] = torch.randint(0, NDOC, (size, 1), generator=g)
    steps = []
    for s, sizes in enumerate(case["batches"]):
        per_rank = []
        for r, b in enumerate(sizes):
            batch = {"x": torch.randn(b, f, generator=g), "key": (s * 100 + r * 10 + torch.arange(b)).unsqueeze(1),
                     "q": torch.randn(b, d, generator=g)}
            if case["with_ids"]:
                batch["doc_id"] = torch.randint(0, NDOC, (b, 1), generator=g)
            per_rank.append(batch)
        steps.append(per_rank)
    return {"init": init, "steps": steps}


def make_specs(case: dict) -> dict:
    specs = {"x": FieldSpec((case["feat"],), torch.float32), "key": FieldSpec((1,), torch.int64),
             "embedding": FieldSpec((case["dim"],), torch.float32)}
    if case["with_ids"]:
        specs["doc_id"] = FieldSpec((1,), torch.int64)
    return specs


# ---- one rank's run --------------------------------------------------------------------------------
def _numpy(rows: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in rows.items()}


def run_case(rank: int, case: dict, group=None) -> list[dict]:
    """Runs the scenario on this rank; per step, the shard before/after and what the step reported."""
    torch.manual_seed(0)
    inputs, tower = make_inputs(case), Tower(case)
    h = ShardedCacheLossHandler(
        make_specs(case), case["world"] * case["rows"], "embedding", ("x", "key"),
        score_transform=case["scale"], top_k=case["top_k"], num_negatives=case["num_negatives"],
        seed=case["seed"] % 1000, use_lru=case["use_lru"], doc_id_key="doc_id" if case["with_ids"] else None,
        process_group=group, block_size=case["block"], in_batch_negatives=case["in_batch"],
        nonfinite=case["nonfinite"], collective_timeout_s=STEP_TIMEOUT_S,
    )
    if inputs["init"] is not None:
        h.load_global_rows(inputs["init"])
    out = []
    for s, per_rank in enumerate(inputs["steps"]):
        b = per_rank[rank]
        tower.step = s
        data = {k: v for k, v in b.items() if k != "q"}
        q = b["q"].clone().requires_grad_(True)
        tower.zero_grad()
        rec: dict = {"before": _numpy(h.store.export_rows())}
        try:
            loss = h.update_cache_and_compute_loss(tower, q, tower(data), data)
            loss.backward()
        except (BatchRejected, NonFiniteRows) as exc:
            rec["raised"] = f"{type(exc).__name__}: {exc}"
        else:
            r = h.last_step
            grads = [t for t in (q.grad, tower.lin.weight.grad, tower.lin.bias.grad) if t is not None]
            rec.update(
                raised=None, loss=loss.detach().item(), training=r.training_loss.numpy(), lse=r.lse.numpy(),
                sampled=r.sampled_rows.numpy(), refreshed=r.refreshed_rows.numpy(), inserted=r.inserted_rows.numpy(),
                metrics=dict(r.metrics), grads_finite=all(bool(torch.isfinite(t).all()) for t in grads),
            )
        rec["after"] = _numpy(h.store.export_rows())
        out.append(rec)
    return out


# ---- the checks (in the test process, with every rank's view) --------------------------------------
def _cat(per_rank: list[dict], step: int, when: str) -> dict[str, np.ndarray]:
    return {k: np.concatenate([r[step][when][k] for r in per_rank]) for k in per_rank[0][step][when]}


def _scale(case: dict) -> float:
    return 1.0 if case["scale"] is None else case["scale"]


def check_case(case: dict, per_rank: list[list[dict]]) -> None:
    world, n = case["world"], case["rows"]
    inputs, tower = make_inputs(case), Tower(case)
    for s, batches in enumerate(inputs["steps"]):
        where = f"step {s}"
        tower.step = s
        before, after = _cat(per_rank, s, "before"), _cat(per_rank, s, "after")
        recs = [r[s] for r in per_rank]
        with torch.no_grad():
            docs = [tower({k: v for k, v in b.items() if k != "q"}) for b in batches]
        nan_positives = [~torch.isfinite(e).all(1) for e in docs]
        any_nan_positive = any(bool(m.any()) for m in nan_positives)

        raised = [r["raised"] for r in recs]
        if any(raised):
            assert all(raised), f"{where}: only some ranks raised: {raised}"
            assert case["nonfinite"] == "raise", f"{where}: raised under nonfinite='skip': {raised[0]}"
            if any_nan_positive:
                assert raised[0].startswith("BatchRejected: ") and "document_embeddings contain NaN or Inf" in raised[0]
            else:
                assert raised[0].startswith("NonFiniteRows: "), raised[0]
                keys = torch.from_numpy(before["key"][:, 0])
                assert bool((poisoned(case, s, keys) & torch.from_numpy(before["filled"])).any()), \
                    f"{where}: NonFiniteRows without a poisoned filled row"
            for k in before:
                assert np.array_equal(before[k], after[k], equal_nan=True), f"{where}: {k} changed by a failed step"
            continue
        assert not (case["nonfinite"] == "raise" and any_nan_positive), f"{where}: NaN positives not rejected"

        filled_b = before["filled"]
        keys_b = torch.from_numpy(before["key"][:, 0])
        emb_b = torch.from_numpy(before["embedding"]).double()
        bad_row = poisoned(case, s, keys_b).numpy()

        # -- sampled rows, LSE, top-k -----------------------------------------------------------
        expected_refresh: set[int] = set()
        nan_fetched = 0
        for r, (b, rec) in enumerate(zip(batches, recs)):
            sampled = rec["sampled"]
            assert sampled.shape == (b["q"].shape[0], case["num_negatives"]), (where, sampled.shape)
            scores = _scale(case) * (b["q"].double() @ emb_b.t())  # [B, C], stale embeddings
            for i in range(sampled.shape[0]):
                cand = filled_b.copy()
                if case["with_ids"]:
                    cand &= before["doc_id"][:, 0] != b["doc_id"][i, 0].item()
                cand_scores = scores[i][torch.from_numpy(cand)]
                if case["top_k"] is not None and cand_scores.numel() > case["top_k"]:
                    kth = torch.topk(cand_scores, case["top_k"]).values
                    lse, threshold = torch.logsumexp(kth, 0).item(), kth[-1].item()
                else:
                    lse, threshold = torch.logsumexp(cand_scores, 0).item(), -math.inf
                got = float(rec["lse"][i])
                if cand.any():
                    assert math.isclose(got, lse, rel_tol=1e-4, abs_tol=1e-4), (where, r, i, got, lse)
                    assert (sampled[i] >= 0).all(), f"{where}: rank {r} query {i} has candidates but drew nothing"
                else:
                    assert got == -math.inf and (sampled[i] == -1).all(), (where, r, i, got, sampled[i])
                for j in sampled[i][sampled[i] >= 0]:
                    assert filled_b[j], f"{where}: rank {r} query {i} sampled empty row {j}"
                    assert cand[j], f"{where}: rank {r} query {i} sampled row {j} holding its own document"
                    assert scores[i, j].item() >= threshold - 1e-4, f"{where}: row {j} is not in the top-{case['top_k']}"
            uniq = np.unique(sampled[sampled >= 0])
            nan_fetched += int(bad_row[uniq].sum())
            expected_refresh |= {int(j) for j in uniq if not bad_row[j]}

        # -- rejected rows, losses --------------------------------------------------------------
        rejected = nan_fetched + sum(int(m.sum()) for m in nan_positives)
        if case["nonfinite"] == "raise":
            assert rejected == 0, f"{where}: {rejected} NaN rows under nonfinite='raise' did not raise"
        for r, rec in enumerate(recs):
            assert rec["metrics"]["rejected_rows"] == rejected, (where, r, rec["metrics"], rejected)
            assert math.isfinite(rec["loss"]) and np.isfinite(rec["training"]).all(), (where, r, rec["loss"])
            assert rec["grads_finite"], f"{where}: rank {r} has non-finite gradients"

        # -- refreshes and inserts --------------------------------------------------------------
        refreshed = np.concatenate([rec["refreshed"] for rec in recs]).astype(int)
        for r, rec in enumerate(recs):
            assert ((rec["refreshed"] >= r * n) & (rec["refreshed"] < (r + 1) * n)).all(), (where, r, rec["refreshed"])
        assert len(set(refreshed.tolist())) == len(refreshed)
        assert set(refreshed.tolist()) == expected_refresh, (where, sorted(refreshed), sorted(expected_refresh))

        age_mid = before["age"].copy()
        if case["use_lru"]:
            age_mid[refreshed] = -1
        written = np.zeros(world * n, dtype=bool)
        written[refreshed] = True
        inserted_all = []
        for r, (b, rec, doc, nan_pos) in enumerate(zip(batches, recs, docs, nan_positives)):
            ok = ~nan_pos
            inserted = rec["inserted"].astype(int)
            assert len(inserted) == int(ok.sum()), (where, r, inserted, ok)
            lo = r * n
            slot = np.arange(n)
            order = sorted(slot, key=lambda j: (bool(filled_b[lo + j]), -age_mid[lo + j], j))
            assert (inserted - lo).tolist() == order[: len(inserted)], f"{where}: rank {r} did not evict the oldest rows"
            for i, j in zip(torch.nonzero(ok)[:, 0].tolist(), inserted):
                assert np.array_equal(after["x"][j], b["x"][i].numpy()), (where, r, j)
                assert after["key"][j, 0] == b["key"][i, 0].item()
                if case["with_ids"]:
                    assert after["doc_id"][j, 0] == b["doc_id"][i, 0].item()
                assert np.allclose(after["embedding"][j], doc[i].numpy(), atol=1e-6), (where, r, j)
            inserted_all.extend(inserted.tolist())
        age_mid[inserted_all] = -1
        written[inserted_all] = True

        # -- every row: written as above, refreshed with the current tower, or unchanged ------------
        assert (after["filled"] >= filled_b).all(), f"{where}: a filled row was emptied"
        expected_filled = filled_b.copy()
        expected_filled[inserted_all] = True
        assert np.array_equal(after["filled"], expected_filled), where
        assert np.array_equal(after["age"], age_mid + 1), (where, before["age"], after["age"], refreshed, inserted_all)
        assert np.isfinite(after["embedding"][after["filled"]]).all(), f"{where}: a NaN/Inf embedding was stored"
        fields = [k for k in before if k not in ("embedding", "age", "filled")]
        for j in range(world * n):
            if j in inserted_all:
                continue
            for k in fields:
                assert np.array_equal(after[k][j], before[k][j]), (where, j, k)
            if written[j]:  # refreshed: the current tower's embedding of the row's own features
                with torch.no_grad():
                    fresh = tower.lin(torch.from_numpy(before["x"][j : j + 1]))[0].numpy()
                assert np.allclose(after["embedding"][j], fresh, atol=1e-5), (where, j)
            else:
                assert np.array_equal(after["embedding"][j], before["embedding"][j]), (where, j)


# ---- a pool of 4 ranks kept for the module -----------------------------------------------------------
def _pool_worker(rank: int, port: int, inbox, outbox, size: int = POOL) -> None:
    import os

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=size)
    groups = {w: dist.new_group(list(range(w))) for w in range(2, size)}
    groups[size] = None
    while True:
        case = inbox.get()
        if case is None:
            break
        if rank >= case["world"]:
            outbox.put((rank, "idle", None))
            continue
        try:
            runner = case.get("runner", run_case)  # another test module's scenario runner (module-level)
            outbox.put((rank, "ok", runner(rank, case, groups[case["world"]])))
        except BaseException as exc:  # reported to the test
            outbox.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    dist.destroy_process_group()


class RankPool:
    """``size`` (default four) gloo processes that run scenarios on demand; restarted after a failed scenario.

    A scenario is a dict with ``world`` (ranks that take part) and, optionally, ``runner``: a module-level
    function ``runner(rank, case, group)`` (default :func:`run_case`).
    """

    def __init__(self, size: int = POOL) -> None:
        self.procs: list = []
        self.size = size

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self.inboxes = [ctx.Queue() for _ in range(self.size)]
        self.outbox = ctx.Queue()
        port = free_port()
        self.procs = [ctx.Process(target=_pool_worker, args=(r, port, self.inboxes[r], self.outbox, self.size),
                                  daemon=True)
                      for r in range(self.size)]
        for p in self.procs:
            p.start()

    def run(self, case: dict) -> list[list[dict]]:
        if not self.procs:
            self._start()
        for box in self.inboxes:
            box.put(case)
        got: dict[int, tuple] = {}
        try:
            while len(got) < self.size:
                rank, status, value = self.outbox.get(timeout=CASE_TIMEOUT_S)
                got[rank] = (status, value)
        except queue.Empty:
            self.close()
            raise TimeoutError(f"ranks {sorted(set(range(self.size)) - set(got))} gave no result in {CASE_TIMEOUT_S} s")
        errors = {r: v for r, (st_, v) in got.items() if st_ == "error"}
        if errors:
            self.close()  # a failed scenario may leave collectives unmatched: fresh processes next time
            raise AssertionError("rank errors:\n" + "\n".join(f"rank {r}: {v}" for r, v in sorted(errors.items())))
        return [got[r][1] for r in range(case["world"])]

    def close(self) -> None:
        for p, box in zip(self.procs, getattr(self, "inboxes", [])):
            if p.is_alive():
                box.put(None)
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)
        self.procs = []


@pytest.fixture(scope="module")
def pool():
    p = RankPool()
    yield p
    p.close()


COMMON = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def fixed(world: int, **kw) -> dict:
    """A hand-picked scenario (run before the random ones): NaN rows, exclusions, top-k, empty batches."""
    case = {"world": world, "rows": 4, "block": 2, "dim": 3, "feat": 2, "use_lru": True, "nonfinite": "skip",
            "with_ids": True, "top_k": None, "num_negatives": 2, "scale": 3.0, "in_batch": False, "poison_mod": 2,
            "prefill": True, "seed": 0, "batches": [[2] * world, [0] + [3] * (world - 1), [1] * world]}
    case.update(kw)
    return case


# a NaN re-encoding under 'raise' (NonFiniteRows on every rank, nothing written); odd widths; FIFO
ONE_RANK_RAISES = fixed(1, rows=4, block=None, dim=1, feat=2, use_lru=False, nonfinite="raise", with_ids=False,
                        num_negatives=1, scale=None, batches=[[0], [1]])


@settings(max_examples=150, **COMMON)
@example(case=ONE_RANK_RAISES)
@example(case=fixed(1, top_k=2, in_batch=True))
@given(case=scenarios(1))
def test_invariants_one_rank(case):
    assert not dist.is_initialized()
    check_case(case, [run_case(0, case)])


@pytest.mark.parametrize("world,examples", [(2, 40), (3, 30), (4, 30)])
def test_invariants_several_ranks(pool, world, examples):
    @settings(max_examples=examples, phases=[Phase.explicit, Phase.generate], **COMMON)
    @example(case=fixed(world))
    @example(case=fixed(world, nonfinite="raise", use_lru=False, top_k=3, in_batch=True, feat=1))
    @given(case=scenarios(world))
    def check(case):
        check_case(case, pool.run(case))

    check()


def test_checker_catches_a_corrupted_row():
    """The checks are not vacuous: a row overwritten behind the engine's back is reported."""
    case = {"world": 1, "rows": 4, "block": None, "dim": 2, "feat": 2, "use_lru": True, "nonfinite": "skip",
            "with_ids": False, "top_k": None, "num_negatives": 1, "scale": 1.0, "in_batch": False, "poison_mod": 0,
            "prefill": True, "seed": 3, "batches": [[2], [1]]}
    result = run_case(0, case)
    check_case(case, [result])
    untouched = [j for j in range(4) if j not in result[1]["inserted"] and j not in result[1]["refreshed"]]
    result[1]["after"]["embedding"][untouched[0]] += 1.0
    with pytest.raises(AssertionError, match="step 1"):
        check_case(case, [result])


def test_rows_with_unaligned_fields_can_be_fetched():
    """Regression (found by the properties above): a packed row whose int64 column starts at a byte offset
    that is not a multiple of 8 (here after a 4-byte float field) must unpack when 0 or 1 rows are fetched."""
    specs = {"x": FieldSpec((1,), torch.float32), "key": FieldSpec((1,), torch.int64),
             "embedding": FieldSpec((2,), torch.float32)}
    h = ShardedCacheLossHandler(specs, 4, "embedding", ("x", "key"))
    tower = torch.nn.Linear(1, 2)
    for step in range(3):  # step 0 fetches no row, the next steps one row per query
        data = {"x": torch.full((1, 1), float(step)), "key": torch.tensor([[step]])}
        h.update_cache_and_compute_loss(lambda f: tower(f["x"]), torch.ones(1, 2), tower(data["x"]), data)
    assert h.steps_done == 3


def test_a_step_without_any_query():
    """Regression (found by the properties above): a step where every rank's batch is empty (the global
    batch is empty) is a no-op step with loss 0, not an error in the sampler."""
    specs = {"x": FieldSpec((2,), torch.float32), "embedding": FieldSpec((2,), torch.float32)}
    h = ShardedCacheLossHandler(specs, 4, "embedding", ("x",))
    loss = h.update_cache_and_compute_loss(lambda f: f["x"], torch.zeros(0, 2), torch.zeros(0, 2), {"x": torch.zeros(0, 2)})
    assert loss.item() == 0.0 and h.steps_done == 1

# ---- random sequences of valid and invalid calls on 2 ranks --------------------------------------------
# Hypothesis draws a sequence of operations: good steps (batch sizes per rank, zero included), batches with
# one bad field on one rank, a document tower that fails on one rank (raises, wrong shape, a tuple),
# evaluation calls (``handler.eval()``), and a save / load in between (plain ``state_dict`` into a new
# handler, or ``sharded_negcache.checkpoint`` through DCP), run on the pool's 2-rank subgroup. After every
# call the test process checks, from every rank's record:
# - all ranks agree on the outcome (the same exception and message, or success) and on the step;
# - no stored embedding of a filled row is NaN/Inf;
# - a rejected call, an evaluation and a save/load leave every shard exactly as it was;
# - after a good step, fill, ages and the documents in each row are what an independent model of the
#   cache policy predicts (refresh of the sampled rows under LRU, inserts into the oldest rows: empty
#   first, then highest age, ties to the lowest slot, then every age + 1), and every sampled row was
#   filled before the step.
SEQ_WORLD = 2
BAD_FIELDS = ("dtype", "missing", "nan_query", "too_large", "width")
TOWER_FAILURES = ("raises", "shape", "tuple")
EXPECTED = (BatchRejected, DocumentNetworkFailed, NonFiniteRows, NonFiniteLoss)


@st.composite
def sequences(draw) -> dict:
    n = draw(st.sampled_from([2, 4]))
    sizes = st.lists(st.integers(0, n), min_size=SEQ_WORLD, max_size=SEQ_WORLD)
    rank = st.integers(0, SEQ_WORLD - 1)
    op = st.one_of(
        st.tuples(st.just("step"), sizes),
        st.tuples(st.just("bad"), sizes, rank, st.sampled_from(BAD_FIELDS)),
        st.tuples(st.just("tower"), sizes, rank, st.sampled_from(TOWER_FAILURES)),
        st.tuples(st.just("eval"), sizes),
        st.tuples(st.just("reload"), st.sampled_from(["state_dict", "checkpoint"])),
    )
    return {
        "world": SEQ_WORLD, "rows": n, "dim": draw(st.integers(1, 3)), "feat": draw(st.integers(1, 2)),
        "use_lru": draw(st.booleans()), "num_negatives": draw(st.integers(1, 2)),
        "in_batch": draw(st.booleans()), "seed": draw(st.integers(0, 2**16)),
        "ops": [("step", [n, n])] + draw(st.lists(op, min_size=2, max_size=6)),
    }


def build(case: dict, group) -> ShardedCacheLossHandler:
    specs = {"x": FieldSpec((case["feat"],), torch.float32), "key": FieldSpec((1,), torch.int64),
             "embedding": FieldSpec((case["dim"],), torch.float32)}
    return ShardedCacheLossHandler(
        specs, SEQ_WORLD * case["rows"], "embedding", ("x", "key"), score_transform=2.0,
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


# ---- call sequences: the independent model of the cache policy and the checks -----------------------
class Model:
    """The cache policy of design §4 on global rows, written from the design, not from the engine."""

    def __init__(self, case: dict) -> None:
        self.n, self.lru = case["rows"], case["use_lru"]
        size = SEQ_WORLD * self.n
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


def _cat_op(recs: list[dict], when: str) -> dict:
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
        before, after = _cat_op(recs, "before"), _cat_op(recs, "after")
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
    case = {"world": SEQ_WORLD, "rows": 2, "use_lru": True, "ops": [("step", [1, 1])]}
    blank = {"embedding": np.zeros((2, 1), np.float32), "age": np.zeros(2, np.int64),
             "filled": np.zeros(2, bool), "key": np.zeros((2, 1), np.int64)}
    recs = []
    for r in range(SEQ_WORLD):
        after = {k: v.copy() for k, v in blank.items()}
        after["filled"][0], after["key"][0, 0], after["age"][1] = True, 10 + r, 1  # empty rows age too
        recs.append([{"outcome": "ok", "step_before": 0, "step_after": 1, "before": blank, "after": after,
                      "sampled": np.full((1, 1), -1), "refreshed": np.zeros(0, np.int64),
                      "keys": np.array([10 + r]), "loss_finite": True}])
    check_sequence(case, recs)  # consistent: item into slot 0, age 0 after the tick
    recs[1][0]["after"]["age"][1] = 2
    with pytest.raises(AssertionError, match="ages"):
        check_sequence(case, recs)
