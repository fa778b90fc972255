"""Bayes ceilings of the synthetic streams: how well can *anything* rank their test targets?

Run on demand (not in CI), from the repository root:

    PYTHONPATH=. .venv/bin/python bench/synthetic_ceiling.py synthetic "synthetic:users=1000,events=50000,repeat=0.5"
    PYTHONPATH=. .venv/bin/python bench/synthetic_ceiling.py "synthetic:users=1000,events=50000,repeat=0.5" \
        --bundle runs/repeat/s05-seed1      # adds the bundle's methods, scored per example, with paired CIs

Why: two accuracy targets (issues 11 and 15) are missed on these streams; before asking the model for more we
need to know how much there is to get. The generator's own draws (:func:`recsys.synthetic.draw`, which
``generate`` writes out) keep what the stream does not show - each event's interest segment, the user's cluster
permutation, home pointer and count of fresh jumps - and the oracles read them. The test examples are the very
ones ``persona evaluate`` scores (the same k-core and ``make_split``).

Oracles (full-catalogue ranking over the training vocabulary, like every method):

``state``  knows the generator's parameters and the user's whole latent state *before* the target: the interest
    segment's cluster of the previous event, the user's permutation of clusters, the home pointer and the number of
    fresh jumps so far, whether the target falls in the late period, and every earlier item of the user (k-core
    removals included). It ranks by the exact probability of the next item: ``(1 - repeat) * sum_c P(c) zipf_c(i)
    + repeat * sum_lag P(lag) [item at t - lag == i]`` with ``P(c)`` = stay / fresh jump / jump to another home
    cluster as the generator draws them. It sees strictly more than any model can (the model sees items, not
    segments or permutations), so its *expected* NDCG@10 is an upper bound on every recommender's: ranking by the
    true conditional probability maximises expected NDCG given that information, and more information never
    lowers the optimum. (Measured on a finite test set it is an estimate of that bound, with its own noise.)
``history``  knows the generator's rules and global parameters but sees only the user's observed items, as a model
    does (:func:`history_beliefs`): an achievable predictor, so a *lower* bound on the Bayes ceiling.
``target-cluster``  also knows the target event's own segment cluster: a looser bound, not achievable by anything
    that predicts the next event (it reads part of the answer).

``--bundle B --mix`` adds a diagnostic for the repeat part: B's model without its repeat part mixed in probability
space with the generator's repeat kernel (:func:`kernel_mixture`).

Ties (e.g. equal Zipf ranks of two equally likely home clusters) count as a uniformly random order: the NDCG@10 of
a tie group is its expected value, as an oracle that breaks ties at random would get on average.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from recsys.synthetic import FRESH_PROB, REPEAT_MEAN_LAG, Draws, SyntheticConfig, draw

ORACLES = ("state", "history", "target-cluster")
_CHUNK = 2048  # test examples scored at once (a [chunk, items] float64 block)
_FLOOR = 1e-3  # the history predictor's mass on every cluster, against its own approximations
_LAG_CAP = 400  # lags beyond this carry (1 - 1/8)^400 ~ 1e-23 of a repeat's mass: below float64 resolution


@dataclass(frozen=True)
class Latents(Draws):
    """The generator's draws (:class:`recsys.synthetic.Draws`, events in per-user time order) and, from them,
    ``zipf`` [C, items]: each cluster's exact item distribution."""

    zipf: np.ndarray

    @property
    def home(self) -> int:
        return max(1, min(3, int(self.cfg.clusters) // 4))

    @property
    def n_fresh(self) -> int:
        return int(self.cfg.clusters) - self.home

    def cluster_at(self, user: np.ndarray, position: np.ndarray) -> np.ndarray:
        return np.asarray((self.perm_a[user] * position + self.perm_b[user]) % int(self.cfg.clusters))


def simulate(cfg: SyntheticConfig) -> Latents:
    """The stream's latent state, read from the generator's own draws (:func:`recsys.synthetic.draw`, which
    :func:`recsys.synthetic.generate` writes out): the ceiling scores the very stream ``persona train`` reads."""
    d = draw(cfg)
    zipf = np.zeros((int(cfg.clusters), int(cfg.items)))
    zipf[d.cluster_of_slot, d.item_of_slot] = d.slot_prob
    return Latents(**{f.name: getattr(d, f.name) for f in fields(d)}, zipf=zipf)


def cluster_probs(lat: Latents, pos: np.ndarray, oracle: str = "state") -> np.ndarray:
    """[M, C]: probability of the interest segment's cluster at per-user positions ``pos`` (never a user's first)."""
    m, n_clusters = pos.size, int(lat.cfg.clusters)
    rows = np.arange(m)
    out = np.zeros((m, n_clusters))
    if oracle == "target-cluster":
        out[rows, lat.seg_cluster[lat.seg[pos]]] = 1.0
        return out
    if oracle != "state":
        raise ValueError(f"unknown oracle {oracle!r}; use one of {ORACLES}")
    if lat.first[pos].any():
        raise ValueError("a user's first event has no state before it")
    prev, user = lat.seg[pos - 1], lat.user[pos]
    p = lat.shift[pos]
    fresh = np.where(lat.late[pos] & (lat.n_fresh > 0), FRESH_PROB, 0.0)
    np.add.at(out, (rows, lat.seg_cluster[prev]), 1.0 - p)
    fresh_pos = lat.home + lat.fresh_count[prev] % max(lat.n_fresh, 1)
    np.add.at(out, (rows, lat.cluster_at(user, fresh_pos)), p * fresh)
    steps = range(1, max(lat.home, 2))  # the generator's `integers(1, max(home, 2)) % home`, uniform
    for s in steps:
        home_pos = (lat.home_pos[prev] + s % lat.home) % lat.home
        np.add.at(out, (rows, lat.cluster_at(user, home_pos)), p * (1.0 - fresh) / len(steps))
    return out


def repeat_probs(lat: Latents, pos: np.ndarray) -> np.ndarray:
    """[M, items]: where a repeat at ``pos`` lands: the item of the event a geometric lag back (mean 8), the user's
    first event taking the lags that reach past it - the generator's clamp."""
    m, q = pos.size, 1.0 / REPEAT_MEAN_LAG
    out = np.zeros((m, int(lat.cfg.items)))
    rows = np.arange(m)
    start = pos - _rank_in_user(lat)[pos]
    for lag in range(1, _LAG_CAP + 1):
        src = pos - lag
        inside = src > start
        if not inside.any():
            break
        np.add.at(out, (rows[inside], lat.item[src[inside]]), q * (1.0 - q) ** (lag - 1))
    np.add.at(out, (rows, lat.item[start]), (1.0 - q) ** (pos - start - 1))  # P(lag >= pos - start)
    return out


def item_probs(lat: Latents, pos: np.ndarray, oracle: str = "state") -> np.ndarray:
    """[M, items]: the oracle's probability of each item being the event at per-user position ``pos``."""
    probs = cluster_probs(lat, pos, oracle) @ lat.zipf
    r = float(lat.cfg.repeat)
    if r > 0:
        probs = (1.0 - r) * probs + r * repeat_probs(lat, pos)
    return probs


@dataclass(frozen=True)
class HistoryBeliefs:
    """What the ``history`` predictor knows before each queried event: the segment cluster's predictive
    distribution ``cluster`` [M, C] and the repeat distribution as ``(row, item, weight)`` triplets."""

    cluster: np.ndarray
    rep_row: np.ndarray
    rep_item: np.ndarray
    rep_weight: np.ndarray

    def item_probs(self, lat: Latents, rows: np.ndarray) -> np.ndarray:
        """[len(rows), items] for the queried rows ``rows`` (a contiguous range, as the chunks are)."""
        probs = self.cluster[rows] @ lat.zipf
        r = float(lat.cfg.repeat)
        if r > 0:
            rep = np.zeros_like(probs)
            sel = (self.rep_row >= rows[0]) & (self.rep_row <= rows[-1])
            np.add.at(rep, (self.rep_row[sel] - rows[0], self.rep_item[sel]), self.rep_weight[sel])
            probs = (1.0 - r) * probs + r * rep
        return probs


def history_beliefs(
    lat: Latents, kept: np.ndarray, query: np.ndarray, *, mean_lag: float = REPEAT_MEAN_LAG
) -> HistoryBeliefs:
    """A predictor that knows the generator's *rules and global parameters* (which cluster each item is in, the
    Zipf weights, the jump and repeat probabilities, when the late period starts) but sees only the user's own
    observed items - the k-cored events ``kept`` (per-user positions) - as a model does. It filters the segment's
    cluster (a hidden Markov model: stay, jump home, jump to a never-seen cluster; an item is a repeat or a Zipf
    draw from the segment's cluster) and predicts ``query`` (per-user positions, a subset of ``kept``).

    Home clusters are guessed as the first distinct clusters seen before the late period, the home pointer as the
    last home cluster believed current, and a fresh jump as uniform over the clusters not seen yet (the user's
    cluster permutation is not inferred): approximations, so this is an *achievable* predictor - a lower bound on
    the Bayes ceiling, as ``state`` is an upper one.
    """
    n_clusters, home, q, r = int(lat.cfg.clusters), lat.home, 1.0 / mean_lag, float(lat.cfg.repeat)
    row_of = {int(p): i for i, p in enumerate(query)}
    cluster_out = np.zeros((query.size, n_clusters))
    rep_rows: list[np.ndarray] = []
    rep_items: list[np.ndarray] = []
    rep_weights: list[np.ndarray] = []
    item_cluster = np.argmax(lat.zipf > 0, axis=0)
    kept = np.sort(kept)
    lags = np.arange(1, _LAG_CAP + 1)
    lag_w = q * (1.0 - q) ** (lags - 1)
    bounds = np.flatnonzero(np.diff(lat.user[kept]) != 0) + 1
    for events in np.split(kept, bounds):
        items = lat.item[events]
        belief = np.zeros(n_clusters)
        seen = np.zeros(n_clusters, dtype=bool)
        homes: list[int] = []
        pointer: int | None = None
        for k, pos in enumerate(events):
            if k == 0:
                prior = np.full(n_clusters, 1.0 / n_clusters)
                rep_w: np.ndarray = np.zeros(0)
            else:
                prior = _predict(belief, seen, homes, pointer, home, float(lat.shift[pos]), bool(lat.late[pos]))
                n_lag = min(k, _LAG_CAP)
                rep_w = np.array(lag_w[:n_lag])
                if k <= _LAG_CAP:  # the first item takes the lags that reach past it
                    rep_w[k - 1] = (1.0 - q) ** (k - 1)
            history = items[k - rep_w.size : k][::-1]  # lag 1 first
            row = row_of.get(int(pos))
            if row is not None:
                cluster_out[row] = prior
                rep_rows.append(np.full(rep_w.size, row))
                rep_items.append(history)
                rep_weights.append(rep_w)
            item = int(items[k])
            rep = float(rep_w[history == item].sum()) if r > 0 else 0.0
            like = lat.zipf[:, item] if k == 0 else (1.0 - r) * lat.zipf[:, item] + r * rep  # a first: no repeat
            belief = prior * like
            belief = belief / belief.sum() if belief.sum() > 0 else prior  # a pure repeat says nothing new
            c = int(item_cluster[item])
            seen[c] = True
            if not lat.late[pos] and c not in homes and len(homes) < home:
                homes.append(c)
            if c in homes and belief[c] > 0.5:
                pointer = c
    if len(row_of) != query.size or not (cluster_out.sum(1) > 0).all():
        raise AssertionError("a queried event is not among the kept events")
    cat = lambda xs, t: np.concatenate(xs).astype(t) if xs else np.zeros(0, t)  # noqa: E731
    return HistoryBeliefs(cluster_out, cat(rep_rows, np.int64), cat(rep_items, np.int64), cat(rep_weights, np.float64))


def _predict(
    belief: np.ndarray, seen: np.ndarray, homes: list[int], pointer: int | None, home: int, p: float, late: bool
) -> np.ndarray:
    """The next segment's cluster from the current one's belief, under the generator's jump rules as far as the
    history shows them (see :func:`history_beliefs`)."""
    n_clusters = belief.size
    unseen = ~seen
    spread = unseen / unseen.sum() if unseen.any() else np.full(n_clusters, 1.0 / n_clusters)
    fresh = FRESH_PROB if late and n_clusters > home else 0.0

    def home_jump(ptr: int | None) -> np.ndarray:
        out = np.zeros(n_clusters)
        if home == 1:  # the only home cluster
            if ptr is not None:
                out[ptr] = 1.0
            else:
                out += spread
            return out
        others = [h for h in homes if h != ptr][: home - 1]
        out[others] += 1.0 / (home - 1)
        out += spread * (home - 1 - len(others)) / (home - 1)
        return out

    in_home = np.zeros(n_clusters, dtype=bool)
    in_home[homes] = True
    jump = belief[~in_home].sum() * home_jump(pointer)
    for h in homes:
        jump += belief[h] * home_jump(h)
    out = (1.0 - p) * belief + p * (fresh * spread + (1.0 - fresh) * jump)
    return (1.0 - _FLOOR) * out + _FLOOR / n_clusters  # what the guesses rule out (a wrong home guess) stays possible


def expected_metrics(probs: np.ndarray, k: int = 10) -> np.ndarray:
    """[M, 2]: the NDCG@k and HR@k the oracle *expects* on each row, over its own distribution renormalised to the
    ranked columns (the target is one of them): sum over its top k of ``p / log2(rank + 2)`` and of ``p``. Free of
    the noise of which target was drawn; its mean agreeing with the measured one checks the probabilities."""
    p = probs / probs.sum(1, keepdims=True)
    top = -np.sort(-p, axis=1)[:, :k]
    return np.stack([(top / np.log2(np.arange(k) + 2.0)).sum(1), top.sum(1)], axis=1)


def _rank_in_user(lat: Latents) -> np.ndarray:
    n = lat.first.size
    return np.arange(n) - np.maximum.accumulate(np.where(lat.first, np.arange(n), 0))


def tie_averaged_metrics(scores: np.ndarray, target: np.ndarray, valid: np.ndarray, k: int = 10) -> np.ndarray:
    """[M, 2] per-example NDCG@k and HR@k of ``target`` columns among ``valid`` columns, ties in random order
    (their expected value): with g items strictly above and e others tied, the rank is uniform on g..g+e."""
    s = np.where(valid[None, :], scores, -np.inf)
    t = s[np.arange(len(target)), target][:, None]
    above = (s > t).sum(1)
    tied = (s == t).sum(1) - 1
    ranks = above[:, None] + np.arange(k)[None, :]  # the first k ranks of the tie group (the rest score 0)
    inside = (np.arange(k)[None, :] <= tied[:, None]) & (ranks < k)
    gain = np.where(inside, 1.0 / np.log2(ranks + 2.0), 0.0).sum(1) / (tied + 1)
    hit = inside.sum(1) / (tied + 1)
    return np.stack([gain, hit], axis=1)


@dataclass
class Ceiling:
    """Per-example NDCG@10 (and HR@10) of each oracle on a stream's test examples, aligned with ``split.test``."""

    source: str
    n_test: int
    ndcg: dict[str, np.ndarray]
    hr: dict[str, np.ndarray]
    expected: dict[str, np.ndarray]  # [M, 2] expected NDCG@10, HR@10 per example (:func:`expected_metrics`)
    seen: np.ndarray  # bool [M]: the target is an item the user had before (in the generator's stream)
    stats: dict[str, float]


def parse_source(source: str) -> SyntheticConfig:
    """``synthetic[:k=v,...]`` → its config, parsed as ``persona train`` parses it."""
    from recsys.data import synthetic_config

    return synthetic_config(source)


def ceiling(source: str, *, min_user: int = 5, min_item: int = 5) -> tuple[Ceiling, Any]:
    """The oracles on the time-shift test examples ``persona evaluate`` builds for ``source``; returns the split too."""
    from recsys.pipeline import DatasetSpec, prepare

    lat = simulate(parse_source(source))
    prepared = prepare(DatasetSpec(source=source, min_user=min_user, min_item=min_item))
    split, test = prepared.split, prepared.split.test
    pos = _positions(lat, test.ts)  # per-user position of each test target in the generator's own stream
    kept = _positions(lat, prepared.interactions.get_column("ts").to_numpy())
    beliefs = history_beliefs(lat, kept, pos)
    users = np.asarray(split.user_ids, dtype=object)[test.users]
    if not all(u == f"u{g}" for u, g in zip(users, lat.user[pos], strict=True)):
        raise AssertionError("test examples do not line up with the generator's users")
    vocab_ids = [int(x[1:]) for x in split.vocab.ids]  # column j + OFFSET is generator item vocab_ids[j]
    if not np.array_equal(np.asarray(vocab_ids)[test.targets - split.vocab.OFFSET], lat.item[pos]):
        raise AssertionError("test targets do not line up with the generator's items")
    cols = np.asarray(vocab_ids, dtype=np.int64)
    valid = np.ones(cols.size, dtype=bool)
    ndcg: dict[str, list[np.ndarray]] = {o: [] for o in ORACLES}
    hr: dict[str, list[np.ndarray]] = {o: [] for o in ORACLES}
    expected: dict[str, list[np.ndarray]] = {o: [] for o in ORACLES}
    min_prob = math.inf
    for lo in range(0, pos.size, _CHUNK):
        p = pos[lo : lo + _CHUNK]
        target = test.targets[lo : lo + _CHUNK] - split.vocab.OFFSET
        for oracle in ORACLES:
            if oracle == "history":
                probs = beliefs.item_probs(lat, np.arange(lo, lo + p.size))[:, cols]
            else:
                probs = item_probs(lat, p, oracle)[:, cols]
            if oracle != "history":  # the exact ones; the history predictor may rule out what happened
                min_prob = min(min_prob, float(probs[np.arange(p.size), target].min()))
            m = tie_averaged_metrics(probs, target, valid)
            ndcg[oracle].append(m[:, 0])
            hr[oracle].append(m[:, 1])
            # the history predictor's own expectation is its belief about itself, not a check: left out
            expected[oracle].append(expected_metrics(probs) if oracle != "history" else np.full((p.size, 2), np.nan))
    if min_prob <= 0:
        raise AssertionError("the oracle gives a test target probability 0: the replay or the rules are wrong")
    seen = _seen_before(lat, pos)
    stats = {
        "n_train": float(len(split.train)),
        "n_valid": float(len(split.valid)),
        "n_test": float(len(test)),
        "n_items": float(cols.size),
        "late_share": float(lat.late[pos].mean()),
        "target_seen_before": float(seen.mean()),
    }
    return (
        Ceiling(
            source,
            len(test),
            {k: np.concatenate(v) for k, v in ndcg.items()},
            {k: np.concatenate(v) for k, v in hr.items()},
            {k: np.concatenate(v) for k, v in expected.items()},
            seen,
            stats,
        ),
        split,
    )


def _positions(lat: Latents, ts: np.ndarray) -> np.ndarray:
    """Per-user positions of the generator's events at times ``ts`` (every event's time is distinct)."""
    step = np.searchsorted(lat.ts, ts)
    if not np.array_equal(lat.ts[np.minimum(step, lat.ts.size - 1)], ts):
        raise AssertionError("a time is not an event of the generator")
    where = np.empty(lat.step.size, dtype=np.int64)
    where[lat.step] = np.arange(lat.step.size)
    return where[step]


def _seen_before(lat: Latents, pos: np.ndarray) -> np.ndarray:
    """bool [M]: the test target is an item the user already had (repeats and Zipf heads alike)."""
    start = pos - _rank_in_user(lat)[pos]
    return np.array([lat.item[p] in set(lat.item[s:p].tolist()) for s, p in zip(start, pos, strict=True)])


def bundle_per_example(bundle: Path, source: str, methods: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Per-example test NDCG@10 of a bundle's methods, exactly as ``persona evaluate`` scores them."""
    import torch

    from recsys.evaluate import build_methods, evaluate_examples
    from recsys.pipeline import load_trained, prepare
    from recsys.repeats import REPEAT_SIZE

    trained = load_trained(bundle)
    if trained.spec.source != source:
        raise SystemExit(f"bundle {bundle} was trained on {trained.spec.source}, not {source}")
    cfg = trained.model.cfg
    counts = cfg.repeat_size or (REPEAT_SIZE if "session-repeat" in methods else 0)
    prepared = prepare(trained.spec, max_len=cfg.max_len, window_stride=cfg.stride, repeat_size=counts)
    if prepared.fingerprint != trained.bundle.manifest.get("data_fingerprint"):
        raise SystemExit(f"the data of {source} changed since bundle {bundle} was trained")
    torch.manual_seed(0)
    out = {}
    for method in build_methods(
        trained.model,
        prepared.split.item_counts,
        no_prototype_model=trained.no_prototype_model,
        names=methods,
    ):
        out[method.name] = evaluate_examples(method, prepared.split.test, progress=False).ndcg10
    return out


MIX_WEIGHTS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def kernel_mixture(
    bundle: Path, source: str, *, decay: float = 1.0 - 1.0 / REPEAT_MEAN_LAG
) -> tuple[float, dict[float, float], np.ndarray]:
    """A diagnostic for the repeat part: the bundle's model *without* its repeat part, mixed in probability space
    with a fixed repeat kernel, ``(1 - w) softmax(scores) + w R``, where ``R`` spreads a geometric lag (mean 8, a
    decayed count with gamma 7/8 per event, normalised) over the user's whole observed history - the generator's
    repeat rule, computable from any history; ``decay`` another gamma). ``w`` is chosen on validation NDCG@10 from
    :data:`MIX_WEIGHTS`.

    Returns ``(w, {w: validation NDCG@10}, per-example test NDCG@10)`` (test examples in ``split.test`` order).
    """
    import torch

    from recsys.pipeline import load_trained, prepare

    trained = load_trained(bundle)
    if trained.spec.source != source:
        raise SystemExit(f"bundle {bundle} was trained on {trained.spec.source}, not {source}")
    prepared = prepare(trained.spec, max_len=trained.model.cfg.max_len, window_stride=trained.model.cfg.stride)
    split = prepared.split
    lat = simulate(parse_source(source))
    kept = _positions(lat, prepared.interactions.get_column("ts").to_numpy())
    cols = np.asarray([int(x[1:]) for x in split.vocab.ids], dtype=np.int64)
    valid = np.ones(cols.size, dtype=bool)

    def ndcg(examples: Any, weights: tuple[float, ...]) -> dict[float, np.ndarray]:
        beliefs = history_beliefs(lat, kept, _positions(lat, examples.ts), mean_lag=1.0 / (1.0 - decay))
        out: dict[float, list[np.ndarray]] = {w: [] for w in weights}
        for lo in range(0, len(examples), _CHUNK):
            rows = np.arange(lo, min(lo + _CHUNK, len(examples)))
            with torch.no_grad():
                scores = trained.model.score(torch.from_numpy(examples.histories[rows]), repeats=None)
            model = torch.softmax(scores[:, split.vocab.OFFSET :].double(), 1).numpy()
            rep = np.zeros((rows.size, int(lat.cfg.items)))
            sel = (beliefs.rep_row >= rows[0]) & (beliefs.rep_row <= rows[-1])
            np.add.at(rep, (beliefs.rep_row[sel] - rows[0], beliefs.rep_item[sel]), beliefs.rep_weight[sel])
            target = examples.targets[rows] - split.vocab.OFFSET
            for w in weights:
                out[w].append(tie_averaged_metrics((1.0 - w) * model + w * rep[:, cols], target, valid)[:, 0])
        return {w: np.concatenate(v) for w, v in out.items()}

    on_valid = {w: float(v.mean()) for w, v in ndcg(split.valid, MIX_WEIGHTS).items()}
    best = max(MIX_WEIGHTS, key=lambda w: on_valid[w])
    return best, on_valid, ndcg(split.test, (best,))[best]


def _bundle_core(bundle: Path) -> dict[str, int]:
    """The k-core bounds a bundle's data was cut with, so the oracles score the bundle's own test examples."""
    from recsys.pipeline import load_trained

    spec = load_trained(bundle).spec
    return {"min_user": spec.min_user, "min_item": spec.min_item}


def _seen_new(ndcg: np.ndarray, seen: np.ndarray) -> list[float]:
    return [
        float(ndcg[seen].mean()) if seen.any() else math.nan,
        float(ndcg[~seen].mean()) if (~seen).any() else math.nan,
    ]


def _mean_ci(x: np.ndarray, resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile bootstrap interval of a mean over test examples (the oracle's own sampling noise)."""
    rng = np.random.default_rng(seed)
    means = np.array([x[rng.integers(0, x.size, x.size)].mean() for _ in range(resamples)])
    lo, hi = np.quantile(means, [0.025, 0.975])
    return float(lo), float(hi)


def main(argv: list[str] | None = None) -> int:
    from recsys.bootstrap import paired_ratio

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sources", nargs="+", help="synthetic[:key=value,...] specs, as for `persona train --dataset`")
    ap.add_argument("--bundle", type=Path, help="a bundle trained on the (single) source: adds its methods, paired")
    ap.add_argument("--methods", default="base,base-no-repeat,persona", help="the bundle's methods to score")
    ap.add_argument("--mix", action="store_true", help="with --bundle: base-no-repeat mixed with the repeat kernel")
    ap.add_argument("--mix-decay", type=float, default=1.0 - 1.0 / REPEAT_MEAN_LAG, help="the kernel's gamma")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args(argv)
    if args.bundle and len(args.sources) != 1:
        ap.error("--bundle needs exactly one source")
    if args.mix and not args.bundle:
        ap.error("--mix needs --bundle")
    report = []
    for source in args.sources:
        core = _bundle_core(args.bundle) if args.bundle else {}
        ceil, _ = ceiling(source, **core)
        row: dict[str, Any] = {"source": source, **ceil.stats}
        for oracle in ORACLES:
            row[f"{oracle}_ndcg10"] = float(ceil.ndcg[oracle].mean())
            row[f"{oracle}_hr10"] = float(ceil.hr[oracle].mean())
            lo, hi = _mean_ci(ceil.ndcg[oracle])
            row[f"{oracle}_ndcg10_ci95"] = [lo, hi]
            exp_ndcg, exp_hr = ceil.expected[oracle].mean(0).tolist()
            known = math.isfinite(exp_ndcg)
            row[f"{oracle}_expected_ndcg10"] = exp_ndcg if known else None
            row[f"{oracle}_expected_hr10"] = exp_hr if known else None
            row[f"{oracle}_ndcg10_seen_new"] = _seen_new(ceil.ndcg[oracle], ceil.seen)
        sizes = f"train/valid {ceil.stats['n_train']:.0f}/{ceil.stats['n_valid']:.0f}"
        print(f"{source}: {ceil.n_test} test examples ({sizes}; {ceil.seen.mean():.1%} of targets seen before)")
        for oracle in ORACLES:
            ci = row[f"{oracle}_ndcg10_ci95"]
            exp = row[f"{oracle}_expected_ndcg10"]
            print(
                f"  {oracle}: NDCG@10 {row[f'{oracle}_ndcg10']:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]"
                + (f" (expected {exp:.4f})" if exp is not None else "")
                + f", HR@10 {row[f'{oracle}_hr10']:.4f}; NDCG@10 on seen / new targets "
                + "{:.4f} / {:.4f}".format(*row[f"{oracle}_ndcg10_seen_new"])
            )
        if args.bundle:
            names = tuple(m.strip() for m in args.methods.split(",") if m.strip())
            per = bundle_per_example(args.bundle, source, names)
            row["bundle"] = str(args.bundle)
            for name, scores in per.items():
                row[f"{name}_ndcg10"] = float(scores.mean())
                row[f"{name}_ndcg10_seen_new"] = seen_new = _seen_new(scores, ceil.seen)
                line = f"  {name}: NDCG@10 {scores.mean():.4f} (seen / new {seen_new[0]:.4f} / {seen_new[1]:.4f})"
                for oracle in ("state", "history"):
                    r = paired_ratio(ceil.ndcg[oracle], scores)
                    row[f"{oracle}_vs_{name}"] = r.as_dict()
                    lo, hi = r.ci95 or (math.nan, math.nan)
                    line += f"; {oracle} / {name} {r.ratio:.3f} [{lo:.3f}, {hi:.3f}]"
                print(line)
            if args.mix:
                w, on_valid, mixed = kernel_mixture(args.bundle, source, decay=args.mix_decay)
                row["mix_decay"] = args.mix_decay
                row["mix_weight"], row["mix_valid_ndcg10"], row["mix_ndcg10"] = w, on_valid, float(mixed.mean())
                row["mix_ndcg10_seen_new"] = seen_new = _seen_new(mixed, ceil.seen)
                line = f"  base-no-repeat + repeat kernel (gamma {args.mix_decay:.3f}, w {w} on validation): "
                line += f"NDCG@10 {mixed.mean():.4f}, on validation {on_valid[w]:.4f}"
                line += f" (seen / new {seen_new[0]:.4f} / {seen_new[1]:.4f})"
                for name in ("base-no-repeat", "persona"):
                    if name in per:
                        r = paired_ratio(mixed, per[name])
                        row[f"mix_vs_{name}"] = r.as_dict()
                        lo, hi = r.ci95 or (math.nan, math.nan)
                        line += f"; / {name} {r.ratio:.3f} [{lo:.3f}, {hi:.3f}]"
                print(line)
        report.append(row)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
