"""Replay: dataset interactions reach Kafka exactly once, keyed by session, in time order, paced as asked."""

from __future__ import annotations

import time
from collections import defaultdict
from datetime import UTC, datetime

import polars as pl
import pytest
from kafka.consumer.fetcher import ConsumerRecord

from persona.events import Event, parse_event
from persona_cli.main import main
from streaming import replay as replay_mod
from streaming.broker import EmbeddedBroker
from streaming.kafka_io import make_consumer, make_producer
from streaming.replay import dataset_fingerprint, event_id_for, replay
from tests.fixtures_kafka import FAST_GROUP


def _frame() -> pl.DataFrame:
    """3 users, 12 interactions, deliberately not in time order, with ties inside one user."""
    rows = [
        ("u1", "10", 100.0),
        ("u2", "11", 90.0),
        ("u3", "12", 95.0),
        ("u1", "13", 101.0),
        ("u1", "14", 101.0),  # tie with the previous row of u1: input order must be kept
        ("u2", "15", 50.0),
        ("u3", "16", 300.0),
        ("u1", "17", 10.0),
        ("u2", "18", 200.0),
        ("u3", "19", 250.0),
        ("u1", "20", 400.0),
        ("u2", "21", 120.0),
    ]
    return pl.DataFrame(rows, schema={"user_id": pl.String, "item_id": pl.String, "ts": pl.Float64}, orient="row")


def _consume(bootstrap: str, topic: str, expected: int, timeout_s: float = 20.0) -> list[ConsumerRecord]:
    consumer = make_consumer(bootstrap, f"g-{topic}", [topic], **FAST_GROUP)
    records: list[ConsumerRecord] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=300).values():
                records.extend(batch)
            if len(records) >= expected:
                # One more short poll: anything extra would be a duplicate.
                for batch in consumer.poll(timeout_ms=500).values():
                    records.extend(batch)
                break
    finally:
        consumer.close()
    return records


def _events(records: list[ConsumerRecord]) -> list[Event]:
    out = []
    for r in records:
        ev = parse_event(r.value)
        assert isinstance(ev, Event), ev
        assert r.key == ev.session_id.encode()
        out.append(ev)
    return out


def test_replay_delivers_every_event_once_keyed_by_session_in_time_order(
    kafka_broker: EmbeddedBroker, topic: str
) -> None:
    df = _frame()
    producer = make_producer(kafka_broker.bootstrap)
    before = datetime.now(UTC)
    stats = replay(df, producer, topic, progress=False)
    producer.close()
    assert stats.sent == df.height

    records = _consume(kafka_broker.bootstrap, topic, df.height)
    events = _events(records)
    assert len(events) == df.height
    assert len({e.event_id for e in events}) == df.height

    # Exactly the dataset's interactions, with deterministic ids tied to the input row.
    ns = dataset_fingerprint(df)
    expected = {event_id_for(ns, i): (u, it, ts) for i, (u, it, ts) in enumerate(df.iter_rows())}
    got = {e.event_id: (e.session_id, e.item_id, e.attributes["dataset_ts"]) for e in events}  # type: ignore[index]
    assert got == expected

    # One partition per session, and the session's events in dataset order (ties in input order).
    partitions: dict[str, set[int]] = defaultdict(set)
    per_session: dict[str, list[str]] = defaultdict(list)
    for r, e in sorted(zip(records, events, strict=True), key=lambda p: (p[0].partition, p[0].offset)):
        partitions[e.session_id].add(r.partition)
        per_session[e.session_id].append(e.item_id)
    assert all(len(p) == 1 for p in partitions.values())
    assert per_session == {
        "u1": ["17", "10", "13", "14", "20"],
        "u2": ["15", "11", "21", "18"],
        "u3": ["12", "19", "16"],
    }
    # Live traffic: ts is the send time, user_id is the session.
    assert all(before <= e.ts <= datetime.now(UTC) for e in events)
    assert all(e.user_id == e.session_id and e.type == "click" for e in events)


def test_replaying_twice_gives_the_same_event_ids(kafka_broker: EmbeddedBroker, topic: str) -> None:
    producer = make_producer(kafka_broker.bootstrap)
    replay(_frame(), producer, topic, progress=False)
    replay(_frame(), producer, topic, progress=False)
    producer.close()
    events = _events(_consume(kafka_broker.bootstrap, topic, 24))
    assert len(events) == 24
    ids = [e.event_id for e in events]
    assert len(set(ids)) == 12  # every id exactly twice: downstream dedup applies each once
    assert all(ids.count(i) == 2 for i in set(ids))


def test_limit_and_start_fraction_select_a_time_window(kafka_broker: EmbeddedBroker, topic: str) -> None:
    producer = make_producer(kafka_broker.bootstrap)
    # By time: 10, 50, 90, 95, 100, 101, 101, 120, 200, 250, 300, 400 -> skip 6 (0.5), take 3.
    stats = replay(_frame(), producer, topic, start_fraction=0.5, limit=3, progress=False)
    producer.close()
    assert stats.sent == 3
    events = _events(_consume(kafka_broker.bootstrap, topic, 3))
    assert sorted(e.attributes["dataset_ts"] for e in events) == [101.0, 120.0, 200.0]  # type: ignore[index]
    assert sorted(e.item_id for e in events) == ["14", "18", "21"]


def test_rate_paces_the_replay(kafka_broker: EmbeddedBroker, topic: str) -> None:
    producer = make_producer(kafka_broker.bootstrap)
    stats = replay(_frame(), producer, topic, rate=100.0, progress=False)
    producer.close()
    assert stats.sent == 12
    assert stats.seconds >= 0.1  # 11 gaps of 10 ms


def test_speedup_caps_long_gaps(kafka_broker: EmbeddedBroker, topic: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replay_mod, "MAX_GAP_S", 0.05)
    month = 30 * 86400.0
    df = pl.DataFrame({"user_id": ["a", "a", "b"], "item_id": ["1", "2", "3"], "ts": [0.0, month, 2 * month]})
    producer = make_producer(kafka_broker.bootstrap)
    stats = replay(df, producer, topic, speedup=10.0, progress=False)
    producer.close()
    assert stats.sent == 3
    assert 0.1 <= stats.seconds < 2.0


def test_ready_made_events_are_sent_unchanged(kafka_broker: EmbeddedBroker, topic: str) -> None:
    ts = datetime(2026, 1, 1, tzinfo=UTC)
    sent = [Event(f"e{i}", "s", str(i), ts, attributes={"k": i}) for i in range(5)]
    producer = make_producer(kafka_broker.bootstrap)
    assert replay(sent, producer, topic, limit=4, progress=False).sent == 4
    producer.close()
    got = sorted(_events(_consume(kafka_broker.bootstrap, topic, 4)), key=lambda e: e.event_id)
    assert got == sent[:4]


def test_cli_rejects_rate_with_speedup(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", "--rate", "1", "--speedup", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--rate" in err and "--speedup" in err
