"""Embedded broker lifecycle and the Kafka helpers, against a real tansu process."""

from __future__ import annotations

import os
import socket
import uuid

import pytest

from persona.events import Rejection, RejectReason
from recsys.errors import PersonaError
from streaming.broker import EmbeddedBroker
from streaming.kafka_io import dlq_send, ensure_topics, make_consumer, make_producer
from tests.fixtures_kafka import FAST_GROUP


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is reaped by Popen.wait, so check its state too.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_broker_starts_serves_and_stops_without_orphan() -> None:
    with EmbeddedBroker() as broker:
        pid = broker.pid
        assert pid is not None and _alive(pid)
        host, port = broker.bootstrap.split(":")
        socket.create_connection((host, int(port)), timeout=1).close()
        assert ensure_topics(broker.bootstrap, {"t": 1}) == ["t"]
    assert not _alive(pid)
    assert not broker.running()


def test_broker_is_stopped_when_the_block_raises() -> None:
    with pytest.raises(RuntimeError), EmbeddedBroker() as broker:
        pid = broker.pid
        raise RuntimeError("boom")
    assert pid is not None and not _alive(pid)


def test_paused_broker_still_stops() -> None:
    broker = EmbeddedBroker().start()
    pid = broker.pid
    broker.pause()
    broker.stop()
    assert pid is not None and not _alive(pid)


def test_taken_port_is_a_persona_error(kafka_broker: EmbeddedBroker) -> None:
    with pytest.raises(PersonaError, match="already in use"):
        EmbeddedBroker(port=kafka_broker.port).start()


def test_ensure_topics_is_idempotent(kafka_broker: EmbeddedBroker) -> None:
    name = f"idem-{uuid.uuid4().hex[:8]}"
    assert ensure_topics(kafka_broker.bootstrap, {name: 4}) == [name]
    assert ensure_topics(kafka_broker.bootstrap, {name: 4}) == []
    assert ensure_topics(kafka_broker.bootstrap, {name: 4, f"{name}-dlq": 1}) == [f"{name}-dlq"]


def test_unreachable_bootstrap_is_a_persona_error_naming_the_setting() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        with pytest.raises(PersonaError, match=f"127.0.0.1:{port}.*PERSONA_KAFKA_BOOTSTRAP"):
            make_producer(f"127.0.0.1:{port}", bootstrap_timeout_ms=1000)


def test_dlq_message_carries_original_bytes_and_reason_headers(kafka_broker: EmbeddedBroker, topic: str) -> None:
    raw = b'{"event_id": "e1", not json'
    producer = make_producer(kafka_broker.bootstrap)
    rejection = Rejection(RejectReason.INVALID_JSON, "invalid JSON: Expecting property name")
    dlq_send(producer, topic, raw, b"s-1", rejection, "persona.events", 3, 42).get(timeout=10)
    producer.close()

    consumer = make_consumer(kafka_broker.bootstrap, f"g-{topic}", [topic], **FAST_GROUP)
    try:
        records = []
        for _ in range(40):
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
            if records:
                break
    finally:
        consumer.close()
    assert len(records) == 1
    msg = records[0]
    assert msg.value == raw and msg.key == b"s-1"
    headers = {k: v for k, v in msg.headers}
    assert headers == {
        "persona-reject-reason": b"invalid_json",
        "persona-reject-detail": b"invalid JSON: Expecting property name",
        "persona-source-topic": b"persona.events",
        "persona-source-partition": b"3",
        "persona-source-offset": b"42",
    }
