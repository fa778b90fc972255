"""Early stopping: the base model's stage waits its own, longer patience; the other stages keep ``patience``.

Why it matters: on leave-one-out MovieLens-100K the base model's validation curve peaks early, falls and stays flat
for 15-20 epochs, then climbs again; a short patience stops it inside the flat stretch (test NDCG@10 0.040 against
0.058, docs/results.md).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from recsys.splits import Examples
from recsys.train import Batch, TrainConfig, fit_stage


def _examples(n: int = 8) -> Examples:
    return Examples(
        histories=np.ones((n, 3), dtype=np.int64),
        targets=np.ones(n, dtype=np.int64),
        users=np.zeros(n, dtype=np.int64),
        ts=np.zeros(n),
    )


def _run(scores: list[float], tc: TrainConfig, patience: int | None) -> tuple[int, int, float]:
    """(epochs run, best epoch, the weight kept) of a stage whose validation returns ``scores`` in turn and whose
    one weight counts the optimiser's steps, so the restored state tells which epoch's weights were kept."""
    layer = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(layer.weight)
    feed = iter(scores)

    def loss(b: Batch) -> torch.Tensor:
        return layer.weight.sum()  # a constant gradient: each Adam step moves the weight down

    stage = fit_stage(
        "t", layer, loss, lambda: next(feed), _examples(), tc, len(scores) - 1,
        set_modes=lambda: None, progress=False, batch_size=8, patience=patience,
    )  # fmt: skip
    return stage.epochs, stage.best_epoch, float(layer.weight.detach()[0, 0])


def test_a_late_second_climb_is_reached_only_with_the_long_patience() -> None:
    # a first peak at epoch 1, a flat stretch of 6 epochs, then a better score at epoch 8
    curve = [0.0, 0.5, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4, 0.6, 0.5]
    tc = TrainConfig(patience=3, base_patience=10)
    epochs, best, _ = _run(curve, tc, patience=None)  # the stage default: tc.patience
    assert (epochs, best) == (4, 1)
    epochs, best, _ = _run(curve, tc, patience=tc.base_patience)
    assert (epochs, best) == (9, 8)


def test_the_best_epochs_weights_are_restored_after_a_long_patience() -> None:
    tc = TrainConfig(patience=1, lr=0.1)
    _, best, kept = _run([0.0, 0.3, 0.9, 0.2, 0.1, 0.1], tc, patience=5)
    assert best == 2
    assert kept == _run([0.0, 0.3, 0.9], tc, None)[2] < 0.0  # two epochs of steps, not five


def test_defaults_give_the_base_model_the_long_patience() -> None:
    tc = TrainConfig()
    assert tc.base_patience >= 50 > tc.patience and tc.epochs >= 100
    assert TrainConfig.from_dict({"patience": 4}).base_patience == tc.base_patience  # a bundle from before loads
