"""The store, on SQLite and PostgreSQL alike (every test runs on both through ``store_url``)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import inspect
from sqlalchemy.engine import make_url

from persona.store import (
    NewEvent,
    PrototypeRow,
    SessionState,
    Store,
    current_revision,
    head_revision,
    make_engine,
    upgrade,
)
from persona.store.engine import alembic_config
from persona.store.tables import Base
from recsys.errors import PersonaError

T0 = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)


def _event(event_id: str, session_id: str = "s-1", item_id: str = "1193") -> NewEvent:
    return NewEvent(event_id=event_id, session_id=session_id, item_id=item_id, ts=T0, attributes={"k": 1})


def _state(session_id: str = "s-1", **changes: object) -> SessionState:
    state = SessionState(
        session_id=session_id,
        device_id="phone-7",
        user_id="u-1",
        recent_items=["30", "2", "1193"],
        event_count=3,
        unknown_item_count=1,
        prototype_id=4,
        code=bytes(range(256)) * 2,
        edit_version=2,
        model_version="v1",
        last_event_at=T0.astimezone(timezone(timedelta(hours=2))),
        updated_at=T0 + timedelta(seconds=1),
    )
    for name, value in changes.items():
        setattr(state, name, value)
    return state


# -- schema -------------------------------------------------------------------------------------------------


def test_upgrade_creates_the_schema_and_is_idempotent(store_url: str) -> None:
    engine = make_engine(store_url)
    try:
        assert current_revision(engine) is None
        upgrade(engine)
        tables = set(inspect(engine).get_table_names())
        assert {"sessions", "events", "prototypes", "model_versions", "alembic_version"} <= tables
        assert current_revision(engine) == head_revision()
        upgrade(engine)  # a second run is a no-op
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()


def test_migrations_match_the_models(store: Store) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == []


def test_alembic_config_finds_migrations_from_any_cwd(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    assert Path(alembic_config().get_main_option("script_location") or "").is_dir()
    assert head_revision() is not None


def test_bad_database_url_is_a_persona_error(store_url: str, tmp_path: Path) -> None:
    if make_url(store_url).get_backend_name() == "sqlite":
        blocker = tmp_path / "a-file"
        blocker.write_text("not a directory")
        bad = f"sqlite:///{blocker}/sub/persona.db"
    else:
        missing = make_url(store_url).set(database="persona_t_does_not_exist", password="s3cret")
        bad = missing.render_as_string(hide_password=False)
    with pytest.raises(PersonaError) as info:
        make_engine(bad)
    assert "PERSONA_DATABASE_URL" in str(info.value) or "PERSONA_DATA_DIR" in str(info.value)
    assert "s3cret" not in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(PersonaError, match="not a valid SQLAlchemy URL"):
        make_engine("not a url")


# -- events -------------------------------------------------------------------------------------------------


def test_insert_events_dedups_within_and_across_batches(store: Store) -> None:
    with store.transaction() as uow:
        assert uow.insert_events([_event("e1"), _event("e2"), _event("e1")]) == {"e1", "e2"}
    with store.transaction() as uow:
        assert uow.insert_events([_event("e2"), _event("e3")]) == {"e3"}
        assert uow.insert_events([]) == set()
    assert store.count_events() == 3
    with store.read() as uow:
        logged = uow.get_events("s-1")
    assert [e.event_id for e in logged] == ["e1", "e2", "e3"]
    assert logged[0].ts == T0 and logged[0].attributes == {"k": 1} and logged[0].source == "kafka"


def test_insert_events_handles_batches_beyond_one_statement(store: Store) -> None:
    batch = [_event(f"e{i}", session_id=f"s-{i % 7}") for i in range(1234)]
    with store.transaction() as uow:
        assert len(uow.insert_events(batch)) == 1234
        assert uow.insert_events([*batch[1000:], _event("new")]) == {"new"}
    assert store.count_events() == 1235
    assert store.count_events("s-0") == len(range(0, 1234, 7))


def test_a_failed_transaction_leaves_nothing_behind(store: Store) -> None:
    with pytest.raises(RuntimeError), store.transaction() as uow:
        uow.insert_events([_event("e1")])
        uow.upsert_sessions([_state()])
        raise RuntimeError("crash before commit")
    assert store.count_events() == 0
    assert store.get_session("s-1") is None
    with store.transaction() as uow:  # the event is new again: it was never applied
        assert uow.insert_events([_event("e1")]) == {"e1"}


# -- sessions -----------------------------------------------------------------------------------------------


def test_upsert_then_get_returns_identical_state(store: Store) -> None:
    state = _state()
    with store.transaction() as uow:
        uow.upsert_sessions([state, _state("s-2", code=None, last_event_at=None, user_id=None)])
    loaded = store.get_session("s-1")
    assert loaded == state
    assert loaded is not None and loaded.code == bytes(range(256)) * 2
    assert loaded.recent_items == ["30", "2", "1193"]
    assert loaded.last_event_at is not None and loaded.last_event_at.utcoffset() == timedelta(0)
    with store.read() as uow:
        both = uow.get_sessions(["s-1", "s-2", "missing"])
    assert set(both) == {"s-1", "s-2"} and both["s-2"].code is None


def test_upsert_updates_existing_sessions(store: Store) -> None:
    with store.transaction() as uow:
        uow.upsert_sessions([_state()])
    newer = _state(recent_items=["2", "1193", "7"], event_count=4, code=b"\x01" * 8, edit_version=3)
    with store.transaction() as uow:
        uow.upsert_sessions([_state(event_count=99), newer])  # the last state of an id wins
    assert store.get_session("s-1") == newer


def test_naive_datetimes_are_refused(store: Store) -> None:
    with pytest.raises(Exception, match="naive datetime"), store.transaction() as uow:
        uow.upsert_sessions([_state(updated_at=datetime(2026, 1, 1))])


# -- prototypes ---------------------------------------------------------------------------------------------


def test_prototypes_save_lock_load_round_trip(store: Store) -> None:
    bank = [PrototypeRow(prototype_id=i, centre=bytes([i]) * 16, count=float(i)) for i in range(3)]
    with store.transaction() as uow:
        saved = uow.save_prototypes("v1", bank)
        uow.save_prototypes("v2", bank[:1])
    assert [(p.prototype_id, p.centre, p.count, p.version) for p in saved] == [
        (i, bytes([i]) * 16, float(i), 0) for i in range(3)
    ]
    with store.transaction() as uow:
        locked = uow.lock_prototypes("v1")
        assert locked == saved
        locked[1].count += 1.5
        locked[1].last_assigned_at = T0
        after = uow.save_prototypes("v1", [locked[1]])
    assert after[1].version == 1 and after[1].count == 2.5 and after[1].last_assigned_at == T0
    assert after[0] == saved[0]
    assert store.load_prototypes("v1") == after
    assert len(store.load_prototypes("v2")) == 1 and store.load_prototypes("nope") == []


# -- model registry -----------------------------------------------------------------------------------------

SHA_A, SHA_B = "a" * 64, "b" * 64


def test_reads_survive_a_later_additive_migration(store: Store) -> None:
    """Replicas of this version keep working while a newer one adds columns (rolling upgrades)."""
    with store.transaction() as uow:
        uow.upsert_sessions([_state()])
        uow.insert_events([_event("e1")])
        uow.register_model("v1", "/bundles/v1", SHA_A, {})
        uow.activate("v1")
    with store.transaction() as uow:
        for table in ("sessions", "events", "prototypes", "model_versions"):
            uow.connection.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN added_later INTEGER")
    assert store.get_session("s-1") == _state()
    with store.read() as uow:
        assert [e.event_id for e in uow.get_events()] == ["e1"]
    assert store.active_model() is not None and [m.version for m in store.list_models()] == ["v1"]
    assert store.load_prototypes("v1") == []


def test_register_is_idempotent_and_refuses_a_different_sha(store: Store) -> None:
    with store.transaction() as uow:
        first = uow.register_model("v1", "/bundles/v1", SHA_A, {"hr@10": 0.31})
        again = uow.register_model("v1", "/bundles/v1", SHA_A.upper(), {"hr@10": 0.31})
    assert first == again and first.metrics == {"hr@10": 0.31} and not first.active
    with pytest.raises(PersonaError, match="already registered"), store.transaction() as uow:
        uow.register_model("v1", "/bundles/v1", SHA_B)
    assert [m.version for m in store.list_models()] == ["v1"]


def test_activate_switches_the_single_active_version(store: Store) -> None:
    assert store.active_model() is None
    with store.transaction() as uow:
        uow.register_model("v1", "/b/v1", SHA_A)
        uow.register_model("v2", "/b/v2", SHA_B)
        uow.activate("v1")
    assert (m := store.active_model()) is not None and m.version == "v1"
    with store.transaction() as uow:
        assert uow.activate("v2").active
        uow.activate("v2")  # re-activating is harmless
    assert [(m.version, m.active) for m in store.list_models()] == [("v1", False), ("v2", True)]


def test_activate_unknown_version_lists_the_known_ones(store: Store) -> None:
    with store.transaction() as uow:
        uow.register_model("v1", "/b/v1", SHA_A)
    with (
        pytest.raises(PersonaError, match=r"unknown model version 'nope'; registered: v1"),
        store.transaction() as uow,
    ):
        uow.activate("nope")


# -- CLI ----------------------------------------------------------------------------------------------------


def test_cli_db_upgrade_and_models(
    store_url: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    tiny_bundle: Path,
) -> None:
    from persona_cli.main import main

    monkeypatch.setenv("PERSONA_DATABASE_URL", store_url)
    monkeypatch.chdir(tmp_path)  # migrations are found next to the code, not in the cwd
    assert main(["db", "upgrade"]) == 0
    assert main(["db", "current"]) == 0
    engine = make_engine(store_url)
    try:
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()

    capsys.readouterr()
    assert main(["models", "activate", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown model version 'nope'") and "\n" not in err

    from recsys.bundle import verify_bundle

    version = verify_bundle(tiny_bundle)["version"]
    assert main(["models", "register", str(tiny_bundle)]) == 0
    assert main(["models", "register", str(tiny_bundle)]) == 0  # idempotent
    assert main(["models", "activate", version]) == 0
    capsys.readouterr()
    assert main(["models", "list"]) == 0
    table = capsys.readouterr().out  # not a terminal: every identifier whole, one row per line
    row = next(line for line in table.splitlines() if version in line)
    assert str(tiny_bundle.resolve()) in row and "…" not in table
    assert main(["models", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(m["version"], m["active"], m["path"]) for m in listed] == [(version, True, str(tiny_bundle.resolve()))]
    assert len(listed[0]["sha256"]) == 64
    assert main(["db", "current", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["up_to_date"] is True
    capsys.readouterr()
    empty = tmp_path / "not-a-bundle"
    empty.mkdir()
    assert main(["models", "register", str(empty)]) == 2
    assert "manifest" in capsys.readouterr().err


@pytest.mark.parametrize(
    "value",
    [
        ["i1", "i 2", "~!#[]"],
        [],
        ["é"],
        ['quote"d'],
        ["back\\slash"],
        ["tab\t"],
        ["a", 1],
        [1, 2],
        {},
        {"k": ["v"]},
        "text",
        None,
    ],
)
def test_the_sqlite_hot_paths_json_is_what_sqlalchemy_writes(value: object) -> None:
    """The shortcut for recent items and empty attributes writes exactly ``json.dumps``'s text."""
    import json

    from persona.store.hot_path import hot_path

    converted = hot_path("sqlite")._json(value)
    assert converted == (None if value is None else json.dumps(value))


