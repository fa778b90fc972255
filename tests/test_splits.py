"""Splits: no leakage, histories equal a brute-force reference, protocol edge cases raise DataError."""

from __future__ import annotations

import time

import numpy as np
import polars as pl
import pytest

from recsys.data import load_interactions
from recsys.errors import DataError
from recsys.splits import Examples, Split, k_core, make_split


def _random_frame(seed: int = 0, n: int = 600, users: int = 25, items: int = 40) -> pl.DataFrame:
    """Small random stream with many timestamp ties, so stable ordering matters."""
    rng = np.random.default_rng(seed)
    return pl.DataFrame(
        {
            "user_id": [f"u{x}" for x in rng.integers(0, users, n)],
            "item_id": [f"i{x}" for x in rng.integers(0, items, n)],
            "ts": rng.integers(0, n // 3, n).astype(float),
        }
    )


def _brute_force(df: pl.DataFrame, split: Split, max_len: int, stride: int = 0) -> dict[str, set[tuple]]:
    """Reference examples from plain Python loops over the stable (ts, row) order; with a ``stride``, a history
    longer than ``max_len`` keeps the items since the last window start (starts at stride, 2·stride, ... while
    keeping at least max_len - stride + 1 items)."""
    rows = sorted(enumerate(df.iter_rows()), key=lambda r: (r[1][2], r[0]))
    events = [(u, i, t) for _, (u, i, t) in rows]
    n = len(events)
    per_user: dict[str, list[tuple[int, str, float]]] = {}
    for g, (u, i, t) in enumerate(events):
        per_user.setdefault(u, []).append((g, i, t))
    if split.protocol == "time-shift":
        test_start = round(n * 0.7)
        valid_start = round(test_start * 0.9)
        part_of = {g: 0 if g < valid_start else 1 if g < test_start else 2 for g in range(n)}
    else:
        part_of = {}
        for seq in per_user.values():
            for k, (g, _, _) in enumerate(seq):
                eligible = len(seq) >= 5
                part_of[g] = 2 if eligible and k == len(seq) - 1 else 1 if eligible and k == len(seq) - 2 else 0
    vocab_items = sorted({events[g][1] for g in range(n) if part_of[g] == 0})
    index = {item: k + 2 for k, item in enumerate(vocab_items)}
    user_index = {u: k for k, u in enumerate(sorted(per_user))}
    out: dict[str, set[tuple]] = {"train": set(), "valid": set(), "test": set()}
    for u, seq in per_user.items():
        for k, (g, item, t) in enumerate(seq):
            target = index.get(item, 1)
            if k == 0 or target == 1:
                continue
            window_start = max(0, k - max_len)
            if stride and k > max_len:
                window_start = next(s for s in range(0, k, stride) if k - s <= max_len)
            hist = [index.get(i, 1) for _, i, _ in seq[window_start:k]]
            hist = [0] * (max_len - len(hist)) + hist
            name = ("train", "valid", "test")[part_of[g]]
            out[name].add((tuple(hist), target, user_index[u], t))
    assert split.vocab.ids == vocab_items
    return out


def _as_set(ex: Examples) -> set[tuple]:
    return {
        (tuple(h), int(t), int(u), float(s))
        for h, t, u, s in zip(ex.histories.tolist(), ex.targets, ex.users, ex.ts, strict=True)
    }


@pytest.mark.parametrize("protocol", ["time-shift", "leave-one-out"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("stride", [0, 3])
def test_examples_match_brute_force_reference(protocol: str, seed: int, stride: int) -> None:
    df = _random_frame(seed)
    split = make_split(df, protocol, max_len=6, window_stride=stride)
    reference = _brute_force(df, split, max_len=6, stride=stride)
    for name in ("train", "valid", "test"):
        ex: Examples = getattr(split, name)
        assert len(_as_set(ex)) == len(ex), "duplicate examples"
        assert _as_set(ex) == reference[name], name


def test_time_shift_has_no_leakage() -> None:
    df = _random_frame(3, n=2000)
    late = (pl.col("ts") > 600) & (pl.int_range(pl.len()) % 3 == 0)
    df = df.with_columns(pl.when(late).then(pl.format("new-{}", "item_id")).otherwise("item_id").alias("item_id"))
    split = make_split(df, "time-shift")
    assert split.train.ts.max() <= split.valid.ts.min()
    assert split.valid.ts.max() <= split.test.ts.min()
    train_end = round(round(df.height * 0.7) * 0.9)
    first_seen = df.with_row_index().sort(["ts", "index"]).with_row_index("pos").group_by("item_id").agg(pl.min("pos"))
    late_items = set(first_seen.filter(pl.col("pos") >= train_end).get_column("item_id"))
    assert late_items and not late_items & set(split.vocab.ids)
    assert split.stats["dropped_test_unknown"] > 0  # those items' test interactions cannot be ranked
    # item_counts: training-part interactions only, reserved slots zero.
    assert split.item_counts[:2].tolist() == [0, 0]
    assert split.item_counts.sum() == train_end


def test_histories_are_left_padded_and_most_recent_last() -> None:
    df = pl.DataFrame(
        {
            "user_id": ["a"] * 5 + ["b"] * 16,
            "item_id": ["x", "y", "z", "y", "x"] + [f"i{k}" for k in range(14)] + ["i1", "i2"],
            "ts": [1.0, 2.0, 3.0, 4.0, 30.0] + [float(k) for k in range(16)],
        }
    )
    split = make_split(df, "leave-one-out", max_len=4, min_train_items=1)
    x, y, z = (split.vocab.index_of(i) for i in "xyz")
    a = split.user_ids.index("a")
    test_a = split.test.subset(np.flatnonzero(split.test.users == a))
    assert test_a.histories.tolist() == [[x, y, z, y]] and test_a.targets.tolist() == [x]
    valid_a = split.valid.subset(split.valid.users == a)
    assert valid_a.histories.tolist() == [[0, x, y, z]] and valid_a.lengths.tolist() == [3]
    train_a = split.train.subset(split.train.users == a)
    assert train_a.histories.tolist() == [[0, 0, 0, x], [0, 0, x, y]]
    assert train_a.targets.tolist() == [y, z]


def test_leave_one_out_tests_exactly_each_users_last_item() -> None:
    df = k_core(load_interactions())
    split = make_split(df, "leave-one-out")
    last = (
        df.with_row_index()
        .sort(["ts", "index"])
        .group_by("user_id", maintain_order=True)
        .agg(pl.col("item_id").last(), pl.col("ts").last(), pl.len())
    )
    expected = {(u, split.vocab.index_of(i), t) for u, i, t, n in last.iter_rows() if n >= 5 and i in split.vocab}
    got = {
        (split.user_ids[u], int(t), float(s))
        for u, t, s in zip(split.test.users, split.test.targets, split.test.ts, strict=True)
    }
    assert got == expected
    assert len(set(split.test.users.tolist())) == len(split.test)  # one per user
    assert len(split.valid) == len(split.test) == 943


def test_examples_sorted_by_time_then_user() -> None:
    split = make_split(_random_frame(4), "time-shift")
    for ex in (split.train, split.valid, split.test):
        keys = list(zip(ex.ts.tolist(), ex.users.tolist(), strict=True))
        assert keys == sorted(keys)


def test_k_core_satisfies_core_property_and_is_maximal_iteration() -> None:
    df = _random_frame(5, n=400, users=60, items=80)
    core = k_core(df, 4, 3)
    assert core.height > 0
    assert core.group_by("user_id").len().get_column("len").to_numpy().min() >= 4
    assert core.group_by("item_id").len().get_column("len").to_numpy().min() >= 3
    assert k_core(core, 4, 3).equals(core)


def test_k_core_removing_everything_raises() -> None:
    with pytest.raises(DataError, match="removed all"):
        k_core(_random_frame(6, n=50), 100, 100)


def test_ml100k_split_is_fast_and_complete() -> None:
    df = load_interactions()
    start = time.perf_counter()
    split = make_split(df, "time-shift")
    assert time.perf_counter() - start < 2.0
    assert split.stats["n_users"] == 943
    assert split.item_counts.shape == (split.vocab.size,)
    for ex in (split.train, split.valid, split.test):
        assert ex.histories.dtype == np.int64 and ex.histories.shape == (len(ex), 50)
        assert ex.targets.dtype == ex.users.dtype == np.int64 and ex.ts.dtype == np.float64
        assert (ex.targets >= 2).all() and (ex.histories[:, -1] != 0).all()
    total = split.stats["n_valid"] + split.stats["dropped_valid"] + split.stats["n_test"] + split.stats["dropped_test"]
    assert total == df.height - round(round(df.height * 0.7) * 0.9)


@pytest.mark.parametrize(
    ("frame", "kwargs", "match"),
    [
        (_random_frame(), {"protocol": "random"}, "unknown split protocol"),
        (_random_frame().head(10), {}, "only 10 interactions"),
        (_random_frame().with_columns(user_id=pl.lit("solo")), {}, "only 1 user"),
        (_random_frame(items=5), {}, "distinct items in the training part"),
        (_random_frame(users=300, n=400), {"protocol": "leave-one-out", "min_train_items": 50}, "no valid"),
        (_random_frame().drop("ts"), {}, "lack column"),
        (_random_frame(), {"test_frac": 1.5}, "test_frac"),
        (_random_frame(), {"max_len": 0}, "max_len"),
    ],
)
def test_unusable_inputs_raise_data_error(frame: pl.DataFrame, kwargs: dict, match: str) -> None:
    with pytest.raises(DataError, match=match) as info:
        make_split(frame, **kwargs)
    assert info.value.hint
