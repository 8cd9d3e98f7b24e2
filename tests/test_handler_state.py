"""The cache is part of the handler's state_dict, loads back exactly, moves with .to(); TensorBoard logging."""
from __future__ import annotations

import pytest
import torch

from engine_cases import DIM, FEAT, Tower, global_cache, make_handler
from sharded_negcache import BatchRejected


def batch(seed: int, n: int = 4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, DIM, generator=g), {"x": torch.randn(n, FEAT, generator=g)}


def step(h, tower, seed):
    q, data = batch(seed)
    with torch.no_grad():
        h.update_cache_and_compute_loss(tower, q, tower(data), data)
    return h.last_step


def test_state_dict_holds_the_cache_and_resumes_exactly():
    tower = Tower()
    a = make_handler(24, num_negatives=3, seed=13)
    a.load_global_rows(global_cache(24, tower))
    step(a, tower, 1)
    sd = a.state_dict()
    assert {"store.embeddings", "store.age", "store.filled", "store.features.x", "step_count", "seed"} <= set(sd)
    assert int(sd["step_count"]) == 1 and int(sd["seed"]) == 13

    b = make_handler(24, num_negatives=3, seed=0)  # seed and step come from the state_dict
    b.load_state_dict(sd)
    assert b.steps_done == 1
    ra, rb = step(a, tower, 2), step(b, tower, 2)
    assert torch.equal(ra.sampled_rows, rb.sampled_rows)
    assert torch.equal(ra.training_loss, rb.training_loss)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_to_moves_every_buffer():
    h = make_handler(24)
    h.to(torch.device("meta"))
    assert {t.device.type for t in h.buffers()} == {"meta"}
    assert h.device.type == "meta"


def test_cache_device_is_fixed_after_the_first_step():
    h = make_handler(24)  # no device given: follows the first batch (CPU here), then stays
    tower = Tower()
    step(h, tower, 0)
    q, data = batch(1)
    with pytest.raises(BatchRejected, match="query_embeddings is on meta but the cache is on cpu"):
        h.update_cache_and_compute_loss(tower, q.to("meta"), tower(data), data)


def test_writer_logs_the_reference_tags(tmp_path):
    from torch.utils.tensorboard import SummaryWriter
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tower = Tower()
    h = make_handler(24, num_negatives=2)
    h.load_global_rows(global_cache(24, tower))
    writer = SummaryWriter(str(tmp_path))
    q, data = batch(3)
    with torch.no_grad():
        h.update_cache_and_compute_loss(tower, q, tower(data), data, writer=(writer, 41))
        h.update_cache_and_compute_loss(tower, q, tower(data), data, writer=writer)
    writer.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"cache/interpretable_prediction_loss", "cache/staleness", "cache/fill_fraction",
            "cache/sampled_age_mean"} <= tags
    events = acc.Scalars("cache/interpretable_prediction_loss")
    assert [e.step for e in events] == [41, 1]  # explicit step, then the handler's step counter
    assert events[1].value == pytest.approx(h.last_step.interpretable_loss.mean().item(), rel=1e-5)
    fill = acc.Scalars("cache/fill_fraction")[-1].value
    assert fill == pytest.approx(h.store.filled.float().mean().item())


def test_gathered_rows_are_a_snapshot_that_later_steps_leave_alone():
    """gather_global_rows() returns copies: the rows a step rewrites (refreshed embeddings, inserted rows, ages)
    change in the cache but not in a snapshot taken before it."""
    tower = Tower(seed=3)  # a tower unlike the cached rows' one: every refreshed row changes
    h = make_handler(24, num_negatives=3)
    h.load_global_rows(global_cache(24, tower))
    snap = h.gather_global_rows()
    kept = {k: v.clone() for k, v in snap.items()}
    step(h, Tower(), 1)
    after = h.gather_global_rows()
    assert not torch.equal(after["embedding"], kept["embedding"])  # the step did rewrite rows
    for k, v in kept.items():
        assert torch.equal(snap[k], v), f"{k}: the snapshot changed with the cache"


def _huge_step(nonfinite: str):
    """8 queries scaled so that each per-query loss is finite (about 1e38) but their float32 sum is not."""
    tower = Tower()
    h = make_handler(16, num_negatives=2, nonfinite=nonfinite)
    h.load_global_rows(global_cache(16, tower))
    before = {k: v.clone() for k, v in h.store.export_rows().items()}
    q, data = batch(0, n=8)
    q = (q.sign() * 7e36).requires_grad_(True)
    return h, tower, q, data, before


def test_finite_losses_whose_reduction_overflows_raise_nonfinite_loss():
    from sharded_negcache import NonFiniteLoss

    h, tower, q, data, before = _huge_step("raise")
    with pytest.raises(NonFiniteLoss, match=r"step 0: .*8 queries .*cache unchanged"):
        h.update_cache_and_compute_loss(tower, q, tower(data), data)
    assert h.steps_done == 0
    for k, v in h.store.export_rows().items():
        assert torch.equal(v, before[k]), k


def test_finite_losses_whose_reduction_overflows_are_skipped_and_counted():
    h, tower, q, data, _ = _huge_step("skip")
    loss = h.update_cache_and_compute_loss(tower, q, tower(data), data)
    per_query = h.last_step.training_loss
    assert torch.isfinite(loss) and loss.item() == 0.0  # every query of the overflowing rank is left out
    assert h.last_step.metrics["nonfinite_queries"] == 8.0 and h.steps_done == 1
    assert torch.equal(per_query, torch.zeros(8))
