"""``persona bench soak``: ranking and ingestion together, for minutes, at 70 % of what the machine sustains.

What runs (the demo's composition: real processes, each in its own process group): the embedded broker, one
``persona consume`` and one ``persona serve`` on a fresh SQLite store holding ``sessions`` sessions of the bundle.

1. **Probe** (unless both rates are given): for ``probe_s`` seconds, ranking requests from ``concurrency`` closed-loop
   clients while the consumer drains a backlog produced beforehand. The two rates reached *together* are the
   maximum of this mix on this machine.
2. **Warm-up**: ``warmup_s`` seconds at the target rates (``fraction`` of the maxima); RSS of every process at its
   end is the start figure (caches and pools have filled by then).
3. **Soak**: ``minutes`` at the target rates, open loop (a request is sent when it is due, whether or not earlier
   ones were answered, so a slow server shows as latency, not as a lower rate), in windows of ``window_s``
   seconds: requests, errors, p50/p99, events produced and consumed, consumer lag, RSS per process.
4. **Drain**: the load stops; every produced event must be consumed within ``drain_s`` (else: lost, an error).

Errors: a ranking answer other than 200 (or none), an event the producer could not send, a DLQ record, an event
not consumed after the drain, a process that died. Targets (issue 13): 0 errors, RSS growth < 10 % after warm-up.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from persona_cli import demo as d
from recsys.errors import PersonaError

log = logging.getLogger("persona.soak")

TOPIC = "persona.soak"
RSS_GROWTH_TARGET = 0.10


@dataclass
class SoakConfig:
    """What ``persona bench soak`` was asked for (see the module docstring)."""

    minutes: float = 10.0
    bundle: Path | None = None
    rank_rps: float | None = None
    events_per_s: float | None = None
    fraction: float = 0.7
    probe_s: float = 20.0
    warmup_s: float = 60.0
    window_s: float = 60.0
    drain_s: float = 120.0
    sessions: int = 2000
    concurrency: int = 4
    rank_threads: int = 8
    k: int = 10


@dataclass
class _Window:
    """What happened between two window boundaries (the load threads append, the main thread rolls it over)."""

    latencies_ms: list[float] = field(default_factory=list)
    rank_errors: int = 0
    late: int = 0  # ranking requests the generator could not send on time (its own lag, not the server's)
    produced: int = 0
    produce_errors: int = 0


class _Load:
    """Ranking and event load at fixed rates (open loop), counted per window."""

    def __init__(self, api_url: str, bootstrap: str, sessions: list[str], items: list[str], k: int) -> None:
        from streaming.kafka_io import make_producer

        self.api_url, self.sessions, self.items, self.k = api_url, sessions, items, k
        self.producer = make_producer(bootstrap, client_id="persona-soak")
        self.lock = threading.Lock()
        self.window = _Window()
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.events_sent = 0

    def roll(self) -> _Window:
        with self.lock:
            done, self.window = self.window, _Window()
        return done

    def start(self, rank_rps: float, events_per_s: float, rank_threads: int) -> None:
        self.stop.clear()
        if rank_rps > 0:
            n = max(1, min(rank_threads, int(rank_rps)))
            for i in range(n):
                t = threading.Thread(target=self._rank, args=(i, n, rank_rps / n), daemon=True)
                self.threads.append(t)
        if events_per_s > 0:
            self.threads.append(threading.Thread(target=self._ingest, args=(events_per_s,), daemon=True))
        for t in self.threads:
            t.start()

    def halt(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)
        self.threads = []
        self.producer.flush(30)

    def close(self) -> None:
        self.producer.close(10)

    def _rank(self, n: int, of: int, rps: float) -> None:
        rng = random.Random(n)
        interval = 1.0 / rps
        due = time.perf_counter() + rng.random() * interval
        with httpx.Client(base_url=self.api_url, timeout=10.0) as client:
            while not self.stop.is_set():
                now = time.perf_counter()
                if due > now:
                    self.stop.wait(due - now)
                    continue
                if now - due > 1.0:  # over a second behind: skip what was due instead of a burst
                    skipped = int((now - due) / interval)
                    due += skipped * interval
                    with self.lock:
                        self.window.late += skipped
                due += interval
                sid = self.sessions[rng.randrange(len(self.sessions))]
                t0 = time.perf_counter()
                try:
                    ok = client.get(f"/v1/sessions/{sid}/recommendations", params={"k": self.k}).status_code == 200
                except httpx.HTTPError:
                    ok = False
                ms = (time.perf_counter() - t0) * 1e3
                with self.lock:
                    self.window.latencies_ms.append(ms)
                    self.window.rank_errors += not ok

    def _ingest(self, rate: float) -> None:
        """Events at ``rate`` per second in 100 ms ticks (``inf``: as fast as this thread can send them)."""
        from persona.events import Event

        rng = random.Random(1)
        tick = 0.1
        owed = 0.0
        run = uuid.uuid4().hex[:8]
        due = time.perf_counter()
        while not self.stop.is_set():
            owed = 500.0 if rate == float("inf") else owed + rate * tick
            n, owed = int(owed), owed - int(owed)
            errors = 0
            for _ in range(n):
                sid = self.sessions[rng.randrange(len(self.sessions))]
                event = Event(f"soak-{run}-{self.events_sent}", sid, rng.choice(self.items), datetime.now(UTC))
                self.events_sent += 1
                try:
                    self.producer.send(TOPIC, key=sid.encode(), value=event.to_json_bytes())
                except Exception:
                    errors += 1
            with self.lock:
                self.window.produced += n
                self.window.produce_errors += errors
            if rate != float("inf"):
                due += tick
                self.stop.wait(max(0.0, due - time.perf_counter()))


def rss_mb(pid: int) -> float | None:
    """Resident set size of a process in MiB (from /proc), or None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def child_pids(pid: int) -> list[int]:
    """Live child processes of ``pid`` (the consumer's model process)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return sorted(out)


def _processes(api: d.Service, consumer: d.Service) -> dict[str, int]:
    """The processes whose RSS is followed: the API, the consumer and its children (the model process, and
    multiprocessing's resource tracker), named by what they run."""
    procs = {"api": api.proc.pid, "consumer": consumer.proc.pid}
    for pid in child_pids(consumer.proc.pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        name = "consumer_resource_tracker" if "resource_tracker" in cmdline else "consumer_model_process"
        procs[name if name not in procs else f"{name}_{pid}"] = pid
    return procs


def _rss(procs: dict[str, int]) -> dict[str, float | None]:
    return {name: (round(v, 1) if (v := rss_mb(pid)) is not None else None) for name, pid in procs.items()}


def _consumed(metrics_url: str) -> tuple[float, float]:
    """(events processed: consumed + invalid, DLQ records) from the consumer's metrics."""
    samples = d.scrape(metrics_url)
    done = d.metric_sum(samples, "persona_events_consumed_total")
    done += d.metric_sum(samples, "persona_events_invalid_total")
    return done, d.metric_sum(samples, "persona_events_dlq_total")


def _percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values else None


def _wait_drained(metrics_url: str, target: float, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    done = _consumed(metrics_url)[0]
    while done < target and time.monotonic() < deadline:
        time.sleep(0.5)
        done = _consumed(metrics_url)[0]
    return done


def _probe(cfg: SoakConfig, load: _Load, metrics_url: str, drain: Callable[[], float]) -> dict[str, Any]:
    """Both maxima together: ``concurrency`` closed-loop ranking clients while events are produced as fast as one
    thread can. The consumer's rate over the probe is the ingestion maximum when it fell behind (the lag grew);
    when it kept up, the producer was the limit, and the report says so."""
    from serving.bench import drive

    paths = [f"/v1/sessions/{s}/recommendations?k={cfg.k}" for s in load.sessions]
    load.start(0, float("inf"), 0)
    time.sleep(1.0)  # the producer's first batches are out: the consumer has work from the start
    before, _ = _consumed(metrics_url)
    sent_before = load.events_sent
    t0 = time.monotonic()
    rank = drive(load.api_url, paths, concurrency=cfg.concurrency, requests=10**9, max_seconds=cfg.probe_s, warmup=0)
    after, _ = _consumed(metrics_url)
    seconds = time.monotonic() - t0
    sent = load.events_sent - sent_before
    load.halt()
    load.roll()
    backlog_growth = sent - (after - before)
    drain()  # the soak starts without a backlog
    return {
        "seconds": round(seconds, 1),
        "concurrency": cfg.concurrency,
        "rank_rps": round(rank.rps, 1),
        "rank_p99_ms": round(rank.p99_ms, 2),
        "rank_errors": rank.errors,
        "events_per_s": round((after - before) / seconds, 1),
        "events_produced_per_s": round(sent / seconds, 1),
        "ingest_bound_by_producer": backlog_growth < 0.05 * sent,
    }


def run_soak(cfg: SoakConfig, *, command: str = "") -> dict[str, Any]:
    """The whole soak; returns the JSON report."""
    from persona.net import free_port
    from persona.store import Store
    from recsys.online import OnlineModel
    from serving.bench import machine, populate_sessions
    from streaming.bench import train_tiny_bundle
    from streaming.broker import EmbeddedBroker
    from streaming.kafka_io import ensure_topics

    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("kafka").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="persona-soak-") as tmp:
        workdir = Path(tmp)
        bundle = cfg.bundle or train_tiny_bundle(workdir / "bundle")
        if not bundle.exists():
            raise PersonaError(f"model bundle {bundle} does not exist", "train one with `persona train --out DIR`")
        db = f"sqlite:///{(workdir / 'persona.db').as_posix()}"
        store = Store.open(db)
        online = OnlineModel.load(bundle)
        try:
            sessions = populate_sessions(store, online, cfg.sessions)
        finally:
            store.close()
        items = list(online.vocab.ids)
        del online
        api_port, metrics_port = free_port(), free_port()
        with EmbeddedBroker() as broker:
            env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")}
            env.update(
                PERSONA_DATABASE_URL=db,
                PERSONA_MODEL_DIR=str(bundle.resolve()),
                PERSONA_KAFKA_BOOTSTRAP=broker.bootstrap,
                PERSONA_KAFKA_TOPIC=TOPIC,
                PERSONA_KAFKA_DLQ_TOPIC=f"{TOPIC}.dlq",
                PERSONA_METRICS_PORT=str(metrics_port),
                PERSONA_KAFKA_SESSION_TIMEOUT_MS="6000",
                PERSONA_KAFKA_HEARTBEAT_MS="1000",
                PERSONA_KAFKA_FETCH_MAX_WAIT_MS="20",
                PERSONA_LOG_LEVEL="WARNING",
            )
            ensure_topics(broker.bootstrap, {TOPIC: 4, f"{TOPIC}.dlq": 4})
            api_url, metrics_url = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{metrics_port}/metrics"
            with d.running_services(workdir, env) as services:
                consumer = services.start("consumer", "consume")
                api = services.start("api", "serve", "--host", "127.0.0.1", "--port", str(api_port))
                d.wait_http(metrics_url, consumer)
                d.wait_http(f"{api_url}/readyz", api)
                load = _Load(api_url, broker.bootstrap, sessions, items, cfg.k)
                try:
                    report = _soak(cfg, load, api, consumer, metrics_url)
                finally:
                    load.halt()
                    load.close()
                report["logs_tail"] = {s.name: s.tail(5) for s in (api, consumer) if not s.alive()}
    report["machine"] = machine()
    report["machine"]["loadavg_at_end"] = list(os.getloadavg())
    report["command"] = command
    report["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    return report


def _until_consuming(load: _Load, metrics_url: str, timeout: float = 180.0) -> None:
    """Send a few events and wait until they are consumed: the group is joined and the model loaded before any
    figure is taken."""
    before = _consumed(metrics_url)[0]
    load.start(0, 200.0, 0)
    time.sleep(0.5)
    load.halt()
    sent = load.roll().produced
    if _wait_drained(metrics_url, before + sent, timeout) < before + sent:
        raise PersonaError(f"the consumer did not consume {sent} events within {timeout:.0f} s")


def _soak(cfg: SoakConfig, load: _Load, api: d.Service, consumer: d.Service, metrics_url: str) -> dict[str, Any]:
    _until_consuming(load, metrics_url)
    consumed0, sent0 = _consumed(metrics_url)[0], load.events_sent

    def drain() -> float:
        """Wait until every event sent so far is consumed (at most ``drain_s``); the events consumed so far."""
        return _wait_drained(metrics_url, consumed0 + load.events_sent - sent0, cfg.drain_s)

    probe: dict[str, Any] | None = None
    if cfg.rank_rps is None or cfg.events_per_s is None:
        probe = _probe(cfg, load, metrics_url, drain)
    rank_rps = cfg.rank_rps if cfg.rank_rps is not None else cfg.fraction * probe["rank_rps"]  # type: ignore[index]
    events_per_s = cfg.events_per_s if cfg.events_per_s is not None else cfg.fraction * probe["events_per_s"]  # type: ignore[index]
    procs = _processes(api, consumer)
    base_done, base_dlq = _consumed(metrics_url)
    produced_before = load.events_sent
    load.roll()
    load.start(rank_rps, events_per_s, cfg.rank_threads)
    time.sleep(cfg.warmup_s)
    warm = load.roll()
    rss_start = _rss(procs)
    windows: list[dict[str, Any]] = []
    totals = _Window()
    soak_start = time.monotonic()
    end = soak_start + cfg.minutes * 60
    last_done = _consumed(metrics_url)[0]
    while (now := time.monotonic()) < end:
        time.sleep(min(cfg.window_s, end - now))
        w = load.roll()
        done, _dlq = _consumed(metrics_url)
        windows.append(
            {
                "t_s": round(time.monotonic() - soak_start, 1),
                "rank_requests": len(w.latencies_ms),
                "rank_errors": w.rank_errors,
                "rank_late": w.late,
                "rank_p50_ms": _percentile(w.latencies_ms, 50),
                "rank_p99_ms": _percentile(w.latencies_ms, 99),
                "events_produced": w.produced,
                "events_consumed": int(done - last_done),
                "lag_events": int(base_done + load.events_sent - produced_before - done),
                "rss_mb": _rss(procs),
                "loadavg_1m": round(os.getloadavg()[0], 2),
            }
        )
        last_done = done
        totals.latencies_ms += w.latencies_ms
        totals.rank_errors += w.rank_errors
        totals.late += w.late
        totals.produced += w.produced
        totals.produce_errors += w.produce_errors
        if not (api.alive() and consumer.alive()):
            break
    rss_end = _rss(procs)
    soak_s = time.monotonic() - soak_start
    load.halt()
    sent = load.events_sent - produced_before
    done, dlq = _consumed(metrics_url)
    if consumer.alive():
        done = _wait_drained(metrics_url, base_done + sent, cfg.drain_s)
        done, dlq = _consumed(metrics_url)
    lost = int(base_done + sent - done)
    died = [s.name for s in (api, consumer) if not s.alive()]
    errors = {
        "rank": totals.rank_errors + warm.rank_errors,
        "produce": totals.produce_errors + warm.produce_errors,
        "dlq": int(dlq - base_dlq),
        "events_not_consumed": max(lost, 0),
        "processes_died": died,
    }
    error_total = sum(v for v in errors.values() if isinstance(v, int)) + len(died)
    growth = {
        name: round((rss_end[name] - start) / start, 4)  # type: ignore[operator]
        for name, start in rss_start.items()
        if start and rss_end.get(name)
    }
    return {
        "minutes": cfg.minutes,
        "fraction": cfg.fraction,
        "probe": probe,
        "target": {"rank_rps": round(rank_rps, 1), "events_per_s": round(events_per_s, 1)},
        "achieved": {
            "rank_rps": round(len(totals.latencies_ms) / max(soak_s, 1e-9), 1),
            "events_per_s": round(totals.produced / max(soak_s, 1e-9), 1),
        },
        "warmup_s": cfg.warmup_s,
        "soak_s": round(soak_s, 1),
        "rank_requests": len(totals.latencies_ms),
        "rank_late": totals.late,
        "rank_p50_ms": _percentile(totals.latencies_ms, 50),
        "rank_p99_ms": _percentile(totals.latencies_ms, 99),
        "events_produced": sent,
        "errors": errors,
        "error_total": error_total,
        "windows": windows,
        "rss_mb": {"start": rss_start, "end": rss_end, "growth": growth},
        "targets": {
            "zero_errors": error_total == 0,
            "rss_growth_lt_10pct": bool(growth) and all(g < RSS_GROWTH_TARGET for g in growth.values()),
        },
        "processes": sorted(procs),
    }
