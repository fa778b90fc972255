"""A session's edit as compact bytes for a device (docs/device.md "Binary edit layout").

Little-endian throughout. A 32-byte fixed header, the model version, then the arrays, each starting at a multiple
of 4 bytes so a reader can view them in place:

======  =====  =========================================================================
offset  bytes  field
======  =====  =========================================================================
0       4      magic ``b"PEDT"``
4       2      format version (uint16, :data:`FORMAT_VERSION`)
6       1      dtype of every array: 1 = float16, 2 = float32
7       1      flags: bit 0 = low-rank factors instead of ΔW, bit 1 = an item bias follows
8       2      L, editable layers (uint16)
10      2      D, layer width (uint16)
12      2      r, rank of the factors (uint16; 0 without bit 0)
14      2      m, bytes of the model version (uint16)
16      4      N, length of the item bias (uint32; 0 without bit 1)
20      4      prototype id (int32; -1 = none)
24      8      edit version (uint64)
32      m      model version, UTF-8, then zero padding to a multiple of 4
...            full: ΔW [L, D, D] (row = output unit); low-rank: U [L, D, r] then V [L, r, D], ΔW_l = U_l V_l
...            Δb [L, D]
...            item bias [N] (bit 1 only): added to every item's score, index = vocabulary index
======  =====  =========================================================================

The low-rank form is the truncated SVD of the exact ΔW_l (the prototype's edit plus the session's clipped residual
is full-rank in general), so it is an approximation whose cost docs/device.md measures.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

MAGIC = b"PEDT"
FORMAT_VERSION = 1
HEADER = struct.Struct("<4sHBBHHHHIiQ")
DTYPES: dict[int, np.dtype[Any]] = {1: np.dtype("<f2"), 2: np.dtype("<f4")}
DTYPE_CODES = {"float16": 1, "float32": 2}
LOW_RANK = 1
HAS_BIAS = 2

__all__ = ["DeviceEdit", "decode_edit", "encode_edit", "encoded_size", "low_rank_factors"]


@dataclass(frozen=True)
class DeviceEdit:
    """An edit as a device receives it. ``weight`` [L, D, D] (None when factored), ``factors`` (U [L, D, r],
    V [L, r, D]) or None, ``bias`` [L, D], ``item_bias`` [N] or None; arrays in the wire dtype."""

    model_version: str
    edit_version: int
    prototype_id: int
    bias: np.ndarray
    weight: np.ndarray | None = None
    factors: tuple[np.ndarray, np.ndarray] | None = None
    item_bias: np.ndarray | None = None

    def full_weight(self) -> np.ndarray:
        """ΔW [L, D, D] as float32 (``U V`` for a factored edit)."""
        if self.weight is not None:
            return self.weight.astype(np.float32)
        assert self.factors is not None
        u, v = self.factors
        return np.matmul(u.astype(np.float32), v.astype(np.float32))


def low_rank_factors(weight: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """The best rank-``rank`` factors (U [L, D, r], V [L, r, D]) of ΔW [L, D, D] in Frobenius norm (truncated SVD;
    the singular values are split evenly between U and V so both stay in float16's range)."""
    u, s, vt = np.linalg.svd(weight.astype(np.float64), full_matrices=False)
    root = np.sqrt(s[:, :rank])
    return (u[:, :, :rank] * root[:, None, :]).astype(np.float32), (root[:, :, None] * vt[:, :rank]).astype(np.float32)


def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


def encoded_size(n_layers: int, dim: int, *, dtype: str, rank: int = 0, n_items: int = 0, version: str = "") -> int:
    """Bytes of :func:`encode_edit`'s output for these shapes (``n_items`` = 0: no item bias)."""
    m = len(version.encode("utf-8"))
    width = DTYPES[DTYPE_CODES[dtype]].itemsize
    weight = 2 * n_layers * dim * rank if rank else n_layers * dim * dim
    arrays = [weight, n_layers * dim, n_items]
    return HEADER.size + m + _pad4(m) + sum(a * width + _pad4(a * width) for a in arrays)


def encode_edit(edit: DeviceEdit, dtype: str = "float16") -> bytes:
    """The binary layout of ``edit`` (see the module docstring) with every array in ``dtype``."""
    if dtype not in DTYPE_CODES:
        raise ValueError(f"unknown dtype {dtype!r}: use float16 or float32")
    code = DTYPE_CODES[dtype]
    wire = DTYPES[code]
    n_layers, dim = edit.bias.shape
    flags, rank, arrays = 0, 0, []
    if edit.factors is not None:
        u, v = edit.factors
        flags |= LOW_RANK
        rank = u.shape[2]
        arrays += [u, v]
    else:
        assert edit.weight is not None
        arrays.append(edit.weight)
    arrays.append(edit.bias)
    n_items = 0
    if edit.item_bias is not None:
        flags |= HAS_BIAS
        n_items = edit.item_bias.shape[0]
        arrays.append(edit.item_bias)
    version = edit.model_version.encode("utf-8")
    parts = [
        HEADER.pack(
            MAGIC,
            FORMAT_VERSION,
            code,
            flags,
            n_layers,
            dim,
            rank,
            len(version),
            n_items,
            edit.prototype_id,
            edit.edit_version,
        ),
        version,
        b"\0" * _pad4(len(version)),
    ]
    for a in arrays:
        raw = np.ascontiguousarray(a, dtype=wire).tobytes()
        parts += [raw, b"\0" * _pad4(len(raw))]
    return b"".join(parts)


def decode_edit(data: bytes) -> DeviceEdit:
    """Inverse of :func:`encode_edit`; ``ValueError`` on anything that is not a complete edit of this format."""
    if len(data) < HEADER.size:
        raise ValueError(f"an edit has at least {HEADER.size} bytes, got {len(data)}")
    magic, fmt, code, flags, n_layers, dim, rank, m, n_items, proto, edit_version = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ValueError(f"not a Persona edit (magic {magic!r})")
    if fmt != FORMAT_VERSION:
        raise ValueError(f"edit format {fmt}, this reader knows {FORMAT_VERSION}")
    if code not in DTYPES:
        raise ValueError(f"unknown dtype code {code}")
    wire = DTYPES[code]
    pos = HEADER.size
    version = data[pos : pos + m].decode("utf-8")
    pos += m + _pad4(m)

    def take(*shape: int) -> np.ndarray:
        nonlocal pos
        count = int(np.prod(shape))
        size = count * wire.itemsize
        if pos + size > len(data):
            raise ValueError("edit truncated")
        out = np.frombuffer(data, dtype=wire, count=count, offset=pos).reshape(shape)
        pos += size + _pad4(size)
        return out

    weight = factors = None
    if flags & LOW_RANK:
        factors = (take(n_layers, dim, rank), take(n_layers, rank, dim))
    else:
        weight = take(n_layers, dim, dim)
    bias = take(n_layers, dim)
    item_bias = take(n_items) if flags & HAS_BIAS else None
    if pos != len(data):
        raise ValueError(f"edit has {len(data) - pos} trailing bytes")
    return DeviceEdit(version, edit_version, proto, bias, weight, factors, item_bias)
