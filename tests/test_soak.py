"""``persona bench soak`` for a few seconds: the real processes, the JSON report's shape, and no error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_short_soak_reports_windows_rss_per_process_and_no_error(tmp_path: Path, tiny_bundle: Path) -> None:
    """Ranking rate from a 3 s probe (so the probe runs too), events at a fixed rate, 0.2 minutes in 4 s windows."""
    out = tmp_path / "soak.json"
    cmd = [sys.executable, "-m", "persona_cli", "bench", "soak", "--minutes", "0.2", "--model", str(tiny_bundle)]
    cmd += ["--events-per-s", "200", "--probe-s", "3", "--warmup-s", "2", "--window-s", "4", "--sessions", "100"]
    cmd += ["--json", str(out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())

    assert report["errors"] == {
        "rank": 0,
        "produce": 0,
        "dlq": 0,
        "events_not_consumed": 0,
        "processes_died": [],
    }
    assert report["error_total"] == 0 and report["targets"]["zero_errors"] is True
    probe = report["probe"]
    assert probe["rank_rps"] > 0 and probe["events_per_s"] > 0 and probe["rank_errors"] == 0
    assert report["target"]["rank_rps"] == pytest.approx(0.7 * probe["rank_rps"], abs=0.2)
    assert report["target"]["events_per_s"] == 200
    assert report["events_produced"] > 0 and report["rank_requests"] > 0
    assert len(report["windows"]) >= 3
    for window in report["windows"]:
        assert {"t_s", "rank_requests", "rank_errors", "rank_p50_ms", "rank_p99_ms", "events_produced"} <= set(window)
        assert {"events_consumed", "lag_events", "rss_mb", "loadavg_1m"} <= set(window)
        assert window["rank_errors"] == 0 and window["rank_p99_ms"] >= window["rank_p50_ms"] > 0
    rss = report["rss_mb"]
    assert {"api", "consumer", "consumer_model_process"} <= set(rss["start"]) == set(rss["end"])
    assert all(v > 10 for v in rss["start"].values() if v is not None)
    assert set(rss["growth"]) == set(rss["start"])
    assert isinstance(report["targets"]["rss_growth_lt_10pct"], bool)
    assert report["command"].startswith("persona bench soak") and report["machine"]["cpus"] >= 1
