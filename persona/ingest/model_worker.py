"""The consumer's model work in a process of its own (``PERSONA_CONSUMER_MODEL_PROCESS``).

Why: one consumer process is one GIL. Measured at ~7,500 events/s on two cores (docs/performance.md, "Fourth
round"), the consumer used about one core, and a batch's model work (~55 % of the cost of an event: encoder,
adapter, prequential check) ran at a third of its single-threaded speed, queued for the GIL behind the Kafka
poller, the parser and the store writes; the commit waited for it. In a process of its own it has its own GIL
(and core), while the consumer's process polls, parses and writes.

The protocol is small and one-way in data: the ingestor sends a :class:`persona.ingest.model_work.ModelJob` when it
prepares a batch, and, once the commit has read the prototype bank, the bank and the stored previous states; it
gets the :class:`persona.ingest.model_work.Outcome` back. The process keeps what must persist between batches: the model
(loaded from the bundle path the registry gave, by version) and its encoder cache. Jobs carry the model version,
so a model swap needs no message of its own.

Failure: if the process dies, every job waiting on it fails with a :class:`PersonaError` (the consumer then retries
the batch, as for any failed batch), and the next job starts a new process; one that stops answering is killed
after ``answer_timeout_s`` (120 s), with the same effect. It also dies with the consumer: it
exits when its pipe closes. Messages are plain pickles of tuples, lists and numpy arrays (tensors pickle ~8×
slower, and torch's multiprocessing pickler would move them through shared memory files).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing as mp
import pickle
import signal
import sys
import threading
import traceback
from collections import OrderedDict, deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from persona.ingest.model_work import (
    EarlyInput,
    ModelJob,
    Outcome,
    Started,
    encoder_cache_for,
    outcome,
    start_job,
    warm_up,
)
from recsys.encoder_cache import EncoderCache, WindowRequest
from recsys.errors import PersonaError
from recsys.online import BankState, OnlineModel
from recsys.repeat_rows import PreparedRows

log = logging.getLogger(__name__)

__all__ = ["ModelWorker", "RemoteJob"]

#: Model versions the process keeps loaded (the active one and the one it replaced, for batches in flight).
KEEP_MODELS = 2
#: Encoder cache slots allocated when a model is loaded (at most the cache's capacity, ~51 KB each at the default
#: sizes): the doublings up to here would otherwise stall the first batches; beyond it the cache grows as needed.
RESERVE_SLOTS = 4096
#: How long a commit waits for the model process's answer before it kills the process and fails the batch: a
#: batch takes well under a second, loading a large model on a swap some seconds.
ANSWER_TIMEOUT_S = 120.0
#: How long :meth:`ModelWorker.ensure` waits for a new process to import torch and load the model.
START_TIMEOUT_S = 300.0


class RemoteJob:
    """A job sent to the model process; :meth:`outcome` once the bank is known, or :meth:`drop`."""

    def __init__(self, worker: ModelWorker, job_id: int, conn: Connection) -> None:
        self._worker, self.job_id, self._conn = worker, job_id, conn

    def outcome(
        self, bank: BankState, prev_codes: Tensor, prev_protos: Tensor, prev_states: Tensor
    ) -> Future[Outcome | None]:
        """The job's :class:`Outcome` under ``bank`` (the process answers once it has started the job)."""
        next_items = None if bank.next_items is None else bank.next_items.numpy()
        switches = None if bank.switches is None else bank.switches.numpy()
        bank_wire = (bank.centres.numpy(), bank.counts.numpy(), bank.version, next_items, switches)
        prev = (prev_codes.numpy(), prev_protos.numpy(), prev_states.numpy())
        return self._worker._request(self._conn, ("outcome", self.job_id, bank_wire, prev), self.job_id)

    def drop(self) -> None:
        """Forget the job (its outcome is not needed); the process discards it, running or not."""
        self._worker._send(self._conn, ("drop", self.job_id), quiet=True)


