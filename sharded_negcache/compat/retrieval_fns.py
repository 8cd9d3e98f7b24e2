"""Retrieval functions of the reference: map a [B, C] score matrix to one index per query, [B, 1].

``_sample_gumbel(shape)`` is the module-level noise source the Gumbel retrieval calls with exactly
one positional argument, so ``mock.patch.object(retrieval_fns, "_sample_gumbel")`` fixes the noise.
"""
from __future__ import annotations

import abc

import torch

__all__ = ["AbstractRetrievalFn", "MaxScoreRetrievalFn", "GumbelMaxRetrievalFn"]


class AbstractRetrievalFn(torch.nn.Module, metaclass=abc.ABCMeta):
    """Takes scores [B, C] and returns int64 indices [B, 1]."""

    @abc.abstractmethod
    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        ...


def _check_scores(scores: torch.Tensor) -> None:
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        raise ValueError(f"scores must be a [batch, candidates] tensor, got {getattr(scores, 'shape', scores)!r}")


class MaxScoreRetrievalFn(AbstractRetrievalFn):
    """The highest-scoring candidate (first one on ties)."""

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        _check_scores(scores)
        return scores.detach().argmax(dim=1, keepdim=True)


def _sample_gumbel(shape: torch.Size) -> torch.Tensor:
    """Standard Gumbel noise of ``shape`` on the current default device (the caller sets it to the scores' device)."""
    uniform = torch.rand(shape).clamp_(min=torch.finfo(torch.float32).tiny)
    return -torch.log(-torch.log(uniform))


class GumbelMaxRetrievalFn(AbstractRetrievalFn):
    """Samples index j with probability softmax(inv_temp * scores)_j: argmax of the scaled scores plus Gumbel noise.

    Candidates scored -inf (empty rows) are never drawn unless a query has no other candidate.
    """

    def __init__(self, inv_temp: float = 1.0) -> None:
        super().__init__()
        self.inv_temp = inv_temp

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        _check_scores(scores)
        scores = scores.detach()
        with torch.device(scores.device):  # noise is drawn where the scores live, no host-to-device copy
            noise = _sample_gumbel(scores.size())
        perturbed = self.inv_temp * scores + noise.to(device=scores.device, dtype=scores.dtype)
        perturbed = perturbed.masked_fill(scores == float("-inf"), float("-inf"))
        return perturbed.argmax(dim=1, keepdim=True)
