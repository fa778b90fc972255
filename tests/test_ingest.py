"""Ingestor.apply on a real store (SQLite and PostgreSQL) with a real tiny model: state, dedup, policies."""

from __future__ import annotations

import dataclasses
import math
import random
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import persona.ingest.ingestor as ingest_module
from persona.events import Event, RejectReason
from persona.ingest import KS, Ingestor, online_counter_increments
from persona.models import ModelProvider
from persona.store import Store, UnitOfWork
from persona.user_state import pack_user_state, unpack_user_state
from recsys.metrics import target_ranks
from recsys.model import count_next_items
from recsys.online import BankState, OnlineModel, code_from_bytes, refine_bank
from recsys.switch import neutral_switches, switches_to_bytes

T0 = datetime(2026, 11, 1, tzinfo=UTC)


@pytest.fixture
def models(store: Store, tiny_bundle: Path) -> ModelProvider:
    return ModelProvider(store, model_dir=tiny_bundle)


def make_events(online: OnlineModel, n: int, sessions: int, seed: int = 0, prefix: str = "e") -> list[Event]:
    rng = random.Random(seed)
    items = list(online.vocab.ids)
    return [
        Event(f"{prefix}{i}", f"s{rng.randrange(sessions)}", rng.choice(items), T0 + timedelta(seconds=i))
        for i in range(n)
    ]


def reference(online: OnlineModel, batches: Sequence[Sequence[Event]]) -> tuple[dict[str, dict[str, Any]], BankState]:
    """The same events applied one at a time through OnlineModel directly (no store, no batching of the model).

    Within a batch, assignments use the bank as it was when the batch started (the documented semantics).
    """
    bank = online.initial_bank
    state: dict[str, dict[str, Any]] = {}
    seen: set[str] = set()
    for batch in batches:
        start = bank
        codes, protos = [], []
        for e in batch:
            if e.event_id in seen:
                continue
            seen.add(e.event_id)
            s = state.setdefault(e.session_id, {"recent": [], "count": 0, "unknown": 0, "code": None, "proto": None})
            if not online.known(e.item_id):
                s["unknown"] += 1
                continue
            s["recent"] = [*s["recent"], e.item_id][-online.cfg.max_len :]
            code = online.codes(online.histories([s["recent"]]))
            proto = int(online.assign(code, start)[0])
            s.update(code=code[0], proto=proto, count=s["count"] + 1)
            codes.append(code[0])
            protos.append(proto)
        if codes:
            bank = refine_bank(start, torch.stack(codes), torch.tensor(protos), online.cfg)
    return state, bank


def test_batched_apply_equals_one_at_a_time_application(store: Store, models: ModelProvider) -> None:
    online = models.get()
    events = make_events(online, 600, sessions=15)
    batches = [events[:250], events[250:260], events[260:]]  # sessions span batches: stored state is reused
    ingestor = Ingestor(store, models)
    for batch in batches:
        ingestor.apply(batch)
    expected, bank = reference(online, batches)

    with store.read() as uow:
        stored = uow.get_sessions(list(expected))
    assert set(stored) == set(expected)
    for sid, exp in expected.items():
        got = stored[sid]
        assert got.recent_items == exp["recent"]
        assert got.event_count == exp["count"] == got.edit_version
        assert got.prototype_id == exp["proto"]
        assert got.model_version == online.version
        assert got.code is not None
        torch.testing.assert_close(code_from_bytes(got.code, online.cfg), exp["code"], atol=1e-5, rtol=1e-4)
        # the encoder's output for the stored history, tagged with its edit version, reused by the API
        user_state = unpack_user_state(got.user_state, got.edit_version, online.cfg)
        assert user_state is not None
        expected_state = online.user_states(online.histories([exp["recent"]], [exp["count"] - len(exp["recent"])]))[0]
        torch.testing.assert_close(user_state, expected_state, atol=1e-5, rtol=1e-4)
    rows = store.load_prototypes(online.version)
    centres = torch.stack([code_from_bytes(r.centre, online.cfg) for r in rows])
    torch.testing.assert_close(centres, bank.centres, atol=1e-5, rtol=1e-4)
    assert [r.count for r in rows] == pytest.approx(bank.counts.tolist())
    assert store.count_events() == len(events)


