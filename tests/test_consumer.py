"""The Kafka consumer end to end: real tansu broker, real store, real tiny model, `persona consume` processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from kafka import KafkaConsumer, TopicPartition

import streaming.consumer
from persona.events import Event, RejectReason
from persona.models import ModelProvider
from persona.store import Store, StoreUnavailable
from persona_cli.soak import child_pids
from recsys.online import OnlineModel, code_from_bytes
from streaming.broker import EmbeddedBroker
from streaming.consumer import ConsumerConfig, ConsumeStats, EventConsumer
from streaming.kafka_io import DLQ_HEADER_REASON, make_consumer, make_producer
from streaming.replay import replay
from tests.fixtures_kafka import FAST_GROUP
from tests.test_ingest import make_events

REPO = Path(__file__).resolve().parents[1]


def consumer_config(bootstrap: str, topic: str, group: str | None = None, **kw: Any) -> ConsumerConfig:
    return ConsumerConfig(
        bootstrap=bootstrap,
        topic=topic,
        dlq_topic=f"{topic}.dlq",
        group=group or f"g-{uuid.uuid4().hex[:8]}",
        poll_timeout_ms=200,
        **FAST_GROUP,
        **kw,
    )


def publish(bootstrap: str, topic: str, events: list[Event]) -> None:
    producer = make_producer(bootstrap)
    try:
        replay(events, producer, topic, progress=False)
    finally:
        producer.close(timeout=10)


def assert_state_matches_in_process(store: Store, online: OnlineModel, events: list[Event]) -> None:
    """Stored sessions equal the events applied in order through OnlineModel (each event exactly once)."""
    per_session: dict[str, list[str]] = defaultdict(list)
    for e in events:
        per_session[e.session_id].append(e.item_id)
    with store.read() as uow:
        stored = uow.get_sessions(list(per_session))
    assert set(stored) == set(per_session)
    sids = sorted(per_session)
    recent = [per_session[s][-online.cfg.max_len :] for s in sids]
    codes = online.codes(online.histories(recent))
    for row, sid in enumerate(sids):
        st = stored[sid]
        assert st.recent_items == recent[row]
        assert st.event_count == st.edit_version == len(per_session[sid])
        assert st.code is not None
        torch.testing.assert_close(code_from_bytes(st.code, online.cfg), codes[row], atol=1e-5, rtol=1e-4)
    assert store.count_events() == len(events)


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Any:
    s = Store.open(f"sqlite:///{tmp_path / 'c.db'}")
    yield s
    s.close()


@pytest.mark.parametrize(("threads", "model_process"), [(1, False), (2, False), (2, True)])
def test_replayed_events_consumed_equal_the_in_process_application(
    kafka_broker: EmbeddedBroker, topic: str, store: Store, tiny_bundle: Path, threads: int, model_process: bool
) -> None:
    models = ModelProvider(store, model_dir=tiny_bundle)
    online = models.get()
    events = make_events(online, 1200, sessions=40, prefix=f"{topic}-")
    publish(kafka_broker.bootstrap, topic, events)
    cfg = consumer_config(
        kafka_broker.bootstrap, topic, max_events=1200, compute_threads=threads, model_process=model_process
    )
    consumer = EventConsumer(store, models, cfg)
    stats = consumer.run()
    worker = consumer.ingestor.model_worker
    assert (worker.starts if worker is not None else 0) == int(model_process)  # started once, ahead of the batches
    assert worker is None or worker.pid is None  # and stopped with the consumer
    assert (stats.records, stats.applied, stats.dlq) == (1200, 1200, 0)
    assert_state_matches_in_process(store, online, events)

    def sample(name: str, **labels: str) -> float | None:
        return consumer.metrics.registry.get_sample_value(name, labels)

    assert sample("persona_events_consumed_total", type="click") == 1200
    assert sample("persona_predictions_total", variant="persona") == 1200 - 40
    assert sample("persona_event_freshness_seconds_count") == 1200
    assert sample("persona_model_info", version=online.version) == 1
    assert sample("persona_drift_psi", signal="prototype_mix") is not None
    assert sample("persona_drift_js", signal="item_popularity") is not None
    assert sum(sample("persona_prototype_assignments_total", prototype=str(k)) or 0 for k in range(8)) == 1200


def read_dlq(bootstrap: str, topic: str, n: int) -> list[Any]:
    consumer = make_consumer(bootstrap, f"dlq-{uuid.uuid4().hex[:8]}", [topic], **FAST_GROUP)
    out: list[Any] = []
    deadline = time.monotonic() + 30
    try:
        while len(out) < n and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                out.extend(batch)
    finally:
        consumer.close(autocommit=False)
    return out


def test_malformed_messages_go_to_the_dlq_with_their_reason_and_the_consumer_goes_on(
    kafka_broker: EmbeddedBroker, topic: str, sqlite_store: Store, tiny_bundle: Path
) -> None:
    models = ModelProvider(sqlite_store, model_dir=tiny_bundle)
    online = models.get()
    future = (datetime.now(UTC) + timedelta(days=2)).isoformat().encode()
    bad: list[tuple[bytes, RejectReason]] = [
        (b"{not json", RejectReason.INVALID_JSON),
        (b"[1, 2]", RejectReason.NOT_AN_OBJECT),
        (b'{"event_id": "m1", "session_id": "s", "ts": "2026-11-01T00:00:00Z"}', RejectReason.MISSING_FIELD),
        (b'{"event_id": 7, "session_id": "s", "item_id": "1", "ts": "2026-11-01T00:00:00Z"}', RejectReason.WRONG_TYPE),
        (b'{"event_id": "m2", "session_id": "s", "item_id": "1", "ts": "yesterday"}', RejectReason.INVALID_VALUE),
        (
            b'{"event_id":"m3","session_id":"s","item_id":"1","ts":"' + future + b'"}',
            RejectReason.FUTURE_TIMESTAMP,
        ),
        (b'{"pad": "' + b"x" * 20_000 + b'"}', RejectReason.OVERSIZED),
    ]
    good = make_events(online, 20, sessions=3, prefix=f"{topic}-")
    producer = make_producer(kafka_broker.bootstrap)
    for i, e in enumerate(good):
        producer.send(topic, key=e.session_id.encode(), value=e.to_json_bytes())
        if i < len(bad):
            producer.send(topic, key=b"s", value=bad[i][0])
    producer.flush()
    producer.close()

    total = len(good) + len(bad)
    stats = EventConsumer(sqlite_store, models, consumer_config(kafka_broker.bootstrap, topic, max_events=total)).run()
    assert (stats.records, stats.applied, stats.dlq) == (total, len(good), len(bad))
    assert sqlite_store.count_events() == len(good)

    dead = read_dlq(kafka_broker.bootstrap, f"{topic}.dlq", len(bad))
    got = sorted((r.value, dict(r.headers)[DLQ_HEADER_REASON].decode()) for r in dead)
    assert got == sorted((raw, str(reason)) for raw, reason in bad)


def test_failed_batches_are_retried_in_order_with_nothing_lost_or_applied_twice(
    kafka_broker: EmbeddedBroker, topic: str, sqlite_store: Store, tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store failure (commit raises) and a DLQ failure (send raises) each make the consumer abandon what it has in
    flight, seek back and retry; the batches prepared behind a failed one must not take effect before it."""
    models = ModelProvider(sqlite_store, model_dir=tiny_bundle)
    online = models.get()
    events = make_events(online, 900, sessions=25, prefix=f"{topic}-")
    producer = make_producer(kafka_broker.bootstrap)
    for i, e in enumerate(events):
        producer.send(topic, key=e.session_id.encode(), value=e.to_json_bytes())
        if i == 400:
            producer.send(topic, key=b"s", value=b"{not json")
    producer.flush()
    producer.close()

    cfg = consumer_config(kafka_broker.bootstrap, topic, max_events=len(events) + 1, compute_threads=2, idle_exit_s=15)
    cfg.max_poll_records = cfg.max_batch_events = 100
    consumer = EventConsumer(sqlite_store, models, cfg, sleep=lambda _s: None)
    calls = {"commit": 0, "dlq": 0}
    commit = consumer.ingestor.commit

    def flaky_commit(prepared: Any) -> Any:
        calls["commit"] += 1
        if calls["commit"] in (3, 4):
            raise StoreUnavailable("store down")  # an outage: retried as it is, never bisected
        return commit(prepared)

    real_send = streaming.consumer.dlq_send

    def flaky_send(*args: Any, **kw: Any) -> None:
        calls["dlq"] += 1
        if calls["dlq"] == 1:
            raise RuntimeError("DLQ unreachable")
        real_send(*args, **kw)

    monkeypatch.setattr(consumer.ingestor, "commit", flaky_commit)
    monkeypatch.setattr(streaming.consumer, "dlq_send", flaky_send)
    stats = consumer.run()
    # two failed commits (the second is the retry of the first) and one failed send; a send that fails while the
    # batch behind it fails to commit ends both in one retry
    assert calls["commit"] >= 5 and calls["dlq"] >= 2
    assert 2 <= stats.retries <= 3
    assert (stats.records, stats.dlq) == (len(events) + 1, 1)
    assert_state_matches_in_process(sqlite_store, online, events)
    assert len(read_dlq(kafka_broker.bootstrap, f"{topic}.dlq", 2)) >= 1


