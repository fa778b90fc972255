"""``make test`` gets what the tests need by itself: the decisions of devtools/test_prereqs.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from devtools.test_prereqs import APT_INSTALL, postgres_step, prometheus_step

ROOT = Path(__file__).resolve().parents[1]


def test_prometheus_present_needs_nothing() -> None:
    step = prometheus_step(have_prometheus=True, have_promtool=True, is_root=False, have_apt=False)
    assert step.action == "ok" and not step.commands


def test_missing_prometheus_is_installed_from_debian_as_root() -> None:
    step = prometheus_step(have_prometheus=False, have_promtool=False, is_root=True, have_apt=True)
    assert step.action == "run"
    assert step.commands == (("apt-get", "update", "-qq"), tuple(APT_INSTALL))
    assert "prometheus" in step.commands[-1]


def test_a_missing_promtool_alone_also_installs() -> None:
    step = prometheus_step(have_prometheus=True, have_promtool=False, is_root=True, have_apt=True)
    assert step.action == "run"


def test_missing_prometheus_without_root_stops_with_the_one_command() -> None:
    step = prometheus_step(have_prometheus=False, have_promtool=False, is_root=False, have_apt=True)
    assert step.action == "stop" and not step.commands
    assert "sudo apt-get install -y --no-install-recommends prometheus" in step.message
    assert "\n" not in step.message


def test_missing_prometheus_off_debian_says_what_to_install() -> None:
    step = prometheus_step(have_prometheus=False, have_promtool=False, is_root=True, have_apt=False)
    assert step.action == "stop" and "promtool" in step.message


def test_running_postgres_needs_nothing() -> None:
    assert postgres_step(reachable=True, clusters=[], have_pg_ctlcluster=False, is_root=False).action == "ok"


def test_stopped_postgres_is_started_newest_cluster_first() -> None:
    step = postgres_step(reachable=False, clusters=["13", "15"], have_pg_ctlcluster=True, is_root=True)
    assert step.action == "run"
    assert step.commands == (("pg_ctlcluster", "--skip-systemctl-redirect", "15", "main", "start"),)
    assert "stopped" in step.message


def test_stopped_postgres_without_root_stops_with_the_command() -> None:
    step = postgres_step(reachable=False, clusters=["15"], have_pg_ctlcluster=True, is_root=False)
    assert step.action == "stop"
    assert "sudo pg_ctlcluster --skip-systemctl-redirect 15 main start" in step.message


def test_no_postgres_installed_stops_and_names_the_alternative() -> None:
    step = postgres_step(reachable=False, clusters=[], have_pg_ctlcluster=False, is_root=True)
    assert step.action == "stop" and "PERSONA_TEST_POSTGRES_URL" in step.message


def test_script_passes_on_this_machine() -> None:
    """After `make test` ran it, everything is in place: a second run does nothing and succeeds."""
    proc = subprocess.run([sys.executable, str(ROOT / "devtools" / "test_prereqs.py")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
