"""k-core filtering and the two evaluation protocols (METHOD.md §5) as next-item examples.

Time order everywhere is the stable order (``ts``, then input row order) - the order a live stream would
deliver the events. "Earlier" below always means earlier in that order, so two events of one user with the
same timestamp keep their file order and the first is part of the second's history.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl

from recsys.errors import DataError
from recsys.repeats import repeat_features
from recsys.vocab import ItemVocab
from recsys.windows import window_lengths

PROTOCOLS = ("time-shift", "leave-one-out")
MIN_INTERACTIONS = 20
MIN_USERS = 2
MIN_TRAIN_ITEMS = 10
_CHUNK = 1 << 18  # rows of histories built at once (bounds temporary memory)
_HINT_SMALL = "lower --min-user/--min-item or use a larger dataset"


def k_core(df: pl.DataFrame, min_user: int = 5, min_item: int = 5) -> pl.DataFrame:
    """Keep interactions whose user has >= ``min_user`` and item >= ``min_item`` of them, until stable.

    Dropping rare items can push users under the threshold (and vice versa), so it repeats until no row
    is removed; the result therefore satisfies both bounds. Row order is preserved.
    """
    if min_user < 0 or min_item < 0:
        raise DataError(f"k-core bounds must be >= 0 (got min_user={min_user}, min_item={min_item})", "use e.g. 5")
    _require_columns(df, ("user_id", "item_id"))
    out = df
    while True:
        kept = out.filter((pl.len().over("user_id") >= min_user) & (pl.len().over("item_id") >= min_item))
        if kept.height == out.height:
            break
        out = kept
    if out.height == 0 and df.height > 0:
        raise DataError(
            f"the {min_user}/{min_item} k-core (min interactions per user/item) removed all {df.height} rows",
            _HINT_SMALL,
        )
    return out


@dataclass(frozen=True)
class Examples:
    """Next-item examples: the user's history before the target, most recent last.

    ``histories`` int64 [M, T] item indices, LEFT-padded with ``ItemVocab.PAD``; last column = most recent.
    ``targets`` int64 [M]; ``users`` int64 [M] (index into ``Split.user_ids``);
    ``ts`` float64 [M] (time of the target interaction).
    ``repeats`` float32 [M, R, W] or ``None``: the session's whole history before the target as bounded item counts
    ``(item, count, age)`` (:mod:`recsys.repeats`), for the device model's repeat part.
    """

    histories: np.ndarray
    targets: np.ndarray
    users: np.ndarray
    ts: np.ndarray
    repeats: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def subset(self, idx: np.ndarray) -> Examples:
        """Rows ``idx`` (integer indices or a boolean mask), e.g. for batching or sampling."""
        reps = None if self.repeats is None else self.repeats[idx]
        return Examples(self.histories[idx], self.targets[idx], self.users[idx], self.ts[idx], reps)

    @property
    def lengths(self) -> np.ndarray:
        """Non-padding history length of each example (int64 [M])."""
        return np.asarray((self.histories != ItemVocab.PAD).sum(axis=1), dtype=np.int64)


@dataclass
class Split:
    """One protocol's train/valid/test examples over a shared vocabulary built from the training part."""

    protocol: str
    vocab: ItemVocab
    train: Examples
    valid: Examples
    test: Examples
    item_counts: np.ndarray  # int64 [vocab.size]: training-part interactions per item (PAD/UNK = 0)
    user_ids: list[str]  # user index -> original id
    stats: dict[str, float] = field(default_factory=dict)