class ModelWorker:
    """The client side: starts the process when needed, sends jobs and resolves their futures on a reader thread.

    Thread-safe (the consumer prepares on its polling thread and commits on its applier thread).
    """

    def __init__(self, session_cache: int, *, answer_timeout_s: float = ANSWER_TIMEOUT_S) -> None:
        self.session_cache = session_cache
        self.answer_timeout_s = answer_timeout_s
        self._lock = threading.Lock()  # the process, the pipe and the futures
        self._send_lock = threading.Lock()
        self._proc: Any = None
        self._conn: Connection | None = None
        self._futures: dict[int, tuple[Connection, Future[Any]]] = {}
        self._ids = itertools.count(1)
        self.starts = 0  # processes started (tests, logs)

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.is_alive() else None

    # ------------------------------------------------------------------------------------------ public
    def ensure(self, online: OnlineModel, timeout_s: float | None = START_TIMEOUT_S) -> Future[Any]:
        """Start the process if it is not running and have it load ``online`` (and warm up), so that the first batch
        does not wait for torch's import and the model's load. Waits up to ``timeout_s`` for it; ``None`` returns at
        once (the consumer joins its group meanwhile; jobs queue behind the load). The future completes when loaded.
        """
        conn = self._connection()
        job_id = next(self._ids)
        loaded = self._request(conn, ("load", job_id, online.version, str(_path(online))), job_id)
        if timeout_s is not None:
            loaded.result(timeout=timeout_s)
        return loaded

    def submit(self, online: OnlineModel, job: ModelJob) -> RemoteJob:
        """Send a job (the process starts on it at once); :meth:`RemoteJob.outcome` gets its result."""
        conn = self._connection()
        job_id = next(self._ids)
        self._send(conn, ("start", job_id, str(_path(online)), _job_to_wire(job)))
        return RemoteJob(self, job_id, conn)

    def wait(self, future: Future[Any]) -> Any:
        """The answer of a request, waiting at most ``answer_timeout_s``: a process that stops answering (stopped,
        swapping, deadlocked) is killed, so the batch fails and is retried with a new one instead of hanging."""
        try:
            return future.result(timeout=self.answer_timeout_s)
        except FutureTimeout:
            with self._lock:
                proc = self._proc
            if proc is not None:
                proc.kill()  # its reader thread fails whatever else waits on it; the next job starts a new one
            raise PersonaError(
                f"the model process (pid {proc.pid if proc else None}) did not answer within "
                f"{self.answer_timeout_s:g} s and was stopped",
                "the batch is retried with a new model process; if this repeats, see the consumer's log",
            ) from None

    def close(self) -> None:
        """Stop the process (it finishes nothing: whatever is waiting fails)."""
        with self._lock:
            conn, proc = self._conn, self._proc
            self._conn = self._proc = None
        if conn is not None:
            self._send(conn, ("stop",), quiet=True)
            conn.close()
        if proc is not None:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)

    # ------------------------------------------------------------------------------------------ internals
    def _connection(self) -> Connection:
        with self._lock:
            if self._conn is not None and self._proc is not None and self._proc.is_alive():
                return self._conn
            ctx = mp.get_context("spawn")  # never fork a process that runs threads
            parent, child = ctx.Pipe(duplex=True)
            proc = ctx.Process(target=_serve, args=(child, self.session_cache), name="persona-model", daemon=True)
            proc.start()
            child.close()
            self._conn, self._proc = parent, proc
            self.starts += 1
            threading.Thread(target=self._read, args=(parent, proc), name="persona-model-reader", daemon=True).start()
            log.info("model process started (pid %s)", proc.pid)
            return parent

    def _request(self, conn: Connection, message: tuple[Any, ...], job_id: int) -> Future[Any]:
        future: Future[Any] = Future()
        with self._lock:
            if conn is not self._conn:
                future.set_exception(_gone(self._proc))
                return future
            self._futures[job_id] = (conn, future)
        self._send(conn, message)
        return future

    def _send(self, conn: Connection, message: tuple[Any, ...], *, quiet: bool = False) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            with self._send_lock:
                conn.send_bytes(data)
        except (OSError, ValueError) as exc:  # ValueError: a closed connection
            if not quiet:
                raise _gone(self._proc) from exc

    def _read(self, conn: Connection, proc: Any) -> None:
        """Resolve futures as answers come; when the pipe closes, fail whatever still waits on this process."""
        try:
            while True:
                kind, job_id, payload = pickle.loads(conn.recv_bytes())
                with self._lock:
                    entry = self._futures.pop(job_id, None)
                if entry is None:
                    continue
                if kind == "error":
                    entry[1].set_exception(PersonaError(f"the model process failed: {payload}"))
                else:
                    entry[1].set_result(_outcome_from_wire(payload) if kind == "outcome" else payload)
        except (EOFError, OSError, ValueError):
            pass
        proc.join(timeout=5)
        with self._lock:
            failed = [f for c, f in self._futures.values() if c is conn]
            self._futures = {k: v for k, v in self._futures.items() if v[0] is not conn}
            if self._conn is conn:
                self._conn = None
                log.error("model process (pid %s) exited with code %s", proc.pid, proc.exitcode)
        for future in failed:
            future.set_exception(_gone(proc))


