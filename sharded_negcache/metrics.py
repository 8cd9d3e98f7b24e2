"""TensorBoard logging at the edge: rank 0 writes the global means the handler reduced."""
from __future__ import annotations

from typing import Any, Mapping

__all__ = ["resolve_writer", "write_scalars", "TAGS"]

TAGS = {
    "interpretable_loss": "cache/interpretable_prediction_loss",
    "staleness": "cache/staleness",
    "fill_fraction": "cache/fill_fraction",
    "sampled_age": "cache/sampled_age_mean",
    "rejected_rows": "cache/rejected_rows",
    "nonfinite_queries": "cache/nonfinite_queries",
}


def resolve_writer(writer: Any, default_step: int) -> tuple[Any, int]:
    """Accepts a SummaryWriter, a ``(writer, global_step)`` tuple (the reference's form) or None."""
    if writer is None:
        return None, default_step
    if isinstance(writer, tuple):
        if len(writer) != 2:
            raise ValueError("writer must be a SummaryWriter or a (SummaryWriter, global_step) tuple")
        return writer[0], int(writer[1])
    if not hasattr(writer, "add_scalar"):
        raise TypeError(f"writer must have add_scalar (a SummaryWriter), got {type(writer).__name__}")
    return writer, default_step


def write_scalars(writer: Any, step: int, values: Mapping[str, float], rank: int) -> None:
    """Writes the known metrics on rank 0 only (every rank holds the same global values)."""
    if writer is None or rank != 0:
        return
    for name, tag in TAGS.items():
        if name in values:
            writer.add_scalar(tag, values[name], step)
