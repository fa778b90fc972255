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

If step 2 or 3 fails, nothing of that batch or any later one is committed, and what happens next depends on
whether a dependency is down (DESIGN.md "Delivery"):

- An outage (the store unreachable, no usable model, the DLQ producer failing): one WARNING line when it starts
  (no traceback), the batches in flight are dropped, every partition is sought back to its first offset not yet
  committed, and the same records are retried with exponential backoff and jitter up to ``retry_backoff_s[1]``;
  one INFO line with the duration when a batch goes through again. ``persona_dependency_up`` follows it.
- Otherwise the failure is the batch's own (the store and the model answer: a poison record): the batch is
  retried once on its own and, if that fails too, bisected (:meth:`EventConsumer._isolate`) until the records
  that fail alone are found; those go to the DLQ with reason ``processing_failed`` and the error, everything
  else is applied in order, and offsets are committed as the bisection goes. One record never stops a
  partition.

A record is dead-lettered at most once, even when the batch around it is retried (the positions already sent are
remembered until their offsets are committed) and across a crash between the DLQ flush and the offset commit: every
dead letter of a source partition goes to one DLQ partition, and before the first one after the partition is
assigned, the DLQ partition is read back (from its end, to the committed offset's dead letters, at most
``DLQ_SCAN_LIMIT`` records) for those a killed process already sent. Before a rebalance takes partitions away,
everything in flight is finished and committed.
"""

from __future__ import annotations

import logging
import random
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

from persona.events import DEFAULT_POLICY, Event, Rejection, RejectReason, ValidationPolicy, parse_event
from persona.faults import maybe_crash
from persona.ingest import Ingestor, IngestResult, Prepared
from persona.store import Store, StoreUnavailable
from recsys.errors import PersonaError
from recsys.online import OnlineModel
from streaming.kafka_io import dead_lettered_since, dlq_send, ensure_topics, make_consumer, make_producer
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
    own (:mod:`persona.ingest.model_worker`), started when :meth:`EventConsumer.run` starts. ``max_poll_records``
    bounds one Kafka poll, ``max_batch_events`` one batch (one store transaction): polls accumulate into the next
    batch while one commits, so batches grow with a backlog and per-batch costs (transaction, prototype bank,
    model calls) are shared by more events.
    ``retry_backoff_s`` is the first and the longest wait between retries after a failure (doubling, with jitter):
    the cap bounds how long an outage that has ended can still hold the consumer back.
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
    retry_backoff_s: tuple[float, float] = (0.5, 10.0)
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


#: While idle, the broker's end offsets are read this often (lag and the poll timestamp stay true without records).
LAG_CHECK_S = 5.0
BROKER_CHECK_TIMEOUT_MS = 2000
#: An isolation that has dead-lettered this many records without one range of its batch going through stops and backs
#: off like an outage: a store that refuses every record is not facing poison records. The next try isolates again,
#: so at most this many records go to the DLQ per backoff period (up to ``retry_backoff_s[1]``) if it is wrong.
MAX_POISON_WITHOUT_SUCCESS = 8
#: Dependencies whose state ``persona_dependency_up`` reports.
DEPENDENCIES = ("store", "kafka", "model")


class _Halted(Exception):
    """An earlier batch failed, so this one was not applied (batches take effect in poll order only)."""


class _Interrupted(Exception):
    """An isolation stopped before its batch's end (an outage, or a systemic failure); offsets show how far it got."""


