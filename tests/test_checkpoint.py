"""Checkpoints of the sharded cache: save with W ranks, load with W' ranks, refuse what does not fit.

The reshard matrix runs in one spawn of 4 gloo processes: world sizes 1, 2 and 3 are process groups
of the first ranks (the handler and DCP both run over the group), 4 is the whole world. A fifth
"world" is this test process without torch.distributed (W = 1, plain tensors), which saves a
checkpoint loaded by the spawned ranks and loads the ones they saved. Expected values never come
from the checkpoint code: the cache is read back with the engine's all-gather
(``gather_global_rows``) and the next step is compared with the run that was never interrupted.

The same spawn also reshards a cache with a jagged, host-resident field and int8-coded embeddings,
and makes 3 ranks load damaged copies of a checkpoint (a file missing, truncated, one byte flipped,
no manifest): all must refuse together and leave the cache untouched. The single-process tests
cover the named mismatch errors, the plain ``state_dict`` round trip, ``latest_checkpoint`` and the
row hash itself. The last section binds every file of a checkpoint to the others (edited, mixed and
damaged copies refused, naming the file) and loses a rank before a save.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from engine_cases import FEAT, Tower, global_batch, global_cache, make_handler, run_step, specs
from sharded_negcache import CollectiveFailed, FieldSpec, JaggedFieldSpec, ShardedCacheLossHandler
from sharded_negcache.checkpoint import (
    MANIFEST_NAME,
    CacheCheckpoint,
    CheckpointError,
    latest_checkpoint,
    load,
    parse_record,
    row_hashes,
    save,
    verify_checkpoint,
)
from sharded_negcache.testing import run_ranks

CACHE, BATCH = 48, 12  # 48 rows divide by 1..4; rows per rank multiples of block_size=4
SPLITS = {1: [12], 2: [5, 7], 3: [0, 6, 6], 4: [3, 3, 6, 0]}
CONFIG = dict(with_ids=True, num_negatives=3, embedding_codec="bf16")
SOURCES = ["w0", "w1", "w2", "w3", "w4"]  # w0: this process without torch.distributed
STEP_FIELDS = ("training", "interpretable", "lse", "sampled")


def new_handler(seed: int, group=None) -> ShardedCacheLossHandler:
    cfg = dict(CONFIG)
    return make_handler(CACHE, with_ids=cfg.pop("with_ids"), seed=seed, process_group=group, **cfg)


def step_on(handler: ShardedCacheLossHandler, tower: Tower, batch: dict, world: int, rank: int) -> dict:
    """One step on this rank's share of ``batch``; the per-query results of the whole group, in global order."""
    sizes = SPLITS[world]
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    run_step(handler, tower, batch, lo, hi, with_ids=True)
    res = handler.last_step
    own = {"training": res.training_loss, "interpretable": res.interpretable_loss, "lse": res.lse,
           "sampled": res.sampled_rows}
    return {k: handler.comm.gather_rows(v, sizes) for k, v in own.items()}


def first_batch(tower: Tower) -> dict:
    return global_batch(BATCH, tower, seed=11, with_ids=True)


def next_batch(tower: Tower) -> dict:
    return global_batch(BATCH, tower, seed=13, with_ids=True)


def train_and_save(path: str, world: int, rank: int, group=None) -> tuple[dict, dict]:
    """Step 0, save, then the uninterrupted step 1. Returns (cache rows as saved, step-1 results)."""
    tower = Tower()
    handler = new_handler(seed=5, group=group)
    handler.load_global_rows(global_cache(CACHE, tower, empty_every=2, with_ids=True))
    step_on(handler, tower, first_batch(tower), world, rank)
    save({"cache": CacheCheckpoint(handler)}, path, process_group=group)
    rows = handler.gather_global_rows()
    return rows, step_on(handler, tower, next_batch(tower), world, rank)


def load_and_step(path: str, world: int, rank: int, group=None) -> tuple[dict, tuple[int, int], dict]:
    """A fresh handler (other seed, empty cache) loads ``path``; returns its rows, (step, seed) and step 1."""
    tower = Tower()
    handler = new_handler(seed=99, group=group)
    load({"cache": CacheCheckpoint(handler)}, path, process_group=group)
    rows = handler.gather_global_rows()
    counters = (handler.steps_done, int(handler.seed))
    return rows, counters, step_on(handler, tower, next_batch(tower), world, rank)


def assert_same_rows(got: dict, want: dict, label: str) -> None:
    assert sorted(got) == sorted(want), label
    for key in want:
        assert torch.equal(got[key], want[key]), f"{label}: field {key!r} differs"


def assert_same_step(got: dict, want: dict, label: str) -> None:
    assert torch.equal(got["sampled"], want["sampled"]), label
    for key in ("training", "interpretable", "lse"):
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5, msg=f"{label}: {key}")


