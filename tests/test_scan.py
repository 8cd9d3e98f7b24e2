"""The scan (native CPU kernel and torch ops): stage 2 inside the scan against a dense reference, chunk
independence, the inverse CDF at the edges of (0, 1), and the scoring_backend option."""
from __future__ import annotations

import importlib.util
import logging
from collections import Counter

import pytest
import torch

from engine_cases import Tower, global_cache, make_handler
from sharded_negcache import keyed_random, native_scan
from sharded_negcache.keyed_random import Stream
from sharded_negcache.scoring import make_score_fn, pick_in_block, resolve_backend, score_shard

NEG_INF = float("-inf")


# ---- stage 2's inverse CDF ------------------------------------------------------------------
def test_inverse_cdf_never_picks_a_row_without_mass_at_the_edges():
    # a block of 6 rows: rows 0 and 4, 5 are masked (the last rows empty), rows 1-3 are candidates
    a = torch.tensor([[NEG_INF, 0.5, -1.0, 2.0, NEG_INF, NEG_INF]] * 2)
    lse = torch.logsumexp(a, dim=1)
    got = pick_in_block(a, lse, torch.tensor([0.0, 1.0]))
    assert got.tolist() == [1, 3]  # u = 0: first row with mass; u = 1: last row with mass
    # a block where only the last row has mass, and one where a tiny candidate follows the big one
    b = torch.tensor([[NEG_INF, NEG_INF, NEG_INF, 1.0], [5.0, -1e4, NEG_INF, NEG_INF]])
    got = pick_in_block(b, torch.logsumexp(b, dim=1), torch.tensor([1.0, 1.0]))
    assert got.tolist() == [3, 0]  # exp(-1e4 - 5) underflows even in float64: no mass, never picked


def test_inverse_cdf_matches_a_loop_over_cumulative_weights():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(40, 16, generator=g)
    a[a < -1.2] = NEG_INF
    u = torch.rand(40, generator=g)
    got = pick_in_block(a, torch.logsumexp(a, dim=1), u)
    for i in range(40):
        w = [float(torch.exp(x.double())) for x in a[i]]
        target, acc = float(u[i]) * sum(w), 0.0
        want = next(j for j, wj in enumerate(w) if (acc := acc + wj) > target)
        assert got[i].item() == want


# ---- the scan against a dense reference -------------------------------------------------------
def dense_reference(store, layout, q, m, seed, step, exclude_ids=None):
    """All scores at once, per-block LSE by logsumexp, a Gumbel per (query, block, draw), argmax, and
    the inverse CDF inside the winner: the two-stage sampler written without chunks."""
    bs = layout.block_size
    a = q @ store.codec.decode(store.embeddings, store.dim).t()
    a = a.masked_fill(~store.filled[None, :], NEG_INF)
    if exclude_ids is not None:
        a = a.masked_fill(store.feature("doc_id").reshape(1, -1) == exclude_ids[:, None], NEG_INF)
    blse = torch.logsumexp(a.view(q.shape[0], -1, bs), dim=-1)
    pos = torch.arange(q.shape[0])
    keys = keyed_random.draw_keys(seed, step, Stream.BLOCK_GUMBEL, pos, m)
    ids = torch.arange(layout.blocks_per_rank) + layout.row_offset // bs
    key, blk = (keyed_random.gumbel(keys, ids) + blse[:, None, :]).max(dim=-1)
    u = keyed_random.uniform(keyed_random.draw_keys(seed, step, Stream.ROW_UNIFORM, pos, m))
    rows = torch.full_like(blk, -1)
    for i in range(q.shape[0]):
        for t in range(m):
            if torch.isfinite(key[i, t]):
                b = int(blk[i, t])
                seg = a[i, b * bs : (b + 1) * bs]
                rows[i, t] = b * bs + int(pick_in_block(seg[None], blse[i, b : b + 1], u[i, t : t + 1]))
    return torch.logsumexp(blse, dim=1), key, rows


