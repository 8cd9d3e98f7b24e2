"""The native CPU scan kernel (sharded_negcache/csrc/scan.cpp) against independent torch computations.

Its exp and log are polynomials, so values are compared with stated bounds (float64 references), and
sampled blocks are compared where no two candidates' keys are closer than that bound. Also: masks,
ragged block sizes, batch 1, NaN/Inf propagation, the thread count, the build cache and the fallback.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sharded_negcache import keyed_random, native_scan
from sharded_negcache.keyed_random import Stream
from sharded_negcache.scoring import block_lse
from test_keyed_random import EDGE, keys_for

NEG_INF, INF, NAN = float("-inf"), float("inf"), float("nan")
REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not native_scan.available(torch.device("cpu")),
                                reason="no C++ compiler here (the fallback is tested in a subprocess)")

# Stated bounds. exp: relative 2e-7 + 7e-8 |x| for x in [-86, 0] (the rounding of x log2 e grows with |x|;
# a term's error is then at most 2.6e-8 of the block's largest term, since e^x |x| <= 1/e), absolute
# 3e-38 below -87.
# Block LSE: 2e-6 absolute (the float32 sum of the eager ops has the same order of error). Gumbel: 4e-6
# absolute (two float32 logs of a value in (0, 1)).
LSE_ABS, GUMBEL_ABS = 2e-6, 4e-6


def test_exp_polynomial_against_float64():
    x = torch.cat([-torch.rand(200_000) * 16, -16 - torch.rand(20_000) * 70]).double()  # float32 inputs
    rel = (native_scan.exp_nonpositive(x.float()).double() - torch.exp(x)).abs() / torch.exp(x)
    assert bool((rel <= 2e-7 + 7e-8 * x.abs()).all()), float((rel / (2e-7 + 7e-8 * x.abs())).max())
    assert float(rel[x > -1].max()) < 2.5e-7
    edge = native_scan.exp_nonpositive(torch.tensor([0.0, -0.0, NEG_INF, -87.0, -88.5, -1e30, NAN]))
    assert edge[:2].tolist() == [1.0, 1.0] and 0 < edge[3].item() < 1e-37 and edge[6].isnan()
    # below e^-87: 0, or 2^-125 * p on AVX-512 (no denormal); a block sum (>= 1) cannot see either
    assert all(0.0 <= v < 3e-38 for v in edge[[2, 4, 5]].tolist())
    assert float(1.0 + 256 * edge[2]) == 1.0


def test_gumbel_matches_keyed_random_including_the_extreme_hash_levels():
    g = torch.Generator().manual_seed(0)
    keys = keyed_random.draw_keys(11, 5, Stream.BLOCK_GUMBEL, torch.arange(64), 4)
    items = torch.randint(0, 1 << 31, (300,), generator=g)
    torch.testing.assert_close(native_scan.gumbel(keys, items), keyed_random.gumbel(keys, items).view(256, 300),
                               rtol=0, atol=GUMBEL_ABS)
    # keys whose hash is each of the 512 lowest and highest 32-bit values against item 12345
    edge_keys = keys_for(EDGE, 12345)
    got = native_scan.gumbel(edge_keys, torch.tensor([12345]))
    want = keyed_random.gumbel(edge_keys, torch.tensor([12345])).view(-1, 1)
    assert bool(torch.isfinite(got).all())
    torch.testing.assert_close(got, want, rtol=0, atol=GUMBEL_ABS)


@contextlib.contextmanager
def _threads(n: int | None):
    """torch's (and so the kernel's) thread count set to ``n`` (None: unchanged) inside the block."""
    old = torch.get_num_threads()
    torch.set_num_threads(n or old)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _masks(filled=None, row_ids=None, excl=None) -> native_scan.ChunkMasks:
    """The kernel's masks from empty rows ``filled``, row doc ids and each query's own id ``excl``."""
    ids = None if excl is None else torch.sort(excl)
    return native_scan.ChunkMasks(filled, row_ids, None if ids is None else ids[0].contiguous(),
                                  None if ids is None else ids[1].contiguous())


def _state(b, bs, keys=None, best=None) -> native_scan.Stage1:
    """Stage-1 state for b queries: ``best`` (key, row) of earlier chunks or none yet; copy buffers of 7.0."""
    m = 0 if keys is None else keys.shape[1]
    return native_scan.Stage1(torch.empty(b, 0, dtype=torch.int64) if keys is None else keys,
                              best[0].clone() if best else torch.full((b, m), NEG_INF),
                              best[1].clone() if best else torch.full((b, m), -1, dtype=torch.int64),
                              torch.full((b * m, bs), 7.0), torch.full((b * m,), 7.0))


def _scan(scores, bs, *, keys=None, filled=None, row_ids=None, excl=None, best=None, threads=None):
    """One scan_chunk call on a copy of ``scores``; returns (masked scores, lse, best_key, best_row,
    win_scores, win_lse, changed)."""
    s = scores.clone()
    b, n = s.shape
    lse, state = torch.full((b, n // bs), 123.0), _state(b, bs, keys, best)
    with _threads(threads):
        changed = native_scan.scan_chunk(s, bs, lse, _masks(filled, row_ids, excl), state, first_block=40, row0=1000)
    return s, lse, state.best_key, state.best_row, state.win_scores, state.win_lse, changed


@pytest.mark.parametrize("bs", [1, 4, 16, 17, 48, 256])
@pytest.mark.parametrize("b", [1, 5])
def test_block_lse_against_float64_with_masks_and_ragged_blocks(bs, b):
    g = torch.Generator().manual_seed(bs * 10 + b)
    n = bs * 6
    s = torch.randn(b, n, generator=g) * 12
    s[0, :bs] = NEG_INF  # a block without candidates
    s[b - 1, bs + 1 :: 3] = NEG_INF
    got = _scan(s, bs)[1]
    want = block_lse(s.double(), bs)
    assert got[0, 0].item() == NEG_INF
    torch.testing.assert_close(got.double(), want, rtol=0, atol=LSE_ABS)


def test_block_lse_propagates_nan_and_inf_like_the_eager_ops():
    s = torch.randn(4, 64)
    s[0, 3] = NAN
    s[1, 17] = INF
    s[2, 32:48] = NEG_INF
    s[3, 50] = NAN
    s[3, 48:50] = NEG_INF
    got, want = _scan(s, 16)[1], block_lse(s, 16)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    assert torch.equal(got[got.isinf()], want[want.isinf()])


def test_masks_empty_rows_and_each_querys_own_positive():
    g = torch.Generator().manual_seed(3)
    b, n, bs = 6, 64, 16
    s = torch.randn(b, n, generator=g)
    filled = torch.ones(n, dtype=torch.bool)
    filled[[0, 5, 33]] = False
    row_ids = torch.randint(0, 10, (n,), generator=g)
    excl = torch.tensor([3, 3, 7, 100, 0, 9])  # two queries share an id; one id is in no row
    masked = _scan(s, bs, filled=filled, row_ids=row_ids, excl=excl)[0]
    want = s.masked_fill(~filled[None, :], NEG_INF).masked_fill(row_ids[None, :] == excl[:, None], NEG_INF)
    assert torch.equal(masked, want)


def _stage1_reference(lse, keys, first_block, best_key):
    """Stage 1 in torch ops: key = Gumbel(key, global block) + LSE, max over blocks, strictly better wins."""
    ids = torch.arange(lse.shape[1]) + first_block
    key, blk = (keyed_random.gumbel(keys, ids) + lse.unsqueeze(1).double()).max(dim=-1)
    return key, blk, key > best_key


@pytest.mark.parametrize("threads", [1, 2])
def test_stage_one_and_the_winners_copies_against_torch(threads):
    g = torch.Generator().manual_seed(9)
    b, m, bs, nblk = 33, 3, 32, 7
    s = torch.randn(b, nblk * bs, generator=g) * 3
    s[4, : 3 * bs] = NEG_INF
    s[5] = NEG_INF  # a query without candidates: no winner
    keys = keyed_random.draw_keys(2, 8, Stream.BLOCK_GUMBEL, torch.arange(b), m)
    best_key = torch.randn(b, m, generator=g) * 2 + 4  # earlier chunks' winners; some are not beaten
    best_row = torch.randint(0, 900, (b, m), generator=g)
    masked, lse, got_key, got_row, win_scores, win_lse, changed = _scan(s, bs, keys=keys, best=(best_key, best_row),
                                                                        threads=threads)
    key, blk, better = _stage1_reference(lse, keys, 40, best_key)
    # where the two best candidates (or the winner and the previous best) are farther apart than the bound,
    # the decision must be the same
    ids = torch.arange(nblk) + 40
    all_keys = keyed_random.gumbel(keys, ids) + lse.unsqueeze(1)
    top2 = all_keys.topk(2, dim=-1).values
    clear = ((top2[..., 0] - top2[..., 1]).abs() > 1e-4) & ((key - best_key).abs() > 1e-4)
    assert int(clear.sum()) > 0.9 * b * m
    assert torch.equal((got_key != best_key)[clear], better[clear])
    assert changed == int((got_key != best_key).sum())
    won = better & clear
    assert torch.equal(got_row[won], 1000 + blk[won] * bs)
    torch.testing.assert_close(got_key[won].double(), key[won], rtol=0, atol=GUMBEL_ABS + LSE_ABS)
    assert torch.equal(got_row[~better & clear], best_row[~better & clear])
    assert not bool(better[5].any()) and torch.equal(got_key[5], best_key[5])
    for qi, ti in won.nonzero().tolist():
        slot = qi * m + ti
        assert torch.equal(win_scores[slot], masked[qi, int(blk[qi, ti]) * bs : (int(blk[qi, ti]) + 1) * bs])
        assert win_lse[slot].item() == lse[qi, int(blk[qi, ti])].item()


def test_results_do_not_depend_on_the_thread_count():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(64, 512, generator=g) * 5
    keys = keyed_random.draw_keys(0, 0, Stream.BLOCK_GUMBEL, torch.arange(64), 2)
    one, two = _scan(s, 64, keys=keys, threads=1), _scan(s, 64, keys=keys, threads=2)
    for a, b in zip(one[:6], two[:6]):
        assert torch.equal(a, b)


# ---- build cache and fallback (fresh processes) ------------------------------------------------------
_PROBE = """
import logging, sys, torch
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(message)s")
from sharded_negcache import native_scan
from sharded_negcache.scoring import score_shard
print("available", native_scan.available(torch.device("cpu")))
print("info", native_scan.build_info())
"""


def _probe(env: dict, code: str = _PROBE) -> str:
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_built_once_per_machine_then_loaded_from_the_cache(tmp_path):
    out1 = _probe({"SHARDED_NEGCACHE_CACHE_DIR": str(tmp_path)})
    assert "available True" in out1
    built = list(tmp_path.glob("scan-*.so"))
    assert len(built) == 1 and not list(tmp_path.glob(".scan-*"))  # no partial file left behind
    stamp = built[0].stat().st_mtime_ns
    out2 = _probe({"SHARDED_NEGCACHE_CACHE_DIR": str(tmp_path)})
    assert "available True" in out2 and built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt


def test_without_a_compiler_one_warning_and_the_torch_ops_give_the_same_samples(built_cache, tmp_path):
    code = _PROBE + """
