"""Issue 12, items 13 and 14: every file of a checkpoint is bound to the others, damage is named.

One spawn of 2 gloo ranks writes two checkpoints of the same run (steps 1 and 2), loads one saved
with a block size that cannot be built at 2 ranks, and then loses rank 1 just before a save. This
process (no torch.distributed) then loads edited, mixed and damaged copies: each must be refused
with ``CheckpointError`` naming the path and the file (never a raw JSON/key/type error), the cache
untouched, and the bare ``dcp.load`` path must refuse the edits and mixes too (salted row hashes).
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

from dist_utils import run_ranks
from engine_cases import Tower, global_batch, global_cache, make_handler, run_step
from sharded_negcache.checkpoint import (
    MANIFEST_NAME,
    CacheCheckpoint,
    CheckpointError,
    latest_checkpoint,
    load,
    parse_record,
    save,
    verify_checkpoint,
)

CACHE, SEED = 48, 5


def handler(group=None, **kw):
    kw.setdefault("block_size", 4)
    return make_handler(CACHE, with_ids=True, seed=kw.pop("seed", SEED), process_group=group, **kw)


def step(h, tower: Tower, seed: int, lo: int, hi: int) -> None:
    run_step(h, tower, global_batch(8, tower, seed=seed, with_ids=True), lo, hi, with_ids=True)


def worker(rank: int, world_size: int, root: str) -> dict:
    tower = Tower()
    h = handler()
    h.load_global_rows(global_cache(CACHE, tower, with_ids=True))
    lo, hi = (0, 3) if rank == 0 else (3, 8)
    out: dict = {}
    step(h, tower, 31, lo, hi)
    save({"cache": CacheCheckpoint(h)}, os.path.join(root, "a"))
    out["a"] = h.gather_global_rows()
    step(h, tower, 32, lo, hi)
    save({"cache": CacheCheckpoint(h)}, os.path.join(root, "b"))
    out["b"] = h.gather_global_rows()

    # A checkpoint saved by one process with block_size=16 (48 rows): 16 does not divide 24 rows per rank.
    fresh = handler(block_size=None)
    try:
        load({"cache": CacheCheckpoint(fresh)}, os.path.join(root, "block16"))
        out["block_message"] = "loaded"
    except CheckpointError as exc:
        out["block_message"] = str(exc)
    buildable = {}
    for size in sorted({int(n) for n in re.findall(r"block_size=(\d+)", out["block_message"])}):
        try:
            handler(block_size=size)
            buildable[size] = True
        except ValueError:
            buildable[size] = False
    out["buildable"] = buildable

    dist.barrier()
    if rank == 1:
        os._exit(0)  # dies before the next save, without a word
    try:
        save({"cache": CacheCheckpoint(h)}, os.path.join(root, "c"))
        out["dead_peer"] = "saved"
    except Exception as exc:  # noqa: BLE001  (the test checks the type)
        out["dead_peer"] = f"{type(exc).__name__}: {exc}"
    try:
        load({"cache": CacheCheckpoint(h)}, os.path.join(root, "a"))
        out["dead_peer_load"] = "loaded"
    except Exception as exc:  # noqa: BLE001
        out["dead_peer_load"] = f"{type(exc).__name__}: {exc}"
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("hardening_ckpt")
    h = handler(block_size=16)
    h.load_global_rows(global_cache(CACHE, Tower(), with_ids=True))
    save({"cache": CacheCheckpoint(h)}, path / "block16")
    return str(path)


@pytest.fixture(scope="module")
def spawned(root) -> list:
    return run_ranks(2, worker, root, timeout=180, allow_errors=True)


def fresh_handler():
    h = handler(seed=99)
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


def test_both_checkpoints_load_and_the_run_is_not_trivial(spawned, root):
    assert spawned[1] == ("died", 0)
    for name in ("a", "b"):
        h = fresh_handler()
        load({"cache": CacheCheckpoint(h)}, os.path.join(root, name))
        got, want = h.gather_global_rows(), spawned[0][name]
        assert all(torch.equal(got[k], want[k]) for k in want), name
    assert h.steps_done == 2 and int(h.seed) == SEED
    # the two checkpoints differ on rank 1's rows (24..47): mixing them must be caught
    assert not torch.equal(spawned[0]["a"]["embedding"][24:], spawned[0]["b"]["embedding"][24:])
    manifest = json.loads((Path(root) / "a" / MANIFEST_NAME).read_text())
    other = json.loads((Path(root) / "b" / MANIFEST_NAME).read_text())
    assert manifest["checkpoint_id"] != other["checkpoint_id"]
    for name, digest in manifest["sha256"].items():  # independent digests of every file
        assert hashlib.sha256((Path(root) / "a" / name).read_bytes()).hexdigest() == digest


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("bare", [False, True])
def test_rank_file_from_another_checkpoint_is_refused(spawned, root, tmp_path, bare):
    mixed = tmp_path / "mixed"
    shutil.copytree(os.path.join(root, "a"), mixed)
    shutil.copy(os.path.join(root, "b", "__1_0.distcp"), mixed / "__1_0.distcp")
    message = refused(str(mixed), bare)
    if bare:  # rank 1's rows were hashed under the other checkpoint's record
        assert "24 cache rows do not match their stored hash (rank 0: 24 rows from global row 24)" in message
    else:
        assert str(mixed) in message and "file __1_0.distcp does not match its sha256" in message


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("field, old, new", [("step", b'"step": 1', b'"step": 9'), ("seed", b'"seed": 5', b'"seed": 7')])
@pytest.mark.parametrize("bare", [False, True])
def test_edited_record_is_refused(spawned, root, tmp_path, field, old, new, bare):
    edited = tmp_path / "edited"
    shutil.copytree(os.path.join(root, "a"), edited)
    edit_bytes(edited / "__0_0.distcp", old, new)
    message = refused(str(edited), bare)
    if bare:
        assert f"{CACHE} cache rows do not match their stored hash" in message and "every row fails" in message
    else:
        assert str(edited) in message and "file __0_0.distcp does not match its sha256" in message


def test_edited_record_with_a_recomputed_file_digest_is_refused(spawned, root, tmp_path):
    """Even a manifest whose file digest was 'repaired' refuses: the record's own digest is in it too."""
    edited = tmp_path / "edited"
    shutil.copytree(os.path.join(root, "a"), edited)
    edit_bytes(edited / "__0_0.distcp", b'"step": 1', b'"step": 9')
    manifest = json.loads((edited / MANIFEST_NAME).read_text())
    manifest["sha256"]["__0_0.distcp"] = hashlib.sha256((edited / "__0_0.distcp").read_bytes()).hexdigest()
    (edited / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert not verify_checkpoint(edited)
    message = refused(str(edited))
    assert "the cache record 'cache' does not match its digest in the manifest" in message and str(edited) in message


def test_manifest_from_another_checkpoint_is_refused(spawned, root, tmp_path):
    swapped = tmp_path / "swapped"
    shutil.copytree(os.path.join(root, "a"), swapped)
    shutil.copy(os.path.join(root, "b", MANIFEST_NAME), swapped / MANIFEST_NAME)
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
def test_damaged_manifest_is_a_checkpoint_error(spawned, root, tmp_path, case):
    damage, phrase = DAMAGE[case]
    bad = tmp_path / "ckpt" / "bad"
    shutil.copytree(os.path.join(root, "a"), bad)
    text = (bad / MANIFEST_NAME).read_text()
    (bad / MANIFEST_NAME).write_text(damage(text), errors="surrogateescape")
    message = refused(str(bad))
    assert str(bad / MANIFEST_NAME) in message and phrase in message, message
    problems = verify_checkpoint(bad)
    assert len(problems) == 1 and phrase in problems[0]
    assert latest_checkpoint(tmp_path / "ckpt") is None  # skipped, no raw error
    shutil.copytree(os.path.join(root, "a"), tmp_path / "ckpt" / "good")
    assert latest_checkpoint(tmp_path / "ckpt") == str(tmp_path / "ckpt" / "good")


def load_record(meta) -> None:
    """What a bare ``dcp.load`` hands the cache: a record (here damaged) and no rows."""
    CacheCheckpoint(handler()).load_state_dict({"meta": meta})


@pytest.mark.parametrize("meta, phrase", [
    ('{"format": "sharded_negcache.cache/2", "step": ', "is not valid JSON"),
    ("[]", "must be a JSON object, got list"),
    (None, "holds no cache record"),
])
def test_damaged_record_is_a_checkpoint_error(meta, phrase):
    with pytest.raises(CheckpointError, match=re.escape(phrase)):
        load_record(meta)


def test_record_with_wrong_types_is_a_checkpoint_error():
    record = CacheCheckpoint(handler()).record()
    for key, value, phrase in (("step", "6", "'step' is str, expected int"), ("seed", None, "'seed' is NoneType"),
                               ("checkpoint_id", 3, "'checkpoint_id' must be a string or null")):
        with pytest.raises(CheckpointError, match=re.escape(phrase)):
            load_record(json.dumps(dict(record, **{key: value})))
    with pytest.raises(CheckpointError, match="record is damaged"):  # a spec entry that is not an object
        load_record(json.dumps(dict(record, specs={"x": [1], "embedding": 2})))
    del record["cache_size"]
    with pytest.raises(CheckpointError, match="'cache_size' is missing"):
        parse_record(json.dumps(record))


def test_block_size_suggestion_can_be_built(spawned):
    message = spawned[0]["block_message"]
    assert "block_size: checkpoint 16, handler 8" in message
    assert "the saved block size 16 does not divide the 24 rows per rank" in message
    assert spawned[0]["buildable"] and all(spawned[0]["buildable"].values()), spawned[0]["buildable"]
    worlds = [int(w) for w in re.search(r"multiple of 16 \(([\d, ]+)\)", message).group(1).split(", ")]
    assert worlds == [w for w in range(1, CACHE + 1) if CACHE % w == 0 and (CACHE // w) % 16 == 0] == [1, 3]


def test_rank_dead_before_save_is_a_collective_failure(spawned):
    message = spawned[0]["dead_peer"]
    assert message.startswith("CollectiveFailed: step 2: ") and "save" in message, message
    assert "rank 0 of 2" in message
    assert not (Path(message.split("'save ")[1].split(":")[0]) / MANIFEST_NAME).exists(), "no manifest after a failed save"
    message = spawned[0]["dead_peer_load"]  # the same for a load on the survivor
    assert message.startswith("CollectiveFailed: step 2: checkpoint collective 'load ") and "rank 0 of 2" in message, message
