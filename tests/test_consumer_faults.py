"""The consumer against poison records and outages: real tansu broker, real stores, the tiny bundle.

A poison record is one that passes validation and still fails the store transaction every time. To make one
without a mock, the store itself refuses it: a trigger on the events table aborts the insert of chosen event ids
(what a constraint, a driver limit or a bug on one value does in production). The outage is a real one too: the
test's own PostgreSQL database stops accepting connections (``ALLOW_CONNECTIONS false``, its sessions terminated)
while the server stays up for everyone else.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import streaming.consumer
from persona.events import Event
from persona.models import ModelProvider
from persona.store import Store, StoreUnavailable
from streaming.broker import EmbeddedBroker
from streaming.consumer import EventConsumer
from streaming.kafka_io import (
    DLQ_HEADER_DETAIL,
    DLQ_HEADER_ORIGINAL_SHA256,
    DLQ_HEADER_ORIGINAL_SIZE,
    DLQ_HEADER_REASON,
    DLQ_HEADER_SOURCE_OFFSET,
    DLQ_HEADER_TRUNCATED,
    DLQ_MAX_VALUE_BYTES,
    make_consumer,
    make_producer,
)
from streaming.metrics import ConsumerMetrics
from tests.fixtures_kafka import FAST_GROUP
from tests.fixtures_store import set_reachable
from tests.test_consumer import assert_state_matches_in_process, consumer_config, publish, read_dlq
from tests.test_ingest import make_events

pytestmark = pytest.mark.fault


#: Header of the marker record :func:`dlq_size` appends (readers of the DLQ skip it).
SENTINEL_HEADER = "persona-test-sentinel"


def dlq_size(bootstrap: str, topic: str) -> int:
    """Records in the DLQ topic (all partitions): proves "exactly once", where reading n records cannot.

    The log end offset of each partition, taken as the offset the broker gives a one-record marker appended to it
    (the marker carries :data:`SENTINEL_HEADER`). Not ``end_offsets()``: the embedded tansu broker answers it with
    the last record batch's base offset + 1, short by the size of that batch minus one."""
    consumer = make_consumer(bootstrap, f"size-{uuid.uuid4().hex[:8]}", [], **FAST_GROUP)
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
    finally:
        consumer.close(autocommit=False)
    producer = make_producer(bootstrap)
    try:
        futures = [
            producer.send(topic, value=b"", partition=p, headers=[(SENTINEL_HEADER, b"1")]) for p in sorted(partitions)
        ]
        producer.flush()
        return sum(f.get(timeout=30).offset for f in futures)
    finally:
        producer.close()


def without_sentinels(records: list[Any]) -> list[Any]:
    """DLQ records less the markers :func:`dlq_size` appended."""
    return [r for r in records if SENTINEL_HEADER not in dict(r.headers or [])]


@pytest.fixture
def poisoned_store(tmp_path: Path) -> Iterator[Store]:
    """A SQLite store whose events table refuses (aborts the transaction on) any event id starting with 'poison'."""
    store = Store.open(f"sqlite:///{tmp_path / 'poison.db'}")
    with store.engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TRIGGER poison_pill BEFORE INSERT ON events WHEN NEW.event_id LIKE 'poison%' "
            "BEGIN SELECT RAISE(ABORT, 'poison pill refused by the store'); END"
        )
    yield store
    store.close()


