"""``persona broker`` (embedded dev broker) and ``persona replay`` (dataset -> Kafka as live traffic)."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from recsys.errors import PersonaError


def register(app: typer.Typer) -> None:
    """Attach the streaming commands to the ``persona`` app."""
    app.command("broker")(broker)
    app.command("replay")(replay)
    app.command("consume")(consume)
    bench_app = typer.Typer(help="Benchmarks (one machine, one run; results as JSON).", no_args_is_help=True)
    bench_app.command("ingest")(bench_ingest)
    app.add_typer(bench_app, name="bench")


def broker(
    port: Annotated[int | None, typer.Option("--port", help="Port to listen on (default: a free one).")] = None,
) -> None:
    """Run an embedded Kafka-compatible broker (tansu, in memory) until Ctrl-C or SIGTERM.

    For development and demos only: topics and offsets live in memory and vanish when it stops.
    """
    from streaming.broker import EmbeddedBroker

    stop = threading.Event()

    def _on_term(_sig: int, _frame: FrameType | None) -> None:
        stop.set()

    previous = signal.signal(signal.SIGTERM, _on_term)
    try:
        with EmbeddedBroker(port=port) as b:
            typer.echo(f"Kafka-compatible broker listening on {b.bootstrap} (in memory; Ctrl-C stops it)")
            typer.echo(f"export PERSONA_KAFKA_BOOTSTRAP={b.bootstrap}")
            while not stop.wait(0.5):
                if not b.running():
                    raise PersonaError(f"the embedded broker exited unexpectedly: {b.output_tail()}")
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    typer.echo("broker stopped", err=True)


def replay(
    dataset: Annotated[str, typer.Option("--dataset", help="Dataset name (e.g. ml-100k) or file path.")] = "ml-100k",
    user_col: Annotated[str | None, typer.Option("--user-col", help="User column in the source file.")] = None,
    item_col: Annotated[str | None, typer.Option("--item-col", help="Item column in the source file.")] = None,
    time_col: Annotated[str | None, typer.Option("--time-col", help="Time column in the source file.")] = None,
    rate: Annotated[float | None, typer.Option("--rate", help="Events per second.")] = None,
    speedup: Annotated[
        float | None,
        typer.Option("--speedup", help="Multiple of the dataset's own pace (gaps capped at 2 s)."),
    ] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=0, help="Send at most N events.")] = None,
    start_fraction: Annotated[
        float,
        typer.Option("--start-fraction", help="Skip the earliest fraction by time (0.7 = the test period)."),
    ] = 0.0,
    topic: Annotated[str | None, typer.Option("--topic", help="Topic (default: PERSONA_KAFKA_TOPIC).")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bar on a TTY.")] = True,
) -> None:
    """Replay a dataset's interactions into Kafka in time order, as if devices were sending them now."""
    if rate is not None and speedup is not None:
        raise PersonaError("choose either --rate or --speedup, not both")
    if not 0.0 <= start_fraction < 1.0:
        raise PersonaError(f"--start-fraction must be in [0, 1), got {start_fraction}")

    from persona.settings import load_settings
    from streaming.kafka_io import ensure_topics, make_producer
    from streaming.replay import replay as run_replay

    try:
        from recsys.data import load_interactions
    except ImportError as exc:
        raise PersonaError(f"the dataset loader is unavailable: {exc}", "reinstall the project") from exc

    settings = load_settings()
    target = topic or settings.kafka_topic
    frame = load_interactions(dataset, user_col=user_col, item_col=item_col, time_col=time_col)
    ensure_topics(settings.kafka_bootstrap, {target: settings.kafka_partitions})
    producer = make_producer(settings.kafka_bootstrap)
    try:
        stats = run_replay(
            frame,
            producer,
            target,
            rate=rate,
            speedup=speedup,
            limit=limit,
            start_fraction=start_fraction,
            progress=progress,
        )
    finally:
        producer.close(timeout=10)
    typer.echo(
        f"replayed {stats.sent} events from {dataset} to {target} at {settings.kafka_bootstrap} "
        f"in {stats.seconds:.1f}s ({stats.rate:.0f} events/s)"
    )


def _quiet_long_running_process() -> None:
    """Settings for a dedicated ingestion process, applied once everything long-lived is loaded.

    ``gc.freeze()`` moves the model, the engine and the imported modules out of the collector's sight:
    a poll batch allocates thousands of short-lived objects, and each full collection would otherwise
    walk the whole heap (measured: a visible share of the batch time). kafka-python narrates every
    connection at INFO; the consumer's own log lines say what matters.
    """
    import gc
    import logging

    gc.collect()
    gc.freeze()
    logging.getLogger("kafka").setLevel(max(logging.getLogger("kafka").getEffectiveLevel(), logging.WARNING))


