"""Engine creation and schema migrations for the store (SQLite by default, PostgreSQL in production).

SQLite is tuned for many small concurrent writers (WAL, ``BEGIN IMMEDIATE`` so two writers never deadlock
upgrading a read lock); PostgreSQL gets a pre-pinged pool. Migrations run through Alembic programmatically,
so ``persona db upgrade`` works from any directory.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, SQLAlchemyError

from recsys.errors import PersonaError

log = logging.getLogger(__name__)
# Alembic narrates every plugin it loads at INFO; our own log line says what was migrated.
if logging.getLogger("alembic").level == logging.NOTSET:
    logging.getLogger("alembic").setLevel(logging.WARNING)

#: Execution option: a read-only SQLite transaction starts with a deferred BEGIN so it runs beside writers.
READ_ONLY = "persona_read_only"
#: Key of the PostgreSQL advisory lock held while migrating (any constant shared by all processes).
_MIGRATION_LOCK_KEY = 0x5045_5253_4F4E_4101  # "PERSONA\x01"
_URL_HINT = "set PERSONA_DATABASE_URL to a valid SQLAlchemy URL, e.g. sqlite:///data/persona.db"


def mask_url(url: str | URL) -> str:
    """The URL with its password hidden, for messages and logs."""
    if isinstance(url, URL):
        return url.render_as_string(hide_password=True)
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def _parse(url: str) -> URL:
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:
        raise PersonaError(f"database URL {mask_url(url)!r} is not a valid SQLAlchemy URL", _URL_HINT) from exc
    # psycopg (3) is the PostgreSQL driver we ship; accept the bare and the Heroku-style spellings.
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def _plain_sqlite_parameters() -> None:
    """Register identity adapters for the parameter types sqlite3 otherwise "adapts" by failing: in Python 3.11
    every parameter that is not exactly an int, float, str or bytearray (None, bool, bytes: a session row has
    several) is looked up as ``PrepareProtocol.__adapt__``, which formats and discards an ``AttributeError``
    (1.3 µs a parameter here; callgrind put it at 1.6 % of the consumer's instructions). An adapter registered for
    the type is found first. Each returns what sqlite3 would bind anyway (None as NULL, a bool as its int, bytes as
    a blob), with a C callable: no Python frame per parameter. Process-wide and idempotent."""
    none: Callable[[None], None] = cast(Callable[[None], None], {}.get)  # {}.get(None) is None
    sqlite3.register_adapter(type(None), none)
    sqlite3.register_adapter(bool, int)
    sqlite3.register_adapter(bytes, bytes)  # bytes(b) is b


def _sqlite_engine(url: URL) -> Engine:
    database = url.database or ""
    if database and database != ":memory:" and not database.startswith("file:"):
        try:
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PersonaError(
                f"cannot create the directory for the SQLite store {mask_url(url)!r}: {exc.strerror}",
                "set PERSONA_DATA_DIR or PERSONA_DATABASE_URL to a writable place",
            ) from exc
    _plain_sqlite_parameters()
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 10.0})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from pysqlite; the "begin" hook below emits our own BEGIN.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "busy_timeout=10000", "foreign_keys=ON"):
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Writers take the write lock up front: a deferred BEGIN that later upgrades can fail with
        # SQLITE_BUSY immediately (no busy wait), IMMEDIATE waits its turn instead.
        if conn.get_execution_options().get(READ_ONLY):
            conn.exec_driver_sql("BEGIN")
        else:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def make_engine(url: str) -> Engine:
    """Create an engine for ``url`` and check that the database answers.

    Raises :class:`PersonaError` (one line, password masked) if the URL is malformed, its driver is
    missing, or the database cannot be reached.
    """
    parsed = _parse(url)
    try:
        if parsed.get_backend_name() == "sqlite":
            engine = _sqlite_engine(parsed)
        elif parsed.get_backend_name() == "postgresql":
            engine = create_engine(parsed, pool_pre_ping=True, pool_size=10, max_overflow=20, pool_recycle=1800)
        else:
            engine = create_engine(parsed, pool_pre_ping=True)
    except (NoSuchModuleError, ImportError, ArgumentError) as exc:
        raise PersonaError(
            f"database URL {mask_url(parsed)!r} names an unsupported dialect or driver ({exc})", _URL_HINT
        ) from exc
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except DBAPIError as exc:
        engine.dispose()
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else type(exc).__name__
        raise PersonaError(
            f"cannot connect to the database {mask_url(parsed)!r}: {reason}",
            "check that the server is running, or fix PERSONA_DATABASE_URL",
        ) from exc
    return engine


def migrations_dir() -> Path:
    """The Alembic folder, found next to the code (never relative to the working directory)."""
    path = Path(__file__).resolve().parents[2] / "migrations"
    if not (path / "env.py").is_file():
        raise PersonaError(
            f"the migrations folder was not found at {path}",
            "run Persona from a source checkout (the migrations/ folder ships with the repository)",
        )
    return path


def alembic_config(url: str | None = None) -> Any:
    """An Alembic ``Config`` built in code; ``url`` is used only when no connection is handed over."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head_revision() -> str | None:
    """The newest revision among the migration scripts."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (``None`` for an empty database)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect().execution_options(**{READ_ONLY: True}) as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine_or_url: Engine | str, revision: str = "head") -> None:
    """Migrate the database to ``revision``; safe when several processes do it at once.

    Everything runs in one transaction: on PostgreSQL behind a transaction-scoped advisory lock, on SQLite
    behind ``BEGIN IMMEDIATE``. The second process waits, then finds the schema current and does nothing.
    """
    from alembic import command

    engine = make_engine(engine_or_url) if isinstance(engine_or_url, str) else engine_or_url
    cfg = alembic_config()
    try:
        with engine.connect() as conn, conn.begin():
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    finally:
        if isinstance(engine_or_url, str):
            engine.dispose()


def ensure_schema(engine: Engine) -> None:
    """Upgrade to head unless the database is already there (cheap check for every command)."""
    current, head = current_revision(engine), head_revision()
    if current != head:
        log.info("migrating the store %s from %s to %s", mask_url(engine.url), current or "empty", head)
        upgrade(engine)


@contextmanager
def temporary_database(server_url: str, prefix: str = "persona_tmp") -> Iterator[str]:
    """A fresh, uniquely named database on the PostgreSQL server at ``server_url``, dropped afterwards.

    For tests and benchmarks that must not touch real data. Yields the new database's URL (psycopg driver);
    an unreachable server is a :class:`PersonaError` naming it.
    """
    server = make_url(server_url)
    if server.drivername in ("postgresql", "postgres"):
        server = server.set(drivername="postgresql+psycopg")
    admin = create_engine(server.set(database="postgres"), isolation_level="AUTOCOMMIT")
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except SQLAlchemyError as exc:
        admin.dispose()
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise PersonaError(
            f"PostgreSQL at {server.render_as_string(hide_password=True)} is not usable ({reason})",
            "start it, or point PERSONA_TEST_POSTGRES_URL / --postgres-url at a server",
        ) from exc
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
