"""``persona demo``: the first thing a new user runs (``make demo``).

Trains on MovieLens-100K (or reuses the cached bundle), starts the embedded broker, a consumer and the API
as real processes on a fresh SQLite store, replays the dataset's test period as live traffic (plus a few
malformed events, to show the dead-letter queue), then prints what happened: throughput, online hit-rate of
Persona against the base model, drift signals and API latency, three real sessions with what Persona and the base
model recommended to them, and an HTML report with plots of the run.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Annotated, Any

import typer

log = logging.getLogger("persona.demo")

DEFAULT_BUNDLE = Path("data/bundles/ml-100k")
DEFAULT_WORKDIR = Path("data/demo")
REPORT_DIR = "report"  # under the workdir unless --report says where
TEST_PERIOD = 0.7  # the time-shift protocol's test period starts at 70% of the interactions


def register(app: typer.Typer) -> None:
    """Attach ``demo``, and ``soak`` to the ``bench`` group (created by the streaming or serving commands, or here)."""
    app.command("demo")(demo)
    bench = next((g.typer_instance for g in app.registered_groups if g.name == "bench"), None)
    if bench is None:
        bench = typer.Typer(help="Benchmarks (one machine, one run; results as JSON).", no_args_is_help=True)
        app.add_typer(bench, name="bench")
    bench.command("soak")(soak)


def soak(
    minutes: Annotated[float, typer.Option(min=0.01, help="Length of the soak (after the probe and warm-up).")] = 10.0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results here as JSON.")] = None,
    model: Annotated[
        Path | None, typer.Option("--model", help="Model bundle (default: train a tiny synthetic one).")
    ] = None,
    rank_rps: Annotated[
        float | None, typer.Option(min=0.0, help="Ranking requests/s (default: --fraction of the probed maximum).")
    ] = None,
    events_per_s: Annotated[
        float | None, typer.Option(min=0.0, help="Events/s produced (default: --fraction of the probed maximum).")
    ] = None,
    fraction: Annotated[float, typer.Option(min=0.01, max=1.0, help="Share of the probed maxima to run at.")] = 0.7,
    probe_s: Annotated[float, typer.Option(min=1.0, help="Seconds of the maximum's probe.")] = 20.0,
    warmup_s: Annotated[float, typer.Option(min=0.0, help="Seconds at the target load before RSS is taken.")] = 60.0,
    window_s: Annotated[float, typer.Option(min=1.0, help="Seconds per reported window (p99, RSS, lag).")] = 60.0,
    sessions: Annotated[int, typer.Option(min=1, help="Sessions in the store before the start.")] = 2000,
) -> None:
    """Ranking and ingestion together at 70 % of the probed maximum: errors, p99 per window, RSS per process."""
    import json
    import shlex
    import sys

    from persona_cli.demo import write_json
    from persona_cli.soak import SoakConfig, run_soak

    logging.getLogger("httpx").setLevel(logging.WARNING)
    cfg = SoakConfig(
        minutes=minutes,
        bundle=model,
        rank_rps=rank_rps,
        events_per_s=events_per_s,
        fraction=fraction,
        probe_s=probe_s,
        warmup_s=warmup_s,
        window_s=window_s,
        sessions=sessions,
    )
    report = run_soak(cfg, command="persona " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    if json_out is not None:
        write_json(json_out, report)
    summary = {k: v for k, v in report.items() if k not in ("windows", "machine", "logs_tail")}
    typer.echo(json.dumps(summary, indent=2))


def ensure_bundle(path: Path, dataset: str = "ml-100k", *, retrain: bool = False, progress: bool = True) -> Path:
    """Reuse a valid cached bundle trained on ``dataset``; train one otherwise (minutes on 2 cores)."""
    from recsys.data import load_item_metadata
    from recsys.errors import BundleError, PersonaError
    from recsys.pipeline import DatasetSpec, load_trained, train_bundle

    if path.exists() and not retrain:
        try:
            trained = load_trained(path)
        except BundleError as exc:
            typer.echo(f"cached bundle unusable ({exc}); training a new one")
        else:
            if trained.spec.source != dataset:
                raise PersonaError(
                    f"bundle {path} was trained on {trained.spec.source}, not {dataset}",
                    "pass --retrain, another --bundle, or --dataset " + trained.spec.source,
                )
            typer.echo(f"reusing the trained bundle at {path} (--retrain to train again)")
            if trained.items is None and load_item_metadata(dataset) is not None:
                typer.echo("  it has no item titles (trained before bundles kept them): --retrain to show titles")
            return path
    typer.echo(
        f"training on {dataset} into {path} (first run only: about 20 minutes on an idle 2-core machine, most of it "
        "the base model's up to 100 epochs; later runs reuse the bundle) ..."
    )
    start = time.perf_counter()
    train_bundle(DatasetSpec(source=dataset), path, overwrite=True, progress=progress)
    typer.echo(f"trained in {time.perf_counter() - start:.0f} s")
    return path


MALFORMED = [
    b"{not json",
    b"[1, 2, 3]",
    b'{"event_id": "bad-1", "session_id": "s", "ts": "2026-01-01T00:00:00Z"}',
    b'{"event_id": "bad-2", "session_id": "s", "item_id": "50", "ts": "next tuesday"}',
    b'{"event_id": "bad-3", "session_id": "s", "item_id": "50", "ts": "2999-01-01T00:00:00Z"}',
]


def demo(
    bundle: Annotated[Path, typer.Option(help="Where the demo's model bundle is cached.")] = DEFAULT_BUNDLE,
    workdir: Annotated[Path, typer.Option(help="Store and logs of this run (recreated each run).")] = DEFAULT_WORKDIR,
    retrain: Annotated[bool, typer.Option(help="Train a new bundle even if a cached one is valid.")] = False,
    once: Annotated[bool, typer.Option("--once", help="Exit after the summary instead of serving on.")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the summary as JSON.")] = None,
    report: Annotated[
        Path | None,
        typer.Option(
            help="Write an HTML report with plots (online HR/NDCG@10 of Persona and base over the replay, drift, "
            "prototype mix, throughput, API latency) to DIR/index.html. Default: <workdir>/report."
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Replay at most this many events.")] = None,
    dataset: Annotated[
        str, typer.Option(help="Dataset to replay; must be the one the bundle was trained on.")
    ] = "ml-100k",
    api_port: Annotated[int | None, typer.Option(help="API port (default: a free one).")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Consumer metrics port (default: a free one).")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Train (or reuse) a model, run broker + consumer + API, stream the test period, print the results."""
    import httpx

    from persona.net import free_port
    from persona_cli import demo as d
    from persona_cli import demo_sessions
    from recsys.data import load_interactions
    from recsys.online import OnlineModel
    from streaming.broker import EmbeddedBroker
    from streaming.kafka_io import ensure_topics, make_producer
    from streaming.replay import replay

    # `kill`, a closed terminal or a supervisor stop the demo the way Ctrl-C does: everything it started (broker,
    # consumer and API, each in its own process group) is stopped too, not left running
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per probe request is noise here
    logging.getLogger("kafka").setLevel(logging.ERROR)  # the replay producer's event-loop timing warnings
    ensure_bundle(bundle, dataset, retrain=retrain, progress=progress)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    api_port = api_port or free_port()
    metrics_port = metrics_port or free_port()
    topic = "persona.events"
    with EmbeddedBroker() as broker:
        env = {
            **os.environ,
            "PERSONA_DATABASE_URL": f"sqlite:///{(workdir / 'persona.db').resolve().as_posix()}",
            "PERSONA_MODEL_DIR": str(bundle.resolve()),
            "PERSONA_KAFKA_BOOTSTRAP": broker.bootstrap,
            "PERSONA_KAFKA_TOPIC": topic,
            "PERSONA_METRICS_PORT": str(metrics_port),
            "PERSONA_API_PORT": str(api_port),
            # the embedded broker joins a group in ~session_timeout/2: keep the demo snappy
            "PERSONA_KAFKA_SESSION_TIMEOUT_MS": "6000",
            "PERSONA_KAFKA_HEARTBEAT_MS": "1000",
            # and it was seen to hold fetches under a steady stream: cap the wait (streaming/bench.py)
            "PERSONA_KAFKA_FETCH_MAX_WAIT_MS": "20",
        }
        ensure_topics(broker.bootstrap, {topic: 4, "persona.events.dlq": 1})
        api_url = f"http://127.0.0.1:{api_port}"
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        with d.running_services(workdir, env) as services:
            consumer = services.start("consumer", "consume")
            api = services.start("api", "serve", "--host", "127.0.0.1", "--port", str(api_port))
            typer.echo("starting consumer and API ...")
            d.wait_http(metrics_url, consumer)
            d.wait_http(f"{api_url}/readyz", api)
            df = load_interactions(dataset)
            producer = make_producer(broker.bootstrap)
            typer.echo(f"replaying the {dataset} test period into {topic} ...")
            with d.MetricsSampler(metrics_url) as sampler:  # the report's timeline
                stats = replay(df, producer, topic, start_fraction=TEST_PERIOD, limit=limit, progress=progress)
                for raw in MALFORMED:
                    producer.send(topic, key=b"demo-malformed", value=raw)
                producer.flush()
                producer.close()
                sent = stats.sent + len(MALFORMED)
                start = time.perf_counter()
                done = _wait_consumed(metrics_url, sent, consumer, progress=progress)
                elapsed = stats.seconds + (time.perf_counter() - start)
            samples = d.scrape(metrics_url)
            replayed = demo_sessions.replayed_frame(df, TEST_PERIOD, limit)
            sessions = replayed["user_id"].unique(maintain_order=True).head(200).to_list()
            latency = d.latency_probe(api_url, sessions)
            times_ms = latency.pop("times_ms")
            online = OnlineModel.load(bundle)
            with httpx.Client(base_url=api_url, timeout=30.0) as client:
                examples = demo_sessions.session_examples(client, online, replayed)
            summary = _summary(samples, done, sent, elapsed, latency, api_url, metrics_url)
            summary["dataset"] = dataset
            summary["sessions"] = [_session_json(ex) for ex in examples]
            lines = demo_sessions.format_sessions(examples, demo_sessions.item_labels(online))
            _print_summary(summary)
            typer.echo("\n".join(lines))
            index = _write_report(report or workdir / REPORT_DIR, summary, sampler.samples, times_ms, lines)
            typer.echo(f"\nreport: {index}")
            if json_out:
                d.write_json(json_out, summary)
                typer.echo(f"wrote {json_out}")
            if not once:
                typer.echo(f"\nserving on: API {api_url}/docs · consumer metrics {metrics_url} · Ctrl-C stops all")
                try:
                    while consumer.alive() and api.alive():
                        time.sleep(1)
                except KeyboardInterrupt:
                    pass
    typer.echo("stopped broker, consumer and API")


