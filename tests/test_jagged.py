"""jagged: the spec's checks, every input form normalised to the same rows, the messages for bad rows,
the formats handed to the document network, and the unpadded column (append, compaction, growth),
each against rows written out by hand."""
from __future__ import annotations

import re

import pytest
import torch

from sharded_negcache.jagged import (
    Jagged,
    JaggedColumn,
    JaggedFieldSpec,
    id_range_problem,
    to_jagged,
    to_user_format,
)

ROWS = [[1, 2], [], [3, 4, 5]]  # three documents of lengths 2, 0, 3
SPEC = JaggedFieldSpec(4, torch.int64, vocab_size=10, format="list")


def as_lists(j: Jagged) -> list[list[int]]:
    out, at = [], 0
    for n in j.lengths.tolist():
        out.append(j.values[at : at + n].tolist())
        at += n
    assert at == j.values.numel()
    return out


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_length=0, dtype=torch.int64), "JaggedFieldSpec.max_length must be a positive int, got 0"),
    (dict(max_length=2.0, dtype=torch.int64), "max_length must be a positive int, got 2.0"),
    (dict(max_length=2, dtype=torch.int64, format="dense"), "format must be 'kjt', 'list' or 'padded', got 'dense'"),
    (dict(max_length=2, dtype=torch.float32, vocab_size=5), "vocab_size needs an integer dtype, got torch.float32"),
    (dict(max_length=2, dtype=torch.int32, vocab_size=2**31 + 1), r"vocab_size=2147483649 does not fit dtype torch.int32"),
    (dict(max_length=2, dtype=torch.int64, vocab_size=0), "vocab_size=0 does not fit"),
])
def test_spec_refuses_bad_fields(kwargs, message):
    with pytest.raises(ValueError, match=message):
        JaggedFieldSpec(**kwargs)


def test_spec_accepts_the_largest_vocabulary_of_its_dtype():
    assert JaggedFieldSpec(2, torch.int32, vocab_size=2**31).vocab_size == 2**31
    assert JaggedFieldSpec(2, torch.int64).shape == ()


def padded_pair() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([[1, 2, 9], [9, 9, 9], [3, 4, 5]]), torch.tensor([2, 0, 3])  # 9: padding, never read


class LengthsValues:
    """Anything with ``lengths()`` and ``values()`` (TorchRec's JaggedTensor interface)."""

    def __init__(self, lengths: list[int], values: list[int]) -> None:
        self._l, self._v = torch.tensor(lengths), torch.tensor(values)

    def lengths(self) -> torch.Tensor:
        return self._l

    def values(self) -> torch.Tensor:
        return self._v


def kjt():
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    return KeyedJaggedTensor(keys=["t"], values=torch.tensor([1, 2, 3, 4, 5]), lengths=torch.tensor([2, 0, 3]))


@pytest.mark.parametrize("form", ["list", "padded", "lengths_values", "kjt"])
def test_every_input_form_gives_the_same_rows(form):
    value = {"list": lambda: [torch.tensor(r, dtype=torch.int64) for r in ROWS], "padded": padded_pair,
             "lengths_values": lambda: LengthsValues([2, 0, 3], [1, 2, 3, 4, 5]), "kjt": kjt}[form]()
    j = to_jagged(value, "t", SPEC, 3)
    assert isinstance(j, Jagged), j
    assert j.lengths.dtype == torch.int64 and j.lengths.tolist() == [2, 0, 3]
    assert as_lists(j) == ROWS


@pytest.mark.parametrize("value,batch,message", [
    (lambda: [torch.tensor([1]), torch.tensor([2])], 3, "has 2 rows, expected 3"),
    (lambda: [torch.tensor([1], dtype=torch.int32)], 1, "must have dtype torch.int64, got torch.int32"),
    (lambda: LengthsValues([2, -1], [1]), 2, "has a negative length -1"),
    (lambda: LengthsValues([5], [1, 2, 3, 4, 5]), 1, "a row of length 5 over max_length 4"),
    (lambda: LengthsValues([2, 2], [1, 2, 3]), 2, "lengths sum to 4 but there are 3 values"),
    (lambda: [torch.tensor([3, 10])], 1, r"holds id 10 outside \[0, 10\)"),
    (lambda: (torch.zeros(2, 3, dtype=torch.int64), torch.tensor([1, 4])), 2, "exceed the padded width 3"),
    (lambda: (torch.zeros(2, 3, dtype=torch.int64), torch.tensor([1])), 2, "1 lengths for 2 padded rows"),
    (lambda: (torch.zeros(1, 3, dtype=torch.int64), torch.tensor([1.0])), 1, "needs integer lengths"),
    (lambda: {"t": [1, 2]}, 1, "must be a KeyedJaggedTensor, JaggedTensor, list of 1-D tensors"),
])
def test_bad_rows_give_a_message_naming_the_field(value, batch, message):
    got = to_jagged(value(), "t", SPEC, batch)
    assert isinstance(got, str), got
    assert got.startswith("document_data['t']") and re.search(message, got), got


