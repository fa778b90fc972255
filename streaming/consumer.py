"""The streaming consumer: Kafka poll batches through :class:`persona.ingest.Ingestor` into the store.

One batch (the records of one or more polls, up to ``max_batch_events``) goes through:

1. parse every record with :func:`persona.events.parse_event` (never raises);
2. apply the valid events in ONE store transaction (:meth:`Ingestor.prepare`, then :meth:`Ingestor.commit`);
3. send the rejected records (invalid, and unknown items under the ``dlq`` policy) to the DLQ topic with
   their reason in headers and their original bytes, and flush;
4. commit the batch's offsets — only now, after the store committed, so a crash anywhere before this
   point replays the batch and dedup on ``event_id`` makes the replay harmless (exactly-once effect);
5. update the metrics.

Step 2 is split in two (:meth:`Ingestor.prepare` and :meth:`Ingestor.commit`). This thread polls, parses and
*prepares* the next batch (session reads, the walk through the events, the model work started in the model
process or on the compute threads) while an applier thread *commits* the previous one (its one store
transaction), then finishes the committed batches (steps 3 to 5). So Kafka I/O, parsing and the model's heaviest
work overlap the store work, and most of them run outside the GIL. What is polled while a batch commits and
another waits accumulates (up to ``max_batch_events``) into the batch prepared next, so batches grow with the
load and an event never waits behind more than two batches. Batches still take effect strictly in order: one
commits only if every earlier one did, and a session a batch in flight touches is taken from that batch, not from
the store (``commit`` checks that whatever ``prepare`` read still holds, and redoes the work when it does not).

If step 2 or 3 fails (store down, model missing, DLQ unreachable), nothing of that batch or any later one is
committed: the consumer logs loudly, lets the batches already handed to the applier finish (a failure makes
it skip the rest), seeks every partition back to the first offset not yet committed, backs off and retries
the same records. It never skips. Before a rebalance takes partitions away, everything in flight is finished
and committed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Protocol

from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from persona.events import DEFAULT_POLICY, Event, Rejection, ValidationPolicy, parse_event
from persona.ingest import Ingestor, IngestResult, Prepared
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
    ``compute_threads`` run a batch's model work side by side, and ``session_cache`` is how many sessions it keeps
    in memory (:class:`persona.ingest.Ingestor`); with ``model_process`` the model work runs in a process of its
    own (:mod:`persona.model_worker`), started when :meth:`EventConsumer.run` starts. ``max_poll_records``
    bounds one Kafka poll, ``max_batch_events`` one batch (one store transaction): polls accumulate into the next
    batch while one commits, so batches grow with a backlog and per-batch costs (transaction, prototype bank,
    model calls) are shared by more events.
    ``fetch_max_wait_ms`` caps how long the broker may hold a fetch (kafka-python's default: 500 ms); Kafka
    answers as soon as records are there, the embedded development broker was seen to hold fetches much longer
    under a steady stream (streaming/bench.py), so its users set it low.
    """

    bootstrap: str
    topic: str
    dlq_topic: str
    group: str
    partitions: int = 4
    unknown_item_policy: str = "skip"
    prototype_idle_s: float | None = 3600.0
    max_poll_records: int = 500
    max_batch_events: int = 2000
    poll_timeout_ms: int = 500
    session_timeout_ms: int | None = None
    heartbeat_interval_ms: int | None = None
    fetch_max_wait_ms: int | None = None
    max_events: int | None = None
    idle_exit_s: float | None = None
    refresh_s: float = 5.0
    retry_backoff_s: tuple[float, float] = (0.5, 30.0)
    validation: ValidationPolicy = DEFAULT_POLICY
    compute_threads: int = 1
    session_cache: int = 4096
    model_process: bool = False


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


#: Full batches prepared and queued behind the one the applier is committing, when there is a backlog: the next
#: one is prepared while the current one commits (see :meth:`EventConsumer._hand_over`).
QUEUE_BEHIND = 1
#: While a batch is being applied, one poll waits at most this long for records: the loop must notice soon that
#: the applier is free, and hand it what has been polled meanwhile.
BUSY_POLL_MS = 5


def _concluding(unfinished: list[_Batch]) -> bool:
    """Whether the one batch being applied has its model outcome and is only writing it: the next batch is then
    prepared, and its model work started, while that batch's writes finish (they take about a quarter of a commit)."""
    if len(unfinished) != 1:
        return False
    prepared = unfinished[0].prepared
    return prepared is not None and prepared.concluded.is_set()


