"""`persona bench ingest` end to end on the tiny model: every key the issue names, and the freshness run's account."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from streaming.bench import run_ingest_bench


@pytest.mark.slow
def test_the_ingest_benchmark_reports_rates_freshness_and_who_used_the_cpu(tiny_bundle: Path) -> None:
    results = run_ingest_bench(3000, model=tiny_bundle)
    for key in ("raw_events_per_s", "sqlite_events_per_s", "freshness_p50_s", "freshness_p99_s"):
        assert results[key] > 0, key
    assert results["postgres_events_per_s"] is None  # not asked for
    assert results["freshness_events"] == 3000
    assert 0 < results["freshness_p50_s"] <= results["freshness_p99_s"] <= results["freshness_max_s"]
    assert results["model_process"] is True  # what `persona consume` runs by default
    # the send window is measured: near the rate the producer was given (loosely: a short run on a busy machine)
    assert results["freshness_sent_events_per_s"] == pytest.approx(results["freshness_rate_events_per_s"], rel=0.3)
    if sys.platform == "linux":
        cores = results["freshness_cpu_cores"]
        assert set(cores) == {"consumer", "model_process", "producer", "broker"}
        assert all(0 <= c <= 4 for c in cores.values()) and cores["consumer"] > 0 and cores["producer"] > 0
