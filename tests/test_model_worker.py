"""The consumer's model process (persona.ingest.model_worker): same result as in process, survives its own death."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from persona.events import Event
from persona.ingest import Ingestor
from persona.ingest.model_work import warm_up
from persona.ingest.model_worker import ModelWorker
from persona.models import ModelProvider
from persona.store import Store
from recsys.encoder_cache import EncoderCache, WindowRequest
from recsys.errors import PersonaError
from recsys.online import OnlineModel, code_from_bytes
from tests.test_ingest import _assert_same_sessions, _wipe, make_events


@pytest.fixture
def models(store: Store, tiny_bundle: Path) -> ModelProvider:
    return ModelProvider(store, model_dir=tiny_bundle)


def _counters(results: Sequence[Any]) -> list[tuple[Any, ...]]:
    return [(r.applied, r.duplicates, r.unknown_items, r.predictions, r.hits, r.prototypes) for r in results]


def _run(store: Store, models: ModelProvider, batches: list[list[Event]], *, model_process: bool) -> tuple[Any, ...]:
    """Apply the batches: the first two prepared together (the second on top of the pending first, as the consumer
    does while a commit runs), the rest one after another."""
    _wipe(store)
    ingestor = Ingestor(store, models, compute_threads=2, model_process=model_process)
    try:
        first = ingestor.prepare(batches[0])
        second = ingestor.prepare(batches[1], pending=[first])
        results = [ingestor.commit(first), ingestor.commit(second)]
        results += [ingestor.apply(batch) for batch in batches[2:]]
        worker = ingestor.model_worker
        starts = worker.starts if worker is not None else 0
    finally:
        ingestor.close()
    with store.read() as uow:
        sessions = uow.get_sessions({e.session_id for batch in batches for e in batch})
    version = results[0].model_version
    assert version is not None
    return sessions, results, store.load_prototypes(version), starts


def test_the_model_process_gives_the_in_process_result(store: Store, models: ModelProvider) -> None:
    """Pending batches, windows that restart, a batch with repeats (its work is dropped and redone): the model
    process ends where the compute threads do."""
    online = models.get()
    events = make_events(online, 900, sessions=12, seed=21)
    batches = [events[:40], events[40:300], events[300:301], [*events[250:320], *events[320:600]], events[600:]]
    here = _run(store, models, batches, model_process=False)
    there = _run(store, models, batches, model_process=True)
    assert there[3] == 1  # one process, started once
    _assert_same_sessions(there[0], here[0], online)
    assert _counters(there[1]) == _counters(here[1])
    assert there[1][3].duplicates == 51  # events 250 to 300 came before
    for mine, theirs in zip(there[1], here[1], strict=True):
        assert mine.edit_norm_ratios == pytest.approx(theirs.edit_norm_ratios, rel=1e-4, abs=1e-6)
    for mine, theirs in zip(there[2], here[2], strict=True):
        assert (mine.prototype_id, mine.count) == (theirs.prototype_id, theirs.count)
        torch.testing.assert_close(
            code_from_bytes(mine.centre, online.cfg), code_from_bytes(theirs.centre, online.cfg), atol=1e-5, rtol=1e-4
        )


def _wait_gone(pid: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} still running after {timeout_s}s")


def _warm_ingestor(store: Store, models: ModelProvider) -> tuple[Ingestor, ModelWorker]:
    """An ingestor whose model process is up (the caller closes the ingestor)."""
    ingestor = Ingestor(store, models, model_process=True)
    ingestor.warm()
    worker = ingestor.model_worker
    assert worker is not None and worker.pid is not None
    return ingestor, worker


def test_a_dead_model_process_fails_the_batch_and_the_next_one_starts_a_new_one(
    store: Store, models: ModelProvider
) -> None:
    online = models.get()
    events = make_events(online, 300, sessions=10, seed=22)
    ingestor, worker = _warm_ingestor(store, models)
    try:
        assert worker.starts == 1
        ingestor.apply(events[:100])
        prepared = ingestor.prepare(events[100:200])
        pid = worker.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(PersonaError, match="model process exited"):
            ingestor.commit(prepared)
        assert store.count_events() == 100  # nothing of the failed batch was written
        ingestor.apply(events[100:200])  # the consumer's retry: a new process
        ingestor.apply(events[200:])
        assert worker.starts == 2 and worker.pid not in (None, pid)
    finally:
        ingestor.close()
    assert worker.pid is None
    with store.read() as uow:
        sessions = uow.get_sessions({e.session_id for e in events})
    _wipe(store)
    alone = Ingestor(store, models)
    try:
        for start in (0, 100, 200):
            alone.apply(events[start : start + 100])
    finally:
        alone.close()
    with store.read() as uow:
        expected = uow.get_sessions({e.session_id for e in events})
    _assert_same_sessions(sessions, expected, online)


def test_closing_the_ingestor_stops_its_model_process(store: Store, models: ModelProvider) -> None:
    ingestor = Ingestor(store, models, model_process=True)
    ingestor.warm()
    worker = ingestor.model_worker
    assert worker is not None
    pid = worker.pid
    assert pid is not None
    ingestor.close()
    _wait_gone(pid)


def test_a_model_built_in_memory_is_worked_on_in_process(store: Store, models: ModelProvider) -> None:
    """The model process loads bundles by path; a model without one (built in memory) stays in this process."""
    online = models.get()
    online.path = None
    ingestor = Ingestor(store, models, model_process=True)
    try:
        ingestor.warm()
        result = ingestor.apply(make_events(online, 50, sessions=5, seed=23))
        worker = ingestor.model_worker
        assert result.applied == 50 and worker is not None and worker.starts == 0
    finally:
        ingestor.close()


def test_the_warm_up_job_runs_every_step_of_a_batch(tiny_bundle: Path) -> None:
    """Stored and in-batch previous states, cache and whole-window encoders: valid ranks for every prediction."""
    online = OnlineModel.load(tiny_bundle)
    plain = warm_up(online, with_cache=False)
    out = warm_up(online, with_cache=True)
    rows = 64
    assert out.codes.shape == (rows, online.cfg.n_edit_layers, online.cfg.code_dim)
    assert out.persona.shape == out.base.shape == (rows + rows // 2,)
    assert bool((out.persona >= 0).all()) and bool((out.persona < online.n_items).all())
    torch.testing.assert_close(plain.states, out.states, atol=1e-5, rtol=1e-4)  # the two encoders agree


def test_reserving_the_cache_changes_no_state(tiny_bundle: Path) -> None:
    """A cache reserved up front encodes what one that grows encodes (its slabs are zeros either way)."""
    online = OnlineModel.load(tiny_bundle)
    dm = online.model.device_model
    reserved, growing = EncoderCache(dm, 300), EncoderCache(dm, 300)
    reserved.reserve(100)
    assert reserved._slots == 100
    reserved.reserve(10_000)  # never beyond the capacity
    assert reserved._slots == 300 and growing._slots == 0
    gen = torch.Generator().manual_seed(3)
    lengths = [1 + r % online.cfg.max_len for r in range(200)]
    windows = [torch.randint(2, online.n_items, (n,), generator=gen).tolist() for n in lengths]
    requests = [WindowRequest(r, 0, w, len(w)) for r, w in enumerate(windows)]
    torch.testing.assert_close(reserved.encode(requests), growing.encode(requests))


def test_a_job_the_model_process_cannot_do_fails_its_batch_with_the_reason(
    store: Store, models: ModelProvider, tmp_path: Path
) -> None:
    """A bundle gone from its path (say): the batch fails with the process's reason; the process stays up."""
    online = models.get()
    events = make_events(online, 100, sessions=5, seed=25)
    ingestor = Ingestor(store, models, model_process=True)
    try:
        real = online.path
        online.path = tmp_path / "gone"
        with pytest.raises(PersonaError, match=r"model process failed.*gone"):
            ingestor.apply(events[:50])
        assert store.count_events() == 0
        online.path = real
        assert ingestor.apply(events[:50]).applied == 50
        worker = ingestor.model_worker
        assert worker is not None and worker.starts == 1
    finally:
        ingestor.close()


def test_a_model_process_that_stops_answering_is_replaced(store: Store, models: ModelProvider) -> None:
    """Stopped (SIGSTOP here; a deadlock, a swap storm): the commit gives up after the timeout instead of hanging,
    the process is killed, and the retried batch runs on a new one."""
    online = models.get()
    events = make_events(online, 100, sessions=5, seed=26)
    ingestor, worker = _warm_ingestor(store, models)
    try:
        worker.answer_timeout_s = 1.0
        stopped = worker.pid
        os.kill(stopped, signal.SIGSTOP)
        with pytest.raises(PersonaError, match="did not answer within 1 s"):
            ingestor.apply(events[:50])
        _wait_gone(stopped)
        assert store.count_events() == 0
        worker.answer_timeout_s = 120.0  # a new process needs a few seconds to start
        assert ingestor.apply(events[:50]).applied == 50
        assert worker.starts == 2
    finally:
        ingestor.close()
