"""Store fixtures: every store test runs on SQLite (a temp file) and on PostgreSQL (a fresh database).

PostgreSQL comes from ``PERSONA_TEST_POSTGRES_URL`` (default: the CI service). If it cannot be reached the
postgres variant FAILS rather than skips: CI guarantees the server, and a silent skip would hide half the
coverage.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, make_url, text

from persona.store import Store
from persona.store.engine import temporary_database
from recsys.errors import PersonaError

DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def _postgres_database() -> Iterator[str]:
    """A fresh ``persona_t_<random>`` database on the server; a server that cannot be used FAILS the test."""
    database = temporary_database(os.environ.get("PERSONA_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL), "persona_t")
    try:
        url = database.__enter__()
    except PersonaError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield url
    finally:
        database.__exit__(None, None, None)


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty database (no tables): a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{(tmp_path / 'store' / 'persona.db').as_posix()}"
    else:
        yield from _postgres_database()


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    """A :class:`persona.store.Store` migrated to head."""
    opened = Store.open(store_url)
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def outage_db_url() -> Iterator[str]:
    """A throwaway PostgreSQL database that a test may take down with :func:`set_reachable` (the shared server
    keeps running for everyone else; only this database goes away)."""
    yield from _postgres_database()


def set_reachable(url: str, reachable: bool) -> None:
    """Open or close a database to connections; closing also ends its sessions: an outage, as the clients see it."""
    name = make_url(url).database
    admin = create_engine(make_url(url).set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(reachable).lower()}'))
            if not reachable:
                conn.execute(
                    text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"), {"n": name}
                )
    finally:
        admin.dispose()
