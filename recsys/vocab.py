"""Item vocabulary: original item ids <-> dense indices, with two reserved slots (PAD = 0, UNK = 1).

Indices are assigned in sorted (lexicographic) id order, so the same set of items gives the same indices
whatever the row order of the data - a bundle's vocabulary is reproducible from its training items.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import polars as pl

from recsys.errors import BundleError

PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"


@dataclass
class ItemVocab:
    """Maps item ids to indices ``2..size-1``; ``PAD`` pads histories, ``UNK`` stands for unseen items.

    >>> v = ItemVocab.from_items(["b", "a", "b"])
    >>> v.ids, v.size, v.encode(["a", "zzz"]).tolist(), v.decode([2, 3])
    (['a', 'b'], 4, [2, 1], ['a', 'b'])
    """

    PAD: ClassVar[int] = 0
    UNK: ClassVar[int] = 1
    OFFSET: ClassVar[int] = 2

    ids: list[str]
    _table: pl.DataFrame | None = field(default=None, init=False, repr=False, compare=False)
    _index: dict[str, int] | None = field(default=None, init=False, repr=False, compare=False)
    _tokens: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def size(self) -> int:
        """Rows an embedding table needs (items + PAD + UNK)."""
        return len(self.ids) + self.OFFSET

    def __len__(self) -> int:
        return self.size

    def __contains__(self, item: object) -> bool:
        return isinstance(item, str) and item in self._lookup()

    @classmethod
    def from_items(cls, items: Iterable[str] | pl.Series) -> ItemVocab:
        """Build from any item ids (duplicates and order ignored: indices follow sorted id order)."""
        series = _as_series(items)
        return cls(ids=series.drop_nulls().unique().sort().to_list())

    def encode(self, items: Iterable[str] | pl.Series) -> np.ndarray:
        """Item ids → int64 indices (unknown or null → ``UNK``), vectorised with a polars join."""
        series = _as_series(items)
        if series.len() == 0:
            return np.zeros(0, dtype=np.int64)
        frame = pl.DataFrame({"item_id": series})
        joined = frame.join(self._frame(), on="item_id", how="left", maintain_order="left")
        return joined.get_column("idx").fill_null(self.UNK).to_numpy().astype(np.int64, copy=False)

    def decode(self, idx: Sequence[int] | np.ndarray) -> list[str]:
        """Indices → item ids (``<pad>`` / ``<unk>`` for the reserved slots); out of range → IndexError."""
        arr = np.asarray(idx, dtype=np.int64).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() >= self.size):
            raise IndexError(f"item index out of range [0, {self.size}): {arr[(arr < 0) | (arr >= self.size)][0]}")
        if self._tokens is None:
            self._tokens = np.array([PAD_TOKEN, UNK_TOKEN, *self.ids], dtype=object)
        return list(self._tokens[arr].tolist())

    def index_of(self, item: str) -> int:
        """Index of one item id (``UNK`` when unknown)."""
        return self._lookup().get(item, self.UNK)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form stored in model bundles."""
        return {"pad": self.PAD, "unk": self.UNK, "ids": list(self.ids)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ItemVocab:
        """Inverse of ``to_json``; a malformed payload is a ``BundleError`` (the bundle is damaged)."""
        ids = d.get("ids") if isinstance(d, dict) else None
        if not isinstance(ids, list) or not all(isinstance(x, str) for x in ids):
            raise BundleError("item vocabulary in the bundle is malformed", "re-export the bundle")
        if d.get("pad", cls.PAD) != cls.PAD or d.get("unk", cls.UNK) != cls.UNK:
            raise BundleError("item vocabulary uses other PAD/UNK slots", "re-export the bundle with this version")
        if len(set(ids)) != len(ids):
            raise BundleError("item vocabulary in the bundle has duplicate ids", "re-export the bundle")
        return cls(ids=list(ids))

    def _frame(self) -> pl.DataFrame:
        if self._table is None:
            self._table = pl.DataFrame(
                {
                    "item_id": pl.Series(self.ids, dtype=pl.Utf8),
                    "idx": pl.int_range(self.OFFSET, self.size, dtype=pl.Int64, eager=True),
                }
            )
        return self._table

    def _lookup(self) -> dict[str, int]:
        if self._index is None:
            self._index = {item: i + self.OFFSET for i, item in enumerate(self.ids)}
        return self._index


def _as_series(items: Iterable[str] | pl.Series) -> pl.Series:
    """Any iterable of ids (list, numpy array, polars Series) → Utf8 Series."""
    if isinstance(items, pl.Series):
        return items.cast(pl.Utf8)
    if isinstance(items, np.ndarray):
        return pl.Series(
            "item_id",
            items.astype(str).tolist() if items.dtype.kind != "O" else items.tolist(),
            dtype=pl.Utf8,
        )
    return pl.Series("item_id", list(items), dtype=pl.Utf8)
