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

So the result depends on the events and on the batch boundaries only through the bank snapshot used for
assignments inside a batch; with batches of one event it is exactly the sequential algorithm.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from persona.events import Event, Rejection, RejectReason
from persona.store import NewEvent, PrototypeRow, SessionState, Store
from persona.user_state import pack_user_state, unpack_user_state
from recsys.errors import PersonaError
from recsys.metrics import target_ranks
from recsys.model import PAD, reseed_idle
from recsys.online import BankState, OnlineModel, code_from_bytes, code_to_bytes, refine_bank

log = logging.getLogger(__name__)

__all__ = ["KS", "UNKNOWN_ITEM_POLICIES", "VARIANTS", "IngestResult", "Ingestor", "ModelSource"]

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


@dataclass(slots=True)
class _Work:
    """A touched session while a batch is applied: its state and its history as vocabulary indices."""

    state: SessionState
    indices: list[int]  # vocabulary indices of state.recent_items (UNK for items the model lost)
    # Row of its current state (code, user state): >= 0 in this batch's post-event rows; -(j + 2) for the
    # j-th stored previous state; -1 before either is known.
    row: int = -1


class Ingestor:
    """Applies batches of validated events to the store with the active model (see the module doc).

    Args:
        store: the store; every :meth:`apply` is one transaction on it.
        models: anything with ``get() -> OnlineModel`` (normally :class:`persona.models.ModelProvider`).
        unknown_item_policy: ``"skip"`` (log, count, leave the model state alone) or ``"dlq"``.
        max_recent: recent items kept per session (default and upper bound: the model's ``max_len``).
        prototype_idle_s: a prototype assigned nothing for this long is re-seeded at the batch's worst-served
            session (METHOD.md §3); ``None`` turns re-seeding off.
    """

    def __init__(
        self,
        store: Store,
        models: ModelSource,
        *,
        unknown_item_policy: str = "skip",
        max_recent: int | None = None,
        prototype_idle_s: float | None = 3600.0,
    ) -> None:
        if unknown_item_policy not in UNKNOWN_ITEM_POLICIES:
            raise PersonaError(
                f"unknown item policy {unknown_item_policy!r}; choose one of {', '.join(UNKNOWN_ITEM_POLICIES)}",
                "fix PERSONA_UNKNOWN_ITEM_POLICY",
            )
        if max_recent is not None and max_recent < 1:
            raise PersonaError(f"max_recent must be >= 1, got {max_recent}")
        self.store = store
        self.models = models
        self.unknown_item_policy = unknown_item_policy
        self.max_recent = max_recent
        self.prototype_idle_s = prototype_idle_s

    # ------------------------------------------------------------------------------------------ public
    def apply(self, events: Sequence[Event], *, source: str = "kafka") -> IngestResult:
        """Apply ``events`` (in order) in one store transaction; see the module docstring for the rules.

        Raises whatever the store raises (the transaction is then rolled back: nothing was applied, and
        the caller may retry the same batch safely).
        """
        online = self.models.get()
        result = IngestResult(model_version=online.version)
        if not events:
            return result
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

        with self.store.transaction() as uow:
            inserted = uow.insert_events(to_log)
            fresh: list[tuple[Event, bool]] = []
            for e, known in kept:
                if e.event_id in inserted:
                    inserted.discard(e.event_id)  # a repeat later in this batch is a duplicate
                    fresh.append((e, known))
            result.duplicates = len(kept) - len(fresh)
            if not fresh:
                return result

            stored = uow.get_sessions({e.session_id for e, _ in fresh})
            rows = uow.lock_prototypes(online.version)
            bank = _bank_from_rows(rows, online) if rows else online.initial_bank
            codes = self._apply_in_memory(online, fresh, stored, bank, cap, now, result)

            if codes is not None:
                protos = torch.tensor(result.prototypes, dtype=torch.long)
                refined = refine_bank(bank, codes, protos, online.cfg)
                touched = set(result.prototypes) | self._reseed(online, refined, rows, codes, protos, now)
                saved = uow.save_prototypes(online.version, _rows_from_bank(refined, touched, rows, now))
                result.bank_version = max((r.version for r in saved), default=0)
            else:
                result.bank_version = max((r.version for r in rows), default=0)
            uow.upsert_sessions(list(result.sessions.values()))

        stored_at = time.time()
        result.freshness_s = [stored_at - ts for ts in result.freshness_s]  # event ts -> state committed
        return result

    # ------------------------------------------------------------------------------------------ internals
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

    def _apply_in_memory(
        self,
        online: OnlineModel,
        fresh: list[tuple[Event, bool]],
        stored: dict[str, SessionState],
        bank: BankState,
        cap: int,
        now: datetime,
        result: IngestResult,
    ) -> torch.Tensor | None:
        """Walk the new events in order, building histories; then run the model once for the whole batch.

        Fills ``result`` (sessions, counters, per-event lists; ``freshness_s`` temporarily holds the event
        timestamps) and returns the codes [B, L, d] of the applied events (``None`` if none was applied).

        The sequence encoder runs once per applied event, on its post-event history: that user state is
        stored with the session, and it is exactly what the session's *next* event is scored with. So a
        prediction never re-encodes the previous history (the stored state, or the in-batch one, is it).
        """
        cfg = online.cfg
        t = cfg.max_len
        index_of = online.index_of
        sessions: dict[str, _Work] = {}

        post_hist: list[list[int]] = []  # history after each applied event (for its code and user state)
        pre_rows: list[tuple[int, int]] = []  # (row of the previous state, target index) per prediction
        stored_prev: list[tuple[_Stored, list[int]]] = []  # stored states that predict an event
        applied_ts = result.freshness_s

        for e, known in fresh:
            w = sessions.get(e.session_id)
            if w is None:
                st = stored.get(e.session_id)
                if st is None:
                    st = SessionState(session_id=e.session_id, device_id=e.device_id, user_id=e.user_id)
                w = _Work(st, [index_of(i) for i in st.recent_items[-cap:]])
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
                result.unknown_items += 1
                continue

            item = index_of(e.item_id)
            if w.indices:
                if w.row == -1:
                    w.row = -(len(stored_prev) + 2)
                    # Snapshot what the stored state was computed with: the loop re-stamps model_version below.
                    snapshot = _Stored(st.model_version, st.code, st.user_state, st.prototype_id, st.edit_version)
                    stored_prev.append((snapshot, w.indices))
                pre_rows.append((w.row, item))
            w.indices = [*w.indices, item][-cap:]
            st.recent_items = [*st.recent_items, e.item_id][-cap:]
            st.event_count += 1
            st.edit_version += 1
            st.model_version = online.version
            w.row = len(post_hist)
            post_hist.append(w.indices)
            applied_ts.append(e.ts.timestamp())
            result.item_indices.append(item)

        result.applied = len(post_hist)
        result.sessions = {sid: w.state for sid, w in sessions.items()}
        if not post_hist:
            return None

        b = len(post_hist)
        with torch.inference_mode():
            prev = _previous_states(online, bank, stored_prev)
            all_hist = _pad(post_hist + [stored_prev[j][1] for j in prev.recompute], t)
            all_codes = online.codes(all_hist)
            all_states = online.user_states(all_hist)
            codes, states = all_codes[:b], all_states[:b]
            if prev.recompute:
                prev.codes[prev.recompute] = all_codes[b:]
                prev.states[prev.recompute] = all_states[b:]
                prev.protos[prev.recompute] = online.assign(all_codes[b:], bank)
            protos = online.assign(codes, bank)
            dists = online.distances(codes, protos, bank)
            if pre_rows:
                # Row r >= 0: this batch's r-th post-event state; r = -(j + 2): the j-th stored previous state.
                sel = torch.tensor([r if r >= 0 else b + (-r - 2) for r, _i in pre_rows], dtype=torch.long)
                targets = torch.tensor([i for _r, i in pre_rows], dtype=torch.long)
                ratios, ranks = _edits_and_ranks(
                    online,
                    bank,
                    torch.cat([codes, prev.codes])[sel],
                    torch.cat([protos, prev.protos])[sel],
                    torch.cat([states, prev.states])[sel],
                    targets,
                )
                for variant, r in zip(VARIANTS, ranks, strict=True):
                    _score(result, variant, r)
                result.edit_norm_ratios = ratios.tolist()

        q99 = max(online.drift.distance_quantiles.get("q99", 1.0), 1e-9)
        result.prototypes = protos.tolist()
        result.ood_scores = (dists / q99).tolist()
        code_np = codes.to(torch.float32).contiguous().numpy()
        for w in sessions.values():
            if w.row >= 0:
                w.state.code = code_np[w.row].tobytes()
                w.state.user_state = pack_user_state(states[w.row], w.state.edit_version)
                w.state.prototype_id = result.prototypes[w.row]
        return codes