def _gone(proc: Any) -> PersonaError:
    code = proc.exitcode if proc is not None else None
    return PersonaError(
        f"the model process exited (code {code}) before answering",
        "the batch is retried and a new model process started; if this repeats, see the consumer's log",
    )


def _path(online: OnlineModel) -> Path:
    if online.path is None:
        raise PersonaError(f"model {online.version} was not loaded from a bundle: the model process cannot load it")
    return online.path


# ---------------------------------------------------------------------------------------------- wire format
def _job_to_wire(job: ModelJob) -> tuple[Any, ...]:
    requests = None if job.requests is None else [(r.key, r.start, r.items, r.wanted) for r in job.requests]
    return (
        job.version,
        job.recent.numpy(),
        job.pre_rows,
        (job.early.which, job.early.states.numpy(), job.early.targets.numpy()),
        requests,
        job.order,
        None if job.histories is None else job.histories.numpy(),
        None if job.repeats is None else job.repeats.to_numpy(),
        None if job.history_groups is None else job.history_groups.numpy(),
    )


def _job_from_wire(wire: tuple[Any, ...]) -> ModelJob:
    version, recent, pre_rows, (which, states, targets), requests, order, histories, repeats, groups = wire
    reps = None if repeats is None else PreparedRows.from_numpy(*repeats)
    return ModelJob(
        version,
        torch.from_numpy(recent),
        pre_rows,
        EarlyInput(which, torch.from_numpy(states), torch.from_numpy(targets), None if reps is None else reps[which]),
        None if requests is None else [WindowRequest(*r) for r in requests],
        order,
        None if histories is None else torch.from_numpy(histories),
        reps,
        None if groups is None else torch.from_numpy(groups),
    )


def _outcome_to_wire(o: Outcome) -> tuple[np.ndarray, ...]:
    checks = (o.ratios, o.persona, o.base, o.pred_protos, o.edit_gains, o.group_gains)
    return tuple(t.numpy() for t in (o.codes, o.states, o.protos, o.dists, *checks))


def _outcome_from_wire(wire: tuple[np.ndarray, ...]) -> Outcome:
    return Outcome(*(torch.from_numpy(a) for a in wire))


# ---------------------------------------------------------------------------------------------- the process
def _reason() -> str:
    """The exception being handled, in one line for the consumer's log; an unexpected one's traceback goes to this
    process's stderr (the consumer's) as well."""
    exc = sys.exc_info()[1]
    if isinstance(exc, PersonaError):
        return str(exc)
    traceback.print_exc()
    return f"{type(exc).__name__}: {exc}"