def _one_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (at most 300 characters), for log lines and DLQ details."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}"[:300] if first else type(exc).__name__


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
    failure: Exception | None = None  # preparing it failed (raised again when its commit's turn comes)
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
            owner._seen.pop(tp, None)
            owner._dead_lettered.pop(tp, None)
            owner._dlq_checked.discard(tp)

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
        self.metrics.online.read_from(store.online_counters)
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
        # offsets dead-lettered (sent and flushed) whose source offsets are not committed yet: never sent twice
        self._dead_lettered: dict[TopicPartition, set[int]] = {}
        # partitions whose earlier dead letters (another process's, before a crash) were looked up since assignment
        self._dlq_checked: set[TopicPartition] = set()
        self._dlq_reader: KafkaConsumer | None = None
        self._seen: dict[TopicPartition, int] = {}  # first offset polled per partition (lag before any commit)
        self._down: dict[str, float] = {}  # dependency -> monotonic time its outage began
        self._progress = False  # a batch finished since the last failure (the retry backoff starts over)

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
        last_check = started
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
                    # The backoff starts over only once a batch goes through: an outage doubles it up to the cap.
                    if self._progress:
                        backoff, self._progress = cfg.retry_backoff_s[0], False
                    self.stats.retries += 1
                    self._sleep(backoff / 2 + random.uniform(0, backoff / 2))  # jitter: replicas do not retry in step
                    backoff = min(backoff * 2, cfg.retry_backoff_s[1])
                    continue
                if self._progress:
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
                    maybe_crash("after_poll")
                    last_record = time.monotonic()
                    if first_records is None:
                        first_records = last_record
                    parsed = self._parse(records)
                    for tp, off in parsed.first.items():
                        self._seen.setdefault(tp, off)
                    if self._open is None:
                        self._open = parsed
                    else:
                        self._open.extend(parsed)
                    self.metrics.last_poll.set(time.time())
                    self._update_lag()  # also while batches fail: what waits must show, not the last good value
                elif not busy and not self._in_flight and self._open is None:
                    if time.monotonic() - last_check >= LAG_CHECK_S:
                        last_check = time.monotonic()
                        self._check_broker()
                    else:
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
            if self._dlq_reader is not None:
                self._dlq_reader.close(autocommit=False)
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
        except Exception as exc:  # the applier raises it in its turn: it is then dealt with as a failed commit
            batch.failure = exc
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
        try:
            if batch.failure is not None:
                raise batch.failure
            assert batch.prepared is not None
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
        except _Halted:
            self._abandon_in_flight(reposition=reposition)
            return False
        except Exception as exc:
            self._in_flight.popleft()
            return self._recover(batch, exc, reposition=reposition)
        to_dlq = batch.invalid + [(batch.source[e.event_id], rej) for e, rej in result.rejected]
        try:
            self._dead_letter(to_dlq)
        except Exception as exc:
            self._dependency_down("kafka", exc)
            self._abandon_in_flight(reposition=reposition)
            return False
        self._in_flight.popleft()
        self._account(batch.records, batch.valid, [rej for _rec, rej in batch.invalid], to_dlq, result, batch.started)
        return True

    def _account(
        self,
        records: list[Any],
        consumed: list[Event],
        invalid: list[Rejection],
        dead: list[tuple[Any, Rejection]],
        result: IngestResult,
        started: float,
        *,
        applied: bool = True,
    ) -> None:
        """Steps 4 and 5 for records applied (or, ``applied`` false, a record dead-lettered because applying it
        failed) in poll order: commit their offsets, count them. Only an applied range resets the retry backoff and
        marks the store and the model as working."""
        nxt: dict[TopicPartition, int] = {}
        for rec in records:
            nxt[TopicPartition(rec.topic, rec.partition)] = rec.offset + 1
        self._processed.update(nxt)
        self._commit_processed(set(nxt))
        if applied:
            self._progress = True
            self._dependency_up("store", "model")
        m = self.metrics
        m.set_model(self.models.get())
        m.record_consumed(consumed)
        m.record_invalid(invalid)
        m.record_dlq(rej for _rec, rej in dead)
        m.record_result(result)
        m.processing.observe(time.perf_counter() - started)
        m.last_batch.set(time.time())
        self._update_lag()
        st = self.stats
        st.records += len(records)
        st.applied += result.applied
        st.duplicates += result.duplicates
        st.dlq += len(dead)
        st.batches += 1
        self._last_batch_end = time.monotonic()
        if st.keep_freshness:
            st.freshness_s.extend(result.freshness_s)

    def _dead_letter(self, dead: list[tuple[Any, Rejection]]) -> None:
        """Send records to the DLQ and wait for the broker's acknowledgement; positions already sent (and not yet
        committed) are skipped, so a retried batch never dead-letters a record twice. Raises if the DLQ fails."""
        sent: list[tuple[TopicPartition, int, Any]] = []
        for tp in {TopicPartition(rec.topic, rec.partition) for rec, _rej in dead} - self._dlq_checked:
            self._recall_dead_letters(tp)
        try:
            for rec, rej in dead:
                tp = TopicPartition(rec.topic, rec.partition)
                if rec.offset in self._dead_lettered.get(tp, ()):
                    continue
                future = dlq_send(
                    self._producer,
                    self.cfg.dlq_topic,
                    rec.value or b"",
                    rec.key,
                    rej,
                    rec.topic,
                    rec.partition,
                    rec.offset,
                    dlq_partition=self._dlq_partition(tp),
                )
                sent.append((tp, rec.offset, future))
                maybe_crash("dlq_produce")
            if sent:
                self._producer.flush(timeout=30)
        finally:  # what the broker acknowledged is never sent again, even when a later record failed
            for tp, offset, future in sent:
                if getattr(future, "is_done", False) and future.succeeded():
                    self._dead_lettered.setdefault(tp, set()).add(offset)
        if sent:
            self._dependency_up("kafka")

    def _dlq_partition(self, tp: TopicPartition) -> int:
        """Every dead letter of a source partition goes to one DLQ partition: where a restart looks for them."""
        partitions = self._producer.partitions_for(self.cfg.dlq_topic)
        return tp.partition % max(len(partitions or ()), 1)

    def _recall_dead_letters(self, tp: TopicPartition) -> None:
        """Before the first dead letter of ``tp`` since it was assigned: the records after its committed offset that
        are already in the DLQ (sent by a process killed before its offset commit) are not sent again."""
        if self._dlq_reader is None:
            self._dlq_reader = make_consumer(
                self.cfg.bootstrap, None, [], client_id=f"persona-dlq-reader-{self.cfg.group}", fetch_max_wait_ms=100
            )
        since = self._committed.get(tp)
        if since is None and self._consumer is not None:
            since = self._consumer.committed(tp)
        found = dead_lettered_since(
            self._dlq_reader, self.cfg.dlq_topic, self._dlq_partition(tp), tp.topic, tp.partition, since or 0
        )
        if found:
            log.info(
                "%d records of %s[%d] from offset %d on are already in the DLQ: not sent again",
                len(found),
                tp.topic,
                tp.partition,
                since or 0,
            )
            self._dead_lettered.setdefault(tp, set()).update(found)
        self._dlq_checked.add(tp)

    # ------------------------------------------------------------------------------------------ failures
    def _recover(self, batch: _Batch, exc: BaseException, *, reposition: bool) -> bool:
        """``batch``, the oldest not finished (already out of the pipeline), failed to prepare or apply.

        Everything behind it is dropped. An outage (see :meth:`_outage`) or a rebalance (``reposition`` false)
        leaves it for a retry: ``False``, after seeking back. Otherwise the batch is isolated record by record
        (:meth:`_isolate`); ``True`` when all of it was applied or dead-lettered.
        """
        later = self._drop_in_flight()
        if not reposition:  # giving partitions away: their committed offsets are where the next owner starts
            log.warning(
                "batch of %d records failed during a rebalance (%s); it will be replayed",
                len(batch.records),
                _one_line(exc),
            )
            return False
        if self._outage(exc) is not None:
            self._seek({**later, **batch.first})  # the batch's offsets are the earlier ones
            return False
        log.warning(
            "batch of %d records (first offsets %s) failed while the store and the model answer (%s): "
            "retrying it alone, then isolating the records that fail",
            len(batch.records),
            {f"{tp.topic}[{tp.partition}]": off for tp, off in batch.first.items()},
            _one_line(exc),
        )
        try:
            self._isolate(batch.records)
        except _Interrupted:  # resume at the first record not applied or dead-lettered
            self._seek({**later, **{tp: max(off, self._processed.get(tp, off)) for tp, off in batch.first.items()}})
            return False
        self._seek(later)
        return True

    def _isolate(self, records: list[Any]) -> None:
        """Apply ``records`` (poll order) in ranges, bisecting a range that fails until single events fail alone.

        The first range is the whole batch (the retry); a range that goes through, or a single event that fails on
        its own while the store and the model answer, is finished at once (its dead letters sent, its offsets
        committed), left to right, so events are applied in order and progress survives an interruption. Raises
        :class:`_Interrupted` on an outage, or when more than :data:`MAX_POISON_WITHOUT_SUCCESS` records failed
        alone and no range went through (everything fails: not a poison record).
        """
        policy = self.cfg.validation
        parsed = [parse_event(rec.value if rec.value is not None else b"", policy) for rec in records]
        ranges = [(0, len(records))]
        poisoned = succeeded = 0
        while ranges:
            lo, hi = ranges.pop()
            started = time.perf_counter()
            events = [p for p in parsed[lo:hi] if isinstance(p, Event)]
            failure: Exception | None = None
            try:
                result = self.ingestor.apply(events, source="kafka")
            except Exception as exc:
                if self._outage(exc) is not None:
                    raise _Interrupted from exc
                if len(events) > 1:
                    at = [n for n in range(lo, hi) if isinstance(parsed[n], Event)]
                    mid = at[len(at) // 2]
                    ranges += [(mid, hi), (lo, mid)]  # the left half first
                    continue
                failure, result = exc, IngestResult()
            dead: list[tuple[Any, Rejection]] = []
            first_of: dict[str, Any] = {}
            for rec, p in zip(records[lo:hi], parsed[lo:hi], strict=True):
                if isinstance(p, Rejection):
                    dead.append((rec, p))
                elif failure is not None:
                    dead.append(
                        (rec, Rejection(RejectReason.PROCESSING_FAILED, f"applying it failed: {_one_line(failure)}"))
                    )
                else:
                    first_of.setdefault(p.event_id, rec)
            dead += [(first_of[e.event_id], rej) for e, rej in result.rejected]
            if failure is not None:
                poisoned += 1
                if succeeded == 0 and poisoned > MAX_POISON_WITHOUT_SUCCESS:
                    # Not the records' fault: the store takes none of them. Back off like an outage (the next try
                    # isolates again, so a burst of real poison records slows the partition down, never stops it).
                    why = f"it refuses every record, not one poison record: {_one_line(failure)}"
                    self._dependency_down("store", RuntimeError(why))
                    raise _Interrupted from failure
                rec = next(r for r, p in zip(records[lo:hi], parsed[lo:hi], strict=True) if isinstance(p, Event))
                log.warning(
                    "dead-lettering %s[%d] offset %d with reason processing_failed: %s",
                    rec.topic,
                    rec.partition,
                    rec.offset,
                    _one_line(failure),
                )
            else:
                succeeded += 1
            try:
                self._dead_letter(dead)
            except Exception as exc:
                self._dependency_down("kafka", exc)
                raise _Interrupted from exc
            invalid = [p for p in parsed[lo:hi] if isinstance(p, Rejection)]
            self._account(records[lo:hi], events, invalid, dead, result, started, applied=failure is None)

    def _outage(self, exc: BaseException) -> str | None:
        """Which dependency is down, if the failure ``exc`` is an outage: the store (it raised
        :class:`StoreUnavailable` or does not answer a probe) or the model (none usable: a configuration error, the
        same for every record). ``None``: the dependencies answer, so the failure is the records' own."""
        down: str | None = None
        if isinstance(exc, StoreUnavailable):
            down = "store"
        elif isinstance(exc, PersonaError):
            down = "model"
        else:
            try:
                self.store.ping()
            except Exception:
                down = "store"
            else:
                try:
                    self.models.get()
                except Exception:
                    down = "model"
        if down is not None:
            self._dependency_down(down, exc)
        return down

    def _dependency_down(self, name: str, exc: BaseException) -> None:
        """One WARNING line when ``name`` becomes unavailable (an expected outage: no traceback)."""
        self.metrics.dependency_up.labels(name).set(0)
        if name in self._down:
            return
        self._down[name] = time.monotonic()
        log.warning(
            "%s unavailable (%s); nothing committed, retrying with backoff (at most %.0fs apart)",
            name,
            _one_line(exc),
            self.cfg.retry_backoff_s[1],
        )

    def _dependency_up(self, *names: str) -> None:
        """One INFO line, with the outage's duration, when a dependency that was down works again."""
        for name in names:
            self.metrics.dependency_up.labels(name).set(1)
            since = self._down.pop(name, None)
            if since is not None:
                log.info("%s recovered after %.1fs", name, time.monotonic() - since)

    def _drop_in_flight(self) -> dict[TopicPartition, int]:
        """Drop every batch in flight and the one being polled, uncommitted, once the applier let go of them (a
        failure makes it skip the rest); returns the first offset of each of their partitions."""
        rewind: dict[TopicPartition, int] = {}
        later = [self._open] if self._open is not None else []
        self._open = None
        for batch in [*self._in_flight, *later]:
            if batch.applied is not None:
                wait([batch.applied])
            failed = batch.applied is None or batch.applied.cancelled() or batch.applied.exception() is not None
            if batch.prepared is not None and failed:
                self.ingestor.discard(batch.prepared)  # never committed: drop its model work
            for tp, off in batch.first.items():
                rewind.setdefault(tp, off)  # batches are in poll order: the earliest offset wins
        self._in_flight.clear()
        self._halted = False
        return rewind

    def _seek(self, positions: dict[TopicPartition, int]) -> None:
        """Seek partitions back so that their records from these offsets on come again."""
        if self._consumer is not None:
            for tp, off in positions.items():
                self._consumer.seek(tp, off)

    def _abandon_in_flight(self, *, reposition: bool) -> None:
        """Drop every batch in flight uncommitted, and the one being polled (:meth:`_drop_in_flight`), then, with
        ``reposition``, seek each of their partitions back to its first offset among them, so the same records
        come again. (After a rebalance the positions come from the committed offsets.)"""
        rewind = self._drop_in_flight()
        if reposition:
            self._seek(rewind)

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
        maybe_crash("before_offset_commit")
        try:
            consumer.commit(offsets)
        except KafkaError as exc:
            # Not fatal: the records are applied; another member (or we) will replay them and dedup skips them.
            self._dependency_down("kafka", exc)
            return
        self._dependency_up("kafka")
        self.metrics.last_commit.set(time.time())
        for tp, om in offsets.items():
            self._committed[tp] = om.offset
            sent = self._dead_lettered.get(tp)
            if sent:
                sent.difference_update([o for o in sent if o < om.offset])

    def _update_lag(self, ends: dict[TopicPartition, int] | None = None) -> None:
        """Lag per assigned partition: its high watermark (from the last fetch, or ``ends`` read from the broker)
        minus the next offset to process (processed, else committed, else the first one polled since the start).
        Never reset when nothing is known: an unreachable broker leaves the last value (the poll timestamp says how
        old it is)."""
        consumer = self._consumer
        if consumer is None:
            return
        for tp in consumer.assignment():
            high = ends.get(tp) if ends is not None else consumer.highwater(tp)
            pos = self._processed.get(tp, self._committed.get(tp, self._seen.get(tp)))
            if high is not None and pos is not None:
                self.metrics.lag.labels(str(tp.partition)).set(max(high - pos, 0))

    def _check_broker(self) -> None:
        """While idle: read the end offsets from the broker (a round trip that fails when it cannot be reached), so
        the poll timestamp and the lag stay true when no record arrives."""
        consumer = self._consumer
        if consumer is None:
            return
        assigned = list(consumer.assignment())
        # a member without partitions (more members than partitions) asks about one all the same
        asked = assigned or [TopicPartition(self.cfg.topic, 0)]
        try:
            ends = consumer.end_offsets(asked, timeout_ms=BROKER_CHECK_TIMEOUT_MS)
        except KafkaError as exc:
            self._dependency_down("kafka", exc)
            return
        self._dependency_up("kafka")
        self.metrics.last_poll.set(time.time())
        self._update_lag(ends)

    def _refresh_model(self) -> None:
        try:
            if self.models.refresh():
                log.info("switched to model version %s", self.models.get().version)
                self.ingestor.warm(wait=False)  # the model process loads it while this batch goes on
        except StoreUnavailable as exc:  # an outage the batches report too: one line, no traceback
            self._dependency_down("store", exc)
        except Exception:
            log.exception("model registry check failed; keeping the current model")
        else:
            try:
                self.metrics.set_model(self.models.get())
            except Exception:
                log.exception("no usable model yet")
