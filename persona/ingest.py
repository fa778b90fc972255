"""The one ingestion path: validated events in, session state, event log and prototype bank out.

The Kafka consumer and ``POST /v1/events`` both call :meth:`Ingestor.apply`, so an event has the same
effect whichever way it arrives. This module knows the store and the model, nothing of Kafka, HTTP or
Prometheus: it returns an :class:`IngestResult` and each caller turns it into its own metrics.

Semantics of one ``apply`` (one store transaction; all or nothing):

1. Dedup: every event is logged by ``event_id``; an id already in the log, or repeated earlier in the same
   batch, is a duplicate: counted, never applied. This is what turns Kafka's at-least-once delivery into
   an exactly-once effect (offsets are committed only after this transaction).
2. Unknown items (not in the model's vocabulary): policy ``"skip"`` logs them (``known_item=False``) and
   counts them on the session without touching its model state; ``"dlq"`` neither logs nor applies them
   and hands them back as rejections for the caller's dead-letter queue.
3. For each applied event, in batch order (per session: arrival order), *before* applying it: the
   prequential check ranks its item with the session's previous history under the Persona edit of the
   previous state and under the base model (a session's first event has no history: no prediction).
4. Then the item is appended to the recent items; codes of every event's post-event history come from
   ONE batched forward; each code is assigned to the nearest centre of the bank as it was when the
   batch started, and the bank is refined with the codes in event order (streaming k-means).
5. The batch's prequential counts (predictions, hits and NDCG gain at each K, reciprocal rank, per variant) are
   added to the store's ``online_counters`` in the same transaction, so the online hit rate is exactly-once like
   the session state; the exported metrics are read from there.

So the result depends on the events and on the batch boundaries only through the bank snapshot used for
assignments inside a batch; with batches of one event it is exactly the sequential algorithm.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from persona.events import Event, Rejection, RejectReason
from persona.faults import maybe_crash
from persona.model_work import (
    Early,
    EarlyInput,
    ModelJob,
    Outcome,
    cached_states,
    early_work,
    encoder_cache_for,
    outcome,
    uses_encoder_cache,
)
from persona.model_worker import START_TIMEOUT_S, ModelWorker, RemoteJob
from persona.store import NewEvent, PrototypeRow, SessionState, Store, UnitOfWork
from persona.user_state import pack_user_states, user_state_payload
from recsys.encoder_cache import EncoderCache, WindowRequest
from recsys.errors import PersonaError
from recsys.model import PAD, reseed_idle
from recsys.online import (
    BankState,
    OnlineModel,
    code_from_bytes,
    code_to_bytes,
    next_items_to_bytes,
    refine_bank,
    stored_next_items,
)
from recsys.repeats import RepeatCounts
from recsys.windows import window_length

log = logging.getLogger(__name__)

__all__ = [
    "KS",
    "UNKNOWN_ITEM_POLICIES",
    "VARIANTS",
    "IngestResult",
    "Ingestor",
    "ModelSource",
    "online_counter_increments",
]

#: Cut-offs of the prequential hit-rate and NDCG counters.
KS: tuple[int, ...] = (10, 20)
#: The two rankers compared live: the edited model and the unedited base model.
VARIANTS: tuple[str, ...] = ("persona", "base")
UNKNOWN_ITEM_POLICIES = ("skip", "dlq")


class ModelSource(Protocol):
    """What the ingestor needs of :class:`persona.models.ModelProvider`: the active model, now."""

    def get(self) -> OnlineModel: ...


@dataclass
class IngestResult:
    """What one :meth:`Ingestor.apply` did, in plain values (the caller turns them into metrics).

    Per-event lists (``prototypes``, ``ood_scores``, ``item_indices``, ``freshness_s``) have one entry per
    applied event, in apply order; ``edit_norm_ratios`` one per prediction (the edit that scored the event).
    ``ndcg`` holds sums of ``1/log2(rank+2)`` for ranks below k, ``reciprocal_rank`` sums of ``1/(rank+1)``;
    divide by ``predictions`` for the means.
    """

    applied: int = 0
    duplicates: int = 0
    unknown_items: int = 0
    rejected: list[tuple[Event, Rejection]] = field(default_factory=list)
    predictions: dict[str, int] = field(default_factory=lambda: dict.fromkeys(VARIANTS, 0))
    hits: dict[tuple[str, int], int] = field(default_factory=lambda: {(v, k): 0 for v in VARIANTS for k in KS})
    ndcg: dict[tuple[str, int], float] = field(default_factory=lambda: {(v, k): 0.0 for v in VARIANTS for k in KS})
    reciprocal_rank: dict[str, float] = field(default_factory=lambda: dict.fromkeys(VARIANTS, 0.0))
    prototypes: list[int] = field(default_factory=list)
    ood_scores: list[float] = field(default_factory=list)
    edit_norm_ratios: list[float] = field(default_factory=list)
    item_indices: list[int] = field(default_factory=list)
    freshness_s: list[float] = field(default_factory=list)
    sessions: dict[str, SessionState] = field(default_factory=dict)
    model_version: str | None = None
    bank_version: int = 0
    #: (prototypes [P], items [P]): each scored prediction's prototype and what its session chose next (the group
    #: counts of METHOD.md §3b); ``None`` when nothing was scored
    chosen: tuple[torch.Tensor, torch.Tensor] | None = None


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
        model_process: run the model work in a process of its own (:mod:`persona.model_worker`; its own GIL), for
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
                stored[sid] = dataclasses.replace(touched.state)  # the walk below changes its own copy
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
                        stored[sid] = dataclasses.replace(remembered[0])  # the walk below changes its own copy
                        if remembered[2] is online:
                            known_indices[sid] = remembered[1]
            missing = missing - stored.keys()
        if missing:
            with self.store.read() as uow:
                stored.update(uow.get_sessions(missing))
        prepared.expected = {sid: _version(stored.get(sid)) for sid in prepared.session_ids}
        prepared.plan = _walk(online, kept, stored, cap, now, origins, known_indices)
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
            bank = _bank_from_rows(rows, online) if rows else online.initial_bank
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
            codes = _conclude(online, plan, scoring.result(), result)
            p.concluded.set()

            if codes is not None:
                protos = torch.tensor(result.prototypes, dtype=torch.long)
                chosen = result.chosen
                refined = refine_bank(bank, codes, protos, online.cfg, chosen)
                touched = set(result.prototypes) | self._reseed(online, refined, rows, codes, protos, p.now)
                counted = set(chosen[0].tolist()) if chosen is not None and refined.next_items is not None else set()
                saved = uow.save_prototypes(online.version, _rows_from_bank(refined, touched, rows, p.now, counted))
                result.bank_version = max((r.version for r in saved), default=0)
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

    def _remember(self, plan: _Plan, online: OnlineModel) -> None:
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
    def _replan(
        self, uow: UnitOfWork, p: Prepared, fresh: list[tuple[Event, bool]], stale: _Work
    ) -> tuple[_Plan, _Work]:
        """Walk ``fresh`` again from the sessions as stored now (inside the transaction); drops ``stale`` work."""
        stale.abandon()
        p.replanned = True  # batches prepared on top of this one read what it was going to write: they redo too
        stored = uow.get_sessions(p.session_ids)
        plan = _walk(p.online, fresh, stored, p.cap, p.now, {})
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
        log.info("re-seeded idle prototypes %s of model %s", sorted(reseeded), online.version)
        return reseeded

    def _start(self, online: OnlineModel, plan: _Plan) -> _Work:
        """Start the encoder and the adapter on every post-event history of the plan: in the model process, on the
        compute threads while the caller goes on, or here and now. :func:`_conclude` collects the results."""
        if not plan.post_hist:
            return _Work()
        job = self._job(online, plan)
        work = _Work(job)
        worker = self._remote(online)
        if worker is not None:
            work.remote = worker.submit(online, job)
            return work
        pool = self._pool
        work.codes = _done(online.codes(job.recent)) if pool is None else pool.submit(online.codes, job.recent)
        early = job.early
        work.early = _done(early_work(online, early)) if pool is None else pool.submit(early_work, online, early)
        if job.requests is not None:  # each window's new items only
            cache, order = self._encoder_cache(online), job.order
            assert cache is not None and order is not None
            args = (cache, job.requests, order, job.rows)
            work.states = _done(cached_states(*args)) if pool is None else pool.submit(cached_states, *args)
            return work
        assert job.histories is not None
        hist = job.histories
        work.states = _done(online.user_states(hist)) if pool is None else online.submit_user_states(hist, pool)
        return work

    def _job(self, online: OnlineModel, plan: _Plan) -> ModelJob:
        """The plan's model work as plain values (:mod:`persona.model_work`)."""
        window = online.cfg.adapter_window
        with torch.inference_mode():
            recent = _pad([h[-window:] for h in plan.post_hist], window)  # all the adapter reads
            job = ModelJob(online.version, recent, plan.pre_rows, _early_input(online, plan))
            if plan.pre_counts:
                job.repeats = torch.from_numpy(np.stack(plan.pre_counts))
                job.early.repeats = job.repeats[job.early.which]
            if uses_encoder_cache(online, self.session_cache):
                job.requests, job.order = _window_requests(plan)
            else:
                job.histories = _pad(plan.post_hist, online.cfg.max_len)
        return job

    def _encoder_cache(self, online: OnlineModel) -> EncoderCache | None:
        """This model's encoder cache in this process; ``None`` where it does not apply (turned off, GRU4Rec, a
        sliding window)."""
        if self._cache is None or self._cache[0] != online.version:
            self._cache = (online.version, encoder_cache_for(online, self.session_cache))
        return self._cache[1]

    def _score_previous(self, online: OnlineModel, bank: BankState, plan: _Plan, work: _Work) -> _Scoring:
        """The previous states that predict this batch's events, and the prequential check of those that are stored
        (it needs nothing from this batch's forward, so it runs beside the event log insert).

        A stored state that cannot be used (another model version, a row from before user states were stored) is
        recomputed from its history here: rare, so it is not part of the batched forward.
        """
        scoring = _Scoring()
        if not plan.post_hist:
            scoring.outcome = _done(None)
            return scoring
        with torch.inference_mode():
            prev = _previous_states(online, bank, [(s.resolved(), h) for s, h in plan.stored_prev])
            if prev.recompute:
                hist = _pad([plan.stored_prev[j][1] for j in prev.recompute], online.cfg.max_len)
                codes = online.codes(hist)
                prev.codes[prev.recompute] = codes
                prev.states[prev.recompute] = online.user_states(hist, self._pool)
                prev.protos[prev.recompute] = online.assign(codes, bank)
        if work.remote is not None:
            scoring.outcome = work.remote.outcome(bank, prev.codes, prev.protos, prev.states)
            scoring.worker = self._worker
        elif self._urgent is None:
            scoring.outcome = _done(_local_outcome(online, bank, work, prev))
        else:  # its own thread: never queued behind the next batch's model work on the compute threads
            scoring.outcome = self._urgent.submit(_local_outcome, online, bank, work, prev)
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
    plan: _Plan | None = None
    work: _Work | None = None
    replanned: bool = False  # commit walked the events again: what was prepared from this plan is stale
    #: Set once the commit has the batch's model outcome in its sessions (what remains is writing them): a batch
    #: prepared on top of it from then on takes its sessions' new states as if stored (see :meth:`Ingestor.prepare`).
    concluded: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Previous:
    """Codes [S, L, d], prototypes [S] and user states [S, D] of stored sessions whose next event is scored.

    ``recompute`` lists the rows whose stored values cannot be used (another model version, rows written before
    user states were stored, sizes that do not fit): the caller fills them in.
    """

    codes: Tensor
    protos: Tensor
    states: Tensor
    recompute: list[int]


