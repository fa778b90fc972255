"""Ranking metrics: hand-computed values, pessimistic ties, invalid items, sampled protocol."""

from __future__ import annotations

import math
import time

import pytest
import torch

from recsys.metrics import RankingMetrics, sample_negatives, sampled_ranks, target_ranks

NEG_INF = -math.inf


def test_target_ranks_counts_strictly_higher_valid_items() -> None:
    # items:            PAD  UNK   2    3    4    5
    scores = torch.tensor(
        [
            [9.0, 9.0, 0.5, 0.9, 0.1, 0.3],  # target 3 is the best valid item -> 0
            [9.0, 9.0, 0.5, 0.9, 0.1, 0.3],  # target 4 is the worst -> 3 (items 2, 3, 5 above)
            [9.0, 9.0, 0.5, 0.9, 0.1, 0.3],  # target 5 -> 2 (items 2, 3 above)
        ]
    )
    ranks = target_ranks(scores, torch.tensor([3, 4, 5]))
    assert ranks.tolist() == [0, 3, 2]
    assert ranks.dtype == torch.int64


def test_ties_are_pessimistic_so_constant_scores_get_no_hits() -> None:
    scores = torch.zeros(2, 102)  # 100 valid items, all scored equally
    ranks = target_ranks(scores, torch.tensor([2, 101]))
    assert ranks.tolist() == [99, 99]  # behind every other valid item
    metrics = RankingMetrics()
    metrics.update(ranks)
    assert metrics.compute()["hr@20"] == 0.0

    # One tie above a strictly higher item: 1 higher + 1 equal = 2.
    tied = torch.tensor([[0.0, 0.0, 0.7, 0.5, 0.5, 0.1]])
    assert target_ranks(tied, torch.tensor([3])).tolist() == [2]


def test_invalid_columns_never_count_even_with_huge_scores() -> None:
    scores = torch.tensor([[100.0, 100.0, 0.2, 0.1]])
    assert target_ranks(scores, torch.tensor([3])).tolist() == [1]  # only item 2 is above
    custom = torch.tensor([False, False, True, False])  # item 2 also never rankable
    assert target_ranks(scores, torch.tensor([3]), invalid=custom).tolist() == [2]  # PAD, UNK now count


def test_target_scored_minus_inf_ranks_last_among_valid_items() -> None:
    scores = torch.tensor([[5.0, 5.0, 0.1, NEG_INF, -3.0, NEG_INF]])
    # Valid others: item 2 and 4 higher, item 5 tied at -inf -> 3 = every other valid item.
    assert target_ranks(scores, torch.tensor([3])).tolist() == [3]


def test_invalid_target_is_always_a_miss_and_nan_never_helps() -> None:
    scores = torch.tensor([[0.0, 99.0, 0.1, 0.2, 0.3]])
    assert target_ranks(scores, torch.tensor([1])).tolist() == [3]  # UNK target: behind all 3 valid items
    nan_target = torch.tensor([[0.0, 0.0, 0.1, math.nan, 0.3]])
    assert target_ranks(nan_target, torch.tensor([3])).tolist() == [2]
    nan_other = torch.tensor([[0.0, 0.0, math.nan, 0.9, 0.3]])
    assert target_ranks(nan_other, torch.tensor([3])).tolist() == [1]


def test_target_ranks_on_a_million_items_is_cheap() -> None:
    generator = torch.Generator().manual_seed(0)
    n_items = 1_000_000
    scores = torch.rand(4, n_items, generator=generator)
    targets = torch.tensor([2, 10, 500_000, n_items - 1])
    scores[0, 2] = 2.0  # best item -> rank 0
    start = time.perf_counter()
    ranks = target_ranks(scores, targets)
    elapsed = time.perf_counter() - start
    expected = [int((scores[b, 2:] > scores[b, t]).sum()) for b, t in enumerate(targets.tolist())]
    assert ranks.tolist() == expected
    assert ranks[0] == 0
    assert elapsed < 2.0


def test_chunked_rows_give_the_same_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    import recsys.metrics as metrics_module

    generator = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 5, (7, 30), generator=generator).float()  # many ties
    targets = torch.randint(2, 30, (7,), generator=generator)
    whole = target_ranks(scores, targets)
    monkeypatch.setattr(metrics_module, "_CHUNK_ELEMENTS", 60)  # 2 rows per chunk
    assert target_ranks(scores, targets).tolist() == whole.tolist()


def test_target_ranks_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="targets must be"):
        target_ranks(torch.zeros(2, 5), torch.tensor([2]))
    with pytest.raises(ValueError, match="lie in"):
        target_ranks(torch.zeros(1, 5), torch.tensor([5]))


def test_ranking_metrics_hand_computed() -> None:
    metrics = RankingMetrics()
    metrics.update(torch.tensor([0, 4]))
    metrics.update(torch.tensor([9, 30]))
    result = metrics.compute()
    # ranks 0, 4, 9, 30
    assert result["n"] == 4
    assert result["hr@5"] == pytest.approx(2 / 4)  # 0, 4
    assert result["hr@10"] == pytest.approx(3 / 4)  # 0, 4, 9
    assert result["hr@20"] == pytest.approx(3 / 4)
    # NDCG gains: rank 0 -> 1/log2(2) = 1; rank 4 -> 1/log2(6) = 0.386853; rank 9 -> 1/log2(11) = 0.289065
    assert result["ndcg@10"] == pytest.approx((1.0 + 0.386853 + 0.289065) / 4, abs=1e-6)
    assert result["ndcg@20"] == pytest.approx((1.0 + 0.386853 + 0.289065) / 4, abs=1e-6)
    # MRR: 1/1 + 1/5 + 1/10 + 1/31 = 1.332258
    assert result["mrr"] == pytest.approx(1.332258 / 4, abs=1e-6)
    assert set(result) == {"hr@5", "hr@10", "hr@20", "ndcg@10", "ndcg@20", "mrr", "n"}


