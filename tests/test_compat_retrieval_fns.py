"""compat.retrieval_fns: argmax and Gumbel-max retrieval, the ``_sample_gumbel`` seam, masked candidates."""
from __future__ import annotations

import math
from unittest import mock

import pytest
import torch

from sharded_negcache.compat import retrieval_fns


def test_max_score_takes_the_first_maximum():
    scores = torch.tensor([[0.5, 2.0, 2.0], [-1.0, -3.0, -2.0]])
    out = retrieval_fns.MaxScoreRetrievalFn()(scores)
    assert out.tolist() == [[1], [0]] and out.dtype == torch.int64


def test_gumbel_uses_the_patched_noise_source():
    scores = torch.tensor([[0.0, 1.0, 0.5], [2.0, 0.0, 0.0]])
    noise = torch.tensor([[1.2, 0.0, 0.0], [0.0, 0.0, 2.5]])
    with mock.patch.object(retrieval_fns, "_sample_gumbel", return_value=noise) as sampler:
        out = retrieval_fns.GumbelMaxRetrievalFn()(scores)  # perturbed [1.2, 1, .5] and [2, 0, 2.5]
        hot = retrieval_fns.GumbelMaxRetrievalFn(inv_temp=3.0)(scores)  # [1.2, 3, 1.5] and [6, 0, 2.5]
    assert out.tolist() == [[0], [2]]
    assert hot.tolist() == [[1], [0]]
    assert sampler.call_count == 2
    args, kwargs = sampler.call_args
    assert args == (torch.Size([2, 3]),) and kwargs == {}


def test_gumbel_never_draws_a_masked_candidate():
    scores = torch.tensor([[float("-inf"), 0.0, float("-inf")]])
    with mock.patch.object(retrieval_fns, "_sample_gumbel", return_value=torch.tensor([[100.0, 0.0, 50.0]])):
        assert retrieval_fns.GumbelMaxRetrievalFn()(scores).tolist() == [[1]]


def test_gumbel_noise_is_drawn_on_the_scores_device():
    seen = []

    def record(shape):
        seen.append(torch.empty(0).device)  # factory functions follow the device context
        return torch.zeros(shape)

    with mock.patch.object(retrieval_fns, "_sample_gumbel", side_effect=record):
        out = retrieval_fns.GumbelMaxRetrievalFn()(torch.zeros(2, 3, device="meta"))
    assert seen == [torch.device("meta")] and out.shape == (2, 1)


def test_gumbel_samples_the_softmax():
    torch.manual_seed(0)
    probs = [0.2, 0.3, 0.5]
    scores = torch.tensor([[math.log(p) for p in probs]]).repeat(6000, 1)
    picks = retrieval_fns.GumbelMaxRetrievalFn()(scores)[:, 0]
    freq = torch.bincount(picks, minlength=3).float() / picks.numel()
    for f, p in zip(freq.tolist(), probs):  # binomial std <= 0.0065
        assert abs(f - p) < 0.03


def test_inv_temp_sharpens():
    torch.manual_seed(1)
    scores = torch.tensor([[0.0, math.log(2.0)]]).repeat(6000, 1)
    picks = retrieval_fns.GumbelMaxRetrievalFn(inv_temp=2.0)(scores)[:, 0]
    assert abs(picks.float().mean().item() - 0.8) < 0.03  # softmax of [0, 2 log 2]: 4/5


def test_scores_must_be_a_matrix():
    with pytest.raises(ValueError, match="scores"):
        retrieval_fns.MaxScoreRetrievalFn()(torch.zeros(3))