@dataclass(frozen=True, slots=True)
class _Stored:
    """What a stored session state was computed with, as read from the store; or, for a session a pending batch
    touches (``origin``), that batch's state of it, read once it has committed."""

    model_version: str | None
    code: bytes | None
    user_state: bytes | None
    prototype_id: int | None
    edit_version: int
    origin: SessionState | None = None

    def resolved(self) -> _Stored:
        o = self.origin
        return self if o is None else _Stored(o.model_version, o.code, o.user_state, o.prototype_id, o.edit_version)


def _usable_payload(online: OnlineModel, st: _Stored) -> bytes | None:
    """The float32 bytes of a stored state's user state if it can predict with this model, else ``None``."""
    cfg = online.cfg
    code = st.code
    if st.model_version != online.version or code is None or len(code) != 4 * cfg.n_edit_layers * cfg.code_dim:
        return None
    return user_state_payload(st.user_state, st.edit_version, cfg)


def _previous_states(online: OnlineModel, bank: BankState, prev: list[tuple[_Stored, list[int]]]) -> _Previous:
    cfg = online.cfg
    n_prev, n_protos = len(prev), bank.centres.shape[0]
    usable: list[int] = []
    code_bytes: list[bytes] = []
    state_bytes: list[bytes] = []
    recompute: list[int] = []
    for j, (st, _hist) in enumerate(prev):
        payload = _usable_payload(online, st)
        if st.code is None or payload is None:
            recompute.append(j)
            continue
        usable.append(j)
        code_bytes.append(st.code)
        state_bytes.append(payload)
    out = _Previous(
        torch.zeros(n_prev, cfg.n_edit_layers, cfg.code_dim),
        torch.zeros(n_prev, dtype=torch.long),
        torch.zeros(n_prev, cfg.dim),
        recompute,
    )
    if not usable:
        return out
    rows = torch.tensor(usable, dtype=torch.long)
    out.codes[rows] = _floats(code_bytes).view(len(usable), cfg.n_edit_layers, cfg.code_dim)
    out.states[rows] = _floats(state_bytes).view(len(usable), cfg.dim)
    stored_protos = [prev[j][0].prototype_id for j in usable]
    # scored with the edit the API served for it: the stored prototype, while it still exists
    protos = torch.tensor([p if p is not None and 0 <= p < n_protos else -1 for p in stored_protos], dtype=torch.long)
    lost = (protos < 0).nonzero().flatten()
    if len(lost):
        protos[lost] = online.assign(out.codes[rows[lost]], bank)
    out.protos[rows] = protos
    return out


