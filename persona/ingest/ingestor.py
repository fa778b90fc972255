"""The :class:`Ingestor`: one batch of validated events into one store transaction (the rules are in the package
docstring, :mod:`persona.ingest`).

``prepare`` does what needs no transaction (read the sessions, :func:`~persona.ingest.plan.walk` the events, start the
model work); ``commit`` does the rest inside it, in this order: lock the prototype bank, check that what prepare read
still holds (else walk again), score each event with the previous state, log the events (the dedup), collect the model
outcome (:func:`~persona.ingest.result.conclude`), refine the bank, write the sessions and the online counters.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import torch

from persona.bank_rows import bank_from_rows, rows_from_bank
from persona.events import Event, Rejection, RejectReason
from persona.faults import maybe_crash
from persona.ingest.model_work import cached_states, early_work, encoder_cache_for, uses_encoder_cache
from persona.ingest.model_worker import START_TIMEOUT_S, ModelWorker
from persona.ingest.plan import Plan, walk
from persona.ingest.previous import previous_states
from persona.ingest.result import IngestResult, conclude, online_counter_increments
from persona.ingest.work import Scoring, Work, build_job, done, local_outcome, pad
from persona.store import NewEvent, PrototypeRow, SessionState, Store, UnitOfWork
from recsys.encoder_cache import EncoderCache
from recsys.errors import PersonaError
from recsys.index_rows import index_of
from recsys.model import reseed_idle
from recsys.online import BankState, OnlineModel, refine_bank
from recsys.switch import count_terms_on

log = logging.getLogger(__name__)


#: What to do with an event whose item the model does not know (see :class:`Ingestor`).
UNKNOWN_ITEM_POLICIES = ("skip", "dlq")


class ModelSource(Protocol):
    """What the ingestor needs of :class:`persona.models.ModelProvider`: the active model, now."""

    def get(self) -> OnlineModel: ...


class Ingestor:
    """Applies batches of validated events to the store with the active model (see the module doc).

    Args:
        store: the store; every :meth:`apply` is one transaction on it.
        models: anything with ``get() -> OnlineModel`` (normally :class:`persona.models.ModelProvider`).
        unknown_item_policy: ``"skip"`` (log, count, leave the model state alone) or ``"dlq"``.
        max_recent: recent items kept per session (default and upper bound: the model's ``max_len``).
        prototype_idle_s: a prototype assigned nothing for this long is re-seeded at the batch's worst-served
            session (METHOD.md §3); ``None`` turns re-seeding off.
        compute_threads: threads that run a batch's model work side by side (encoder chunks, adapter codes,
            prequential check); 1 runs it all on the calling thread. The result does not depend on it.
        session_cache: sessions kept in memory between batches (0 = none): the state this ingestor last committed
            for each, so :meth:`prepare` need not read it back (:meth:`commit` checks that the store still holds it,
            as for any read), and the encoder's keys and values over its window (:mod:`recsys.encoder_cache`; SASRec
            models whose windows have a stride), so an event encodes its new item only. ~56 KB a session at the
            default model sizes. The result does not depend on it beyond float rounding.
        model_process: run the model work in a process of its own (:mod:`persona.ingest.model_worker`; its own GIL), for
            models loaded from a bundle; the encoder cache then lives there. The result is the same. :meth:`warm`
            starts it ahead of the first batch.
    """

    def __init__(
        self,
        store: Store,
        models: ModelSource,
        *,
        unknown_item_policy: str = "skip",
        max_recent: int | None = None,
        prototype_idle_s: float | None = 3600.0,
        compute_threads: int = 1,
        session_cache: int = 4096,
        model_process: bool = False,
    ) -> None:
        if unknown_item_policy not in UNKNOWN_ITEM_POLICIES:
            raise PersonaError(
                f"unknown item policy {unknown_item_policy!r}; choose one of {', '.join(UNKNOWN_ITEM_POLICIES)}",
                "fix PERSONA_UNKNOWN_ITEM_POLICY",
            )
        if max_recent is not None and max_recent < 1:
            raise PersonaError(f"max_recent must be >= 1, got {max_recent}")
        if session_cache < 0:
            raise PersonaError(
                f"session_cache must be >= 0, got {session_cache}",
                "fix PERSONA_SESSION_CACHE",
            )
        if compute_threads < 1:
            raise PersonaError(f"compute_threads must be >= 1, got {compute_threads}", "fix PERSONA_CONSUMER_THREADS")
        self.store = store
        self.models = models
        self.unknown_item_policy = unknown_item_policy
        self.max_recent = max_recent
        self.prototype_idle_s = prototype_idle_s
        self._pool = ThreadPoolExecutor(compute_threads, "persona-ingest") if compute_threads > 1 else None
        # the model work a commit waits for (predictions under its bank): one thread of its own
        self._urgent = ThreadPoolExecutor(1, "persona-ingest-commit") if compute_threads > 1 else None
        self.session_cache = session_cache
        self._cache: tuple[str | None, EncoderCache | None] | None = None  # (model version, its cache)
        # sessions as this ingestor last committed them, with their recent items' vocabulary indices and the model
        # those are for; least recently used first (never mutated: copied on use)
        self._committed: OrderedDict[str, tuple[SessionState, list[int], OnlineModel]] = OrderedDict()
        self._committed_lock = threading.Lock()
        self._worker = ModelWorker(session_cache) if model_process else None

    @property
    def model_worker(self) -> ModelWorker | None:
        return self._worker

    def warm(self, *, wait: bool = True) -> Future[Any] | None:
        """Start the model process (if there is one) and load the active model there, so that the first batch
        does not wait for it; ``wait=False`` returns at once while it loads. The future completes when loaded."""
        online = self.models.get()
        worker = self._remote(online)
        return None if worker is None else worker.ensure(online, START_TIMEOUT_S if wait else None)

    def _remote(self, online: OnlineModel) -> ModelWorker | None:
        """The model process that does this model's work, if any: it loads bundles by path, so a model built in
        memory stays in this process."""
        return self._worker if online.path is not None else None

    def close(self) -> None:
        """Stop the compute threads and the model process (if any); :meth:`apply` must not be called afterwards."""
        for pool in (self._urgent, self._pool):
            if pool is not None:
                pool.shutdown(wait=True)
        if self._worker is not None:
            self._worker.close()

    # ------------------------------------------------------------------------------------------ public
    def apply(self, events: Sequence[Event], *, source: str = "kafka") -> IngestResult:
        """Apply ``events`` (in order) in one store transaction; see the module docstring for the rules.

        Raises whatever the store raises (the transaction is then rolled back: nothing was applied, and
        the caller may retry the same batch safely).
        """
        return self.commit(self.prepare(events, source=source))

    def prepare(self, events: Sequence[Event], *, source: str = "kafka", pending: Sequence[Prepared] = ()) -> Prepared:
        """The part of :meth:`apply` that needs no transaction: read the touched sessions, walk the events through
        them and start the model work (sequence encoder, adapter) on the compute threads.

        ``pending`` are batches prepared earlier and not committed yet, oldest first (the consumer prepares the next
        batch while the previous one commits): a session one of them touches is taken from it, as that batch will
        leave it, instead of from the store. :meth:`commit` checks that everything read here still holds, and
        redoes the work inside its transaction when it does not (a duplicate event, another writer, a pending
        batch that changed on commit), so the result is always exactly :meth:`apply`'s.
        """
        online = self.models.get()
        result = IngestResult(model_version=online.version)
        cap = min(self.max_recent or online.cfg.max_len, online.cfg.max_len)
        now = datetime.now(UTC)
        to_log: list[NewEvent] = []
        kept: list[tuple[Event, bool]] = []
        for e in events:
            known = online.known(e.item_id)
            if not known and self.unknown_item_policy == "dlq":
                result.rejected.append(
                    (e, Rejection(RejectReason.UNKNOWN_ITEM, f"item {e.item_id!r} is not in model {online.version}"))
                )
                continue
            kept.append((e, known))
            to_log.append(
                NewEvent(
                    event_id=e.event_id,
                    session_id=e.session_id,
                    item_id=e.item_id,
                    ts=e.ts,
                    type=e.type,
                    known_item=known,
                    source=source,
                    attributes=e.attributes,
                    ingested_at=now,
                )
            )
        prepared = Prepared(online, result, cap, now, kept, to_log, {e.session_id for e, _ in kept})
        if not kept:
            return prepared
        stored: dict[str, SessionState] = {}
        origins: dict[str, SessionState] = {}
        known_indices: dict[str, list[int]] = {}
        for earlier in reversed(pending):  # the newest pending state of a session is the one it will have
            if earlier.plan is None:
                continue
            common = (prepared.session_ids & earlier.plan.sessions.keys()) - stored.keys()
            # Concluded, its sessions' states are final unless its transaction fails, which abandons this batch too.
            final = earlier.concluded.is_set() and not earlier.replanned
            for sid in common:
                touched = earlier.plan.sessions[sid]
                if not final:
                    origins[sid] = touched.state  # its code and user state are filled in when it concludes
                stored[sid] = touched.state.copy()  # the walk below changes its own copy
                if earlier.online is online:
                    known_indices[sid] = touched.indices
            if common:
                prepared.depends_on.append(earlier)
        missing = prepared.session_ids - stored.keys()
        if missing and self.session_cache:
            with self._committed_lock:
                for sid in missing:
                    remembered = self._committed.get(sid)
                    if remembered is not None:
                        self._committed.move_to_end(sid)
                        stored[sid] = remembered[0].copy()  # the walk below changes its own copy
                        if remembered[2] is online:
                            known_indices[sid] = remembered[1]
            missing = missing - stored.keys()
        if missing:
            with self.store.read() as uow:
                stored.update(uow.get_sessions(missing))
        prepared.expected = {sid: _version(stored.get(sid)) for sid in prepared.session_ids}
        prepared.plan = walk(online, kept, stored, cap, now, origins, known_indices)
        prepared.work = self._start(online, prepared.plan)
        maybe_crash("model_work")
        return prepared

    def commit(self, prepared: Prepared) -> IngestResult:
        """Apply a :meth:`prepare` d batch in one store transaction (earlier ones must have committed).

        If it fails, its model work is dropped (:meth:`discard`): a retry prepares the batch again.
        """
        try:
            return self._commit(prepared)
        except BaseException:
            self.discard(prepared)
            raise

    def discard(self, prepared: Prepared) -> None:
        """Drop the model work of a prepared batch that will not be committed (its commit failed, or an earlier
        batch's did): the model process forgets the job instead of keeping its half-done state."""
        if prepared.work is not None:
            prepared.work.abandon()

    def _commit(self, prepared: Prepared) -> IngestResult:
        p = prepared
        online, result = p.online, p.result
        if p.plan is None or p.work is None:
            return result
        with self.store.transaction() as uow:
            # The bank's lock first: it serialises ingesting transactions (the HTTP path, a consumer handing over
            # partitions), so the sessions checked next cannot change before this transaction writes them back.
            rows = uow.lock_prototypes(online.version)
            bank = bank_from_rows(rows, online) if rows else online.initial_bank
            plan, work = p.plan, p.work
            current = uow.session_versions(p.session_ids)
            redone = any(earlier.replanned for earlier in p.depends_on)
            p.depends_on = []  # committed: batches on top of this one keep this one, not the whole chain
            if redone or current != {sid: v for sid, v in p.expected.items() if v is not None}:
                # Something changed since prepare read it (another writer, or a pending batch that was redone):
                # read the sessions again, now under this transaction.
                plan, work = self._replan(uow, p, p.kept, work)
            scoring = self._score_previous(online, bank, plan, work)
            # Events are almost always new: the model work above started as if all of them were, and runs while
            # they are logged (the dedup). If some turn out to be duplicates, it is redone for the new ones only.
            inserted = uow.insert_events(p.to_log)
            fresh: list[tuple[Event, bool]] = []
            for e, known in p.kept:
                if e.event_id in inserted:
                    inserted.discard(e.event_id)  # a repeat later in this batch is a duplicate
                    fresh.append((e, known))
            result.duplicates = len(p.kept) - len(fresh)
            if len(fresh) < len(p.kept):
                scoring.abandon()
                if not fresh:
                    work.abandon()
                    p.replanned = True
                    return result
                plan, work = self._replan(uow, p, fresh, work)
                scoring = self._score_previous(online, bank, plan, work)
            codes = conclude(online, plan, scoring.result(), result)
            p.concluded.set()

            if codes is not None:
                protos = index_of(result.prototypes)
                chosen = result.chosen
                refined = refine_bank(bank, codes, protos, online.cfg, chosen, result.gains)
                touched = set(result.prototypes) | self._reseed(online, refined, rows, codes, protos, p.now)
                # the predictions' prototypes: their group counts and switches changed
                counted = set(chosen[0].tolist()) if chosen is not None else set()
                saved = uow.save_prototypes(online.version, rows_from_bank(refined, touched, rows, p.now, counted))
                result.bank_version = max((r.version for r in saved), default=0)
                if refined.switches is not None:
                    result.terms_on = count_terms_on(refined.switches)
            else:
                result.bank_version = max((r.version for r in rows), default=0)
            uow.upsert_sessions(list(result.sessions.values()))
            # with the events they count: a crash before this commit counts nothing, a redelivery nothing twice
            uow.add_online_counters(online_counter_increments(result))
            maybe_crash("in_store_transaction")

        maybe_crash("after_store_commit")
        stored_at = time.time()
        result.freshness_s = [stored_at - ts for ts in result.freshness_s]  # event ts -> state committed
        self._remember(plan, online)
        return result

    def _remember(self, plan: Plan, online: OnlineModel) -> None:
        """Keep a committed plan's sessions for the next :meth:`prepare` (beyond the cap, the least recently used
        go)."""
        if not self.session_cache:
            return
        with self._committed_lock:
            committed = self._committed
            for sid, w in plan.sessions.items():
                committed[sid] = (w.state, w.indices, online)
                committed.move_to_end(sid)
            while len(committed) > self.session_cache:
                committed.popitem(last=False)

    # ------------------------------------------------------------------------------------------ internals
    def _replan(self, uow: UnitOfWork, p: Prepared, fresh: list[tuple[Event, bool]], stale: Work) -> tuple[Plan, Work]:
        """Walk ``fresh`` again from the sessions as stored now (inside the transaction); drops ``stale`` work."""
        stale.abandon()
        p.replanned = True  # batches prepared on top of this one read what it was going to write: they redo too
        stored = uow.get_sessions(p.session_ids)
        plan = walk(p.online, fresh, stored, p.cap, p.now, {})
        p.work = self._start(p.online, plan)  # the work to drop should this commit fail (see :meth:`discard`)
        return plan, p.work

    def _reseed(
        self,
        online: OnlineModel,
        bank: BankState,
        rows: Sequence[PrototypeRow],
        codes: torch.Tensor,
        protos: torch.Tensor,
        now: datetime,
    ) -> set[int]:
        """Re-seed (in place) prototypes idle for ``prototype_idle_s`` at the worst-served codes of the batch."""
        if self.prototype_idle_s is None or not rows:
            return set()
        assigned = set(protos.tolist())
        idle = torch.tensor(
            [
                r.prototype_id not in assigned
                and (now - (r.last_assigned_at or r.updated_at)).total_seconds() > self.prototype_idle_s
                for r in rows
            ]
        )
        if not bool(idle.any()):
            return set()
        distances = online.distances(codes, protos, bank)
        reseeded = set(reseed_idle(bank.centres, bank.counts, idle, codes, distances))
        if bank.switches is not None:  # a new group: its switches start with every term on
            bank.switches[sorted(reseeded)] = 0.0
        log.info("re-seeded idle prototypes %s of model %s", sorted(reseeded), online.version)
        return reseeded

    def _start(self, online: OnlineModel, plan: Plan) -> Work:
        """Start the encoder and the adapter on every post-event history of the plan: in the model process, on the
        compute threads while the caller goes on, or here and now. :func:`conclude` collects the results."""
        if not plan.post_hist:
            return Work()
        job = build_job(online, plan, uses_encoder_cache(online, self.session_cache))
        work = Work(job)
        worker = self._remote(online)
        if worker is not None:
            work.remote = worker.submit(online, job)
            return work
        pool = self._pool
        work.codes = done(online.codes(job.recent)) if pool is None else pool.submit(online.codes, job.recent)
        early = job.early
        work.early = done(early_work(online, early)) if pool is None else pool.submit(early_work, online, early)
        if job.requests is not None:  # each window's new items only
            cache, order = self._encoder_cache(online), job.order
            assert cache is not None and order is not None
            args = (cache, job.requests, order, job.rows)
            work.states = done(cached_states(*args)) if pool is None else pool.submit(cached_states, *args)
            return work
        assert job.histories is not None
        hist = job.histories
        work.states = done(online.user_states(hist)) if pool is None else online.submit_user_states(hist, pool)
        return work

    def _encoder_cache(self, online: OnlineModel) -> EncoderCache | None:
        """This model's encoder cache in this process; ``None`` where it does not apply (turned off, GRU4Rec, a
        sliding window)."""
        if self._cache is None or self._cache[0] != online.version:
            self._cache = (online.version, encoder_cache_for(online, self.session_cache))
        return self._cache[1]

    def _score_previous(self, online: OnlineModel, bank: BankState, plan: Plan, work: Work) -> Scoring:
        """The previous states that predict this batch's events, and the prequential check of those that are stored
        (it needs nothing from this batch's forward, so it runs beside the event log insert).

        A stored state that cannot be used (another model version, a row from before user states were stored) is
        recomputed from its history here: rare, so it is not part of the batched forward.
        """
        scoring = Scoring()
        if not plan.post_hist:
            scoring.outcome = done(None)
            return scoring
        with torch.inference_mode():
            prev = previous_states(online, bank, [(s.resolved(), h) for s, h in plan.stored_prev])
            if prev.recompute:
                hist = pad([plan.stored_prev[j][1] for j in prev.recompute], online.cfg.max_len)
                codes = online.codes(hist)
                prev.codes[prev.recompute] = codes
                prev.states[prev.recompute] = online.user_states(hist, self._pool)
                prev.protos[prev.recompute] = online.assign(codes, bank)
        if work.remote is not None:
            scoring.outcome = work.remote.outcome(bank, prev.codes, prev.protos, prev.states)
            scoring.worker = self._worker
        elif self._urgent is None:
            scoring.outcome = done(local_outcome(online, bank, work, prev))
        else:  # its own thread: never queued behind the next batch's model work on the compute threads
            scoring.outcome = self._urgent.submit(local_outcome, online, bank, work, prev)
        return scoring


#: (edit_version, unknown_item_count, updated_at): what every write of a session changes.
_Version = tuple[int, int, datetime]


def _version(state: SessionState | None) -> _Version | None:
    return None if state is None else (state.edit_version, state.unknown_item_count, state.updated_at)


@dataclass
class Prepared:
    """A batch between :meth:`Ingestor.prepare` and :meth:`Ingestor.commit`."""

    online: OnlineModel
    result: IngestResult
    cap: int
    now: datetime
    kept: list[tuple[Event, bool]]
    to_log: list[NewEvent]
    session_ids: set[str]
    expected: dict[str, _Version | None] = field(default_factory=dict)  # each session as prepare read it
    depends_on: list[Prepared] = field(default_factory=list)  # pending batches it took sessions from
    plan: Plan | None = None
    work: Work | None = None
    replanned: bool = False  # commit walked the events again: what was prepared from this plan is stale
    #: Set once the commit has the batch's model outcome in its sessions (what remains is writing them): a batch
    #: prepared on top of it from then on takes its sessions' new states as if stored (see :meth:`Ingestor.prepare`).
    concluded: threading.Event = field(default_factory=threading.Event)