@dataclass
class _Previous:
    """Codes [S, L, d], prototypes [S] and user states [S, D] of stored sessions whose next event is scored.

    ``recompute`` lists the rows whose stored values cannot be used (another model version, rows written before
    user states were stored, sizes that do not fit): the caller fills them from the batch's forward.
    """

    codes: Tensor
    protos: Tensor
    states: Tensor
    recompute: list[int]


@dataclass(frozen=True, slots=True)
class _Stored:
    """What a stored session state was computed with, as read from the store."""

    model_version: str | None
    code: bytes | None
    user_state: bytes | None
    prototype_id: int | None
    edit_version: int


def _previous_states(online: OnlineModel, bank: BankState, prev: list[tuple[_Stored, list[int]]]) -> _Previous:
    cfg = online.cfg
    out = _Previous(
        torch.zeros(len(prev), cfg.n_edit_layers, cfg.code_dim),
        torch.zeros(len(prev), dtype=torch.long),
        torch.zeros(len(prev), cfg.dim),
        [],
    )
    n_protos = bank.centres.shape[0]
    for j, (st, _hist) in enumerate(prev):
        code = user_state = None
        if st.model_version == online.version and st.code is not None:
            user_state = unpack_user_state(st.user_state, st.edit_version, cfg)
            with contextlib.suppress(ValueError):
                code = code_from_bytes(st.code, cfg)
        if code is None or user_state is None:
            out.recompute.append(j)
            continue
        out.codes[j], out.states[j] = code, user_state
        if st.prototype_id is not None and 0 <= st.prototype_id < n_protos:
            out.protos[j] = st.prototype_id  # scored with the edit the API served for it
        else:
            out.protos[j] = online.assign(out.codes[j : j + 1], bank)[0]
    return out


