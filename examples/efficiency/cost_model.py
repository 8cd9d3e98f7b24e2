"""A FLOP / byte model of one training step on an H100, from the encoder calls a step actually made.

The study runs on CPUs; the question (what does a method cost where people train) needs an accelerator's
numbers. Each encoder call a step makes is recorded as (sequences, padded length, with gradient or not) and
priced here; the assumptions are the constants below (README, "The H100 cost model"):

- encoder FLOPs per token of a sequence of padded length n, forward:
  ``2 * L * (4 d^2 + 2 d f) + 4 * L * n * d`` (the matmuls of the projections and the feed-forward, then the
  attention scores and their weighted sum); a call with gradient costs 3x (backward = 2x forward);
- a call's time is the larger of its FLOPs at ``MFU`` of the bf16 dense peak and a launch floor of
  ``KERNELS_PER_LAYER * L`` kernels of ``LAUNCH_S`` each (x3 with gradient): small batches are launch-bound;
- AdamW reads and writes parameters, gradients and two moments: 32 bytes per parameter at HBM bandwidth;
- DDP's gradient all-reduce moves ``2 (W-1)/W`` of the fp32 gradients over NVLink;
- the cache scan reads each rank's rows once (``rows * d * 4`` bytes at HBM bandwidth) and scores them
  (``2 * queries * rows * d`` FLOPs), plus ``HANDLER_COLLECTIVES`` small collectives at ``COLLECTIVE_S``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

__all__ = ["EncoderShape", "H100", "step_time_s", "calls_time_s"]

H100 = {
    "bf16_dense_flops": 989e12,  # H100 SXM, dense bf16 tensor cores
    "mfu": 0.4,  # fraction of that peak an encoder's matmuls reach in mixed precision (assumed)
    "hbm_bytes_s": 3.35e12,
    "nvlink_bytes_s": 450e9,  # per direction
    "launch_s": 5e-6,  # one kernel launch (eager PyTorch)
    "kernels_per_layer": 20,  # eager BERT layer: 4 projections, attention, 2 feed-forward, norms, adds, ...
    "collective_s": 20e-6,  # one small NCCL collective (latency)
    "handler_collectives": 10,  # the cache handler's per-step collectives (agreement, gathers, write-back)
}


@dataclass(frozen=True)
class EncoderShape:
    """What the cost of a BERT-style encoder depends on."""

    layers: int
    hidden: int
    ffn: int
    parameters: int  # all trainable parameters (the optimiser and the all-reduce touch every one)

    @classmethod
    def of(cls, model) -> "EncoderShape":
        """From a SentenceTransformer whose first module wraps a Hugging Face BERT-like model."""
        config = model[0].auto_model.config
        return cls(config.num_hidden_layers, config.hidden_size, config.intermediate_size,
                   sum(p.numel() for p in model.parameters() if p.requires_grad))

    def forward_flops_per_token(self, length: int) -> float:
        return 2 * self.layers * (4 * self.hidden**2 + 2 * self.hidden * self.ffn) + 4 * self.layers * length * self.hidden


def calls_time_s(shape: EncoderShape, calls: Iterable[tuple[bool, int, int, int]], hw: dict = H100) -> float:
    """Seconds for encoder calls given as (with_gradient, padded_length, sequences, number_of_such_calls)."""
    total = 0.0
    for grad, length, sequences, count in calls:
        factor = 3 if grad else 1
        flops = factor * shape.forward_flops_per_token(length) * length * sequences
        compute = flops / (hw["bf16_dense_flops"] * hw["mfu"])
        floor = factor * hw["kernels_per_layer"] * shape.layers * hw["launch_s"]
        total += count * max(compute, floor)
    return total


def step_time_s(shape: EncoderShape, calls: Iterable[tuple[bool, int, int, int]], *, world: int,
                cache_rows_per_rank: int = 0, queries_per_rank: int = 0, hw: dict = H100) -> dict[str, float]:
    """Predicted seconds of one step per part: encoder calls, optimiser, all-reduce, cache scan + collectives."""
    encoder = calls_time_s(shape, calls, hw)
    optimizer = 32 * shape.parameters / hw["hbm_bytes_s"]
    allreduce = 2 * (world - 1) / world * 4 * shape.parameters / hw["nvlink_bytes_s"] if world > 1 else 0.0
    cache = 0.0
    if cache_rows_per_rank:
        read = cache_rows_per_rank * shape.hidden * 4 / hw["hbm_bytes_s"]
        score = 2 * queries_per_rank * cache_rows_per_rank * shape.hidden / (hw["bf16_dense_flops"] * hw["mfu"])
        cache = read + score + hw["handler_collectives"] * hw["collective_s"]
    parts = {"encoder": encoder, "optimizer": optimizer, "allreduce": allreduce, "cache": cache}
    parts["total"] = sum(parts.values())
    return parts

