"""``python -m sharded_negcache.build``: builds (``--rebuild``: even when a built library is cached) and loads the
native CPU scan kernel, checks it against torch ops on tiny inputs, and prints a report as DeepSpeed's
``ds_report`` does: torch, the compiler and its version, the CPU's vector features, the library, the backend
``scoring_backend="auto"`` picks on CPU and why, and whether triton is there.

Run it once per machine (an image build, a job's setup) so no training process compiles, or to see why the
kernel does not build. Exit status: 0 ready; 1 the kernel cannot be built or loaded here (the report says
why and how to fix it); 2 it loaded but disagrees with the torch ops.
"""
from __future__ import annotations

import argparse
import ctypes
import importlib.metadata
import importlib.util
import os
import platform
import re
import sys
from pathlib import Path
from typing import Any

import torch

from . import keyed_random, native_scan
from .keyed_random import Stream
from .scoring import block_lse, make_score_fn, resolve_backend

__all__ = ["source_signatures", "self_check", "report", "main"]

# the CPU features the kernel's width depends on (x86: -march levels; Arm: NEON / SVE)
VECTOR_FEATURES = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "amx_tile",
                   "asimd", "sve")

_C_TYPES = {"int64_t": ctypes.c_int64, "uint64_t": ctypes.c_uint64, "uint32_t": ctypes.c_uint32, "int": ctypes.c_int,
            "void": None}


def _ctype(declared: str) -> Any:
    declared = declared.replace("const ", "").strip()
    if declared == "char*":
        return ctypes.c_char_p
    return ctypes.c_void_p if declared.endswith("*") else _C_TYPES[declared]


def source_signatures(source: Path = native_scan.SOURCE) -> dict[str, tuple[Any, list[tuple[str, Any]]]]:
    """The ``extern "C"`` entry points declared in ``source`` as native_scan.SIGNATURES spells them: (result
    type, [(parameter, ctypes type)]). Pointers of any type are ``c_void_p`` (tensors' data pointers)."""
    text = source.read_text()
    text = text[text.index('extern "C" {'):]
    found = {}
    for result, name, params in re.findall(r"^([\w ]+?\*?)\s*\b(negcache_\w+)\(([^)]*)\)\s*\{", text, re.M | re.S):
        parsed = []
        for param in filter(None, (p.strip() for p in params.split(","))):
            declared, pname = re.match(r"(.*?[\s*])(\w+)$", " ".join(param.split())).groups()
            parsed.append((pname, _ctype(declared.replace(" *", "*"))))
        found[name] = (_ctype(result.replace(" *", "*")), parsed)
    return found


def _close(name: str, got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float = 0.0) -> str | None:
    err = (got.double() - want.double()).abs()
    bound = atol + rtol * want.double().abs()
    same_inf = torch.equal(got.isinf(), want.isinf()) and torch.equal(got[got.isinf()], want[want.isinf()].float())
    finite = torch.isfinite(want)
    if same_inf and bool((err[finite] <= bound[finite]).all()):
        return None
    return f"{name}: differs from the torch ops by up to {float(err[finite].max()):.3g} (bound {atol:g} + {rtol:g}|x|)"


