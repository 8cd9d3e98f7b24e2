"""Shared inputs of the corpus-mode tests: a corpus whose first feature column is the document's index
(so a tower call reveals which documents it encoded), a recording encoder, and corpus handlers."""
from __future__ import annotations

import torch

from engine_cases import DIM, FEAT, Tower, make_handler
from two_level_cases import expect_error

N_DOCS, ID_BASE = 22, 1000


def corpus(n: int = N_DOCS, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(doc ids [n], features x [n, FEAT]); x[:, 0] is the document's index, row 7 duplicates row 2."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEAT, generator=g)
    x[:, 0] = torch.arange(n, dtype=torch.float32)
    x[7] = x[2]
    ids = ID_BASE + 3 * torch.arange(n, dtype=torch.int64)  # not 0..n-1: rows are found by id, not position
    return ids, x


class Recorder:
    """An encode_fn that records the documents and batch sizes of each call and whether it ran in inference mode."""

    def __init__(self, tower: Tower, fail: bool = False) -> None:
        self.tower, self.fail = tower, fail
        self.docs: list[int] = []
        self.calls: list[int] = []
        self.inference: list[bool] = []

    def __call__(self, data: dict) -> torch.Tensor:
        if self.fail:
            raise RuntimeError("encoder broke")
        self.docs += data["x"][:, 0].round().long().tolist()
        self.calls.append(data["x"].shape[0])
        self.inference.append(torch.is_inference_mode_enabled())
        return self.tower(data)


def corpus_handler(cache_size: int = 32, **kw):
    kw.setdefault("num_negatives", 4)
    return make_handler(cache_size, with_ids=True, cache_mode="corpus", **kw)


def rows_by_id(rows: dict) -> dict[int, int]:
    """doc id -> global row of every filled row of a gathered cache."""
    filled = rows["filled"].nonzero().flatten().tolist()
    return {int(rows["doc_id"][r]): r for r in filled}


__all__ = ["DIM", "FEAT", "N_DOCS", "ID_BASE", "Tower", "corpus", "Recorder", "corpus_handler", "rows_by_id", "snapshot",
           "corpus_layouts", "extra_inputs", "positives_of"]


# ---- the spawned worker of test_corpus_dist.py: W = 1, 2, 4 and 2x2 in one 4-rank launch ---------------
def snapshot(h) -> dict:
    """A copy of the whole cache of this rank's group (a one-rank gather returns views of the live rows)."""
    return {k: v.clone() for k, v in h.gather_global_rows().items()}


def positives_of(rank: int) -> tuple[list[int], torch.Tensor]:
    """The corpus positions and the (recognisable) positive embeddings rank ``rank`` steps with."""
    which = [(5 * rank + 1) % N_DOCS, (5 * rank + 3) % N_DOCS]
    return which, torch.randn(2, DIM, generator=torch.Generator().manual_seed(100 + rank))


def extra_inputs(rank: int) -> dict:
    """A rank's queries, positives and 2 extra negatives each (rank r has r + 2 queries)."""
    g = torch.Generator().manual_seed(50 + rank)
    b = rank + 2
    return {"q": torch.randn(b, DIM, generator=g), "pos": torch.randn(b, DIM, generator=g),
            "extra": torch.randn(b, 2, DIM, generator=g)}


def corpus_layouts(rank: int, world_size: int, root: str) -> dict:
    import os

    import torch.distributed as dist

    from sharded_negcache.checkpoint import CacheCheckpoint, load, save
    from sharded_negcache.handler import BatchRejected, DocumentNetworkFailed

    tower, (ids, x) = Tower(), corpus()
    g1, g2 = dist.new_group([0]), dist.new_group([0, 1])
    layouts = {"w1": ({"process_group": g1}, 1), "w2": ({"process_group": g2}, 2), "w4": ({}, 4),
               "2x2": ({"shard_group_size": 2}, 4)}
    out: dict = {}
    for name, (kw, size) in layouts.items():
        if rank < size:
            h = corpus_handler(32, **kw)
            enc = Recorder(tower)
            h.prefill(ids, {"x": x}, enc, batch_size=4)
            rows = snapshot(h)
            which, positives = positives_of(rank)
            data = {"x": x[which], "doc_id": ids[which].view(-1, 1)}
            h.update_cache_and_compute_loss(tower, torch.randn(2, DIM), positives, data)
            res = {"docs": enc.docs, "calls": enc.calls, "inference": enc.inference, "rows": rows,
                   "after": snapshot(h), "sampled": h.last_step.sampled_rows}
            bad = {"x": x[:1], "doc_id": torch.tensor([[7 if rank == size - 1 else int(ids[0])]])}
            res["unknown"] = expect_error(lambda: h.update_cache_and_compute_loss(tower, torch.randn(1, DIM), tower(bad), bad),
                                     BatchRejected)
            res["unknown_unchanged"] = all(torch.equal(v, res["after"][k]) for k, v in snapshot(h).items())
            if name == "w2":
                save({"cache": CacheCheckpoint(h)}, os.path.join(root, "w2"), process_group=g2)
                other = ids + 1 if rank == 1 else ids
                res["different_ids"] = expect_error(lambda: h.prefill(other, {"x": x}, tower), ValueError)
                broken = Recorder(tower, fail=rank == 1)
                res["encoder_failed"] = expect_error(lambda: h.prefill(ids, {"x": x}, broken), DocumentNetworkFailed)
                res["failed_unchanged"] = all(torch.equal(v, res["after"][k]) for k, v in snapshot(h).items())
                # extra negatives, in-batch: the group's positives and extra negatives are every query's candidates
                inp = {k: v.requires_grad_(True) for k, v in extra_inputs(rank).items()}
                stream = make_handler(16, score_transform=0.8, in_batch_negatives=True, process_group=g2)
                loss = stream.update_cache_and_compute_loss(tower, inp["q"], inp["pos"], {"x": torch.zeros(rank + 2, FEAT)},
                                                            extra_negatives=inp["extra"])
                loss.backward()
                res["extra"] = {"ce": stream.last_step.interpretable_loss, **{k: v.grad for k, v in inp.items()}}
            out[name] = res
        dist.barrier()
    # the W = 2 checkpoint loads on 4 flat ranks, on 1 rank and as 2x2; the id index follows the rows
    for name, (kw, size) in layouts.items():
        if rank < size and name != "w2":
            h = corpus_handler(32, reencode_negatives="none", **kw)  # only the positive writes
            load({"cache": CacheCheckpoint(h)}, os.path.join(root, "w2"), process_group=kw.get("process_group"))
            loaded = snapshot(h)
            which = [9] if rank == 0 else []
            data = {"x": x[which], "doc_id": ids[which].view(-1, 1)}
            marker = torch.full((len(which), DIM), 0.25)
            h.update_cache_and_compute_loss(tower, torch.randn(len(which), DIM), marker, data)
            out["loaded_" + name] = {"rows": loaded, "after": snapshot(h)}
        dist.barrier()
    return out