@pytest.mark.parametrize("path", ["fused", "native", "torch"])
@pytest.mark.parametrize("chunk_rows", [4, 8, 12, 64])
def test_scan_matches_dense_reference_for_every_chunk_size(chunk_rows, path, monkeypatch):
    """fused: the kernel computes the products (float scale); native: torch.mm, then the chunk kernel (a
    callable transform, here the same scale); torch: torch ops only."""
    native = path != "torch"
    monkeypatch.setenv(native_scan.ENV_NATIVE, "1" if native else "0")
    tower = Tower()
    h = make_handler(48, with_ids=True, num_negatives=3)
    h.load_global_rows(global_cache(48, tower, with_ids=True))
    assert native_scan.available(h.device) == native
    g = torch.Generator().manual_seed(5)
    q = h.score_fn.prepare_queries(torch.randn(7, 8, generator=g))
    ids = torch.randint(0, 12, (7,), generator=g)
    lse, key, rows = dense_reference(h.store, h.layout, q, 3, seed=4, step=2, exclude_ids=ids)
    scale = h.score_fn.scale
    score_fn = make_score_fn(lambda dots: dots * scale) if path == "native" else h.score_fn
    got = score_shard(h.store, h.layout, torch.randn(7, 8, generator=torch.Generator().manual_seed(5)),
                      score_fn, num_draws=3, top_k=None, seed=4, step=2, chunk_rows=chunk_rows,
                      exclude_key="doc_id", exclude_ids=ids)
    torch.testing.assert_close(got.lse, lse, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.win_key, key, rtol=1e-6, atol=1e-6)
    assert torch.equal(got.win_row, rows)
    assert bool((got.win_row >= 0).all())
    assert bool(h.store.filled[got.win_row].all())  # never an empty row
    own = h.store.feature("doc_id").reshape(-1)[got.win_row]
    assert bool((own != ids[:, None]).all())  # never the query's own positive


def test_scan_with_no_queries_and_with_an_empty_cache():
    tower = Tower()
    h = make_handler(16)
    empty = score_shard(h.store, h.layout, torch.randn(3, 8), h.score_fn, num_draws=2, top_k=None, seed=0,
                        step=0, chunk_rows=8)
    assert torch.equal(empty.lse, torch.full((3,), NEG_INF)) and torch.equal(empty.win_row, torch.full((3, 2), -1))
    h.load_global_rows(global_cache(16, tower))
    none = score_shard(h.store, h.layout, torch.randn(0, 8), h.score_fn, num_draws=2, top_k=None, seed=0,
                       step=0, chunk_rows=8)
    assert none.lse.shape == (0,) and none.win_row.shape == (0, 2) and none.win_key.shape == (0, 2)


# ---- the scoring_backend option ------------------------------------------------------------------
def test_scoring_backend_option_is_checked_resolved_and_logged_once(caplog):
    with pytest.raises(ValueError, match="scoring_backend must be one of"):
        make_handler(16, scoring_backend="cuda")
    with pytest.raises(ValueError, match="scoring_backend='triton' is not possible here: top_k mode"):
        make_handler(16, scoring_backend="triton", top_k=2)
    with pytest.raises(ValueError, match="callable score_transform"):
        make_handler(16, scoring_backend="triton", score_transform=torch.tanh)
    tower = Tower()
    x = torch.randn(3, 6)
    with caplog.at_level(logging.INFO, logger="sharded_negcache"):
        h = make_handler(16)
        h.load_global_rows(global_cache(16, tower))
        for _ in range(2):
            h.update_cache_and_compute_loss(tower, torch.randn(3, 8), tower({"x": x}), {"x": x})
        assert h.config()["scoring_backend"] == {"requested": "auto", "runs": "native",
                                                 "why": "CPU device and the C++ kernel loaded"}
        assert h.scan_backend == "native"
    chosen = [r.getMessage() for r in caplog.records if "scoring backend" in r.getMessage()]
    assert chosen == ["sharded_negcache: scoring backend native (CPU device and the C++ kernel loaded)"]


# every native_scan function that calls into the C++ kernel (scoring calls them through the module)
KERNEL_FUNCTIONS = ("scan_chunk", "pack_queries", "fused_scan", "fused_topk", "pick", "row_lse", "draws", "gumbel",
                    "exp_nonpositive")


class _Counter:
    """Counts the calls made through native_scan's kernel functions (the real functions run)."""

    def __init__(self, monkeypatch) -> None:
        self.calls = 0
        for name in KERNEL_FUNCTIONS:
            monkeypatch.setattr(native_scan, name, self._counting(getattr(native_scan, name)))

    def _counting(self, fn):
        def call(*args, **kwargs):
            self.calls += 1
            return fn(*args, **kwargs)

        return call


