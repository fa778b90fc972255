"""The history groups of a few rows (a single ranking) in NumPy: :func:`recsys.model.nearest_history_groups` of
:func:`recsys.model.window_sums` without torch's per-operation overhead, and each group's bias computed once.

With torch ops the groups and their bias took about 0.1 ms of CPU per ranking, and ranking requests per second at
concurrency 4 fell to 0.82 × the previous release's (docs/performance.md, "History groups")."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from recsys.model import PAD, ModelConfig, PersonaModel, distribution_bias


class HistoryRows:
    """A model's frozen history groups: its item embeddings [N, D] (float32, not copied), the groups' unit centres
    [G, D] (float64, as the model compares them) and each group's bias row [G, N] (:func:`distribution_bias` of its
    next-item distribution, as :func:`recsys.model.history_group_bias` computes it for each of its sessions)."""

    def __init__(self, items: Tensor, centres: Tensor, distributions: Tensor, cfg: ModelConfig) -> None:
        self.items = items.detach().numpy()
        self.centres = np.ascontiguousarray(centres.numpy(), dtype=np.float64)
        self.bias_rows = distribution_bias(distributions, cfg.history_bias_weight, cfg.history_bias_smoothing)

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
        """The bias [B, N] of sessions in ``groups`` [B] with ``prototypes`` [B] (0 for -1 in either)."""
        return self.bias_rows[groups.clamp(min=0)] * ((prototypes >= 0) & (groups >= 0)).unsqueeze(1)


def history_rows_of(model: PersonaModel) -> HistoryRows | None:
    """The model's history groups as :class:`HistoryRows`; ``None`` when it has none (or they are off)."""
    bank = model.bank
    if not bank.has_history_groups():
        return None
    return HistoryRows(model.device_model.items.weight, bank.history_centres, bank.history_items, model.cfg)
