"""Python lists of positions as index tensors, converted once and cheaply.

Indexing a tensor with a Python list (``t[rows]``, ``t[rows, cols] = v``) makes torch build an index tensor element
by element, with several type checks per element: about 1,700 instructions an element (callgrind), 2 % of the
consumer's instructions, and four times over when the same list indexes four tensors. NumPy reads a list of ints
in a few ns an element; the tensor then shares its memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor


def index_of(rows: Iterable[int], count: int | None = None) -> Tensor:
    """int64 [count] of ``rows``: a list, a range or any sequence of Python ints (``count`` defaults to its length),
    or an iterator (a chain of lists, say) with its ``count``."""
    if count is None:
        if not isinstance(rows, Sequence):
            raise TypeError("index_of needs the count of an iterator's ints")
        count = len(rows)
    return torch.from_numpy(np.fromiter(rows, dtype=np.int64, count=count))
