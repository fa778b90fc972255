"""Run a real Prometheus (the Debian ``prometheus`` binary) for a test, and query it over its HTTP API.

    with run_prometheus({"persona-consumer": "127.0.0.1:9108"}, rule_files=[Path("dashboards/alerts.yml")]) as prom:
        prom.wait_for_series("persona_events_consumed_total")   # the first scrape lands ~5 s after start
        prom.query("sum(rate(persona_events_consumed_total[1m]))")["data"]["result"]

The server listens on a free loopback port, keeps its TSDB in a temporary directory, and is stopped (and the
directory removed) when the block exits.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["PrometheusHandle", "PrometheusNotFound", "free_port", "run_prometheus"]


class PrometheusNotFound(RuntimeError):
    """The ``prometheus`` binary is not on PATH (``apt-get install --no-install-recommends prometheus``)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class PrometheusHandle:
    """A running Prometheus: ``url`` is its base address (``http://127.0.0.1:PORT``)."""

    url: str
    log_path: Path

    def _get(self, path: str, params: dict[str, str] | None = None, timeout: float = 10.0) -> dict[str, Any]:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=timeout) as resp:
                body = resp.read()
        except urllib.error.HTTPError as err:  # 400/422/503 carry a JSON body with status "error"
            body = err.read()
        result: dict[str, Any] = json.loads(body)
        return result

    def query(self, expr: str, at: float | None = None) -> dict[str, Any]:
        """``GET /api/v1/query``: the whole JSON reply (``status`` is "success", or "error" with ``error``)."""
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        return self._get("/api/v1/query", params)

    def series(self, expr: str) -> list[dict[str, Any]]:
        """The instant-vector result of ``expr``; raises on a query error."""
        reply = self.query(expr)
        if reply.get("status") != "success":
            raise AssertionError(f"query {expr!r} failed: {reply.get('errorType')}: {reply.get('error')}")
        result: list[dict[str, Any]] = reply["data"]["result"]
        return result

    def wait_for_series(self, expr: str, timeout: float = 30.0, interval: float = 0.5) -> list[dict[str, Any]]:
        """Poll until ``expr`` returns at least one series (scrapes start ~5 s after launch)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.series(expr)
            if found:
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(f"no series for {expr!r} after {timeout} s; targets: {self.targets()}")
            time.sleep(interval)

    def targets(self) -> list[dict[str, Any]]:
        """Active scrape targets with their ``health`` and ``lastError``."""
        active: list[dict[str, Any]] = self._get("/api/v1/targets")["data"]["activeTargets"]
        return active

    def alerts(self) -> list[dict[str, Any]]:
        """Pending and firing alerts (``GET /api/v1/alerts``)."""
        found: list[dict[str, Any]] = self._get("/api/v1/alerts")["data"]["alerts"]
        return found

    def rule_groups(self) -> list[dict[str, Any]]:
        """Loaded rule groups (``GET /api/v1/rules``): a rule file that failed to load is missing here."""
        groups: list[dict[str, Any]] = self._get("/api/v1/rules")["data"]["groups"]
        return groups


def _config(scrape_targets: dict[str, str], rule_files: Sequence[Path], scrape_interval: str) -> dict[str, Any]:
    return {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "rule_files": [str(Path(p).resolve()) for p in rule_files],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": [target]}]} for job, target in scrape_targets.items()
        ],
    }


@contextmanager
def run_prometheus(
    scrape_targets: dict[str, str] | None = None,
    rule_files: Sequence[Path] | None = None,
    scrape_interval: str = "1s",
    *,
    binary: str | None = None,
    start_timeout: float = 15.0,
) -> Iterator[PrometheusHandle]:
    """Start Prometheus scraping ``scrape_targets`` (job name -> "host:port", path /metrics).

    Args:
        scrape_targets: one static target per job; ``{}`` or ``None`` scrapes nothing (a PromQL-only server).
        rule_files: recording/alerting rule files to load (paths resolved here, so relative ones are fine).
        scrape_interval: scrape and rule-evaluation interval.
        binary: the ``prometheus`` executable; default: found on PATH.
        start_timeout: seconds to wait for ``/-/ready``.

    Yields:
        A :class:`PrometheusHandle`. Raises :class:`PrometheusNotFound` when there is no binary, and
        ``RuntimeError`` (with the server's log) when it exits or never becomes ready.
    """
    exe = binary or shutil.which("prometheus")
    if exe is None:
        raise PrometheusNotFound("prometheus is not installed (apt-get install --no-install-recommends prometheus)")
    with tempfile.TemporaryDirectory(prefix="persona-prom-") as tmp:
        root = Path(tmp)
        config = root / "prometheus.yml"
        # JSON is YAML: no YAML library needed.
        config.write_text(json.dumps(_config(scrape_targets or {}, rule_files or [], scrape_interval), indent=2))
        log_path = root / "prometheus.log"
        port = free_port()
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [
                    exe,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={root / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        handle = PrometheusHandle(url=f"http://127.0.0.1:{port}", log_path=log_path)
        try:
            _wait_ready(handle, proc, start_timeout)
            yield handle
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_ready(handle: PrometheusHandle, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prometheus exited with {proc.returncode}:\n{handle.log_path.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{handle.url}/-/ready", timeout=1) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.05)
    proc.terminate()
    raise RuntimeError(f"prometheus not ready after {timeout} s:\n{handle.log_path.read_text()[-4000:]}")
