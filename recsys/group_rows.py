"""A single ranking's whole group bias in NumPy, one row per session: the prototype's counts term
(:func:`recsys.model.group_bias`), the fine groups' (:class:`recsys.fine_rows.FineRows`) and the history groups'
(:class:`recsys.history_rows.HistoryRows`) summed into one array.

Built with torch, each term paid torch's per-operation overhead on its own [B, N] tensor (the counts term about ten
operations, the history groups' five) and the sum allocated two more; a single row's terms are a few NumPy calls."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from recsys.fine_rows import FineRows
from recsys.history_rows import HistoryRows
from recsys.model import ModelConfig


def counts_bias_row(counts: np.ndarray, weight: float, smoothing: float) -> np.ndarray | None:
    """``β · log1p(n_i / (α · n̄))`` [N] float32 of one prototype's next-item counts [N] (:func:`recsys.model.
    group_bias` for one row, within float32 rounding); ``None`` for a prototype without counts (its bias is 0)."""
    mean = counts.mean(dtype=np.float32)
    if not mean > 0:
        return None
    scale = np.float32(1.0) / max(np.float32(smoothing) * mean, np.float32(1e-30))
    return np.log1p(counts * scale) * np.float32(weight)


class GroupRows:
    """The group terms a model has (each may be absent; the fine and history groups are fixed after training) and its
    config, whose counts-term settings are read at each call as :func:`recsys.model.group_bias` reads them."""

    def __init__(self, cfg: ModelConfig, fine: FineRows | None, history: HistoryRows | None) -> None:
        self.cfg = cfg
        self.fine = fine
        self.history = history

    def __call__(
        self, next_items: Tensor | None, prototypes: Tensor, codes: Tensor, groups: Tensor | None
    ) -> Tensor | None:
        """The group bias [B, N] of sessions with ``prototypes`` [B] (-1: none, no bias), edit ``codes`` [B, L, d]
        and history ``groups`` [B] (-1: an empty window; ``None``: not read) under the prototypes' next-item counts
        ``next_items`` [K, N]; ``None`` when no term applies (as :meth:`recsys.online.OnlineModel.group_bias`)."""
        weight, smoothing = self.cfg.group_bias_weight, self.cfg.group_bias_smoothing
        counts = None if next_items is None or weight == 0.0 else next_items.numpy()
        history = None if groups is None else self.history
        if counts is None and self.fine is None and history is None:
            return None
        flat = codes.reshape(codes.shape[0], -1).numpy()
        group = None if groups is None else groups.tolist()
        out = np.zeros((flat.shape[0], self.cfg.n_items), dtype=np.float32)
        for b, proto in enumerate(prototypes.tolist()):
            if proto < 0:
                continue  # no prototype: the base model, no bias
            row = None if counts is None else counts_bias_row(counts[proto], weight, smoothing)
            if self.fine is not None:  # summed in the torch path's order: counts, fine, history
                fine = self.fine.row(flat[b])
                row = fine if row is None else row + fine
            if history is not None and group is not None and group[b] >= 0:
                own = history.rows[group[b]]
                row = own if row is None else row + own
            if row is not None:
                out[b] = row
        return torch.from_numpy(out)
