"""``persona bench ingest``: how fast one consumer process turns Kafka messages into stored state.

One run, one machine, the embedded broker, four measurements on the same kind of traffic:

- ``raw_events_per_s``: the ceiling — kafka-python consuming the messages and ``json.loads`` on each,
  nothing else;
- ``sqlite_events_per_s`` / ``postgres_events_per_s``: the full pipeline (:class:`EventConsumer`: parse,
  dedup, prequential check, codes, prototypes, one store transaction per poll batch, offset commits);
- ``freshness_p50_s`` / ``freshness_p99_s``: event timestamp → session state committed, while a separate
  producer process sends at half the measured SQLite maximum (a loaded but not saturated consumer).

Rates count from the first non-empty poll to the end of the last batch, so the group join (≈ half the
session timeout) is not charged to the pipeline. Traffic: ``sessions`` sessions (default events / 50, so
histories grow to the model's ``max_len`` as in a real stream), items drawn uniformly from the model's
vocabulary, every event valid and new.
"""

from __future__ import annotations

import gc
import json
import logging
import multiprocessing as mp
import os
import platform
import random
import statistics
import tempfile
import threading
import time
import uuid
import zlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from persona.store.engine import temporary_database
from recsys.errors import PersonaError

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_POSTGRES_URL", "run_ingest_bench", "train_tiny_bundle"]

DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
TINY_SOURCE = "synthetic:users=200,items=100,events=6000"
#: Test-speed group timeouts (the first join takes about half the session timeout).
FAST_GROUP: dict[str, int] = {"session_timeout_ms": 2000, "heartbeat_interval_ms": 500}
#: Measured with the embedded broker and a paced producer: fetches sent while records stream in were at times
#: answered only after ~170 ms, with 500 records at once (Kafka answers once ``fetch_min_bytes`` are there), which
#: alone put the freshness p50 at ~180 ms at 2,000 events/s; capped at 20 ms it was ~50 ms. The benchmark caps the
#: broker's wait so that it measures the pipeline, not this broker.
FETCH_MAX_WAIT_MS = 20


def train_tiny_bundle(out: Path) -> Path:
    """Train the tiny synthetic bundle (dim 16, 4 prototypes; seconds) into ``out``; tests use it too."""
    from recsys.pipeline import DatasetSpec, train_bundle
    from recsys.train import TrainConfig

    train_bundle(
        DatasetSpec(source=TINY_SOURCE, min_user=2, min_item=2),
        out,
        model_overrides={"dim": 16, "code_dim": 8, "max_len": 20},
        tc=TrainConfig(
            epochs=1,
            adapter_epochs=1,
            proto_rounds=1,
            proto_epochs=1,
            k_candidates=(4,),
            fine_group_counts=(8,),
            history_group_counts=(8,),
        ),
        progress=False,
    )
    return out


def _messages(n: int, items: list[str], sessions: int, seed: int) -> list[tuple[bytes, bytes, bytes]]:
    """Valid, unique events as (key, JSON before ``ts``, JSON after it): the sender puts the send time in between.

    Built before sending, so that the load generator, which shares the machine with the consumer, spends its
    time sending rather than formatting.
    """
    rng = random.Random(seed)
    run = uuid.uuid4().hex[:8]
    out = []
    for i in range(n):
        sid = f"bench-{rng.randrange(sessions)}"
        body = {"event_id": f"{run}-{i}", "session_id": sid, "item_id": items[rng.randrange(len(items))]}
        head = json.dumps({**body, "type": "click"}, separators=(",", ":"))[:-1] + ',"ts":"'
        out.append((sid.encode(), head.encode(), b'Z"}'))
    return out


def _produce(
    bootstrap: str,
    topic: str,
    n: int,
    items: list[str],
    sessions: int,
    rate: float | None,
    seed: int,
    partitions: int = 4,
    report: Any = None,
) -> None:
    """Send ``n`` events, paced at ``rate``/s when given (runs in a child process for the freshness run).

    Partitions are picked here by a CRC of the key (kafka-python's own partitioner is pure-Python murmur2): same
    guarantee, every session's events in one partition, in order, for less of the shared CPU.
    """
    from streaming.kafka_io import make_producer

    messages = _messages(n, items, sessions, seed)
    producer = make_producer(bootstrap, linger_ms=5 if rate else 20)
    started = time.time()
    t0 = time.monotonic()
    for i, (key, head, tail) in enumerate(messages):
        if rate:
            delay = t0 + i / rate - time.monotonic()
            if delay > 0.0005:
                time.sleep(delay)
        ts = datetime.now(UTC).isoformat()[:-6].encode()  # without "+00:00": the tail ends it with "Z"
        producer.send(topic, key=key, value=head + ts + tail, partition=zlib.crc32(key) % partitions)
    producer.flush()
    if report is not None:  # the send window, for the freshness run's achieved rate and CPU accounting
        report.put((started, time.time()))
    producer.close(timeout=10)


