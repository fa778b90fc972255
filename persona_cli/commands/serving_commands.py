"""``persona serve`` (the API under uvicorn) and ``persona bench rank`` (its throughput and latency)."""

from __future__ import annotations

import json
import shlex
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from recsys.errors import PersonaError


def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (default: PERSONA_API_HOST).")] = None,
    port: Annotated[int | None, typer.Option(min=1, max=65535, help="Port (default: PERSONA_API_PORT).")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes (each loads the model).")] = 1,
) -> None:
    """Serve the API; the active registry version is served and hot-swapped when another is activated.

    The store and the model (PERSONA_MODEL_DIR, or the registry's active version) are checked before the server
    starts: a problem is one line and exit code 2. SIGTERM or Ctrl-C finish the requests in flight and exit 0.
    """
    import uvicorn

    from persona.settings import load_settings

    settings = load_settings()
    _preflight(settings)
    # uvicorn restores the handlers it found and raises the signal it stopped on again once it has shut down; with
    # these in place that is a no-op instead of a death by SIGTERM (-15): a requested stop is a clean exit.
    stops: list[int] = []
    previous = {sig: signal.signal(sig, lambda s, _f: stops.append(s)) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        uvicorn.run(
            "serving.app:create_server_app",
            factory=True,
            host=host or settings.api_host,
            port=port or settings.api_port,
            workers=workers,
            log_level=settings.log_level.lower(),
            access_log=False,
        )
    except SystemExit as exc:
        if exc.code not in (None, 0):  # uvicorn's "startup failed" (3): the reason is in the log just above
            raise PersonaError(
                "the API failed to start (see the log above)", "check PERSONA_API_HOST/PERSONA_API_PORT"
            ) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _preflight(settings: Any) -> None:
    """Open the store and load the model as the server will, so that a bad URL, an unreachable database or a broken
    bundle is one line (:class:`PersonaError`, exit 2) here instead of a traceback from every worker. No active
    model is fine: the API starts not ready (``/readyz`` 503) until one is activated."""
    from persona.models import ModelProvider
    from persona.store import Store

    store = Store.open(settings.resolved_database_url)
    try:
        ModelProvider(store, model_dir=settings.model_dir)
    finally:
        store.close()


def bench_rank(
    model: Annotated[Path, typer.Option("--model", help="Trained bundle to serve (e.g. ML-100K).")],
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results here as JSON.")] = None,
    sessions: Annotated[int, typer.Option(min=1, help="Sessions pre-populated in the store.")] = 5000,
    requests: Annotated[int, typer.Option(min=10, help="Requests per measurement.")] = 4000,
    max_seconds: Annotated[float, typer.Option(min=1, help="Upper bound on each measurement.")] = 20.0,
    concurrency: Annotated[str, typer.Option(help="Client concurrencies, comma separated.")] = "4,16",
    large_items: Annotated[int, typer.Option(min=0, help="Items of the large-catalogue run (0 = skip).")] = 1_000_000,
) -> None:
    """Start the API on loopback over a populated SQLite store and measure ranking vs /healthz."""
    from serving.bench import bench_rank as run
    from serving.bench import write_report

    try:
        levels = tuple(int(c) for c in concurrency.split(",") if c.strip())
    except ValueError:
        raise PersonaError(f"--concurrency {concurrency!r} is not a comma-separated list of integers") from None
    if not levels or min(levels) < 1:
        raise PersonaError("--concurrency needs at least one level >= 1")
    command = "persona " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    report = run(
        model,
        sessions=sessions,
        requests=requests,
        max_seconds=max_seconds,
        concurrencies=levels,
        large_items=large_items,
        command=command,
    )
    if json_out is not None:
        write_report(report, json_out)
    summary = {k: v for k, v in report.items() if k not in ("main", "large", "machine")}
    typer.echo(json.dumps(summary, indent=2))


def register(app: typer.Typer) -> None:
    """Attach ``serve``; add ``rank`` to the ``bench`` group (created by the streaming commands, or here)."""
    app.command("serve")(serve)
    bench = next((g.typer_instance for g in app.registered_groups if g.name == "bench"), None)
    if bench is None:
        bench = typer.Typer(help="Benchmarks (one machine, one run; results as JSON).", no_args_is_help=True)
        app.add_typer(bench, name="bench")
    bench.command("rank")(bench_rank)