def test_a_sessions_item_counts_are_stored_as_their_own_json_text(store: Store) -> None:
    """Item counts carry their JSON text (recsys.repeats.StoredCounts), which both dialects' hot paths write as it
    is: what reads back is the stored form, and the counts rebuilt from it are the same, in the same order."""
    from persona.store.hot_path import hot_path
    from recsys.repeats import RepeatCounts

    counts: RepeatCounts[str] = RepeatCounts.of(["b", 'q"t', "é", "b", "back\\slash", "b"], size=3)
    stored = counts.to_json()
    assert hot_path("sqlite")._json(stored) == json.dumps(stored)
    with store.transaction() as uow:
        uow.upsert_sessions([_state(item_counts=stored)])
    loaded = store.get_session("s-1")
    assert loaded is not None and loaded.item_counts == json.loads(json.dumps(stored))
    back = RepeatCounts.from_json(loaded.item_counts, 3)
    assert back is not counts and back.entries() == counts.entries()


def test_a_sessions_copy_has_every_field_of_the_original() -> None:
    import dataclasses

    state = _state(user_state=b"\x01\x02", item_counts={"n": 1, "items": [["30", 1, 0, 1.0, 1.0]]})
    # every field set away from its default, so a field the copy forgot would show
    defaults = SessionState(session_id="other")
    for f in dataclasses.fields(SessionState):
        assert getattr(state, f.name) != getattr(defaults, f.name), f.name
    copied = state.copy()
    assert copied == dataclasses.replace(state)
    assert copied is not state
    copied.event_count += 1  # the consumer changes its own copy; the original stays as it was
    assert state.event_count == 3