#: Rows per chunk of edit work: an edit is L·D·D floats per row, and elementwise work on a [500, L, 64, 64]
#: tensor runs from memory; 128-row chunks stay in cache (measured ~3x faster edits).
_EDIT_CHUNK = 128


def _edits_and_ranks(
    online: OnlineModel, bank: BankState, codes: Tensor, protos: Tensor, states: Tensor, targets: Tensor
) -> tuple[Tensor, list[Tensor]]:
    """Edit-norm ratios [P] and the prequential ranks [P] per variant of P predictions.

    Prediction j is scored from the previous state's user state ``states[j]`` under its edit (``codes[j]``,
    prototype ``protos[j]``) and under the base model: exactly :meth:`OnlineModel.target_ranks` on the
    previous history, with the encoder's output reused and the edit work chunked to stay in cache.
    """
    n_pred = len(targets)
    persona = torch.empty(n_pred, dtype=torch.long)
    base = torch.empty(n_pred, dtype=torch.long)
    ratios = torch.empty(n_pred)
    for start in range(0, n_pred, _EDIT_CHUNK):
        sl = slice(start, start + _EDIT_CHUNK)
        base[sl] = target_ranks(online.scores_from_states(states[sl]), targets[sl])
        edit = online.edit(codes[sl], bank, protos[sl])
        ratios[sl] = online.edit_norm_ratio(edit)
        persona[sl] = target_ranks(online.scores_from_states(states[sl], edit), targets[sl])
    return ratios, [persona, base]


def _pad(histories: list[list[int]], t: int) -> torch.Tensor:
    """Left-padded [B, T] index tensor of these histories (each already at most T long)."""
    out = np.full((len(histories), t), PAD, dtype=np.int64)
    for row, h in enumerate(histories):
        if h:
            out[row, t - len(h) :] = h
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
    except ValueError as exc:
        raise PersonaError(f"the stored prototype bank of model {online.version} is unusable: {exc}") from exc
    counts = torch.tensor([r.count for r in rows], dtype=online.initial_bank.counts.dtype)
    return BankState(centres, counts, max(r.version for r in rows))


def _rows_from_bank(
    bank: BankState, assigned: set[int], previous: Sequence[PrototypeRow], now: datetime
) -> list[PrototypeRow]:
    """Rows to upsert: the prototypes that received codes (all of them when the bank is being seeded)."""
    last = {r.prototype_id: r.last_assigned_at for r in previous}
    touched = assigned if previous else set(range(bank.centres.shape[0]))
    return [
        PrototypeRow(
            prototype_id=k,
            centre=code_to_bytes(bank.centres[k]),
            count=float(bank.counts[k]),
            version=0,
            last_assigned_at=now if k in assigned else last.get(k),  # re-seeded ones count as assigned
            updated_at=now,
        )
        for k in sorted(touched)
    ]


def ndcg_gain(rank: int) -> float:
    """NDCG gain of a 0-based rank (one relevant item): ``1 / log2(rank + 2)``."""
    return 1.0 / math.log2(rank + 2)
