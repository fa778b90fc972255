"""The streaming consumer: Kafka poll batches through :class:`persona.ingest.Ingestor` into the store.

One loop iteration = one poll batch (up to ``max_poll_records``):

1. parse every record with :func:`persona.events.parse_event` (never raises);
2. apply the valid events in ONE store transaction (:meth:`Ingestor.apply`);
3. send the rejected records (invalid, and unknown items under the ``dlq`` policy) to the DLQ topic with
   their reason in headers and their original bytes, and flush;
4. commit the batch's offsets — only now, after the store committed, so a crash anywhere before this
   point replays the batch and dedup on ``event_id`` makes the replay harmless (exactly-once effect);
5. update the metrics.

If step 2 or 3 fails (store down, model missing, DLQ unreachable) nothing is committed: the consumer logs
loudly, seeks back to the batch's first offsets, backs off and retries the same records. It never skips.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from persona.events import DEFAULT_POLICY, Event, Rejection, ValidationPolicy, parse_event
from persona.ingest import Ingestor
from persona.store import Store
from recsys.online import OnlineModel
from streaming.kafka_io import dlq_send, ensure_topics, make_consumer, make_producer
from streaming.metrics import ConsumerMetrics

log = logging.getLogger(__name__)

__all__ = ["ConsumeStats", "ConsumerConfig", "EventConsumer", "ModelRefresher"]


class ModelRefresher(Protocol):
    """What the consumer needs of :class:`persona.models.ModelProvider`."""

    def get(self) -> OnlineModel: ...

    def refresh(self) -> bool: ...


@dataclass
class ConsumerConfig:
    """Where to read and how. ``None`` timeouts keep kafka-python's (production) defaults.

    ``max_events`` stops after that many records were processed (tests, benchmarks); ``idle_exit_s`` stops
    after that long without a record. ``refresh_s`` is how often the model registry is re-checked.
    """

    bootstrap: str
    topic: str
    dlq_topic: str
    group: str
    partitions: int = 4
    unknown_item_policy: str = "skip"
    prototype_idle_s: float | None = 3600.0
    max_poll_records: int = 500
    poll_timeout_ms: int = 500
    session_timeout_ms: int | None = None
    heartbeat_interval_ms: int | None = None
    max_events: int | None = None
    idle_exit_s: float | None = None
    refresh_s: float = 5.0
    retry_backoff_s: tuple[float, float] = (0.5, 30.0)
    validation: ValidationPolicy = DEFAULT_POLICY


@dataclass
class ConsumeStats:
    """What a run did, for the CLI summary and the benchmark."""

    records: int = 0
    applied: int = 0
    duplicates: int = 0
    dlq: int = 0
    batches: int = 0
    retries: int = 0
    seconds: float = 0.0
    #: From the first non-empty poll to the end of the last batch (excludes group join and idle time).
    active_seconds: float = 0.0
    freshness_s: list[float] = field(default_factory=list)
    keep_freshness: bool = False

    @property
    def rate(self) -> float:
        """Records per second of active time (group join and idle waits excluded)."""
        return self.records / self.active_seconds if self.active_seconds > 0 else 0.0


class _CommitOnRevoke(ConsumerRebalanceListener):
    """Commit what was processed before partitions move to another group member (no replay there)."""

    def __init__(self, owner: EventConsumer) -> None:
        self.owner = owner

    def on_partitions_revoked(self, revoked: Any) -> None:
        gone = set(revoked)
        self.owner._commit_processed(gone)
        # Forget them: a later commit must never move another member's offsets back.
        for tp in gone:
            self.owner._processed.pop(tp, None)
            self.owner._committed.pop(tp, None)

    def on_partitions_assigned(self, assigned: Any) -> None:
        self.owner.assigned.set()
        log.info("assigned partitions %s", sorted(tp.partition for tp in assigned))


class EventConsumer:
    """A consumer-group member applying events to the store; :meth:`run` until :meth:`stop` or a limit.

    Args:
        store: the store (shared with nobody else in this process is fine; the engine pools).
        models: the model provider; ``refresh()`` is called every ``cfg.refresh_s`` between batches.
        cfg: :class:`ConsumerConfig`.
        metrics: where to record; default: a fresh :class:`ConsumerMetrics` (its own registry).
    """

    def __init__(
        self,
        store: Store,
        models: ModelRefresher,
        cfg: ConsumerConfig,
        *,
        metrics: ConsumerMetrics | None = None,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        self.store = store
        self.models = models
        self.cfg = cfg
        self.metrics = metrics or ConsumerMetrics()
        self.ingestor = Ingestor(
            store, models, unknown_item_policy=cfg.unknown_item_policy, prototype_idle_s=cfg.prototype_idle_s
        )
        self.stats = ConsumeStats()
        self._stop = threading.Event()
        #: Set once the group gave this member its partitions (benchmarks wait for it before producing).
        self.assigned = threading.Event()
        self._sleep = sleep or self._stop.wait
        self._consumer: KafkaConsumer | None = None
        self._processed: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}
        self._last_batch_end = 0.0

    def stop(self) -> None:
        """Ask :meth:`run` to finish the current batch, commit and return (safe from a signal handler)."""
        self._stop.set()

    # ------------------------------------------------------------------------------------------ loop
    def run(self) -> ConsumeStats:
        cfg = self.cfg
        ensure_topics(cfg.bootstrap, {cfg.topic: cfg.partitions, cfg.dlq_topic: cfg.partitions})
        timeouts: dict[str, Any] = {}
        if cfg.session_timeout_ms is not None:
            timeouts["session_timeout_ms"] = cfg.session_timeout_ms
        if cfg.heartbeat_interval_ms is not None:
            timeouts["heartbeat_interval_ms"] = cfg.heartbeat_interval_ms
        consumer = make_consumer(cfg.bootstrap, cfg.group, [], max_poll_records=cfg.max_poll_records, **timeouts)
        consumer.subscribe([cfg.topic], listener=_CommitOnRevoke(self))
        self._consumer = consumer
        producer = make_producer(cfg.bootstrap, client_id=f"persona-dlq-{cfg.group}")
        started = time.monotonic()
        last_record = started
        last_refresh = started - cfg.refresh_s  # check the registry before the first batch
        backoff = cfg.retry_backoff_s[0]
        first_records: float | None = None
        try:
            while not self._stop.is_set():
                if cfg.max_events is not None and self.stats.records >= cfg.max_events:
                    break
                now = time.monotonic()
                if now - last_refresh >= cfg.refresh_s:
                    last_refresh = now
                    self._refresh_model()
                limit = cfg.max_poll_records
                if cfg.max_events is not None:
                    limit = max(1, min(limit, cfg.max_events - self.stats.records))
                polled = consumer.poll(timeout_ms=cfg.poll_timeout_ms, max_records=limit)
                records = [rec for batch in polled.values() for rec in batch]
                if not records:
                    self._update_lag()
                    if cfg.idle_exit_s is not None and time.monotonic() - last_record >= cfg.idle_exit_s:
                        log.info("no events for %.1fs: exiting", cfg.idle_exit_s)
                        break
                    continue
                last_record = time.monotonic()
                if first_records is None:
                    first_records = last_record
                if self._process(records, producer):
                    backoff = cfg.retry_backoff_s[0]
                else:
                    self.stats.retries += 1
                    self._sleep(backoff)
                    backoff = min(backoff * 2, cfg.retry_backoff_s[1])
            self._commit_processed(None)
        finally:
            self.stats.seconds = time.monotonic() - started
            if first_records is not None:
                self.stats.active_seconds = max(self._last_batch_end - first_records, 0.0)
            try:
                producer.flush(timeout=10)
            finally:
                producer.close(timeout=10)
                consumer.close(autocommit=False)
                self._consumer = None
        return self.stats

    def _process(self, records: list[Any], producer: Any) -> bool:
        """One batch; ``True`` when it was applied and committed, ``False`` after a rollback + seek back."""
        t0 = time.perf_counter()
        cfg = self.cfg
        first: dict[TopicPartition, int] = {}
        nxt: dict[TopicPartition, int] = {}
        valid: list[Event] = []
        source: dict[str, Any] = {}  # event_id -> its first record (for the unknown-item DLQ)
        invalid: list[tuple[Any, Rejection]] = []
        for rec in records:
            tp = TopicPartition(rec.topic, rec.partition)
            first.setdefault(tp, rec.offset)
            nxt[tp] = rec.offset + 1
            parsed = parse_event(rec.value if rec.value is not None else b"", cfg.validation)
            if isinstance(parsed, Rejection):
                invalid.append((rec, parsed))
            else:
                valid.append(parsed)
                source.setdefault(parsed.event_id, rec)
        try:
            result = self.ingestor.apply(valid, source="kafka")
            to_dlq = invalid + [(source[e.event_id], rej) for e, rej in result.rejected]
            for rec, rej in to_dlq:
                dlq_send(producer, cfg.dlq_topic, rec.value or b"", rec.key, rej, rec.topic, rec.partition, rec.offset)
            if to_dlq:
                producer.flush(timeout=30)
        except Exception:
            log.exception(
                "batch of %d records (offsets %s) failed; nothing committed, retrying the same records",
                len(records),
                {f"{tp.topic}[{tp.partition}]": off for tp, off in first.items()},
            )
            assert self._consumer is not None
            for tp, off in first.items():
                self._consumer.seek(tp, off)
            return False
        self._processed.update(nxt)
        self._commit_processed(set(nxt))
        m = self.metrics
        m.set_model(self.models.get())
        m.record_consumed(valid)
        m.record_invalid(rej for _rec, rej in invalid)
        m.record_dlq(rej for _rec, rej in to_dlq)
        m.record_result(result)
        m.processing.observe(time.perf_counter() - t0)
        m.last_batch.set(time.time())
        self._update_lag()
        st = self.stats
        st.records += len(records)
        st.applied += result.applied
        st.duplicates += result.duplicates
        st.dlq += len(to_dlq)
        st.batches += 1
        self._last_batch_end = time.monotonic()
        if st.keep_freshness:
            st.freshness_s.extend(result.freshness_s)
        return True

    # ------------------------------------------------------------------------------------------ helpers
    def _commit_processed(self, partitions: set[TopicPartition] | None) -> None:
        """Synchronously commit processed-but-uncommitted offsets (of ``partitions``, or all)."""
        consumer = self._consumer
        if consumer is None:
            return
        offsets = {
            tp: OffsetAndMetadata(off, "", -1)
            for tp, off in self._processed.items()
            if (partitions is None or tp in partitions) and self._committed.get(tp) != off
        }
        if not offsets:
            return
        try:
            consumer.commit(offsets)
        except KafkaError:
            # Not fatal: the records are applied; another member (or we) will replay them and dedup skips them.
            log.warning("offset commit failed for %s; the batch will be replayed harmlessly", offsets, exc_info=True)
            return
        for tp, om in offsets.items():
            self._committed[tp] = om.offset

    def _update_lag(self) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        for tp in consumer.assignment():
            high = consumer.highwater(tp)
            pos = self._processed.get(tp)
            if high is not None and pos is not None:
                self.metrics.lag.labels(str(tp.partition)).set(max(high - pos, 0))

    def _refresh_model(self) -> None:
        try:
            if self.models.refresh():
                log.info("switched to model version %s", self.models.get().version)
        except Exception:
            log.exception("model registry check failed; keeping the current model")
        else:
            try:
                self.metrics.set_model(self.models.get())
            except Exception:
                log.exception("no usable model yet")
