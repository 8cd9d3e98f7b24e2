"""The Triton kernels on CPU tensors in triton's interpreter, against the torch path.

Not collected by the suite directly: ``test_triton_interpreter.py`` runs this file in a subprocess
with ``TRITON_INTERPRET=1`` (it must be set before triton is imported, and must not leak into other
tests). Run alone: ``TRITON_INTERPRET=1 python -m pytest tests/triton_interpreter_cases.py``.
"""
from __future__ import annotations

import os

import pytest
import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1 (see test_triton_interpreter.py)"

from engine_cases import Tower, global_batch, global_cache, make_handler  # noqa: E402
from sharded_negcache import triton_scan  # noqa: E402
from sharded_negcache.codecs import make_codec  # noqa: E402
from sharded_negcache.scoring import pick_in_block, score_shard  # noqa: E402
from test_scan import count_kernel_calls  # noqa: E402

NEG_INF = float("-inf")


def shard(rows: int, dim: int, codec: str, seed: int = 0, with_ids: bool = False):
    """Stored rows of a codec with some empty rows, the fp32 rows the torch path decodes, the doc ids."""
    g = torch.Generator().manual_seed(seed)
    c = make_codec(codec)
    stored = c.encode(torch.randn(rows, dim, generator=g))
    filled = torch.rand(rows, generator=g) > 0.25
    filled[-3:] = False  # the last rows empty: a ragged end of the block
    ids = torch.randint(0, 6, (rows,), generator=g) if with_ids else None
    return stored, c.decode(stored, dim), filled, ids


def torch_scores(q, decoded, filled, ids=None, qids=None):
    a = (q @ decoded.t()).masked_fill(~filled[None, :], NEG_INF)
    if ids is not None:
        a = a.masked_fill(ids[None, :] == qids[:, None], NEG_INF)
    return a