def _floats(chunks: list[bytes]) -> Tensor:
    """The float32 values of byte strings laid end to end, as one flat tensor."""
    return torch.from_numpy(np.frombuffer(b"".join(chunks), dtype=np.float32).copy())


@dataclass(slots=True)
class _Touched:
    """A touched session while a batch is applied: its state and its history as vocabulary indices."""

    state: SessionState
    indices: list[int]  # vocabulary indices of state.recent_items (UNK for items the model lost)
    # Row of its current state (code, user state): >= 0 in this batch's post-event rows; -(j + 2) for the
    # j-th stored previous state; -1 before either is known.
    row: int = -1
    origin: SessionState | None = None  # the pending batch's state this one was copied from (see Ingestor.prepare)
    rows: list[tuple[int, int]] = field(default_factory=list)  # (post-event row, its window's start) per event
    counts: RepeatCounts[str] | None = None  # its whole-history item counts (models with a repeat part)


@dataclass
class _Plan:
    """What a batch does to its sessions, before any model work: the result of :func:`_walk`."""

    sessions: dict[str, _Touched] = field(default_factory=dict)
    post_hist: list[list[int]] = field(default_factory=list)  # history after each applied event
    pre_rows: list[tuple[int, int]] = field(default_factory=list)  # (row of the previous state, target) per prediction
    stored_prev: list[tuple[_Stored, list[int]]] = field(default_factory=list)  # stored states that predict an event
    event_ts: list[float] = field(default_factory=list)  # per applied event
    item_indices: list[int] = field(default_factory=list)  # per applied event
    unknown_items: int = 0
    pre_counts: list[np.ndarray] = field(default_factory=list)  # per prediction: item counts before it [R, 3]