from engine_cases import Tower, global_cache, make_handler
tower = Tower()
h = make_handler(48, num_negatives=3)
h.load_global_rows(global_cache(48, tower))
q = torch.randn(7, 8, generator=torch.Generator().manual_seed(5))
for _ in range(3):
    p = score_shard(h.store, h.layout, q, h.score_fn, num_draws=3, top_k=None, seed=4, step=2, chunk_rows=16)
print("rows", p.win_row.tolist())
print("lse", p.lse.tolist())
"""
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "SHARDED_NEGCACHE_CACHE_DIR": str(tmp_path)}
    broken = _probe({**env, "CXX": str(tmp_path / "no-such-compiler")}, code)
    assert "available False" in broken
    assert broken.count("WARNING") == 1 and "native CPU scan kernel is unavailable" in broken
    off = _probe({**env, native_scan.ENV_NATIVE: "0"}, code)
    assert "available False" in off and "WARNING" not in off  # disabled: no attempt, no warning
    native = _probe({**env, "SHARDED_NEGCACHE_CACHE_DIR": str(built_cache)}, code)  # this machine's build
    assert "available True" in native
    pick = lambda out, key: next(line for line in out.splitlines() if line.startswith(key))  # noqa: E731
    assert pick(broken, "rows") == pick(native, "rows") == pick(off, "rows")
    lse = [torch.tensor(eval(pick(out, "lse")[4:])) for out in (broken, native)]
    torch.testing.assert_close(lse[0], lse[1], rtol=0, atol=LSE_ABS)


def _built(directory: Path) -> Path:
    (lib,) = directory.glob("scan-*.so")
    return lib


def _foreign_library(tmp_path: Path) -> Path:
    src = tmp_path / "foreign.c"
    src.write_text("int negcache_something_else(void) { return 1; }\n")
    out = tmp_path / "foreign.so"
    subprocess.run(["g++", "-shared", "-fPIC", "-x", "c", str(src), "-o", str(out)], check=True)
    return out


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory) -> Path:
    """A cache directory holding this machine's default build (built once for the tests below)."""
    cache = tmp_path_factory.mktemp("built")
    assert "available True" in _probe({"SHARDED_NEGCACHE_CACHE_DIR": str(cache)})
    return cache


@pytest.mark.parametrize("damage", ["truncated", pytest.param("foreign", marks=pytest.mark.heavy),
                                    pytest.param("foreign_with_its_digest", marks=pytest.mark.heavy)])
