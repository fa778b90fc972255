"""The baselines of `persona evaluate` on tiny fixed examples with hand-computed ranks, and their settings
chosen on validation."""

from __future__ import annotations

import numpy as np
import torch

from recsys.baselines import (
    FINETUNE_GRID,
    FinetuneMethod,
    RecentPopularityMethod,
    SessionRepeatMethod,
    choose_finetune,
    choose_recent_window,
    finetune_edit,
    stream_before,
)
from recsys.evaluate import BaseMethod, evaluate_examples, evaluate_method
from recsys.metrics import target_ranks
from recsys.model import PAD, ModelConfig, PersonaModel
from recsys.splits import Examples

# Items 0 (PAD) and 1 (UNK) are never ranked; training-period popularity of items 2..5: 1, 5, 2, 1.
COUNTS = np.array([0, 0, 1, 5, 2, 1])


def _ranks(method: RecentPopularityMethod | SessionRepeatMethod, hist: torch.Tensor, targets: list[int]) -> list[int]:
    return target_ranks(method.score(hist), torch.tensor(targets)).tolist()


def _examples(targets: list[int], ts: list[float] | None = None, t: int = 4) -> Examples:
    n = len(targets)
    return Examples(
        histories=np.full((n, t), 2, dtype=np.int64),
        targets=np.array(targets, dtype=np.int64),
        users=np.arange(n, dtype=np.int64),
        ts=np.array(ts if ts is not None else range(n), dtype=np.float64),
    )


def test_recent_popularity_ranks_by_window_counts_then_popularity_and_slides_after_scoring() -> None:
    m = RecentPopularityMethod(COUNTS, prior=np.array([3, 3, 2, 4, 2]), window=3)  # window [2, 4, 2]
    hist = torch.full((4, 3), 2)
    # counts 2:2, 4:1; the rest by popularity: 3 (5) then 5 (1) -> order 2, 4, 3, 5
    assert _ranks(m, hist, [2, 4, 3, 5]) == [0, 1, 2, 3]
    m.observe(hist[:2], torch.tensor([5, 5]))  # window [2, 5, 5]: 5:2, 2:1, then 3, 4 by popularity
    assert _ranks(m, hist, [5, 2, 3, 4]) == [0, 1, 2, 3]


def test_recent_popularity_through_the_evaluation_path_sees_each_batch_only_after_scoring_it() -> None:
    m = RecentPopularityMethod(COUNTS, prior=np.array([2]), window=2)
    # batch 1 [4, 4] scored with window [2]: 2, 3, 4, 5 -> ranks 2, 2; then window [4, 4]
    # batch 2 [5, 4] scored with window [4, 4]: 4, 3, 2, 5 -> ranks 3, 0
    ev = evaluate_examples(m, _examples([4, 4, 5, 4]), batch_size=2)
    expected = 1.0 / np.log2(np.array([2, 2, 3, 0]) + 2.0)
    np.testing.assert_allclose(ev.ndcg10, expected)
    assert ev.metrics["ndcg@10"] == float(np.mean(expected))


def test_session_repeat_ranks_the_sessions_items_by_count_then_recency_then_popularity() -> None:
    counts = np.array([0, 0, 1, 9, 0, 0, 4])
    m = SessionRepeatMethod(counts)
    first = [PAD, 1, 4, 3, 4, 5, 3]  # UNK (1) and PAD are never counted
    second = [PAD, PAD, PAD, PAD, 6, 2, 6]
    hist = torch.tensor([first] * 5 + [second] * 2)
    # first: 3 and 4 twice each (3 more recent), 5 once; then the others by popularity: 6 (4), 2 (1)
    # second: 6 twice, 2 once, then 3 (popularity 9)
    assert _ranks(m, hist, [3, 4, 5, 6, 2, 6, 3]) == [0, 1, 2, 3, 4, 0, 2]


def test_session_repeat_with_an_empty_history_is_popularity() -> None:
    m = SessionRepeatMethod(COUNTS)
    assert _ranks(m, torch.zeros(4, 5, dtype=torch.long), [3, 4, 2, 5]) == [0, 1, 3, 3]  # 2 and 5 tie: pessimistic


def test_recent_window_is_chosen_on_validation() -> None:
    prior = np.array([2] * 50 + [3] * 2)  # long ago item 2, lately item 3
    shifted = choose_recent_window(COUNTS, prior, _examples([3, 3, 3]), windows=(100, 2))
    assert shifted.window == 2 and shifted.valid_ndcg10 == {"100": 1 / np.log2(3), "2": 1.0}
    steady = choose_recent_window(COUNTS, prior, _examples([2, 2, 2]), windows=(2, 100))
    assert steady.window == 100


def test_stream_before_orders_the_periods_interactions_by_time() -> None:
    early, late = _examples([4, 5], ts=[1.0, 5.0]), _examples([3, 2], ts=[0.5, 3.0])
    assert stream_before(early, late).tolist() == [3, 4, 2, 5]


def _model() -> PersonaModel:
    torch.manual_seed(0)
    cfg = ModelConfig(n_items=40, dim=8, max_len=8, code_dim=4, n_prototypes=2, dropout=0.0)
    return PersonaModel(cfg).eval()


def _histories(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    h = torch.randint(2, 8, (n, 8), generator=g)  # a few items, repeated: something to fit
    h[: n // 3, :4] = PAD
    return h


def test_batched_finetuning_is_each_sessions_own_finetuning() -> None:
    model, h = _model(), _histories(5)
    for optimizer in ("sgd", "adam"):
        batched = finetune_edit(model, h, lr=0.05, optimizer=optimizer)
        for i in range(len(h)):
            alone = finetune_edit(model, h[i : i + 1], lr=0.05, optimizer=optimizer)
            torch.testing.assert_close(batched.weight[i], alone.weight[0], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(batched.bias[i], alone.bias[0], rtol=1e-4, atol=1e-6)


def test_finetune_grid_has_a_do_no_harm_step_and_adam() -> None:
    assert min(lr for _, lr in FINETUNE_GRID) <= 1e-4
    assert {opt for opt, _ in FINETUNE_GRID} == {"sgd", "adam"}
    model, h = _model(), _histories(6)
    with torch.inference_mode():
        base = model.score(h)
        tiny = FinetuneMethod(model, lr=1e-4, optimizer="sgd").score(h)
        big = FinetuneMethod(model, lr=1.0, optimizer="sgd").score(h)
    assert (tiny - base).abs().max() < 1e-3 * base.abs().max()  # almost the base model
    assert (big - base).abs().max() > 100 * (tiny - base).abs().max()


def test_finetune_setting_is_chosen_on_validation() -> None:
    model = _model()
    h = _histories(30, seed=1).numpy()
    valid = Examples(h[:, :-1].copy(), h[:, -1].copy(), np.arange(30), np.arange(30, dtype=np.float64))
    grid = (("sgd", 1e4), ("sgd", 1e-4), ("adam", 1e-2))  # a step that wrecks the head, and two that do not
    choice = choose_finetune(model, valid, grid=grid, max_examples=20)
    recent = valid.subset(np.arange(10, 30))  # the most recent 20 validation examples
    scores = {
        f"{o}@{lr:g}": evaluate_method(FinetuneMethod(model, lr=lr, optimizer=o), recent)["ndcg@10"] for o, lr in grid
    }
    assert choice.valid_ndcg10 == scores
    assert (choice.optimizer, choice.lr) != ("sgd", 1e4)
    assert scores[f"{choice.optimizer}@{choice.lr:g}"] == max(scores.values())
    assert scores["sgd@0.0001"] == evaluate_method(BaseMethod(model), recent)["ndcg@10"]
