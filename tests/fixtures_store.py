"""Store fixtures: every store test runs on SQLite (a temp file) and on PostgreSQL (a fresh database).

PostgreSQL comes from ``PERSONA_TEST_POSTGRES_URL`` (default: the CI service). If it cannot be reached the
postgres variant FAILS rather than skips: CI guarantees the server, and a silent skip would hide half the
coverage.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from persona.store import Store

DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def _postgres_database() -> Iterator[str]:
    """Create ``persona_t_<random>`` through the ``postgres`` maintenance database; drop it afterwards."""
    server = make_url(os.environ.get("PERSONA_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL))
    if server.drivername in ("postgresql", "postgres"):
        server = server.set(drivername="postgresql+psycopg")
    admin = create_engine(server.set(database="postgres"), isolation_level="AUTOCOMMIT")
    name = f"persona_t_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except SQLAlchemyError as exc:
        admin.dispose()
        where = server.render_as_string(hide_password=True)
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        pytest.fail(
            f"PostgreSQL at {where} is not usable ({reason}); start it or set PERSONA_TEST_POSTGRES_URL",
            pytrace=False,
        )
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


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