def _session_json(ex: Any) -> dict[str, Any]:
    from persona_cli.demo_sessions import LAST, TOP

    return {
        "session_id": ex.session_id,
        "last_items": ex.history[-LAST:],
        "next_item": ex.target,
        "persona_top": ex.persona[:TOP],
        "base_top": ex.base[:TOP],
        "persona_rank": ex.rank(ex.persona),
        "base_rank": ex.rank(ex.base),
    }


def _write_report(out: Path, summary: dict[str, Any], timeline: Any, times_ms: list[float], lines: list[str]) -> Path:
    from persona_cli.report import demo_charts, write_report

    title = f"Persona demo: the {summary['dataset']} test period as live traffic"
    return write_report(out, title, demo_charts(timeline, times_ms), dict(_rows(summary)), "\n".join(lines))


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def _processed(samples: dict[Any, float]) -> float:
    from persona_cli import demo as d

    return d.metric_sum(samples, "persona_events_consumed_total") + d.metric_sum(
        samples, "persona_events_invalid_total"
    )


def _wait_consumed(metrics_url: str, sent: int, consumer: Any, *, progress: bool, timeout: float = 600.0) -> int:
    """Poll the consumer's counters until every sent message is accounted for (processed or rejected)."""
    from persona_cli import demo as d
    from recsys.errors import PersonaError

    deadline = time.monotonic() + timeout
    last = -1.0
    while time.monotonic() < deadline:
        if not consumer.alive():
            raise PersonaError(f"the consumer exited:\n{consumer.tail()}")
        done = _processed(d.scrape(metrics_url))
        if done != last and progress:
            typer.echo(f"  consumed {int(done)}/{sent}", err=True)
            last = done
        if done >= sent:
            return int(done)
        time.sleep(1.0)
    raise PersonaError(f"the consumer processed {int(last)} of {sent} events within {timeout:.0f} s")


