"""The whole product end to end: `persona demo` (broker, consumer, API as real processes, a replay) scraped by
a real Prometheus; every dashboard panel returns data and every alert expression evaluates."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.prometheus_harness import PrometheusNotFound, free_port, run_prometheus

ROOT = Path(__file__).parents[1]
DASHBOARDS = ROOT / "dashboards"
TINY_DATASET = "synthetic:users=200,items=100,events=6000"  # what tests/fixtures_model.py trains on
GRAFANA_VARIABLE = re.compile(r"\$(__rate_interval|__range|__interval|window|\{window\})")


def _panel_exprs() -> list[tuple[str, str]]:
    dash = json.loads((DASHBOARDS / "persona.json").read_text())
    return [
        (f"{p['title']} / {t['refId']}", GRAFANA_VARIABLE.sub("5m", t["expr"]))
        for p in dash["panels"]
        if p["type"] != "row"
        for t in p.get("targets", [])
    ]


def _alert_exprs() -> list[tuple[str, str]]:
    import yaml

    out = []
    for name in ("alerts.yml", "recording.yml"):
        path = DASHBOARDS / name
        if path.exists():
            for group in yaml.safe_load(path.read_text())["groups"]:
                out += [(r.get("alert") or r["record"], r["expr"]) for r in group["rules"]]
    return out


@pytest.mark.slow
def test_demo_end_to_end_with_live_prometheus(tiny_bundle: Path, tmp_path: Path) -> None:
    api_port, metrics_port = free_port(), free_port()
    summary_path = tmp_path / "summary.json"
    persona = str(Path(sys.executable).parent / "persona")
    cmd = [
        persona, "demo", "--bundle", str(tiny_bundle), "--dataset", TINY_DATASET, "--workdir", str(tmp_path / "w"),
        "--json", str(summary_path), "--api-port", str(api_port), "--metrics-port", str(metrics_port),
        "--no-progress", "--report", str(tmp_path / "report"),
    ]  # fmt: skip
    targets = {"persona-consumer": f"127.0.0.1:{metrics_port}", "persona-api": f"127.0.0.1:{api_port}"}
    rules = [DASHBOARDS / n for n in ("alerts.yml", "recording.yml") if (DASHBOARDS / n).exists()]
    try:
        prom_ctx = run_prometheus(targets, rule_files=rules, scrape_interval="1s")
        prom = prom_ctx.__enter__()
    except PrometheusNotFound as exc:  # `make test` installs it (devtools/test_prereqs.py): never a silent skip
        pytest.fail(f"{exc}; run `make test-prereqs`")
    log = (tmp_path / "demo.log").open("wb")
    demo = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while not summary_path.exists():
            assert demo.poll() is None, (tmp_path / "demo.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "demo produced no summary in time"
            time.sleep(1)
        time.sleep(0.5)
        summary = json.loads(summary_path.read_text())
        assert summary["events_processed"] == summary["events_sent"] > 1000
        assert summary["dlq"] == 5  # the five malformed messages the demo sends on purpose
        assert set(summary["hit_rate_at_10"]) == {"persona", "base"}
        assert summary["predictions"]["persona"] == summary["predictions"]["base"] > 0
        assert 0.0 <= summary["ndcg_at_10"]["persona"] <= 1.0
        assert summary["api_latency_ms"]["requests"] > 0
        assert len(summary["sessions"]) == 3  # three real sessions, ranked before their last event
        for session in summary["sessions"]:
            assert len(session["persona_top"]) == len(session["base_top"]) == 5
            assert session["next_item"] not in session["last_items"]
        report = tmp_path / "report"
        assert 'src="hr_10.png"' in (report / "index.html").read_text()
        for name in ("hr_10", "ndcg_10", "drift", "ood", "prototype_mix", "throughput", "api_latency"):
            assert (report / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

        # every panel returns data once Prometheus has scraped the run
        missing: list[str] = []
        deadline = time.monotonic() + 90
        for title, expr in _panel_exprs():
            while True:
                reply = prom.query(expr)
                assert reply["status"] == "success", f"{title}: {reply}"
                if reply["data"]["result"]:
                    break
                if time.monotonic() > deadline:
                    missing.append(title)
                    break
                time.sleep(1)
        assert not missing, f"panels without data: {missing}"
        for name, expr in _alert_exprs():
            assert prom.query(expr)["status"] == "success", name
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGINT)
        code = demo.wait(60)
        prom_ctx.__exit__(None, None, None)
        log.close()
    assert code == 0, (tmp_path / "demo.log").read_text()[-4000:]
    out = (tmp_path / "demo.log").read_text()
    assert "stopped broker, consumer and API" in out


@pytest.mark.slow
def test_a_terminated_demo_stops_what_it_started(tiny_bundle: Path, tmp_path: Path) -> None:
    """SIGTERM (kill, a supervisor, a closed terminal's SIGHUP alike) takes the Ctrl-C path: the broker, consumer
    and API the demo started, each in its own process group, stop with it instead of running on."""
    import httpx

    api_port, metrics_port = free_port(), free_port()
    persona = str(Path(sys.executable).parent / "persona")
    cmd = [
        persona, "demo", "--bundle", str(tiny_bundle), "--dataset", TINY_DATASET, "--workdir", str(tmp_path / "w"),
        "--api-port", str(api_port), "--metrics-port", str(metrics_port), "--limit", "300", "--no-progress",
    ]  # fmt: skip
    log_path = tmp_path / "demo.log"
    with log_path.open("wb") as log:
        demo = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while "serving on" not in log_path.read_text(errors="replace"):
                assert demo.poll() is None, log_path.read_text()[-4000:]
                assert time.monotonic() < deadline, "the demo never started serving"
                time.sleep(1)
            assert httpx.get(f"http://127.0.0.1:{api_port}/healthz", timeout=5).status_code == 200
            demo.send_signal(signal.SIGTERM)  # the demo alone, not its children's process groups
            code = demo.wait(60)
        finally:
            if demo.poll() is None:
                os.killpg(demo.pid, signal.SIGKILL)
    assert code == 0, log_path.read_text()[-4000:]
    assert "stopped broker, consumer and API" in log_path.read_text()
    for url in (f"http://127.0.0.1:{api_port}/healthz", f"http://127.0.0.1:{metrics_port}/metrics"):
        with pytest.raises(httpx.TransportError):
            httpx.get(url, timeout=2)
