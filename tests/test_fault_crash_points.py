"""The real ``persona consume`` SIGKILLed at six points of a batch's life, at two batch sizes (the fault suite).

Each run arms one crash point (``PERSONA_FAULT_POINT``, :mod:`persona.faults`): the process kills itself the third
time it passes it (a later poll for ``after_poll``), a second ``persona consume`` in the same group resumes from the
committed offsets, and the store must then be exactly what a crash-free run with the same batch size leaves: the
same events once each, the same sessions (items, counts, codes), the same prototype bank and the same online
counters (predictions, hits, NDCG gain, reciprocal rank per variant), and every malformed record in the DLQ exactly
once (a record a killed process sent before its offset commit is found in the DLQ by the next one and not sent
again).

One partition, everything published before the consumer starts, ``PERSONA_CONSUMER_MAX_BATCH`` = the batch size:
each batch is then exactly one poll of that many records, before and after a crash (offsets are committed at batch
ends), so a crash-free run has the same batch boundaries and a bank that evolves batch by batch must match exactly.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from persona.faults import POINTS
from persona.store import Store
from recsys.online import OnlineModel, code_from_bytes
from streaming.broker import EmbeddedBroker
from streaming.kafka_io import DLQ_HEADER_SOURCE_OFFSET, ensure_topics, make_producer
from tests.test_consumer import consume_env, persona_consume, read_dlq
from tests.test_consumer_faults import dlq_size, without_sentinels
from tests.test_ingest import make_events

pytestmark = pytest.mark.fault

#: The crash comes on the third pass of its point: two batches (or dead letters) went through before it. Polls run
#: ahead of the commits (the next batch is polled and prepared while one commits): ``after_poll`` waits for a later
#: poll, given with the batch size.
NTH = 3
EVENTS = 480
SESSIONS = 24
#: One malformed record after every this many valid events (a DLQ record in most batches of either size).
MALFORMED_EVERY = 37
MALFORMED = [
    b"{not json",
    b'{"event_id":"m-sur","session_id":"s-\\ud800","item_id":"1","ts":1}',
    b'{"event_id":"m-nan","session_id":"s","item_id":"1","ts":NaN}',
    b'{"event_id":7,"session_id":"s","item_id":"1","ts":1}',
    b'{"event_id":"m-nul","session_id":"s\\u0000","item_id":"1","ts":1}',
]


def _records(online: OnlineModel, prefix: str) -> tuple[list[bytes], list[int]]:
    """The valid events with malformed ones interleaved; and the offsets of the malformed ones."""
    values: list[bytes] = []
    bad: list[int] = []
    for i, e in enumerate(make_events(online, EVENTS, sessions=SESSIONS, prefix=prefix)):
        if i and i % MALFORMED_EVERY == 0:
            bad.append(len(values))
            values.append(MALFORMED[len(bad) % len(MALFORMED)])
        values.append(e.to_json_bytes())
    return values, bad


def _run(env: dict[str, str], topic: str, log: Path, fault: str | None) -> int:
    run_env = {**env, **({"PERSONA_FAULT_POINT": fault} if fault else {})}
    proc = persona_consume(run_env, topic, log, "--idle-exit", "3")
    try:
        return proc.wait(240)
    finally:
        if proc.poll() is None:
            proc.kill()


def _snapshot(db: str, online: OnlineModel) -> dict[str, Any]:
    store = Store.open(db)
    try:
        with store.read() as uow:
            events = uow.get_events()
            sessions = uow.get_sessions({e.session_id for e in events})
        protos = store.load_prototypes(online.version)
        return {
            "event_ids": Counter(e.event_id for e in events),
            "sessions": sessions,
            "prototypes": protos,
            "counters": store.online_counters(),
        }
    finally:
        store.close()


def _assert_same_store(got: dict[str, Any], want: dict[str, Any], online: OnlineModel) -> None:
    assert got["event_ids"] == want["event_ids"]  # every event once, none lost
    assert max(got["event_ids"].values()) == 1
    assert set(got["sessions"]) == set(want["sessions"])
    for sid, w in want["sessions"].items():
        g = got["sessions"][sid]
        assert (g.recent_items, g.event_count, g.edit_version, g.prototype_id) == (
            w.recent_items,
            w.event_count,
            w.edit_version,
            w.prototype_id,
        ), sid
        torch.testing.assert_close(code_from_bytes(g.code, online.cfg), code_from_bytes(w.code, online.cfg))
    assert [(p.prototype_id, p.count) for p in got["prototypes"]] == [
        (p.prototype_id, p.count) for p in want["prototypes"]
    ]
    for g, w in zip(got["prototypes"], want["prototypes"], strict=True):
        torch.testing.assert_close(code_from_bytes(g.centre, online.cfg), code_from_bytes(w.centre, online.cfg))
    assert set(got["counters"]) == set(want["counters"])
    for key, value in want["counters"].items():
        name = key[0]
        if name in ("predictions", "hits"):
            assert got["counters"][key] == value, key  # counts: exactly
        else:
            assert got["counters"][key] == pytest.approx(value, rel=1e-9), key


@pytest.fixture(scope="module")
def crash_broker() -> Any:
    with EmbeddedBroker() as broker:
        yield broker


@pytest.mark.slow
@pytest.mark.parametrize(("batch", "model_process", "nth_poll"), [(40, False, 6), (150, True, 4)])
def test_consumer_sigkilled_at_every_point_of_a_batch_leaves_the_store_of_a_crash_free_run(
    crash_broker: EmbeddedBroker, tmp_path: Path, tiny_bundle: Path, batch: int, model_process: bool, nth_poll: int
) -> None:
    """Batches of 40 with the model work on the consumer's own threads, of 150 with it in the model process (the
    default): six crash points each, against a crash-free run of the same configuration."""
    online = OnlineModel.load(tiny_bundle)
    bootstrap = crash_broker.bootstrap

    def scenario(name: str) -> tuple[str, dict[str, str], str]:
        topic = f"crash-{name}-{batch}-{uuid.uuid4().hex[:6]}"
        ensure_topics(bootstrap, {topic: 1, f"{topic}.dlq": 1})
        producer = make_producer(bootstrap)
        for value in values:
            producer.send(topic, key=b"k", value=value, partition=0)
        producer.flush()
        producer.close()
        db = f"sqlite:///{tmp_path / f'{name}.db'}"
        env = consume_env(bootstrap, db, tiny_bundle, f"g-{uuid.uuid4().hex[:8]}")
        env.update(
            PERSONA_KAFKA_DLQ_TOPIC=f"{topic}.dlq",
            PERSONA_KAFKA_PARTITIONS="1",
            PERSONA_CONSUMER_MAX_BATCH=str(batch),
            PERSONA_CONSUMER_MODEL_PROCESS=str(model_process).lower(),
            PERSONA_KAFKA_FETCH_MAX_WAIT_MS="20",
        )
        return topic, env, db

    values, bad = _records(online, f"b{batch}-")
    log = tmp_path / "consume.log"
    topic, env, db = scenario("reference")
    assert _run(env, topic, log, None) == 0, log.read_text()[-3000:]
    want = _snapshot(db, online)
    assert sum(want["event_ids"].values()) == EVENTS
    assert dlq_size(bootstrap, f"{topic}.dlq") == len(bad)

    outcomes: dict[str, int] = {}
    for point in POINTS:
        topic, env, db = scenario(point)
        code = _run(env, topic, log, f"{point}:{nth_poll if point == 'after_poll' else NTH}")
        assert code == -9, f"{point}: exit {code}, not SIGKILL: the point was not reached\n{log.read_text()[-3000:]}"
        crashed = _snapshot(db, online)
        assert sum(crashed["event_ids"].values()) < EVENTS, f"{point}: killed too late to prove anything"
        assert _run(env, topic, log, None) == 0, log.read_text()[-3000:]
        _assert_same_store(_snapshot(db, online), want, online)
        dlq = f"{topic}.dlq"
        size = dlq_size(bootstrap, dlq)
        dead = without_sentinels(read_dlq(bootstrap, dlq, size + 1))
        sources = Counter(int(dict(r.headers)[DLQ_HEADER_SOURCE_OFFSET]) for r in dead)
        assert set(sources) == set(bad), point  # every malformed record dead-lettered, nothing else
        assert size == len(bad) and max(sources.values()) == 1, (point, sources)  # each once, crash or not
        outcomes[point] = EVENTS - sum(crashed["event_ids"].values())
    assert set(outcomes) == set(POINTS)
    print(f"batch {batch}, model process {model_process}: events left after each crash: {outcomes}")


def test_an_unknown_fault_point_is_refused_before_the_consumer_starts(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")}
    env.update(PERSONA_FAULT_POINT="after_everything", PERSONA_DATABASE_URL=f"sqlite:///{tmp_path / 'x.db'}")
    out = subprocess.run(
        [sys.executable, "-m", "persona_cli", "consume"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.returncode == 2, out.stderr
    assert "PERSONA_FAULT_POINT='after_everything' is not a fault point" in out.stderr
