"""Every Triton kernel variant the engine launches, compiled for an H100 (sm_90a) and an A100 (sm_80) on this
CPU with triton's bundled ``ptxas``: what the interpreter never shows.

Each variant is built from the arguments the engine itself passes (``triton_scan.lse_launch`` /
``pick_launch`` on small CPU tensors of the codec: same dtypes, strides' alignment, compile-time
arguments, warps and stages) and asserted to: compile; spill no register; run bf16/fp16/int8/int4
products on tensor cores (wgmma on sm_90, mma.sync on sm_80); use no TF32 anywhere (fp32 scores are
IEEE fp32); take every offset from a kernel argument in int64 (read from the TTGIR: rows x stride bytes
and B x blocks pass 2^31 on a 4M-row shard); copy int8/int4 rows in 8- / 4-byte pieces (fewer byte loads
than the same kernel addressing rows unaligned; the byte loads left are the ``filled`` flags).

The default run compiles a covering subset (~40 builds: every tile-table entry x decode path and stage 2
per codec at the default block size on sm_90, the block-size edge cases, sm_80 at d = 768; the vector
test at d = 768); compiled results are cached for the process (and by triton on disk). The whole
matrix (codec x kernel x exclusions x d in {64, 128, 384, 768, 1024} x block sizes {4, 16, 48, 64,
256} x {sm_90, sm_80}, 1000 variants, ~30 min on one core):
``NEGCACHE_COMPILE_MATRIX=full pytest tests/test_triton_compile.py``.
"""
from __future__ import annotations

import functools
import itertools
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from sharded_negcache import triton_scan as T  # noqa: E402
from sharded_negcache.codecs import make_codec  # noqa: E402

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
ARCH = {90: "sm_90a", 80: "sm_80"}
CODECS = ("fp32", "bf16", "fp16", "int8", "int4")
DIMS = (64, 128, 384, 768, 1024)
TRITON_TYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.uint8: "u8",
               torch.int64: "i64"}


@dataclass(frozen=True)
class Variant:
    kernel: str  # "lse" | "pick"
    codec: str
    dim: int
    bs: int
    excl: bool
    cc: int
    unaligned: bool = False  # rows addressed with ALIGN = 1 (triton then assumes byte alignment)

    def __str__(self) -> str:
        return f"{self.kernel}-{self.codec}-d{self.dim}-bs{self.bs}-{'excl' if self.excl else 'noexcl'}-sm{self.cc}"


@dataclass(frozen=True)
class Built:
    ptx: str
    ttgir: str
    ptxas: str  # ptxas -v report
    arg_names: tuple[str, ...]


def launch(v: Variant):
    """(kernel, arguments, compile-time arguments) as the engine launches them, on a tiny shard of ``v``."""
    fn, args, meta = _engine_launch(v)
    if v.unaligned:
        i = fn.arg_names.index("stride_row")
        args = args[:i] + (args[i] * meta["ALIGN"],) + args[i + 1:]
        meta = {**meta, "ALIGN": 1}
    return fn, args, meta


def _engine_launch(v: Variant):
    codec = make_codec(v.codec)
    n = 2 * v.bs
    stored = codec.encode(torch.randn(n, v.dim))
    ids = torch.arange(n) if v.excl else None
    rows = T.StoredRows.of(stored, v.codec, v.dim, torch.ones(n, dtype=torch.bool), ids)
    q, qids = torch.randn(3, v.dim), (torch.arange(3) if v.excl else None)
    if v.kernel == "lse":
        _, args, meta = T.lse_launch(q, rows, v.bs, qids, torch.empty(3, 2))
        return T.block_lse_kernel, args, meta
    blk = torch.zeros(3, 2, dtype=torch.int64)
    _, args, meta = T.pick_launch(q, rows, v.bs, blk, torch.zeros(3, 2), torch.rand(3, 2), qids,
                                  torch.empty(6, dtype=torch.int64))
    return T.pick_rows_kernel, args, meta


@functools.lru_cache(maxsize=None)
def build(v: Variant) -> Built:
    fn, args, meta = launch(v)
    meta = dict(meta)
    opts = dict(num_warps=meta.pop("num_warps"), num_stages=meta.pop("num_stages"))
    names = fn.arg_names
    sig, div = {}, []
    for name, a in zip(names, args):
        if isinstance(a, torch.Tensor):
            sig[name] = "*" + TRITON_TYPE[a.dtype]
            div.append(name)  # torch allocations are 16-byte aligned
        else:
            sig[name] = "i32"
            if name.startswith("stride") and a % 16 == 0:  # triton specialises such ints at launch
                div.append(name)
    sig.update({k: "constexpr" for k in meta})
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in div}
    ck = triton.compile(ASTSource(fn, sig, meta, attrs), target=GPUTarget("cuda", v.cc, 32), options=opts)
    ptx = ck.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        path.write_text(ptx)
        rep = subprocess.run([str(PTXAS), "-v", "--gpu-name", ARCH[v.cc], str(path), "-o", str(Path(tmp) / "k.o")],
                             capture_output=True, text=True, check=True)
    return Built(ptx, ck.asm["ttgir"], rep.stdout + rep.stderr, tuple(n for n in names if n not in meta))