def _walk(
    online: OnlineModel,
    fresh: list[tuple[Event, bool]],
    stored: dict[str, SessionState],
    cap: int,
    now: datetime,
    origins: dict[str, SessionState],
    known_indices: dict[str, list[int]] | None = None,
) -> _Plan:
    """Walk the new events in order, updating the sessions' states (in place) and building their histories.

    The sequence encoder then runs once per applied event, on its post-event history: that user state is stored
    with the session, and it is exactly what the session's *next* event is scored with. So a prediction never
    re-encodes the previous history (the stored state, or the in-batch one, is it). ``known_indices`` are the
    vocabulary indices of some sessions' recent items when already known (from a pending batch, or remembered).
    """
    plan = _Plan()
    repeats = online.has_repeat_part
    known_indices = known_indices or {}
    sessions = plan.sessions
    index_of, indices_of = online.index_of, online.indices_of
    max_len, stride = online.cfg.max_len, online.cfg.stride
    for e, known in fresh:
        w = sessions.get(e.session_id)
        if w is None:
            st = stored.get(e.session_id)
            if st is None:
                st = SessionState(session_id=e.session_id, device_id=e.device_id, user_id=e.user_id)
            indices = known_indices.get(e.session_id)
            if indices is None:
                indices = indices_of(st.recent_items[-cap:])
            w = _Touched(st, indices, origin=origins.get(e.session_id))
            if repeats:
                w.counts = online.session_counts(st.item_counts, st.recent_items)
            sessions[e.session_id] = w
        st = w.state
        if e.device_id is not None:
            st.device_id = e.device_id
        if e.user_id is not None:
            st.user_id = e.user_id
        st.last_event_at = e.ts if st.last_event_at is None else max(st.last_event_at, e.ts)
        st.updated_at = now
        if not known:
            st.unknown_item_count += 1
            plan.unknown_items += 1
            continue

        item = index_of(e.item_id)
        if w.indices:
            if w.row == -1:
                w.row = -(len(plan.stored_prev) + 2)
                # Snapshot what the stored state was computed with: the loop re-stamps model_version below.
                snapshot = _Stored(
                    st.model_version, st.code, st.user_state, st.prototype_id, st.edit_version, origin=w.origin
                )
                size = min(window_length(st.event_count, max_len, stride), len(w.indices))
                plan.stored_prev.append((snapshot, w.indices[len(w.indices) - size :]))
            plan.pre_rows.append((w.row, item))
            if w.counts is not None:
                plan.pre_counts.append(online.encode_counts(w.counts))
        if w.counts is not None:
            w.counts.add(e.item_id)
        w.indices = [*w.indices, item][-cap:]
        st.recent_items = [*st.recent_items, e.item_id][-cap:]
        st.event_count += 1
        st.edit_version += 1
        st.model_version = online.version
        w.row = len(plan.post_hist)
        size = min(window_length(st.event_count, max_len, stride), len(w.indices))
        w.rows.append((w.row, st.event_count - size))
        plan.post_hist.append(w.indices[len(w.indices) - size :])
        plan.event_ts.append(e.ts.timestamp())
        plan.item_indices.append(item)
    for w in sessions.values():
        if w.counts is not None:
            w.state.item_counts = w.counts.to_json()
    return plan