def persona_consume(env: dict[str, str], topic: str, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "persona_cli", "consume", "--topic", topic, "--metrics-port", "0", *extra]
    # its own process group, as under the demo or a supervisor, so a test can signal the group
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True
    )


def consume_env(bootstrap: str, db: str, bundle: Path, group: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")}
    env.update(
        PERSONA_DATABASE_URL=db,
        PERSONA_MODEL_DIR=str(bundle),
        PERSONA_KAFKA_BOOTSTRAP=bootstrap,
        PERSONA_KAFKA_GROUP=group,
        PERSONA_KAFKA_SESSION_TIMEOUT_MS=str(FAST_GROUP["session_timeout_ms"]),
        PERSONA_KAFKA_HEARTBEAT_MS=str(FAST_GROUP["heartbeat_interval_ms"]),
    )
    return env


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def committed_total(bootstrap: str, group: str, topic: str, partitions: int = 4) -> int:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return sum(consumer.committed(TopicPartition(topic, p)) or 0 for p in range(partitions))
    finally:
        consumer.close(autocommit=False)


@pytest.mark.slow
@pytest.mark.fault
def test_a_hard_killed_consumer_resumes_from_committed_offsets_without_loss_or_double_apply(
    kafka_broker: EmbeddedBroker, topic: str, tmp_path: Path, tiny_bundle: Path
) -> None:
    db = f"sqlite:///{tmp_path / 'kill.db'}"
    store = Store.open(db)
    online = OnlineModel.load(tiny_bundle)
    # Enough events that the kill lands mid-stream: the tiny model is consumed at well over 10,000 events/s.
    events = make_events(online, 30_000, sessions=300, prefix=f"{topic}-")
    publish(kafka_broker.bootstrap, topic, events)
    env = consume_env(kafka_broker.bootstrap, db, tiny_bundle, f"g-{uuid.uuid4().hex[:8]}")
    log = tmp_path / "consume.log"
    first = persona_consume(env, topic, log)
    try:
        wait_for(lambda: store.count_events() >= 500, 120, "the first consumer to apply events")
        children = child_pids(first.pid)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    assert store.count_events() < len(events), "killed too late to prove anything"
    assert children, "the consumer runs its model work in a child process by default"
    wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in children), 30, "its model process to exit")
    second = persona_consume(env, topic, log, "--idle-exit", "4")
    assert second.wait(180) == 0, log.read_text()[-3000:]
    assert_state_matches_in_process(store, online, events)
    # the online counters are exactly-once too: every event after a session's first is predicted once, kill or not
    counters = store.online_counters()
    for variant in ("persona", "base"):
        assert counters[("predictions", variant, 0)] == len(events) - 300
        assert 0 < counters[("hits", variant, 10)] <= counters[("hits", variant, 20)] <= len(events) - 300
    store.close()


