"""Prometheus metrics of one consumer process (DESIGN.md "Metrics"; names are a contract with dashboards).

Every :class:`ConsumerMetrics` owns its own ``CollectorRegistry``: two consumers in one test process never
share counters, and the HTTP endpoint exposes exactly this consumer. No label carries a session or user id
(cardinality stays bounded: event types are mapped by :func:`persona.events.event_type_label`, reasons are
a fixed enum, prototypes and partitions are small integers).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from persona.events import Event, Rejection, event_type_label
from persona.ingest import KS, VARIANTS, IngestResult
from recsys.drift import SlidingCounts, js_divergence, psi
from recsys.online import OnlineModel

__all__ = ["ConsumerMetrics", "OnlineCounters", "observe_many"]

_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_FRESHNESS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
_RATIO_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)


def observe_many(histogram: Histogram, values: Sequence[float] | np.ndarray) -> None:
    """``histogram.observe(v)`` for every value, as one bucket count per bucket (a poll batch observes hundreds).

    Uses the client's internal per-bucket values (``_upper_bounds``, ``_buckets``, ``_sum``); a test compares the
    result with plain ``observe`` calls, so a client release that changes them fails loudly instead of
    silently miscounting. Without them it falls back to ``observe``.
    """
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None:
        for v in values:
            histogram.observe(v)
        return
    if not len(values):
        return
    arr = np.asarray(values, dtype=np.float64)
    # bucket i holds the values v with bounds[i-1] < v <= bounds[i] (observe's "first bound >= v")
    counts = np.bincount(np.searchsorted(np.asarray(bounds), arr, side="left"), minlength=len(bounds))
    for bucket, n in zip(buckets, counts.tolist(), strict=False):
        if n:
            bucket.inc(n)
    total.inc(float(arr.sum()))


class OnlineCounters(Collector):
    """``persona_predictions_total{variant}``, ``persona_hits_total{variant,k}``, ``persona_ndcg_gain_total{variant,k}``
    and ``persona_reciprocal_rank_total{variant}``, read from the store on each scrape (:meth:`read_from`).

    The store adds to them in the transaction of the events they count (:mod:`persona.ingest`), so they are
    exactly-once: a crash loses none, a redelivered event adds none. Every consumer exports the same totals (the
    whole store's, HTTP ingestion included): aggregate them across instances with ``max``, not ``sum``. Before a
    store is attached, and when the store cannot be read, the last values read are exported (zeros at first).
    """

    def __init__(self) -> None:
        self._read: Callable[[], dict[tuple[str, str, int], float]] | None = None
        self._last: dict[tuple[str, str, int], float] = {}

    def read_from(self, read: Callable[[], dict[tuple[str, str, int], float]]) -> None:
        """Export what ``read()`` returns: ``{(name, variant, k): value}`` (e.g. ``Store.online_counters``)."""
        self._read = read

    def describe(self) -> Iterable[Metric]:
        return self._families({})

    def collect(self) -> Iterable[Metric]:
        if self._read is not None:
            with contextlib.suppress(Exception):  # the store is down: a counter must not drop, keep the last values
                self._last = self._read()
        return self._families(self._last)

    @staticmethod
    def _families(values: dict[tuple[str, str, int], float]) -> list[Metric]:
        predictions = CounterMetricFamily(
            "persona_predictions", "Prequential predictions made before applying an event.", labels=["variant"]
        )
        hits = CounterMetricFamily("persona_hits", "Prequential hits at k.", labels=["variant", "k"])
        ndcg = CounterMetricFamily("persona_ndcg_gain", "Sum of prequential NDCG gains at k.", labels=["variant", "k"])
        rr = CounterMetricFamily("persona_reciprocal_rank", "Sum of prequential reciprocal ranks.", labels=["variant"])
        for v in VARIANTS:  # every series exists from the start: Grafana sees zeros, not gaps
            predictions.add_metric([v], values.get(("predictions", v, 0), 0.0))
            rr.add_metric([v], values.get(("reciprocal_rank", v, 0), 0.0))
            for k in KS:
                hits.add_metric([v, str(k)], values.get(("hits", v, k), 0.0))
                ndcg.add_metric([v, str(k)], values.get(("ndcg_gain", v, k), 0.0))
        return [predictions, hits, ndcg, rr]


class ConsumerMetrics:
    """All consumer metrics on a private registry, plus the sliding windows behind the drift gauges.

    Args:
        window: how many recent assignments / items the drift gauges compare with the training period.
    """

    def __init__(self, *, window: int = 5000) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.consumed = Counter("persona_events_consumed", "Valid events read from Kafka.", ["type"], registry=r)
        self.invalid = Counter("persona_events_invalid", "Events that failed validation.", ["reason"], registry=r)
        self.dlq = Counter("persona_events_dlq", "Events sent to the dead-letter topic.", ["reason"], registry=r)
        self.duplicate = Counter("persona_events_duplicate", "Events already applied (dedup on event_id).", registry=r)
        self.unknown_item = Counter("persona_events_unknown_item", "Events with an item the model lacks.", registry=r)
        self.processing = Histogram(
            "persona_event_processing_seconds", "Time to process one poll batch.", buckets=_SECONDS_BUCKETS, registry=r
        )
        self.freshness = Histogram(
            "persona_event_freshness_seconds",
            "Event timestamp to session state stored.",
            buckets=_FRESHNESS_BUCKETS,
            registry=r,
        )
        self.lag = Gauge("persona_consumer_lag", "Records behind the high watermark.", ["partition"], registry=r)
        self.last_batch = Gauge(
            "persona_consumer_last_batch_timestamp_seconds", "Unix time of the last processed batch.", registry=r
        )
        self.last_poll = Gauge(
            "persona_consumer_last_poll_timestamp_seconds",
            "Unix time the broker last answered this consumer (records fetched, or end offsets read when idle).",
            registry=r,
        )
        self.last_commit = Gauge(
            "persona_consumer_last_commit_timestamp_seconds", "Unix time of the last offset commit.", registry=r
        )
        self.dependency_up = Gauge(
            "persona_dependency_up",
            "1 while a dependency (store, kafka, model) works for this consumer, 0 during an outage.",
            ["dependency"],
            registry=r,
        )
        for dependency in ("store", "kafka", "model"):
            self.dependency_up.labels(dependency).set(1)
        # The prequential counters are the store's (written with the events they count): read on each scrape.
        self.online = OnlineCounters()
        r.register(self.online)
        self.psi = Gauge("persona_drift_psi", "PSI of a live distribution against training.", ["signal"], registry=r)
        self.js = Gauge("persona_drift_js", "JS divergence against training (bits).", ["signal"], registry=r)
        self.ood = Histogram(
            "persona_ood_score",
            "Distance of a new code to its prototype in units of the training q99.",
            buckets=_RATIO_BUCKETS,
            registry=r,
        )
        self.edit_norm = Histogram(
            "persona_edit_norm_ratio",
            "Edit norm / base head norm.",
            buckets=_RATIO_BUCKETS,
            registry=r,
        )
        self.assignments = Counter(
            "persona_prototype_assignments", "Events assigned to each prototype.", ["prototype"], registry=r
        )
        self.model_info = Gauge("persona_model_info", "The model version in use (value 1).", ["version"], registry=r)
        self.bank_version = Gauge("persona_bank_version", "Version of the prototype bank last written.", registry=r)
        self.terms_on = Gauge(
            "persona_prototypes_terms_on",
            "Prototypes applying a term (the edit, the group terms) under their online switches.",
            ["term"],
            registry=r,
        )
        self._window = window
        self._model_version: str | None = None
        self._proto_window: SlidingCounts | None = None
        self._item_window: SlidingCounts | None = None
        self._proto_ref: np.ndarray | None = None
        self._item_ref: np.ndarray | None = None

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        """Expose this registry on ``http://addr:port/metrics`` (a daemon thread)."""
        start_http_server(port, addr=addr, registry=self.registry)

    # ---------------------------------------------------------------------------------------- updates
    def set_model(self, online: OnlineModel) -> None:
        """Switch the info gauge and the drift references to ``online`` (a new version resets the windows)."""
        if online.version == self._model_version:
            return
        if self._model_version is not None:
            self.model_info.remove(self._model_version)
        self._model_version = online.version
        self.model_info.labels(online.version).set(1)
        mix = np.asarray(online.drift.prototype_mix, dtype=np.float64)
        self._proto_ref = mix
        self._proto_window = SlidingCounts(len(mix), self._window)
        counts = np.asarray(online.item_counts, dtype=np.float64)
        self._item_ref = counts
        self._item_window = SlidingCounts(len(counts), self._window)

    def record_invalid(self, rejections: Iterable[Rejection]) -> None:
        for rej in rejections:
            self.invalid.labels(str(rej.reason)).inc()

    def record_dlq(self, rejections: Iterable[Rejection]) -> None:
        for rej in rejections:
            self.dlq.labels(str(rej.reason)).inc()

    def record_consumed(self, events: Iterable[Event]) -> None:
        counts: dict[str, int] = {}
        for e in events:
            label = event_type_label(e.type)
            counts[label] = counts.get(label, 0) + 1
        for label, n in counts.items():
            self.consumed.labels(label).inc(n)

    def record_result(self, result: IngestResult) -> None:
        """Counters, histograms and drift gauges from one applied batch."""
        self.duplicate.inc(result.duplicates)
        self.unknown_item.inc(result.unknown_items)
        observe_many(self.freshness, np.maximum(np.asarray(result.freshness_s, dtype=np.float64), 0.0))
        observe_many(self.ood, result.ood_scores)
        observe_many(self.edit_norm, result.edit_norm_ratios)
        if result.prototypes:
            per_proto = np.bincount(np.asarray(result.prototypes, dtype=np.int64))
            for k, n in enumerate(per_proto.tolist()):
                if n:
                    self.assignments.labels(str(k)).inc(n)
        self.bank_version.set(result.bank_version)
        if result.terms_on is not None:
            self.terms_on.labels("edit").set(result.terms_on[0])
            self.terms_on.labels("group").set(result.terms_on[1])
        self._update_drift(result)

    def _update_drift(self, result: IngestResult) -> None:
        pw, iw = self._proto_window, self._item_window
        if pw is not None and self._proto_ref is not None and result.prototypes:
            n = len(self._proto_ref)
            pw.add_many([k for k in result.prototypes if 0 <= k < n])
            self.psi.labels("prototype_mix").set(psi(self._proto_ref, pw.counts))
        if iw is not None and self._item_ref is not None and result.item_indices:
            n = len(self._item_ref)
            iw.add_many([i for i in result.item_indices if 0 <= i < n])
            self.js.labels("item_popularity").set(js_divergence(self._item_ref, iw.counts))