def _summary(
    samples: dict[Any, float],
    processed: int,
    sent: int,
    seconds: float,
    latency: dict[str, float],
    api_url: str,
    metrics_url: str,
) -> dict[str, Any]:
    from persona_cli import demo as d

    quality = d.online_quality(samples)
    return {
        "events_sent": sent,
        "events_processed": processed,
        "events_per_s": processed / max(seconds, 1e-9),
        "dlq": d.metric_sum(samples, "persona_events_dlq_total"),
        "duplicates": d.metric_sum(samples, "persona_events_duplicate_total"),
        "unknown_items": d.metric_sum(samples, "persona_events_unknown_item_total"),
        "hit_rate_at_10": {v: q["hr@10"] for v, q in quality.items()},
        "ndcg_at_10": {v: q["ndcg@10"] for v, q in quality.items()},
        "predictions": {v: q["predictions"] for v, q in quality.items()},
        "drift": {
            "prototype_mix_psi": d.metric_sum(samples, "persona_drift_psi"),
            "item_popularity_js": d.metric_sum(samples, "persona_drift_js"),
            "ood_score_mean": d.metric_sum(samples, "persona_ood_score_sum")
            / max(d.metric_sum(samples, "persona_ood_score_count"), 1.0),
        },
        "api_latency_ms": latency,
        "urls": {
            "api": api_url,
            "docs": f"{api_url}/docs",
            "api_metrics": f"{api_url}/metrics",
            "consumer_metrics": metrics_url,
        },
    }