def test_kjt_without_the_key_is_named():
    got = to_jagged(kjt(), "other", SPEC, 3)
    assert isinstance(got, str) and "KeyedJaggedTensor without the key 'other'" in got


def test_empty_batch_is_accepted():
    j = to_jagged([], "t", SPEC, 0)
    assert isinstance(j, Jagged) and j.lengths.numel() == 0 and j.values.numel() == 0


def test_id_range_problem():
    assert id_range_problem("t", torch.tensor([0, 9]), 10) is None
    assert id_range_problem("t", torch.tensor([0, 10]), 10) == "document_data['t'] holds id 10 outside [0, 10)"
    assert id_range_problem("t", torch.tensor([-1, 3]), 10) == "document_data['t'] holds id -1 outside [0, 10)"
    assert id_range_problem("t", torch.tensor([99]), None) is None
    assert id_range_problem("t", torch.tensor([], dtype=torch.int64), 10) is None


def test_select_keeps_the_chosen_rows():
    j = Jagged(torch.tensor([2, 0, 3]), torch.tensor([1, 2, 3, 4, 5]))
    assert as_lists(j.select(torch.tensor([True, False, True]))) == [[1, 2], [3, 4, 5]]
    assert as_lists(j.select(torch.tensor([False, True, True]))) == [[], [3, 4, 5]]
    assert as_lists(j.select(torch.tensor([False, False, False]))) == []


def test_user_formats():
    j = Jagged(torch.tensor([2, 0, 3]), torch.tensor([1, 2, 3, 4, 5]))
    assert [t.tolist() for t in to_user_format(j, "t", SPEC)] == ROWS
    padded, lengths = to_user_format(j, "t", JaggedFieldSpec(4, torch.int64, format="padded"))
    assert padded.tolist() == [[1, 2, 0, 0], [0, 0, 0, 0], [3, 4, 5, 0]] and lengths.tolist() == [2, 0, 3]
    k = to_user_format(j, "t", JaggedFieldSpec(4, torch.int64, format="kjt"))
    assert k.keys() == ["t"] and k.lengths().tolist() == [2, 0, 3] and k.values().tolist() == [1, 2, 3, 4, 5]


def read_all(col: JaggedColumn) -> list[list[int]]:
    return as_lists(col.read(torch.arange(col.lengths.numel())))


def test_column_appends_compacts_and_grows():
    # 4 rows, mean length 1: the pool starts at max(max_length, 4 * 1 * 1.25) = 5 values
    col = JaggedColumn(4, JaggedFieldSpec(4, torch.int64, mean_length=1))
    assert col.values.numel() == 5
    col.write(torch.tensor([0, 1]), Jagged(torch.tensor([2, 3]), torch.tensor([1, 2, 3, 4, 5])))
    assert read_all(col) == [[1, 2], [3, 4, 5], [], []] and int(col.tail) == 5
    # 2 more values do not fit: the 5 live values move to the front and the pool doubles to 10
    col.write(torch.tensor([2]), Jagged(torch.tensor([2]), torch.tensor([6, 7])))
    assert read_all(col) == [[1, 2], [3, 4, 5], [6, 7], []]
    assert col.values.numel() == 10 and int(col.tail) == 7
    # overwriting row 0 frees its 2 values: 5 live + 4 new fit in 10 after compaction, no growth
    col.write(torch.tensor([0]), Jagged(torch.tensor([4]), torch.tensor([8, 9, 10, 11])))
    assert read_all(col) == [[8, 9, 10, 11], [3, 4, 5], [6, 7], []]
    assert col.values.numel() == 10 and int(col.tail) == 9
    assert col.values[:5].tolist() == [3, 4, 5, 6, 7] and col.offsets.tolist() == [5, 0, 3, 5]


def test_column_padded_round_trip_and_state_dict_of_another_pool_size():
    spec = JaggedFieldSpec(3, torch.int64, mean_length=1)
    a = JaggedColumn(4, spec)
    a.write(torch.tensor([3, 1]), Jagged(torch.tensor([3, 1]), torch.tensor([7, 8, 9, 6])))
    padded, lengths = a.padded()
    assert padded.tolist() == [[0, 0, 0], [6, 0, 0], [0, 0, 0], [7, 8, 9]] and lengths.tolist() == [0, 1, 0, 3]
    b = JaggedColumn(4, spec)
    b.load_padded(padded, lengths)
    assert read_all(b) == read_all(a) == [[], [6], [], [7, 8, 9]]
    a.write(torch.tensor([0, 2]), Jagged(torch.tensor([3, 3]), torch.arange(6)))  # grows a's pool
    assert a.values.numel() > b.values.numel()
    b.load_state_dict(a.state_dict())  # adopts the saved pool size
    assert b.values.numel() == a.values.numel() and read_all(b) == read_all(a)