# ---- damaging a checkpoint -----------------------------------------------------------------
def damaged_copy(src: str, dst: str, how: str, value: float | None = None) -> None:
    """Copy of ``src`` with rank 1's data file deleted, truncated, or with one byte of ``value`` flipped."""
    shutil.copytree(src, dst)
    data = Path(dst) / "__1_0.distcp"
    if how == "missing":
        data.unlink()
    elif how == "truncated":
        with open(data, "r+b") as f:
            f.truncate(data.stat().st_size // 2)
    elif how == "flipped":
        blob = bytearray(data.read_bytes())
        pattern = torch.tensor([value], dtype=torch.float32).numpy().tobytes()
        at = blob.find(pattern)
        assert at >= 0 and blob.find(pattern, at + 1) < 0, "the value must occur exactly once"
        blob[at] ^= 0x01  # one bit of the lowest mantissa byte: torch.load does not notice
        data.write_bytes(bytes(blob))
    elif how == "no_manifest":
        (Path(dst) / MANIFEST_NAME).unlink()
    else:
        raise ValueError(how)


# ---- a cache with a jagged field kept in host memory and int8-coded embeddings --------------
J_CACHE, J_VOCAB = 24, 40


def jagged_handler(seed: int, group=None, host: bool = True) -> ShardedCacheLossHandler:
    specs = {"tokens": JaggedFieldSpec(5, torch.int32, vocab_size=J_VOCAB, mean_length=1, format="list"),
             "doc": FieldSpec((1,), torch.int64), "embedding": FieldSpec((8,), torch.float32)}
    return ShardedCacheLossHandler(specs, J_CACHE, "embedding", ("tokens", "doc"), score_transform=2.0,
                                   num_negatives=2, seed=seed, block_size=2, embedding_codec="int8",
                                   host_features=("tokens",) if host else (), process_group=group)


class TokenTower:
    """Mean of fixed token vectors."""

    table = torch.randn(J_VOCAB, 8, generator=torch.Generator().manual_seed(9))

    def __call__(self, data: dict) -> torch.Tensor:
        return torch.stack([self.table[t.long()].mean(0) for t in data["tokens"]])


def jagged_step(handler: ShardedCacheLossHandler, step: int, rank: int, n: int) -> torch.Tensor:
    """One step with ``n`` documents of 1..5 tokens (a function of step and rank); returns the loss."""
    g = torch.Generator().manual_seed(100 * step + rank)
    tokens = [torch.randint(0, J_VOCAB, (int(k),), generator=g, dtype=torch.int32)
              for k in torch.randint(1, 6, (n,), generator=g)]
    tower = TokenTower()
    q = torch.randn(n, 8, generator=g)
    with torch.no_grad():
        return handler.update_cache_and_compute_loss(
            tower, q, tower({"tokens": tokens}), {"tokens": tokens, "doc": torch.randint(0, 10**6, (n, 1), generator=g)}
        )


def jagged_state(handler: ShardedCacheLossHandler) -> dict:
    """The whole cache (engine's all-gather) plus the raw int8 bytes of every row."""
    rows = handler.gather_global_rows()
    sizes = [handler.layout.rows_per_rank] * handler.comm.shard_size
    rows["stored_embeddings"] = handler.comm.gather_rows(handler.store.embeddings, sizes)
    return rows


CORRUPT_ROW = 31  # owned by rank 1 when saved with W = 2 (rows 24..47) and when loaded with W' = 3 (16..31)


# ---- the spawned worker: the whole W x W' matrix and damaged checkpoints on 3 ranks ---------
def matrix_worker(rank: int, world_size: int, root: str) -> dict:
    torch.manual_seed(0)
    groups = {1: dist.new_group([0]), 2: dist.new_group([0, 1]), 3: dist.new_group([0, 1, 2]), 4: None}
    out: dict = {"saved": {}, "loaded": {}, "damaged": {}}
    for w in (1, 2, 3, 4):
        if rank < w:
            rows, after = train_and_save(os.path.join(root, f"w{w}"), w, rank, groups[w])
            if rank == 0:
                out["saved"][f"w{w}"] = (rows, after)
        dist.barrier()
    for w_new in (1, 2, 3, 4):
        if rank < w_new:
            for src in SOURCES:
                rows, counters, after = load_and_step(os.path.join(root, src), w_new, rank, groups[w_new])
                if rank == 0:
                    out["loaded"][(src, w_new)] = (rows, counters, after)
        dist.barrier()

    # Jagged host-resident field, int8 codec: saved by the 4 ranks, loaded by 3 with the field on the
    # device (and by this test process, see test_jagged_host_int8_cache_reshards).
    handler = jagged_handler(seed=5)
    for step in range(4):
        jagged_step(handler, step, rank, 1)  # 4 of each rank's 6 rows filled
    save({"cache": CacheCheckpoint(handler)}, os.path.join(root, "jagged_w4"))
    out["jagged_saved"] = jagged_state(handler)
    if rank < 3:
        fresh = jagged_handler(seed=99, group=groups[3], host=False)
        load({"cache": CacheCheckpoint(fresh)}, os.path.join(root, "jagged_w4"), process_group=groups[3])
        out["jagged_loaded_3"] = jagged_state(fresh)
    dist.barrier()

    # Damaged copies of the W = 2 checkpoint, loaded by 3 ranks: every rank must refuse, cache untouched.
    if rank == 0:
        value = float(out["saved"]["w2"][0]["x"][CORRUPT_ROW, 2])
        for how in ("missing", "truncated", "flipped", "no_manifest"):
            damaged_copy(os.path.join(root, "w2"), os.path.join(root, f"bad_{how}"), how, value)
    dist.barrier()
    if rank < 3:
        tower = Tower()
        handler = new_handler(seed=99, group=groups[3])
        handler.load_global_rows(global_cache(CACHE, tower, seed=21, with_ids=True))
        before = handler.store.export_rows()
        for how in ("missing", "truncated", "flipped", "no_manifest"):
            try:
                load({"cache": CacheCheckpoint(handler)}, os.path.join(root, f"bad_{how}"), process_group=groups[3])
                outcome = "loaded"
            except CheckpointError as exc:
                outcome = f"CheckpointError: {exc}"
            unchanged = all(torch.equal(v, before[k]) for k, v in handler.store.export_rows().items())
            out["damaged"][how] = (outcome, unchanged, handler.steps_done)
        # A bare dcp.load (no manifest check) of the copy with a missing file: DCP refuses, cache untouched.
        try:
            dcp.load({"cache": CacheCheckpoint(handler)}, checkpoint_id=os.path.join(root, "bad_missing"),
                     process_group=groups[3])
            outcome = "loaded"
        except CheckpointException as exc:
            outcome = f"CheckpointException: {exc}"
        unchanged = all(torch.equal(v, before[k]) for k, v in handler.store.export_rows().items())
        out["damaged"]["bare_dcp_missing"] = (outcome, unchanged, handler.steps_done)
        # A bare dcp.load of the flipped copy: no manifest digest, so the row hashes must refuse it.
        try:
            dcp.load({"cache": CacheCheckpoint(handler)}, checkpoint_id=os.path.join(root, "bad_flipped"),
                     process_group=groups[3])
            outcome = "loaded"
        except CheckpointError as exc:
            outcome = f"CheckpointError: {exc}"
        unchanged = all(torch.equal(v, before[k]) for k, v in handler.store.export_rows().items())
        out["damaged"]["bare_dcp_flipped"] = (outcome, unchanged, handler.steps_done)
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def single_process(root) -> dict:
    """The checkpoint saved by this process without torch.distributed (W = 1, plain tensors)."""
    rows, after = train_and_save(os.path.join(root, "w0"), 1, 0)
    return {"w0": (rows, after)}


@pytest.fixture(scope="module")
def spawned(root, single_process) -> list[dict]:
    return run_ranks(4, matrix_worker, root, timeout=300)


def test_saved_caches_are_not_trivial(single_process, spawned):
    saved = {**single_process, **spawned[0]["saved"]}
    assert sorted(saved) == SOURCES
    for src, (rows, after) in saved.items():
        filled = int(rows["filled"].sum())
        assert 0 < filled < CACHE, f"{src}: a full or empty cache would hide row-order mistakes"
        assert len(set(rows["age"][rows["filled"]].tolist())) > 2, src
        assert (after["sampled"] >= 0).sum() > 0, f"{src}: nothing sampled after the save"
    # Same global batch, same seed: the step before the save is world-size independent, but *which*
    # rows the positives went into depends on how the batch was split, so the caches differ.
    assert not torch.equal(saved["w2"][0]["age"], saved["w3"][0]["age"])


@pytest.mark.parametrize("w_new", [1, 2, 3, 4])
@pytest.mark.parametrize("src", SOURCES)
def test_reshard_keeps_every_row_and_the_next_step(single_process, spawned, src, w_new):
    saved = {**single_process, **spawned[0]["saved"]}
    want_rows, want_after = saved[src]
    rows, counters, after = spawned[0]["loaded"][(src, w_new)]
    label = f"saved by {src}, loaded by {w_new} ranks"
    assert_same_rows(rows, want_rows, label)  # global row j stays row j: order, ages, features, embedding bits
    assert counters == (1, 5), f"{label}: step counter and seed must be the saved run's"
    assert_same_step(after, want_after, label)


@pytest.mark.parametrize("src", ["w1", "w2", "w3", "w4"])
def test_single_process_loads_what_ranks_saved(spawned, src, root):
    want_rows, want_after = spawned[0]["saved"][src]
    rows, counters, after = load_and_step(os.path.join(root, src), 1, 0)
    assert_same_rows(rows, want_rows, src)
    assert counters == (1, 5)
    assert_same_step(after, want_after, src)


def test_damaged_checkpoints_are_refused_by_every_rank(spawned):
    by_rank = [r["damaged"] for r in spawned[:3]]
    expect = {
        "missing": "file __1_0.distcp is missing",
        "truncated": "file __1_0.distcp has",
        "flipped": "file __1_0.distcp does not match its sha256 in the manifest",  # the digest, before any read
        "bare_dcp_flipped": f"1 rows from global row {CORRUPT_ROW}",  # without a manifest: the row hashes
        "no_manifest": f"has no {MANIFEST_NAME}",
        "bare_dcp_missing": "CheckpointException",
    }
    for how, phrase in expect.items():
        for rank, damaged in enumerate(by_rank):
            outcome, unchanged, steps = damaged[how]
            assert phrase in outcome, (how, rank, outcome)
            assert unchanged and steps == 0, f"{how}: rank {rank} wrote part of a refused checkpoint"
    # The flipped byte lives on rank 1 (rows 16..31 of 3): ranks 0 and 2 refuse because rank 1 did.
    assert "rank 1: 1 rows" in by_rank[0]["bare_dcp_flipped"][0]


def test_jagged_host_int8_cache_reshards(spawned, root):
    want = spawned[0]["jagged_saved"]
    assert 0 < int(want["filled"].sum()) < J_CACHE and int(want["tokens:lengths"].max()) > 1
    assert_same_rows(spawned[0]["jagged_loaded_3"], want, "jagged, 4 -> 3 ranks")
    single = jagged_handler(seed=99)  # 4 -> 1 (no torch.distributed), host-resident again
    load({"cache": CacheCheckpoint(single)}, os.path.join(root, "jagged_w4"))
    assert_same_rows(jagged_state(single), want, "jagged, 4 -> 1 rank")
    assert single.store.feature("tokens").values.device.type == "cpu"


def test_jagged_round_trip_continues_identically(tmp_path):
    """Same world size: the loaded cache (device-resident this time) takes the very same next steps."""
    a = jagged_handler(seed=5)
    for step in range(5):
        jagged_step(a, step, 0, 3)
    save({"cache": CacheCheckpoint(a)}, tmp_path / "ckpt")
    b = jagged_handler(seed=99, host=False)
    load({"cache": CacheCheckpoint(b)}, tmp_path / "ckpt")
    assert_same_rows(jagged_state(b), jagged_state(a), "jagged round trip")
    for step in range(5, 8):
        assert torch.equal(jagged_step(b, step, 0, 3), jagged_step(a, step, 0, 3)), step
        assert (a.last_step.sampled_rows >= 0).any(), "nothing sampled: the comparison would be vacuous"
        for key in ("training_loss", "sampled_rows", "lse"):
            assert torch.equal(getattr(b.last_step, key), getattr(a.last_step, key)), (step, key)


# ---- single-process tests ------------------------------------------------------------------
def test_plain_state_dict_round_trip_same_world_size():
    """``handler.state_dict()`` holds the shard, step and seed: a fresh handler continues identically."""
    tower = Tower()
    a = new_handler(seed=5)
    a.load_global_rows(global_cache(CACHE, tower, with_ids=True))
    step_on(a, tower, first_batch(tower), 1, 0)
    state = a.state_dict()
    assert {"step_count", "seed", "store.embeddings", "store.age", "store.filled", "store.features.x",
            "store.features.doc_id"} <= set(state)
    b = new_handler(seed=99)
    b.load_state_dict(state)
    assert (b.steps_done, int(b.seed)) == (1, 5)
    want, got = step_on(a, tower, next_batch(tower), 1, 0), step_on(b, tower, next_batch(tower), 1, 0)
    for key in STEP_FIELDS:
        assert torch.equal(got[key], want[key]), key


def mismatched(kind: str) -> ShardedCacheLossHandler:
    """A handler that differs from the saved one in one respect."""
    s = specs(with_ids=True)
    kw: dict = dict(score_transform=3.0, block_size=4, embedding_codec="bf16", doc_id_key="doc_id")
    size = CACHE
    if kind == "shape":
        s["x"] = FieldSpec((FEAT + 1,), torch.float32)
    elif kind == "dtype":
        s["x"] = FieldSpec((FEAT,), torch.float64)
    elif kind == "field":
        del s["doc_id"]
        kw["doc_id_key"] = None
    elif kind == "cache_size":
        size = 2 * CACHE
    elif kind == "codec":
        kw["embedding_codec"] = "fp32"
    elif kind == "block_size":
        kw["block_size"] = 8
    return ShardedCacheLossHandler(s, size, "embedding", ("x",), **kw)


@pytest.mark.parametrize("kind, phrases", [
    ("shape", ["specs['x'].shape: checkpoint [6], handler [7]"]),
    ("dtype", ["specs['x'].dtype: checkpoint torch.float32, handler torch.float64"]),
    ("field", ["specs: field 'doc_id' is in the checkpoint but not in the handler",
               "doc_id_key: checkpoint 'doc_id', handler None"]),
    ("cache_size", ["cache_size: checkpoint 48, handler 96"]),
    ("codec", ["codec: checkpoint 'bf16', handler 'fp32'"]),
    ("block_size", ["block_size: checkpoint 4, handler 8", "block_size=4"]),
])
def test_mismatch_is_refused_naming_the_difference(single_process, root, kind, phrases):
    handler = mismatched(kind)
    before = {k: v.clone() for k, v in handler.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load({"cache": CacheCheckpoint(handler)}, os.path.join(root, "w0"))
    for phrase in phrases:
        assert phrase in str(info.value)
    assert "nothing was loaded" in str(info.value)
    after = handler.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_block_size_change_can_be_allowed(single_process, root):
    handler = mismatched("block_size")
    load({"cache": CacheCheckpoint(handler, allow_block_size_change=True)}, os.path.join(root, "w0"))
    assert_same_rows(handler.gather_global_rows(), single_process["w0"][0], "block_size 8")


@pytest.mark.parametrize("how", ["missing", "truncated", "flipped", "no_manifest"])
def test_damaged_checkpoint_is_refused_in_one_process(spawned, root, how):
    """Copies of the W = 2 checkpoint, loaded without torch.distributed: refused, cache untouched."""
    value = float(spawned[0]["saved"]["w2"][0]["x"][CORRUPT_ROW, 2])
    bad = os.path.join(root, f"single_{how}")
    damaged_copy(os.path.join(root, "w2"), bad, how, value)
    handler = new_handler(seed=99)
    tower = Tower()
    handler.load_global_rows(global_cache(CACHE, tower, seed=21, with_ids=True))
    before = {k: v.clone() for k, v in handler.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load({"cache": CacheCheckpoint(handler)}, bad)
    if how == "flipped":  # the manifest's digest names the file before any tensor is read
        assert f"refusing checkpoint {bad}: file __1_0.distcp does not match its sha256" in str(info.value)
    after = handler.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert verify_checkpoint(bad)
    assert bool(verify_checkpoint(bad, digests=False)) == (how != "flipped")  # sizes alone miss a flipped byte


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_bare_dcp_load_of_a_corrupted_cache_leaves_it_untouched(spawned, root):
    """Without :func:`load` (no manifest check) the row hashes still refuse a flipped byte."""
    value = float(spawned[0]["saved"]["w2"][0]["x"][CORRUPT_ROW, 2])
    bad = os.path.join(root, "bare_flipped")
    damaged_copy(os.path.join(root, "w2"), bad, "flipped", value)
    handler = new_handler(seed=99)
    before = {k: v.clone() for k, v in handler.state_dict().items()}
    with pytest.raises(CheckpointError, match="do not match their stored hash"):
        dcp.load({"cache": CacheCheckpoint(handler)}, checkpoint_id=bad, no_dist=True)
    after = handler.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_latest_checkpoint_skips_incomplete(tmp_path):
    tower = Tower()
    handler = new_handler(seed=5)
    handler.load_global_rows(global_cache(CACHE, tower, with_ids=True))
    for step in range(3):
        save({"cache": CacheCheckpoint(handler)}, tmp_path / f"step_{step}")
        step_on(handler, tower, global_batch(BATCH, tower, seed=30 + step, with_ids=True), 1, 0)
    assert latest_checkpoint(tmp_path) == str(tmp_path / "step_2")
    assert json.loads((tmp_path / "step_2" / MANIFEST_NAME).read_text())["step"] == 2
    (tmp_path / "step_2" / "__0_0.distcp").unlink()  # cut short: fall back to the previous one
    assert latest_checkpoint(tmp_path) == str(tmp_path / "step_1")
    (tmp_path / "step_1" / MANIFEST_NAME).unlink()  # never finished
    assert latest_checkpoint(tmp_path) == str(tmp_path / "step_0")
    assert latest_checkpoint(tmp_path / "nothing_here") is None


def test_row_hashes_see_every_byte_and_ignore_the_sharding():
    g = torch.Generator().manual_seed(3)
    fields = [torch.randn(12, 3, generator=g).to(torch.bfloat16), torch.randint(0, 9, (12,), generator=g),
              torch.rand(12, generator=g) > 0.5, torch.randn(12, 2, 2, generator=g)]
    whole = row_hashes(fields, 0)
    # Hashing shards (any split, any offset) gives the slices of the whole-cache hashes.
    for lo, hi in ((0, 4), (4, 12), (5, 6)):
        assert torch.equal(row_hashes([f[lo:hi] for f in fields], lo), whole[lo:hi])
    # A row moved to another position no longer matches.
    assert not torch.equal(row_hashes([f[1:2] for f in fields], 0), whole[1:2])
    # Every single-bit change of every byte of row 7 changes row 7's hash and only that one.
    for index, f in enumerate(fields):
        raw = f.clone().reshape(12, -1).contiguous().view(torch.uint8)
        for col in range(raw.shape[1]):
            for bit in (0, 7):
                changed = raw.clone()
                changed[7, col] ^= 1 << bit
                if f.dtype == torch.bool and bit == 7:
                    continue  # a bool byte must stay 0 or 1
                altered = list(fields)
                altered[index] = changed.view(f.dtype).reshape(f.shape)
                h = row_hashes(altered, 0)
                assert h[7] != whole[7] and torch.equal(h[:7], whole[:7]) and torch.equal(h[8:], whole[8:])


def mixed_checkpoints_worker(rank: int, world: int, root: str) -> dict:
    """Two runs (A, B) save at step 1, A again at step 2; then each rank of a fresh handler loads another one:
    A and B at the same step, A at steps 1 and 2 (with :func:`load` and with a bare ``dcp.load``)."""
    tower = Tower()
    paths = {}
    for run, seed in (("A", 5), ("B", 6)):
        handler = new_handler(seed=seed)
        handler.load_global_rows(global_cache(CACHE, tower, seed=seed, empty_every=2, with_ids=True))
        step_on(handler, tower, first_batch(tower), world, rank)
        paths[run] = os.path.join(root, run)
        save({"cache": CacheCheckpoint(handler)}, paths[run])
        if run == "A":
            step_on(handler, tower, next_batch(tower), world, rank)
            paths["A2"] = os.path.join(root, "A2")
            save({"cache": CacheCheckpoint(handler)}, paths["A2"])
    out = {}
    for case, (mine, bare) in {"run": (("A", "B"), False), "step": (("A", "A2"), False),
                               "bare_step": (("A", "A2"), True)}.items():
        handler = new_handler(seed=99)
        handler.load_global_rows(global_cache(CACHE, tower, seed=3, with_ids=True))
        before = {k: v.clone() for k, v in handler.state_dict().items()}
        state, path = {"cache": CacheCheckpoint(handler)}, paths[mine[rank]]
        try:
            dcp.load(state, checkpoint_id=path) if bare else load(state, path)
            error = None
        except CheckpointError as exc:
            error = str(exc)
        except CheckpointException as exc:  # DCP wraps what load_state_dict raises
            error = " ".join(str(e) for e in exc.failures.values()) or str(exc)
        after = handler.state_dict()
        out[case] = {"error": error, "unchanged": all(torch.equal(after[k], v) for k, v in before.items()),
                     "steps": handler.steps_done}
    return out


def test_ranks_loading_different_checkpoints_are_refused_together(tmp_path):
    """A rank whose "latest checkpoint" lookup raced a save, or a node with another view of the filesystem,
    reads another checkpoint than its peers: every rank refuses with the same error, nothing is written."""
    got = run_ranks(2, mixed_checkpoints_worker, str(tmp_path), timeout=240)
    for case in ("run", "step", "bare_step"):
        errors = [r[case]["error"] for r in got]
        assert errors[0] is not None and all(r[case]["unchanged"] and r[case]["steps"] == 0 for r in got), (case, got)
        if case != "bare_step":
            assert errors[0] == errors[1], errors
            assert "ranks read different checkpoints" in errors[0] and "nothing was loaded" in errors[0], errors[0]
            assert "rank 0" in errors[0] and "rank 1" in errors[0]
        else:
            assert all("ranks read different checkpoints" in e for e in errors), errors
    assert "step 1" in got[0]["step"]["error"] and "step 2" in got[0]["step"]["error"]


# ---- a stalled rank during a save ------------------------------------------------------------
STALL_TIMEOUT_S = 2.0


def stalled_save_worker(rank: int, world_size: int, root: str) -> dict:
    """Rank 1 stalls past the handler's collective timeout before saving; every rank's save must fail with the
    engine's error for a collective that did not complete (the handler's timeout, not DCP's or gloo's)."""
    import time

    handler = make_handler(16, collective_timeout_s=STALL_TIMEOUT_S)
    handler.load_global_rows(global_cache(16, Tower()))
    dist.barrier()  # both ranks here: rank 0's save starts now, rank 1's well after rank 0's timeout
    if rank == 1:
        time.sleep(3 * STALL_TIMEOUT_S)
    start = time.monotonic()
    try:
        save({"cache": CacheCheckpoint(handler)}, os.path.join(root, "stalled"))
        return {"error": None}
    except CollectiveFailed as exc:
        return {"error": str(exc), "seconds": time.monotonic() - start}


def test_stalled_rank_fails_a_save_with_the_engines_error_on_every_rank(tmp_path):
    got = run_ranks(2, stalled_save_worker, str(tmp_path), timeout=120)
    where = os.path.join(str(tmp_path), "stalled")
    for rank, r in enumerate(got):
        assert r["error"] is not None, (rank, got)
        # the step's format (exchange.Comm): step, collective, this rank, the timeout
        assert r["error"].startswith(f"step 0: checkpoint collective 'save {where}: prepare' on rank {rank} of 2 "
                                     f"did not complete within {STALL_TIMEOUT_S:g} s (a rank died, stalled or "
                                     "disconnected): "), r["error"]
    assert got[0]["seconds"] < STALL_TIMEOUT_S + 3  # the handler's 2 s timeout (plus slack), never the 6 s stall
    assert not (Path(where) / MANIFEST_NAME).exists()


# ---- every file of a checkpoint bound to the others, damage named ---------------------------------------
# One spawn of 2 gloo ranks writes two checkpoints of the same run (steps 1 and 2), loads one saved with a
# block size that cannot be built at 2 ranks, and then loses rank 1 just before a save. This process (no
# torch.distributed) then loads edited, mixed and damaged copies: each must be refused with
# ``CheckpointError`` naming the path and the file (never a raw JSON/key/type error), the cache untouched,
# and the bare ``dcp.load`` path must refuse the edits and mixes too (salted row hashes).
SEED = 5


def bound_handler(group=None, **kw):
    kw.setdefault("block_size", 4)
    return make_handler(CACHE, with_ids=True, seed=kw.pop("seed", SEED), process_group=group, **kw)


def bound_step(h, tower: Tower, seed: int, lo: int, hi: int) -> None:
    run_step(h, tower, global_batch(8, tower, seed=seed, with_ids=True), lo, hi, with_ids=True)


def binding_worker(rank: int, world_size: int, binding_root: str) -> dict:
    tower = Tower()
    h = bound_handler()
    h.load_global_rows(global_cache(CACHE, tower, with_ids=True))
    lo, hi = (0, 3) if rank == 0 else (3, 8)
    out: dict = {}
    bound_step(h, tower, 31, lo, hi)
    save({"cache": CacheCheckpoint(h)}, os.path.join(binding_root, "a"))
    out["a"] = h.gather_global_rows()
    bound_step(h, tower, 32, lo, hi)
    save({"cache": CacheCheckpoint(h)}, os.path.join(binding_root, "b"))
    out["b"] = h.gather_global_rows()

    # A checkpoint saved by one process with block_size=16 (48 rows): 16 does not divide 24 rows per rank.
    fresh = bound_handler(block_size=None)
    try:
        load({"cache": CacheCheckpoint(fresh)}, os.path.join(binding_root, "block16"))
        out["block_message"] = "loaded"
    except CheckpointError as exc:
        out["block_message"] = str(exc)
    buildable = {}
    for size in sorted({int(n) for n in re.findall(r"block_size=(\d+)", out["block_message"])}):
        try:
            bound_handler(block_size=size)
            buildable[size] = True
        except ValueError:
            buildable[size] = False
    out["buildable"] = buildable

    dist.barrier()
    if rank == 1:
        os._exit(0)  # dies before the next save, without a word
    try:
        save({"cache": CacheCheckpoint(h)}, os.path.join(binding_root, "c"))
        out["dead_peer"] = "saved"
    except Exception as exc:  # noqa: BLE001  (the test checks the type)
        out["dead_peer"] = f"{type(exc).__name__}: {exc}"
    try:
        load({"cache": CacheCheckpoint(h)}, os.path.join(binding_root, "a"))
        out["dead_peer_load"] = "loaded"
    except Exception as exc:  # noqa: BLE001
        out["dead_peer_load"] = f"{type(exc).__name__}: {exc}"
    return out


@pytest.fixture(scope="module")
def binding_root(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("hardening_ckpt")
    h = bound_handler(block_size=16)
    h.load_global_rows(global_cache(CACHE, Tower(), with_ids=True))
    save({"cache": CacheCheckpoint(h)}, path / "block16")
    return str(path)


@pytest.fixture(scope="module")
def binding_spawned(binding_root) -> list:
    return run_ranks(2, binding_worker, binding_root, timeout=180, allow_errors=True)


def fresh_handler():
    h = bound_handler(seed=99)
    h.load_global_rows(global_cache(CACHE, Tower(), seed=21, with_ids=True))
    return h


def refused(path: str, bare: bool = False) -> str:
    """Loads ``path`` into a fresh handler; asserts CheckpointError with the cache untouched; returns the message."""
    h = fresh_handler()
    before = {k: v.clone() for k, v in h.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        if bare:
            dcp.load({"cache": CacheCheckpoint(h)}, checkpoint_id=path, no_dist=True)
        else:
            load({"cache": CacheCheckpoint(h)}, path)
    after = h.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items()), "a refused checkpoint changed the cache"
    assert h.steps_done == 0
    return str(info.value)


def edit_bytes(file: Path, old: bytes, new: bytes) -> None:
    blob = file.read_bytes()
    assert blob.count(old) == 1 and len(old) == len(new), (old, blob.count(old))
    file.write_bytes(blob.replace(old, new))


def test_both_checkpoints_load_and_the_run_is_not_trivial(binding_spawned, binding_root):
    assert binding_spawned[1] == ("died", 0)
    for name in ("a", "b"):
        h = fresh_handler()
        load({"cache": CacheCheckpoint(h)}, os.path.join(binding_root, name))
        got, want = h.gather_global_rows(), binding_spawned[0][name]
        assert all(torch.equal(got[k], want[k]) for k in want), name
    assert h.steps_done == 2 and int(h.seed) == SEED
    # the two checkpoints differ on rank 1's rows (24..47): mixing them must be caught
    assert not torch.equal(binding_spawned[0]["a"]["embedding"][24:], binding_spawned[0]["b"]["embedding"][24:])
    manifest = json.loads((Path(binding_root) / "a" / MANIFEST_NAME).read_text())
    other = json.loads((Path(binding_root) / "b" / MANIFEST_NAME).read_text())
    assert manifest["checkpoint_id"] != other["checkpoint_id"]
    for name, digest in manifest["sha256"].items():  # independent digests of every file
        assert hashlib.sha256((Path(binding_root) / "a" / name).read_bytes()).hexdigest() == digest


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("bare", [False, True])
def test_rank_file_from_another_checkpoint_is_refused(binding_spawned, binding_root, tmp_path, bare):
    mixed = tmp_path / "mixed"
    shutil.copytree(os.path.join(binding_root, "a"), mixed)
    shutil.copy(os.path.join(binding_root, "b", "__1_0.distcp"), mixed / "__1_0.distcp")
    message = refused(str(mixed), bare)
    if bare:  # rank 1's rows were hashed under the other checkpoint's record
        assert "24 cache rows do not match their stored hash (rank 0: 24 rows from global row 24)" in message
    else:
        assert str(mixed) in message and "file __1_0.distcp does not match its sha256" in message


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("field, old, new", [("step", b'"step": 1', b'"step": 9'), ("seed", b'"seed": 5', b'"seed": 7')])
@pytest.mark.parametrize("bare", [False, True])
def test_edited_record_is_refused(binding_spawned, binding_root, tmp_path, field, old, new, bare):
    edited = tmp_path / "edited"
    shutil.copytree(os.path.join(binding_root, "a"), edited)
    edit_bytes(edited / "__0_0.distcp", old, new)
    message = refused(str(edited), bare)
    if bare:
        assert f"{CACHE} cache rows do not match their stored hash" in message and "every row fails" in message
    else:
        assert str(edited) in message and "file __0_0.distcp does not match its sha256" in message


def test_edited_record_with_a_recomputed_file_digest_is_refused(binding_spawned, binding_root, tmp_path):
    """Even a manifest whose file digest was 'repaired' refuses: the record's own digest is in it too."""
    edited = tmp_path / "edited"
    shutil.copytree(os.path.join(binding_root, "a"), edited)
    edit_bytes(edited / "__0_0.distcp", b'"step": 1', b'"step": 9')
    manifest = json.loads((edited / MANIFEST_NAME).read_text())
    manifest["sha256"]["__0_0.distcp"] = hashlib.sha256((edited / "__0_0.distcp").read_bytes()).hexdigest()
    (edited / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert not verify_checkpoint(edited)
    message = refused(str(edited))
    assert "the cache record 'cache' does not match its digest in the manifest" in message and str(edited) in message


def test_manifest_from_another_checkpoint_is_refused(binding_spawned, binding_root, tmp_path):
    swapped = tmp_path / "swapped"
    shutil.copytree(os.path.join(binding_root, "a"), swapped)
    shutil.copy(os.path.join(binding_root, "b", MANIFEST_NAME), swapped / MANIFEST_NAME)
    message = refused(str(swapped))
    for name in (".metadata", "__0_0.distcp", "__1_0.distcp"):
        assert f"file {name} does not match its sha256" in message


DAMAGE = {  # manifest text -> phrase of the error
    "truncated": (lambda text: text[: len(text) // 2], "is unreadable (JSONDecodeError"),
    "not utf-8": (lambda text: "\udcff", "is unreadable (UnicodeDecodeError"),
    "a list": (lambda text: "[1, 2]", "expected a JSON object, got list"),
    "no files": (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "files"}), "'files' is missing"),
    "sizes as strings": (lambda text: json.dumps({**json.loads(text), "files": {
        k: str(v) for k, v in json.loads(text)["files"].items()}}), "'files' must map file names"),
    "step a string": (lambda text: json.dumps({**json.loads(text), "step": "six"}), "'step' is str"),
    "a digest missing": (lambda text: json.dumps({**json.loads(text), "sha256": {}}), "'sha256' must hold one hex digest"),
    "no records": (lambda text: json.dumps({**json.loads(text), "records": None}), "'records' is NoneType"),
    "a path outside": (lambda text: json.dumps({**json.loads(text), "files": {"../x": 1}, "sha256": {"../x": "0" * 64}}),
                       "'files' must map file names in the directory"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_manifest_is_a_checkpoint_error(binding_spawned, binding_root, tmp_path, case):
    damage, phrase = DAMAGE[case]
    bad = tmp_path / "ckpt" / "bad"
    shutil.copytree(os.path.join(binding_root, "a"), bad)
    text = (bad / MANIFEST_NAME).read_text()
    (bad / MANIFEST_NAME).write_text(damage(text), errors="surrogateescape")
    message = refused(str(bad))
    assert str(bad / MANIFEST_NAME) in message and phrase in message, message
    problems = verify_checkpoint(bad)
    assert len(problems) == 1 and phrase in problems[0]
    assert latest_checkpoint(tmp_path / "ckpt") is None  # skipped, no raw error
    shutil.copytree(os.path.join(binding_root, "a"), tmp_path / "ckpt" / "good")
    assert latest_checkpoint(tmp_path / "ckpt") == str(tmp_path / "ckpt" / "good")


def load_record(meta) -> None:
    """What a bare ``dcp.load`` hands the cache: a record (here damaged) and no rows."""
    CacheCheckpoint(bound_handler()).load_state_dict({"meta": meta})


@pytest.mark.parametrize("meta, phrase", [
    ('{"format": "sharded_negcache.cache/2", "step": ', "is not valid JSON"),
    ("[]", "must be a JSON object, got list"),
    (None, "holds no cache record"),
])
def test_damaged_record_is_a_checkpoint_error(meta, phrase):
    with pytest.raises(CheckpointError, match=re.escape(phrase)):
        load_record(meta)


def test_record_with_wrong_types_is_a_checkpoint_error():
    record = CacheCheckpoint(bound_handler()).record()
    for key, value, phrase in (("step", "6", "'step' is str, expected int"), ("seed", None, "'seed' is NoneType"),
                               ("checkpoint_id", 3, "'checkpoint_id' must be a string or null")):
        with pytest.raises(CheckpointError, match=re.escape(phrase)):
            load_record(json.dumps(dict(record, **{key: value})))
    with pytest.raises(CheckpointError, match="record is damaged"):  # a spec entry that is not an object
        load_record(json.dumps(dict(record, specs={"x": [1], "embedding": 2})))
    del record["cache_size"]
    with pytest.raises(CheckpointError, match="'cache_size' is missing"):
        parse_record(json.dumps(record))


def test_block_size_suggestion_can_be_built(binding_spawned):
    message = binding_spawned[0]["block_message"]
    assert "block_size: checkpoint 16, handler 8" in message
    assert "the saved block size 16 does not divide the 24 rows per rank" in message
    assert binding_spawned[0]["buildable"] and all(binding_spawned[0]["buildable"].values()), binding_spawned[0]["buildable"]
    worlds = [int(w) for w in re.search(r"multiple of 16 \(([\d, ]+)\)", message).group(1).split(", ")]
    assert worlds == [w for w in range(1, CACHE + 1) if CACHE % w == 0 and (CACHE // w) % 16 == 0] == [1, 3]


def test_rank_dead_before_save_is_a_collective_failure(binding_spawned):
    message = binding_spawned[0]["dead_peer"]
    assert message.startswith("CollectiveFailed: step 2: ") and "save" in message, message
    assert "rank 0 of 2" in message
    assert not (Path(message.split("'save ")[1].split(":")[0]) / MANIFEST_NAME).exists(), "no manifest after a failed save"
    message = binding_spawned[0]["dead_peer_load"]  # the same for a load on the survivor
    assert message.startswith("CollectiveFailed: step 2: checkpoint collective 'load ") and "rank 0 of 2" in message, message