def _rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    """The summary as (name, text) rows: the terminal's table and the report's."""
    hr, nd = s["hit_rate_at_10"], s["ndcg_at_10"]
    uplift = nd["persona"] / nd["base"] if nd["base"] else float("nan")
    dr = s["drift"]
    lat = s["api_latency_ms"]
    return [
        ("events processed", f"{s['events_processed']} of {s['events_sent']} ({s['events_per_s']:.0f}/s end to end)"),
        ("dead-letter queue", f"{s['dlq']:.0f} (malformed on purpose), unknown items skipped {s['unknown_items']:.0f}"),
        ("online HR@10", f"Persona {hr['persona']:.4f} · base {hr['base']:.4f}"),
        ("online NDCG@10", f"Persona {nd['persona']:.4f} · base {nd['base']:.4f} · uplift {uplift:.2f}x"),
        (
            "drift",
            f"prototype-mix PSI {dr['prototype_mix_psi']:.3f} · item-popularity JS {dr['item_popularity_js']:.3f} · "
            f"mean OOD score {dr['ood_score_mean']:.2f}",
        ),
        (
            "API ranking latency",
            f"p50 {lat['p50_ms']:.1f} ms · p99 {lat['p99_ms']:.1f} ms ({lat['requests']} requests); "
            f"an unknown session gets the {lat.get('cold_start_fallback')} fallback",
        ),
    ]


def _print_summary(s: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"Persona demo: the {s['dataset']} test period as live traffic", show_header=False)
    for name, text in _rows(s):
        t.add_row(name, text)
    Console().print(t)