def make_split(
    df: pl.DataFrame,
    protocol: str = "time-shift",
    *,
    max_len: int = 50,
    window_stride: int = 0,
    test_frac: float = 0.3,
    valid_frac: float = 0.1,
    min_train_items: int = 3,
    repeat_size: int = 0,
) -> Split:
    """Turn ``user_id, item_id, ts`` interactions into train/valid/test next-item examples.

    ``"time-shift"``: "the first 70% of time" is read as an interaction-count quantile of the time order
    (robust to bursts and gaps): test = the last ``test_frac`` of interactions, valid = the last
    ``valid_frac`` of the rest (63%-70%), train = the rest. Every valid/test interaction is an example whose
    history holds all earlier items of that user from every period (test items included as they arrive, as
    in the live stream). Examples whose target is not in the (train-part) vocabulary - no method can rank
    them - or whose history is empty are dropped and counted in ``stats``.

    ``"leave-one-out"``: per user, last interaction = test, second last = valid, the rest = train; users with
    fewer than ``min_train_items + 2`` interactions only give train examples.

    Train examples: every train-part interaction with at least one earlier train-part item of the user.
    Histories are the encoder's window of the items before the target: the last ``max_len`` items
    (``window_stride`` 0), or a window that starts every ``window_stride`` items (:func:`recsys.windows.window_length`).
    Each set is sorted by (ts, user). ``repeat_size`` > 0 adds each example's whole-history item counts
    (``Examples.repeats``, :func:`recsys.repeats.repeat_features`).
    """
    if protocol not in PROTOCOLS:
        raise DataError(f"unknown split protocol {protocol!r}", f"use one of: {', '.join(PROTOCOLS)}")
    if max_len < 1:
        raise DataError(f"max_len must be >= 1 (got {max_len})", "use e.g. --max-len 50")
    if not 0.0 < test_frac < 1.0 or not 0.0 < valid_frac < 1.0:
        raise DataError(
            f"test_frac and valid_frac must be in (0, 1) (got {test_frac}, {valid_frac})",
            "use e.g. 0.3 and 0.1",
        )
    if min_train_items < 1:
        raise DataError(f"min_train_items must be >= 1 (got {min_train_items})", "use e.g. 3")
    _require_columns(df, ("user_id", "item_id", "ts"))
    if df.height < MIN_INTERACTIONS:
        raise DataError(f"only {df.height} interactions (need at least {MIN_INTERACTIONS})", _HINT_SMALL)
    nulls = df.select(pl.any_horizontal(pl.col("user_id", "item_id", "ts").is_null()).sum()).item()
    if nulls:
        raise DataError(f"{nulls} interactions have an empty user, item or time", "drop or fill those rows first")

    ordered = (
        df.select(pl.col("user_id").cast(pl.Utf8), pl.col("item_id").cast(pl.Utf8), pl.col("ts").cast(pl.Float64))
        .with_row_index("_row")
        .sort(["ts", "_row"])
    )
    n = ordered.height
    user_ids: list[str] = ordered.get_column("user_id").unique().sort().to_list()
    if len(user_ids) < MIN_USERS:
        raise DataError(f"only {len(user_ids)} user in the data (need at least {MIN_USERS})", _HINT_SMALL)
    user_map = pl.DataFrame({"user_id": user_ids, "_u": pl.int_range(0, len(user_ids), dtype=pl.Int64, eager=True)})
    user = (ordered.join(user_map, on="user_id", how="left", maintain_order="left").get_column("_u").to_numpy()).astype(
        np.int64
    )
    ts = ordered.get_column("ts").to_numpy().astype(np.float64)

    # Per-user view: positions of each user's events in time order, grouped by user.
    order = np.argsort(user, kind="stable")
    user_s = user[order]
    first = np.ones(n, dtype=bool)
    first[1:] = user_s[1:] != user_s[:-1]
    start_s = np.maximum.accumulate(np.where(first, np.arange(n), 0))
    rank_s = np.arange(n) - start_s

    stats: dict[str, float] = {
        "n_users": float(len(user_ids)),
        "n_interactions": float(n),
        "max_len": float(max_len),
    }
    part = np.zeros(n, dtype=np.int8)  # in global time order: 0 train, 1 valid, 2 test
    if protocol == "time-shift":
        test_start = round(n * (1.0 - test_frac))
        valid_start = round(test_start * (1.0 - valid_frac))
        if not 0 < valid_start < test_start < n:
            raise DataError(f"{n} interactions are too few to cut train/valid/test", _HINT_SMALL)
        part[valid_start:test_start] = 1
        part[test_start:] = 2
        stats.update(
            test_frac=test_frac,
            valid_frac=valid_frac,
            valid_start_ts=float(ts[valid_start]),
            test_start_ts=float(ts[test_start]),
            train_end_ts=float(ts[valid_start - 1]),
        )
        part_s = part[order]
    else:
        count_s = np.bincount(user_s, minlength=len(user_ids))[user_s]
        eligible = count_s >= min_train_items + 2
        part_s = np.zeros(n, dtype=np.int8)
        part_s[eligible & (rank_s == count_s - 2)] = 1
        part_s[eligible & (rank_s == count_s - 1)] = 2
        part[order] = part_s
        stats.update(min_train_items=float(min_train_items), n_eval_users=float(np.unique(user_s[eligible]).size))

    items = ordered.get_column("item_id")
    train_mask = part == 0
    vocab = ItemVocab.from_items(items.filter(pl.Series(train_mask)))
    if vocab.size - ItemVocab.OFFSET < MIN_TRAIN_ITEMS:
        raise DataError(
            f"only {vocab.size - ItemVocab.OFFSET} distinct items in the training part "
            f"(need at least {MIN_TRAIN_ITEMS})",
            _HINT_SMALL,
        )
    codes = vocab.encode(items)
    item_counts = np.bincount(codes[train_mask], minlength=vocab.size).astype(np.int64)
    item_counts[: ItemVocab.OFFSET] = 0
    codes_s = codes[order]
    ts_s = ts[order]

    sets: dict[str, Examples] = {}
    for pid, name in enumerate(("train", "valid", "test")):
        in_part = part_s == pid
        has_history = in_part & (rank_s >= 1)
        keep = has_history & (codes_s != ItemVocab.UNK)
        if name != "train":
            stats[f"dropped_{name}_unknown"] = float((has_history & (codes_s == ItemVocab.UNK)).sum())
            stats[f"dropped_{name}_no_history"] = float((in_part & (rank_s == 0)).sum())
            stats[f"dropped_{name}"] = float(in_part.sum() - keep.sum())
        pos = np.flatnonzero(keep)
        pos = pos[np.lexsort((user_s[pos], ts_s[pos]))]
        sets[name] = Examples(
            histories=_histories(codes_s, pos, start_s[pos], max_len, window_stride),
            targets=codes_s[pos].astype(np.int64),
            users=user_s[pos].astype(np.int64),
            ts=ts_s[pos].astype(np.float64),
            repeats=repeat_features(codes_s, start_s[pos], pos, repeat_size) if repeat_size > 0 else None,
        )
        stats[f"n_{name}"] = float(pos.size)
        if pos.size == 0:
            raise DataError(f"the {protocol} split has no {name} examples", _HINT_SMALL)
    stats["n_items"] = float(vocab.size - ItemVocab.OFFSET)
    return Split(
        protocol=protocol,
        vocab=vocab,
        train=sets["train"],
        valid=sets["valid"],
        test=sets["test"],
        item_counts=item_counts,
        user_ids=user_ids,
        stats=stats,
    )


def _histories(codes: np.ndarray, pos: np.ndarray, start: np.ndarray, max_len: int, stride: int) -> np.ndarray:
    """The encoder's window of the items before each ``pos`` within its user block ``[start, pos)``, left-padded
    with PAD.

    Vectorised windows over the per-user-ordered ``codes``, built in chunks to bound memory.
    """
    out = np.zeros((pos.size, max_len), dtype=np.int64)
    offsets = np.arange(-max_len, 0, dtype=np.int64)
    first = pos - window_lengths(pos - start, max_len, stride)
    for lo in range(0, pos.size, _CHUNK):
        p = pos[lo : lo + _CHUNK, None]
        idx = p + offsets
        out[lo : lo + _CHUNK] = np.where(idx >= first[lo : lo + _CHUNK, None], codes[np.maximum(idx, 0)], 0)
    return out


def _require_columns(df: pl.DataFrame, names: tuple[str, ...]) -> None:
    missing = [c for c in names if c not in df.columns]
    if missing:
        raise DataError(
            f"interactions lack column(s) {', '.join(missing)} (have: {', '.join(df.columns)})",
            "load them with recsys.data.load_interactions",
        )