def test_duplicates_are_applied_once_within_and_across_batches(store: Store, models: ModelProvider) -> None:
    online = models.get()
    a, b = make_events(online, 2, sessions=1)
    ingestor = Ingestor(store, models)
    first = ingestor.apply([a, b, a])
    assert (first.applied, first.duplicates) == (2, 1)
    state = store.get_session(a.session_id)
    again = ingestor.apply([b, a])
    assert (again.applied, again.duplicates) == (0, 2)
    assert store.get_session(a.session_id) == state
    assert store.count_events() == 2


def _wipe(store: Store) -> None:
    with store.transaction() as uow:
        for table in ("sessions", "events", "prototypes"):
            uow.connection.exec_driver_sql(f"DELETE FROM {table}")


def _outcome(store: Store, results: Sequence[Any], session_ids: set[str]) -> tuple[Any, ...]:
    with store.read() as uow:
        sessions = uow.get_sessions(session_ids)
    for st in sessions.values():
        st.updated_at = T0  # wall-clock stamps differ between runs
    counters = [(r.applied, r.duplicates, r.predictions, r.hits, r.prototypes, r.edit_norm_ratios) for r in results]
    centres = [(p.prototype_id, p.centre, p.count) for p in store.load_prototypes(results[0].model_version)]
    return sessions, counters, centres


def _assert_same_sessions(got: dict[str, Any], want: dict[str, Any], online: OnlineModel) -> None:
    """Equal sessions, user states up to float rounding (encoder caches encode windows in different pieces)."""
    assert got.keys() == want.keys()
    for sid, st in got.items():
        ref = want[sid]
        mine, theirs = (
            unpack_user_state(st.user_state, st.edit_version, online.cfg),
            unpack_user_state(ref.user_state, ref.edit_version, online.cfg),
        )
        assert mine is not None and theirs is not None
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-4)
        assert dataclasses.replace(st, user_state=None, updated_at=T0) == dataclasses.replace(
            ref, user_state=None, updated_at=T0
        )


def _assert_same_state(got: tuple[Any, ...], want: tuple[Any, ...], online: OnlineModel) -> None:
    """:func:`_outcome` s equal up to float rounding in the user states."""
    _assert_same_sessions(got[0], want[0], online)
    assert got[1:] == want[1:]


def test_compute_threads_do_not_change_the_result(store: Store, models: ModelProvider) -> None:
    """Encoder chunks, adapter codes and predictions on two threads give exactly the one-thread result."""
    online = models.get()
    events = make_events(online, 700, sessions=30, seed=5)
    batches = [events[:300], events[300:310], events[310:]]
    outcomes = []
    for threads in (1, 2):
        _wipe(store)
        ingestor = Ingestor(store, models, compute_threads=threads)
        try:
            results = [ingestor.apply(batch) for batch in batches]
        finally:
            ingestor.close()
        outcomes.append(_outcome(store, results, {e.session_id for e in events}))
    assert outcomes[0] == outcomes[1]


def test_the_encoder_cache_changes_nothing_but_float_rounding(store: Store, models: ModelProvider) -> None:
    """Windows that grow across batches, restart within one (a session's events split between two windows) and
    sessions evicted from a small cache: the same state as encoding every window whole."""
    online = models.get()
    assert online.cfg.stride > 0
    events = make_events(online, 900, sessions=12, seed=12)  # ~75 events a session: several windows each
    batches = [events[:40], events[40:41], events[41:400], events[400:]]
    runs = []
    for cache_sessions in (0, 5, 4096):
        _wipe(store)
        ingestor = Ingestor(store, models, session_cache=cache_sessions, compute_threads=2)
        try:
            results = [ingestor.apply(batch) for batch in batches]
        finally:
            ingestor.close()
        with store.read() as uow:
            runs.append((uow.get_sessions({e.session_id for e in events}), results))
    (plain, plain_results), *cached_runs = runs
    for sessions, results in cached_runs:
        _assert_same_sessions(sessions, plain, online)
        for r, ref_r in zip(results, plain_results, strict=True):
            assert (r.applied, r.predictions, r.hits, r.prototypes) == (
                ref_r.applied,
                ref_r.predictions,
                ref_r.hits,
                ref_r.prototypes,
            )


