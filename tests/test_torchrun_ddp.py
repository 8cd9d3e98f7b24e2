"""The engine under a real `torchrun` launcher with DDP: 2 ranks on CPU, losses finite, towers in sync."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from sharded_negcache.testing import free_port

HERE = Path(__file__).parent


def test_torchrun_two_ranks_with_ddp(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    cmd = torchrun + ["--nproc_per_node=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
                      str(HERE / "ddp_worker.py"), "6", str(tmp_path / "tb")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent))
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    steps = [line for line in lines if "step" in line]
    assert [s["step"] for s in steps] == list(range(6))
    assert all(abs(s["loss"]) < 1e6 for s in steps) and steps[-1]["fill_fraction"] > 0
    assert steps[0]["sampled"] == 0 and steps[1]["sampled"] > 0  # empty cache first, then negatives
    checksums = {r: json.loads((tmp_path / "tb" / f"rank{r}.json").read_text())["checksum"] for r in (0, 1)}
    assert len(checksums) == 2 and abs(checksums[0] - checksums[1]) < 1e-9, "DDP replicas diverged"
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())
