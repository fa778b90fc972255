"""The paired bootstrap of NDCG@10 ratios, on cases whose answer is known exactly."""

from __future__ import annotations

import numpy as np
import pytest

from recsys.bootstrap import paired_comparisons, paired_ratio


def _ndcg(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.where(rng.random(n) < 0.2, 1.0 / np.log2(rng.integers(0, 10, n) + 2.0), 0.0)


def test_identical_methods_give_ratio_one_and_a_zero_width_interval() -> None:
    a = _ndcg(500, 0)
    r = paired_ratio(a, a.copy())
    assert r.ratio == 1.0 and r.ci95 == (1.0, 1.0)


def test_a_method_twice_as_good_on_every_example_gives_exactly_two() -> None:
    b = _ndcg(500, 1)
    r = paired_ratio(2 * b, b)
    assert r.ratio == 2.0 and r.ci95 == (2.0, 2.0)


def test_two_examples_give_the_enumerable_bootstrap_distribution() -> None:
    # Resamples of 2 examples: both the first (ratio undefined, dropped), one of each (ratio 1, p = 1/2) or both
    # the second (ratio 0, p = 1/4): the defined ratios are 0 a third of the time and 1 otherwise.
    r = paired_ratio(np.array([1.0, 0.0]), np.array([0.0, 1.0]))
    assert r.ratio == 1.0 and r.ci95 == (0.0, 1.0)


def test_the_interval_is_paired_narrower_than_the_spread_of_either_method() -> None:
    # a = b plus a small gain on a tenth of the examples: paired resampling sees the gain, not b's noise.
    b = _ndcg(2000, 2)
    a = b.copy()
    a[::10] += 0.05
    r = paired_ratio(a, b)
    assert r.ratio is not None and r.ci95 is not None
    assert 1.0 < r.ci95[0] <= r.ratio <= r.ci95[1]
    independent = paired_ratio(a, _ndcg(2000, 3))  # unpaired noise of the same size gives a much wider interval
    assert independent.ci95 is not None
    assert (r.ci95[1] - r.ci95[0]) * 5 < independent.ci95[1] - independent.ci95[0]


def test_same_seed_same_interval_and_undefined_ratios_are_none() -> None:
    a, b = _ndcg(300, 4), _ndcg(300, 5)
    assert paired_ratio(a, b) == paired_ratio(a, b, seed=0)
    assert paired_ratio(a, b, seed=1).ci95 != paired_ratio(a, b, seed=0).ci95
    zero = paired_ratio(a, np.zeros(300))
    assert zero.ratio is None and zero.as_dict() == {"ratio": None, "ci95": None}


def test_comparisons_skip_methods_not_evaluated_and_reject_unpaired_arrays() -> None:
    per = {"persona": _ndcg(100, 6), "base": _ndcg(100, 7)}
    out = paired_comparisons(per, {"persona_vs_base": ("persona", "base"), "persona_vs_x": ("persona", "x")})
    assert list(out) == ["persona_vs_base"]
    with pytest.raises(ValueError, match="same length"):
        paired_ratio(np.ones(3), np.ones(4))