FULL = os.environ.get("NEGCACHE_COMPILE_MATRIX") == "full"


def _variants() -> list[Variant]:
    if FULL:
        return [Variant(k, c, d, bs, e, cc) for k, c, d, bs, e, cc in itertools.product(
            ("lse", "pick"), CODECS, DIMS, (4, 16, 48, 64, 256), (False, True), (90, 80))]
    # every tile-table entry x decode path (fp16 shares bf16's but for the dtype: d = 768 only); stage 2 has one
    # shape per codec
    out = [Variant(k, c, d, 256, True, 90) for k in ("lse", "pick") for c in CODECS for d in DIMS
           if (k == "lse" and (c != "fp16" or d == 768)) or (k == "pick" and d == 768)]
    out += [Variant("lse", c, 768, 256, True, 80) for c in ("fp32", "bf16", "int8")]
    out += [Variant("pick", "bf16", 768, 256, True, 80)]
    out += [Variant("lse", "bf16", 768, bs, False, 90) for bs in (4, 16, 48)]  # rows per block < tile, ragged
    return out


VARIANTS = _variants()


def ptxas_resources(rep: str) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) of the one kernel in a ``ptxas -v`` report."""
    regs = re.search(r"Used (\d+) registers", rep)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", rep)
    assert regs and spill, rep
    return int(regs.group(1)), int(spill.group(1)), int(spill.group(2))


_ALIAS_OPS = ("tt.splat", "tt.broadcast", "tt.expand_dims", "ttg.convert_layout", "tt.reshape")


def narrow_argument_offsets(ttgir: str, args: tuple[str, ...]) -> list[str]:
    """The ``tt.addptr`` ops of the TTGIR that offset a kernel argument (through splats, broadcasts, layout
    changes) by a 32-bit offset. Offsets added after an int64 one are column offsets (< d) and may be i32."""
    root: dict[str, str] = {f"%{a}": a for a in args}
    bad = []
    for line in ttgir.splitlines():
        m = re.match(r"\s*(%[\w.]+) = (\S+) (%[\w.]+)", line)
        if not m:
            continue
        res, op, src = m.groups()
        if op in _ALIAS_OPS and src in root:
            root[res] = root[src]
        elif op == "tt.addptr" and src in root:
            types = line.split(" : ", 1)[1].rsplit(" loc(", 1)[0]
            if not re.search(r"(^|[x, ])i64\b|xi64", types.split(">, ")[-1] if ">, " in types else types):
                bad.append(f"{root[src]}: {line.strip()[:160]}")
    return bad


def test_the_ttgir_reader_flags_a_32_bit_offset():
    """The int64 check can fail: the reader on a hand-written TTGIR fragment with one i32 and one i64 offset."""
    ttgir = """
    %a = tt.splat %data_ptr : !tt.ptr<bf16> -> tensor<64x!tt.ptr<bf16>, #blocked>
    %b = tt.addptr %a, %off : tensor<64x!tt.ptr<bf16>, #blocked>, tensor<64xi32, #blocked> loc(#loc1)
    %c = tt.splat %out_ptr : !tt.ptr<f32> -> tensor<64x!tt.ptr<f32>, #blocked>
    %d = tt.addptr %c, %off64 : tensor<64x!tt.ptr<f32>, #blocked>, tensor<64xi64, #blocked> loc(#loc2)
    %e = tt.addptr %d, %col : tensor<64x!tt.ptr<f32>, #blocked>, tensor<64xi32, #blocked> loc(#loc3)
    """
    bad = narrow_argument_offsets(ttgir, ("data_ptr", "out_ptr"))
    assert len(bad) == 1 and bad[0].startswith("data_ptr")


@pytest.mark.parametrize("v", VARIANTS, ids=str)
def test_kernel_compiles_without_spills_on_the_right_units(v: Variant):
    b = build(v)
    regs, spill_st, spill_ld = ptxas_resources(b.ptxas)
    assert spill_st == 0 and spill_ld == 0, f"{v}: {regs} registers, spills {spill_st} / {spill_ld} bytes"
    wgmma, mma = b.ptx.count("wgmma.mma_async"), b.ptx.count("mma.sync")
    assert ".tf32" not in b.ptx, f"{v}: TF32 in the PTX (fp32 scores must be IEEE)"
    if v.kernel == "lse" and v.codec != "fp32":
        assert (wgmma if v.cc == 90 else mma) > 0, f"{v}: no tensor-core instruction (wgmma {wgmma}, mma {mma})"
    if v.codec == "fp32":
        assert wgmma == mma == 0, f"{v}: fp32 scores on tensor cores"
    assert not narrow_argument_offsets(b.ttgir, b.arg_names), narrow_argument_offsets(b.ttgir, b.arg_names)


@pytest.mark.parametrize("v", [v for v in VARIANTS if v.codec in ("int8", "int4") and v.kernel == "lse"
                               and (v.dim == 768 or FULL)], ids=str)
def test_quantised_rows_are_loaded_in_vectors(v: Variant):
    """int8 rows (d + 8 bytes: 8-byte aligned) and int4 rows (d/2 + 4: 4-byte aligned) are copied in 8- / 4-byte
    pieces: at least one row tile's bytes per thread move in copies of that width, and the kernel issues fewer
    single-byte loads than the same kernel addressing rows with ALIGN = 1 (the byte loads left are the filled
    flags, one per row and register layout)."""
    width = 8 if v.codec == "int8" else 4
    b = build(v)
    t = T.tiles(v.codec, v.dim, v.bs)
    tile_bytes = t.block_r * make_codec(v.codec).width(v.dim) // (32 * t.num_warps)
    wide = sum(int(n, 16) for n in re.findall(r"cp\.async[^;]*\], 0x(\w+)\b", b.ptx) if int(n, 16) >= width)
    wide += width * len(re.findall(rf"ld\.global(?:\.\w+)*\.v{16 // width}\.b32\b" if width == 8 else
                                   r"ld\.global(?:\.\w+)*\.b32\b", b.ptx))
    assert wide >= tile_bytes, f"{v}: {wide} bytes per thread in {width}-byte copies, a row tile is {tile_bytes}"

    def byte_loads(ptx: str) -> int:
        return len(re.findall(r"ld\.global(?:\.\w+)*\.[bu]8\b", ptx)) + len(re.findall(r"cp\.async[^;]*\], 0x1\b", ptx))
    aligned, unaligned = byte_loads(b.ptx), byte_loads(build(replace(v, unaligned=True)).ptx)
    assert aligned < unaligned, f"{v}: {aligned} byte loads, {unaligned} when rows are addressed unaligned"


def test_the_roofline_of_the_gpu_check_by_hand():
    """benchmarks/gpu_check_kernel.py's model at the design doc's point (4M x 768 bf16 rows, B = 4096, blocks of
    256, tiles 64 x 32), each term computed here by hand from the H100 figures it states."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check_kernel.py"
    spec = importlib.util.spec_from_file_location("gpu_check_kernel", path)
    K = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(K)
    r = K.roofline(4096, 4 << 20, 768, "bf16", 256, K.GPUS["h100-sxm"])
    rows_bytes = 4194304 * 768 * 2  # 6.44 GB
    q_bytes = (64 * 32) * 64 * 768 * 2  # 64 query tiles x 32 slabs of 512 blocks, each reads its 64 x 768 tile once
    lse_bytes = 4096 * 16384 * 4
    assert r["tiles"] == "64x32"
    assert r["hbm_gb"] == pytest.approx((rows_bytes + q_bytes + lse_bytes) / 1e9)
    assert r["l2_gb"] == pytest.approx((64 * rows_bytes + q_bytes + lse_bytes) / 1e9)
    assert r["mma_ms"] == pytest.approx(1e3 * 2 * 4096 * 4194304 * 768 / 989e12)  # 26.7 ms
    assert r["l2_ms"] == pytest.approx(1e3 * (64 * rows_bytes + q_bytes + lse_bytes) / 7e12)  # 59 ms
    smem = 64 * (4194304 / 32) * (64 + 2 * 32) * 768 * 2  # per (query tile, row tile): q and rows read, rows written
    assert r["smem_ms"] == pytest.approx(1e3 * smem / (128 * 132 * 1.83e9))  # 53 ms
    exp_ms = 1e3 * 4096 * 4194304 / (16 * 132 * 1.83e9)  # 4.4 ms
    assert r["pred_ms"] == pytest.approx(1e3 * (64 * rows_bytes + q_bytes + lse_bytes) / 7e12 + exp_ms)  # 63 ms