def test_empty_accumulator_reports_zeros() -> None:
    result = RankingMetrics().compute()
    assert result["n"] == 0
    assert all(value == 0 for value in result.values())


def test_ranking_metrics_rejects_negative_or_float_ranks() -> None:
    with pytest.raises(ValueError):
        RankingMetrics().update(torch.tensor([-1]))
    with pytest.raises(ValueError):
        RankingMetrics().update(torch.tensor([0.5]))


def test_sampled_ranks_hand_computed_without_ties() -> None:
    scores = torch.tensor([[0.0, 0.0, 0.9, 0.5, 0.1, 0.7, 0.2]])
    negatives = torch.tensor([[2, 4, 5, 6]])  # 0.9 and 0.7 beat the target's 0.5
    ranks = sampled_ranks(scores, torch.tensor([3]), negatives, torch.Generator().manual_seed(0))
    assert ranks.tolist() == [2]


def test_sampled_ranks_break_ties_uniformly_at_random() -> None:
    # Target 2 scores 0.5; one negative higher, three tied -> rank uniform over {1, 2, 3, 4}.
    scores = torch.tensor([[0.0, 0.0, 0.5, 0.9, 0.5, 0.5, 0.5, 0.1]])
    rows = 20_000
    negatives = torch.tensor([[3, 4, 5, 6, 7]]).expand(rows, -1)
    ranks = sampled_ranks(scores.expand(rows, -1), torch.full((rows,), 2), negatives, torch.Generator().manual_seed(7))
    counts = torch.bincount(ranks, minlength=6).tolist()
    assert counts[0] == 0 and counts[5] == 0
    # Chi-square against uniform over 4 cells (3 dof): 16.27 is the 0.999 quantile.
    expected = rows / 4
    chi2 = sum((counts[r] - expected) ** 2 / expected for r in range(1, 5))
    assert chi2 < 16.27


def test_sampled_ranks_refuse_the_target_as_a_negative() -> None:
    with pytest.raises(ValueError, match="equals its row's target"):
        sampled_ranks(torch.zeros(1, 5), torch.tensor([3]), torch.tensor([[2, 3]]), torch.Generator())


@pytest.mark.parametrize("n_items", [50, 5_000_000])  # exact small-catalogue path and rejection path
def test_sample_negatives_are_valid_distinct_and_never_the_target(n_items: int) -> None:
    generator = torch.Generator().manual_seed(3)
    targets = torch.tensor([2, 7, n_items - 1, 20])
    exclude = torch.tensor([[5, 6], [8, 0], [3, 4], [21, 22]])
    negatives = sample_negatives(n_items, targets, 40, generator, exclude=exclude)
    assert negatives.shape == (4, 40) and negatives.dtype == torch.int64
    assert bool((negatives >= 2).all()) and bool((negatives < n_items).all())
    assert not bool((negatives == targets[:, None]).any())
    assert not bool((negatives[:, :, None] == exclude[:, None, :]).any())
    for row in negatives:
        assert row.unique().numel() == 40


def test_sample_negatives_is_uniform_over_valid_items() -> None:
    generator = torch.Generator().manual_seed(11)
    n_items, rows = 12, 6000  # valid items 2..11 minus the target 2 and excluded 11 -> 8 items
    targets = torch.full((rows,), 2)
    negatives = sample_negatives(n_items, targets, 3, generator, exclude=torch.tensor([11]))
    counts = torch.bincount(negatives.flatten(), minlength=n_items).tolist()
    assert counts[:3] == [0, 0, 0] and counts[11] == 0
    expected = rows * 3 / 8
    chi2 = sum((counts[i] - expected) ** 2 / expected for i in range(3, 11))
    assert chi2 < 24.32  # 0.999 quantile, 7 dof


def test_sample_negatives_with_fixed_generator_is_reproducible() -> None:
    targets = torch.tensor([5, 9])
    first = sample_negatives(1000, targets, 99, torch.Generator().manual_seed(4))
    second = sample_negatives(1000, targets, 99, torch.Generator().manual_seed(4))
    assert torch.equal(first, second)


def test_sample_negatives_refuses_more_than_available() -> None:
    with pytest.raises(ValueError):
        sample_negatives(6, torch.tensor([2]), 4, torch.Generator())  # only 3 valid non-target items
    with pytest.raises(ValueError):
        sample_negatives(6, torch.tensor([2]), 3, torch.Generator(), exclude=torch.tensor([3]))


def test_full_pipeline_sampled_ranks_between_zero_and_s() -> None:
    generator = torch.Generator().manual_seed(5)
    scores = torch.rand(8, 500, generator=generator)
    targets = torch.randint(2, 500, (8,), generator=generator)
    negatives = sample_negatives(500, targets, 99, generator)
    ranks = sampled_ranks(scores, targets, negatives, generator)
    assert bool((ranks >= 0).all()) and bool((ranks <= 99).all())
    higher = (scores.gather(1, negatives) > scores.gather(1, targets[:, None])).sum(1)
    assert torch.equal(ranks, higher)  # continuous scores: no ties
