"""Embedding codecs: how a cached embedding row is stored, and how a chunk of rows is read back as fp32.

Scoring decodes chunk by chunk, so the shard is never materialised in fp32 as a whole.

* ``fp32``, ``bf16``, ``fp16``: plain floating storage.
* ``int8``: row-wise 8-bit, fbgemm's fused layout ``[d bytes | scale fp32 | bias fp32]``
  (``FloatToFused8BitRowwiseQuantized``); 4 + 4 bytes of overhead per row.
* ``int4``: row-wise 4-bit, fbgemm's fused layout ``[d/2 bytes, low nibble first | scale fp16 | bias fp16]``
  (``FloatToFusedNBitRowwiseQuantizedSBHalf``, bit rate 4).

The quantised codecs call fbgemm-gpu's kernels where they exist for the tensor's device and fall back
to a pure-torch implementation of the same layout (bytes written by one decode with the other), so
the hot path runs on any CUDA build of torch.
"""
from __future__ import annotations

import functools

import torch

__all__ = ["EmbeddingCodec", "CastCodec", "RowwiseInt8Codec", "RowwiseInt4Codec", "make_codec", "CODECS"]


def finite_rows(x: torch.Tensor) -> torch.Tensor:
    """[n] bool: rows of ``x`` [n, d] without NaN or Inf. Two passes (|x|, then a row max that propagates
    NaN); ``torch.isfinite(x).all(1)`` is five passes on CPU. On CPU first one
    pass: a finite row sum proves its row finite (a NaN or Inf makes the sum NaN or Inf), so the two passes
    run only when some sum is not finite (a NaN/Inf, or finite values overflowing the sum)."""
    x = x.detach()
    if x.device.type == "cpu":  # the all() is a host read, free on CPU only
        ok = torch.isfinite(x.sum(dim=1))
        if bool(ok.all()):
            return ok
    return x.abs().amax(dim=1) < float("inf")


class EmbeddingCodec:
    """Stores [rows, d] float embeddings as a [rows, width] tensor of ``storage_dtype``."""

    name: str
    storage_dtype: torch.dtype
    error_bound: str  # stated bound of |decode(encode(x)) - x| per element

    def width(self, dim: int) -> int:
        raise NotImplementedError("EmbeddingCodec subclasses define width()")

    def check_dim(self, dim: int) -> None:
        """Raises if this codec cannot store rows of width ``dim``."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("EmbeddingCodec subclasses define encode()")

    def decode(self, stored: torch.Tensor, dim: int) -> torch.Tensor:
        raise NotImplementedError("EmbeddingCodec subclasses define decode()")

    def bytes_per_row(self, dim: int) -> int:
        return self.width(dim) * torch.empty((), dtype=self.storage_dtype).element_size()

    def storable(self, x: torch.Tensor) -> torch.Tensor:
        """[n] bool: rows of ``x`` [n, d] that this codec stores as finite values (what the store writes:
        the rows as fp32, encoded). Finite inputs can still overflow the storage format (fp16 above
        65504, an int4 row whose fp16 scale or bias overflows): such rows must not be written.
        The default decodes the encoding, exact for every codec."""
        x = x.detach().float()
        ok = finite_rows(x)
        if not x.shape[0]:
            return ok
        safe = torch.where(ok.unsqueeze(1), x, 0.0)
        return ok & finite_rows(self.decode(self.encode(safe), x.shape[1]))


class CastCodec(EmbeddingCodec):
    """Plain floating storage (fp32, bf16, fp16): encode is a cast, decode casts to fp32."""

    _NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    _BOUNDS = {torch.float32: "0", torch.bfloat16: "2^-8 |x|", torch.float16: "2^-11 |x| (|x| < 65504)"}

    def __init__(self, dtype: torch.dtype) -> None:
        self.storage_dtype = dtype
        self.name = self._NAMES[dtype]
        self.error_bound = self._BOUNDS[dtype]

    def width(self, dim: int) -> int:
        return dim

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach().to(self.storage_dtype)

    def decode(self, stored: torch.Tensor, dim: int) -> torch.Tensor:
        return stored.to(torch.float32)

    def storable(self, x: torch.Tensor) -> torch.Tensor:
        """A cast overflows to inf exactly when the value is out of range (one pass, no decode)."""
        return finite_rows(x.detach().float().to(self.storage_dtype))


@functools.lru_cache(maxsize=None)
def _fbgemm_ops_on(device_type: str) -> bool:
    """True when fbgemm-gpu's row-wise quantisation kernels are loaded for this device type."""
    try:
        import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)
    except Exception:
        return False
    try:
        probe = torch.zeros(1, 4, device=device_type)
        torch.ops.fbgemm.FloatToFused8BitRowwiseQuantized(probe)
        return True
    except Exception:
        return False


