"""The pretrained study: its bootstrap, cost model and curve arithmetic by hand, the packaged model offline,
and a tiny 2-rank run of every kind of method end to end."""
from __future__ import annotations

import json
import math
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

from examples.efficiency.cost_model import EncoderShape, calls_time_s, step_time_s  # noqa: E402
from examples.efficiency.pretrained import Method, at, equal_steps, method_of  # noqa: E402
from examples.efficiency.stats import paired_bootstrap  # noqa: E402


def test_bootstrap_of_a_constant_shift_is_exact():
    b = torch.rand(300, generator=torch.Generator().manual_seed(1))
    out = paired_bootstrap(b + 0.1, b, resamples=500)
    assert out["mean_diff"] == pytest.approx(0.1)
    assert out["ci_low"] == pytest.approx(0.1) and out["ci_high"] == pytest.approx(0.1)
    assert out["p_value"] == 0.0 and out["queries"] == 300


def test_bootstrap_interval_matches_normal_theory_and_covers():
    # Per-query differences ~ N(0.05, 0.3): the 95 % interval's half-width should be 1.96 * 0.3 / sqrt(n)
    # (within 10 %), and over 100 independent samples the interval should cover 0.05 about 95 times
    # (binomial sd ~2.2: 88..100 is a > 3-sigma band below).
    gen = torch.Generator().manual_seed(0)
    n, covered = 400, 0
    for rep in range(100):
        base = torch.rand(n, generator=gen)  # query difficulty, cancelled by the pairing
        diff = 0.05 + 0.3 * torch.randn(n, generator=gen, dtype=torch.float64)
        out = paired_bootstrap(base + diff, base, resamples=1000, seed=rep)
        covered += out["ci_low"] <= 0.05 <= out["ci_high"]
        if rep == 0:
            sd = float(diff.std())
            assert (out["ci_high"] - out["ci_low"]) / 2 == pytest.approx(1.96 * sd / math.sqrt(n), rel=0.1)
            assert out["mean_diff"] == pytest.approx(float(diff.mean()))
    assert 88 <= covered <= 100