@dataclass
class _Work:
    """A plan's model work, started by :meth:`Ingestor._start` (maybe still running): in the model process
    (``remote``) or on this process's compute threads (the futures)."""

    job: ModelJob | None = None
    remote: RemoteJob | None = None
    codes: Future[Tensor] | None = None
    states: Future[Tensor] | None = None
    early: Future[Early] | None = None

    def abandon(self) -> None:
        """Drop the work (the results are not needed): compute threads must be free, the model process told."""
        if self.remote is not None:
            self.remote.drop()
        running: list[Future[Any]] = [f for f in (self.codes, self.states, self.early) if f is not None]
        wait(running)


@dataclass
class _Scoring:
    """A plan's model outcome under the bank of its transaction (maybe still being computed)."""

    outcome: Future[Outcome | None] | None = None
    worker: ModelWorker | None = None  # computing it, when it is the model process

    def result(self) -> Outcome | None:
        assert self.outcome is not None
        return self.outcome.result() if self.worker is None else self.worker.wait(self.outcome)

    def abandon(self) -> None:
        """Wait until the compute threads let go of it; the model process just discards its answer."""
        if self.outcome is not None and self.worker is None:
            wait([self.outcome])


def _done(value: Any) -> Future[Any]:
    done: Future[Any] = Future()
    done.set_result(value)
    return done