def use_fbgemm(t: torch.Tensor) -> bool:
    """Whether fbgemm-gpu's row-wise kernels encode and decode ``t`` (loaded for its device); else the pure-torch
    codec writes the same bytes (tests switch it off to compare the two)."""
    return t.device.type in ("cpu", "cuda") and _fbgemm_ops_on(t.device.type)


class RowwiseInt8Codec(EmbeddingCodec):
    """Row-wise 8-bit with an fp32 scale and bias per row (fbgemm's fused layout)."""

    name, storage_dtype = "int8", torch.uint8
    error_bound = "(max_row - min_row) / 510 + 1e-6"

    def width(self, dim: int) -> int:
        return dim + 8

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().float().contiguous()
        if use_fbgemm(x):
            return torch.ops.fbgemm.FloatToFused8BitRowwiseQuantized(x)
        lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
        inv = 255.0 / (hi - lo + 1e-8)
        q = torch.round((x - lo) * inv).clamp_(0, 255).to(torch.uint8)
        sb = torch.cat([(hi - lo) / 255.0, lo], dim=1).contiguous().view(torch.uint8)
        return torch.cat([q, sb], dim=1)

    def decode(self, stored: torch.Tensor, dim: int) -> torch.Tensor:
        if stored.shape[0] and use_fbgemm(stored):
            return torch.ops.fbgemm.Fused8BitRowwiseQuantizedToFloat(stored.contiguous())
        # a fresh copy of the 8 bytes per row: a slice's own offset and row stride need not be multiples of
        # 4 (any width d, any first row, an empty slice), which a view as fp32 requires
        sb = stored[:, dim:].clone(memory_format=torch.contiguous_format).view(torch.float32)
        return stored[:, :dim].float() * sb[:, :1] + sb[:, 1:]


class RowwiseInt4Codec(EmbeddingCodec):
    """Row-wise 4-bit with fp16 scale and bias per row (fbgemm's fused N-bit layout, bit rate 4)."""

    name, storage_dtype = "int4", torch.uint8
    error_bound = "(max_row - min_row) / 30 + fp16 rounding of scale and bias"

    def width(self, dim: int) -> int:
        return dim // 2 + 4

    def check_dim(self, dim: int) -> None:
        if dim % 4:
            raise ValueError(f"embedding_codec 'int4' needs an embedding width divisible by 4, got {dim}")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().float().contiguous()
        if use_fbgemm(x):
            return torch.ops.fbgemm.FloatToFusedNBitRowwiseQuantizedSBHalf(x, 4)
        lo = x.amin(1, keepdim=True).half()
        hi = x.amax(1, keepdim=True)
        scale = ((hi - lo.float()) / 15.0).half()
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # a constant row: any scale works
        q = torch.round((x - lo.float()) * (1.0 / scale.float())).clamp_(0, 15).to(torch.uint8)
        packed = q[:, 0::2] | (q[:, 1::2] << 4)
        sb = torch.cat([scale, lo], dim=1).contiguous().view(torch.uint8)
        return torch.cat([packed, sb], dim=1)

    def decode(self, stored: torch.Tensor, dim: int) -> torch.Tensor:
        if stored.shape[0] and use_fbgemm(stored):
            return torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat(stored.contiguous(), 4)
        half = dim // 2
        packed = stored[:, :half]
        q = torch.stack([packed & 0x0F, packed >> 4], dim=2).reshape(stored.shape[0], dim).float()
        sb = stored[:, half : half + 4].contiguous().view(torch.float16).float()
        return q * sb[:, :1] + sb[:, 1:]


CODECS = {
    "fp32": lambda: CastCodec(torch.float32),
    "bf16": lambda: CastCodec(torch.bfloat16),
    "fp16": lambda: CastCodec(torch.float16),
    "int8": RowwiseInt8Codec,
    "int4": RowwiseInt4Codec,
}


def make_codec(name: str | torch.dtype) -> EmbeddingCodec:
    """Codec by name ('fp32', 'bf16', 'fp16', 'int8', 'int4') or by floating dtype."""
    if isinstance(name, torch.dtype):
        for dtype, key in CastCodec._NAMES.items():
            if dtype == name:
                return CODECS[key]()
        raise ValueError(f"embedding_codec: no codec stores dtype {name}; use one of {sorted(CODECS)}")
    if name not in CODECS:
        raise ValueError(f"embedding_codec must be one of {sorted(CODECS)}, got {name!r}")
    return CODECS[name]()
