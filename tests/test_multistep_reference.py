"""Several steps of W gloo processes equal a plain single-process reference of the per-shard semantics.

The reference below is written independently of the engine: W lists of rows with ages and filled
flags; per step it refreshes the rows the engine sampled (re-encoded by the same fixed tower; LRU
resets their age), inserts each rank's batch into that rank's oldest rows (empty first, then
highest age, ties to the lowest slot; item i into the i-th oldest), then ages every row by one.
It also recomputes each query's log-partition over the filled rows and the training loss from
the sampled rows. Batch sizes differ between ranks and steps, zero included; rows get evicted.
"""
from __future__ import annotations

import pytest
import torch

from engine_cases import DIM, FEAT, Tower, make_handler
from sharded_negcache.testing import run_ranks

CACHE, SCALE, DRAWS = 12, 2.0, 2
SPLITS = {
    2: [[3, 2], [0, 4], [5, 0], [0, 0], [2, 2], [1, 3], [4, 4]],
    3: [[1, 2, 2], [0, 0, 3], [2, 1, 0], [1, 1, 1], [4, 0, 2], [2, 2, 2]],
}


def batches(world_size: int, step: int) -> list[dict]:
    g = torch.Generator().manual_seed(100 + step)
    out = []
    for n in SPLITS[world_size][step]:
        out.append({"x": torch.randn(n, FEAT, generator=g), "q": torch.randn(n, DIM, generator=g)})
    return out


def engine(rank: int, world_size: int, use_lru: bool) -> list[dict]:
    tower = Tower()
    h = make_handler(CACHE, score_transform=SCALE, num_negatives=DRAWS, seed=1, block_size=2, use_lru=use_lru)
    log = []
    for step in range(len(SPLITS[world_size])):
        b = batches(world_size, step)[rank]
        with torch.no_grad():
            h.update_cache_and_compute_loss(tower, b["q"], tower({"x": b["x"]}), {"x": b["x"]})
        r = h.last_step
        log.append({"sampled": r.sampled_rows, "lse": r.lse, "training": r.training_loss, "rows": h.gather_global_rows()})
    return log


class ReferenceCache:
    """The per-shard cache policy, row by row in plain Python."""

    def __init__(self, world_size: int) -> None:
        self.w, self.n = world_size, CACHE // world_size
        self.x = [[0.0] * FEAT for _ in range(CACHE)]
        self.emb = [[0.0] * DIM for _ in range(CACHE)]
        self.age = [0] * CACHE
        self.filled = [False] * CACHE

    def refresh(self, rows: list[int], tower: Tower, use_lru: bool) -> None:
        for j in sorted(set(rows)):
            with torch.no_grad():
                self.emb[j] = tower({"x": torch.tensor([self.x[j]])})[0].tolist()
            if use_lru:
                self.age[j] = -1

    def insert(self, rank: int, x: torch.Tensor, emb: torch.Tensor) -> None:
        slots = list(range(rank * self.n, (rank + 1) * self.n))
        oldest = sorted(slots, key=lambda j: (self.filled[j], -self.age[j], j))  # empty, then oldest, then lowest
        for i, j in enumerate(oldest[: x.shape[0]]):
            self.x[j], self.emb[j] = x[i].tolist(), emb[i].tolist()
            self.filled[j], self.age[j] = True, -1

    def tick(self) -> None:
        self.age = [a + 1 for a in self.age]


@pytest.mark.parametrize("world_size,use_lru", [(2, True), (3, True), (3, False)])
def test_steps_match_reference(world_size, use_lru):
    logs = run_ranks(world_size, engine, use_lru)
    tower = Tower()
    ref = ReferenceCache(world_size)
    evictions = 0
    for step in range(len(SPLITS[world_size])):
        per_rank = batches(world_size, step)
        q = torch.cat([b["q"] for b in per_rank])
        sampled = torch.cat([log[step]["sampled"] for log in logs])
        # scores against the cache as it was before the step
        emb, filled = torch.tensor(ref.emb), torch.tensor(ref.filled)
        a = (SCALE * q @ emb.t()).masked_fill(~filled, float("-inf"))
        torch.testing.assert_close(torch.cat([log[step]["lse"] for log in logs]), torch.logsumexp(a, 1), rtol=1e-5, atol=1e-5)
        assert torch.all((sampled >= 0) == filled.any()), "every query samples iff the cache has a filled row"
        assert torch.all(filled[sampled[sampled >= 0]]), "an empty row was sampled"
        # the training loss from the sampled rows, re-encoded
        with torch.no_grad():
            pos = tower({"x": torch.cat([b["x"] for b in per_rank])})
            s_pos = SCALE * (q * pos).sum(1)
            if filled.any():
                fresh = tower({"x": torch.tensor(ref.x)[sampled.clamp(min=0)]})
                s_neg = SCALE * (q[:, None, :] * fresh).sum(-1).mean(1)
                p = torch.sigmoid(s_pos - torch.logsumexp(a, 1))
                want = (1 - p) * (s_neg - s_pos)
            else:
                want = torch.zeros_like(s_pos)
        torch.testing.assert_close(torch.cat([log[step]["training"] for log in logs]), want, rtol=1e-4, atol=1e-5)
        # the reference policy
        evictions += sum(sum(ref.filled[r * ref.n:(r + 1) * ref.n]) + b["x"].shape[0] > ref.n
                         for r, b in enumerate(per_rank))
        ref.refresh(sampled[sampled >= 0].tolist(), tower, use_lru)
        for r, b in enumerate(per_rank):
            with torch.no_grad():
                ref.insert(r, b["x"], tower({"x": b["x"]}))
        ref.tick()
        rows = logs[0][step]["rows"]
        assert rows["age"].tolist() == ref.age, f"step {step}"
        assert rows["filled"].tolist() == ref.filled, f"step {step}"
        torch.testing.assert_close(rows["x"], torch.tensor(ref.x), msg=f"features, step {step}")
        torch.testing.assert_close(rows["embedding"], torch.tensor(ref.emb), rtol=1e-5, atol=1e-6, msg=f"step {step}")
    assert evictions > 0, "the schedule must evict filled rows for the test to mean something"
