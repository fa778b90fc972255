"""Inject the faults of issue 13 into a real `persona consume` and count what it logs and loses.

    OMP_NUM_THREADS=1 .venv/bin/python bench/faults.py --outage-s 30 --json docs/figures/faults.json

Scenarios (each on a fresh embedded broker, a throwaway PostgreSQL database and the tiny synthetic bundle):

- ``store_outage``: 2,000 events applied, then the database refuses connections for ``--outage-s`` (ALLOW_CONNECTIONS
  false, its sessions terminated) while 2,000 more arrive, then comes back.
- ``broker_pause``: 2,000 events applied, the broker is frozen (SIGSTOP) for ``--outage-s``, 2,000 more after it.
- ``poison``: on one partition, 200 valid events with 3 records the store refuses (a trigger), 2 lone surrogates
  and a 1 MB message among them.

For each: the consumer's log lines during the fault (all, WARNING and above, tracebacks), its retries, the time
from the fault's end to the last event applied, events lost or applied twice, DLQ records, and (store outage) the
online counters against the events.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kafka import TopicPartition  # noqa: E402

from persona.events import Event  # noqa: E402
from persona.store import Store  # noqa: E402
from persona.store.engine import temporary_database  # noqa: E402
from recsys.online import OnlineModel  # noqa: E402
from streaming.bench import train_tiny_bundle  # noqa: E402
from streaming.broker import EmbeddedBroker  # noqa: E402
from streaming.kafka_io import ensure_topics, make_consumer, make_producer  # noqa: E402
from tests.fixtures_store import set_reachable  # noqa: E402
from tests.test_ingest import make_events  # noqa: E402

POSTGRES = os.environ.get("PERSONA_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
SESSIONS = 40


def _wait(predicate: Any, timeout: float) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise TimeoutError("condition not reached")
        time.sleep(0.2)
    return time.monotonic() - start


def _publish(bootstrap: str, topic: str, payloads: list[tuple[bytes, bytes]], partition: int | None = None) -> None:
    producer = make_producer(bootstrap, max_request_size=2 << 20)
    for key, value in payloads:
        producer.send(topic, key=key, value=value, partition=partition)
    producer.flush()
    producer.close()


def _dlq_size(bootstrap: str, topic: str) -> int:
    consumer = make_consumer(bootstrap, "faults-dlq-size", [])
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        return sum(consumer.end_offsets([TopicPartition(topic, p) for p in parts]).values())
    finally:
        consumer.close(autocommit=False)


def _log_counts(lines: list[str]) -> dict[str, int]:
    return {
        "lines": len(lines),
        "warning_or_worse": sum(" WARNING " in x or " ERROR " in x or " CRITICAL " in x for x in lines),
        "consumer_lines": sum(" streaming.consumer: " in x for x in lines),
        "kafka_client_lines": sum(" kafka." in x for x in lines),
        "tracebacks": sum(x.startswith("Traceback") for x in lines),
    }


class Consumer:
    """`persona consume` as a process, logging to a file the scenario reads by position."""

    def __init__(self, bootstrap: str, db: str, bundle: Path, topic: str, log: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")}
        env.update(
            PERSONA_DATABASE_URL=db,
            PERSONA_MODEL_DIR=str(bundle),
            PERSONA_KAFKA_BOOTSTRAP=bootstrap,
            PERSONA_KAFKA_GROUP="faults",
            PERSONA_KAFKA_DLQ_TOPIC=f"{topic}.dlq",
            PERSONA_KAFKA_SESSION_TIMEOUT_MS="6000",
            PERSONA_KAFKA_HEARTBEAT_MS="1000",
        )
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "persona_cli", "consume", "--topic", topic, "--metrics-port", "0"],
            cwd=REPO,
            env=env,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
        )

    def mark(self) -> int:
        return len(self.log.read_text(errors="replace").splitlines())

    def lines_since(self, mark: int, until: int | None = None) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()[mark:until]

    def stop(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(120)
        summary = next((x for x in reversed(self.lines_since(0)) if x.startswith("consumed ")), "")
        return code, summary


def _events(online: OnlineModel, n: int, prefix: str) -> list[Event]:
    return make_events(online, n, sessions=SESSIONS, prefix=prefix)


def _outage(
    bundle: Path,
    work: Path,
    outage_s: float,
    *,
    name: str,
    prefix: str,
    fault: Callable[[EmbeddedBroker, str, bool], None],
    publish_during: bool,
) -> tuple[dict[str, Any], dict[tuple[str, str, int], float], float]:
    """The outage scenarios' common run: 4,000 events on a fresh broker and database; the first 2,000 published
    and applied, then ``fault(broker, db, True)`` for ``outage_s`` seconds and ``fault(..., False)``, the other
    2,000 published during the fault (``publish_during``) or after it; then until all 4,000 are applied. The
    store's connections are closed across the fault (a database outage must not find them open).

    Returns the report's common part, the store's online counters and the seconds from the fault's end until the
    last event was applied."""
    online = OnlineModel.load(bundle)
    events = _events(online, 4000, prefix)
    with EmbeddedBroker() as broker, temporary_database(POSTGRES, "persona_faults") as db:
        topic = "faults-" + name.replace("_", "-")
        ensure_topics(broker.bootstrap, {topic: 4, f"{topic}.dlq": 4})

        def publish(part: list[Event]) -> None:
            _publish(broker.bootstrap, topic, [(e.session_id.encode(), e.to_json_bytes()) for e in part])

        store = Store.open(db)
        consumer = Consumer(broker.bootstrap, db, bundle, topic, work / f"{name}.log")
        try:
            publish(events[:2000])
            _wait(lambda: store.count_events() >= 2000, 180)
            store.close()
            mark = consumer.mark()
            fault(broker, db, True)
            if publish_during:
                publish(events[2000:])
            time.sleep(outage_s)
            end = consumer.mark()
            fault(broker, db, False)
            if not publish_during:
                publish(events[2000:])
            store = Store.open(db)
            recovery = _wait(lambda: store.count_events() >= 4000, 300)
            time.sleep(1)
            after = consumer.lines_since(end)
        finally:
            fault(broker, db, False)
            code, summary = consumer.stop()
        out = {
            "outage_s": outage_s,
            "during": _log_counts(consumer.lines_since(mark, end)),
            "after": _log_counts(after),
            "recovered_line": next((x.split(": ", 1)[1] for x in after if "recovered after" in x), None),
            "events": len(events),
            "stored_events": store.count_events(),
            "exit_code": code,
            "summary": summary,
        }
        counters = store.online_counters()
        store.close()
        return out, counters, recovery


def _database_down(_broker: EmbeddedBroker, db: str, down: bool) -> None:
    set_reachable(db, not down)


def _broker_paused(broker: EmbeddedBroker, _db: str, paused: bool) -> None:
    if paused:
        broker.pause()
    else:
        broker.resume()


def store_outage(bundle: Path, work: Path, outage_s: float) -> dict[str, Any]:
    """The database refuses connections while the second half arrives."""
    out, counters, recovery = _outage(
        bundle, work, outage_s, name="store_outage", prefix="so-", fault=_database_down, publish_during=True
    )
    return {
        **out,
        "recovery_s": round(recovery, 2),
        "predictions": {v: counters.get(("predictions", v, 0), 0.0) for v in ("persona", "base")},
        "expected_predictions": out["events"] - SESSIONS,
    }


def broker_pause(bundle: Path, work: Path, outage_s: float) -> dict[str, Any]:
    """The broker is frozen; the second half is published once it is back."""
    out, _counters, recovery = _outage(
        bundle, work, outage_s, name="broker_pause", prefix="bp-", fault=_broker_paused, publish_during=False
    )
    return {**out, "seconds_to_apply_the_next_2000_after_resume": round(recovery, 2)}


def poison(bundle: Path, work: Path) -> dict[str, Any]:
    online = OnlineModel.load(bundle)
    good = _events(online, 200, "pp-")
    with EmbeddedBroker() as broker, temporary_database(POSTGRES, "persona_faults") as db:
        topic = "faults-poison"
        ensure_topics(broker.bootstrap, {topic: 4, f"{topic}.dlq": 4})
        store = Store.open(db)
        with store.engine.begin() as conn:  # the store refuses these event ids: valid records it cannot take
            conn.exec_driver_sql(
                "CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN "
                "IF NEW.event_id LIKE 'poison%%' THEN RAISE EXCEPTION 'poison pill refused'; END IF; "
                "RETURN NEW; END $$ LANGUAGE plpgsql"
            )
            conn.exec_driver_sql("CREATE TRIGGER refuse BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION refuse()")
        bad = {
            20: b'{"event_id":"s1","session_id":"s-\\ud800","item_id":"1","ts":1}',
            21: b'{"event_id":"s2","session_id":"s-\xed\xa0\x80","item_id":"1","ts":1}',
            60: Event("poison-1", good[60].session_id, good[60].item_id, good[60].ts).to_json_bytes(),
            61: Event("poison-2", good[61].session_id, good[61].item_id, good[61].ts).to_json_bytes(),
            120: b'{"event_id":"big","pad":"' + b"x" * 1_000_000 + b'"}',
            150: Event("poison-3", good[150].session_id, good[150].item_id, good[150].ts).to_json_bytes(),
        }
        payloads: list[tuple[bytes, bytes]] = []
        for i, e in enumerate(good):
            if i in bad:
                payloads.append((b"k", bad[i]))
            payloads.append((b"k", e.to_json_bytes()))
        consumer = Consumer(broker.bootstrap, db, bundle, topic, work / "poison.log")
        try:
            time.sleep(8)  # group join and model load
            mark = consumer.mark()
            start = time.monotonic()
            _publish(broker.bootstrap, topic, payloads, partition=0)
            seconds = _wait(lambda: store.count_events() >= len(good), 300)
            time.sleep(2)
        finally:
            code, summary = consumer.stop()
        out = {
            "records": len(payloads),
            "valid_events": len(good),
            "stored_events": store.count_events(),
            "seconds_to_apply_all_valid": round(seconds, 2),
            "dlq_records": _dlq_size(broker.bootstrap, f"{topic}.dlq"),
            "bad_records": len(bad),
            "log": _log_counts(consumer.lines_since(mark)),
            "exit_code": code,
            "summary": summary,
            "wall_s": round(time.monotonic() - start, 2),
        }
        store.close()
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outage-s", type=float, default=30.0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--only", choices=["store_outage", "broker_pause", "poison"])
    parser.add_argument("--logs", type=Path, help="Keep the consumers' logs in this directory.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.logs is not None:
            args.logs.mkdir(parents=True, exist_ok=True)
            work = args.logs
        bundle = train_tiny_bundle(Path(tmp) / "bundle")
        results: dict[str, Any] = {"command": " ".join(["python", *sys.argv])}
        if args.only in (None, "poison"):
            results["poison"] = poison(bundle, work)
        if args.only in (None, "store_outage"):
            results["store_outage"] = store_outage(bundle, work, args.outage_s)
        if args.only in (None, "broker_pause"):
            results["broker_pause"] = broker_pause(bundle, work, args.outage_s)
    text = json.dumps(results, indent=2)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
