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
