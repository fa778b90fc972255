"""Make sure what the test suite talks to is there before ``make test`` runs it.

The tests use things from outside the venv: Prometheus (``prometheus`` and ``promtool``, Debian's package) for
the dashboard and alert-rule tests, the local PostgreSQL server for the store tests, and for the browser-device test
Chromium (Debian's ``chromium``) and onnxruntime-web (npm, pinned in examples/device-web/package-lock.json). A fresh
machine has PostgreSQL installed and usually running, and no Prometheus. This script installs Prometheus from
Debian's packages when it runs as root, starts a local PostgreSQL cluster that is installed but stopped, and otherwise
stops at once with the one command a person has to run. Standard library only: it runs with the system Python
before anything else.

Chromium is installed like Prometheus; the npm packages with ``npm ci`` (any user; npm itself from Debian as root).
The decisions are pure functions (:func:`prometheus_step`, :func:`chromium_step`, :func:`web_packages_step`,
:func:`postgres_step`) so that they are tested without touching apt, npm or the database server.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

APT_INSTALL = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "prometheus"]
POSTGRES_HOST, POSTGRES_PORT = "127.0.0.1", 5432
CHROMIUM_NAMES = ("chromium", "chromium-browser")
CHROMIUM_INSTALL = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"]
NPM_INSTALL = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "npm"]
WEB_DIR = Path(__file__).resolve().parents[1] / "examples" / "device-web"
NPM_CI = ("npm", "ci", "--prefix", str(WEB_DIR), "--no-audit", "--no-fund", "--ignore-scripts")


@dataclass(frozen=True)
class Step:
    """What to do about one prerequisite: nothing (``ok``), run ``commands`` (``run``), or stop with ``message``."""

    action: str  # "ok" | "run" | "stop"
    message: str = ""
    commands: tuple[tuple[str, ...], ...] = ()


def debian_package_step(
    *,
    present: bool,
    name: str,
    install: list[str],
    needed_by: str,
    installed_for: str,
    elsewhere: str,
    is_root: bool,
    have_apt: bool,
) -> Step:
    """Decide how to get the Debian package ``install[-1]`` a test uses: nothing when ``present``, apt-get as root
    (``installed_for`` says why), else stop with the one command to run (``elsewhere`` off Debian)."""
    package = install[-1]
    if present:
        return Step("ok")
    if not have_apt:
        return Step(
            "stop",
            f"{name} is not installed and this is not a Debian-like machine: {elsewhere}, then run `make test` again",
        )
    if not is_root:
        return Step(
            "stop",
            f"{name} is not installed ({needed_by}): run "
            f"`sudo apt-get update && sudo apt-get install -y --no-install-recommends {package}`, "
            "then `make test` again",
        )
    return Step(
        "run",
        f"installing {name} from Debian's packages for the {installed_for} (apt-get install --no-install-recommends "
        f"{package})",
        (("apt-get", "update", "-qq"), tuple(install)),
    )


def prometheus_step(*, have_prometheus: bool, have_promtool: bool, is_root: bool, have_apt: bool) -> Step:
    """Decide how to get ``prometheus`` and ``promtool`` onto PATH."""
    return debian_package_step(
        present=have_prometheus and have_promtool,
        name="Prometheus",
        install=APT_INSTALL,
        needed_by="the dashboard tests need it",
        installed_for="dashboard and alert-rule tests",
        elsewhere="install Prometheus 2.x so that `prometheus` and `promtool` are on PATH",
        is_root=is_root,
        have_apt=have_apt,
    )


def chromium_binary() -> str | None:
    """The Chromium executable on PATH (Debian names it ``chromium``), or ``None``."""
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def chromium_step(*, have_chromium: bool, is_root: bool, have_apt: bool) -> Step:
    """Decide how to get a headless-capable Chromium for the browser-device test."""
    return debian_package_step(
        present=have_chromium,
        name="Chromium",
        install=CHROMIUM_INSTALL,
        needed_by="the browser-device test needs it",
        installed_for="browser-device test",
        elsewhere="install Chromium so that `chromium` is on PATH (the browser-device test runs it headless)",
        is_root=is_root,
        have_apt=have_apt,
    )


def web_packages_installed(web_dir: Path = WEB_DIR) -> bool:
    """Whether examples/device-web/node_modules holds every package its lock file pins, at that version."""
    try:
        lock = json.loads((web_dir / "package-lock.json").read_text())
        for path, entry in lock.get("packages", {}).items():
            if not path or entry.get("optional"):  # the root, or a package only some platforms get
                continue
            installed = json.loads((web_dir / path / "package.json").read_text())
            if installed.get("version") != entry.get("version"):
                return False
    except (OSError, ValueError):
        return False
    return True


def web_packages_step(*, installed: bool, have_npm: bool, is_root: bool, have_apt: bool) -> Step:
    """Decide how to get the pinned npm packages of the browser device (``npm ci`` from its lock file)."""
    if installed:
        return Step("ok")
    message = "installing onnxruntime-web (pinned) for the browser-device test (npm ci in examples/device-web)"
    if have_npm:
        return Step("run", message, (NPM_CI,))
    if have_apt and is_root:
        return Step("run", "installing npm from Debian's packages, then " + message, (tuple(NPM_INSTALL), NPM_CI))
    return Step(
        "stop",
        "npm is not installed (the browser-device test needs onnxruntime-web from the npm registry): install "
        f"Node.js 20 with npm, run `{' '.join(NPM_CI)}`, then `make test` again",
    )


def postgres_step(*, reachable: bool, clusters: list[str], have_pg_ctlcluster: bool, is_root: bool) -> Step:
    """Decide how to get a PostgreSQL server listening on 127.0.0.1:5432 for the store tests."""
    if reachable:
        return Step("ok")
    if not clusters or not have_pg_ctlcluster:
        return Step(
            "stop",
            f"no PostgreSQL at {POSTGRES_HOST}:{POSTGRES_PORT} and none installed here: the store tests need one "
            "(database `test`, trust auth for user postgres); set PERSONA_TEST_POSTGRES_URL to another server, "
            "or `apt-get install postgresql`, then run `make test` again",
        )
    version = sorted(clusters)[-1]
    command = ("pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start")
    if not is_root:
        return Step(
            "stop",
            f"the local PostgreSQL {version} is stopped: run `sudo {' '.join(command)}`, then `make test` again",
        )
    return Step("run", f"starting the local PostgreSQL {version} (it is installed but stopped)", (command,))


def _postgres_reachable() -> bool:
    if os.environ.get("PERSONA_TEST_POSTGRES_URL"):
        return True  # another server was chosen on purpose: the store fixtures report it if it is down
    pg_isready = shutil.which("pg_isready")
    if pg_isready is None:
        import socket

        try:
            with socket.create_connection((POSTGRES_HOST, POSTGRES_PORT), timeout=2):
                return True
        except OSError:
            return False
    cmd = [pg_isready, "-h", POSTGRES_HOST, "-p", str(POSTGRES_PORT), "-q"]
    return subprocess.run(cmd, check=False).returncode == 0


def _clusters() -> list[str]:
    root = Path("/etc/postgresql")
    return [p.name for p in root.iterdir() if (p / "main").is_dir()] if root.is_dir() else []


def _run(step: Step) -> bool:
    print(f"make test: {step.message}", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in step.commands:
        proc = subprocess.run(list(command), env=env, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if proc.returncode != 0:
            detail = proc.stderr.decode(errors="replace").strip().splitlines()
            last = detail[-1] if detail else f"exit {proc.returncode}"
            print(f"make test: `{' '.join(command)}` failed ({last}); run it yourself and look", file=sys.stderr)
            return False
    return True


def main() -> int:
    is_root = hasattr(os, "geteuid") and os.geteuid() == 0
    prometheus = prometheus_step(
        have_prometheus=shutil.which("prometheus") is not None,
        have_promtool=shutil.which("promtool") is not None,
        is_root=is_root,
        have_apt=shutil.which("apt-get") is not None,
    )
    postgres = postgres_step(
        reachable=_postgres_reachable(),
        clusters=_clusters(),
        have_pg_ctlcluster=shutil.which("pg_ctlcluster") is not None,
        is_root=is_root,
    )
    chromium = chromium_step(
        have_chromium=chromium_binary() is not None, is_root=is_root, have_apt=shutil.which("apt-get") is not None
    )
    web = web_packages_step(
        installed=web_packages_installed(),
        have_npm=shutil.which("npm") is not None,
        is_root=is_root,
        have_apt=shutil.which("apt-get") is not None,
    )
    for step in (prometheus, chromium, web, postgres):
        if step.action == "stop":
            print(f"make test: {step.message}", file=sys.stderr)
            return 1
        if step.action == "run" and not _run(step):
            return 1
    if postgres.action == "run":
        for _ in range(30):
            if _postgres_reachable():
                break
            time.sleep(1)
        else:
            print(
                f"make test: PostgreSQL did not come up at {POSTGRES_HOST}:{POSTGRES_PORT} within 30 s; "
                "see `pg_lsclusters` and its log",
                file=sys.stderr,
            )
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