def self_check() -> list[str]:
    """Each entry point on tiny inputs against torch ops (float64 references, the bounds of the kernel's tests):
    the failures, empty when all agree. Needs the kernel loaded."""
    failures: list[str | None] = []
    if source_signatures() != native_scan.SIGNATURES:
        failures.append("native_scan.SIGNATURES does not match the declarations in csrc/scan.cpp")
    g = torch.Generator().manual_seed(0)
    x = -torch.rand(4096, generator=g) * 30
    failures.append(_close("exp", native_scan.exp_nonpositive(x), torch.exp(x.double()), 0.0, 2e-7 + 7e-8 * 30))
    seed, step, b, m = 7, 3, 5, 2
    keys, u = native_scan.draws(keyed_random.stream_base(seed, step, Stream.BLOCK_GUMBEL),
                                keyed_random.stream_base(seed, step, Stream.ROW_UNIFORM), b, m)
    want_keys = keyed_random.draw_keys(seed, step, Stream.BLOCK_GUMBEL, torch.arange(b), m)
    want_u = keyed_random.uniform(keyed_random.draw_keys(seed, step, Stream.ROW_UNIFORM, torch.arange(b), m))
    if not (torch.equal(keys, want_keys) and torch.equal(u, want_u)):
        failures.append("draws: keys or uniforms differ from keyed_random (they must be bit-identical)")
    items = torch.arange(40) * 7919
    failures.append(_close("gumbel", native_scan.gumbel(keys, items), keyed_random.gumbel(keys, items).view(b * m, -1),
                           4e-6))
    bs, n, d = 8, 64, 16
    q, rows = torch.randn(b, d, generator=g), torch.randn(n, d, generator=g)
    filled = torch.rand(n, generator=g) > 0.2
    masks = native_scan.ChunkMasks(filled=filled)
    scores = (q.double() @ rows.double().t()).masked_fill(~filled, float("-inf"))
    want = block_lse(scores, bs)
    lse = torch.empty(b, n // bs)
    state = native_scan.Stage1(keys, torch.full((b, m), float("-inf")), torch.full((b, m), -1, dtype=torch.int64))
    native_scan.scan_chunk((q @ rows.t()).contiguous(), bs, lse, masks, state, first_block=0, row0=0)
    failures.append(_close("block LSE (scan_chunk)", lse, want, 2e-5))
    fused = torch.empty(b, n // bs)
    state = native_scan.Stage1(keys, torch.full((b, m), float("-inf")), torch.full((b, m), -1, dtype=torch.int64))
    native_scan.fused_scan(native_scan.pack_queries(q), b, rows, bs, fused, masks, state, first_block=0, row0=0)
    failures.append(_close("block LSE (fused_scan)", fused, want, 2e-5))
    failures.append(_close("row LSE", native_scan.row_lse(want.float()), torch.logsumexp(want, dim=1), 2e-6))
    k = 3
    best_val, best_row = torch.full((b, k), float("-inf")), torch.full((b, k), -1, dtype=torch.int64)
    qi, ri = q.round(), rows.round()  # integer scores: exact in float32, ties broken by the lower row
    native_scan.fused_topk(native_scan.pack_queries(qi), b, ri, 16, best_val, best_row, masks, row0=0)
    exact = (qi.double() @ ri.double().t()).masked_fill(~filled, float("-inf"))
    want_rows = [sorted(range(n), key=lambda j: (-float(exact[i, j]), j))[:k] for i in range(b)]
    got_rows = [sorted(zip((-best_val[i]).tolist(), best_row[i].tolist())) for i in range(b)]
    if [[r for _, r in row] for row in got_rows] != want_rows:
        failures.append("top-k (fused_topk): rows differ from a sort of the exact scores")
    return [f for f in failures if f]


def _backend_on_cpu() -> str:
    backend, why = resolve_backend("auto", torch.device("cpu"), make_score_fn(None), None)
    return f"{backend} ({why})"


def _triton() -> str:
    if importlib.util.find_spec("triton") is None:
        return "not installed (the CUDA backend needs it)"
    try:
        version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        version = "version unknown"
    cuda = f"CUDA device {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no CUDA device"
    return f"{version} ({cuda})"


def report(rebuild: bool = False) -> tuple[list[tuple[str, str]], int]:
    """Builds (or rebuilds) and loads the kernel, checks it; returns the report's (label, value) lines and the
    exit status (0 ready, 1 not buildable or loadable here, 2 disagreeing with the torch ops)."""
    loaded = native_scan.load(rebuild=rebuild)
    info = native_scan.build_info()
    features = [f for f in VECTOR_FEATURES if f in set(native_scan.cpu_flags())]
    lines = [
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("torch", f"{torch.__version__} ({torch.get_num_threads()} CPU threads)"),
        ("platform", f"{platform.system()} {platform.machine()}"),
        ("CPU vector features", " ".join(features) or "none of " + " ".join(VECTOR_FEATURES)),
        ("compiler", f"{info['compiler']} ({info['compiler_version']})" if info["compiler"] else "none found"),
        ("flags", info["flags"]),
        ("cache directories", " then ".join(str(p) for p in native_scan.cache_dirs())),
    ]
    for env in (native_scan.ENV_NATIVE, native_scan.ENV_ARCH, native_scan.ENV_CACHE_DIR, "CXX"):
        lines.append((f"${env}", os.environ.get(env, "(unset)")))
    status = 0
    if loaded:
        how = "built now" if info["built"] else "loaded from the cache"
        lines += [("library", f"{info['path']} ({how} in {info['load_s']:.2f} s; build id {info['build_id']})"),
                  ("variant", info["variant"])]
        failures = self_check()
        lines.append(("self-check", "ok: exp, draws, Gumbel, block LSE (scan and fused), row LSE, top-k agree with "
                      "the torch ops" if not failures else "FAILED: " + "; ".join(failures)))
        status = 2 if failures else 0
    else:
        lines.append(("library", f"NOT AVAILABLE: {info['reason']}"))
        status = 1
    lines += [("auto backend on CPU", _backend_on_cpu()), ("triton", _triton())]
    return lines, status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sharded_negcache.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rebuild", action="store_true", help="compile even when a built library is cached")
    args = parser.parse_args(argv)
    lines, status = report(rebuild=args.rebuild)
    width = max(len(label) for label, _ in lines) + 2
    print("sharded_negcache native CPU kernel report")
    print("-" * 42)
    for label, value in lines:
        print(f"{label} {'.' * (width - len(label))} {value}")
    return status


if __name__ == "__main__":
    sys.exit(main())
