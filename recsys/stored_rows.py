"""The bank's per-prototype tensors rebuilt from the store's rows (one decoder per column, one policy for all)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor


def overlay_stored(initial: Tensor, stored: Sequence[bytes | None], decode: Callable[[bytes], Tensor]) -> Tensor:
    """``initial`` [K, ...] (the bundle's rows) with row k replaced by ``decode(stored[k])`` (in prototype order). A
    row stored before its column existed (``None``) keeps the bundle's; ``decode`` raises ``ValueError`` for bytes
    that do not fit the model."""
    out = initial.clone()
    for k, raw in enumerate(stored):
        if raw is not None:
            out[k] = decode(raw)
    return out