def _serve(conn: Connection, session_cache: int) -> None:
    """The process's main loop: one receiving thread queues messages; this thread computes, an outcome whose job
    has started before any start (a commit is waiting for it), starts in the order they came."""
    torch.set_num_threads(1)  # as the consumer: one core's worth, the other is the consumer's
    # Ctrl-C and a supervisor's SIGTERM reach the whole process group: the consumer finishes its batch (with this
    # process's help) and then stops it; on its own, this process ends when the consumer's end of the pipe closes.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    inbox: deque[tuple[Any, ...]] = deque()
    arrived = threading.Condition()

    def receive() -> None:
        try:
            while True:
                message = pickle.loads(conn.recv_bytes())
                with arrived:
                    inbox.append(message)
                    arrived.notify()
        except (EOFError, OSError):
            with arrived:
                inbox.append(("stop",))
                arrived.notify()

    threading.Thread(target=receive, name="receive", daemon=True).start()
    models: OrderedDict[str, tuple[OnlineModel, EncoderCache | None]] = OrderedDict()
    starts: deque[tuple[Any, ...]] = deque()
    outcomes: dict[int, tuple[Any, ...]] = {}
    started: dict[int, tuple[ModelJob, Started] | str] = {}  # a job and its started half, or why it failed

    def model(version: str, path: str) -> tuple[OnlineModel, EncoderCache | None]:
        if version not in models:
            online = OnlineModel.load(Path(path))
            if online.version != version:
                raise PersonaError(f"the bundle at {path} is model {online.version}, not {version}")
            cache = encoder_cache_for(online, session_cache)
            if cache is not None:
                cache.reserve(RESERVE_SLOTS)
            warm_up(online, cache is not None)
            models[version] = (online, cache)
            while len(models) > KEEP_MODELS:
                models.popitem(last=False)
        models.move_to_end(version)
        return models[version]

    def answer(kind: str, job_id: int, payload: Any) -> None:
        with contextlib.suppress(OSError):  # the consumer is gone: the receiving thread stops the loop
            conn.send_bytes(pickle.dumps((kind, job_id, payload), protocol=pickle.HIGHEST_PROTOCOL))

    while True:
        with arrived:
            while not inbox and not starts and not any(j in started for j in outcomes):
                arrived.wait()
            messages = list(inbox)
            inbox.clear()
        for message in messages:
            kind = message[0]
            if kind == "stop":
                return
            if kind == "start":
                starts.append(message)
            elif kind == "outcome":
                outcomes[message[1]] = message
            elif kind == "drop":
                job_id = message[1]
                started.pop(job_id, None)
                outcomes.pop(job_id, None)
                starts = deque(m for m in starts if m[1] != job_id)
            elif kind == "load":
                _, job_id, version, path = message
                try:
                    model(version, path)
                    answer("loaded", job_id, version)
                except Exception:
                    answer("error", job_id, _reason())
        ready = sorted(j for j in outcomes if j in started)
        if ready:
            _, job_id, (centres, counts, version, next_items, switches), (codes, protos, states) = outcomes.pop(
                ready[0]
            )
            half = started.pop(job_id)
            if isinstance(half, str):
                answer("error", job_id, half)
                continue
            job, first_half = half
            try:
                online = models[job.version][0]
                group = None if next_items is None else torch.from_numpy(next_items)
                on_off = None if switches is None else torch.from_numpy(switches)
                bank = BankState(torch.from_numpy(centres), torch.from_numpy(counts), version, group, on_off)
                prev = (torch.from_numpy(codes), torch.from_numpy(protos), torch.from_numpy(states))
                result = outcome(
                    online,
                    bank,
                    job.pre_rows,
                    first_half.early,
                    first_half.forward,
                    *prev,
                    repeats=job.repeats,
                    history_groups=job.history_groups,
                )
                answer("outcome", job_id, _outcome_to_wire(result))
            except Exception:
                answer("error", job_id, _reason())
        elif starts:
            _, job_id, path, wire = starts.popleft()
            try:
                job = _job_from_wire(wire)
                online, cache = model(job.version, path)
                started[job_id] = (job, start_job(online, cache, job))
            except Exception:
                started[job_id] = _reason()
