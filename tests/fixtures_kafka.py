"""Kafka fixtures: one embedded tansu broker per test session, a fresh topic per test.

Consumers in tests must pass ``session_timeout_ms=2000, heartbeat_interval_ms=500`` (see
:data:`FAST_GROUP`): the first group join takes about half the session timeout.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from streaming.broker import EmbeddedBroker
from streaming.kafka_io import ensure_topics

FAST_GROUP: dict[str, Any] = {"session_timeout_ms": 2000, "heartbeat_interval_ms": 500}
TOPIC_PARTITIONS = 4


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[EmbeddedBroker]:
    """A running broker; ``kafka_broker.bootstrap`` is its address."""
    with EmbeddedBroker() as broker:
        yield broker


@pytest.fixture
def topic(kafka_broker: EmbeddedBroker) -> str:
    """A fresh topic (4 partitions) that no other test uses."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    ensure_topics(kafka_broker.bootstrap, {name: TOPIC_PARTITIONS})
    return name
