"""The sentence-transformers loss on 2 ranks: DDP gradients equal one process's; the trainer under torchrun.

- Two gloo processes wrap the model in DDP as the trainer does (``find_unused_parameters=True``: the
  BERT pooler is unused) and each takes half of the global batch; every step, DDP's gradient equals
  the average of the per-rank gradients computed on an unwrapped copy (same samples), i.e. the cache
  leaves DDP's synchronisation exact. (W=2 and W=1 do not sample the same rows when training from an
  empty cache: each rank inserts into its own shard, so the global rows hold the same items in another
  order; the engine's world-size tests compare equal cache contents.)
- ``SentenceTransformerTrainer`` under ``torchrun`` (2 ranks, the trainer's own DDP): logs the cache
  metrics, checkpoints the cache; a 1-rank ``torchrun`` resumes from that checkpoint (2 -> 1, the default
  block size 16 -> 32 rows) with the cache row for row as saved, and trains on.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sentence_transformers")
pytest.importorskip("datasets")

from sharded_negcache.testing import free_port, run_ranks  # noqa: E402
from st_fixtures import pairs, tiny_model  # noqa: E402

HERE = Path(__file__).parent
STEPS, GLOBAL_BATCH = 4, 8
OPTIONS = dict(cache_size=32, num_negatives=2, handler_kwargs={"block_size": 16})


def _ddp_worker(rank: int, world: int, directory: str) -> dict:
    """STEPS steps on each rank's half of fixed global batches, twice: DDP-wrapped, and plain + all_reduce.

    Both losses see the same inputs and seeds, hence sample the same rows; returns, per step, the DDP
    gradient, the manually averaged one, and whether the samples matched.
    """
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from sharded_negcache.integrations.sentence_transformers import CachedNegativesRankingLoss

    os.environ["HF_HUB_OFFLINE"] = "1"
    model = tiny_model(os.path.join(directory, f"rank{rank}"))
    plain = copy.deepcopy(model)
    ddp_loss = CachedNegativesRankingLoss(DistributedDataParallel(model, find_unused_parameters=True), **OPTIONS)
    plain_loss = CachedNegativesRankingLoss(plain, **OPTIONS)
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (model, plain)]
    anchors, positives = pairs(STEPS * GLOBAL_BATCH, seed=6)
    per = GLOBAL_BATCH // world
    out: dict = {"ddp": [], "manual": [], "same_samples": [], "sampled": []}
    for step in range(STEPS):
        lo = step * GLOBAL_BATCH + rank * per
        for loss in (ddp_loss, plain_loss):
            loss([dict(plain.preprocess(t[lo : lo + per])) for t in (anchors, positives)], None).backward()
        for p in plain.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world
        flat = [torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in m.parameters()])
                for m in (model, plain)]
        out["ddp"].append(flat[0])
        out["manual"].append(flat[1])
        rows = [loss.handler.last_step.sampled_rows for loss in (ddp_loss, plain_loss)]
        out["same_samples"].append(torch.equal(*rows))
        out["sampled"].append(int((rows[0] >= 0).sum()))
        for opt in opts:
            opt.step()
            opt.zero_grad()
    return out


def test_ddp_gradients_are_the_average_of_the_ranks_gradients(tmp_path):
    """DDP with the cache in the loop (3 forwards a step, ranks that sample nothing, unused pooler params)
    gives every rank the exact average of the per-rank gradients, as MNRL under DDP does."""
    ranks = run_ranks(2, _ddp_worker, str(tmp_path), timeout=240)
    for step in range(STEPS):
        assert ranks[0]["same_samples"][step] and ranks[1]["same_samples"][step]
        torch.testing.assert_close(ranks[0]["ddp"][step], ranks[1]["ddp"][step], rtol=0, atol=0)
        torch.testing.assert_close(ranks[0]["ddp"][step], ranks[0]["manual"][step], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(ranks[1]["ddp"][step], ranks[1]["manual"][step], rtol=1e-5, atol=1e-7)
    assert sum(ranks[0]["sampled"][1:]) > 0 and float(ranks[0]["ddp"][-1].abs().max()) > 0


def _torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", str(HERE / "st_trainer_worker.py"), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent), HF_HUB_OFFLINE="1",
               TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def test_trainer_under_torchrun_two_ranks_then_resume_on_one(tmp_path):
    run = _torchrun(2, str(tmp_path), "4")
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads((tmp_path / "result-w2.json").read_text())
    assert result["steps_done"] == 4
    a, b = result["param_checksums"]
    assert a == b, "the trainer's DDP replicas diverged"
    logs = [h for h in result["log_history"] if "loss" in h]
    # 2 ranks x 8 rows into 32: 16 then 32 rows after steps 1-2 -> mean fill 0.75; full from step 2 on.
    assert logs[0]["negcache/fill_fraction"] == pytest.approx(0.75)
    assert logs[1]["negcache/fill_fraction"] == pytest.approx(1.0)
    assert logs[0]["negcache/sampled"] == pytest.approx((0 + 16 * 2) / 2)  # step 1: empty cache; step 2: 16 anchors x 2 draws
    assert (tmp_path / "trainer" / "checkpoint-2" / "negcache" / ".metadata").exists()

    resumed = _torchrun(1, str(tmp_path), "6", "2")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    saved = torch.load(tmp_path / "rows-saved-2-w2.pt")
    loaded = torch.load(tmp_path / "rows-loaded-2-w1.pt")
    assert set(saved) == set(loaded)
    for key in saved:
        assert torch.equal(saved[key], loaded[key]), f"{key} differs after resuming 2 -> 1 ranks"
    again = json.loads((tmp_path / "result-w1.json").read_text())
    assert (result["block_size"], again["block_size"]) == (16, 32)  # the default block size changed with W
    assert again["steps_done"] == 6 and [h["step"] for h in again["log_history"] if "loss" in h][-2:] == [4, 6]


def test_corpus_triplets_under_torchrun_two_ranks_then_resume_on_one(tmp_path):
    """Corpus mode with a negative column and evaluation every 2 steps under the trainer's DDP: each rank
    prefills its rows with the unwrapped model, evaluation leaves the cache's step alone, and the corpus cache
    resumes on 1 rank row for row."""
    run = _torchrun(2, str(tmp_path), "4", "-", "corpus")
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads((tmp_path / "result-w2.json").read_text())
    assert result["steps_done"] == 4 and len({*result["param_checksums"]}) == 1
    assert len([h for h in result["log_history"] if "eval_loss" in h]) == 2
    logs = [h for h in result["log_history"] if "loss" in h]
    assert logs[0]["negcache/fill_fraction"] == pytest.approx(result["distinct"] / 256)  # prefilled, nothing inserted
    assert all(h["negcache/in_batch_loss"] > 0 for h in logs)

    resumed = _torchrun(1, str(tmp_path), "6", "2", "corpus")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    saved, loaded = torch.load(tmp_path / "rows-saved-2-w2.pt"), torch.load(tmp_path / "rows-loaded-2-w1.pt")
    assert set(saved) == set(loaded)
    for key in saved:
        assert torch.equal(saved[key], loaded[key]), f"{key} differs after resuming 2 -> 1 ranks"
    assert json.loads((tmp_path / "result-w1.json").read_text())["steps_done"] == 6


def _two_level_worker(rank: int, world: int, directory: str) -> dict:
    """One training step at W = 2 with shard_group_size = 1 and reduction='global_mean': the value shown and
    what it must be, -log P of this rank's queries summed and scaled by W / B_g (as the loss)."""
    from sharded_negcache.integrations.sentence_transformers import CachedNegativesRankingLoss

    os.environ["HF_HUB_OFFLINE"] = "1"
    model = tiny_model(os.path.join(directory, f"rank{rank}"))
    loss = CachedNegativesRankingLoss(model, cache_size=16, in_batch_negatives=True, handler_kwargs={
        "block_size": 16, "reduction": "global_mean", "shard_group_size": 1})
    anchors, positives = pairs(GLOBAL_BATCH, seed=3)
    per = GLOBAL_BATCH // world
    lo = rank * per
    shown = loss([dict(model.preprocess(t[lo : lo + per])) for t in (anchors, positives)], None)
    want = loss.handler.last_step.interpretable_loss.double().sum().item() * world / GLOBAL_BATCH
    return {"shown": shown.item(), "want": want}


def test_shown_loss_under_global_mean_with_shard_groups_is_scaled_by_all_ranks(tmp_path):
    """With shard_group_size G < W the loss's reduction divides by the global batch of all W ranks: the logged
    value follows it (W / B_g, not G / B_g)."""
    for r in run_ranks(2, _two_level_worker, str(tmp_path), timeout=240):
        assert r["want"] > 0
        assert r["shown"] == pytest.approx(r["want"], rel=1e-5), r