def test_poison_records_are_isolated_and_every_valid_event_after_them_is_applied(
    kafka_broker: EmbeddedBroker, topic: str, poisoned_store: Store, tiny_bundle: Path
) -> None:
    """One partition, batches of 40: lone surrogates (escaped and raw bytes), a 1 MB message and three records the
    store refuses (two of them adjacent) among 120 valid events. Every valid event is applied once and in order,
    each bad record reaches the DLQ exactly once with its reason, and the 1 MB one arrives cut to a bounded head."""
    models = ModelProvider(poisoned_store, model_dir=tiny_bundle)
    online = models.get()
    good = make_events(online, 120, sessions=6, prefix=f"{topic}-")

    def poison(n: int, like: Event) -> bytes:  # valid in every way: only the store refuses it
        return Event(f"poison-{n}", like.session_id, like.item_id, like.ts).to_json_bytes()

    huge = b'{"event_id":"big","session_id":"s","item_id":"1","ts":1,"pad":"' + b"x" * 1_000_000 + b'"}'
    bad: dict[int, tuple[bytes, str]] = {
        10: (b'{"event_id":"sur1","session_id":"s-\\ud800","item_id":"1","ts":1}', "invalid_value"),
        11: (b'{"event_id":"sur2","session_id":"s-\xed\xa0\x80","item_id":"1","ts":1}', "invalid_value"),
        30: (poison(1, good[30]), "processing_failed"),
        31: (poison(2, good[31]), "processing_failed"),
        60: (huge, "oversized"),
        75: (poison(3, good[75]), "processing_failed"),
    }
    producer = make_producer(kafka_broker.bootstrap, max_request_size=2 << 20)
    sent: list[bytes] = []
    for i, e in enumerate(good):
        if i in bad:
            producer.send(topic, key=b"k", value=bad[i][0], partition=0)
            sent.append(bad[i][0])
        producer.send(topic, key=b"k", value=e.to_json_bytes(), partition=0)
        sent.append(e.to_json_bytes())
    producer.flush()
    producer.close()

    cfg = consumer_config(kafka_broker.bootstrap, topic, max_events=len(sent), idle_exit_s=20)
    cfg.max_poll_records = cfg.max_batch_events = 40
    consumer = EventConsumer(poisoned_store, models, cfg, sleep=lambda _s: None)
    stats = consumer.run()

    assert (stats.records, stats.applied, stats.dlq) == (len(sent), len(good), len(bad))
    assert stats.retries == 0  # isolated where it failed: no blind retry loop
    assert_state_matches_in_process(poisoned_store, online, good)  # each once, in order, around the poison

    dlq = f"{topic}.dlq"
    dead = read_dlq(kafka_broker.bootstrap, dlq, len(bad))
    assert dlq_size(kafka_broker.bootstrap, dlq) == len(bad)  # exactly once: nothing re-sent by the retries
    by_offset = {sent.index(raw): reason for raw, reason in bad.values()}
    got = {int(dict(r.headers)[DLQ_HEADER_SOURCE_OFFSET]): r for r in dead}
    assert {o: dict(r.headers)[DLQ_HEADER_REASON].decode() for o, r in got.items()} == by_offset
    for offset, r in got.items():
        headers = dict(r.headers)
        if by_offset[offset] == "processing_failed":
            assert r.value == sent[offset]
            assert b"poison pill refused by the store" in headers[DLQ_HEADER_DETAIL]
        elif by_offset[offset] == "oversized":
            assert r.value == huge[:DLQ_MAX_VALUE_BYTES] and headers[DLQ_HEADER_TRUNCATED] == b"true"
            assert headers[DLQ_HEADER_ORIGINAL_SIZE] == str(len(huge)).encode()
            assert headers[DLQ_HEADER_ORIGINAL_SHA256] == hashlib.sha256(huge).hexdigest().encode()
        else:
            assert r.value == sent[offset] and DLQ_HEADER_TRUNCATED not in headers
    sample = consumer.metrics.registry.get_sample_value
    assert sample("persona_events_dlq_total", {"reason": "processing_failed"}) == 3
    assert sample("persona_dependency_up", {"dependency": "store"}) == 1


