"""metrics: which writer forms are accepted, and what rank 0 (and only rank 0) writes under which tag.

A recording writer stands in for TensorBoard here (test_handler_state.py reads a real SummaryWriter's
event files back through the handler).
"""
from __future__ import annotations

import pytest

from engine_cases import ScalarRecorder
from sharded_negcache.metrics import TAGS, resolve_writer, write_scalars


def test_resolve_writer_forms():
    w = ScalarRecorder()
    assert resolve_writer(None, 7) == (None, 7)
    assert resolve_writer(w, 7) == (w, 7)
    assert resolve_writer((w, 41), 7) == (w, 41)  # the reference's (writer, global_step) form
    got = resolve_writer((w, "3"), 7)
    assert got[1] == 3 and isinstance(got[1], int)


@pytest.mark.parametrize("writer,error,message", [
    ((ScalarRecorder(), 1, 2), ValueError, r"a \(SummaryWriter, global_step\) tuple"),
    ((ScalarRecorder(),), ValueError, r"a \(SummaryWriter, global_step\) tuple"),
    ("runs/x", TypeError, "writer must have add_scalar .*got str"),
    (42, TypeError, "got int"),
])
def test_resolve_writer_refuses_other_values(writer, error, message):
    with pytest.raises(error, match=message):
        resolve_writer(writer, 0)


def test_rank_0_writes_the_known_metrics_under_their_tags():
    w = ScalarRecorder()
    values = {"fill_fraction": 0.5, "interpretable_loss": 1.25, "staleness": 0.0, "unknown": 9.0}
    write_scalars(w, 12, values, rank=0)
    # in TAGS order, unknown names left out, absent metrics not written
    assert w.calls == [("cache/interpretable_prediction_loss", 1.25, 12), ("cache/staleness", 0.0, 12),
                       ("cache/fill_fraction", 0.5, 12)]


def test_every_metric_has_a_distinct_tag():
    w = ScalarRecorder()
    write_scalars(w, 0, {name: float(i) for i, name in enumerate(TAGS)}, rank=0)
    assert [c[0] for c in w.calls] == list(TAGS.values())
    assert len(set(TAGS.values())) == len(TAGS) == 6
    assert all(tag.startswith("cache/") for tag in TAGS.values())


def test_other_ranks_and_no_writer_write_nothing():
    w = ScalarRecorder()
    for rank in (1, 3):
        write_scalars(w, 5, {"fill_fraction": 1.0}, rank=rank)
    write_scalars(None, 5, {"fill_fraction": 1.0}, rank=0)
    assert w.calls == []