@pytest.mark.parametrize("b, rows, dim, bs", [(0, 32, 8, 16), (1, 48, 20, 16), (37, 96, 24, 48), (70, 64, 16, 4)])
def test_fp32_block_lse_within_1e5_relative(b, rows, dim, bs):
    stored, decoded, filled, ids = shard(rows, dim, "fp32", with_ids=True)
    g = torch.Generator().manual_seed(1)
    q = 3 * torch.randn(b, dim, generator=g)
    qids = torch.randint(0, 6, (b,), generator=g)
    got = triton_scan.block_lse(q, triton_scan.StoredRows.of(stored, "fp32", dim, filled, ids), bs, qids)
    want = torch.logsumexp(torch_scores(q, decoded, filled, ids, qids).view(b, rows // bs, bs), dim=-1)
    assert got.shape == (b, rows // bs)
    assert torch.equal(torch.isinf(got), torch.isinf(want))  # fully masked blocks: -inf in both
    fin = torch.isfinite(want)
    scale = max(1.0, float(want[fin].abs().max())) if bool(fin.any()) else 1.0
    torch.testing.assert_close(got[fin], want[fin], rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("codec", ["bf16", "fp16", "int8", "int4"])
def test_low_precision_block_lse_within_the_stated_bound(codec):
    b, rows, dim, bs = 9, 64, 24, 16
    stored, decoded, filled, _ = shard(rows, dim, codec, seed=2)
    q = 2 * torch.randn(b, dim, generator=torch.Generator().manual_seed(3))
    got = triton_scan.block_lse(q, triton_scan.StoredRows.of(stored, codec, dim, filled, None), bs, None)
    want = torch.logsumexp(torch_scores(q, decoded, filled).view(b, -1, bs), dim=-1)
    # LSE is 1-Lipschitz in the max norm: its error is at most the largest score error of the block
    mag = (q.abs() @ decoded.abs().t()).masked_fill(~filled[None, :], 0).view(b, -1, bs).amax(-1)
    bound = triton_scan.score_error_bound(codec, dim) * mag + 1e-5
    fin = torch.isfinite(want)
    err = (got - want).abs()[fin]
    assert bool((err <= bound[fin]).all()), f"{codec}: max error {err.max():.3g}, bound {bound[fin].min():.3g}"
    assert bool(err.max() > 0) or codec == "fp16"  # low precision is visible: the bound is not vacuous
    assert torch.equal(torch.isinf(got), torch.isinf(want))


def reference_pick(a, lse, u):
    """torch's inverse CDF and, per pair, its margin: the distance of the target to the nearest CDF
    step, relative to the total (a draw is comparable across backends only when it exceeds the bound)."""
    w = (a.double() - lse.double()[:, None]).exp()
    cdf = w.cumsum(1)
    target = u.double()[:, None] * cdf[:, -1:]
    margin = ((cdf - target).abs() / cdf[:, -1:]).amin(1)
    return pick_in_block(a, lse, u), margin


@pytest.mark.parametrize("codec", ["fp32", "bf16", "int8"])
def test_stage2_rows_match_torch_where_the_margin_exceeds_the_bound(codec):
    b, m, rows, dim, bs = 12, 3, 96, 16, 32
    stored, decoded, filled, ids = shard(rows, dim, codec, seed=4, with_ids=True)
    g = torch.Generator().manual_seed(5)
    q = (2.0 if codec == "fp32" else 0.01) * torch.randn(b, dim, generator=g)  # low precision: small errors
    qids = torch.randint(0, 6, (b,), generator=g)
    blocks = torch.randint(0, rows // bs, (b, m), generator=g)
    u = torch.rand(b, m, generator=g)
    a = torch_scores(q, decoded, filled, ids, qids).view(b, -1, bs)
    lse = torch.logsumexp(a, dim=-1)
    found = torch.isfinite(lse.gather(1, blocks))
    st = triton_scan.StoredRows.of(stored, codec, dim, filled, ids)
    got = triton_scan.pick_rows(q, st, bs, blocks, lse.gather(1, blocks), u, found, qids)
    seg = a[torch.arange(b)[:, None].expand(b, m), blocks]  # [b, m, bs]
    want, margin = reference_pick(seg.reshape(b * m, bs), lse.gather(1, blocks).reshape(-1), u.reshape(-1))
    want = (blocks.reshape(-1) * bs + want).view(b, m)
    # scores off by at most delta (the stated bound, per block) move each normalised CDF value by at
    # most exp(2 delta) - 1; draws whose target is further than that from every CDF step must agree
    mag = (q.abs() @ decoded.abs().t()).view(b, -1, bs).amax(-1).gather(1, blocks)
    tol = torch.expm1(2 * triton_scan.score_error_bound(codec, dim) * mag.double()) + 1e-6
    clear = found & (margin.view(b, m) > tol)
    assert int(clear.sum()) >= b * m // 2, "the test needs comparable draws"
    assert torch.equal(got[clear], want[clear])
    assert bool((got[~found] == -1).all())
    picked = got[found]
    assert bool(filled[picked].all()) and bool((ids[picked] != qids[:, None].expand(b, m)[found]).all())


def test_stage2_at_the_edges_of_the_uniform():
    """u = 0 and u = 1 on a block whose first and last rows are empty: first / last row with mass."""
    dim, bs = 8, 16
    stored, _, _, _ = shard(bs, dim, "fp32", seed=6)
    filled = torch.ones(bs, dtype=torch.bool)
    filled[:2] = False
    filled[-5:] = False
    q = torch.randn(2, dim, generator=torch.Generator().manual_seed(7))
    st = triton_scan.StoredRows.of(stored, "fp32", dim, filled, None)
    lse = triton_scan.block_lse(q, st, bs, None)
    blocks = torch.zeros(2, 2, dtype=torch.int64)
    u = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    got = triton_scan.pick_rows(q, st, bs, blocks, lse.expand(2, 2), u, torch.ones(2, 2, dtype=torch.bool), None)
    assert got.tolist() == [[2, bs - 6], [2, bs - 6]]


@pytest.mark.parametrize("b", [0, 1, 13])
def test_score_shard_triton_backend_matches_torch(b):
    """The whole local scan: LSE and keys within the fp32 tolerance, sampled rows identical where the
    stage-1 keys of the two best blocks are further apart than the tolerance."""
    tower = Tower()
    h = make_handler(96, with_ids=True, num_negatives=2, block_size=16)
    h.load_global_rows(global_cache(96, tower, with_ids=True))
    batch = global_batch(max(b, 1), tower, with_ids=True)
    q, ids = batch["q"][:b], batch["doc_id"][:b].reshape(-1)
    kw = dict(num_draws=2, top_k=None, seed=3, step=1, chunk_rows=32, exclude_key="doc_id", exclude_ids=ids)
    ref = score_shard(h.store, h.layout, q, h.score_fn, backend="torch", **kw)
    got = score_shard(h.store, h.layout, q, h.score_fn, backend="triton", **kw)
    assert got.win_row.shape == ref.win_row.shape == (b, 2)
    torch.testing.assert_close(got.lse, ref.lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.win_key, ref.win_key, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.win_row, ref.win_row)  # no near ties in this fixed case (margins checked above)


def test_handler_step_with_the_triton_backend(monkeypatch):
    """One step per backend, the kernels' entry points counted: 'triton' launches each Triton kernel once and
    calls no C++ kernel; 'torch' calls neither. Same loss, rows and LSEs."""
    tower = Tower()
    batch = global_batch(6, tower)
    out, counts = {}, {}
    h = make_handler(48, num_negatives=2, scoring_backend="triton")
    assert triton_scan.trusted(h.store.codec, h.store.dim, h.layout.block_size, h.device)  # checked before counting
    calls = count_kernel_calls(monkeypatch)
    for backend in ("torch", "triton"):
        h = make_handler(48, num_negatives=2, scoring_backend=backend)
        h.load_global_rows(global_cache(48, tower))
        q = batch["q"].clone().requires_grad_(True)
        data = {"x": batch["x"]}
        calls.clear()
        loss = h.update_cache_and_compute_loss(tower, q, tower(data), data)
        counts[backend] = dict(calls)
        out[backend] = (loss.item(), h.last_step.sampled_rows.clone(), h.last_step.lse.clone())
    assert counts["torch"] == {}, counts
    assert counts["triton"] == {"triton_scan.block_lse": 1, "triton_scan.lse_launch": 1, "triton_scan.pick_rows": 1,
                                "triton_scan.pick_launch": 1}, counts
    assert h.scan_backend == "triton" and h.config()["scoring_backend"]["runs"] == "triton"
    assert out["triton"][0] == pytest.approx(out["torch"][0], rel=1e-5, abs=1e-6)
    assert torch.equal(out["triton"][1], out["torch"][1])
    torch.testing.assert_close(out["triton"][2], out["torch"][2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("codec", ["fp32", "bf16", "int8", "int4"])
def test_self_check_passes_for_a_correct_kernel(codec):
    assert triton_scan.self_check(make_codec(codec), 16, 16, torch.device("cpu")) is None


def test_a_failing_self_check_falls_back_to_the_torch_scan(monkeypatch, caplog):
    """A kernel that disagrees with torch (here: off by one in every LSE) is never used."""
    import logging

    real = triton_scan.block_lse
    monkeypatch.setattr(triton_scan, "block_lse", lambda *a, **k: real(*a, **k) + 1.0)
    assert "differ from torch" in triton_scan.self_check(make_codec("fp32"), 16, 16, torch.device("cpu"))
    monkeypatch.setattr(triton_scan, "TRUSTED", {})
    tower = Tower()
    h = make_handler(48, num_negatives=2, block_size=16)
    h.load_global_rows(global_cache(48, tower))
    q = global_batch(5, tower)["q"]
    kw = dict(num_draws=2, top_k=None, seed=3, step=1, chunk_rows=32)
    with caplog.at_level(logging.WARNING, logger="sharded_negcache"):
        got = score_shard(h.store, h.layout, q, h.score_fn, backend="triton", **kw)
    ref = score_shard(h.store, h.layout, q, h.score_fn, backend="torch", **kw)
    assert torch.equal(got.lse, ref.lse) and torch.equal(got.win_row, ref.win_row)  # the torch scan ran
    assert any("failed its self-check" in r.getMessage() for r in caplog.records)


def _tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 rounded to TF32 (10 explicit mantissa bits, to nearest even), as a TF32 tensor-core product reads it."""
    i = x.contiguous().view(torch.int32)
    return ((i + 0x0FFF + ((i >> 13) & 1)) & ~0x1FFF).view(torch.float32)


def _fp8(x: torch.Tensor) -> torch.Tensor:
    """Queries rounded to fp8 e4m3 with a per-tensor scale (as an fp8 kernel would), back in their dtype."""
    scale = x.float().abs().max().clamp_min(1e-30) / 448.0
    return ((x.float() / scale).to(torch.float8_e4m3fn).float() * scale).to(x.dtype)


class FaultyKernel:
    """A kernel launched with one fault at its boundary: ``tf32`` (fp32 operands rounded to TF32), ``fp8``
    (queries rounded to fp8), ``mask`` (the filled flags ignored), ``permute`` (rows read in another order
    inside each block, flags and ids not), ``raise`` (does not compile)."""

    def __init__(self, real, fault: str) -> None:
        self.real, self.fault = real, fault

    def __getitem__(self, grid):
        def launch(*args, **meta):
            if self.fault == "raise":
                raise RuntimeError("injected: the kernel does not compile")
            a = dict(zip(self.real.arg_names, args))
            if self.fault == "tf32":
                a["q_ptr"], a["data_ptr"] = _tf32(a["q_ptr"]), _tf32(a["data_ptr"])
                a["sb_ptr"] = a["data_ptr"]
            elif self.fault == "fp8":
                a["q_ptr"] = _fp8(a["q_ptr"])
            elif self.fault == "mask":
                a["filled_ptr"] = torch.ones_like(a["filled_ptr"])
            elif self.fault == "permute":
                data = a["data_ptr"]
                data = data.view(-1, meta["BS"], data.shape[1]).roll(1, dims=1).reshape(data.shape).contiguous()
                a["data_ptr"] = data
                a["sb_ptr"] = data if data.dtype != torch.uint8 else data.view(a["sb_ptr"].dtype)
            self.real[grid](*[a[n] for n in self.real.arg_names if n in a], **meta)
        return launch


FAULTS = [(c, k, f) for c in ("fp32", "bf16", "fp16", "int8", "int4") for k in ("lse", "pick")
          for f in ("tf32", "fp8", "mask", "permute") if f != "tf32" or c == "fp32"]  # TF32 only rounds fp32


@pytest.mark.parametrize("codec, kernel, fault", FAULTS)
def test_the_self_check_refuses_an_injected_fault(monkeypatch, codec, kernel, fault):
    """Each fault, injected into one kernel, is refused, and the refusal names the check that disagreed.
    (TF32 rounds fp32 operands only: bf16/fp16/int8/int4 operands have at most 11 significant bits.)"""
    name = "block_lse_kernel" if kernel == "lse" else "pick_rows_kernel"
    monkeypatch.setattr(triton_scan, name, FaultyKernel(getattr(triton_scan, name), fault))
    problem = triton_scan.self_check(make_codec(codec), 16, 16, torch.device("cpu"))
    assert problem is not None, f"{fault} in the {kernel} kernel passed the self-check"
    assert ("block LSEs" in problem) if kernel == "lse" else ("stage-2 rows" in problem), problem


def test_a_pick_rows_that_does_not_compile_falls_back_to_the_torch_scan(monkeypatch, caplog):
    import logging

    monkeypatch.setattr(triton_scan, "pick_rows_kernel", FaultyKernel(triton_scan.pick_rows_kernel, "raise"))
    monkeypatch.setattr(triton_scan, "TRUSTED", {})
    tower = Tower()
    h = make_handler(48, num_negatives=2, block_size=16)
    h.load_global_rows(global_cache(48, tower))
    q = global_batch(5, tower)["q"]
    kw = dict(num_draws=2, top_k=None, seed=3, step=1, chunk_rows=32)
    with caplog.at_level(logging.WARNING, logger="sharded_negcache"):
        got = score_shard(h.store, h.layout, q, h.score_fn, backend="triton", **kw)
    ref = score_shard(h.store, h.layout, q, h.score_fn, backend="torch", **kw)
    assert torch.equal(got.lse, ref.lse) and torch.equal(got.win_row, ref.win_row)
    warnings = [r.getMessage() for r in caplog.records if "failed its self-check" in r.getMessage()]
    assert len(warnings) == 1 and "does not compile" in warnings[0], warnings


def test_gpu_check_kernel_judges_a_run():
    """benchmarks/gpu_check_kernel.py's CPU-side logic on a tiny int8 shard in the interpreter: the self-check
    trusted the kernel, agreement criteria pass, and the timing criterion fails (the interpreter is ~10^6x slower
    than the H100 roofline), so the run is not judged a pass."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check_kernel.py"
    spec = importlib.util.spec_from_file_location("gpu_check_kernel", path)
    K = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(K)
    res = K.run("cpu", 512, 32, [6], 1, "h100-sxm", ("int8",), 64)
    p = res["points"][0]
    assert p["kernel_trusted"] and p["lse_ok"] and p["rows_ok"], p
    assert not p["time_ok"] and not res["ok"]
    assert "kernel_ms" in K.report(res)
