"""The efficiency study: its metrics and memory meter by hand, and a tiny 2-rank run end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sentence_transformers")

from sharded_negcache.testing import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples.efficiency.study import SavedTensorMeter, retrieval_metrics, summarise  # noqa: E402


def test_retrieval_metrics_by_hand():
    # query 0: right doc first; query 1: second; query 2: tied with another (counted against it), 2nd.
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.5, 0.1], [0.3, 0.3, 0.3]])
    m = retrieval_metrics(scores)
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["recall@10"] == pytest.approx(1.0)
    assert m["mrr@10"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)


def test_saved_tensor_meter_counts_what_backward_keeps():
    meter = SavedTensorMeter()
    x = torch.randn(1000, requires_grad=True)
    w = torch.randn(1000, requires_grad=True)
    with meter.hooks():
        y = (x * w).sum()  # mul saves both operands: 2 x 4000 bytes; sum saves nothing
    assert meter.peak == 8000 and meter.alive == 8000
    y.backward()
    del y
    assert meter.alive == 0 and meter.peak == 8000
    kept = []
    for _ in range(3):  # graphs kept past their step (a library holding them) do not add to later peaks
        with meter.hooks():
            kept.append((x * w).sum())
            y = (x * w).sum()
        y.backward()
    assert meter.alive == 3 * 8000  # three kept graphs
    assert meter.peak == 16000  # per step: that step's kept graph and y (summed over steps it would be 32000)


def test_tiny_study_two_ranks(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", "-m", "examples.efficiency.study", "--tiny",
           "--out", str(tmp_path), "--budget", "1.5", "--seeds", "1", "--methods", "mnrl_b32,cmnrl_b64,cache_ib_b32"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=str(ROOT))
    assert out.returncode == 0, out.stderr[-4000:]
    blob = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in blob["runs"]] == ["mnrl_b32", "cmnrl_b64", "cache_ib_b32"]
    for run in blob["runs"]:
        assert run["steps"] >= 1 and run["train_s"] >= 1.5
        assert len(run["evals"]) == 2 and all(e["train_s"] >= f * 1.5 for e, f in zip(run["evals"], (0.5, 1.0)))
        assert 0.0 <= run["final"]["mrr@10"] <= run["final"]["recall@10"] <= 1.0
        assert run["activation_peak_mb"] > 0
    cache = blob["runs"][2]
    assert cache["cache_mb"] > 0 and cache["split_s"]["reencode_fwd"] >= 0
    assert blob["runs"][0]["split_s"]["reencode_fwd"] == 0  # MNRL re-encodes nothing
    assert summarise(blob["runs"])[1]["global_batch"] == 64
    assert (tmp_path / "study.png").stat().st_size > 0 and "| cache_ib_b32 | 32 |" in (tmp_path / "table.md").read_text()