def _conclude(online: OnlineModel, plan: _Plan, outcome: Outcome | None, result: IngestResult) -> Tensor | None:
    """Collect a plan's model outcome into ``result`` (counters, per-event lists, session codes and user states).

    Returns the codes [B, L, d] of the applied events (``None`` if none was applied). ``result.freshness_s``
    temporarily holds the event timestamps (the caller turns them into ages once the transaction committed).
    """
    result.unknown_items += plan.unknown_items
    result.applied = len(plan.post_hist)
    result.sessions = {sid: w.state for sid, w in plan.sessions.items()}
    result.freshness_s = plan.event_ts
    result.item_indices = plan.item_indices
    for w in plan.sessions.values():
        if w.row < 0 and w.origin is not None:  # no new state here: keep the one the pending batch computed
            w.state.code, w.state.user_state = w.origin.code, w.origin.user_state
            w.state.prototype_id, w.state.model_version = w.origin.prototype_id, w.origin.model_version
    if outcome is None:
        return None
    if plan.pre_rows:
        _score(result, "persona", outcome.persona)
        _score(result, "base", outcome.base)
        result.edit_norm_ratios = outcome.ratios.tolist()
        # what each prediction's prototype chose next: its group counts it once the batch commits
        result.chosen = (outcome.pred_protos, torch.tensor([t for _r, t in plan.pre_rows], dtype=torch.long))
    q99 = max(online.drift.distance_quantiles.get("q99", 1.0), 1e-9)
    result.prototypes = outcome.protos.tolist()
    result.ood_scores = (outcome.dists / q99).tolist()
    code_np = outcome.codes.to(torch.float32).contiguous().numpy()
    latest = [w for w in plan.sessions.values() if w.row >= 0]
    packed = pack_user_states(outcome.states[[w.row for w in latest]], [w.state.edit_version for w in latest])
    for w, user_state in zip(latest, packed, strict=True):
        w.state.code = code_np[w.row].tobytes()
        w.state.user_state = user_state
        w.state.prototype_id = result.prototypes[w.row]
    return outcome.codes


def _local_outcome(online: OnlineModel, bank: BankState, work: _Work, prev: _Previous) -> Outcome:
    """:func:`persona.model_work.outcome` of work on this process's compute threads (waiting for its forward only
    once the stored previous states are scored)."""
    assert work.job is not None and work.codes is not None and work.states is not None and work.early is not None
    codes, states = work.codes, work.states
    return outcome(
        online,
        bank,
        work.job.pre_rows,
        work.early.result(),
        lambda: (codes.result(), states.result()),
        prev.codes,
        prev.protos,
        prev.states,
        repeats=work.job.repeats,
    )


def _early_input(online: OnlineModel, plan: _Plan) -> EarlyInput:
    """The predictions whose previous state was read from the store (not one a pending batch will write): their
    half of the prequential check needs neither this batch's forward nor the bank the commit scores with."""
    which: list[int] = []
    payloads: list[bytes] = []
    for n, (row, _item) in enumerate(plan.pre_rows):
        if row < -1:
            snapshot = plan.stored_prev[-row - 2][0]
            payload = None if snapshot.origin is not None else _usable_payload(online, snapshot)
            if payload is not None:
                which.append(n)
                payloads.append(payload)
    if not which:
        return EarlyInput([], torch.empty(0, online.cfg.dim), torch.empty(0, dtype=torch.long))
    states = _floats(payloads).view(len(which), online.cfg.dim)
    return EarlyInput(which, states, torch.tensor([plan.pre_rows[n][1] for n in which], dtype=torch.long))


def _window_requests(plan: _Plan) -> tuple[list[WindowRequest], list[int]]:
    """Encoder cache requests for a plan's post-event rows: one per run of a session's events in the same window
    (its rows are consecutive positions of that window); and the post-event row of each state they give."""
    requests: list[WindowRequest] = []
    order: list[int] = []
    for sid, w in plan.sessions.items():
        rows = w.rows
        lo = 0
        for hi in range(1, len(rows) + 1):
            if hi == len(rows) or rows[hi][1] != rows[lo][1]:
                last = rows[hi - 1][0]
                requests.append(WindowRequest(sid, rows[lo][1], plan.post_hist[last], hi - lo))
                order.extend(row for row, _ in rows[lo:hi])
                lo = hi
    return requests, order