def test_a_damaged_library_in_the_cache_is_rebuilt_not_loaded(damage, built_cache, tmp_path):
    """A library cut short (a crash before it reached the disk: loading it raised SIGBUS) or another ELF under
    the kernel's name (AttributeError at the first call), even one with a matching digest beside it: the
    next process warns once, rebuilds it and loads the rebuilt kernel."""
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(built_cache, cache)
    env = {"SHARDED_NEGCACHE_CACHE_DIR": str(cache)}
    lib = _built(cache)
    whole = lib.read_bytes()
    if damage == "truncated":
        lib.write_bytes(whole[: len(whole) // 2])
    else:
        foreign = _foreign_library(tmp_path).read_bytes()
        lib.write_bytes(foreign)
        if damage == "foreign_with_its_digest":
            lib.with_name(lib.name + ".sha256").write_text(__import__("hashlib").sha256(foreign).hexdigest())
    out = _probe(env, _PROBE + "print('group', native_scan.pack_queries(torch.ones(3, 2)).numel())\n")
    assert "available True" in out and out.count("WARNING") == 1, out
    assert "is damaged or not this build of the kernel; rebuilding it" in out
    assert "group " in out and _built(cache).stat().st_size == len(whole)  # the rebuilt kernel was called
    stamp = _built(cache).stat().st_mtime_ns
    again = _probe(env)
    assert "available True" in again and "WARNING" not in again and _built(cache).stat().st_mtime_ns == stamp


def test_an_unwritable_cache_directory_falls_back_to_the_temp_directory(tmp_path):
    """An existing directory where no file can be created, even by root (/proc): the kernel is built in
    $TMPDIR/sharded_negcache-<uid> instead of being given up."""
    if not Path("/proc/self").is_dir():
        pytest.skip("needs /proc (a directory that is read-only for root too)")
    out = _probe({"SHARDED_NEGCACHE_CACHE_DIR": "/proc", "TMPDIR": str(tmp_path)})
    assert "available True" in out and "WARNING" not in out, out
    assert _built(tmp_path / f"sharded_negcache-{os.getuid()}").is_file()


_BITS = _PROBE + """
from engine_cases import Tower, global_cache, make_handler
tower = Tower()
h = make_handler(48, num_negatives=3)
h.load_global_rows(global_cache(48, tower))
q = torch.randn(7, 8, generator=torch.Generator().manual_seed(5))
p = score_shard(h.store, h.layout, q, h.score_fn, num_draws=3, top_k=None, seed=4, step=2, chunk_rows=16)
t = score_shard(h.store, h.layout, q, h.score_fn, num_draws=3, top_k=5, seed=4, step=2, chunk_rows=16)
print("bits", p.win_row.tolist(), p.lse.tolist(), p.win_key.tolist(), t.topk_val.tolist(), t.topk_row.tolist())
"""


def _script(path: Path, body: str) -> str:
    """An executable shell script at ``path`` standing in for a compiler; returns its path."""
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


@pytest.mark.heavy
@pytest.mark.skipif(shutil.which("g++-11") is None, reason="no g++-11 on PATH")
def test_gcc_11_builds_the_kernel_with_the_same_bits(built_cache, tmp_path):
    """GCC 11 (Ubuntu 22.04's default) has no __builtin_shufflevector; the lane permutations use
    __builtin_shuffle with every GCC, so g++-11 builds the kernel and its samples, LSEs and top-k are the
    bits of this machine's default build."""
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    old = _probe({**env, "CXX": "g++-11", "SHARDED_NEGCACHE_CACHE_DIR": str(tmp_path / "old")}, _BITS)
    new = _probe({**env, "SHARDED_NEGCACHE_CACHE_DIR": str(built_cache)}, _BITS)
    assert "available True" in old and "WARNING" not in old, old
    assert "'compiler_version': 'g++-11 " in old, old
    pick = lambda out: next(line for line in out.splitlines() if line.startswith("bits"))  # noqa: E731
    assert pick(old) == pick(new)


def test_a_failing_compiler_is_named_with_its_version_the_error_and_the_fix(tmp_path):
    """One warning, not cut short: the compiler's path and version line, the first error line whole, where the
    full output is, and the fix; build_info() reports the same reason."""
    cxx = _script(tmp_path / "g++-broken", 'if [ "$1" = "--version" ]; then echo "g++ (Simulated) 11.4.0"; exit 0; fi\n'
                  'exec g++ -D__builtin_shuffle=__builtin_shuffle_unknown_to_this_compiler "$@"\n')
    out = _probe({"CXX": cxx, "SHARDED_NEGCACHE_CACHE_DIR": str(tmp_path / "cache")})
    assert "available False" in out and out.count("WARNING") == 1, out
    warning = next(line for line in out.splitlines() if line.startswith("WARNING"))
    assert f"{cxx} (g++ (Simulated) 11.4.0): failed to compile scan.cpp: " in warning, warning
    assert "error: " in warning and "__builtin_shuffle_unknown_to_this_compiler" in warning, warning
    (log_file,) = (tmp_path / "cache").glob("scan-*.log")
    assert f"the compiler's full output is in {log_file}" in warning and "Fix: set CXX to GCC >= 9" in warning
    assert "__builtin_shuffle_unknown_to_this_compiler" in log_file.read_text()
    info = eval(next(line for line in out.splitlines() if line.startswith("info "))[5:])
    assert info["loaded"] is False and info["failed"] is True and info["compiler"] == cxx
    assert info["reason"] in warning and info["compiler_version"] == "g++ (Simulated) 11.4.0"


def test_a_gcc_older_than_9_is_refused_before_compiling_with_the_need_named(tmp_path):
    calls = tmp_path / "calls"
    cxx = _script(tmp_path / "g++-8", f'if [ "$1" = "--version" ]; then echo "g++ (Simulated) 8.5.0"; exit 0; fi\n'
                  f'echo compile >> {calls}\nexec g++ "$@"\n')
    out = _probe({"CXX": cxx, "SHARDED_NEGCACHE_CACHE_DIR": str(tmp_path / "cache")})
    assert "available False" in out and out.count("WARNING") == 1, out
    warning = next(line for line in out.splitlines() if line.startswith("WARNING"))
    assert f"{cxx} (g++ (Simulated) 8.5.0): GCC 8 is too old: the kernel needs GCC >= 9" in warning, warning
    assert "Fix: install g++ 9 or newer and set CXX to it" in warning, warning
    assert not calls.exists()  # refused before any compile


def test_processes_building_at_once_compile_once(tmp_path):
    """Three processes start on an empty cache: the file lock lets one compile while the others wait, then all
    load its library (counted by a compiler wrapper)."""
    calls = tmp_path / "calls"
    cxx = _script(tmp_path / "cxx", f'if [ "$1" != "--version" ]; then echo compile >> {calls}; fi\nexec g++ "$@"\n')
    env = {**os.environ, "PYTHONPATH": str(REPO), "SHARDED_NEGCACHE_CACHE_DIR": str(tmp_path / "cache"), "CXX": cxx}
    procs = [subprocess.Popen([sys.executable, "-c", _PROBE], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 and "available True" in o for p, (o, _) in zip(procs, outs)), outs
    assert calls.read_text().splitlines() == ["compile"]
    assert len(list((tmp_path / "cache").glob("scan-*.so"))) == 1
    assert sum("'built': True" in o for o, _ in outs) == 1  # the others loaded the one library


# ---- checked arguments -----------------------------------------------------------------------------------
def _scan_args(b: int = 3, n: int = 32, bs: int = 8, m: int = 2) -> dict:
    """Valid scan_chunk arguments (the bad-argument cases change one thing)."""
    keys = keyed_random.draw_keys(0, 0, Stream.BLOCK_GUMBEL, torch.arange(b), m)
    return {"scores": torch.randn(b, n), "block": bs, "lse_out": torch.full((b, n // bs), 5.0),
            "masks": _masks(torch.ones(n, dtype=torch.bool), torch.arange(n), torch.tensor([1, 5, 9])),
            "state": _state(b, bs, keys), "first_block": 0, "row0": 0}


def _changed(args: dict, **changes) -> dict:
    """``args`` with ``changes``; a key ``masks__x`` / ``state__x`` replaces field x of that NamedTuple."""
    out = dict(args)
    for key, value in changes.items():
        owner, _, field = key.partition("__")
        out[owner] = out[owner]._replace(**{field: value}) if field else value
    return out


_BAD_SCANS = [
    ("scores float64", dict(scores=torch.randn(3, 32, dtype=torch.float64)), TypeError,
     "scores must have dtype torch.float32, got torch.float64"),
    ("scores a list", dict(scores=[[0.0] * 32] * 3), TypeError, "scores must be a torch.Tensor, got list"),
    ("scores column-major", dict(scores=torch.randn(32, 3).t()), ValueError, r"scores must be a row-major view"),
    ("scores 1-D", dict(scores=torch.randn(96)), ValueError, r"scores must have shape \[\*, \*\], got \[96\]"),
    ("scores on meta", dict(scores=torch.empty(3, 32, device="meta")), ValueError, "scores must be on the CPU"),
    ("block 0", dict(block=0), ValueError, "block must be >= 1, got 0"),
    ("block a bool", dict(block=True), TypeError, "block must be an int, got a bool"),
    ("block 5", dict(block=5, lse_out=torch.full((3, 6), 5.0)), ValueError, "not a multiple of block=5"),
    ("lse_out too narrow", dict(lse_out=torch.full((3, 3), 5.0)), ValueError,
     r"lse_out must have shape \[3, 4\], got \[3, 3\]"),
    ("lse_out rows overlap", dict(lse_out=torch.full((4,), 5.0).expand(3, 4)), ValueError, "lse_out must be a row-major"),
    ("filled too short", dict(masks__filled=torch.ones(31, dtype=torch.bool)), ValueError,
     r"masks.filled must have shape \[32\], got \[31\]"),
    ("filled float", dict(masks__filled=torch.ones(32)), TypeError, "masks.filled must have dtype torch.bool or "
     "torch.uint8"),
    ("row_ids int32", dict(masks__row_ids=torch.arange(32, dtype=torch.int32)), TypeError,
     "masks.row_ids must have dtype torch.int64"),
    ("excl_query out of range", dict(masks__excl_query=torch.tensor([0, 1, 3])), ValueError,
     r"masks.excl_query must hold query indices in \[0, 3\), got values in \[0, 3\]"),
    ("excl_sorted unsorted", dict(masks__excl_sorted=torch.tensor([9, 5, 1])), ValueError,
     "masks.excl_sorted must be sorted ascending"),
    ("excl_sorted alone", dict(masks__excl_query=None), ValueError, "must be given together"),
    ("excl without row_ids", dict(masks__row_ids=None), ValueError, "masks.excl_sorted needs masks.row_ids"),
    ("masks a tuple", dict(masks=(None, None, None, None)), TypeError, "masks must be a native_scan.ChunkMasks"),
    ("keys float", dict(state__keys=torch.zeros(3, 2)), TypeError, "state.keys must have dtype torch.int64"),
    ("best_key for 2 queries", dict(state__best_key=torch.zeros(2, 2)), ValueError,
     r"state.best_key must have shape \[3, 2\], got \[2, 2\]"),
    ("best_row transposed", dict(state__best_row=torch.zeros(2, 3, dtype=torch.int64).t()), ValueError,
     "state.best_row must be contiguous"),
    ("win_scores of another block", dict(state__win_scores=torch.zeros(6, 16)), ValueError,
     r"state.win_scores must have shape \[6, 8\]"),
    ("win_lse missing", dict(state__win_lse=None), ValueError, "state.win_scores and state.win_lse must be given"),
    ("first_block negative", dict(first_block=-1), ValueError, "first_block must be >= 0, got -1"),
    ("row0 a float", dict(row0=1.0), TypeError, "row0 must be an int, got float"),
]


def _written(args: dict) -> list[torch.Tensor]:
    """The CPU tensors a scan writes (scores are masked in place, lse_out and the state updated)."""
    return [t for t in (args["scores"], args["lse_out"], *args["state"])
            if isinstance(t, torch.Tensor) and t.device.type == "cpu"]


@pytest.mark.parametrize("changes,error,message", [c[1:] for c in _BAD_SCANS], ids=[c[0] for c in _BAD_SCANS])
def test_a_bad_scan_argument_is_named_before_anything_is_written(changes, error, message):
    args = _changed(_scan_args(), **changes)
    before = [t.clone() for t in _written(args)]
    with pytest.raises(error, match=message):
        native_scan.scan_chunk(**args)
    assert all(torch.equal(old, new) for old, new in zip(before, _written(args)))
    valid = _scan_args()  # the unchanged arguments do scan: the case is not refused for another reason
    native_scan.scan_chunk(**valid)
    assert not torch.equal(valid["lse_out"], torch.full_like(valid["lse_out"], 5.0))


def test_the_other_entry_points_check_their_arguments():
    b, n, d, bs = 3, 32, 4, 8
    q, rows = torch.randn(b, d), torch.randn(n, d)
    packed, args = native_scan.pack_queries(q), _scan_args(b, n, bs)
    fused = dict(packed=packed, b=b, rows=rows, block=bs, lse_out=args["lse_out"], masks=args["masks"],
                 state=args["state"], first_block=0, row0=0)
    with pytest.raises(ValueError, match=r"packed must have shape \[\d+\], got \[\d+\]"):
        native_scan.fused_scan(**{**fused, "b": 40})
    with pytest.raises(TypeError, match="rows must have dtype torch.float32, got torch.float16"):
        native_scan.fused_scan(**{**fused, "rows": rows.half()})
    with pytest.raises(ValueError, match="rows has 30 rows of scores, not a multiple of block=8"):
        native_scan.fused_scan(**{**fused, "rows": rows[:30], "masks": native_scan.ChunkMasks()})
    best_val, best_row = torch.full((b, 2), NEG_INF), torch.full((b, 2), -1, dtype=torch.int64)
    topk = dict(packed=packed, b=b, rows=rows, tile=16, best_val=best_val, best_row=best_row,
                masks=native_scan.ChunkMasks(), row0=0)
    with pytest.raises(TypeError, match="best_row must have dtype torch.int64, got torch.int32"):
        native_scan.fused_topk(**{**topk, "best_row": best_row.int()})
    with pytest.raises(ValueError, match="best_val must be contiguous"):
        native_scan.fused_topk(**{**topk, "best_val": torch.full((2, b), NEG_INF).t()})
    with pytest.raises(ValueError, match="tile must be >= 1, got 0"):
        native_scan.fused_topk(**{**topk, "tile": 0})
    p = 5
    pick = [torch.zeros(p, 4), torch.zeros(p), torch.zeros(p), torch.zeros(p), torch.zeros(p, dtype=torch.int64)]
    with pytest.raises(ValueError, match=r"u must have shape \[5\], got \[4\]"):
        native_scan.pick(pick[0], pick[1], torch.zeros(4), *pick[3:])
    with pytest.raises(TypeError, match="x must have dtype torch.float32, got torch.float64"):
        native_scan.row_lse(torch.zeros(2, 3, dtype=torch.float64))  # read as float32 before: garbage, no error
    with pytest.raises(ValueError, match=r"key_base must be in \[0, 4294967295\], got 4294967296"):
        native_scan.draws(1 << 32, 0, 2, 2)
    with pytest.raises(TypeError, match="keys must be an integer torch.Tensor"):
        native_scan.gumbel(torch.zeros(3), torch.arange(3))
    with pytest.raises(TypeError, match="q must be a floating-point torch.Tensor"):
        native_scan.pack_queries(torch.ones(2, 3, dtype=torch.int64))
    assert torch.equal(best_val, torch.full((b, 2), NEG_INF))  # nothing written by the refused calls


def test_the_checks_hold_under_python_dash_O(built_cache):
    """The checks are not asserts: ``python -O`` (which strips asserts) raises the same error."""
    code = ("import torch\nfrom sharded_negcache import native_scan\nassert False, 'asserts are on'\n"
            "print('available', native_scan.available(torch.device('cpu')))\n"
            "try:\n    native_scan.row_lse(torch.zeros(2, 3, dtype=torch.float64))\n"
            "except TypeError as e:\n    print('raised', e)\n")
    proc = subprocess.run([sys.executable, "-O", "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), "SHARDED_NEGCACHE_CACHE_DIR": str(built_cache)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "available True" in proc.stdout and "raised x must have dtype torch.float32" in proc.stdout


def test_the_ctypes_signatures_match_the_declarations_in_the_source(tmp_path):
    from sharded_negcache.build import source_signatures

    assert source_signatures() == native_scan.SIGNATURES
    # the parser sees a change: a renamed parameter and a widened one
    changed = native_scan.SOURCE.read_text().replace("int64_t row_offset, int nthreads",
                                                     "int64_t offset, int64_t nthreads")
    (tmp_path / "scan.cpp").write_text(changed)
    _, params = source_signatures(tmp_path / "scan.cpp")["negcache_pick"]
    assert params[-2:] == [("offset", __import__("ctypes").c_int64), ("nthreads", __import__("ctypes").c_int64)]


def test_build_info_reports_what_was_built_and_loaded():
    info = native_scan.build_info()
    assert set(info) == {"enabled", "loaded", "failed", "reason", "compiler", "compiler_version", "flags", "variant",
                         "path", "build_id", "built", "load_s"}
    assert info["loaded"] is True and info["failed"] is False and info["reason"] is None
    assert Path(info["path"]).is_file() and Path(info["path"]).name.startswith("scan-")
    assert info["compiler_version"].splitlines()[0] == info["compiler_version"]
    assert f"-march={os.environ.get(native_scan.ENV_ARCH) or 'native'}" in info["flags"].split()
    lanes = {"avx512": 16, "avx": 8, "generic": 4}[info["variant"].split(":")[0]]
    assert native_scan.pack_queries(torch.ones(1, 1)).numel() == 2 * lanes  # one group of two vectors
    assert int(info["build_id"], 16) > 0


# ---- python -m sharded_negcache.build --------------------------------------------------------------------
def _cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sharded_negcache.build", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO), **env})


def _report(out: str) -> dict[str, str]:
    """The report's ``label ..... value`` lines as a dict."""
    return {label: value for label, value in (line.split(" .", 1) for line in out.splitlines() if " .." in line)
            for value in [value.lstrip(". ")]}


def test_the_build_command_builds_checks_and_reports(tmp_path):
    env = {"SHARDED_NEGCACHE_CACHE_DIR": str(tmp_path)}
    first = _cli(env)
    assert first.returncode == 0, first.stdout + first.stderr
    report = _report(first.stdout)
    lib = _built(tmp_path)
    assert report["library"].startswith(f"{lib} (built now in ")
    assert report["self-check"].startswith("ok: ")
    assert report["auto backend on CPU"] == "native (CPU device and the C++ kernel loaded)"
    assert report["torch"].startswith(torch.__version__) and report["$SHARDED_NEGCACHE_CACHE_DIR"] == str(tmp_path)
    assert report["compiler"].startswith(shutil.which("g++")) and "-march=" in report["flags"]
    assert report["triton"].startswith("not installed") or report["triton"][0].isdigit()
    stamp = lib.stat().st_mtime_ns
    again = _cli(env, "--rebuild")
    assert again.returncode == 0 and "WARNING" not in again.stderr, again.stdout + again.stderr
    assert _report(again.stdout)["library"].startswith(f"{lib} (built now in ") and lib.stat().st_mtime_ns != stamp


def test_the_build_command_fails_with_the_reason_and_the_fix_where_it_cannot_build(tmp_path):
    proc = _cli({"SHARDED_NEGCACHE_CACHE_DIR": str(tmp_path), "CXX": str(tmp_path / "no-such-compiler")})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = _report(proc.stdout)
    assert report["library"].startswith("NOT AVAILABLE: the native CPU scan kernel is unavailable: no compiler: ")
    assert "no-such-compiler" in report["library"]
    assert "Fix: set CXX to an installed C++17 compiler" in report["library"]
    assert report["compiler"] == "none found"
    assert report["auto backend on CPU"] == "torch (the C++ kernel did not build or load (see the warning))"
    assert not list(tmp_path.glob("scan-*.so"))


@pytest.mark.parametrize("bs", [1, 4, 17, 256])
def test_stage_two_pick_against_the_inverse_cdf_of_the_torch_path(bs):
    from sharded_negcache.scoring import pick_in_block

    g = torch.Generator().manual_seed(bs)
    a = torch.randn(3000, bs, generator=g) * 4
    a[a < -5] = NEG_INF
    a[:, 0] = torch.where(torch.isinf(a).all(1), 0.5, a[:, 0])  # a winning block always has mass
    lse = torch.logsumexp(a, 1)
    u = torch.rand(3000, generator=g)
    u[:5] = torch.tensor([0.0, 1.0, 0.5, 1 - 2**-24, 2**-25])
    key = torch.randn(3000, generator=g)
    key[7] = NEG_INF  # not found: its row stays
    row = torch.full((3000,), 100, dtype=torch.int64)
    native_scan.pick(a, lse, u, key, row, row_offset=5000)
    want = 5100 + pick_in_block(a, lse, u)
    assert row[7].item() == -1  # nothing found: -1, as the partials carry it
    found = torch.isfinite(key)
    # the same row unless u * total falls within the weights' error of a step of the CDF (none here)
    assert torch.equal(row[found], want[found])
    assert bool(torch.isfinite(a.gather(1, (row - 5100).clamp(0, bs - 1)[:, None]))[found].all())  # never a row without mass


def test_row_lse_against_logsumexp():
    x = torch.randn(50, 300) * 6
    x[3] = NEG_INF
    x[4, 5] = NAN
    got, want = native_scan.row_lse(x), torch.logsumexp(x.double(), 1)
    ok = torch.isfinite(want)
    torch.testing.assert_close(got.double()[ok], want[ok], rtol=0, atol=LSE_ABS)
    assert got[3].item() == NEG_INF and got[4].isnan()


@pytest.mark.skipif(__import__("platform").machine() not in ("x86_64", "AMD64"), reason="x86 -march levels")
@pytest.mark.heavy
@pytest.mark.parametrize("arch", ["x86-64-v3", "x86-64"], ids=["avx2", "sse2"])
def test_narrower_builds_pass_the_same_checks(arch, tmp_path):
    """The kernel's 8-lane (AVX2) and 4-lane (SSE2) builds, which an AVX-512 machine does not otherwise run,
    against the same references (this file's value tests, in a subprocess with that build)."""
    env = {**os.environ, native_scan.ENV_ARCH: arch, "SHARDED_NEGCACHE_CACHE_DIR": str(tmp_path), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
         "not narrower and not built_once and not compile_once and not without_a_compiler and not damaged "
         "and not unwritable and not gcc and not failing_compiler and not dash_O and not build_command"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert len(list(tmp_path.glob("scan-*.so"))) == 1  # that build, not the machine's default one


def test_draw_keys_and_uniforms_are_bit_identical_to_keyed_random():
    for seed, step, b, m in ((0, 0, 1, 1), (7, 123456789, 37, 5), (2**31 + 5, 2**40 + 3, 512, 2)):
        keys, u = native_scan.draws(keyed_random.stream_base(seed, step, Stream.BLOCK_GUMBEL),
                                    keyed_random.stream_base(seed, step, Stream.ROW_UNIFORM), b, m)
        pos = torch.arange(b)
        assert torch.equal(keys, keyed_random.draw_keys(seed, step, Stream.BLOCK_GUMBEL, pos, m))
        assert torch.equal(u, keyed_random.uniform(keyed_random.draw_keys(seed, step, Stream.ROW_UNIFORM, pos, m)))


def test_a_chunk_of_millions_of_blocks_is_scanned_without_stack_buffers():
    """One query against 2^22 one-row blocks (the per-chunk block hashes once lived on the stack: 16 MB)."""
    n = 1 << 22
    s = torch.randn(1, n)
    keys = keyed_random.draw_keys(0, 0, Stream.BLOCK_GUMBEL, torch.arange(1), 1)
    _, lse, key, row, _, _, changed = _scan(s, 1, keys=keys)
    assert torch.equal(lse, s) and changed == 1  # a one-row block's LSE is its score
    want = (keyed_random.gumbel(keys, torch.arange(n) + 40).view(-1) + s.view(-1)).argmax()
    assert row.item() == 1000 + int(want)


def test_int32_document_ids_are_masked_in_the_kernel_as_int64_ones(monkeypatch):
    """doc ids may be int32 (CacheSchema): the kernel masks them too (no [B, chunk] torch compare per chunk),
    with the same samples as int64 ids and never the query's own positive."""
    from engine_cases import Tower, global_cache, specs
    from sharded_negcache import FieldSpec, ShardedCacheLossHandler, scoring

    torch_masks = []
    monkeypatch.setattr(scoring, "mask_chunk", lambda *a, **k: torch_masks.append(a))
    tower, got = Tower(), {}
    for dtype in (torch.int64, torch.int32):
        sp = specs(with_ids=True)
        sp["doc_id"] = FieldSpec((1,), dtype)
        h = ShardedCacheLossHandler(sp, 48, "embedding", ("x",), doc_id_key="doc_id", score_transform=3.0,
                                    block_size=4, num_negatives=3)
        rows = global_cache(48, tower, with_ids=True)
        rows["doc_id"] = rows["doc_id"].to(dtype)
        h.load_global_rows(rows)
        ids = torch.randint(0, 12, (7,), generator=torch.Generator().manual_seed(5)).to(dtype)
        q = torch.randn(7, 8, generator=torch.Generator().manual_seed(6))
        got[dtype] = scoring.score_shard(h.store, h.layout, q, h.score_fn, num_draws=3, top_k=None, seed=4, step=2,
                                         chunk_rows=16, exclude_key="doc_id", exclude_ids=ids)
        own = h.store.feature("doc_id").reshape(-1)[got[dtype].win_row]
        assert bool((own != ids[:, None]).all())  # never the query's own positive
    assert not torch_masks
    assert torch.equal(got[torch.int64].win_row, got[torch.int32].win_row)
    assert torch.equal(got[torch.int64].lse, got[torch.int32].lse)


# ---- the fused scan: product and scan in one pass (no score chunk) ----------------------------------------
def _fused(q, rows, bs, *, keys=None, filled=None, row_ids=None, excl=None, best=None, threads=None, first_block=40):
    """One fused_scan call of queries ``q`` [b, d] against ``rows`` [n, d]; returns (lse, best_key, best_row,
    win_scores, win_lse, improvements)."""
    b, n = q.shape[0], rows.shape[0]
    lse, state = torch.full((b, n // bs), 123.0), _state(b, bs, keys, best)
    with _threads(threads):
        improved = native_scan.fused_scan(native_scan.pack_queries(q), b, rows, bs, lse, _masks(filled, row_ids, excl),
                                          state, first_block=first_block, row0=1000)
    return lse, state.best_key, state.best_row, state.win_scores, state.win_lse, improved


def _product_bound(q, rows):
    """|fp32 sequential dot product - exact| <= d 2^-24 sum_k |q_k r_k| (+ the LSE's own bound)."""
    return q.shape[1] * 2.0**-24 * (q.double().abs() @ rows.double().abs().t()) + LSE_ABS


@pytest.mark.parametrize("b,d,bs", [(1, 1, 1), (5, 3, 5), (31, 16, 12), (33, 128, 13), (70, 20, 64)])
def test_fused_block_lse_against_float64_for_ragged_sizes(b, d, bs):
    """Batch not a multiple of the query group, blocks not a multiple of the row tile, any width."""
    g = torch.Generator().manual_seed(b * 1000 + d * 10 + bs)
    q, rows = torch.randn(b, d, generator=g), torch.randn(bs * 5, d, generator=g)
    got = _fused(q, rows, bs)[0]
    exact = q.double() @ rows.double().t()
    want = block_lse(exact, bs)
    tol = _product_bound(q, rows).view(b, -1, bs).amax(-1)
    assert bool(((got.double() - want).abs() <= tol).all()), float(((got.double() - want).abs() / tol).max())


def test_fused_scores_depend_on_neither_the_chunk_nor_the_query_lane():
    """Each score is one fixed chain of fused multiply-adds: permuting the queries (other lanes, other groups)
    or scanning the rows in other chunks gives the same bits (world-size independence rests on it)."""
    g = torch.Generator().manual_seed(4)
    b, d, bs = 45, 37, 8
    q, rows = torch.randn(b, d, generator=g) * 3, torch.randn(bs * 12, d, generator=g)
    whole = _fused(q, rows, bs)[0]
    perm = torch.randperm(b, generator=g)
    assert torch.equal(_fused(q[perm], rows, bs)[0], whole[perm])
    parts = [_fused(q, rows[lo:hi], bs)[0] for lo, hi in ((0, 3 * bs), (3 * bs, 4 * bs), (4 * bs, 12 * bs))]
    assert torch.equal(torch.cat(parts, 1), whole)


def test_fused_scan_masks_empty_rows_and_each_querys_own_positive():
    g = torch.Generator().manual_seed(3)
    b, n, bs, d = 40, 64, 16, 8
    q, rows = torch.randn(b, d, generator=g), torch.randn(n, d, generator=g)
    filled = torch.ones(n, dtype=torch.bool)
    filled[[0, 5, 33]] = False
    filled[48:64] = False  # a whole empty block
    row_ids = torch.randint(0, 10, (n,), generator=g)
    excl = torch.randint(0, 12, (b,), generator=g)  # queries share ids; some ids are in no row
    keys = keyed_random.draw_keys(3, 1, Stream.BLOCK_GUMBEL, torch.arange(b), 2)
    lse, key, row, win_scores, _, _ = _fused(q, rows, bs, keys=keys, filled=filled, row_ids=row_ids, excl=excl)
    masked = (q.double() @ rows.double().t()).masked_fill(~filled[None, :], NEG_INF)
    masked = masked.masked_fill(row_ids[None, :] == excl[:, None], NEG_INF)
    want = block_lse(masked, bs)
    assert bool((lse[:, 3] == NEG_INF).all())
    ok = torch.isfinite(want)
    assert torch.equal(ok, torch.isfinite(lse))
    torch.testing.assert_close(lse.double()[ok], want[ok], rtol=0, atol=1e-5)
    # a winner's copied block is -inf exactly where the mask is
    for p in range(b * 2):
        qi, blk = p // 2, (int(row.view(-1)[p]) - 1000) // bs
        assert torch.equal(torch.isinf(win_scores[p]), torch.isinf(masked[qi, blk * bs : (blk + 1) * bs]))
    # a chunk without a single value: no LSE, no winner (an empty block never beats a -inf best)
    lse, key, row, _, _, improved = _fused(q, rows, bs, keys=keys, filled=torch.zeros(n, dtype=torch.bool))
    assert bool((lse == NEG_INF).all()) and bool((key == NEG_INF).all()) and bool((row == -1).all()) and improved == 0


def test_fused_scan_propagates_nan_and_inf_like_the_eager_ops():
    g = torch.Generator().manual_seed(8)
    q, rows = torch.randn(6, 4, generator=g), torch.rand(32, 4, generator=g) + 0.5  # positive rows
    q[0, 1] = NAN
    q[1, 2] = INF  # every score +inf
    q[2, 0], q[2, 1] = INF, -INF  # inf - inf: NaN
    rows[5, 3] = INF  # one row: +inf or -inf or NaN with the rest
    got = _fused(q, rows, 8)[0]
    want = block_lse(q.double() @ rows.double().t(), 8)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    assert torch.equal(got[got.isinf()].double(), want[want.isinf()])


@pytest.mark.parametrize("threads", [1, 2])
def test_fused_stage_one_and_the_winners_copies_against_torch(threads):
    g = torch.Generator().manual_seed(9)
    b, m, bs, nblk, d = 70, 3, 24, 9, 16
    q, rows = torch.randn(b, d, generator=g) * 0.7, torch.randn(nblk * bs, d, generator=g)
    filled = torch.ones(nblk * bs, dtype=torch.bool)
    filled[: 3 * bs] = False  # three empty blocks
    keys = keyed_random.draw_keys(2, 8, Stream.BLOCK_GUMBEL, torch.arange(b), m)
    best_key = torch.randn(b, m, generator=g) * 2 + 6  # earlier chunks' winners; some are not beaten
    best_row = torch.randint(0, 900, (b, m), generator=g)
    lse, got_key, got_row, win_scores, win_lse, _ = _fused(q, rows, bs, keys=keys, filled=filled,
                                                           best=(best_key, best_row), threads=threads)
    key, blk, better = _stage1_reference(lse, keys, 40, best_key)
    all_keys = keyed_random.gumbel(keys, torch.arange(nblk) + 40) + lse.unsqueeze(1)
    top2 = all_keys.topk(2, dim=-1).values
    clear = ((top2[..., 0] - top2[..., 1]).abs() > 1e-4) & ((key - best_key).abs() > 1e-4)
    assert int(clear.sum()) > 0.9 * b * m and 0 < int(better.sum()) < b * m
    assert torch.equal((got_key != best_key)[clear], better[clear])
    won = better & clear
    assert torch.equal(got_row[won], 1000 + blk[won] * bs)
    torch.testing.assert_close(got_key[won].double(), key[won], rtol=0, atol=GUMBEL_ABS + LSE_ABS)
    assert torch.equal(got_row[~better & clear], best_row[~better & clear])
    exact = q.double() @ rows.double().t()
    tol = _product_bound(q, rows)
    for qi, ti in won.nonzero().tolist():
        slot, lo = qi * m + ti, int(blk[qi, ti]) * bs
        assert bool(((win_scores[slot].double() - exact[qi, lo : lo + bs]).abs() <= tol[qi, lo : lo + bs]).all())
        assert win_lse[slot].item() == lse[qi, int(blk[qi, ti])].item()


@pytest.mark.parametrize("b,threads", [(130, 2), (20, 2), (20, 3), (40, 4)],
                         ids=["groups-per-thread", "one-group-two-ranges", "one-group-three-ranges", "two-groups-four"])
def test_fused_results_do_not_depend_on_the_thread_count(b, threads):
    """With fewer query groups (32 queries) than threads, each group's blocks are split into ranges scanned
    apart and merged in block order: the same LSEs, winners and copies as one thread."""
    g = torch.Generator().manual_seed(1)
    q, rows = torch.randn(b, 24, generator=g), torch.randn(512, 24, generator=g)
    keys = keyed_random.draw_keys(0, 0, Stream.BLOCK_GUMBEL, torch.arange(b), 2)
    best = (torch.full((b, 2), NEG_INF), torch.full((b, 2), -1, dtype=torch.int64))
    best[0][0, 0] = 50.0  # an earlier chunk's winner that no block beats
    one, many = _fused(q, rows, 16, keys=keys, threads=1, best=best), _fused(q, rows, 16, keys=keys, threads=threads, best=best)
    for a, c in zip(one[:5], many[:5]):
        assert torch.equal(a, c)
    assert one[2][0, 0].item() == -1 and one[1][0, 0].item() == 50.0


# ---- the fused top-k (top_k mode on CPU with a float scale) ------------------------------------------------
def _fused_topk(q, rows, k, *, tile=192, filled=None, row_ids=None, excl=None, threads=None, best=None):
    """One fused_topk call; returns (values, rows) sorted by value, descending."""
    b = q.shape[0]
    val = best[0].clone() if best else torch.full((b, k), NEG_INF)
    row = best[1].clone() if best else torch.full((b, k), -1, dtype=torch.int64)
    with _threads(threads):
        native_scan.fused_topk(native_scan.pack_queries(q), b, rows, tile, val, row, _masks(filled, row_ids, excl),
                               row0=1000)
    val, order = val.sort(dim=1, descending=True)
    return val, row.gather(1, order)


@pytest.mark.parametrize("b,d,n,k,tile", [(1, 3, 7, 1, 192), (33, 16, 500, 5, 12), (70, 20, 1000, 64, 192),
                                          (5, 128, 300, 400, 13)])
def test_fused_topk_against_a_dense_float64_reference(b, d, n, k, tile):
    """Values within the product's bound of the exact top-k; the same set of rows wherever the k-th and the
    next value are farther apart than twice the bound; k above the candidates pads with -inf / -1."""
    g = torch.Generator().manual_seed(b * 7 + k)
    q, rows = torch.randn(b, d, generator=g), torch.randn(n, d, generator=g)
    filled = torch.rand(n, generator=g) > 0.1
    got_val, got_row = _fused_topk(q, rows, k, tile=tile, filled=filled)
    exact = (q.double() @ rows.double().t()).masked_fill(~filled[None, :], NEG_INF)
    kk = min(k, n)
    ref_val, ref_row = exact.topk(kk, dim=1)
    tol = _product_bound(q, rows).amax(1, keepdim=True)
    finite = torch.isfinite(ref_val)
    assert torch.equal(torch.isfinite(got_val[:, :kk]), finite)
    assert bool(((got_val[:, :kk].double() - ref_val).abs() <= tol)[finite].all())
    assert bool((got_val[:, kk:] == NEG_INF).all()) and bool((got_row[:, kk:] == -1).all())
    assert bool((got_row[:, :kk][~finite] == -1).all())
    if kk == n:  # every candidate is in
        clear = torch.ones(b, dtype=torch.bool)
    else:
        clear = (ref_val[:, -1] - exact.topk(kk + 1, dim=1).values[:, -1]) > 2 * tol.squeeze(1)
    assert int(clear.sum()) >= 0.8 * b
    for i in clear.nonzero().view(-1).tolist():
        want = sorted((ref_row[i][finite[i]] + 1000).tolist())
        assert sorted(got_row[i][got_row[i] >= 0].tolist()) == want


@pytest.mark.parametrize("b,threads,k", [(40, 1, 3), (40, 4, 3), (20, 3, 3), (20, 3, 30)])
def test_fused_topk_masks_the_querys_own_positive_and_keeps_the_earlier_row_on_ties(b, threads, k):
    """Also with the tiles split into ranges (fewer query groups than threads; k = 30 spills past the first
    range, whose candidates must then be taken in row order): ties keep the earlier row."""
    g = torch.Generator().manual_seed(2)
    d, n = 8, 96
    q = torch.randn(b, d, generator=g)
    rows = torch.randn(1, d, generator=g).expand(n, d).contiguous()  # every row the same: all scores tie
    row_ids = torch.arange(n) % 7
    excl = torch.randint(0, 9, (b,), generator=g)
    val, row = _fused_topk(q, rows, k, tile=12, row_ids=row_ids, excl=excl, threads=threads)
    for i in range(b):  # the k earliest rows whose id is not the query's own
        want = [r for r in range(n) if int(row_ids[r]) != int(excl[i])][:k]
        assert sorted(row[i].tolist()) == [1000 + r for r in want]
        assert len(set(val[i].tolist())) == 1
    # a second chunk whose rows tie with the first: the first chunk's rows stay
    again = _fused_topk(q, rows, k, tile=12, row_ids=row_ids, excl=excl, best=(val, row), threads=threads)
    assert torch.equal(again[1].sort(1).values, row.sort(1).values)


@pytest.mark.parametrize("b", [130, 20])
def test_fused_topk_does_not_depend_on_the_thread_count_or_the_tile(b):
    g = torch.Generator().manual_seed(6)
    q, rows = torch.randn(b, 24, generator=g), torch.randn(700, 24, generator=g)
    one = _fused_topk(q, rows, 9, threads=1)
    for got in (_fused_topk(q, rows, 9, threads=2), _fused_topk(q, rows, 9, threads=4), _fused_topk(q, rows, 9, tile=12)):
        assert torch.equal(got[0], one[0]) and torch.equal(got[1], one[1])


def test_topk_mode_through_score_shard_matches_the_torch_path(monkeypatch):
    """score_shard in top-k mode: the fused kernel (one call for fp32 rows) against the torch chunks."""
    from engine_cases import Tower, global_cache, make_handler
    from sharded_negcache.scoring import score_shard

    tower = Tower()
    h = make_handler(48, with_ids=True, num_negatives=2, top_k=4)
    h.load_global_rows(global_cache(48, tower, with_ids=True))
    q = torch.randn(9, 8, generator=torch.Generator().manual_seed(3))
    ids = h.store.feature("doc_id")[torch.arange(9) * 5].reshape(-1)  # ids of filled and empty rows
    run = lambda: score_shard(h.store, h.layout, q, h.score_fn, num_draws=2, top_k=4, seed=1, step=1,  # noqa: E731
                              chunk_rows=16, exclude_key=h.schema.doc_id_key, exclude_ids=ids)
    native = run()
    monkeypatch.setenv(native_scan.ENV_NATIVE, "0")
    torch_path = run()
    torch.testing.assert_close(native.topk_val, torch_path.topk_val, rtol=0, atol=1e-5)
    assert torch.equal(native.topk_row.sort(1).values, torch_path.topk_row.sort(1).values)