class _Halted(Exception):
    """An earlier batch failed, so this one was not applied (batches take effect in poll order only)."""


@dataclass
class _Batch:
    """One poll batch on its way through the pipeline."""

    records: list[Any]
    first: dict[TopicPartition, int]  # first offset per partition
    nxt: dict[TopicPartition, int]  # offset after the last record per partition
    valid: list[Event]
    source: dict[str, Any]  # event_id -> its first record (for the unknown-item DLQ)
    invalid: list[tuple[Any, Rejection]]
    started: float  # perf_counter when parsing began
    prepared: Prepared | None = None
    applied: Future[IngestResult] | None = None

    def extend(self, more: _Batch) -> None:
        """Append a later poll's records (while the applier was busy, polls accumulate into one batch)."""
        self.records += more.records
        for tp, off in more.first.items():
            self.first.setdefault(tp, off)
        self.nxt.update(more.nxt)
        self.valid += more.valid
        for event_id, rec in more.source.items():
            self.source.setdefault(event_id, rec)
        self.invalid += more.invalid


class _CommitOnRevoke(ConsumerRebalanceListener):
    """Finish and commit what is in flight before partitions move to another group member (no replay there)."""

    def __init__(self, owner: EventConsumer) -> None:
        self.owner = owner

    def on_partitions_revoked(self, revoked: Any) -> None:
        owner = self.owner
        # Positions come from the committed offsets after the assignment: what is not applied yet comes again.
        owner._open = None
        owner._finish_all(reposition=False)
        gone = set(revoked)
        owner._commit_processed(gone)
        # Forget them: a later commit must never move another member's offsets back.
        for tp in gone:
            owner._processed.pop(tp, None)
            owner._committed.pop(tp, None)

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
            store,
            models,
            unknown_item_policy=cfg.unknown_item_policy,
            prototype_idle_s=cfg.prototype_idle_s,
            compute_threads=cfg.compute_threads,
            session_cache=cfg.session_cache,
            model_process=cfg.model_process,
        )
        self.stats = ConsumeStats()
        self._stop = threading.Event()
        #: Set once the group gave this member its partitions (benchmarks wait for it before producing).
        self.assigned = threading.Event()
        self._sleep = sleep or self._stop.wait
        self._consumer: KafkaConsumer | None = None
        self._producer: Any = None
        self._applier: ThreadPoolExecutor | None = None
        self._in_flight: deque[_Batch] = deque()  # handed to the applier, in poll order, not finished yet
        self._open: _Batch | None = None  # polled while the applier was busy: the next batch it gets
        self._halted = False  # set by the applier when a batch fails; it then skips the batches after it
        self._processed: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}
        self._last_batch_end = 0.0

    def stop(self) -> None:
        """Ask :meth:`run` to finish the batches in flight, commit and return (safe from a signal handler)."""
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
        if cfg.fetch_max_wait_ms is not None:
            timeouts["fetch_max_wait_ms"] = cfg.fetch_max_wait_ms
        consumer = make_consumer(cfg.bootstrap, cfg.group, [], max_poll_records=cfg.max_poll_records, **timeouts)
        consumer.subscribe([cfg.topic], listener=_CommitOnRevoke(self))
        self._consumer = consumer
        try:  # the model process loads while the group is joined; the first batch's work queues behind the load
            self.ingestor.warm(wait=False)
        except Exception as exc:  # no model yet, say: the first batch reports it (and starts the process)
            log.warning("model process not started ahead of the first batch: %s", exc)
        self._producer = make_producer(cfg.bootstrap, client_id=f"persona-dlq-{cfg.group}")
        self._applier = ThreadPoolExecutor(1, thread_name_prefix="persona-apply")
        started = time.monotonic()
        last_record = started
        last_refresh = started - cfg.refresh_s  # check the registry before the first batch
        backoff = cfg.retry_backoff_s[0]
        first_records: float | None = None
        try:
            while not self._stop.is_set():
                unfinished = self._unfinished()
                handed = True
                # An idle applier gets what has been polled at once. A busy one gets a batch queued behind the
                # running one only when a full batch is waiting (a backlog): preparing it during the running
                # commit is what overlaps the two, but queueing small batches would only add a commit's time to
                # every event's latency when the applier keeps up anyway.
                full = self._open is not None and len(self._open.records) >= cfg.max_batch_events
                if self._open is not None and (
                    not unfinished or _concluding(unfinished) or (full and len(unfinished) <= QUEUE_BEHIND)
                ):
                    handed = self._hand_over(unfinished)
                busy = bool(self._unfinished())
                if not handed or not self._finish_done():
                    self.stats.retries += 1
                    self._sleep(backoff)
                    backoff = min(backoff * 2, cfg.retry_backoff_s[1])
                    continue
                backoff = cfg.retry_backoff_s[0]
                pending = self.stats.records + sum(len(b.records) for b in self._in_flight)
                pending += len(self._open.records) if self._open is not None else 0
                room = cfg.max_batch_events - (len(self._open.records) if self._open is not None else 0)
                if cfg.max_events is not None:
                    room = min(room, cfg.max_events - pending)
                if room <= 0:  # enough polled: wait for the applier
                    if not busy and not self._in_flight:
                        break  # max_events reached and everything finished
                    self._wait_for_applier(cfg.poll_timeout_ms / 1000)
                    continue
                now = time.monotonic()
                if now - last_refresh >= cfg.refresh_s:
                    last_refresh = now
                    self._refresh_model()
                polled = consumer.poll(timeout_ms=BUSY_POLL_MS if busy else cfg.poll_timeout_ms, max_records=room)
                records = [rec for batch in polled.values() for rec in batch]
                if records:
                    last_record = time.monotonic()
                    if first_records is None:
                        first_records = last_record
                    parsed = self._parse(records)
                    if self._open is None:
                        self._open = parsed
                    else:
                        self._open.extend(parsed)
                elif not busy and not self._in_flight and self._open is None:
                    self._update_lag()
                    if cfg.idle_exit_s is not None and time.monotonic() - last_record >= cfg.idle_exit_s:
                        log.info("no events for %.1fs: exiting", cfg.idle_exit_s)
                        break
            # Stopping: finish what the applier has; what was only polled is left uncommitted (it comes again).
            self._open = None
            self._finish_all(reposition=True)
            self._commit_processed(None)
        finally:
            self.stats.seconds = time.monotonic() - started
            if first_records is not None:
                self.stats.active_seconds = max(self._last_batch_end - first_records, 0.0)
            self._applier.shutdown(wait=True)
            self.ingestor.close()
            try:
                self._producer.flush(timeout=10)
            finally:
                self._producer.close(timeout=10)
                consumer.close(autocommit=False)
                self._consumer = None
        return self.stats

    def _parse(self, records: list[Any]) -> _Batch:
        """Step 1 for one poll batch (on this thread, while the applier works on earlier batches)."""
        batch = _Batch(records, {}, {}, [], {}, [], time.perf_counter())
        policy = self.cfg.validation
        for rec in records:
            tp = TopicPartition(rec.topic, rec.partition)
            batch.first.setdefault(tp, rec.offset)
            batch.nxt[tp] = rec.offset + 1
            parsed = parse_event(rec.value if rec.value is not None else b"", policy)
            if isinstance(parsed, Rejection):
                batch.invalid.append((rec, parsed))
            else:
                batch.valid.append(parsed)
                batch.source.setdefault(parsed.event_id, rec)
        return batch

    def _unfinished(self) -> list[_Batch]:
        """The batches handed to the applier that it has not finished (committed or failed), oldest first."""
        return [b for b in self._in_flight if b.applied is not None and not b.applied.done()]

    def _hand_over(self, unfinished: list[_Batch]) -> bool:
        """Prepare the batch polled so far (:meth:`Ingestor.prepare`: session reads, the walk, the encoder started)
        and queue it on the applier, which commits it after the batches before it.

        Preparing here, while the applier commits the previous batch, is what overlaps the two; sessions that a
        batch still in flight touches are taken from it. ``False`` (after logging and repositioning) when the
        preparation fails, like a failed batch.
        """
        assert self._applier is not None and self._open is not None
        batch, self._open = self._open, None
        try:
            pending = [b.prepared for b in unfinished if b.prepared is not None]
            batch.prepared = self.ingestor.prepare(batch.valid, source="kafka", pending=pending)
        except Exception:
            log.exception(
                "preparing a batch of %d records failed; nothing committed, retrying the same records",
                len(batch.records),
            )
            self._open = batch  # repositioned with the rest
            self._abandon_in_flight(reposition=True)
            return False
        batch.applied = self._applier.submit(self._apply, batch)
        self._in_flight.append(batch)
        return True

    def _wait_for_applier(self, timeout_s: float) -> None:
        unfinished = self._unfinished()
        if unfinished:
            wait([unfinished[0].applied], timeout=timeout_s)  # type: ignore[list-item]

    def _finish_done(self) -> bool:
        """Finish, in order, the batches the applier is done with; ``False`` when one failed."""
        while self._in_flight and self._in_flight[0].applied.done():  # type: ignore[union-attr]
            if not self._finish_oldest(reposition=True):
                return False
        return True

    def _apply(self, batch: _Batch) -> IngestResult:
        """Step 2, on the applier thread: batches arrive in poll order; after a failure the rest are skipped."""
        if self._halted:
            raise _Halted
        assert batch.prepared is not None
        try:
            return self.ingestor.commit(batch.prepared)
        except BaseException:
            self._halted = True
            raise

    def _finish_oldest(self, *, reposition: bool) -> bool:
        """Steps 3 to 5 for the oldest batch in flight (waiting for its apply).

        If it failed, or its dead letters cannot be sent, nothing from it on is committed: every batch in flight
        is abandoned (see :meth:`_abandon_in_flight`) and ``False`` returned.
        """
        batch = self._in_flight[0]
        assert batch.applied is not None  # a batch is in flight only once it is handed to the applier
        try:
            result = batch.applied.result()
            to_dlq = batch.invalid + [(batch.source[e.event_id], rej) for e, rej in result.rejected]
            for rec, rej in to_dlq:
                dlq_send(
                    self._producer,
                    self.cfg.dlq_topic,
                    rec.value or b"",
                    rec.key,
                    rej,
                    rec.topic,
                    rec.partition,
                    rec.offset,
                )
            if to_dlq:
                self._producer.flush(timeout=30)
        except Exception as exc:
            if not isinstance(exc, _Halted):
                log.exception(
                    "batch of %d records (offsets %s) failed; nothing committed, retrying the same records",
                    len(batch.records),
                    {f"{tp.topic}[{tp.partition}]": off for tp, off in batch.first.items()},
                )
            self._abandon_in_flight(reposition=reposition)
            return False
        self._in_flight.popleft()
        self._processed.update(batch.nxt)
        self._commit_processed(set(batch.nxt))
        m = self.metrics
        m.set_model(self.models.get())
        m.record_consumed(batch.valid)
        m.record_invalid(rej for _rec, rej in batch.invalid)
        m.record_dlq(rej for _rec, rej in to_dlq)
        m.record_result(result)
        m.processing.observe(time.perf_counter() - batch.started)
        m.last_batch.set(time.time())
        self._update_lag()
        st = self.stats
        st.records += len(batch.records)
        st.applied += result.applied
        st.duplicates += result.duplicates
        st.dlq += len(to_dlq)
        st.batches += 1
        self._last_batch_end = time.monotonic()
        if st.keep_freshness:
            st.freshness_s.extend(result.freshness_s)
        return True

    def _abandon_in_flight(self, *, reposition: bool) -> None:
        """Drop every batch in flight uncommitted, and the one being polled: wait until the applier let go of them
        (a failure makes it skip the rest), then, with ``reposition``, seek each of their partitions back to its
        first offset among them, so the same records come again. (After a rebalance the positions come from the
        committed offsets.)"""
        rewind: dict[TopicPartition, int] = {}
        later = [self._open] if self._open is not None else []
        self._open = None
        for batch in [*self._in_flight, *later]:
            if batch.applied is not None:
                wait([batch.applied])
            for tp, off in batch.first.items():
                rewind.setdefault(tp, off)  # batches are in poll order: the earliest offset wins
        self._in_flight.clear()
        self._halted = False
        if reposition and self._consumer is not None:
            for tp, off in rewind.items():
                self._consumer.seek(tp, off)

    def _finish_all(self, *, reposition: bool) -> None:
        """Finish every batch in flight, in order (before stopping or giving partitions away)."""
        while self._in_flight and self._finish_oldest(reposition=reposition):
            pass

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
                self.ingestor.warm(wait=False)  # the model process loads it while this batch goes on
        except Exception:
            log.exception("model registry check failed; keeping the current model")
        else:
            try:
                self.metrics.set_model(self.models.get())
            except Exception:
                log.exception("no usable model yet")
