"""Replay a dataset into Kafka as a stand-in for live devices.

Each interaction (user_id, item_id, ts) becomes one event keyed by ``session_id = user_id`` and sent in
dataset time order, so one session's events land in one partition, in order. The event's ``ts`` is the
wall-clock send time (this *is* live traffic to the consumer); the dataset time is kept in
``attributes["dataset_ts"]``. ``event_id`` is a short sha256 of (namespace, row index in the input
frame), with the namespace defaulting to a fingerprint of the frame's content: replaying the same data
twice yields the same ids, so the consumer's dedup applies it once.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

import polars as pl
from kafka import KafkaProducer
from kafka.errors import KafkaError

from persona.events import Event
from recsys.errors import PersonaError

log = logging.getLogger(__name__)

__all__ = ["MAX_GAP_S", "ReplayStats", "dataset_fingerprint", "event_id_for", "replay"]

# Under --speedup, one gap between consecutive interactions sleeps at most this long (wall seconds):
# datasets have idle nights and months; a demo should not stall on them.
MAX_GAP_S = 2.0
_FRAME_COLUMNS = ("user_id", "item_id", "ts")
_CHUNK_ROWS = 65_536


@dataclass(frozen=True)
class ReplayStats:
    """What a replay did: events sent (all acknowledged) and wall seconds taken."""

    sent: int
    seconds: float

    @property
    def rate(self) -> float:
        """Achieved events per second."""
        return self.sent / self.seconds if self.seconds > 0 else 0.0


def dataset_fingerprint(df: pl.DataFrame) -> str:
    """Short sha256 of the frame's (user_id, item_id, ts) content, in row order; stable across runs."""
    h = hashlib.sha256()
    cols = df.select(pl.col(c).cast(pl.String) for c in _FRAME_COLUMNS)
    for offset in range(0, cols.height, 1_000_000):
        h.update(cols.slice(offset, 1_000_000).write_csv(include_header=False).encode())
    return h.hexdigest()[:16]


def event_id_for(namespace: str, row: int) -> str:
    """Deterministic event id: 32 hex chars (128 bits) of sha256(namespace:row)."""
    return hashlib.sha256(f"{namespace}:{row}".encode()).hexdigest()[:32]


def _frame_rows(
    df: pl.DataFrame, namespace: str | None, start_fraction: float, limit: int | None
) -> tuple[int, Iterator[tuple[float, Callable[[datetime], Event]]]]:
    missing = [c for c in _FRAME_COLUMNS if c not in df.columns]
    if missing:
        raise PersonaError(
            f"replay needs columns user_id, item_id, ts; missing {', '.join(missing)}",
            "load the data with recsys.data.load_interactions or rename the columns",
        )
    ns = namespace if namespace is not None else dataset_fingerprint(df)
    ordered = (
        df.select(_FRAME_COLUMNS)
        .with_row_index("__row")
        .with_columns(pl.col("ts").cast(pl.Float64))
        .sort(["ts", "__row"])  # ties keep input order, so a user's same-second events stay ordered
    )
    skip = int(ordered.height * start_fraction)
    ordered = ordered.slice(skip, limit)

    def rows() -> Iterator[tuple[float, Callable[[datetime], Event]]]:
        for offset in range(0, ordered.height, _CHUNK_ROWS):
            chunk = ordered.slice(offset, _CHUNK_ROWS)
            for row, user, item, ts in zip(
                chunk["__row"].to_list(),
                chunk["user_id"].cast(pl.String).to_list(),
                chunk["item_id"].cast(pl.String).to_list(),
                chunk["ts"].to_list(),
                strict=True,
            ):
                yield ts, _row_event(event_id_for(ns, row), user, item, ts)

    return ordered.height, rows()


def _row_event(event_id: str, user: str, item: str, dataset_ts: float) -> Callable[[datetime], Event]:
    def make(now: datetime) -> Event:
        return Event(
            event_id=event_id,
            session_id=user,
            item_id=item,
            ts=now,
            user_id=user,
            attributes={"dataset_ts": dataset_ts},
        )

    return make


def _event_rows(events: Iterable[Event]) -> Iterator[tuple[float, Callable[[datetime], Event]]]:
    for e in events:
        yield e.ts.timestamp(), (lambda _now, e=e: e)  # type: ignore[misc]


