"""The long-running commands as a user runs them: `persona broker`, `persona replay` and `persona serve`."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from persona.events import Event, parse_event
from persona_cli.main import main
from streaming.broker import EmbeddedBroker
from streaming.kafka_io import make_consumer
from tests.fixtures_kafka import FAST_GROUP
from tests.prometheus_harness import free_port

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


def _flipped_copy(bundle: Path, where: Path) -> Path:
    """A copy of ``bundle`` with one byte of its weights flipped: same sizes, another checksum."""
    copy = where / "flipped"
    shutil.copytree(bundle, copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    return copy


@pytest.mark.parametrize("command", ["serve", "consume"])
def test_a_flipped_bundle_is_one_line_naming_the_checksum_and_exit_2(
    command: str, tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PERSONA_MODEL_DIR", str(_flipped_copy(tiny_bundle, tmp_path)))
    monkeypatch.setenv("PERSONA_DATABASE_URL", f"sqlite:///{tmp_path / 'store.db'}")
    assert main([command]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "model.safetensors fails its checksum" in err


@pytest.mark.slow
def test_serve_answers_then_exits_0_on_sigterm(tiny_bundle: Path, tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "PERSONA_MODEL_DIR": str(tiny_bundle),
        "PERSONA_DATABASE_URL": f"sqlite:///{tmp_path / 'store.db'}",
    }
    proc = subprocess.Popen(
        [PERSONA, "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                assert time.monotonic() < deadline, "persona serve did not become ready"
                time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = proc.stdout.read() if proc.stdout else ""
    assert code == 0, output
    assert "Traceback" not in output
