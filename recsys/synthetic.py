"""Synthetic interactions with a real-time interest shift, for tests, demos and scale runs.

Each user's interest sits in one item cluster at a time and jumps between clusters. Early on, users hop among
a few "home" clusters (history is predictive); in the last 30% of time jumps are more frequent and mostly
land on clusters the user has never visited (history is less predictive, recent items more) - the
distribution shift Persona is meant to absorb. Fully vectorised: 10M events in seconds.

Re-consumption (``repeat`` > 0): with that probability an event repeats one of the user's own earlier items
instead, as where people buy, watch or play the same things again. The earlier event is drawn a geometric number
of steps back (mean :data:`REPEAT_MEAN_LAG`): recent items are repeated most, and items the user chose often occupy
more of their history, so they are repeated more: a recency and a frequency bias, like real re-consumption logs.

Cohorts (``cohorts`` > 0): users fall into that many cohorts, and a cohort's users share their walk over the
clusters: the same home clusters, and the same never-visited clusters in the same order when the late period makes
them jump. Each user still jumps at their own moments, so a cohort moves to its new clusters one member after
another: a group-level drift that the members who moved first reveal to the others. A single user's history cannot
show where their cohort is going; a group's recent choices can (what Persona's prototypes count live).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import polars as pl

from recsys.errors import DataError

LATE_START = 0.7  # share of time after which jumps follow `late_shift_prob`
FRESH_PROB = 0.8  # share of late jumps that go to a never-visited cluster
MIN_EVENTS_PER_USER = 5  # so that a default k-core keeps (almost) every user
T0 = 1_600_000_000.0  # epoch seconds of the first event (2020-09-13)
MEAN_GAP_S = 30.0  # mean seconds between consecutive events in the whole stream
REPEAT_MEAN_LAG = 8.0  # mean number of the user's own events between a repeat and the event it repeats


@dataclass
class SyntheticConfig:
    """Size and dynamics of the synthetic stream (see the module docstring)."""

    users: int = 2000
    items: int = 1000
    events: int = 100_000
    clusters: int = 20
    shift_prob: float = 0.05
    late_shift_prob: float = 0.25
    zipf: float = 1.1
    repeat: float = 0.0  # probability that an event repeats one of the user's earlier items (re-consumption)
    cohorts: int = 0  # users in this many cohorts share their cluster walk (group-level drift); 0: each their own
    seed: int = 0

    def validate(self) -> None:
        """Reject configs that cannot produce a meaningful stream (DataError with the fix)."""
        for name in ("users", "items", "events", "clusters"):
            value = getattr(self, name)
            if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 1:
                raise DataError(f"synthetic {name}={value!r} must be a positive whole number", f"e.g. {name}=100")
        for name in ("shift_prob", "late_shift_prob", "repeat"):
            value = getattr(self, name)
            if not 0.0 <= float(value) <= 1.0:
                raise DataError(f"synthetic {name}={value!r} must be a probability", f"use 0 <= {name} <= 1")
        if not isinstance(self.cohorts, int | np.integer) or isinstance(self.cohorts, bool) or self.cohorts < 0:
            raise DataError(f"synthetic cohorts={self.cohorts!r} must be a whole number >= 0", "e.g. cohorts=20")
        if self.cohorts > self.users:
            raise DataError(f"synthetic cohorts={self.cohorts} exceeds users={self.users}", "use cohorts <= users")
        if not math.isfinite(float(self.zipf)) or self.zipf < 0:
            raise DataError(f"synthetic zipf={self.zipf!r} must be >= 0", "use e.g. zipf=1.1 (0 = uniform)")
        if self.clusters > self.items:
            raise DataError(
                f"synthetic clusters={self.clusters} exceeds items={self.items}",
                "use clusters <= items",
            )


@dataclass(frozen=True)
class Draws:
    """Everything the generator drew, events in *per-user time order* (the order it builds them in), including what
    :func:`generate` does not output, so an analysis (``bench/synthetic_ceiling.py``) can read the latent state
    instead of replaying the draws.

    ``step`` global time step of each event; ``user``; ``first`` user's first event; ``late`` in the last 30 %;
    ``shift`` segment-start probability at that event; ``seg`` its segment; ``item`` the item it shows (after
    repeats); ``cluster`` that item's cluster; ``ts`` global [n_events] timestamps. Per segment: ``seg_cluster``,
    ``home_pos``, ``fresh_count`` (fresh jumps of the user so far, inclusive). Per user: ``perm_a``, ``perm_b``
    (cluster of position p is ``(a p + b) mod C``). Per item slot: ``item_of_slot``, ``cluster_of_slot`` and
    ``slot_prob`` (the slot's Zipf probability within its cluster).
    """

    cfg: SyntheticConfig
    step: np.ndarray
    user: np.ndarray
    first: np.ndarray
    late: np.ndarray
    shift: np.ndarray
    seg: np.ndarray
    item: np.ndarray
    cluster: np.ndarray
    ts: np.ndarray
    seg_cluster: np.ndarray
    home_pos: np.ndarray
    fresh_count: np.ndarray
    perm_a: np.ndarray
    perm_b: np.ndarray
    item_of_slot: np.ndarray
    cluster_of_slot: np.ndarray
    slot_prob: np.ndarray


def generate(cfg: SyntheticConfig | None = None, *, with_cluster: bool = False) -> pl.DataFrame:
    """Generate ``user_id, item_id, ts`` rows in time order (ids ``u12`` / ``i7``); deterministic per seed.

    ``with_cluster=True`` adds the cluster (Int64) of each event's item, so tests can check the shift.
    """
    d = draw(cfg or SyntheticConfig())
    n = d.step.size
    item, cluster_of_step, user_of_step = np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.int64)
    item[d.step], cluster_of_step[d.step], user_of_step[d.step] = d.item, d.cluster, d.user
    df = pl.DataFrame({"u": user_of_step, "i": item, "ts": d.ts}).select(
        pl.concat_str(pl.lit("u"), pl.col("u").cast(pl.Utf8)).alias("user_id"),
        pl.concat_str(pl.lit("i"), pl.col("i").cast(pl.Utf8)).alias("item_id"),
        pl.col("ts").cast(pl.Float64),
    )
    if with_cluster:
        df = df.with_columns(pl.Series("cluster", cluster_of_step, dtype=pl.Int64))
    return df


def draw(cfg: SyntheticConfig) -> Draws:
    """The stream's random draws (:class:`Draws`); :func:`generate` writes them out. Deterministic per seed."""
    cfg.validate()
    rng = np.random.default_rng(cfg.seed)
    n_users, n_items, n_events, n_clusters = (
        int(cfg.users),
        int(cfg.items),
        int(cfg.events),
        int(cfg.clusters),
    )

    # Who acts at each global time step: a skewed activity per user, a minimum each, randomly interleaved.
    base = min(MIN_EVENTS_PER_USER, n_events // n_users)
    activity = rng.lognormal(0.0, 1.0, n_users)
    counts = base + rng.multinomial(n_events - base * n_users, activity / activity.sum())
    user_of_step = rng.permutation(np.repeat(np.arange(n_users, dtype=np.int64), counts))
    gaps = rng.exponential(MEAN_GAP_S, n_events)
    ts = T0 + np.cumsum(gaps)

    # The same events in per-user time order (a stable sort keeps each user's steps in time order).
    order = np.argsort(user_of_step, kind="stable")
    user = user_of_step[order]
    first = np.ones(n_events, dtype=bool)
    first[1:] = user[1:] != user[:-1]
    late = order >= int(LATE_START * n_events)
    prob = np.where(late, cfg.late_shift_prob, cfg.shift_prob)
    starts = first | (rng.random(n_events) < prob)

    segments = _segment_clusters(rng, user[starts], first[starts], late[starts], n_users, n_clusters, int(cfg.cohorts))
    seg = np.cumsum(starts) - 1
    event_cluster = segments.cluster[seg]

    slots = _cluster_slots(rng, n_items, n_clusters, cfg.zipf)
    item_sorted = slots.draw(rng, event_cluster)
    if cfg.repeat > 0:  # drawn only when asked for, so streams without repeats stay what they were
        source = _repeat_sources(rng, first, float(cfg.repeat))
        item_sorted, event_cluster = item_sorted[source], event_cluster[source]
    return Draws(
        cfg, order, user, first, late, prob, seg, item_sorted, event_cluster, ts, segments.cluster,
        segments.home_pos, segments.fresh_count, segments.perm_a, segments.perm_b, slots.item_of_slot,
        slots.cluster_of_slot, slots.prob,
    )  # fmt: skip


@dataclass(frozen=True)
class _Segments:
    """Per interest segment: its cluster, home pointer and the user's fresh jumps so far; per user: the cluster
    permutation ``(a p + b) mod C``."""

    cluster: np.ndarray
    home_pos: np.ndarray
    fresh_count: np.ndarray
    perm_a: np.ndarray
    perm_b: np.ndarray


def _segment_clusters(
    rng: np.random.Generator,
    seg_user: np.ndarray,
    seg_first: np.ndarray,
    seg_late: np.ndarray,
    n_users: int,
    n_clusters: int,
    cohorts: int = 0,
) -> _Segments:
    """Cluster of every interest segment (segments in per-user time order).

    Each user walks their own permutation of clusters, ``perm_u(p) = (a_u * p + b_u) mod C`` (no U x C
    table). Positions ``0..H-1`` are home clusters; early jumps move to another home cluster; a late jump
    goes, with ``FRESH_PROB``, to the next never-visited position ``H, H+1, ...`` (else back home). With
    ``cohorts`` > 0 the users of a cohort (drawn uniformly) share one permutation.
    """
    n_seg = seg_user.size
    home = max(1, min(3, n_clusters // 4))
    n_fresh = n_clusters - home
    fresh = seg_late & ~seg_first & (rng.random(n_seg) < FRESH_PROB) & (n_fresh > 0)

    # Home pointer: random start, then +1..H-1 (mod H) on every non-fresh jump, so it always changes.
    step = np.where(seg_first, rng.integers(0, home, n_seg), rng.integers(1, max(home, 2), n_seg) % home)
    step = np.where(fresh, 0, step)
    home_pos = _grouped_cumsum(step, seg_first) % home
    fresh_count = _grouped_cumsum(fresh.astype(np.int64), seg_first)
    position = np.where(fresh, home + (fresh_count - 1) % max(n_fresh, 1), home_pos)

    units = np.array([a for a in range(1, n_clusters) if math.gcd(a, n_clusters) == 1] or [1], dtype=np.int64)
    if cohorts:  # drawn only when asked for, so streams without cohorts stay what they were
        cohort = rng.integers(0, cohorts, n_users)
        a = units[rng.integers(0, units.size, cohorts)][cohort]
        b = rng.integers(0, n_clusters, cohorts)[cohort]
    else:
        a = units[rng.integers(0, units.size, n_users)]
        b = rng.integers(0, n_clusters, n_users)
    cluster = np.asarray((a[seg_user] * position + b[seg_user]) % n_clusters, dtype=np.int64)
    return _Segments(cluster, home_pos, fresh_count, a, b)


def _repeat_sources(rng: np.random.Generator, first: np.ndarray, repeat: float) -> np.ndarray:
    """For events in per-user time order: the index of the event each one copies its item from (itself if none).

    An event repeats with probability ``repeat`` (never a user's first); it copies the event a geometric number of
    steps back within its user (clamped to the user's first event). A repeat of a repeat copies what that one
    copied: pointers are followed to their root by pointer jumping, O(n log n), no Python loop over events.
    """
    n = first.size
    index = np.arange(n, dtype=np.int64)
    user_start = np.maximum.accumulate(np.where(first, index, 0))
    repeats = (rng.random(n) < repeat) & ~first
    lag = rng.geometric(1.0 / REPEAT_MEAN_LAG, n)
    source = np.where(repeats, np.maximum(index - lag, user_start), index)
    while True:  # every pointer goes strictly back, so this ends after at most log2(longest chain) rounds
        deeper = source[source]
        if np.array_equal(deeper, source):
            return source
        source = deeper


def _grouped_cumsum(x: np.ndarray, group_start: np.ndarray) -> np.ndarray:
    """Inclusive cumulative sum that restarts at every ``group_start``."""
    total = np.cumsum(x)
    start_idx = np.maximum.accumulate(np.where(group_start, np.arange(x.size), 0))
    return np.asarray(total - total[start_idx] + x[start_idx])


@dataclass(frozen=True)
class _Slots:
    """Items shuffled into ``C`` near-equal blocks (slots), each block a cluster with Zipf popularity by rank."""

    item_of_slot: np.ndarray
    cluster_of_slot: np.ndarray
    prob: np.ndarray  # the slot's probability within its cluster
    bounds: np.ndarray  # block c is slots bounds[c] .. bounds[c + 1] - 1
    cdf: np.ndarray

    def draw(self, rng: np.random.Generator, event_cluster: np.ndarray) -> np.ndarray:
        """An item per event from its cluster, in one ``searchsorted``: cluster ``c``'s CDF is stored shifted by
        ``c`` in one increasing array, so ``searchsorted(c + u)`` lands in block ``c`` at a Zipf-distributed rank."""
        slot = np.searchsorted(self.cdf, event_cluster + rng.random(event_cluster.size), side="right")
        slot = np.minimum(slot, self.bounds[event_cluster + 1] - 1)
        return np.asarray(self.item_of_slot[slot])


def _cluster_slots(rng: np.random.Generator, n_items: int, n_clusters: int, zipf: float) -> _Slots:
    """Shuffle the items into clusters and build the shifted per-cluster CDF :meth:`_Slots.draw` searches."""
    item_of_slot = rng.permutation(n_items).astype(np.int64)
    bounds = np.linspace(0, n_items, n_clusters + 1).round().astype(np.int64)
    sizes = np.diff(bounds)
    rank = np.arange(n_items) - np.repeat(bounds[:-1], sizes) + 1
    weight = rank.astype(np.float64) ** -zipf
    cluster_of_slot = np.repeat(np.arange(n_clusters), sizes)
    cum = np.cumsum(weight)
    before = np.concatenate(([0.0], cum[bounds[1:-1] - 1]))
    totals = cum[bounds[1:] - 1] - before
    cdf = (cum - before[cluster_of_slot]) / totals[cluster_of_slot] + cluster_of_slot
    cdf[bounds[1:] - 1] = np.arange(1, n_clusters + 1)  # exact block ends despite rounding
    return _Slots(item_of_slot, cluster_of_slot, weight / totals[cluster_of_slot], bounds, cdf)
