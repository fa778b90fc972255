"""Small Kafka helpers on kafka-python, cluster-agnostic (plain Kafka protocol, nothing broker-specific).

Connection failures become :class:`PersonaError` naming the bootstrap address and the setting to fix,
so the CLI prints one line instead of a client stack trace.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient
from kafka.errors import KafkaError, TopicAlreadyExistsError
from kafka.producer.future import FutureRecordMetadata

from persona.events import Rejection
from recsys.errors import PersonaError

log = logging.getLogger(__name__)

__all__ = [
    "DLQ_HEADER_DETAIL",
    "DLQ_HEADER_ORIGINAL_SHA256",
    "DLQ_HEADER_ORIGINAL_SIZE",
    "DLQ_HEADER_REASON",
    "DLQ_HEADER_SOURCE_OFFSET",
    "DLQ_HEADER_SOURCE_PARTITION",
    "DLQ_HEADER_SOURCE_TOPIC",
    "DLQ_HEADER_TRUNCATED",
    "DLQ_MAX_KEY_BYTES",
    "DLQ_MAX_VALUE_BYTES",
    "DLQ_SCAN_LIMIT",
    "dead_lettered_since",
    "dlq_send",
    "ensure_topics",
    "kafka_unreachable",
    "make_consumer",
    "make_producer",
]

DLQ_HEADER_REASON = "persona-reject-reason"
DLQ_HEADER_DETAIL = "persona-reject-detail"
DLQ_HEADER_SOURCE_TOPIC = "persona-source-topic"
DLQ_HEADER_SOURCE_PARTITION = "persona-source-partition"
DLQ_HEADER_SOURCE_OFFSET = "persona-source-offset"
DLQ_HEADER_ORIGINAL_SIZE = "persona-original-size"
DLQ_HEADER_ORIGINAL_SHA256 = "persona-original-sha256"
DLQ_HEADER_TRUNCATED = "persona-truncated"
#: A dead-lettered payload keeps at most its first this many bytes (4x the 16 KB event limit, far below the 1 MB
#: a Kafka request and a topic accept by default): the DLQ producer must never be refused a record, or the batch
#: holding it would be retried forever.
DLQ_MAX_VALUE_BYTES = 64 * 1024
#: Keys are session ids (at most 128 characters when valid); a longer one is cut like the payload.
DLQ_MAX_KEY_BYTES = 1024

# How long a client waits for the first broker before we call the cluster unreachable.
BOOTSTRAP_TIMEOUT_MS = 10_000


def kafka_unreachable(bootstrap: str, exc: BaseException | None = None) -> PersonaError:
    """The one error every Kafka entry point raises when the cluster cannot be reached."""
    cause = f" ({exc})" if exc is not None else ""
    return PersonaError(
        f"cannot reach Kafka at {bootstrap}{cause}",
        "set PERSONA_KAFKA_BOOTSTRAP (or kafka_bootstrap in the config file), or start a dev broker with "
        "`persona broker`",
    )


def ensure_topics(
    bootstrap: str, topics: dict[str, int], replication: int = 1, *, timeout_ms: int = 10_000
) -> list[str]:
    """Create each missing topic with its partition count; return the names actually created.

    Idempotent and race-safe: a topic that exists (or that another process creates meanwhile) is fine.
    An existing topic is never altered; if it has fewer partitions than asked, we log a warning.
    """
    try:
        admin = KafkaAdminClient(
            bootstrap_servers=bootstrap, client_id="persona-admin", bootstrap_timeout_ms=BOOTSTRAP_TIMEOUT_MS
        )
    except KafkaError as exc:
        raise kafka_unreachable(bootstrap, exc) from exc
    created: list[str] = []
    try:
        existing = {t["name"]: t for t in admin.describe_topics(list(topics))} if topics else {}
        missing = {
            name: n for name, n in topics.items() if name not in existing or existing[name].get("error_code", 0) != 0
        }
        for name, wanted in topics.items():
            have = len(existing.get(name, {}).get("partitions") or [])
            if name not in missing and have < wanted:
                log.warning("topic %s has %d partitions, fewer than the %d configured", name, have, wanted)
        for name, partitions in missing.items():
            try:
                admin.create_topics(
                    {name: {"num_partitions": partitions, "replication_factor": replication}},
                    timeout_ms=timeout_ms,
                )
                created.append(name)
            except TopicAlreadyExistsError:
                log.debug("topic %s was created concurrently", name)
        if missing:
            admin.wait_for_topics(list(missing), timeout_ms=timeout_ms)
    except KafkaError as exc:
        raise PersonaError(
            f"could not create Kafka topics {sorted(topics)} on {bootstrap}: {type(exc).__name__}: {exc}",
            "check PERSONA_KAFKA_BOOTSTRAP and that the cluster allows topic creation",
        ) from exc
    finally:
        admin.close()
    if created:
        log.info("created Kafka topics %s", ", ".join(created))
    return created


def make_producer(bootstrap: str, **overrides: Any) -> KafkaProducer:
    """A producer for keyed byte messages: acks=all, idempotent, 10 ms linger and big batches (throughput)."""
    config: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "client_id": "persona-producer",
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": 10,
        "batch_size": 256 * 1024,
        "bootstrap_timeout_ms": BOOTSTRAP_TIMEOUT_MS,
        "max_block_ms": 30_000,
    }
    config.update(overrides)
    try:
        return KafkaProducer(**config)
    except KafkaError as exc:
        raise kafka_unreachable(bootstrap, exc) from exc


def make_consumer(
    bootstrap: str,
    group: str | None,
    topics: list[str] | tuple[str, ...],
    *,
    session_timeout_ms: int = 45_000,
    heartbeat_interval_ms: int = 3_000,
    max_poll_records: int = 500,
    **overrides: Any,
) -> KafkaConsumer:
    """A group consumer with manual commits (offsets are committed after the store transaction).

    Tests pass ``session_timeout_ms=2000, heartbeat_interval_ms=500``: the first group join takes about
    half the session timeout.
    """
    config: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "group_id": group,
        "client_id": f"persona-consumer-{group}",
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "session_timeout_ms": session_timeout_ms,
        "heartbeat_interval_ms": heartbeat_interval_ms,
        "max_poll_records": max_poll_records,
        "bootstrap_timeout_ms": BOOTSTRAP_TIMEOUT_MS,
    }
    config.update(overrides)
    try:
        consumer = KafkaConsumer(**config)
        if topics:
            consumer.subscribe(list(topics))
    except KafkaError as exc:
        raise kafka_unreachable(bootstrap, exc) from exc
    return consumer


def dlq_send(
    producer: KafkaProducer,
    dlq_topic: str,
    raw: bytes,
    key: bytes | None,
    rejection: Rejection,
    source_topic: str,
    partition: int,
    offset: int,
    dlq_partition: int | None = None,
) -> FutureRecordMetadata:
    """Publish a rejected message (same key, original bytes) with the reason in headers.

    Keeping the exact bytes lets an operator fix and re-publish; headers make the DLQ greppable without
    parsing the payload (which may not be JSON at all). A payload over :data:`DLQ_MAX_VALUE_BYTES` (a key over
    :data:`DLQ_MAX_KEY_BYTES`) is cut to its head, and the headers say so and keep the original size and sha256:
    the DLQ record stays within what the topic accepts, so a huge message cannot wedge the batch it came in.
    ``dlq_partition`` pins the DLQ partition (the consumer puts every dead letter of a source partition in one, so
    that :func:`dead_lettered_since` finds them after a restart).
    """
    headers = [
        (DLQ_HEADER_REASON, str(rejection.reason).encode()),
        (DLQ_HEADER_DETAIL, rejection.detail.encode("utf-8", "replace")[:1024]),
        (DLQ_HEADER_SOURCE_TOPIC, source_topic.encode()),
        (DLQ_HEADER_SOURCE_PARTITION, str(partition).encode()),
        (DLQ_HEADER_SOURCE_OFFSET, str(offset).encode()),
    ]
    if len(raw) > DLQ_MAX_VALUE_BYTES or (key is not None and len(key) > DLQ_MAX_KEY_BYTES):
        headers += [
            (DLQ_HEADER_TRUNCATED, b"true"),
            (DLQ_HEADER_ORIGINAL_SIZE, str(len(raw)).encode()),
            (DLQ_HEADER_ORIGINAL_SHA256, hashlib.sha256(raw).hexdigest().encode()),
        ]
        raw = raw[:DLQ_MAX_VALUE_BYTES]
        key = key[:DLQ_MAX_KEY_BYTES] if key is not None else None
    return producer.send(
        dlq_topic, value=raw, key=key, headers=headers, partition=dlq_partition, timestamp_ms=int(time.time() * 1000)
    )


#: How far back :func:`dead_lettered_since` reads a DLQ partition at most (records): past it, a record may be
#: dead-lettered again after a crash (at-least-once), never lost.
DLQ_SCAN_LIMIT = 50_000


def dead_lettered_since(
    reader: KafkaConsumer,
    dlq_topic: str,
    dlq_partition: int,
    source_topic: str,
    source_partition: int,
    since: int,
    *,
    limit: int = DLQ_SCAN_LIMIT,
) -> set[int]:
    """Source offsets ``>= since`` of ``source_topic[source_partition]`` already in DLQ partition ``dlq_partition``.

    Why: a consumer killed between its DLQ flush and its offset commit replays those records; what it (or another
    member) sent before is found here and not sent again. Reads the DLQ partition backwards from its end, in
    doubling chunks, until a dead letter of that source partition older than ``since`` (they are appended in source
    order) or the partition's start, at most ``limit`` records. ``reader`` is a consumer without a group.
    """
    tp = TopicPartition(dlq_topic, dlq_partition)
    reader.assign([tp])
    # tansu (the development broker) answers the end offset of the last record batch's base: read past it to the end
    high = reader.end_offsets([tp])[tp]
    found: set[int] = set()
    lo, step, upper = high, 256, None
    source = (source_topic.encode(), str(source_partition).encode())
    while lo > 0 and high - lo < limit:
        start = max(0, lo - step)
        reader.seek(tp, start)
        older = False
        empty = 0
        while empty < 2:
            records = reader.poll(timeout_ms=200).get(tp, [])
            empty = 0 if records else empty + 1
            for r in records:
                if upper is not None and r.offset >= upper:
                    empty = 2
                    break
                headers = dict(r.headers or [])
                if (headers.get(DLQ_HEADER_SOURCE_TOPIC), headers.get(DLQ_HEADER_SOURCE_PARTITION)) != source:
                    continue
                offset = int(headers[DLQ_HEADER_SOURCE_OFFSET])
                if offset >= since:
                    found.add(offset)
                else:
                    older = True
        if older:
            break
        lo, upper, step = start, start, step * 2
    return found
