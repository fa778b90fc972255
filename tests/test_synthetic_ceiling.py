"""The synthetic streams' Bayes ceiling (bench/synthetic_ceiling.py): the latents are the generator's, and the oracle's
probabilities and metrics are right where the answer is known by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from bench.synthetic_ceiling import (
    ceiling,
    cluster_probs,
    expected_metrics,
    history_beliefs,
    item_probs,
    main,
    simulate,
    tie_averaged_metrics,
)
from recsys.metrics import per_example_ndcg, target_ranks
from recsys.synthetic import SyntheticConfig, generate

TINY = "synthetic:users=120,items=200,events=12000,clusters=10"


@pytest.mark.parametrize(
    "cfg",
    [
        SyntheticConfig(users=60, items=100, events=3000, clusters=10, seed=3),
        SyntheticConfig(users=60, items=100, events=3000, clusters=10, repeat=0.5, seed=4),
        SyntheticConfig(users=30, items=40, events=900, clusters=2, seed=5),  # one home cluster, one fresh
        SyntheticConfig(users=30, items=40, events=900, clusters=1, zipf=0.0, seed=6),
    ],
)
def test_the_latents_are_the_streams_own(cfg: SyntheticConfig) -> None:
    """The oracles read the draws ``generate`` writes out: each event's item has positive probability in its
    cluster's Zipf row, and users, items and times are the stream's."""
    lat = simulate(cfg)
    df = generate(cfg, with_cluster=True)
    order = lat.step  # per-user time order -> global time step
    assert np.array_equal(df["item_id"].to_numpy()[order], np.array([f"i{i}" for i in lat.item]))
    assert np.array_equal(df["user_id"].to_numpy()[order], np.array([f"u{u}" for u in lat.user]))
    assert np.array_equal(df["cluster"].to_numpy()[order], np.argmax(lat.zipf[:, lat.item] > 0, axis=0))
    assert np.allclose(lat.zipf.sum(1), 1.0) and np.array_equal(df["ts"].to_numpy(), lat.ts)


def test_ties_count_as_a_random_order() -> None:
    scores = np.array([[3.0, 1.0, 1.0, 0.5], [2.0, 2.0, 9.0, 1.0]])
    m = tie_averaged_metrics(scores, np.array([1, 0]), np.ones(4, dtype=bool), k=2)
    # row 0: one item above, tied with one other: rank 1 or 2 -> (1/log2(3) + 0) / 2, a hit half the time
    # row 1: item 2 above, tied with item 1: rank 1 or 2 -> the same
    assert m[:, 0] == pytest.approx([0.5 / math.log2(3)] * 2)
    assert m[:, 1] == pytest.approx([0.5, 0.5])
    # invalid columns neither compete nor tie
    m = tie_averaged_metrics(scores, np.array([1, 0]), np.array([False, True, True, True]), k=2)
    assert m[0, 0] == pytest.approx((1.0 + 1.0 / math.log2(3)) / 2)


def test_jump_rules_by_hand() -> None:
    # a jump at every event; 12 clusters: 3 home clusters per user, 9 fresh ones
    cfg = SyntheticConfig(users=30, items=120, events=3000, clusters=12, shift_prob=1.0, late_shift_prob=1.0, seed=2)
    lat = simulate(cfg)
    pos = np.flatnonzero(~lat.first)
    probs = cluster_probs(lat, pos)
    prev = lat.seg_cluster[lat.seg[pos - 1]]
    now = lat.seg_cluster[lat.seg[pos]]
    assert np.allclose(probs[np.arange(pos.size), prev][~lat.late[pos]], 0.0)  # an early jump always moves
    early = np.sort(probs[~lat.late[pos]], axis=1)[:, -3:]
    assert np.allclose(early, [0.0, 0.5, 0.5])  # to one of the two other home clusters
    late = np.sort(probs[lat.late[pos]], axis=1)[:, -3:]
    assert np.allclose(late, [0.1, 0.1, 0.8])  # the next fresh cluster, or one of two home clusters
    assert (probs[np.arange(pos.size), now] > 0).all()  # and the drawn cluster is always one of them


def test_a_user_who_never_jumps_draws_from_their_cluster_zipf() -> None:
    cfg = SyntheticConfig(users=20, items=100, events=2000, clusters=5, shift_prob=0.0, late_shift_prob=0.0, seed=1)
    lat = simulate(cfg)
    pos = np.flatnonzero(~lat.first)
    probs = item_probs(lat, pos)
    # one cluster of 20 items per user, forever: Zipf(1.1) over ranks 1..20, whatever the history
    zipf = np.arange(1, 21, dtype=float) ** -1.1
    expected = np.sort(zipf / zipf.sum())[::-1]
    top = -np.sort(-probs, axis=1)[:, :20]
    assert np.allclose(top, expected[None, :])
    assert (probs > 0).sum(1).max() == 20
    item_cluster = np.argmax(lat.zipf[:, lat.item] > 0, axis=0)
    users_first = np.flatnonzero(lat.first)
    # and that cluster is the one the user's first item came from
    cluster_of_user = item_cluster[users_first][lat.user[pos]]
    assert np.all(probs[np.arange(pos.size), :] == lat.zipf[cluster_of_user])


def test_without_jumps_or_repeats_the_history_predictor_is_the_oracle() -> None:
    cfg = SyntheticConfig(users=20, items=100, events=2000, clusters=5, shift_prob=0.0, late_shift_prob=0.0, seed=1)
    lat = simulate(cfg)
    kept = np.arange(lat.step.size)
    pos = np.flatnonzero(~lat.first)
    beliefs = history_beliefs(lat, kept, pos)
    history = beliefs.item_probs(lat, np.arange(pos.size))
    oracle = item_probs(lat, pos)
    # the first item gives the cluster away; only the predictor's small floor on other clusters differs
    assert np.array_equal(np.argsort(-oracle, axis=1)[:, :20], np.argsort(-history, axis=1)[:, :20])
    assert np.allclose(history, oracle, atol=1e-3)


def test_uniform_items_in_one_cluster_give_the_hand_computed_ndcg() -> None:
    ceil, split = ceiling("synthetic:users=40,items=30,events=2400,clusters=1,zipf=0")
    n = split.vocab.size - split.vocab.OFFSET
    hand = sum(1.0 / math.log2(r + 2) for r in range(10)) / n  # every item equally likely, random order
    assert ceil.ndcg["state"] == pytest.approx(np.full(ceil.n_test, hand))
    assert ceil.expected["state"][:, 0] == pytest.approx(np.full(ceil.n_test, hand))
    assert ceil.hr["state"].mean() == pytest.approx(10 / n)


def test_when_every_event_repeats_the_oracle_is_perfect() -> None:
    # repeat = 1: each user's events all copy their first item, so the oracle puts all its mass there
    ceil, _ = ceiling("synthetic:users=60,items=300,events=3000,clusters=10,repeat=1")
    assert ceil.ndcg["state"] == pytest.approx(np.ones(ceil.n_test))
    assert ceil.expected["state"] == pytest.approx(np.ones((ceil.n_test, 2)))


def test_the_oracle_beats_popularity_and_knowing_the_target_cluster_beats_the_oracle() -> None:
    ceil, split = ceiling(TINY)
    import torch

    counts = torch.as_tensor(split.item_counts, dtype=torch.float64).expand(ceil.n_test, -1)
    popularity = per_example_ndcg(target_ranks(counts, torch.as_tensor(split.test.targets))).numpy()
    state, history = ceil.ndcg["state"].mean(), ceil.ndcg["history"].mean()
    assert history > 2 * popularity.mean()
    assert state > 2 * popularity.mean()
    # more information never lowers the optimum: in expectation, and on this sample
    assert ceil.expected["target-cluster"][:, 0].mean() > ceil.expected["state"][:, 0].mean()
    assert ceil.ndcg["target-cluster"].mean() > state
    # the probabilities are the generator's: the measured NDCG agrees with what the oracle expects
    se = ceil.ndcg["state"].std() / math.sqrt(ceil.n_test)
    assert abs(state - ceil.expected["state"][:, 0].mean()) < 4 * se
    # seeing only the items cannot beat knowing the state (up to the sample's noise)
    assert history < state + 2 * se


def test_the_history_predictor_reads_repeats() -> None:
    ceil, _ = ceiling(TINY + ",repeat=0.5")
    assert ceil.ndcg["history"].mean() > 0.8 * ceil.ndcg["state"].mean()


def test_expected_metrics_of_a_known_distribution() -> None:
    p = np.array([[0.5, 0.25, 0.25, 0.0]])
    m = expected_metrics(p, k=2)
    assert m[0, 0] == pytest.approx(0.5 + 0.25 / math.log2(3))
    assert m[0, 1] == pytest.approx(0.75)


@pytest.mark.slow
def test_the_bench_scores_a_bundle_on_the_same_examples(tiny_bundle: Path, tmp_path: Path) -> None:
    from streaming.bench import TINY_SOURCE

    out = tmp_path / "ceiling.json"
    main([TINY_SOURCE, "--bundle", str(tiny_bundle), "--methods", "popularity,base", "--mix", "--json", str(out)])
    (row,) = json.loads(out.read_text())
    assert row["n_test"] > 100
    # the oracle knows the generator: far above a one-epoch model and popularity, on the bundle's own examples
    assert row["state_ndcg10"] > 1.5 * row["base_ndcg10"] > 0
    assert row["state_vs_base"]["ci95"][0] > 1.0
    assert row["state_vs_popularity"]["ratio"] > 1.5
    # the kernel mixture's weight is the best on validation
    assert row["mix_valid_ndcg10"][str(row["mix_weight"])] == max(row["mix_valid_ndcg10"].values())