@pytest.mark.parametrize("top_k", [None, 3])
def test_scoring_backend_torch_never_calls_the_cpp_kernel_and_native_does(top_k, monkeypatch):
    assert native_scan.available(torch.device("cpu")), "the C++ kernel is needed for this test"
    monkeypatch.delenv(native_scan.ENV_NATIVE, raising=False)
    counter = _Counter(monkeypatch)
    tower, calls, rows = Tower(), {}, {}
    for backend in ("torch", "native", "auto"):
        h = make_handler(16, num_negatives=2, top_k=top_k, scoring_backend=backend)
        h.load_global_rows(global_cache(16, tower))
        counter.calls, sampled = 0, []
        for step in range(4):
            g = torch.Generator().manual_seed(step)
            x = torch.randn(3, 6, generator=g)
            with torch.no_grad():
                h.update_cache_and_compute_loss(tower, torch.randn(3, 8, generator=g), tower({"x": x}), {"x": x})
            sampled.append(h.last_step.sampled_rows)
        calls[backend], rows[backend] = counter.calls, torch.stack(sampled)
        assert h.config()["scoring_backend"]["requested"] == backend and h.scan_backend == {"torch": "torch"}.get(
            backend, "native")
    assert calls["torch"] == 0 and calls["native"] > 0 and calls["auto"] == calls["native"], calls
    assert torch.equal(rows["native"], rows["auto"])
    assert bool((rows["torch"] >= 0).any())  # the torch ops did sample


def test_resolve_backend_is_the_one_choice():
    """The table of scoring_backend x device x mode x transform (devices by name only: no GPU needed)."""
    assert native_scan.available(torch.device("cpu")), "the C++ kernel is needed for this test"
    scale, fn = make_score_fn(3.0), make_score_fn(torch.tanh)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend("auto", cpu, scale, None) == ("native", "CPU device and the C++ kernel loaded")
    assert resolve_backend("auto", cpu, fn, None)[0] == "native"  # the kernel scans torch's score chunk
    assert resolve_backend("auto", cpu, scale, 3)[0] == "native"
    assert resolve_backend("auto", cpu, fn, 3) == ("torch", "top_k mode with a callable score_transform has no C++ "
                                                   "kernel (its top-k folds a float scale)")
    assert resolve_backend("auto", cuda, scale, 3) == ("torch", "top_k mode runs on the torch path")
    assert resolve_backend("auto", cuda, fn, None)[0] == "torch"
    if importlib.util.find_spec("triton") is not None:
        assert resolve_backend("auto", cuda, scale, None) == ("triton", "CUDA device and triton available")
        assert resolve_backend("triton", None, scale, None) == ("triton", "requested")
    for requested in ("torch", "native"):
        assert resolve_backend(requested, cpu, fn, None) == (requested, "requested")
    assert resolve_backend("torch", cuda, fn, 3) == ("torch", "requested")
    with pytest.raises(ValueError, match="scoring_backend='native' is not possible here: device is cuda"):
        resolve_backend("native", cuda, scale, None)
    with pytest.raises(ValueError, match="scoring_backend='native' is not possible here: top_k mode with a callable"):
        resolve_backend("native", cpu, fn, 3)
    with pytest.raises(ValueError, match="scoring_backend='triton' is not possible here: top_k"):
        resolve_backend("triton", cuda, scale, 3)


def test_exclusions_need_the_field_that_holds_the_rows_ids():
    h = make_handler(16, with_ids=True)
    with pytest.raises(ValueError, match="exclude_ids needs exclude_key"):
        score_shard(h.store, h.layout, torch.randn(2, 8), h.score_fn, num_draws=1, top_k=None, seed=0, step=0,
                    chunk_rows=8, exclude_ids=torch.tensor([1, 2]))


# every entry point of the C++ kernel (each calls into the loaded library) and the Triton kernels' launches
NATIVE_CALLS = ("scan_chunk", "pack_queries", "fused_scan", "fused_topk", "pick", "row_lse", "draws", "gumbel",
                "exp_nonpositive")
TRITON_LAUNCHES = ("block_lse", "pick_rows", "lse_launch", "pick_launch", "self_check")


