"""10,000 malformed messages in one run, among valid events, through the real consumer (the fault suite).

Every kind of bad message seen or feared (docs/reliability.md): lone surrogates (escaped and as raw bytes), NUL
(escaped, and raw inside a string), non-finite numbers, wrong types, missing fields, truncated JSON, invalid UTF-8,
non-objects, nesting deep enough to exhaust the parser, and payloads just over the 16 KB event limit and just under
and just over Kafka's 1 MiB message limit. Each must reach the DLQ exactly once (counted by the DLQ topic's end
offsets and by the source positions in the DLQ headers), every valid event must be applied once, and the consumer
must go through without a retry, within a bounded time.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from persona.events import Event
from persona.models import ModelProvider
from persona.store import Store
from streaming.broker import EmbeddedBroker
from streaming.consumer import EventConsumer
from streaming.kafka_io import DLQ_HEADER_SOURCE_OFFSET, DLQ_HEADER_SOURCE_PARTITION, make_producer
from tests.test_consumer import assert_state_matches_in_process, consumer_config, read_dlq
from tests.test_consumer_faults import dlq_size
from tests.test_ingest import make_events

pytestmark = [pytest.mark.fault, pytest.mark.slow]

MALFORMED = 10_000
VALID = 2_000
#: Kafka's default message limit (``max.request.size`` / ``message.max.bytes``, 1 MiB).
KAFKA_LIMIT = 1 << 20
EVENT_LIMIT = 16_384


def _event(rng: random.Random, **fields: object) -> bytes:
    d: dict[str, object] = {"event_id": f"m-{rng.getrandbits(48):x}", "session_id": "s-m", "item_id": "1", "ts": 1e9}
    d.update(fields)
    return json.dumps(d, allow_nan=True).encode()


def _kinds() -> list[Callable[[random.Random], bytes]]:
    """One generator per kind of malformed message (each returns the raw bytes of one message)."""
    valid = b'{"event_id":"x","session_id":"s","item_id":"1","ts":1000000000}'
    return [
        lambda r: _event(r, session_id="s-\ud800"),  # escaped lone surrogate
        lambda r: _event(r, item_id="\udfff"),
        lambda r: b'{"event_id":"m-raw","session_id":"s-\xed\xa0\x80","item_id":"1","ts":1}',  # raw surrogate
        lambda r: _event(r, event_id="nul\u0000"),  # escaped NUL
        lambda r: b'{"event_id":"m-rawnul","session_id":"a\x00b","item_id":"1","ts":1}',  # raw NUL in a string
        lambda r: _event(r, ts=float("nan")),
        lambda r: _event(r, ts=float("inf")),
        lambda r: _event(r, ts=float("-inf")),
        lambda r: _event(r).replace(b"1000000000.0", b"1e999"),  # overflows to infinity
        lambda r: _event(r, event_id=r.randrange(10**6)),  # wrong types
        lambda r: _event(r, ts="next tuesday"),
        lambda r: _event(r, item_id=[1, 2]),
        lambda r: _event(r, session_id={"a": 1}),
        lambda r: _event(r, ts=True),
        lambda r: _event(r, type=5),
        lambda r: _event(r, extra={"deep": ["\udc00"]}),  # a lone surrogate in an attribute
        lambda r: _event(r, **{"key-\ud83d": 1}),  # and in an attribute's name
        lambda r: json.dumps({"event_id": "m-missing", "ts": 1}).encode(),
        lambda r: valid[: r.randrange(1, len(valid) - 1)],  # truncated
        lambda r: b"",
        lambda r: b"\xff\xfe\xfd not utf-8",
        lambda r: r.choice([b"[]", b'"a string"', b"42", b"null", b"true"]),
        lambda r: b"[" * 10_000,  # nested past the parser's recursion limit (within 16 KB)
        lambda r: _event(r, pad="x" * EVENT_LIMIT),  # just over the event limit
    ]


def _big(size: int) -> bytes:
    head = b'{"event_id":"m-big","session_id":"s","item_id":"1","ts":1,"pad":"'
    return head + b"x" * (size - len(head) - 2) + b'"}'


def test_ten_thousand_malformed_messages_each_reach_the_dlq_once_and_every_valid_event_is_applied(
    kafka_broker: EmbeddedBroker, topic: str, tmp_path: Path, tiny_bundle: Path
) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 'malformed.db'}")
    models = ModelProvider(store, model_dir=tiny_bundle)
    online = models.get()
    valid = make_events(online, VALID, sessions=100, prefix=f"{topic}-")
    rng = random.Random(13)
    kinds = _kinds()
    # near Kafka's limit: 1 KiB under and 1 KiB over, 5 of each (the producer here allows bigger requests)
    bad = [_big(KAFKA_LIMIT - 1024), _big(KAFKA_LIMIT + 1024)] * 5
    bad += [kinds[n % len(kinds)](rng) for n in range(MALFORMED - len(bad))]
    rng.shuffle(bad)
    assert all(len(b) <= KAFKA_LIMIT + 2048 for b in bad)

    # interleaved: each valid event keeps its order within its session (keyed by session, like production)
    stream: list[tuple[bytes | None, bytes, bool]] = [(e.session_id.encode(), e.to_json_bytes(), True) for e in valid]
    for raw in bad:
        stream.insert(rng.randrange(len(stream) + 1), (f"junk-{rng.randrange(50)}".encode(), raw, False))
    assert [json.loads(v)["event_id"] for _k, v, ok in stream if ok] == [e.event_id for e in valid]
    producer = make_producer(kafka_broker.bootstrap, max_request_size=4 << 20, batch_size=1 << 20)
    futures = [(producer.send(topic, key=k, value=v), ok) for k, v, ok in stream]
    producer.flush()
    producer.close()
    positions = [(f.get(timeout=30), ok) for f, ok in futures]
    bad_positions = {(m.partition, m.offset) for m, ok in positions if not ok}
    assert len(bad_positions) == MALFORMED

    cfg = consumer_config(kafka_broker.bootstrap, topic, max_events=len(stream), idle_exit_s=60)
    consumer = EventConsumer(store, models, cfg)
    started = time.monotonic()
    stats = consumer.run()
    wall = time.monotonic() - started
    try:
        assert (stats.records, stats.applied, stats.dlq) == (len(stream), VALID, MALFORMED)
        assert stats.retries == 0  # never a failed batch, never a retry loop
        assert wall < 300, f"{wall:.0f}s for {len(stream)} records"
        assert_state_matches_in_process(store, online, [e for e in valid if isinstance(e, Event)])
    finally:
        store.close()

    dlq = f"{topic}.dlq"
    dead = read_dlq(kafka_broker.bootstrap, dlq, MALFORMED)
    assert dlq_size(kafka_broker.bootstrap, dlq) == MALFORMED  # exactly once: the topic holds no more
    sources = Counter(
        (int(dict(r.headers)[DLQ_HEADER_SOURCE_PARTITION]), int(dict(r.headers)[DLQ_HEADER_SOURCE_OFFSET]))
        for r in dead
    )
    assert set(sources) == bad_positions and max(sources.values()) == 1
    reasons = Counter(dict(r.headers)["persona-reject-reason"].decode() for r in dead)
    print(f"{len(stream)} records in {wall:.1f}s; DLQ reasons: {dict(reasons)}")
