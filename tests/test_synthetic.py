"""Synthetic stream: right shape, deterministic, and the late-period interest shift is real."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from recsys.errors import DataError
from recsys.splits import make_split
from recsys.synthetic import SyntheticConfig, draw, generate

TINY = SyntheticConfig(users=150, items=200, events=15_000, clusters=10, seed=7)


def _with_period(df: pl.DataFrame) -> pl.DataFrame:
    """Per-user consecutive pairs, marked late when the later event is in the last 30% of the stream."""
    return (
        df.with_row_index("step")
        .with_columns(late=pl.col("step") >= int(0.7 * df.height))
        .sort("user_id", "step")
        .with_columns(prev=pl.col("cluster").shift(1).over("user_id"))
        .filter(pl.col("prev").is_not_null())
    )


def test_shape_ids_and_time_order() -> None:
    df = generate(TINY)
    assert dict(df.schema) == {"user_id": pl.Utf8, "item_id": pl.Utf8, "ts": pl.Float64}
    assert df.height == TINY.events
    assert df.get_column("user_id").n_unique() == TINY.users  # every user gets at least 5 events
    assert df.group_by("user_id").len().get_column("len").to_numpy().min() >= 5
    assert df.get_column("item_id").n_unique() <= TINY.items
    assert df.get_column("ts").diff().drop_nulls().to_numpy().min() > 0  # strictly increasing, users interleaved
    assert df.get_column("user_id").head(50).n_unique() > 20


def test_deterministic_per_seed() -> None:
    assert generate(TINY).equals(generate(TINY))
    other = SyntheticConfig(**{**TINY.__dict__, "seed": 8})
    assert not generate(other).equals(generate(TINY))


def test_each_item_belongs_to_one_cluster_with_skewed_popularity() -> None:
    df = generate(TINY, with_cluster=True)
    assert df.group_by("item_id").agg(pl.col("cluster").n_unique()).get_column("cluster").max() == 1
    counts = df.group_by("item_id").len().get_column("len").to_numpy()
    assert counts.max() > 5 * np.median(counts)  # Zipf head


def test_late_period_shifts_interests() -> None:
    pairs = _with_period(generate(TINY, with_cluster=True)).with_columns(same=pl.col("cluster") == pl.col("prev"))
    rate = dict(pairs.group_by("late").agg(pl.col("same").mean()).iter_rows())
    assert rate[False] > 0.9  # shift_prob = 0.05: users stay put
    assert rate[True] < rate[False] - 0.1  # late_shift_prob = 0.25: they jump a lot more

    # Late jumps mostly land on clusters the user never visited before the late period.
    df = generate(TINY, with_cluster=True).with_row_index("step")
    early = df.filter(pl.col("step") < int(0.7 * df.height)).select("user_id", "cluster").unique()
    late = df.filter(pl.col("step") >= int(0.7 * df.height))
    unseen = late.join(early, on=["user_id", "cluster"], how="anti").height / late.height
    assert unseen > 0.4


def test_no_shift_when_probabilities_are_zero() -> None:
    cfg = SyntheticConfig(users=50, items=100, events=3000, clusters=5, shift_prob=0.0, late_shift_prob=0.0)
    pairs = _with_period(generate(cfg, with_cluster=True))
    assert (pairs.get_column("cluster") == pairs.get_column("prev")).all()


def test_splits_cleanly() -> None:
    split = make_split(generate(TINY), "time-shift")
    assert len(split.train) and len(split.valid) and len(split.test)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"users": 0}, "users=0"),
        ({"items": -1}, "items=-1"),
        ({"events": 2.5}, "events=2.5"),
        ({"clusters": 0}, "clusters=0"),
        ({"shift_prob": 1.5}, "shift_prob"),
        ({"late_shift_prob": -0.1}, "late_shift_prob"),
        ({"zipf": -1.0}, "zipf"),
        ({"repeat": 1.5}, "repeat"),
        ({"cohorts": -1}, "cohorts=-1"),
        ({"cohorts": 151}, "exceeds users"),
        ({"clusters": 300, "items": 200}, "exceeds items"),
    ],
)
def test_invalid_config_raises_data_error(changes: dict, match: str) -> None:
    cfg = SyntheticConfig(**{**TINY.__dict__, **changes})
    with pytest.raises(DataError, match=match):
        generate(cfg)


def _repeat_share_and_lags(df: pl.DataFrame) -> tuple[float, np.ndarray]:
    """Share of events (after each user's first) whose item the user chose before, and for those, how many of
    the user's own events back the item was last chosen."""
    per_user = (
        df.with_row_index("step").sort("user_id", "step").with_columns(pos=pl.int_range(pl.len()).over("user_id"))
    )
    prev = per_user.with_columns(last=pl.col("pos").shift(1).over("user_id", "item_id"))
    later = prev.filter(pl.col("pos") > 0)
    repeated = later.filter(pl.col("last").is_not_null())
    lags = (repeated["pos"] - repeated["last"]).to_numpy()
    return repeated.height / later.height, lags


def test_repeat_zero_leaves_the_stream_unchanged() -> None:
    assert generate(TINY).equals(generate(SyntheticConfig(**{**TINY.__dict__, "repeat": 0.0})))


@pytest.mark.parametrize("repeat", [0.5, 0.8])
def test_repeat_makes_users_re_consume_their_recent_items(repeat: float) -> None:
    natural, _ = _repeat_share_and_lags(generate(TINY))
    cfg = SyntheticConfig(**{**TINY.__dict__, "repeat": repeat})
    share, lags = _repeat_share_and_lags(generate(cfg, with_cluster=True))
    # The asked-for repeats come on top of the stream's own (expected: repeat + (1 - repeat) * natural).
    assert share >= repeat and share - natural > 0.5 * repeat * (1 - natural)
    assert np.median(lags) <= 8  # recency bias: mostly what the user chose a few events ago
    # Each item still belongs to one cluster (a repeat carries its item's cluster with it).
    assert (
        generate(cfg, with_cluster=True).group_by("item_id").agg(pl.col("cluster").n_unique().max())["cluster"].max()
        == 1
    )


def test_repeat_is_parsed_from_a_synthetic_spec() -> None:
    from recsys.data import load_interactions

    df = load_interactions("synthetic:users=150,items=200,events=15000,clusters=10,seed=7,repeat=0.5")
    share, _ = _repeat_share_and_lags(df)
    assert share >= 0.5


def test_cohorts_share_their_walk_so_a_late_shift_moves_a_whole_cohort() -> None:
    """With cohorts, a cohort's users share home clusters and the never-visited clusters they jump to, in the same
    order: every user's first late jump of cohort c lands on the same cluster. Without, users scatter."""
    home = 2  # min(3, clusters // 4) for TINY's 10 clusters

    def first_fresh_clusters(cfg: SyntheticConfig) -> tuple[np.ndarray, np.ndarray]:
        d = draw(cfg)
        seg_user = np.zeros(d.seg_cluster.size, dtype=np.int64)
        seg_user[d.seg] = d.user
        # a segment is a first fresh jump where the user's fresh count first reaches 1
        first = (d.fresh_count == 1) & (np.concatenate(([0], d.fresh_count[:-1])) == 0)
        first &= np.concatenate(([True], seg_user[1:] == seg_user[:-1]))  # not a user's first segment
        return seg_user[first], d.seg_cluster[first]

    assert generate(TINY).equals(generate(SyntheticConfig(**{**TINY.__dict__, "cohorts": 0})))
    users, clusters = first_fresh_clusters(SyntheticConfig(**{**TINY.__dict__, "cohorts": 1}))
    assert len(users) > 50 and len(set(clusters.tolist())) == 1  # one cohort: one first new cluster for all
    d = draw(SyntheticConfig(**{**TINY.__dict__, "cohorts": 3}))
    walks = set(zip(d.perm_a.tolist(), d.perm_b.tolist(), strict=True))
    assert len(walks) <= 3
    users, clusters = first_fresh_clusters(SyntheticConfig(**{**TINY.__dict__, "cohorts": 3}))
    walk_of = {u: (int(d.perm_a[u]), int(d.perm_b[u])) for u in users.tolist()}
    for walk in walks:  # per cohort, a single first new cluster, outside the cohort's home clusters
        mine = {int(c) for u, c in zip(users.tolist(), clusters.tolist(), strict=True) if walk_of[u] == walk}
        assert len(mine) <= 1 and not mine & {(walk[0] * p + walk[1]) % 10 for p in range(home)}
    _, scattered = first_fresh_clusters(TINY)
    assert len(set(scattered.tolist())) > 5
    from recsys.data import load_interactions

    assert load_interactions("synthetic:users=150,items=200,events=15000,clusters=10,seed=7,cohorts=3").equals(
        generate(SyntheticConfig(**{**TINY.__dict__, "cohorts": 3}))
    )


@pytest.mark.slow
def test_ten_million_events_in_well_under_a_minute() -> None:
    import time

    start = time.perf_counter()
    df = generate(SyntheticConfig(users=1_000_000, items=1_000_000, events=10_000_000, clusters=200))
    assert df.height == 10_000_000
    assert time.perf_counter() - start < 30