def _pad(histories: list[list[int]], t: int) -> torch.Tensor:
    """Left-padded [B, T] index tensor of these histories (each already at most T long)."""
    lengths = np.fromiter(map(len, histories), dtype=np.int64, count=len(histories))
    values = np.fromiter(itertools.chain.from_iterable(histories), dtype=np.int64, count=int(lengths.sum()))
    out = np.full((len(histories), t), PAD, dtype=np.int64)
    # row r's items go to its last lengths[r] columns: a boolean mask in row-major order matches the chain's order
    out[np.arange(t) >= (t - lengths)[:, None]] = values
    return torch.from_numpy(out)


def _score(result: IngestResult, variant: str, ranks: torch.Tensor) -> None:
    """Add one variant's prequential counters for 0-based ranks [P]."""
    r = ranks.to(torch.float64)
    result.predictions[variant] += int(r.numel())
    result.reciprocal_rank[variant] += float((1.0 / (r + 1.0)).sum())
    gain = 1.0 / torch.log2(r + 2.0)
    for k in KS:
        hit = r < k
        result.hits[(variant, k)] += int(hit.sum())
        result.ndcg[(variant, k)] += float(gain[hit].sum())


def _bank_from_rows(rows: Sequence[PrototypeRow], online: OnlineModel) -> BankState:
    """The stored bank as tensors; raises :class:`PersonaError` if it does not fit the model."""
    cfg = online.cfg
    k = online.initial_bank.centres.shape[0]
    if len(rows) != k or [r.prototype_id for r in rows] != list(range(k)):
        raise PersonaError(
            f"the stored prototype bank of model {online.version} has ids {[r.prototype_id for r in rows]}, "
            f"expected 0..{k - 1}",
            "the store and the bundle disagree; re-register the bundle under a new version",
        )
    try:
        centres = torch.stack([code_from_bytes(r.centre, cfg) for r in rows])
        next_items = stored_next_items([r.next_items for r in rows], online.initial_bank.next_items, cfg)
    except ValueError as exc:
        raise PersonaError(f"the stored prototype bank of model {online.version} is unusable: {exc}") from exc
    counts = torch.tensor([r.count for r in rows], dtype=online.initial_bank.counts.dtype)
    return BankState(centres, counts, max(r.version for r in rows), next_items)


def _rows_from_bank(
    bank: BankState, assigned: set[int], previous: Sequence[PrototypeRow], now: datetime, counted: set[int]
) -> list[PrototypeRow]:
    """Rows to upsert: the prototypes that received codes or counted a next item (all of them when the bank is
    being seeded)."""
    last = {r.prototype_id: r.last_assigned_at for r in previous}
    touched = assigned | counted if previous else set(range(bank.centres.shape[0]))
    group = bank.next_items
    return [
        PrototypeRow(
            prototype_id=k,
            centre=code_to_bytes(bank.centres[k]),
            count=float(bank.counts[k]),
            version=0,
            next_items=None if group is None else next_items_to_bytes(group[k]),
            last_assigned_at=now if k in assigned else last.get(k),  # re-seeded ones count as assigned
            updated_at=now,
        )
        for k in sorted(touched)
    ]


def online_counter_increments(result: IngestResult) -> dict[tuple[str, str, int], float]:
    """A batch's prequential counts as store counter increments ``{(name, variant, k): amount}`` (``k`` 0 when the
    counter has no cut-off); the names match the exported metrics without their prefix and suffix."""
    out: dict[tuple[str, str, int], float] = {}
    for v in VARIANTS:
        out[("predictions", v, 0)] = float(result.predictions[v])
        out[("reciprocal_rank", v, 0)] = result.reciprocal_rank[v]
        for k in KS:
            out[("hits", v, k)] = float(result.hits[(v, k)])
            out[("ndcg_gain", v, k)] = result.ndcg[(v, k)]
    return out


def ndcg_gain(rank: int) -> float:
    """NDCG gain of a 0-based rank (one relevant item): ``1 / log2(rank + 2)``."""
    return 1.0 / math.log2(rank + 2)