def consume(
    group: Annotated[str | None, typer.Option("--group", help="Consumer group (default: PERSONA_KAFKA_GROUP).")] = None,
    topic: Annotated[str | None, typer.Option("--topic", help="Topic (default: PERSONA_KAFKA_TOPIC).")] = None,
    max_events: Annotated[
        int | None, typer.Option("--max-events", min=1, help="Stop after N records were processed.")
    ] = None,
    idle_exit: Annotated[
        float | None, typer.Option("--idle-exit", min=0.0, help="Exit after this many seconds without events.")
    ] = None,
    metrics_port: Annotated[
        int | None, typer.Option("--metrics-port", min=0, max=65535, help="Prometheus port (0 = off).")
    ] = None,
    session_timeout_ms: Annotated[int | None, typer.Option("--session-timeout-ms", hidden=True)] = None,
    heartbeat_ms: Annotated[int | None, typer.Option("--heartbeat-ms", hidden=True)] = None,
) -> None:
    """Consume events from Kafka into the store: dedup, prequential hit-rate, edits, prototypes, metrics.

    At-least-once from Kafka, exactly-once effect in the store: offsets are committed only after the store
    transaction of their batch. SIGTERM or Ctrl-C finishes the current batch, commits and exits 0.
    """
    import torch

    from persona import faults
    from persona.models import ModelProvider
    from persona.settings import load_settings
    from persona.store import Store
    from streaming.consumer import ConsumerConfig, EventConsumer
    from streaming.metrics import ConsumerMetrics

    # One intra-op thread per torch call: a consumer runs its batch's model work on PERSONA_CONSUMER_THREADS
    # threads of its own instead (chunks side by side); torch's own threads on top would spin against them
    # (measured ~10x slower on a shared machine). Scale out further with processes, one per partition set.
    torch.set_num_threads(1)
    settings = load_settings()
    faults.armed()  # tests only: a crash point set in the environment is announced (or refused) before anything
    store = Store.open(settings.resolved_database_url)
    models = ModelProvider(store, model_dir=settings.model_dir)
    models.get()  # no model at all is a setup problem: say so now (exit 2) instead of retrying forever
    metrics = ConsumerMetrics()
    port = settings.metrics_port if metrics_port is None else metrics_port
    if port:
        try:
            metrics.serve(port)
        except OSError as exc:
            raise PersonaError(
                f"cannot serve consumer metrics on port {port}: {exc.strerror}",
                "pick another --metrics-port (or PERSONA_METRICS_PORT; 0 = off)",
            ) from exc
    cfg = ConsumerConfig(
        bootstrap=settings.kafka_bootstrap,
        topic=topic or settings.kafka_topic,
        dlq_topic=settings.kafka_dlq_topic,
        group=group or settings.kafka_group,
        partitions=settings.kafka_partitions,
        unknown_item_policy=settings.unknown_item_policy,
        prototype_idle_s=settings.prototype_idle_s,
        session_timeout_ms=session_timeout_ms or settings.kafka_session_timeout_ms,
        heartbeat_interval_ms=heartbeat_ms or settings.kafka_heartbeat_ms,
        fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms,
        max_events=max_events,
        idle_exit_s=idle_exit,
        compute_threads=settings.consumer_threads,
        session_cache=settings.session_cache,
        max_batch_events=settings.consumer_max_batch,
        model_process=settings.consumer_model_process,
    )
    consumer = EventConsumer(store, models, cfg, metrics=metrics)
    _quiet_long_running_process()

    def _on_signal(_sig: int, _frame: FrameType | None) -> None:
        consumer.stop()

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        stats = consumer.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        store.close()
    typer.echo(
        f"consumed {stats.records} records in {stats.seconds:.1f}s ({stats.rate:.0f}/s): applied {stats.applied}, "
        f"duplicates {stats.duplicates}, dead-lettered {stats.dlq}, retried batches {stats.retries}"
    )


def bench_ingest(
    events: Annotated[int, typer.Option("--events", min=100, help="Messages per measurement.")] = 50_000,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results here as JSON.")] = None,
    model: Annotated[
        Path | None, typer.Option("--model", help="Model bundle (default: train a tiny synthetic one).")
    ] = None,
    postgres_url: Annotated[
        str | None,
        typer.Option("--postgres-url", help="PostgreSQL server URL (a temp database is created and dropped)."),
    ] = None,
    skip_postgres: Annotated[bool, typer.Option("--skip-postgres", help="Measure SQLite only.")] = False,
    threads: Annotated[
        int | None,
        typer.Option("--threads", min=1, max=64, help="Consumer compute threads (default: PERSONA_CONSUMER_THREADS)."),
    ] = None,
) -> None:
    """Measure ingestion: raw Kafka ceiling, full pipeline on SQLite and PostgreSQL, freshness at half load."""
    import json

    from streaming.bench import DEFAULT_POSTGRES_URL, run_ingest_bench

    url = postgres_url or os.environ.get("PERSONA_TEST_POSTGRES_URL") or DEFAULT_POSTGRES_URL
    results = run_ingest_bench(
        events, model=model, postgres_url=None if skip_postgres else url, compute_threads=threads
    )
    text = json.dumps(results, indent=2, sort_keys=True)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(text + "\n")
    typer.echo(text)
