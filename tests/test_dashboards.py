"""The monitoring bundle in dashboards/: Prometheus config, alert rules and their unit tests, the Grafana dashboard.

Metric names are a contract with streaming/metrics.py and serving/metrics.py (DESIGN.md "Metrics"): a typo in a
panel or an alert would silently show "No data" or never fire, so every name is checked against the list below
and every expression is run through a real Prometheus.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.prometheus_harness import PrometheusHandle, run_prometheus

DASHBOARDS = Path(__file__).resolve().parent.parent / "dashboards"
DASHBOARD = DASHBOARDS / "persona.json"
ALERTS = DASHBOARDS / "alerts.yml"
RECORDING = DASHBOARDS / "recording.yml"
RULE_FILES = [RECORDING, ALERTS]

COUNTERS = {
    "persona_events_consumed_total",
    "persona_events_invalid_total",
    "persona_events_dlq_total",
    "persona_events_duplicate_total",
    "persona_events_unknown_item_total",
    "persona_predictions_total",
    "persona_hits_total",
    "persona_ndcg_gain_total",
    "persona_reciprocal_rank_total",
    "persona_prototype_assignments_total",
    "persona_requests_total",
    "persona_fallbacks_total",
    "persona_model_reloads_total",
}
GAUGES = {
    "persona_consumer_lag",
    "persona_consumer_last_batch_timestamp_seconds",
    "persona_consumer_last_poll_timestamp_seconds",
    "persona_consumer_last_commit_timestamp_seconds",
    "persona_dependency_up",
    "persona_drift_psi",
    "persona_drift_js",
    "persona_model_info",
    "persona_bank_version",
    "persona_prototypes_terms_on",
}
HISTOGRAMS = {
    "persona_event_processing_seconds",
    "persona_event_freshness_seconds",
    "persona_ood_score",
    "persona_edit_norm_ratio",
    "persona_request_seconds",
    "persona_rank_batch_size",
}
#: Series that exist: a histogram only as its _bucket/_sum/_count series.
KNOWN_SERIES = COUNTERS | GAUGES | {h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}
METRIC_NAME = re.compile(r"persona_[a-z_]+")
RECORDED_NAME = re.compile(r"persona:[a-zA-Z0-9_:]+")
GRAFANA_VARIABLE = re.compile(r"\$__\w+|\$\{\w+\}|\$\w+")

PANEL_TYPES = {"row", "timeseries", "stat"}
UNITS = {"s", "reqps", "ops", "percentunit", "short", "none"}
DATASOURCE = "${datasource}"
REQUIRED_ALERTS = {
    "ConsumerStalled",
    "ConsumerCannotReachBroker",
    "ConsumerDependencyDown",
    "ConsumerLagGrowing",
    "FreshnessHigh",
    "PersonaWorseThanBase",
    "DriftHigh",
    "OODHigh",
    "ApiErrorRate",
    "ApiLatencyHigh",
    "NoActiveModel",
    "DLQSpike",
}


def _require(binary: str) -> str:
    """Path of ``binary``; ``make test`` installs it (devtools/test_prereqs.py), so a missing one fails, never skips."""
    path = shutil.which(binary)
    if path is None:
        pytest.fail(f"{binary} is not installed: run `make test-prereqs` (or apt-get install prometheus)")
    return path


def _promtool(*args: str) -> None:
    proc = subprocess.run(
        [_require("promtool"), *args], cwd=DASHBOARDS, capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, f"promtool {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _query_panels() -> list[dict[str, Any]]:
    return [p for p in _dashboard()["panels"] if p["type"] != "row"]


def _panel_exprs() -> list[tuple[str, str]]:
    """(panel title / refId, PromQL) for every dashboard target."""
    return [(f"{p['title']} / {t['refId']}", t["expr"]) for p in _query_panels() for t in p["targets"]]


def _rules(path: Path) -> list[dict[str, Any]]:
    doc = yaml.safe_load(path.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _alert_rules() -> list[dict[str, Any]]:
    return [r for r in _rules(ALERTS) if "alert" in r]


def _rule_exprs() -> list[tuple[str, str]]:
    return [(r.get("alert") or r["record"], r["expr"]) for path in RULE_FILES for r in _rules(path)]


def _as_promql(expr: str) -> str:
    """Grafana variables ($__rate_interval, $__range, $window) replaced by a plain duration."""
    return GRAFANA_VARIABLE.sub("1m", expr)


# ------------------------------------------------------------------------------------------------ promtool
def test_prometheus_config_is_valid() -> None:
    _promtool("check", "config", "prometheus.yml")


def test_alerting_and_recording_rules_are_valid() -> None:
    _promtool("check", "rules", "alerts.yml", "recording.yml")


def test_alert_unit_tests_pass() -> None:
    _promtool("test", "rules", "alerts_test.yml")


# ----------------------------------------------------------------------------------------------- dashboard
def test_dashboard_has_identity_time_range_and_datasource_variable() -> None:
    dash = _dashboard()
    assert dash["uid"] == "persona-overview"
    assert dash["title"]
    assert dash["schemaVersion"] >= 39
    assert dash["time"]["from"] and dash["time"]["to"]
    assert dash["refresh"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"


def test_every_panel_has_unique_id_known_type_title_and_unit() -> None:
    panels = _dashboard()["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels:
        assert p["type"] in PANEL_TYPES, p["title"]
        assert p["title"].strip()
        if p["type"] != "row":
            assert p["fieldConfig"]["defaults"]["unit"] in UNITS, p["title"]


def test_every_query_panel_and_target_uses_the_datasource_variable() -> None:
    for p in _query_panels():
        assert p["datasource"] == {"type": "prometheus", "uid": DATASOURCE}, p["title"]
        assert p["targets"], p["title"]
        ref_ids = [t["refId"] for t in p["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == {"type": "prometheus", "uid": DATASOURCE}, p["title"]
            assert t["expr"].strip() and t["refId"] and "legendFormat" in t, p["title"]


def test_panels_fit_the_grid_without_overlapping() -> None:
    boxes = []
    for p in _dashboard()["panels"]:
        g = p["gridPos"]
        x, y, w, h = g["x"], g["y"], g["w"], g["h"]
        assert all(isinstance(v, int) for v in (x, y, w, h)), p["title"]
        assert x >= 0 and w >= 1 and x + w <= 24 and y >= 0 and h >= 1, p["title"]
        boxes.append((p["title"], x, y, w, h))
    for i, (a, ax, ay, aw, ah) in enumerate(boxes):
        for b, bx, by, bw, bh in boxes[i + 1 :]:
            overlap = ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah
            assert not overlap, f"panels {a!r} and {b!r} overlap"


def test_dashboard_covers_every_section_and_metric_family() -> None:
    rows = {p["title"].split(" ")[0] for p in _dashboard()["panels"] if p["type"] == "row"}
    assert rows >= {"Ingestion", "Quality", "Drift", "Prototypes", "Serving"}
    used = {name for _, expr in _panel_exprs() for name in METRIC_NAME.findall(expr)}
    families = {re.sub(r"_(bucket|sum|count)$", "", n) for n in used}
    # Everything DESIGN.md lists is on the dashboard (counters may be shown through a ratio).
    missing = (COUNTERS | GAUGES | HISTOGRAMS) - families
    assert not missing, f"not on the dashboard: {sorted(missing)}"


# ------------------------------------------------------------------------------------------- metric names
@pytest.mark.parametrize(("where", "expr"), _panel_exprs() + _rule_exprs())
def test_expressions_use_only_exported_metric_names(where: str, expr: str) -> None:
    unknown = {n for n in METRIC_NAME.findall(expr) if n not in KNOWN_SERIES}
    assert not unknown, f"{where}: unknown series {sorted(unknown)}"


def test_alerts_use_only_recorded_names_that_recording_rules_define() -> None:
    recorded = {r["record"] for r in _rules(RECORDING)}
    for rule in _alert_rules():
        missing = set(RECORDED_NAME.findall(rule["expr"])) - recorded
        assert not missing, f"{rule['alert']}: {sorted(missing)} not in recording.yml"


# ------------------------------------------------------------------------------------------------- alerts
def test_every_required_alert_exists_with_severity_annotations_and_runbook() -> None:
    alerts = {r["alert"]: r for r in _alert_rules()}
    missing = REQUIRED_ALERTS - alerts.keys()
    assert not missing, f"missing alerts: {sorted(missing)}"
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        notes = rule["annotations"]
        assert notes["summary"] and notes["description"], name
        assert notes["runbook_url"] == f"docs/operations.md#{name.lower()}", name


def test_every_alert_has_a_firing_and_a_silent_unit_test() -> None:
    doc = yaml.safe_load((DASHBOARDS / "alerts_test.yml").read_text())
    assert {Path(f).name for f in doc["rule_files"]} == {p.name for p in RULE_FILES}
    fires: set[str] = set()
    silent: set[str] = set()
    for case in doc["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {r["alert"] for r in _alert_rules()}
    assert names <= fires, f"no firing case for {sorted(names - fires)}"
    assert names <= silent, f"no silent case for {sorted(names - silent)}"


# ------------------------------------------------------------------------------------- live Prometheus
@pytest.fixture(scope="module")
def prometheus() -> Iterator[PrometheusHandle]:
    """A real Prometheus with no targets and both rule files loaded; stopped after this module."""
    _require("prometheus")
    with run_prometheus({}, rule_files=RULE_FILES) as prom:
        yield prom


def test_live_prometheus_loads_every_rule(prometheus: PrometheusHandle) -> None:
    loaded = {rule["name"] for group in prometheus.rule_groups() for rule in group["rules"]}
    expected = {r.get("alert") or r["record"] for path in RULE_FILES for r in _rules(path)}
    assert loaded == expected


def test_every_panel_and_alert_expression_parses_in_prometheus(prometheus: PrometheusHandle) -> None:
    failures = []
    for where, expr in _panel_exprs() + _rule_exprs():
        reply = prometheus.query(_as_promql(expr))
        if reply.get("status") != "success":
            failures.append(f"{where}: {reply.get('error')}")
    assert not failures, "\n".join(failures)


def test_a_broken_expression_is_reported_as_an_error(prometheus: PrometheusHandle) -> None:
    # Guards the test above: the query API does flag parse errors.
    assert prometheus.query("sum(rate(persona_hits_total[1m])")["status"] == "error"


# ------------------------------------------------------------------------------------------- provisioning
def test_grafana_provisioning_points_at_local_prometheus_and_this_folder() -> None:
    ds = yaml.safe_load((DASHBOARDS / "provisioning/datasources/persona.yml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://localhost:9090"
    boards = yaml.safe_load((DASHBOARDS / "provisioning/dashboards/persona.yml").read_text())
    (provider,) = boards["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]
