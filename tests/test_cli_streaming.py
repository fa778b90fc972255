"""The streaming commands as a user runs them: `persona broker` and `persona replay` from the shell."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from persona.cli import main
from persona.events import Event, parse_event
from streaming.broker import EmbeddedBroker
from streaming.kafka_io import make_consumer
from tests.fixtures_kafka import FAST_GROUP

PERSONA = str(Path(sys.executable).parent / "persona")


def test_broker_command_prints_its_address_and_stops_cleanly_on_ctrl_c() -> None:
    proc = subprocess.Popen([PERSONA, "broker"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline() if proc.stdout else ""
        second = proc.stdout.readline() if proc.stdout else ""
        assert "listening on 127.0.0.1:" in first
        assert second.startswith("export PERSONA_KAFKA_BOOTSTRAP=127.0.0.1:")
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(20)
    assert code == 0


def test_replay_command_sends_the_requested_events(
    kafka_broker: EmbeddedBroker, topic: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PERSONA_KAFKA_BOOTSTRAP", kafka_broker.bootstrap)
    dataset = "synthetic:users=20,items=30,events=400"
    args = ["replay", "--dataset", dataset, "--limit", "60", "--topic", topic, "--no-progress"]
    assert main(args) == 0
    consumer = make_consumer(kafka_broker.bootstrap, f"g-{topic}", [topic], **FAST_GROUP)
    got: list[bytes] = []
    deadline = time.monotonic() + 30
    try:
        while len(got) < 60 and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                got += [r.value for r in records]
    finally:
        consumer.close()
    assert len(got) == 60
    events = [parse_event(raw) for raw in got]
    assert all(isinstance(e, Event) for e in events)
    assert len({e.event_id for e in events if isinstance(e, Event)}) == 60
