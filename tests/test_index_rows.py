"""Index tensors from Python ints (recsys.index_rows): the same values torch would build, from lists and chains."""

from __future__ import annotations

import itertools

import pytest
import torch

from recsys.index_rows import index_of


def test_index_of_a_list_and_a_range_equals_torchs_own_tensor() -> None:
    rows = [5, 0, 3, 3, 2**40]
    assert torch.equal(index_of(rows), torch.tensor(rows, dtype=torch.int64))
    assert torch.equal(index_of(range(2, 7)), torch.arange(2, 7))
    assert index_of([]).shape == (0,)


def test_index_of_an_iterator_reads_exactly_count_ints_and_needs_it() -> None:
    windows = [[1, 2, 3], [], [4, 5]]
    chained = itertools.chain.from_iterable(windows)
    assert index_of(chained, 5).tolist() == [1, 2, 3, 4, 5]
    with pytest.raises(TypeError, match="count"):
        index_of(itertools.chain.from_iterable(windows))