def test_a_sliding_window_model_is_served_as_it_was_trained(store: Store, sliding_window_bundle: Path) -> None:
    """A bundle trained before windows had a stride keeps its sliding window (the last max_len items, positions
    counted back from the most recent) and goes without the encoder cache."""
    models = ModelProvider(store, model_dir=sliding_window_bundle)
    online = models.get()
    assert online.cfg.stride == 0
    events = make_events(online, 200, sessions=3, seed=14)  # ~65 events a session: the window slides
    ingestor = Ingestor(store, models)
    try:
        for start in range(0, 200, 50):
            ingestor.apply(events[start : start + 50])
        assert ingestor._encoder_cache(online) is None
    finally:
        ingestor.close()
    with store.read() as uow:
        sessions = uow.get_sessions({e.session_id for e in events})
    for st in sessions.values():
        assert st.event_count > online.cfg.max_len
        got = unpack_user_state(st.user_state, st.edit_version, online.cfg)
        expected = online.user_states(online.histories([st.recent_items], [st.event_count - len(st.recent_items)]))
        assert got is not None
        torch.testing.assert_close(got, expected[0], atol=1e-5, rtol=1e-4)
        padded = online.histories([st.recent_items])[0]
        assert int((padded != 0).sum()) == online.cfg.max_len  # the whole stored history, not a window of it


def test_a_remembered_session_another_writer_changed_is_read_again(store: Store, models: ModelProvider) -> None:
    """An ingestor keeps the sessions it committed; when another writer (the HTTP route, a second consumer) has
    changed one since, the commit sees it and works from the store's version: nothing is lost."""
    online = models.get()
    events = make_events(online, 90, sessions=3, seed=13)
    first, other = Ingestor(store, models), Ingestor(store, models)
    try:
        r1 = first.apply(events[:30])
        r2 = other.apply(events[30:60])
        p3 = first.prepare(events[60:])
        r3 = first.commit(p3)
        assert p3.replanned  # what it remembered was stale
    finally:
        first.close()
        other.close()
    changed = _outcome(store, [r1, r2, r3], {e.session_id for e in events})  # three encoder caches: rounding
    _wipe(store)
    alone = Ingestor(store, models)
    try:
        expected = _outcome(
            store, [alone.apply(b) for b in (events[:30], events[30:60], events[60:])], {e.session_id for e in events}
        )
    finally:
        alone.close()
    _assert_same_state(changed, expected, online)


def test_a_batch_with_duplicates_ends_like_one_without_them(store: Store, models: ModelProvider) -> None:
    """The model work started before the dedup is redone for the new events only when some are repeats."""
    online = models.get()
    events = make_events(online, 200, sessions=8, seed=6)
    ingestor = Ingestor(store, models)
    clean = [ingestor.apply(events[:120]), ingestor.apply(events[120:])]
    expected = _outcome(store, clean, {e.session_id for e in events})
    _wipe(store)
    redone = [ingestor.apply(events[:120]), ingestor.apply(events[100:])]  # 20 repeats lead the second batch
    assert redone[1].duplicates == 20 and redone[1].applied == 80
    redone[1].duplicates = 0  # the one expected difference
    assert _outcome(store, redone, {e.session_id for e in events}) == expected


def _sequential_outcome(store: Store, models: ModelProvider, batches: list[list[Event]]) -> tuple[Any, ...]:
    """The batches applied one after another by a fresh ingestor; the store is wiped afterwards."""
    sequential = Ingestor(store, models, compute_threads=2)
    try:
        expected = _outcome(store, [sequential.apply(b) for b in batches], {e.session_id for b in batches for e in b})
    finally:
        sequential.close()
    _wipe(store)
    return expected


