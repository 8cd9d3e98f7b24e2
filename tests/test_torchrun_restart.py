"""A rank is killed mid-training under ``torchrun --max-restarts=1``: the job resumes and repeats the losses.

Two CPU jobs of examples/resume_ddp.py with 2 ranks run side by side: one uninterrupted, one in which
rank 1 SIGKILLs itself at the start of step ``KILL_AT`` on the first attempt. torchrun stops the other
rank and restarts the job; it resumes from the last complete checkpoint (model, Adam state and cache
in one DCP checkpoint). Every step the restarted job logs (both attempts) must carry exactly the
uninterrupted job's losses and cache digest for that step.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sharded_negcache.checkpoint import verify_checkpoint

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "resume_ddp.py"
STEPS, SAVE_EVERY, KILL_AT = 10, 3, 8  # checkpoints after steps 3, 6, 9: the restart resumes at step 6
TIMEOUT_S = 420

pytestmark = pytest.mark.slow


def torchrun() -> list[str]:
    script = Path(sys.executable).parent / "torchrun"
    return [str(script)] if script.exists() else [sys.executable, "-m", "torch.distributed.run"]


def launch(workdir: Path, extra: list[str]) -> subprocess.Popen:
    workdir.mkdir(parents=True)
    cmd = torchrun() + [
        "--standalone", "--nproc_per_node=2", "--max-restarts=1", "--monitor-interval=0.5",
        str(EXAMPLE), "--steps", str(STEPS), "--save-every", str(SAVE_EVERY),
        "--ckpt-dir", str(workdir / "ckpt"), "--loss-log", str(workdir / "losses.jsonl"), *extra,
    ]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1",
               # torchrun shares its rendezvous TCPStore with the workers by default; after a restart the
               # new workers can then read the previous attempt's gloo addresses (pytorch/pytorch#135712)
               # and fail with "connectFullMesh ... Connection refused". A store per attempt avoids it.
               TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    out = open(workdir / "torchrun.log", "w")
    # A session of its own: on timeout the whole job (agent and workers) is killed by its group id.
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait(proc: subprocess.Popen, workdir: Path, deadline_s: float) -> None:
    try:
        rc = proc.wait(timeout=deadline_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"torchrun in {workdir} did not finish in {deadline_s} s:\n{tail(workdir)}")
    assert rc == 0, f"torchrun in {workdir} exited with {rc}:\n{tail(workdir)}"


def tail(workdir: Path, lines: int = 40) -> str:
    text = (workdir / "torchrun.log").read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


def read_log(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "losses.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, list[dict]]]:
    base = tmp_path_factory.mktemp("torchrun")
    jobs = {
        "uninterrupted": launch(base / "uninterrupted", []),
        "killed": launch(base / "killed", ["--kill-at-step", str(KILL_AT), "--kill-rank", "1"]),
    }
    for name, proc in jobs.items():
        wait(proc, base / name, TIMEOUT_S)
    return {name: (base / name, read_log(base / name)) for name in jobs}


def test_uninterrupted_run_is_one_attempt(runs):
    _, log = runs["uninterrupted"]
    assert [(e["attempt"], e["step"], e["world_size"]) for e in log] == [(0, s, 2) for s in range(STEPS)]
    # The cache is being used: after the first step the losses are not all zero and the cache changes.
    assert any(float.fromhex(x) != 0.0 for e in log[1:] for x in e["losses"])
    assert len({e["cache_digest"] for e in log}) == STEPS


def test_killed_rank_restarts_from_the_last_checkpoint(runs):
    _, log = runs["killed"]
    first = [e["step"] for e in log if e["attempt"] == 0]
    second = [e["step"] for e in log if e["attempt"] == 1]
    assert first == list(range(KILL_AT)), "attempt 0 must stop where rank 1 was killed"
    last_ckpt = (KILL_AT // SAVE_EVERY) * SAVE_EVERY
    assert second == list(range(last_ckpt, STEPS)), "attempt 1 must resume at the last checkpoint"


def test_losses_and_cache_after_restart_equal_the_uninterrupted_run(runs):
    _, reference = runs["uninterrupted"]
    _, log = runs["killed"]
    by_step = {e["step"]: e for e in reference}
    for entry in log:
        want = by_step[entry["step"]]
        where = f"attempt {entry['attempt']}, step {entry['step']}"
        assert entry["cache_digest"] == want["cache_digest"], f"{where}: cache differs from the uninterrupted run"
        assert entry["losses"] == want["losses"], f"{where}: losses differ (bitwise) from the uninterrupted run"
    resumed = [e for e in log if e["attempt"] == 1]
    assert resumed and resumed[0]["cache_digest"] == by_step[resumed[0]["step"]]["cache_digest"]


def test_every_checkpoint_is_complete(runs):
    for name in runs:
        workdir, _ = runs[name]
        ckpts = sorted(p.name for p in (workdir / "ckpt").iterdir())
        assert ckpts == [f"step_{s:06d}" for s in range(SAVE_EVERY, STEPS + 1, SAVE_EVERY)], name
        for ckpt in ckpts:
            assert verify_checkpoint(workdir / "ckpt" / ckpt) == [], (name, ckpt)