def test_bootstrap_refuses_unpaired_input():
    with pytest.raises(ValueError, match="same length"):
        paired_bootstrap([0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap([0.1], [0.2], confidence=1.0)


def test_cost_model_by_hand():
    shape = EncoderShape(layers=1, hidden=2, ffn=8, parameters=100)
    # 2 * L * (4 d^2 + 2 d f) + 4 L n d at n = 3: 2 * (16 + 32) + 24
    assert shape.forward_flops_per_token(3) == 120
    hw = {"bf16_dense_flops": 1000.0, "mfu": 1.0, "hbm_bytes_s": 800.0, "nvlink_bytes_s": 400.0, "launch_s": 0.5,
          "kernels_per_layer": 1, "collective_s": 0.25, "handler_collectives": 4}
    # with gradient, 2 sequences of 3 tokens: 3 * 120 * 6 = 2160 FLOPs = 2.16 s > launch floor 3 * 0.5;
    # without, 1 sequence: 360 FLOPs = 0.36 s < floor 0.5; the latter twice
    assert calls_time_s(shape, [(True, 3, 2, 1), (False, 3, 1, 2)], hw) == pytest.approx(2.16 + 2 * 0.5)
    parts = step_time_s(shape, [(True, 3, 2, 1)], world=2, cache_rows_per_rank=10, queries_per_rank=4, hw=hw)
    assert parts["optimizer"] == pytest.approx(32 * 100 / 800)
    assert parts["allreduce"] == pytest.approx(2 * 0.5 * 4 * 100 / 400)
    # read 10 rows of 2 floats at 800 B/s, score 4 x 10 x 2 at 2 FLOPs each, 4 collectives
    assert parts["cache"] == pytest.approx(10 * 2 * 4 / 800 + 2 * 4 * 10 * 2 / 1000 + 4 * 0.25)
    assert parts["total"] == pytest.approx(2.16 + parts["optimizer"] + parts["allreduce"] + parts["cache"])
    assert step_time_s(shape, [], world=1, hw=hw)["allreduce"] == 0.0


def test_cache_megabytes_counts_the_row_store():
    from examples.efficiency.study import cache_megabytes
    from sharded_negcache import ShardedCacheLossHandler
    from sharded_negcache.specs import FieldSpec

    handler = ShardedCacheLossHandler({"emb": FieldSpec((8,), torch.float32), "x": FieldSpec((2,), torch.int64)},
                                      64, "emb", ["x"])
    # 64 rows: fp32 embeddings 8 x 4 B, int64 age, bool filled, the int64 field 2 x 8 B; two int64 scalars
    assert cache_megabytes(handler) * 2**20 == 64 * (32 + 8 + 1 + 16) + 2 * 8


def test_methods_at_other_batches():
    assert method_of("mnrl_b64") == Method("mnrl", 64)
    assert method_of("corpus_ib_half_b16") == Method("corpus", 16, in_batch=True, reencode=0.5)
    assert method_of("corpus_b32") == Method("corpus", 32)
    with pytest.raises(ValueError, match="unknown method"):
        method_of("mnrl_x32")


def test_curves_at_equal_steps_by_hand():
    assert at([10, 20], [0.6, 0.8], 0.0, 0.5, 15) == pytest.approx(0.7)
    assert at([10, 20], [0.6, 0.8], 0.0, 0.5, 5) == pytest.approx(0.55)  # between zero-shot and the first eval
    assert at([10, 20], [0.6, 0.8], 0.0, 0.5, 25) is None

    def metrics(v):  # recall@1 and recall@10 ride along at fixed offsets from MRR@10
        return {"mrr@10": v, "recall@1": v - 0.1, "recall@10": v + 0.1}

    def run(method, batch, seed, points):
        return {"method": method, "global_batch": batch, "seed": seed, "steps": points[-1][0],
                "evals": [{"steps": s, **metrics(v)} for s, v in points], "final": metrics(points[-1][1])}

    runs = [{"method": "zero_shot", "global_batch": 0, "seed": 0, "steps": 0, "evals": [], "final": metrics(0.4)},
            run("a_b32", 32, 0, [(10, 0.5), (40, 0.6)]), run("a_b32", 32, 1, [(10, 0.7), (40, 0.8)]),
            run("b_b32", 32, 0, [(20, 0.6), (30, 0.9)]), run("c_b512", 512, 0, [(2, 0.45), (4, 0.5)])]
    target, values = equal_steps(runs)
    assert target == 30  # the fewest steps any batch-32 run reached
    expected = 0.6 + (0.7 - 0.6) * 20 / 30  # seed means (10, 0.6), (40, 0.7), at step 30
    assert values["a_b32"] == pytest.approx(metrics(expected))
    assert values["b_b32"]["mrr@10"] == pytest.approx(0.9) and values["c_b512"] is None


def test_packaged_minilm_loads_offline(tmp_path):
    pytest.importorskip("all_minilm_l6_v2")
    from examples.efficiency.pretrained import load_pretrained

    model = load_pretrained(str(tmp_path), max_length=64)
    assert model.max_seq_length == 64 and model.get_embedding_dimension() == 384
    emb = model.encode(["sort a list", "return the sorted list of items", "open a network socket"],
                       convert_to_tensor=True)
    assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)  # the Normalize module is in place
    sims = emb @ emb.t()
    assert sims[0, 1] > 0.5 > 0.2 > sims[0, 2]  # a trained encoder: paraphrases close, unrelated texts far


TINY_METHODS = ["zero_shot", "mnrl_b32", "cmnrl_b64", "mined_b32", "stream_b32", "corpus_b32", "corpus_ib_half_b32",
                "corpus_ib_frozen_b32", "corpus_ib_refresh_b32"]
CACHE_METHODS = [m for m in TINY_METHODS if m.startswith(("stream", "corpus"))]


@pytest.mark.heavy
def test_tiny_pretrained_study_two_ranks(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", "-m", "examples.efficiency.pretrained", "--tiny",
           "--out", str(tmp_path), "--max-steps", "3", "--budget", "600", "--eval-pairs", "64",
           "--compare-seeds", "2", "--methods", ",".join(TINY_METHODS)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=500, env=env, cwd=str(ROOT))
    assert out.returncode == 0, out.stderr[-4000:]
    blob = json.loads((tmp_path / "results.json").read_text())
    runs = {(r["method"], r["seed"]): r for r in blob["runs"]}
    compared = blob["comparison"]
    cache = compared["cache"]
    assert cache in CACHE_METHODS and compared["baseline"] in ("mnrl_b32", "cmnrl_b64", "mined_b32")
    best = lambda group: max(group, key=lambda m: runs[(m, 0)]["final"]["mrr@10"])  # noqa: E731
    assert cache == best(CACHE_METHODS) and compared["baseline"] == best(["mnrl_b32", "cmnrl_b64", "mined_b32"])
    assert compared["seeds"] == [0, 1]  # the second seed ran for these two only
    assert sorted(runs) == sorted([(m, 0) for m in TINY_METHODS] + [(compared["baseline"], 1), (cache, 1)])
    zero = runs[("zero_shot", 0)]
    assert zero["steps"] == 0 and zero["evals"][0]["steps"] == 0
    assert len({len(r["final"]["rr@10"]) for r in runs.values()}) == 1  # every method on the same queries
    for (method, _), r in runs.items():
        rr = torch.tensor(r["final"]["rr@10"], dtype=torch.float64)
        assert float(rr.mean()) == pytest.approx(r["final"]["mrr@10"])
        if method == "zero_shot":
            continue
        assert r["steps"] == 3 and [e["steps"] for e in r["evals"]] == [1, 2, 3]
        assert r["activation_peak_mb"] > 0 and r["h100_step_ms"]["total"] > r["h100_step_ms"]["optimizer"] > 0
        assert all(e["wall_s"] == pytest.approx(e["train_s"] + r["setup_s"]) for e in r["evals"])
    # the encoder calls a step made (rank 0, 16 examples per rank): counted independently of the losses
    grad = lambda r: sum(s * c for g, _, s, c in r["calls_per_step"] if g)  # noqa: E731
    nograd = lambda r: sum(s * c for g, _, s, c in r["calls_per_step"] if not g)  # noqa: E731
    assert grad(runs[("mnrl_b32", 0)]) == 32 and nograd(runs[("mnrl_b32", 0)]) == 0
    assert grad(runs[("mined_b32", 0)]) == 48  # anchor, positive, mined negative
    cm = runs[("cmnrl_b64", 0)]  # GradCache: every text once without gradient, once with, in mini-batches of 8
    assert grad(cm) == nograd(cm) == 64 and all(s == 8 for _, _, s, _ in cm["calls_per_step"])
    for method in ("stream_b32", "corpus_b32", "corpus_ib_half_b32"):  # sampled rows re-encoded with gradient
        assert grad(runs[(method, 0)]) > 32, method
    assert grad(runs[("corpus_b32", 0)]) > grad(runs[("corpus_ib_half_b32", 0)])  # half of them
    assert grad(runs[("corpus_ib_frozen_b32", 0)]) == 32  # negatives scored from the cache: no re-encoding
    assert nograd(runs[("corpus_ib_refresh_b32", 0)]) == 16  # the refresh budget: 16 stalest rows per rank
    for method in CACHE_METHODS:
        assert runs[(method, 0)]["cache_mb"] > 0 and runs[(method, 0)]["h100_step_ms"]["cache"] > 0
        if method.startswith("corpus"):  # the prefill is charged to the run
            assert runs[(method, 0)]["setup_s"] > 0 and runs[(method, 0)]["h100_setup_s"] > 0
    mined = runs[("mined_b32", 0)]
    assert mined["setup_s"] > 0 and mined["h100_setup_s"] > 0 and 32 <= mined["train_examples"]
    # the bootstrap's difference is the per-query mean over seeds, recomputed here from the runs
    mean_rr = lambda m: torch.tensor([runs[(m, s)]["final"]["rr@10"] for s in (0, 1)], dtype=torch.float64).mean(0)  # noqa: E731
    assert compared["mean_diff"] == pytest.approx(float((mean_rr(cache) - mean_rr(compared["baseline"])).mean()))
    assert compared["ci_low"] <= compared["mean_diff"] <= compared["ci_high"]
    table = (tmp_path / "table.md").read_text()
    assert "| at 3 steps: MRR@10 / R@1 / R@10 |" in table
    single = next(m for m in TINY_METHODS[1:] if m not in (cache, compared["baseline"]))  # one seed
    final = runs[(single, 0)]["final"]  # every run reached step 3: the equal-steps values are the final ones
    assert f"| {final['mrr@10']:.3f} / {final['recall@1']:.3f} / {final['recall@10']:.3f} |" in table
    assert f"| {cache} | 32 | 2 |" in table and f"Paired per-query bootstrap, {cache} -" in table
    mixed = subprocess.run([sys.executable, "-m", "examples.efficiency.pretrained", "--tiny", "--resume", "--out",
                            str(tmp_path), "--max-steps", "5", "--budget", "600"],
                           capture_output=True, text=True, timeout=120, env=env, cwd=str(ROOT))
    assert mixed.returncode == 2 and "(budget, max steps) [(600.0, 3)], not (600.0, 5)" in mixed.stderr
    (tmp_path / "table.md").unlink()
    replot = subprocess.run([sys.executable, "-m", "examples.efficiency.pretrained", "--replot", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=120, env=env, cwd=str(ROOT))
    assert replot.returncode == 0, replot.stderr[-2000:]
    assert (tmp_path / "table.md").read_text() == table and (tmp_path / "study.png").stat().st_size > 0
