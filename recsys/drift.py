"""Drift signals of METHOD.md §6: how far live traffic has moved from the training period.

Pure math on counts and distances; the consumer exports the values as Prometheus gauges.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from recsys.model import PersonaModel
from recsys.splits import Examples


def _normalise(x: np.ndarray, eps: float) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64).clip(min=0) + eps
    return x / x.sum()


def psi(expected: np.ndarray, actual: np.ndarray, eps: float = 1e-4) -> float:
    """Population stability index between two histograms (0 = same; > 0.25 is a large shift by convention)."""
    p, q = _normalise(expected, eps), _normalise(actual, eps)
    return float(np.sum((q - p) * np.log(q / p)))


def js_divergence(p_counts: np.ndarray, q_counts: np.ndarray, eps: float = 1e-12) -> float:
    """Jensen–Shannon divergence in bits, in [0, 1] (0 = same distribution)."""
    p, q = _normalise(p_counts, eps), _normalise(q_counts, eps)
    m = 0.5 * (p + q)
    return float(0.5 * np.sum(p * np.log2(p / m)) + 0.5 * np.sum(q * np.log2(q / m)))


@dataclass
class DriftReference:
    """Training-period distributions that live traffic is compared against (stored in the bundle)."""

    prototype_mix: list[float]
    distance_quantiles: dict[str, float]  # q50, q90, q99 of code→nearest-centre distance
    edit_norm_quantiles: dict[str, float]

    def ood_score(self, distance: float) -> float:
        """Distance to the nearest centre in units of the training 99th percentile (> 1 = unusual)."""
        return distance / max(self.distance_quantiles.get("q99", 1.0), 1e-9)

    def to_json(self) -> dict[str, Any]:
        return {
            "prototype_mix": self.prototype_mix,
            "distance_quantiles": self.distance_quantiles,
            "edit_norm_quantiles": self.edit_norm_quantiles,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DriftReference:
        return cls(list(data["prototype_mix"]), dict(data["distance_quantiles"]), dict(data["edit_norm_quantiles"]))


@torch.inference_mode()
def drift_reference(model: PersonaModel, examples: Examples, batch: int = 2048) -> DriftReference:
    """Prototype mix, distance and edit-norm quantiles of the given (training-period) sessions."""
    model.eval()
    protos, dists, norms = [], [], []
    base_norm = model.device_model.head_weight.norm()
    for i in range(0, len(examples), batch):
        hist = torch.from_numpy(examples.histories[i : i + batch])
        codes = model.codes(hist)
        edit = model.edit_for(codes, "prototype")
        protos.append(edit.prototype)
        dists.append(model.bank.distances(codes, edit.prototype))
        norms.append(edit.weight.flatten(1).norm(dim=1) / base_norm)
    k = model.bank.centres.shape[0]
    mix = torch.bincount(torch.cat(protos), minlength=k).double()
    d = torch.cat(dists).double().numpy()
    n = torch.cat(norms).double().numpy()

    def q(x: np.ndarray) -> dict[str, float]:
        return {f"q{p}": float(np.quantile(x, p / 100)) for p in (50, 90, 99)} if len(x) else {}

    return DriftReference((mix / mix.sum().clamp(min=1)).tolist(), q(d), q(n))


class SlidingCounts:
    """Counts of the last ``window`` observations over ``n`` categories (O(1) per update)."""

    def __init__(self, n: int, window: int) -> None:
        self.counts = np.zeros(n, dtype=np.int64)
        self.window = window
        self._recent: deque[int] = deque()

    def add(self, category: int) -> None:
        self._recent.append(category)
        self.counts[category] += 1
        if len(self._recent) > self.window:
            self.counts[self._recent.popleft()] -= 1

    def add_many(self, categories: Sequence[int]) -> None:
        """:meth:`add` of each category in order, as a few array operations (a poll batch at a time)."""
        if not len(categories):
            return
        n = len(self.counts)
        self._recent.extend(categories)
        self.counts += np.bincount(np.asarray(categories, dtype=np.int64), minlength=n)
        over = len(self._recent) - self.window
        if over > 0:
            popleft = self._recent.popleft
            self.counts -= np.bincount(np.fromiter((popleft() for _ in range(over)), np.int64, over), minlength=n)

    def __len__(self) -> int:
        return len(self._recent)
