"""End-to-end runs of every example at a tiny size: they start, train a few steps and write finite metrics.

The torchrun examples run as real 2-rank gloo launches (``python -m torch.distributed.run``), as users
run them; each launch costs ~10 s of start-up on a small CPU machine.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
TINY_PACKAGES = ["json", "email", "textwrap", "csv", "argparse"]


def run(cmd: list[str], timeout: float = 240) -> str:
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def assert_metrics(values: dict, keys: tuple[str, ...]) -> None:
    for key in keys:
        assert math.isfinite(values[key]) and 0.0 <= values[key] <= 1.0, (key, values)


def test_quickstart_prints_losses():
    out = run([sys.executable, "examples/quickstart.py", "20"])
    lines = [line for line in out.splitlines() if line.startswith("step")]
    assert [line.split()[1] for line in lines] == ["20"]
    fields = lines[0].split()
    assert math.isfinite(float(fields[4])) and float(fields[6]) > 0  # training loss, cross-entropy
    assert out.splitlines()[-1].startswith("recall@1 ")


@pytest.mark.slow
def test_code_search_compare_all_three_losses_on_two_ranks(tmp_path: Path):
    out = run([
        sys.executable, "-m", "examples.code_search.compare", "--out", str(tmp_path),
        "--packages", *TINY_PACKAGES, "--seeds", "0", "1",
        # train.py options: a few steps, small batch, towers and cache
        "--steps", "4", "--eval-every", "2", "--batch-size", "8", "--dim", "16", "--cache-size", "64", "--negatives", "2",
    ])
    assert "| in-batch negatives |" in out and "| negative cache |" in out and "| cache + in-batch |" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["runs"]) == {"in_batch", "cache", "both"}
    for loss, run_ in results["runs"].items():
        assert run_["loss"] == loss and run_["world_size"] == 2 and run_["global_batch"] == 16
        assert run_["seeds"] == [0, 1] and [r["seed"] for r in run_["per_seed"]] == [0, 1]
        assert [c["step"] for c in run_["curve"]] == [0, 2, 4]
        for one in run_["per_seed"]:
            assert [c["step"] for c in one["curve"]] == [0, 2, 4]
            for point in one["curve"]:
                assert_metrics(point, ("mrr@10", "recall@1", "recall@10", "recall@100"))
            final = one["final"]
            assert final["recall@1"] <= final["recall@10"] <= final["recall@100"]
            assert final["mrr@10"] <= final["recall@10"]
            for key in ("train_time_s", "last_train_loss", "last_cross_entropy"):
                assert math.isfinite(one[key]), key
            assert one["train_time_s"] > 0 and one["last_cross_entropy"] > 0
            assert one["replica_divergence"] == 0.0  # DDP kept both ranks' towers identical
            if loss != "in_batch":
                assert one["cache_stats"]["fill_fraction"] == 1.0  # 4 steps x 16 pairs fill 64 rows
                assert one["cache_stats"]["sampled"] == 16 * 2  # every query drew 2 negatives
            assert list((tmp_path / loss / "tb" / f"seed{one['seed']}").glob("events.out.tfevents.*"))
        mean = (run_["per_seed"][0]["final"]["mrr@10"] + run_["per_seed"][1]["final"]["mrr@10"]) / 2
        assert abs(run_["final"]["mrr@10"] - mean) < 1e-12 and run_["final_std"]["mrr@10"] >= 0
        assert math.isfinite(run_["wall_time_s"]) and math.isfinite(run_["launch_wall_s"])
        assert json.loads((tmp_path / loss / "metrics.json").read_text())["final"] == run_["final"]
    # same seed, same initial towers: every loss starts from the same held-out score
    starts = {loss: r["per_seed"][0]["curve"][0]["mrr@10"] for loss, r in results["runs"].items()}
    assert len(set(starts.values())) == 1, starts
    assert (tmp_path / "mrr_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| loss |" in (tmp_path / "results.md").read_text()


@pytest.mark.slow
def test_torchrec_two_tower_on_two_ranks(tmp_path: Path):
    run([
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "examples.torchrec_two_tower.train", "--out", str(tmp_path),
        "--steps", "4", "--eval-every", "2", "--users", "100", "--items", "256", "--batch-size", "16",
        "--cache-size", "128", "--negatives", "2", "--dim", "8",
    ])
    result = json.loads((tmp_path / "metrics.json").read_text())
    assert result["world_size"] == 2 and result["global_batch"] == 32
    assert [c["step"] for c in result["curve"]] == [0, 2, 4]
    for point in result["curve"] + list(result["reference"].values()):
        assert_metrics(point, ("mrr@10", "recall@10", "recall@100"))
    assert result["reference"]["oracle"]["recall@100"] > result["reference"]["popularity"]["recall@100"]
    stats = result["cache_stats"]
    assert stats["fill_fraction"] == 1.0 and stats["sampled"] == 32 * 2
    assert math.isfinite(result["last_cross_entropy"]) and result["last_cross_entropy"] > 0
    assert result["data"]["test_examples"] == 100  # one held-out interaction per user
    assert result["dense_replica_divergence"] == 0.0  # DDP kept the MLPs identical on both ranks