@pytest.mark.slow
def test_sigterm_finishes_the_batch_commits_and_exits_zero(
    kafka_broker: EmbeddedBroker, topic: str, tmp_path: Path, tiny_bundle: Path
) -> None:
    db = f"sqlite:///{tmp_path / 'term.db'}"
    store = Store.open(db)
    online = OnlineModel.load(tiny_bundle)
    events = make_events(online, 4000, sessions=40, prefix=f"{topic}-")
    publish(kafka_broker.bootstrap, topic, events)
    group = f"g-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "consume.log"
    proc = persona_consume(consume_env(kafka_broker.bootstrap, db, tiny_bundle, group), topic, log)
    try:
        wait_for(lambda: store.count_events() >= 500, 120, "the consumer to apply events")
        assert child_pids(proc.pid), "the consumer runs its model work in a child process by default"
        os.killpg(proc.pid, signal.SIGTERM)  # the whole group, model process included, as a supervisor does
        assert proc.wait(60) == 0, log.read_text()[-3000:]
        text = log.read_text()
        assert "Traceback" not in text and "exited with code" not in text, text[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    # Every processed record is committed: the committed offsets account for exactly the logged events.
    assert committed_total(kafka_broker.bootstrap, group, topic) == store.count_events()
    store.close()


@pytest.mark.slow
def test_two_consumers_in_one_group_split_partitions_and_match_one_consumer(
    kafka_broker: EmbeddedBroker, topic: str, tmp_path: Path, tiny_bundle: Path
) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 'two.db'}")
    models = ModelProvider(store, model_dir=tiny_bundle)
    online = models.get()
    events = make_events(online, 3000, sessions=80, prefix=f"{topic}-")
    group = f"g-{uuid.uuid4().hex[:8]}"
    results: list[ConsumeStats] = []

    def run() -> None:
        cfg = consumer_config(kafka_broker.bootstrap, topic, group=group, idle_exit_s=6.0)
        results.append(EventConsumer(store, models, cfg).run())

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(3)  # both members join before the events arrive, so each gets its own partitions
    publish(kafka_broker.bootstrap, topic, events)
    for t in threads:
        t.join(120)
    assert len(results) == 2
    assert sum(r.records for r in results) == len(events)
    assert all(r.records > 0 for r in results), [r.records for r in results]
    assert_state_matches_in_process(store, online, events)
    store.close()
