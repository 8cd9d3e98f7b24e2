"""Embedding codecs: how a cached embedding row is stored, and how a chunk of rows is read back as fp32.

Scoring decodes chunk by chunk, so the shard is never materialised in fp32 as a whole.
"""
from __future__ import annotations

import torch

__all__ = ["EmbeddingCodec", "CastCodec", "make_codec"]


class EmbeddingCodec:
    """Stores [rows, d] float embeddings as a [rows, width] tensor of ``storage_dtype``."""

    name: str
    storage_dtype: torch.dtype

    def width(self, dim: int) -> int:
        raise NotImplementedError("EmbeddingCodec subclasses define width()")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("EmbeddingCodec subclasses define encode()")

    def decode(self, stored: torch.Tensor, dim: int) -> torch.Tensor:
        raise NotImplementedError("EmbeddingCodec subclasses define decode()")

    def bytes_per_row(self, dim: int) -> int:
        return self.width(dim) * torch.empty((), dtype=self.storage_dtype).element_size()


class CastCodec(EmbeddingCodec):
    """Plain floating storage (fp32, bf16, fp16): encode is a cast, decode casts to fp32."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.storage_dtype = dtype
        self.name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]

    def width(self, dim: int) -> int:
        return dim

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach().to(self.storage_dtype)

    def decode(self, stored: torch.Tensor, dim: int) -> torch.Tensor:
        return stored.to(torch.float32)


_CODECS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_codec(name: str | torch.dtype) -> EmbeddingCodec:
    """Codec by name ('fp32', 'bf16', 'fp16') or by floating dtype."""
    if isinstance(name, torch.dtype):
        for key, dtype in _CODECS.items():
            if dtype == name:
                return CastCodec(dtype)
        raise ValueError(f"embedding_codec: no codec stores dtype {name}; use one of {sorted(_CODECS)}")
    if name not in _CODECS:
        raise ValueError(f"embedding_codec must be one of {sorted(_CODECS)}, got {name!r}")
    return CastCodec(_CODECS[name])