def test_batches_prepared_on_top_of_pending_ones_end_like_sequential_ones(store: Store, models: ModelProvider) -> None:
    """The consumer prepares batch n+1 while batch n commits, taking n's sessions from n: same end state."""
    online = models.get()
    events = make_events(online, 450, sessions=12, seed=8)
    batches = [events[:150], events[150:300], events[300:]]
    expected = _sequential_outcome(store, models, batches)
    ingestor = Ingestor(store, models, compute_threads=2)  # a new one: the first remembers what was wiped
    try:
        p1 = ingestor.prepare(batches[0])
        p2 = ingestor.prepare(batches[1], pending=[p1])
        assert p2.depends_on == [p1]
        r1 = ingestor.commit(p1)
        p3 = ingestor.prepare(batches[2], pending=[p2])
        r2, r3 = ingestor.commit(p2), ingestor.commit(p3)
        assert not (p2.replanned or p3.replanned)  # nothing to redo: every read held
        assert _outcome(store, [r1, r2, r3], {e.session_id for e in events}) == expected
    finally:
        ingestor.close()


def test_a_batch_prepared_while_the_one_below_writes_takes_its_outcome_as_stored(
    store: Store, models: ModelProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once a commit has its model outcome (``concluded``), the consumer prepares the next batch while it writes:
    that batch reads the sessions' new states as if stored, so their predictions are scored early, not left for
    its own commit; the end state is the sequential one."""
    online = models.get()
    events = make_events(online, 450, sessions=12, seed=24)
    batches = [events[:150], events[150:300], events[300:]]
    expected = _sequential_outcome(store, models, batches)
    writing, prepared = threading.Event(), threading.Event()
    real_refine = ingest_module.refine_bank

    def pausing_refine(*args: Any) -> Any:  # runs after the outcome is concluded, before the writes
        if not writing.is_set():
            writing.set()
            assert prepared.wait(30)
        return real_refine(*args)

    monkeypatch.setattr(ingest_module, "refine_bank", pausing_refine)
    ingestor = Ingestor(store, models, compute_threads=2)
    try:
        p1 = ingestor.prepare(batches[0])
        with ThreadPoolExecutor(1) as applier:
            first = applier.submit(ingestor.commit, p1)
            assert writing.wait(30) and p1.concluded.is_set()
            p2 = ingestor.prepare(batches[1], pending=[p1])
            prepared.set()
            r1 = first.result()
        assert p2.plan is not None and p2.work is not None and p2.work.job is not None
        stored = [n for n, (row, _item) in enumerate(p2.plan.pre_rows) if row < -1]
        assert stored and p2.work.job.early.which == stored  # every one scored early
        r2, r3 = ingestor.commit(p2), ingestor.apply(batches[2])
        assert not p2.replanned
        assert _outcome(store, [r1, r2, r3], {e.session_id for e in events}) == expected
    finally:
        ingestor.close()


def test_a_batch_prepared_on_one_that_is_redone_is_redone_too(store: Store, models: ModelProvider) -> None:
    online = models.get()
    events = make_events(online, 300, sessions=6, seed=9)
    first, second, third = events[:100], events[80:200], events[200:]  # the second repeats 20 of the first
    ingestor = Ingestor(store, models)
    expected = _outcome(
        store, [ingestor.apply(first), ingestor.apply(second), ingestor.apply(third)], {e.session_id for e in events}
    )
    _wipe(store)
    r1 = ingestor.apply(first)
    p2 = ingestor.prepare(second)
    p3 = ingestor.prepare(third, pending=[p2])
    r2 = ingestor.commit(p2)
    assert p2.replanned and r2.duplicates == 20
    r3 = ingestor.commit(p3)
    assert p3.replanned  # it read sessions from the plan p2 dropped
    assert _outcome(store, [r1, r2, r3], {e.session_id for e in events}) == expected


def test_a_write_between_prepare_and_commit_is_not_lost(store: Store, models: ModelProvider) -> None:
    """Another writer (the HTTP path, another consumer) changing a session after prepare read it: commit redoes."""
    online = models.get()
    events = make_events(online, 240, sessions=5, seed=10)
    a, b, c = events[:80], events[80:160], events[160:]
    ingestor = Ingestor(store, models)
    expected = _outcome(store, [ingestor.apply(x) for x in (a, b, c)], {e.session_id for e in events})
    _wipe(store)
    ra = ingestor.apply(a)
    pc = ingestor.prepare(c)  # reads the sessions as a left them
    rb = Ingestor(store, models).apply(b)  # someone else writes them meanwhile
    rc = ingestor.commit(pc)
    assert pc.replanned
    assert _outcome(store, [ra, rb, rc], {e.session_id for e in events}) == expected


def test_unknown_item_skip_policy_logs_and_counts_without_touching_the_model_state(
    store: Store, models: ModelProvider
) -> None:
    online = models.get()
    (known,) = make_events(online, 1, sessions=1)
    unknown = Event("u1", known.session_id, "never-seen-item", T0 + timedelta(minutes=1))
    result = Ingestor(store, models).apply([known, unknown])
    assert (result.applied, result.unknown_items, result.rejected) == (1, 1, [])
    state = store.get_session(known.session_id)
    assert state is not None
    assert state.recent_items == [known.item_id]
    assert (state.event_count, state.unknown_item_count, state.edit_version) == (1, 1, 1)
    with store.read() as uow:
        logged = {e.event_id: e.known_item for e in uow.get_events(known.session_id)}
    assert logged == {known.event_id: True, "u1": False}


def test_unknown_item_dlq_policy_rejects_without_logging(store: Store, models: ModelProvider) -> None:
    online = models.get()
    (known,) = make_events(online, 1, sessions=1)
    unknown = Event("u1", known.session_id, "never-seen-item", T0 + timedelta(minutes=1))
    result = Ingestor(store, models, unknown_item_policy="dlq").apply([unknown, known])
    assert result.applied == 1
    assert [(e.event_id, r.reason) for e, r in result.rejected] == [("u1", RejectReason.UNKNOWN_ITEM)]
    assert store.count_events() == 1
    state = store.get_session(known.session_id)
    assert state is not None and state.unknown_item_count == 0


def test_first_event_of_a_session_makes_no_prediction(store: Store, models: ModelProvider) -> None:
    online = models.get()
    result = Ingestor(store, models).apply(make_events(online, 1, sessions=1))
    assert result.applied == 1
    assert result.predictions == {"persona": 0, "base": 0}
    assert sum(result.hits.values()) == 0


def test_hit_counters_match_a_hand_computation(store: Store, models: ModelProvider) -> None:
    online = models.get()
    items = list(online.vocab.ids)
    seq = [items[3], items[7], items[3], items[11]]
    events = [Event(f"h{i}", "hand", item, T0 + timedelta(seconds=i)) for i, item in enumerate(seq)]
    result = Ingestor(store, models).apply(events)

    bank = online.initial_bank
    expected_ranks: dict[str, list[int]] = {"persona": [], "base": []}
    for i in range(1, len(seq)):
        hist = online.histories([seq[:i]])
        code = online.codes(hist)
        edit = online.edit(code, bank, online.assign(code, bank), hist)
        target = torch.tensor([online.index_of(seq[i])])
        expected_ranks["persona"].append(int(online.target_ranks(hist, target, edit)[0]))
        expected_ranks["base"].append(int(online.target_ranks(hist, target)[0]))
    for variant, ranks in expected_ranks.items():
        assert result.predictions[variant] == 3
        assert result.reciprocal_rank[variant] == pytest.approx(sum(1 / (r + 1) for r in ranks))
        for k in KS:
            assert result.hits[(variant, k)] == sum(r < k for r in ranks)
            assert result.ndcg[(variant, k)] == pytest.approx(sum(1 / math.log2(r + 2) for r in ranks if r < k))
    assert len(result.prototypes) == len(result.ood_scores) == len(result.freshness_s) == 4
    assert all(x >= 0 for x in result.edit_norm_ratios)


@pytest.mark.parametrize("stale", ["none", "no-user-state", "other-model", "older-writer"])
def test_predictions_from_stored_states_equal_those_within_one_batch(
    store: Store, models: ModelProvider, stale: str
) -> None:
    """Scoring from the stored user state (or recomputing it when unusable) gives the in-batch base counters.

    (Persona's depend on the bank each batch starts from, which differs between one batch and two.)
    """
    online = models.get()
    events = make_events(online, 300, sessions=12, seed=3)
    whole = Ingestor(store, models).apply(events)

    with store.transaction() as uow:
        uow.connection.exec_driver_sql("DELETE FROM sessions")
        uow.connection.exec_driver_sql("DELETE FROM events")
        uow.connection.exec_driver_sql("DELETE FROM prototypes")
    ingestor = Ingestor(store, models)
    first = ingestor.apply(events[:140])
    if stale != "none":
        with store.read() as uow:
            states = uow.get_sessions({e.session_id for e in events})
        for st in states.values():
            if stale == "no-user-state":
                st.user_state = None  # a row written before migration 0002
            elif stale == "older-writer":
                # A consumer of an earlier release updated the row (its edit version moved on) without knowing
                # the column: the state left in place is for an older history and must not be used.
                st.user_state = pack_user_state(torch.zeros(online.cfg.dim), st.edit_version - 1)
            else:
                cfg = online.cfg  # right sizes, other model: must be recomputed, not reused
                st.model_version, st.code, st.user_state = "older-model", st.code, bytes(4 * cfg.dim)
        with store.transaction() as uow:
            uow.upsert_sessions(list(states.values()))
    second = ingestor.apply(events[140:])
    for variant in ("persona", "base"):
        assert first.predictions[variant] + second.predictions[variant] == whole.predictions[variant]
    assert first.reciprocal_rank["base"] + second.reciprocal_rank["base"] == pytest.approx(
        whole.reciprocal_rank["base"], rel=1e-6
    )
    for k in KS:
        assert first.hits[("base", k)] + second.hits[("base", k)] == whole.hits[("base", k)]
    assert len(first.edit_norm_ratios) + len(second.edit_norm_ratios) == whole.predictions["persona"]


def test_a_failed_transaction_leaves_nothing_behind(
    store: Store, models: ModelProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    online = models.get()
    events = make_events(online, 40, sessions=4)
    ingestor = Ingestor(store, models)
    ingestor.apply(events[:20])
    with store.read() as uow:
        sessions_before = uow.get_sessions({e.session_id for e in events})
    bank_before = [(r.prototype_id, r.centre, r.count, r.version) for r in store.load_prototypes(online.version)]

    def fail(self: UnitOfWork, states: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(UnitOfWork, "upsert_sessions", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        ingestor.apply(events[20:])
    monkeypatch.undo()

    assert store.count_events() == 20
    with store.read() as uow:
        assert uow.get_sessions({e.session_id for e in events}) == sessions_before
    after = [(r.prototype_id, r.centre, r.count, r.version) for r in store.load_prototypes(online.version)]
    assert after == bank_before
    # and the same batch applies cleanly afterwards (the consumer's retry)
    assert ingestor.apply(events[20:]).applied == 20


def _summed(*results: Any) -> dict[tuple[str, str, int], float]:
    out: dict[tuple[str, str, int], float] = {}
    for result in results:
        for key, value in online_counter_increments(result).items():
            out[key] = out.get(key, 0.0) + value
    return {key: value for key, value in out.items() if value}


def test_online_counters_are_exactly_once_with_the_events_they_count(
    store: Store, models: ModelProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The prequential counters live in the store and change in the events' transaction: a transaction that fails
    after adding its counts adds nothing, and a redelivered event is a duplicate that counts nothing again."""
    online = models.get()
    events = make_events(online, 60, sessions=4)
    ingestor = Ingestor(store, models)
    first = ingestor.apply(events[:30])
    assert store.online_counters() == pytest.approx(_summed(first))

    real = UnitOfWork.add_online_counters

    def add_then_crash(self: UnitOfWork, increments: Any) -> None:
        real(self, increments)
        raise RuntimeError("crash before the commit")

    monkeypatch.setattr(UnitOfWork, "add_online_counters", add_then_crash)
    with pytest.raises(RuntimeError, match="crash before the commit"):
        ingestor.apply(events[30:])
    monkeypatch.undo()
    assert store.online_counters() == pytest.approx(_summed(first))

    second = ingestor.apply(events[30:])  # the retry
    redelivered = ingestor.apply(events)  # everything again: duplicates
    assert redelivered.duplicates == len(events)
    counters = store.online_counters()
    assert counters == pytest.approx(_summed(first, second))
    for variant in ("persona", "base"):
        assert counters[("predictions", variant, 0)] == len(events) - 4  # a session's first event predicts nothing
        assert 0 <= counters.get(("hits", variant, 10), 0) <= counters.get(("hits", variant, 20), 0) <= 56


def test_ood_and_item_indices_are_per_applied_event(store: Store, models: ModelProvider) -> None:
    online = models.get()
    events = make_events(online, 50, sessions=5)
    result = Ingestor(store, models).apply(events)
    assert result.item_indices == [online.index_of(e.item_id) for e in events]
    assert np.all(np.isfinite(result.ood_scores))
    assert result.bank_version >= 0 and result.model_version == online.version


def test_recent_items_are_capped_at_max_recent(store: Store, models: ModelProvider) -> None:
    online = models.get()
    events = make_events(online, 6, sessions=1)
    ingestor = Ingestor(store, models, max_recent=3)
    ingestor.apply(events[:4])
    ingestor.apply(events[4:])
    state = store.get_session(events[0].session_id)
    assert state is not None
    assert state.recent_items == [e.item_id for e in events[-3:]]
    assert state.event_count == 6


def test_idle_prototypes_are_reseeded_at_the_batchs_worst_served_codes(store: Store, models: ModelProvider) -> None:
    online = models.get()
    ingestor = Ingestor(store, models, prototype_idle_s=0.0)  # anything not assigned in a batch counts as idle
    ingestor.apply(make_events(online, 50, sessions=5, prefix="a"))  # seeds the bank
    before = {r.prototype_id: r for r in store.load_prototypes(online.version)}
    second = ingestor.apply(make_events(online, 1, sessions=1, seed=7, prefix="b"))  # one event: one code
    (session,) = second.sessions.values()
    assert session.code is not None
    code = code_from_bytes(session.code, online.cfg)
    after = {r.prototype_id: r for r in store.load_prototypes(online.version)}
    reseeded = [k for k in after if k not in second.prototypes and after[k].centre != before[k].centre]
    assert len(reseeded) == 1  # one code in the batch: one idle prototype takes it over
    assert after[reseeded[0]].count == 0
    torch.testing.assert_close(code_from_bytes(after[reseeded[0]].centre, online.cfg), code)
    # a new group: its switches start over with every term on (the bundle's were started on validation)
    assert before[reseeded[0]].switches != switches_to_bytes(neutral_switches(1)[0])
    assert after[reseeded[0]].switches == switches_to_bytes(neutral_switches(1)[0])

    quiet = Ingestor(store, models, prototype_idle_s=None)
    result = quiet.apply(make_events(online, 3, sessions=1, seed=9, prefix="c"))
    latest = {r.prototype_id: r.centre for r in store.load_prototypes(online.version)}
    assert all(latest[k] == after[k].centre for k in after if k not in set(result.prototypes))


def test_the_in_process_ingest_benchmark_runs(tiny_bundle: Path) -> None:
    """bench/ingest_apply.py (quoted in docs/performance.md) keeps working."""
    import json
    import subprocess
    import sys

    root = Path(__file__).parents[1]
    cmd = [sys.executable, str(root / "bench" / "ingest_apply.py"), "--model", str(tiny_bundle)]
    cmd += ["--warm", "1", "--batches", "2", "--batch", "50", "--sessions", "20"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["events_per_s"] > 0 and result["batch"] == 50


@pytest.fixture
def bias_models(store: Store, group_bias_bundle: Path) -> ModelProvider:
    return ModelProvider(store, model_dir=group_bias_bundle)


def test_the_prequential_check_scores_with_the_group_bias(store: Store, bias_models: ModelProvider) -> None:
    """Persona's live ranks include the prototypes' group bias (and the fine and history groups'), exactly as the
    offline definition scores it."""
    online = bias_models.get()
    assert online.initial_bank.next_items is not None
    items = list(online.vocab.ids)
    seq = [items[3], items[7], items[3], items[11], items[5]]
    events = [Event(f"g{i}", "group", item, T0 + timedelta(seconds=i)) for i, item in enumerate(seq)]
    result = Ingestor(store, bias_models).apply(events)
    model = online.model
    ranks, plain = [], []
    for i in range(1, len(seq)):
        hist = online.histories([seq[:i]])
        edit = model.edit_for(online.codes(hist), "prototype", hist)
        assert edit.groups is not None  # the bundle's history groups are scored too
        target = torch.tensor([online.index_of(seq[i])])
        with torch.inference_mode():
            scores = model.score(hist, edit)  # recsys.model: device model + group bias + fine and history groups
            plain_scores = model.device_model(hist, edit)
        ranks.append(int(target_ranks(scores, target)[0]))
        plain.append(int(target_ranks(plain_scores, target)[0]))
        assert int(online.target_ranks(hist, target, edit)[0]) == ranks[-1]
    assert ranks != plain  # the bias changes the ranking here, so the check below can fail
    assert result.reciprocal_rank["persona"] == pytest.approx(sum(1 / (r + 1) for r in ranks))


def test_group_counts_are_refined_after_scoring_and_stored(store: Store, bias_models: ModelProvider) -> None:
    """Each prediction's prototype counts the item its session chose, decayed per member event, once the batch is
    scored; the counts are stored with the bank and the next batch (and the API) reads them back."""
    online = bias_models.get()
    initial = online.initial_bank.next_items
    assert initial is not None
    events = make_events(online, 300, sessions=12, seed=5)
    batches = [events[:120], events[120:121], events[121:]]
    ingestor = Ingestor(store, bias_models)
    expected = initial.clone()
    last_proto: dict[str, int] = {}
    for batch in batches:
        result = ingestor.apply(batch)
        protos, chosen = [], []
        for e, proto in zip(batch, result.prototypes, strict=True):
            if e.session_id in last_proto:  # a prediction from the session's previous state
                protos.append(last_proto[e.session_id])
                chosen.append(online.index_of(e.item_id))
            last_proto[e.session_id] = proto
        count_next_items(expected, torch.tensor(protos), torch.tensor(chosen), online.cfg.group_bias_decay)
        rows = store.load_prototypes(online.version)
        stored = torch.from_numpy(np.stack([np.frombuffer(r.next_items or b"", dtype=np.float32) for r in rows]))
        torch.testing.assert_close(stored, expected, atol=1e-4, rtol=1e-5)
    assert not torch.equal(expected, initial)


def test_a_bundle_from_before_group_counts_loads_and_ingests(store: Store, pre_group_bias_bundle: Path) -> None:
    models = ModelProvider(store, model_dir=pre_group_bias_bundle)
    online = models.get()
    assert online.cfg.group_bias_weight == 0.0
    assert online.initial_bank.next_items is None
    assert not bool(online.model.bank.next_items.any())
    result = Ingestor(store, models).apply(make_events(online, 50, sessions=5))
    assert result.applied == 50
    assert all(r.next_items is None for r in store.load_prototypes(online.version))
    hist = online.histories([list(online.vocab.ids)[:4]])
    edit = online.edit(online.codes(hist))
    with torch.inference_mode():
        torch.testing.assert_close(online.scores(hist, edit)[:, 2:], online.model.device_model(hist, edit)[:, 2:])
