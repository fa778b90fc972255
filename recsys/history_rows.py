"""The history groups of a few rows (a single ranking) in NumPy: :func:`recsys.model.nearest_history_groups` of
:func:`recsys.model.window_sums` without torch's per-operation overhead, and each group's bias computed once.

With torch ops the groups and their bias took about 0.1 ms of CPU per ranking, and ranking requests per second at
concurrency 4 fell to 0.82 × the previous release's (docs/performance.md, "History groups")."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from recsys.model import PAD, PersonaModel, history_bias_rows, history_group_bias


class HistoryRows:
    """A model's frozen history groups: its item embeddings [N, D] (float32, not copied), the groups' unit centres
    [G, D] (float64, as the model compares them) and their bias rows [G, N] (:func:`recsys.model.history_bias_rows`,
    computed once)."""

    def __init__(self, items: Tensor, centres: Tensor, bias_rows: Tensor) -> None:
        self.items = items.detach().numpy()
        self.centres = np.ascontiguousarray(centres.numpy(), dtype=np.float64)
        self.bias_rows = bias_rows
        self.rows = bias_rows.numpy()  # the same memory, for a single ranking's NumPy sum (recsys.group_rows)

    def groups(self, histories: np.ndarray) -> Tensor:
        """The nearest group [B] of each window [B, T] (-1: no item), as the model picks it: float64 sums and
        products, so only an exact tie could part them."""
        out = np.full(histories.shape[0], -1, dtype=np.int64)
        for b, row in enumerate(histories):
            window = row[row != PAD]
            if len(window):
                out[b] = int(np.argmax(self.centres @ self.items[window].astype(np.float64).sum(0)))
        return torch.from_numpy(out)

    def bias(self, groups: Tensor, prototypes: Tensor) -> Tensor:
        """The bias [B, N] of sessions in ``groups`` [B] with ``prototypes`` [B] (:func:`history_group_bias`)."""
        return history_group_bias(groups, prototypes, self.bias_rows)


def history_rows_of(model: PersonaModel) -> HistoryRows | None:
    """The model's history groups as :class:`HistoryRows`; ``None`` when it has none (or they are off)."""
    bank = model.bank
    rows = history_bias_rows(bank.history_items, model.cfg)
    if rows is None or not bank.has_history_groups():
        return None
    return HistoryRows(model.device_model.items.weight, bank.history_centres, rows)