def count_kernel_calls(monkeypatch) -> Counter:
    """Wraps each kernel entry point with a counter (the real function still runs): module.name -> calls.
    The Triton launches are counted where triton imports (here they must stay at 0: CPU tensors)."""
    calls: Counter = Counter()
    modules = [(native_scan, NATIVE_CALLS)]
    try:
        from sharded_negcache import triton_scan
        modules.append((triton_scan, TRITON_LAUNCHES))
    except ImportError:
        pass
    for module, names in modules:
        for name in names:
            real, key = getattr(module, name), f"{module.__name__.rsplit('.', 1)[1]}.{name}"
            monkeypatch.setattr(module, name, lambda *a, _real=real, _key=key, **k: calls.update([_key]) or _real(*a, **k))
    return calls


def _steps(h, tower, steps: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs ``steps`` training steps; (sampled rows or top-k rows, losses) of each step."""
    sampled, losses = [], []
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(3, 6, generator=g)
        loss = h.update_cache_and_compute_loss(tower, torch.randn(3, 8, generator=g), tower({"x": x}), {"x": x})
        sampled.append(h.last_step.sampled_rows)
        losses.append(loss.detach())
    return torch.stack(sampled), torch.stack(losses)


@pytest.mark.parametrize("transform", ["scale", "callable"])
@pytest.mark.parametrize("top_k", [None, 3])
def test_scoring_backend_runs_exactly_the_kernels_it_names(top_k, transform, monkeypatch):
    """Counted at the kernels' entry points: 'torch' calls no kernel at all, 'native' the C++ kernel's scan
    (fused with a float scale, on the score chunk with a callable), 'auto' on CPU the same calls as 'native'
    where the C++ kernel can run (top-k with a callable transform: torch ops, and 'native' is refused); no
    Triton launch on CPU. The samples and losses agree across backends."""
    assert native_scan.available(torch.device("cpu")), "the C++ kernel is needed for this test"
    monkeypatch.delenv(native_scan.ENV_NATIVE, raising=False)
    fn = 3.0 if transform == "scale" else (lambda dots: dots * 3.0)
    calls = count_kernel_calls(monkeypatch)
    tower, counts, out = Tower(), {}, {}
    backends = ("torch", "auto") if top_k and transform == "callable" else ("torch", "native", "auto")
    for backend in backends:
        h = make_handler(16, num_negatives=2, top_k=top_k, score_transform=fn, scoring_backend=backend)
        h.load_global_rows(global_cache(16, tower))
        calls.clear()
        out[backend] = _steps(h, tower)
        counts[backend] = dict(calls)
    assert counts["torch"] == {}, counts  # not one kernel call, not even the draws
    if "native" not in counts:  # top-k with a callable transform: no C++ kernel exists for it
        with pytest.raises(ValueError, match="scoring_backend='native' is not possible here: top_k mode with a "
                                             "callable score_transform"):
            make_handler(16, top_k=top_k, score_transform=fn, scoring_backend="native")
        assert counts["auto"] == {} and h.config()["scoring_backend"]["runs"] == "torch"
    else:
        scan = "native_scan.fused_topk" if top_k else (
            "native_scan.fused_scan" if transform == "scale" else "native_scan.scan_chunk")
        assert counts["native"].get(scan, 0) >= 3, counts  # one call per step at least
        if not top_k:
            assert counts["native"]["native_scan.pick"] == counts["native"]["native_scan.draws"] == 3, counts
        assert counts["auto"] == counts["native"]
        assert not any(k.startswith("triton_scan") for k in counts["native"])
    for backend in backends[1:]:
        assert torch.equal(out[backend][0], out["torch"][0]), backend  # the same rows drawn
        torch.testing.assert_close(out[backend][1], out["torch"][1], rtol=1e-5, atol=1e-5)
    assert bool((out["torch"][0] >= 0).any())  # rows were drawn: the comparison is not vacuous


def test_the_environment_overrides_a_native_request_and_config_reports_it(monkeypatch, caplog):
    monkeypatch.setenv(native_scan.ENV_NATIVE, "0")
    off = f"{native_scan.ENV_NATIVE} turns the C++ kernel off"
    tower = Tower()
    x = torch.randn(3, 6)
    with caplog.at_level(logging.INFO, logger="sharded_negcache"):
        h = make_handler(16, scoring_backend="native")
        h.update_cache_and_compute_loss(tower, torch.randn(3, 8), tower({"x": x}), {"x": x})
        assert h.config()["scoring_backend"] == {"requested": "native", "runs": "torch", "why": off}
    chosen = [r.getMessage() for r in caplog.records if "scoring backend" in r.getMessage()]
    assert chosen == [f"sharded_negcache: scoring backend torch ({off})"]
    assert make_handler(16).config()["scoring_backend"] == {"requested": "auto", "runs": "torch", "why": off}
    assert make_handler(16, scoring_backend="torch").config()["scoring_backend"] == {
        "requested": "torch", "runs": "torch", "why": "requested"}
    monkeypatch.delenv(native_scan.ENV_NATIVE)
    with pytest.raises(ValueError, match="scoring_backend='native' is not possible here: device is meta"):
        make_handler(16, scoring_backend="native", device="meta")


def _backend_disagreement(rank: int, world_size: int) -> str | None:
    """Rank 1 turns the C++ kernel off (same requested 'auto'): the step is refused on every rank."""
    import os

    from sharded_negcache import BatchRejected

    if rank == 1:
        os.environ[native_scan.ENV_NATIVE] = "0"
    h = make_handler(16, collective_timeout_s=30.0)
    tower = Tower()
    x = torch.randn(2, 6)
    try:
        h.update_cache_and_compute_loss(tower, torch.randn(2, 8), tower({"x": x}), {"x": x})
    except BatchRejected as exc:
        return str(exc)
    return None


def test_ranks_running_different_kernels_are_refused_naming_the_backend():
    """What runs is part of the configuration: a rank whose C++ kernel is off (or did not build) would sample
    with other exp bits, so the step is refused on every rank, naming what each runs and why."""
    from sharded_negcache.testing import run_ranks

    messages = run_ranks(2, _backend_disagreement, timeout=120)
    off = f"{native_scan.ENV_NATIVE} turns the C++ kernel off"
    for msg in messages:
        assert msg is not None and "scoring_backend: rank 0=" in msg, msg
        assert "'runs': 'native'" in msg and f"'runs': 'torch', 'why': '{off}'" in msg, msg


# ---- top-k mode: one tie rule -------------------------------------------------------------------------
def _tied_cache(n: int = 48, seed: int = 0) -> tuple[dict, torch.Tensor]:
    """A cache whose rows are 4 distinct integer embeddings, each repeated (exact ties: integer products),
    some rows empty; and 6 integer queries."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randint(-3, 4, (4, 8), generator=g).float()
    rows = global_cache(n, Tower())
    rows["embedding"] = table[torch.randint(0, 4, (n,), generator=g)]
    return rows, torch.randint(-2, 3, (6, 8), generator=g).float()


def _lower_row_wins(rows: dict, q: torch.Tensor, scale: float, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: each query's filled rows by (score descending, row ascending), the first k."""
    scores = (q.double() * scale) @ rows["embedding"].double().t()
    vals, out = [], []
    for i in range(q.shape[0]):
        ranked = sorted((-float(scores[i, j]), j) for j in range(scores.shape[1]) if rows["filled"][j])[:k]
        vals.append([-v for v, _ in ranked])
        out.append([j for _, j in ranked])
    return torch.tensor(vals), torch.tensor(out)


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("chunk_rows", [8, 48])
@pytest.mark.parametrize("k", [1, 3, 10])
def test_topk_ties_keep_the_lower_global_row(backend, chunk_rows, k):
    """Equal scores: the lower global row is in the top-k, in the C++ kernel and in the torch scan alike (a
    heap that evicts an arbitrary one of the tied rows breaks this when a better row arrives later)."""
    if backend == "native" and not native_scan.available(torch.device("cpu")):
        pytest.skip("no C++ compiler")
    rows, q = _tied_cache()
    h = make_handler(48, top_k=k)
    h.load_global_rows(rows)
    got = score_shard(h.store, h.layout, q, h.score_fn, num_draws=1, top_k=k, seed=0, step=0, chunk_rows=chunk_rows,
                      backend=backend)
    want_val, want_row = _lower_row_wins(rows, q, 3.0, k)
    assert torch.equal(got.topk_row, want_row)
    assert torch.equal(got.topk_val.double(), want_val)
    ranked, _ = _lower_row_wins(rows, q, 3.0, k + 1)
    assert (ranked[:, k - 1] == ranked[:, k]).any(), "no tie at the k-th value: the test would be vacuous"
