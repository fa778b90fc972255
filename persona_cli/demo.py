"""The one-command demo: broker, consumer and API as real processes, the test period replayed as live traffic.

Everything it starts is stopped again, also on Ctrl-C or an error (process groups, ``finally``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from recsys.errors import PersonaError

log = logging.getLogger("persona.demo")


@dataclass
class Service:
    """A child process in its own process group, so stopping it stops everything it started."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


@dataclass
class Services:
    workdir: Path
    env: dict[str, str]
    started: list[Service] = field(default_factory=list)

    def start(self, name: str, *args: str) -> Service:
        log_path = self.workdir / f"{name}.log"
        persona = str(Path(sys.executable).parent / "persona")
        with log_path.open("wb") as fh:
            proc = subprocess.Popen(
                [persona, *args], env=self.env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
            )
        service = Service(name, proc, log_path)
        self.started.append(service)
        return service

    def stop_all(self) -> None:
        for service in reversed(self.started):
            service.stop()


@contextlib.contextmanager
def running_services(workdir: Path, env: dict[str, str]) -> Iterator[Services]:
    services = Services(workdir, env)
    try:
        yield services
    finally:
        services.stop_all()


def wait_http(url: str, service: Service, timeout: float = 120.0) -> None:
    """Poll ``url`` until it answers 200; a clear error with the service's log if it dies or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not service.alive():
            raise PersonaError(f"{service.name} exited during start-up:\n{service.tail()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        time.sleep(0.3)
    raise PersonaError(f"{service.name} did not become ready at {url} within {timeout:.0f} s:\n{service.tail()}")


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text → {(sample name, sorted labels): value}."""
    text = httpx.get(url, timeout=5.0).text
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def metric_sum(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


def online_quality(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> dict[str, dict[str, float]]:
    """Prequential HR@10 / NDCG@10 per variant from the consumer's counters."""
    quality: dict[str, dict[str, float]] = {}
    for variant in ("persona", "base"):
        n = metric_sum(samples, "persona_predictions_total", variant=variant)
        hits = metric_sum(samples, "persona_hits_total", variant=variant, k="10")
        gain = metric_sum(samples, "persona_ndcg_gain_total", variant=variant, k="10")
        quality[variant] = {"predictions": n, "hr@10": hits / n if n else 0.0, "ndcg@10": gain / n if n else 0.0}
    return quality


def latency_probe(api: str, sessions: list[str], n: int = 300) -> dict[str, Any]:
    """Sequential ranking requests against the live API: p50/p99 in milliseconds; plus one unknown session,
    to show the cold-start fallback."""
    times = []
    with httpx.Client(base_url=api, timeout=10.0) as client:
        for i in range(n):
            sid = sessions[i % len(sessions)]
            start = time.perf_counter()
            r = client.get(f"/v1/sessions/{sid}/recommendations", params={"k": 10})
            times.append((time.perf_counter() - start) * 1e3)
            if r.status_code != 200:
                raise PersonaError(f"ranking request failed: HTTP {r.status_code} {r.text[:200]}")
        cold = client.get("/v1/sessions/demo-cold-start/recommendations", params={"k": 10}).json()
    raw = list(times)
    times.sort()
    return {
        "times_ms": raw,
        "requests": n,
        "p50_ms": statistics.median(times),
        "p99_ms": times[int(0.99 * (len(times) - 1))],
        "cold_start_fallback": cold.get("fallback"),
    }


class MetricsSampler:
    """Scrapes a ``/metrics`` URL every ``interval`` seconds on a background thread, between ``with`` and its end.

    The samples (``(monotonic seconds, scrape)``, oldest first) are the replay's timeline the report plots: the
    consumer exports only running totals and current gauges, so their history exists only if it is sampled.
    Only families starting with ``prefix`` are kept. A failed scrape is skipped (the next one catches up).
    """

    def __init__(self, url: str, interval: float = 0.25, prefix: str = "persona_") -> None:
        self.url, self.interval, self.prefix = url, interval, prefix
        self.samples: list[tuple[float, dict[tuple[str, tuple[tuple[str, str], ...]], float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-sampler", daemon=True)

    def __enter__(self) -> MetricsSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()  # the final state, after whatever the caller waited for

    def sample(self) -> None:
        with contextlib.suppress(httpx.HTTPError):
            scraped = scrape(self.url)
            kept = {key: v for key, v in scraped.items() if key[0].startswith(self.prefix)}
            self.samples.append((time.monotonic(), kept))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)


def write_json(path: Path, summary: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n")
