"""``persona broker`` (embedded dev broker) and ``persona replay`` (dataset -> Kafka as live traffic)."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Annotated

import typer

from recsys.errors import PersonaError


def register(app: typer.Typer) -> None:
    """Attach the streaming commands to the ``persona`` app."""
    app.command("broker")(broker)
    app.command("replay")(replay)


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
