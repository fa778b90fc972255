"""Make sure what the test suite talks to is there before ``make test`` runs it.

The tests use two things from outside the venv: Prometheus (``prometheus`` and ``promtool``, Debian's package) for
the dashboard and alert-rule tests, and the local PostgreSQL server for the store tests. A fresh machine has
PostgreSQL installed and usually running, and no Prometheus. This script installs Prometheus from Debian's packages
when it runs as root, starts a local PostgreSQL cluster that is installed but stopped, and otherwise stops at once
with the one command a person has to run. Standard library only: it runs with the system Python before anything else.

The decisions are pure functions (:func:`prometheus_step`, :func:`postgres_step`) so that they are tested without
touching apt or the database server.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

APT_INSTALL = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "prometheus"]
POSTGRES_HOST, POSTGRES_PORT = "127.0.0.1", 5432


@dataclass(frozen=True)
class Step:
    """What to do about one prerequisite: nothing (``ok``), run ``commands`` (``run``), or stop with ``message``."""

    action: str  # "ok" | "run" | "stop"
    message: str = ""
    commands: tuple[tuple[str, ...], ...] = ()


def prometheus_step(*, have_prometheus: bool, have_promtool: bool, is_root: bool, have_apt: bool) -> Step:
    """Decide how to get ``prometheus`` and ``promtool`` onto PATH."""
    if have_prometheus and have_promtool:
        return Step("ok")
    if not have_apt:
        return Step(
            "stop",
            "Prometheus is not installed and this is not a Debian-like machine: install Prometheus 2.x so that "
            "`prometheus` and `promtool` are on PATH, then run `make test` again",
        )
    if not is_root:
        return Step(
            "stop",
            "Prometheus is not installed (the dashboard tests need it): run "
            "`sudo apt-get update && sudo apt-get install -y --no-install-recommends prometheus`, "
            "then `make test` again",
        )
    return Step(
        "run",
        "installing Prometheus from Debian's packages for the dashboard and alert-rule tests "
        "(apt-get install --no-install-recommends prometheus)",
        (("apt-get", "update", "-qq"), tuple(APT_INSTALL)),
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
    for step in (prometheus, postgres):
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