def test_a_store_that_refuses_every_record_is_backed_off_not_bled_into_the_dlq(
    kafka_broker: EmbeddedBroker, topic: str, tmp_path: Path, tiny_bundle: Path
) -> None:
    """When no record goes through at all the records are not the problem: after MAX_POISON_WITHOUT_SUCCESS of them
    the consumer backs off like an outage (persona_dependency_up{store} 0), and once the store takes records again
    the rest are applied."""
    store = Store.open(f"sqlite:///{tmp_path / 'refusing.db'}")
    with store.engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TRIGGER refuse_all BEFORE INSERT ON events BEGIN SELECT RAISE(ABORT, 'read-only table'); END"
        )
    models = ModelProvider(store, model_dir=tiny_bundle)
    events = make_events(models.get(), 30, sessions=3, prefix=f"{topic}-")
    _publish_one_partition(kafka_broker.bootstrap, topic, [e.to_json_bytes() for e in events])
    cfg = consumer_config(kafka_broker.bootstrap, topic, max_events=len(events), idle_exit_s=60)
    cfg.retry_backoff_s = (6.0, 6.0)  # one isolation, then a pause long enough to look
    consumer = EventConsumer(store, models, cfg)
    sample = consumer.metrics.registry.get_sample_value
    runner = threading.Thread(target=consumer.run)
    try:
        runner.start()
        _wait(lambda: sample("persona_dependency_up", {"dependency": "store"}) == 0, 60, "the consumer to give up")
        assert consumer.stats.dlq == streaming.consumer.MAX_POISON_WITHOUT_SUCCESS
        with store.engine.begin() as conn:
            conn.exec_driver_sql("DROP TRIGGER refuse_all")
        runner.join(timeout=60)
    finally:
        consumer.stop()
        runner.join(timeout=60)
        store.close()
    dead = streaming.consumer.MAX_POISON_WITHOUT_SUCCESS
    assert (consumer.stats.records, consumer.stats.applied, consumer.stats.dlq) == (
        len(events),
        len(events) - dead,
        dead,
    )
    assert sample("persona_dependency_up", {"dependency": "store"}) == 1