def test_the_sqlite_hot_paths_time_text_is_isoformats() -> None:
    """The field-by-field time text is exactly ``isoformat(" ", "microseconds")`` without the offset (what
    SQLAlchemy writes for UTCDateTime), for any instant, years below 1000 and other time zones included."""
    import random

    from persona.store.hot_path import _sqlite_time

    rng = random.Random(0)
    start = datetime(1, 1, 1, tzinfo=UTC)
    span = int((datetime(9999, 12, 30, tzinfo=UTC) - start) / timedelta(microseconds=1))
    instants = [start + timedelta(microseconds=rng.randrange(span)) for _ in range(20_000)]
    instants += [datetime(999, 12, 31, 23, 59, 59, tzinfo=UTC), datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)]
    for t in instants:
        assert _sqlite_time(t) == t.isoformat(" ", "microseconds")[:26]
    east = datetime(2026, 1, 2, 1, 4, 5, 7, tzinfo=timezone(timedelta(hours=2)))
    assert _sqlite_time(east) == "2026-01-01 23:04:05.000007"
    assert _sqlite_time(None) is None


def test_sqlite_binds_none_bools_and_bytes_as_it_did_before_the_adapters(tmp_path: Path) -> None:
    """The identity adapters registered for SQLite stores (persona.store.engine._plain_sqlite_parameters) bind
    what sqlite3 bound without them: None as NULL, a bool as the integer, bytes as a blob; and a session row with
    every such field reads back the same."""
    import sqlite3

    opened = Store.open(f"sqlite:///{tmp_path}/adapters.db")
    try:
        for t in (type(None), bool, bytes):
            assert (t, sqlite3.PrepareProtocol) in sqlite3.adapters
        con = sqlite3.connect(":memory:")
        row = con.execute(
            "SELECT ?, typeof(?), ?, typeof(?), ?, typeof(?), ?", (None, None, True, True, b"\x00a", b"", False)
        )
        assert row.fetchone() == (None, "null", 1, "integer", b"\x00a", "blob", 0)
        state = _state(device_id=None, user_id=None, prototype_id=None, code=b"\x00\x01", user_state=b"")
        with opened.transaction() as uow:
            uow.upsert_sessions([state])
        loaded = opened.get_session("s-1")
        assert loaded is not None
        assert (loaded.device_id, loaded.prototype_id, loaded.code, loaded.user_state) == (None, None, b"\x00\x01", b"")
    finally:
        opened.close()
