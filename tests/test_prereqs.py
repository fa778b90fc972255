"""``make test`` gets what the tests need by itself: the decisions of devtools/test_prereqs.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from devtools.test_prereqs import (
    APT_INSTALL,
    CHROMIUM_INSTALL,
    NPM_CI,
    NPM_INSTALL,
    chromium_step,
    postgres_step,
    prometheus_step,
    web_packages_installed,
    web_packages_step,
)

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


def test_missing_chromium_is_installed_from_debian_as_root() -> None:
    step = chromium_step(have_chromium=False, is_root=True, have_apt=True)
    assert step.action == "run"
    assert step.commands == (("apt-get", "update", "-qq"), tuple(CHROMIUM_INSTALL))
    assert chromium_step(have_chromium=True, is_root=False, have_apt=False).action == "ok"


def test_missing_chromium_without_root_stops_with_the_one_command() -> None:
    step = chromium_step(have_chromium=False, is_root=False, have_apt=True)
    assert step.action == "stop" and "sudo apt-get install -y --no-install-recommends chromium" in step.message
    assert chromium_step(have_chromium=False, is_root=True, have_apt=False).action == "stop"


def test_web_packages_come_from_the_lock_file() -> None:
    assert web_packages_step(installed=True, have_npm=False, is_root=False, have_apt=False).action == "ok"
    step = web_packages_step(installed=False, have_npm=True, is_root=False, have_apt=False)
    assert step.action == "run" and step.commands == (NPM_CI,)
    assert NPM_CI[:2] == ("npm", "ci")  # the lock file's versions, never a newer one
    no_npm = web_packages_step(installed=False, have_npm=False, is_root=True, have_apt=True)
    assert no_npm.commands == (tuple(NPM_INSTALL), NPM_CI)
    stop = web_packages_step(installed=False, have_npm=False, is_root=False, have_apt=True)
    assert stop.action == "stop" and "npm ci" in stop.message


def test_web_packages_installed_checks_every_pinned_version(tmp_path: Path) -> None:
    import json

    lock = {"packages": {"": {}, "node_modules/a": {"version": "1.2.3"}, "node_modules/b": {"version": "2.0.0"}}}
    (tmp_path / "package-lock.json").write_text(json.dumps(lock))
    assert not web_packages_installed(tmp_path)  # nothing installed
    for name, version in (("a", "1.2.3"), ("b", "1.9.0")):
        (tmp_path / "node_modules" / name).mkdir(parents=True)
        (tmp_path / "node_modules" / name / "package.json").write_text(json.dumps({"version": version}))
    assert not web_packages_installed(tmp_path)  # b is at another version than the lock pins
    (tmp_path / "node_modules" / "b" / "package.json").write_text(json.dumps({"version": "2.0.0"}))
    assert web_packages_installed(tmp_path)