def replay(
    events: Iterable[Event] | pl.DataFrame,
    producer: KafkaProducer,
    topic: str,
    *,
    rate: float | None = None,
    speedup: float | None = None,
    limit: int | None = None,
    start_fraction: float = 0.0,
    namespace: str | None = None,
    progress: bool = True,
) -> ReplayStats:
    """Send interactions (a frame with user_id, item_id, ts) or ready-made events to ``topic``.

    Args:
        events: a polars frame (``user_id``, ``item_id``, ``ts`` in epoch seconds) or an iterable of
            :class:`Event`, sent unchanged (their own ids and timestamps; pacing uses their ``ts``).
        producer: e.g. :func:`streaming.kafka_io.make_producer`; flushed before returning.
        rate: events per second; ``speedup``: multiple of the dataset's own pace (each gap capped at
            :data:`MAX_GAP_S`); neither: as fast as the producer goes.
        limit: send at most this many events (after ``start_fraction``).
        start_fraction: frames only: skip the earliest fraction of interactions by time (0.7 = replay
            the last 30%, the test period).
        namespace: frames only: event-id namespace; default: :func:`dataset_fingerprint`.
        progress: show a progress bar on stderr when it is a terminal.

    Returns:
        :class:`ReplayStats`. Raises :class:`PersonaError` if any event was not acknowledged.
    """
    if rate is not None and speedup is not None:
        raise PersonaError("choose either --rate or --speedup, not both")
    if rate is not None and rate <= 0:
        raise PersonaError(f"rate must be positive, got {rate}")
    if speedup is not None and speedup <= 0:
        raise PersonaError(f"speedup must be positive, got {speedup}")
    if limit is not None and limit < 0:
        raise PersonaError(f"limit must be >= 0, got {limit}")
    if not 0.0 <= start_fraction < 1.0:
        raise PersonaError(f"start fraction must be in [0, 1), got {start_fraction}")

    total: int | None
    if isinstance(events, pl.DataFrame):
        total, rows = _frame_rows(events, namespace, start_fraction, limit)
    else:
        if start_fraction or namespace is not None:
            raise PersonaError("start_fraction and namespace apply only to a DataFrame of interactions")
        total = len(events) if isinstance(events, Sized) else None
        if total is not None and limit is not None:
            total = min(total, limit)
        rows = _event_rows(events)

    failures: list[BaseException] = []
    bootstrap = ",".join(producer.config.get("bootstrap_servers") or []) or "the configured bootstrap"
    sent = 0
    t0 = time.monotonic()
    schedule = 0.0  # seconds after t0 at which the current event is due
    prev_ds: float | None = None
    with _progress(progress, total) as advance:
        for dataset_t, make in rows:
            if limit is not None and sent >= limit:
                break
            if rate is not None:
                schedule = sent / rate
            elif speedup is not None:
                if prev_ds is not None:
                    schedule += min(max(dataset_t - prev_ds, 0.0) / speedup, MAX_GAP_S)
                prev_ds = dataset_t
            if rate is not None or speedup is not None:
                delay = t0 + schedule - time.monotonic()
                if delay > 0.001:
                    time.sleep(delay)
            event = make(datetime.now(UTC))
            try:
                future = producer.send(topic, key=event.session_id.encode(), value=event.to_json_bytes())
            except KafkaError as exc:
                raise PersonaError(
                    f"cannot send to Kafka topic {topic!r} at {bootstrap} ({exc})",
                    "check PERSONA_KAFKA_BOOTSTRAP and that the broker is up",
                ) from exc
            future.add_errback(failures.append)
            sent += 1
            if sent % 1000 == 0:
                advance(1000)
        advance(sent % 1000)
        try:
            producer.flush()
        except KafkaError as exc:
            raise PersonaError(f"flushing the replay to {topic!r} at {bootstrap} failed ({exc})") from exc
    seconds = time.monotonic() - t0
    if failures:
        raise PersonaError(
            f"{len(failures)} of {sent} replayed events were not delivered to {topic!r}: {failures[0]}",
            "check the broker; re-running the replay is safe (event ids are deterministic)",
        )
    log.info("replayed %d events to %s in %.1fs (%.0f/s)", sent, topic, seconds, sent / max(seconds, 1e-9))
    return ReplayStats(sent=sent, seconds=seconds)


@contextmanager
def _progress(enabled: bool, total: int | None) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``: a rich progress bar on stderr, or a no-op when disabled or not a terminal."""
    if not (enabled and sys.stderr.isatty()):
        yield lambda _n: None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True)) as bar:
        task = bar.add_task("replay", total=total)
        yield lambda n: bar.advance(task, n)