def _publish_one_partition(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = make_producer(bootstrap)
    for value in values:
        producer.send(topic, key=b"k", value=value, partition=0)
    producer.flush()
    producer.close()


class _Lines(logging.Handler):
    """Collects the records of the consumer's logger (the test counts lines and tracebacks)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.mark.slow
def test_a_store_outage_is_retried_with_backoff_logged_once_and_recovered_without_loss(
    kafka_broker: EmbeddedBroker, topic: str, outage_db_url: str, tiny_bundle: Path
) -> None:
    store = Store.open(outage_db_url)
    models = ModelProvider(store, model_dir=tiny_bundle)
    online = models.get()
    events = make_events(online, 400, sessions=20, prefix=f"{topic}-")
    cfg = consumer_config(kafka_broker.bootstrap, topic, max_events=len(events), idle_exit_s=60)
    cfg.retry_backoff_s = (0.05, 0.8)
    consumer = EventConsumer(store, models, cfg)
    lines = _Lines()
    logger = logging.getLogger("streaming.consumer")
    logger.addHandler(lines)
    logger.setLevel(logging.INFO)
    runner = threading.Thread(target=consumer.run)
    try:
        runner.start()
        publish(kafka_broker.bootstrap, topic, events[:200])
        _wait(lambda: consumer.stats.applied == 200, 60, "the first half")
        sample = consumer.metrics.registry.get_sample_value

        set_reachable(outage_db_url, False)
        down_at = time.monotonic()
        publish(kafka_broker.bootstrap, topic, events[200:])
        _wait(lambda: sample("persona_dependency_up", {"dependency": "store"}) == 0, 30, "the outage to be seen")
        time.sleep(4)
        retries = consumer.stats.retries
        # backoff: 0.05 s doubling to a 0.8 s cap with jitter is at most ~12 tries in 4 s; no backoff would be 80
        assert 2 <= retries <= 14, retries
        lag = sum(sample("persona_consumer_lag", {"partition": str(p)}) or 0 for p in range(4))
        assert lag > 0  # the waiting events show while the store is down
        assert consumer.stats.applied == 200

        set_reachable(outage_db_url, True)
        _wait(lambda: consumer.stats.applied == len(events), 60, "recovery")
        outage_s = time.monotonic() - down_at
    finally:
        set_reachable(outage_db_url, True)
        consumer.stop()
        runner.join(timeout=60)
        logger.removeHandler(lines)
        store.close()

    assert sample("persona_dependency_up", {"dependency": "store"}) == 1
    warnings = [r for r in lines.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert warnings[0].getMessage().startswith("store unavailable")
    assert not any(r.exc_info for r in lines.records)  # an expected outage: no traceback
    recovered = [r.getMessage() for r in lines.records if "recovered" in r.getMessage()]
    assert len(recovered) == 1 and recovered[0].startswith("store recovered after")
    assert float(recovered[0].split("after ")[1].rstrip("s")) <= outage_s
    check = Store.open(outage_db_url)
    try:
        assert_state_matches_in_process(check, online, events)  # nothing lost, nothing applied twice
    finally:
        check.close()


@pytest.mark.slow
def test_a_broker_outage_shows_in_the_poll_timestamp_and_lag_keeps_its_last_value(
    sqlite_store_path: Path, tiny_bundle: Path
) -> None:
    """The consumer's own broker is paused (SIGSTOP) for 8 s while it idles: the broker-answer timestamp stops,
    ``persona_dependency_up{dependency="kafka"}`` drops to 0 with one WARNING line, the lag is not reset, and both
    come back after the pause with one "recovered" line."""
    store = Store.open(f"sqlite:///{sqlite_store_path}")
    models = ModelProvider(store, model_dir=tiny_bundle)
    lines = _Lines()
    logger = logging.getLogger("streaming.consumer")
    logger.addHandler(lines)
    logger.setLevel(logging.INFO)
    with EmbeddedBroker() as broker:
        topic = f"t-{uuid.uuid4().hex[:8]}"
        events = make_events(models.get(), 50, sessions=5, prefix=f"{topic}-")
        consumer = EventConsumer(store, models, consumer_config(broker.bootstrap, topic, idle_exit_s=120))
        runner = threading.Thread(target=consumer.run)
        sample = consumer.metrics.registry.get_sample_value
        try:
            runner.start()
            _wait(consumer.assigned.is_set, 30, "the assignment")
            publish(broker.bootstrap, topic, events)
            _wait(lambda: consumer.stats.applied == len(events), 60, "the events")
            _wait(
                lambda: (sample("persona_consumer_last_poll_timestamp_seconds") or 0) > time.time() - 3, 20, "a check"
            )
            lag = {p: sample("persona_consumer_lag", {"partition": str(p)}) for p in range(4)}
            broker.pause()
            try:
                paused = time.time()
                _wait(lambda: sample("persona_dependency_up", {"dependency": "kafka"}) == 0, 20, "the outage")
                time.sleep(max(0.0, paused + 8 - time.time()))
                assert sample("persona_consumer_last_poll_timestamp_seconds") <= paused  # stale, and says so
                assert {p: sample("persona_consumer_lag", {"partition": str(p)}) for p in range(4)} == lag
            finally:
                broker.resume()
            _wait(lambda: sample("persona_dependency_up", {"dependency": "kafka"}) == 1, 30, "the recovery")
            assert sample("persona_consumer_last_poll_timestamp_seconds") > paused
        finally:
            consumer.stop()
            runner.join(timeout=60)
            logger.removeHandler(lines)
            store.close()
    messages = [r.getMessage() for r in lines.records]
    warnings = [r.getMessage() for r in lines.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("kafka unavailable"), warnings
    assert sum(m.startswith("kafka recovered after") for m in messages) == 1, messages
    assert not any(r.exc_info for r in lines.records)


@pytest.fixture
def sqlite_store_path(tmp_path: Path) -> Path:
    return tmp_path / "broker-outage.db"


def test_exported_online_counters_are_the_stores_and_keep_their_values_through_an_outage(tmp_path: Path) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 'counters.db'}")
    try:
        with store.transaction() as uow:
            uow.add_online_counters({("predictions", "persona", 0): 7, ("hits", "persona", 10): 3})
        with store.transaction() as uow:
            uow.add_online_counters({("predictions", "persona", 0): 2, ("predictions", "base", 0): 9})
        metrics = ConsumerMetrics()
        sample = metrics.registry.get_sample_value
        assert sample("persona_predictions_total", {"variant": "persona"}) == 0  # no store yet: zeros, not gaps
        metrics.online.read_from(store.online_counters)
        assert sample("persona_predictions_total", {"variant": "persona"}) == 9
        assert sample("persona_predictions_total", {"variant": "base"}) == 9
        assert sample("persona_hits_total", {"variant": "persona", "k": "10"}) == 3
        assert sample("persona_ndcg_gain_total", {"variant": "base", "k": "20"}) == 0

        def down() -> dict[tuple[str, str, int], float]:
            raise StoreUnavailable("the database is unavailable")

        metrics.online.read_from(down)
        assert sample("persona_predictions_total", {"variant": "persona"}) == 9  # a counter never drops to 0
    finally:
        store.close()