class _CpuSampler:
    """CPU time of the freshness run's processes (consumer, its model process, producer, broker), read from /proc
    every 0.1 s, so the run can say how much of the machine each took while the producer sent: on a small
    machine the load generator and the broker share the cores with the consumer being measured. Linux only;
    elsewhere it reports nothing."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.samples: list[tuple[float, dict[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-cpu", daemon=True)
        self._hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            ticks: dict[str, int] = {}
            for role, pid in list(self.pids.items()):
                try:
                    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                except (OSError, IndexError):
                    continue
                ticks[role] = int(fields[11]) + int(fields[12])  # utime + stime
            self.samples.append((time.time(), ticks))
            if self._stop.wait(0.1):
                return

    def cores(self, start: float, end: float) -> dict[str, float]:
        """Average cores each process used between the samples closest inside ``[start, end]``."""
        inside = [s for s in self.samples if start <= s[0] <= end]
        if len(inside) < 2:
            return {}
        (t0, a), (t1, b) = inside[0], inside[-1]
        return {role: round((b[role] - a[role]) / self._hz / (t1 - t0), 2) for role in b if role in a}


def _raw_rate(bootstrap: str, topic: str, n: int) -> float:
    """kafka-python consume + ``json.loads`` of ``n`` messages: messages per second after the first poll."""
    from streaming.kafka_io import make_consumer

    consumer = make_consumer(bootstrap, f"bench-raw-{uuid.uuid4().hex[:8]}", [topic], **FAST_GROUP)
    seen = 0
    t0: float | None = None
    deadline = time.monotonic() + 120
    try:
        while seen < n and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500, max_records=500).values():
                if t0 is None:
                    t0 = time.monotonic()
                for rec in batch:
                    json.loads(rec.value)
                seen += len(batch)
        elapsed = time.monotonic() - (t0 or time.monotonic())
    finally:
        consumer.close(autocommit=False)
    if seen < n:
        raise PersonaError(f"raw consumer read only {seen} of {n} messages within 120 s")
    return seen / elapsed if elapsed > 0 else 0.0


def _pipeline(
    bootstrap: str,
    topic: str,
    url: str,
    model: Path,
    max_events: int,
    *,
    keep_freshness: bool = False,
    ready: threading.Event | None = None,
    idle_exit_s: float | None = None,
    compute_threads: int = 1,
    pids: dict[str, int] | None = None,
) -> Any:
    """Run one :class:`EventConsumer` over ``topic`` into the store at ``url``; returns its stats."""
    from persona.models import ModelProvider
    from persona.settings import load_settings
    from persona.store import Store
    from streaming.consumer import ConsumerConfig, EventConsumer

    settings = load_settings()
    store = Store.open(url)
    try:
        models = ModelProvider(store, model_dir=model)
        cfg = ConsumerConfig(
            bootstrap=bootstrap,
            topic=topic,
            dlq_topic=f"{topic}.dlq",
            group=f"bench-{uuid.uuid4().hex[:8]}",
            max_events=max_events,
            idle_exit_s=idle_exit_s,
            session_timeout_ms=FAST_GROUP["session_timeout_ms"],
            heartbeat_interval_ms=FAST_GROUP["heartbeat_interval_ms"],
            compute_threads=compute_threads,
            session_cache=settings.session_cache,
            max_batch_events=settings.consumer_max_batch,
            model_process=settings.consumer_model_process,
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
        )
        consumer = EventConsumer(store, models, cfg)
        # A warm model process, as a long-running consumer has: its start (~3 s here) would otherwise be charged to
        # the first batches, like the group join that the rates leave out.
        consumer.ingestor.warm()
        worker = consumer.ingestor.model_worker
        if pids is not None and worker is not None and worker.pid is not None:
            pids["model_process"] = worker.pid
        gc.collect()
        gc.freeze()  # as `persona consume` does (see _quiet_long_running_process there)
        consumer.stats.keep_freshness = keep_freshness
        if ready is not None:
            threading.Thread(target=lambda: ready.set() if consumer.assigned.wait(60) else None, daemon=True).start()
        stats = consumer.run()
    finally:
        store.close()
    if stats.records < max_events:
        raise PersonaError(f"the pipeline processed only {stats.records} of {max_events} events")
    return stats


def run_ingest_bench(
    events: int,
    *,
    model: Path | None = None,
    postgres_url: str | None = None,
    sessions: int | None = None,
    compute_threads: int | None = None,
) -> dict[str, Any]:
    """Run the four measurements (see the module docstring) and return them as a JSON-able dict.

    ``compute_threads`` defaults to what ``persona consume`` uses (``PERSONA_CONSUMER_THREADS``).
    """
    import torch

    from persona.settings import load_settings
    from recsys.online import OnlineModel
    from streaming.broker import EmbeddedBroker
    from streaming.kafka_io import ensure_topics

    torch.set_num_threads(1)  # what `persona consume` does: one intra-op thread per torch call
    settings = load_settings()
    threads = compute_threads or settings.consumer_threads
    logging.getLogger("kafka").setLevel(logging.WARNING)
    n_sessions = sessions or max(20, events // 50)
    with tempfile.TemporaryDirectory(prefix="persona-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        bundle = model if model is not None else train_tiny_bundle(tmp / "model")
        online = OnlineModel.load(bundle)
        items = list(online.vocab.ids)
        results: dict[str, Any] = {
            "events": events,
            "sessions": n_sessions,
            "model_version": online.version,
            "model": str(bundle),
            "model_config": {k: getattr(online.cfg, k) for k in ("n_items", "dim", "max_len", "n_prototypes")},
            "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs, {platform.platform()}",
            "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(),
            "consumer_threads": threads,
            "poll_records": 500,
            "max_batch_events": settings.consumer_max_batch,
            "session_cache": settings.session_cache,
            "model_process": settings.consumer_model_process,
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        }
        del online
        with EmbeddedBroker() as broker:
            topic = f"bench-{uuid.uuid4().hex[:8]}"
            ensure_topics(broker.bootstrap, {topic: 4})
            t0 = time.monotonic()
            _produce(broker.bootstrap, topic, events, items, n_sessions, None, 1)
            results["produce_events_per_s"] = round(events / (time.monotonic() - t0), 1)

            results["raw_events_per_s"] = round(_raw_rate(broker.bootstrap, topic, events), 1)
            log.info("raw ceiling: %.0f events/s", results["raw_events_per_s"])

            sqlite_url = f"sqlite:///{(tmp / 'bench.db').as_posix()}"
            stats = _pipeline(broker.bootstrap, topic, sqlite_url, bundle, events, compute_threads=threads)
            results["sqlite_events_per_s"] = round(stats.rate, 1)
            results["sqlite_batches"] = stats.batches
            log.info("sqlite pipeline: %.0f events/s", stats.rate)

            if postgres_url is not None:
                with temporary_database(postgres_url) as pg_url:
                    stats = _pipeline(broker.bootstrap, topic, pg_url, bundle, events, compute_threads=threads)
                results["postgres_events_per_s"] = round(stats.rate, 1)
                log.info("postgres pipeline: %.0f events/s", stats.rate)
            else:
                results["postgres_events_per_s"] = None

            # Freshness: fresh topic and store, a paced producer in another process, the consumer here.
            rate = max(results["sqlite_events_per_s"] / 2, 1.0)
            n_fresh = int(min(events, max(rate * 10, 1000)))
            fresh_topic = f"bench-fresh-{uuid.uuid4().hex[:8]}"
            ensure_topics(broker.bootstrap, {fresh_topic: 4})
            ready = threading.Event()
            box: dict[str, Any] = {}
            pids: dict[str, int] = {"consumer": os.getpid()}
            if broker.pid is not None:
                pids["broker"] = broker.pid

            def consume() -> None:
                try:
                    box["stats"] = _pipeline(
                        broker.bootstrap,
                        fresh_topic,
                        f"sqlite:///{(tmp / 'fresh.db').as_posix()}",
                        bundle,
                        n_fresh,
                        keep_freshness=True,
                        ready=ready,
                        idle_exit_s=30,
                        compute_threads=threads,
                        pids=pids,
                    )
                except BaseException as exc:  # reported below, in the caller's thread
                    box["error"] = exc

            worker = threading.Thread(target=consume, name="bench-freshness")
            worker.start()
            if not ready.wait(60):
                raise PersonaError("the freshness consumer did not join its group within 60 s")
            ctx = mp.get_context("spawn")
            window = ctx.Queue()
            producer = ctx.Process(
                target=_produce, args=(broker.bootstrap, fresh_topic, n_fresh, items, n_sessions, rate, 2, 4, window)
            )
            producer.start()
            pids["producer"] = producer.pid or 0
            sampler = _CpuSampler(pids)
            sampler.start()
            producer.join()
            worker.join()
            sampler.stop()
            try:
                sent_from, sent_to = window.get(timeout=5)
            except Exception:  # the producer died before reporting: the consumer, short of events, fails below
                sent_from = sent_to = 0.0
            if sent_to > sent_from:
                results["freshness_sent_events_per_s"] = round(n_fresh / (sent_to - sent_from), 1)
                results["freshness_cpu_cores"] = sampler.cores(sent_from, sent_to)
            if "error" in box:
                raise box["error"]
            fresh = sorted(box["stats"].freshness_s)
            results["freshness_rate_events_per_s"] = round(rate, 1)
            results["freshness_events"] = len(fresh)
            results["freshness_p50_s"] = round(statistics.median(fresh), 4)
            results["freshness_p99_s"] = round(fresh[min(len(fresh) - 1, int(0.99 * len(fresh)))], 4)
            results["freshness_max_s"] = round(fresh[-1], 4)
    results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    raw = results["raw_events_per_s"]
    results["targets"] = {
        "sqlite_events_per_s": min(10_000.0, 0.25 * raw),
        "postgres_events_per_s": min(5_000.0, 0.25 * raw),
        "freshness_p99_s": 0.25,
    }
    return results
