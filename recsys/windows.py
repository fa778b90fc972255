"""The encoder's window over a session's history (METHOD.md §1: "the last T ≤ 50 items").

Shared by training data (:mod:`recsys.splits`), the online model and the consumer's encoder cache, so the
window a model was trained on is the one it is served with.
"""

from __future__ import annotations

import numpy as np

__all__ = ["window_length", "window_lengths"]


def window_length(n: int, max_len: int, stride: int) -> int:
    """How many of the last items of an ``n``-item history the encoder reads.

    Stride 0: the last ``min(n, max_len)``, a window that slides by one item per event. Stride S > 0: once the
    history is longer than ``max_len``, a new window starts every S items, so a window grows by one item per event
    between starts and holds between ``max_len - S + 1`` and ``max_len`` items. Positions count from the window's
    start, so the encoder's keys and values of a window's first items never change while it grows: the consumer
    keeps them between batches (:mod:`recsys.encoder_cache`) and encodes only the new items.
    """
    if stride <= 0 or n <= max_len:
        return min(n, max_len)
    return max_len - stride + 1 + (n - max_len - 1) % stride


def window_lengths(n: np.ndarray, max_len: int, stride: int) -> np.ndarray:
    """:func:`window_length` of every entry of ``n`` (int64)."""
    n = np.asarray(n, dtype=np.int64)
    if stride <= 0:
        return np.minimum(n, max_len)
    return np.where(n <= max_len, n, max_len - stride + 1 + (n - max_len - 1) % stride)
