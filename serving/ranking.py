"""Session state → edit → ranking: the business logic behind every ranking and edit route.

The routes only parse and shape; everything that decides *what* is ranked lives here, on plain values, so it
is testable without HTTP and identical for the single and the batch form (a single request is a batch of 1).

How one ranking is made (DESIGN.md "Serving API", METHOD.md §6):

1. Session state is read fresh from the store on every request (read-your-writes: nothing caches it).
2. History = the stored ``recent_items`` + the request's known ``recent_items`` (appended; unknown ones are
   reported and skipped), truncated to the model's ``max_len`` by :meth:`OnlineModel.histories`.
3. Edit: a stored session whose code was computed by the serving model version reuses it with its stored
   prototype (``edit(code, bank, prototypes=[prototype_id])``, exactly what the consumer stored), and its stored
   user state (the encoder's output for that history), so the sequence encoder does not run; otherwise the
   adapter and the encoder run on the history now and the nearest prototype is assigned. All rows of a
   request share one batched forward.
4. Fallbacks (reported in every response, counted in ``persona_fallbacks_total``): no known item at all →
   popularity; a stored code that no longer fits → its prototype's edit alone; no usable prototype bank →
   the base model.
5. During a store outage a request that names a session fails with :class:`persona.store.StoreUnavailable`
   (503 with ``Retry-After``); a stateless one (``recent_items`` only) is still ranked, with the last prototype
   bank read (or the bundle's), and one without a known item still gets the popularity ranking.

The prototype bank lives in the store and is refined by the consumer; it is cached per model version and
re-read at most every ``bank_ttl_s`` (one reader refreshes, the others keep the previous snapshot), so a
stored session's ranking costs one indexed session read, its edit, the head and the item scores.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor

from persona.bank_rows import bank_from_rows
from persona.models import ModelProvider
from persona.store import PrototypeRow, SessionState, Store, StoreUnavailable
from persona.user_state import unpack_user_state
from recsys.errors import PersonaError
from recsys.model import PAD, UNK
from recsys.online import BankState, OnlineModel, code_from_bytes
from recsys.repeats import RepeatCounts
from recsys.retrieval import NormOrderedIndex
from serving.problems import Conflict, InvalidInput, NotFound

log = logging.getLogger("persona.serving")

#: Client histories may be up to this many times the model's ``max_len`` (then truncated), never more.
RECENT_FACTOR = 4


@dataclass(frozen=True, slots=True)
class RankQuery:
    """One ranking request, already validated for static limits (ids, sizes, k)."""

    session_id: str | None = None
    recent_items: Sequence[str] | None = None
    candidates: Sequence[str] | None = None
    k: int = 10
    #: Leave out the history's items; None = the model's default: yes, unless it re-consumes (has the repeat part).
    exclude_seen: bool | None = None
    fields: tuple[str, ...] = ()  # item attributes to return beside each item's title


@dataclass(slots=True)
class RankResult:
    """One ranking: items best first with their scores, and where the edit came from."""

    session_id: str | None
    items: list[tuple[str, float]]
    model_version: str
    prototype_id: int | None
    edit_version: int
    fallback: str | None
    known_session: bool
    unknown_items_ignored: list[str] = field(default_factory=list)
    unknown_candidates: list[str] = field(default_factory=list)
    #: Per item of ``items``: its ``title`` (None when unknown) and the query's ``fields``.
    details: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ExportedEdit:
    """The additive edit of one session: ΔW [L, D, D], Δb [L, D], its code [L, d], and the per-item score bias [N]
    its prototype adds (the group bias; ``None`` when the model has none)."""

    session_id: str
    model_version: str
    prototype_id: int
    edit_version: int
    weight: Tensor
    bias: Tensor
    code: Tensor
    item_bias: Tensor | None = None


@dataclass(slots=True)
class _Row:
    """The resolved inputs of one ranking row."""

    history: list[str]
    state: SessionState | None
    mode: str  # "stored" | "recompute" | "popularity"
    code: Tensor | None = None
    user_state: Tensor | None = None  # the stored encoder output h [D], when it can be reused
    prototype: int | None = None
    fallback: str | None = None
    unknown: list[str] = field(default_factory=list)
    indices: Tensor | None = None  # the padded history [T] as vocabulary indices, once a step needs it
    before: int = 0  # items of the session older than ``history`` (they place the encoder's window)
    counts: RepeatCounts[str] | None = None  # its whole-history item counts (a model with a repeat part)


def _histories(online: OnlineModel, rows: Sequence[_Row], which: Sequence[int]) -> Tensor:
    """Padded histories [len(which), T] of ``rows[which]``: built once per row (one call for those not built yet),
    since a row that must be re-encoded needs it for both its code and its user state."""
    todo = [n for n in which if rows[n].indices is None]
    if todo:
        built_all = online.histories([rows[n].history for n in todo], [rows[n].before for n in todo])
        for n, built in zip(todo, built_all, strict=True):
            rows[n].indices = built
    built_rows = [rows[n].indices for n in which]
    return torch.stack([t for t in built_rows if t is not None])


@dataclass(frozen=True, slots=True)
class _CachedBank:
    model_version: str
    key: tuple[int, int]  # (rows, Σ row versions): changes whenever the consumer refines the bank
    state: BankState
    read_at: float


class Ranker:
    """Ranks sessions with the live model; safe to share between request threads (no per-request state)."""

    def __init__(
        self,
        store: Store,
        models: ModelProvider,
        *,
        bank_ttl_s: float = 1.0,
        on_fallback: Callable[[str], None] | None = None,
    ) -> None:
        self.store = store
        self.models = models
        self.bank_ttl_s = bank_ttl_s
        self.on_fallback = on_fallback
        self._bank: _CachedBank | None = None
        self._bank_lock = threading.Lock()
        self._popularity: weakref.WeakKeyDictionary[OnlineModel, Tensor] = weakref.WeakKeyDictionary()

    # ------------------------------------------------------------------ prototype bank
    def bank(self, online: OnlineModel) -> BankState:
        """The prototype bank of ``online``'s version: stored centres if any, else the bundle's initial bank."""
        cached = self._bank
        fresh = cached is not None and cached.model_version == online.version
        if cached is not None and fresh and time.monotonic() - cached.read_at < self.bank_ttl_s:
            return cached.state
        if not self._bank_lock.acquire(blocking=False):
            if cached is not None and fresh:
                return cached.state  # another thread is re-reading it; a ≤ 1 s old snapshot is fine
            self._bank_lock.acquire()
        try:
            try:
                rows = self.store.load_prototypes(online.version)
            except StoreUnavailable:
                # A store outage: what needs a session's state answers 503 (it was read before this), but a
                # stateless ranking can go on with the last bank read, or the bundle's own until there is one.
                return cached.state if cached is not None and fresh else online.initial_bank
            key = (len(rows), sum(r.version for r in rows))
            cached = self._bank
            if cached is not None and cached.model_version == online.version and cached.key == key:
                state = cached.state
            else:
                state = _bank_from_rows(rows, online)
            self._bank = _CachedBank(online.version, key, state, time.monotonic())
            return state
        finally:
            self._bank_lock.release()

    def popularity(self, online: OnlineModel) -> Tensor:
        """Training interaction counts [N] as scores (PAD/UNK never rank); computed once per model."""
        scores = self._popularity.get(online)
        if scores is None:
            scores = torch.as_tensor(np.asarray(online.item_counts, dtype=np.float32)).clone()
            scores[PAD] = float("-inf")
            scores[UNK] = float("-inf")
            self._popularity[online] = scores
        return scores

    # ------------------------------------------------------------------ sessions
    def session(self, session_id: str) -> SessionState:
        state = self.store.get_session(session_id)
        if state is None:
            raise NotFound(f"unknown session {session_id!r}", "sessions exist once an event for them is applied")
        return state

    def session_edit(self, session_id: str) -> ExportedEdit:
        """The edit the ranking routes apply for this session, for a device to apply to its own copy."""
        online = self.models.get()
        state = self.session(session_id)
        bank = self.bank(online)
        row = self._plan(online, state, [], [], bank)
        if row.mode == "popularity":
            raise Conflict(
                f"session {session_id!r} has no item that model {online.version} knows, so it has no edit",
                "rank it (popularity) until it has events on catalogue items",
            )
        if bank.centres.shape[0] == 0:
            raise Conflict(f"model {online.version} has no prototype bank, so sessions have no edit")
        codes, protos = self._codes(online, [row], bank)
        edit = online.edit(codes, bank, prototypes=protos, histories=partial(_windows, online, [row]))
        group = online.group_bias(protos, codes, bank, groups=edit.groups)
        return ExportedEdit(
            session_id=session_id,
            model_version=online.version,
            prototype_id=int(protos[0]),
            edit_version=state.edit_version,
            weight=edit.weight[0],
            bias=edit.bias[0],
            code=codes[0],
            item_bias=None if group is None else group[0],
        )

    # ------------------------------------------------------------------ ranking
    def rank(self, queries: Sequence[RankQuery], *, batch: bool = False) -> list[RankResult]:
        """Rank every query in one batched forward; ``batch`` only changes where input errors point."""
        online = self.models.get()  # one model object for the whole request, even across a hot swap
        self._check(online, queries, batch)
        ids = {q.session_id for q in queries if q.session_id is not None}
        states: dict[str, SessionState] = {}
        if ids:
            with self.store.read() as uow:
                states = uow.get_sessions(ids)
        bank = self.bank(online)
        rows: list[_Row] = []
        for q in queries:
            state = states.get(q.session_id) if q.session_id is not None else None
            known = [i for i in q.recent_items or () if online.known(i)]
            unknown = [i for i in q.recent_items or () if not online.known(i)]
            dropped = max(0, len(known) - online.cfg.max_len)
            rows.append(self._plan(online, state, known[dropped:], unknown, bank, dropped))
            if online.has_repeat_part:  # the whole history's item counts: stored ones, then the request's items
                counts = online.session_counts(*((state.item_counts, state.recent_items) if state else (None, ())))
                for item in known:
                    counts.add(item)
                rows[-1].counts = counts

        model_rows = [j for j, r in enumerate(rows) if r.mode != "popularity"]
        scores: Tensor | None = None
        tops: dict[int, tuple[Tensor, Tensor]] = {}
        # Items each row must not return (its history window), as vocabulary indices: cheaper than a padded
        # history tensor, which only the rows that must be re-encoded need.
        default_exclude = not online.has_repeat_part  # a re-consuming model is there to recommend seen items
        seen = [
            online.indices_of(r.history[-online.cfg.max_len :])
            if (default_exclude if q.exclude_seen is None else q.exclude_seen)
            else []
            for q, r in zip(queries, rows, strict=True)
        ]
        if model_rows:
            picked = [rows[j] for j in model_rows]
            h = _user_states(online, picked)
            bias: Tensor | None = None
            if bank.centres.shape[0] > 0:
                codes, protos = self._codes(online, picked, bank)
                windows = partial(_windows, online, picked)  # built only if a group term needs them
                vectors, bias = online.served_terms(h, codes, protos, bank, windows)  # bias None: no group term applies
                for r, p in zip(picked, protos.tolist(), strict=True):
                    r.prototype = int(p)
            else:
                for r in picked:
                    r.fallback, r.prototype = "base", None
                vectors = online.queries(h)
            asked = [queries[j] for j in model_rows]
            masked = [seen[j] for j in model_rows]
            repeats = online.repeat_entries([r.counts for r in picked])  # None: the model has no repeat part
            index = online.index
            if index is not None and all(q.candidates is None for q in asked):
                bias = _with_repeat_bias(online, vectors, bias, repeats)
                tops = _index_top_k(index, vectors, asked, masked, bias)  # large catalogue: no full scan
            else:
                scores = online.scores_from_queries(vectors, bias, repeats)
                tops = _batched_top_k(scores, asked, masked)

        results: list[RankResult] = []
        position = {j: n for n, j in enumerate(model_rows)}
        for j, (q, r) in enumerate(zip(queries, rows, strict=True)):
            own = j in position
            if r.mode == "popularity":
                r.fallback, r.prototype = "popularity", None
            top = tops.get(position[j]) if own else None
            unknown_candidates: list[str]
            if top is not None:  # ranked already, with the rest of the batch
                items, unknown_candidates = _named(online, *top), []
            else:
                s = scores[position[j]] if own and scores is not None else self.popularity(online)
                items, unknown_candidates = _top_k(online, s, seen[j], q, shared=not own)
            if r.fallback is not None and self.on_fallback is not None:
                self.on_fallback(r.fallback)
            results.append(
                RankResult(
                    session_id=q.session_id,
                    items=items,
                    model_version=online.version,
                    prototype_id=r.prototype,
                    edit_version=r.state.edit_version if r.state is not None else 0,
                    fallback=r.fallback,
                    known_session=r.state is not None,
                    unknown_items_ignored=r.unknown,
                    unknown_candidates=unknown_candidates,
                    details=online.describe([item for item, _ in items], q.fields),
                )
            )
        return results

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _check(online: OnlineModel, queries: Sequence[RankQuery], batch: bool) -> None:
        """Limits that depend on the live model (the static ones are in :mod:`serving.schemas`)."""
        limit = RECENT_FACTOR * online.cfg.max_len
        errors = []
        for n, q in enumerate(queries):
            where: list[str | int] = ["body", "requests", n] if batch else ["body"]
            if q.session_id is None and q.recent_items is None:
                errors.append({"loc": where, "msg": "give session_id, recent_items or both", "type": "missing"})
            missing = [f for f in q.fields if online.items is None or f not in online.items.columns]
            if missing:
                have = ", ".join(online.items.fields) if online.items is not None else "none: no item metadata"
                msg = f"unknown item field {missing[0]!r} (model {online.version} has {have})"
                errors.append({"loc": [*where, "fields"], "msg": msg, "type": "unknown_field"})
            if q.recent_items is not None and len(q.recent_items) > limit:
                msg = f"at most {limit} recent_items (4 × the model's max_len {online.cfg.max_len}), got "
                errors.append(
                    {"loc": [*where, "recent_items"], "msg": msg + str(len(q.recent_items)), "type": "too_long"}
                )
        if errors:
            raise InvalidInput(f"{len(errors)} invalid request(s): {errors[0]['msg']}", errors=errors)

    def _plan(
        self,
        online: OnlineModel,
        state: SessionState | None,
        extra: list[str],
        unknown: list[str],
        bank: BankState,
        dropped: int = 0,
    ) -> _Row:
        """Decide where a row's edit comes from (stored code, recompute, or popularity). ``dropped``: the request's
        items older than ``extra`` that were cut off (they still count for the encoder's window)."""
        stored = list(state.recent_items) if state is not None else []
        history = stored + extra
        window = history[-online.cfg.max_len :]
        if not any(online.known(i) for i in window):
            return _Row(history, state, "popularity", unknown=unknown)
        # the session's items older than its stored recent ones, and the request's cut off ones
        before = (max(0, state.event_count - len(stored)) if state is not None else 0) + dropped
        row = _Row(history, state, "recompute", unknown=unknown, before=before)
        if state is None or extra or state.model_version != online.version or state.code is None:
            return row
        n_protos = bank.centres.shape[0]
        valid_proto = state.prototype_id is not None and 0 <= state.prototype_id < n_protos
        try:
            row.code = code_from_bytes(state.code, online.cfg)
        except ValueError:
            if not valid_proto:
                log.warning(
                    "session %s: stored code does not fit model %s; recomputing", state.session_id, online.version
                )
                return row
            row.code = bank.centres[state.prototype_id].clone()  # zero residual: the prototype's edit alone
            row.fallback = "prototype"
        row.mode = "stored"
        row.prototype = state.prototype_id if valid_proto else None
        row.user_state = unpack_user_state(state.user_state, state.edit_version, online.cfg)  # None: recompute
        return row

    @staticmethod
    def _codes(online: OnlineModel, rows: Sequence[_Row], bank: BankState) -> tuple[Tensor, Tensor]:
        """Codes [B, L, d] and prototype ids [B] of model rows: stored ones reused, the rest computed batched."""
        fresh = [n for n, r in enumerate(rows) if r.code is None]
        codes = torch.empty(len(rows), online.cfg.n_edit_layers, online.cfg.code_dim)
        if fresh:
            codes[fresh] = online.codes(_histories(online, rows, fresh))
        for n, r in enumerate(rows):
            if r.code is not None:
                codes[n] = r.code
        protos = torch.full((len(rows),), -1, dtype=torch.long)
        for n, r in enumerate(rows):
            if r.prototype is not None:
                protos[n] = r.prototype
        missing = (protos < 0).nonzero().flatten()
        if len(missing):
            protos[missing] = online.assign(codes[missing], bank)
        return codes, protos


def _windows(online: OnlineModel, rows: Sequence[_Row]) -> Tensor:
    """Model rows' encoder windows [B, T], which their history groups read (:meth:`OnlineModel.history_groups`)."""
    return _histories(online, rows, range(len(rows)))


def _user_states(online: OnlineModel, rows: Sequence[_Row]) -> Tensor:
    """Encoder outputs h [B, D] of model rows: the stored ones reused, the others encoded in one batch.

    Reusing the stored h (written by the consumer in the same transaction as the history) is what makes a
    stored session's ranking skip the sequence encoder, the costliest step of a ranking.
    """
    missing = [n for n, r in enumerate(rows) if r.user_state is None]
    if not missing:
        return torch.stack([r.user_state for r in rows if r.user_state is not None])
    computed = online.user_states(_histories(online, rows, missing))
    if len(missing) == len(rows):
        return computed
    out = torch.empty(len(rows), online.cfg.dim)
    out[missing] = computed
    for n, r in enumerate(rows):
        if r.user_state is not None:
            out[n] = r.user_state
    return out


def _bank_from_rows(rows: Sequence[PrototypeRow], online: OnlineModel) -> BankState:
    """Stored prototype rows → a bank (:func:`persona.bank_rows.bank_from_rows`, as the consumer reads them); the
    bundle's initial bank when none are stored, or, with a warning, when they do not fit the model: a ranking must
    still answer."""
    if not rows:
        return online.initial_bank
    try:
        return bank_from_rows(rows, online)
    except PersonaError as exc:
        log.warning("%s; using the bundle's bank", exc.message)
        return online.initial_bank


@torch.inference_mode()
def _with_repeat_bias(
    online: OnlineModel, vectors: Tensor, bias: Tensor | None, repeats: Tensor | None
) -> Tensor | None:
    """The rows' group bias [B, N] plus the repeat part's bias at each session's items, as one dense bias for the
    index (exact with any bias); ``bias`` unchanged without a repeat part.

    The mixture forms of the part (recsys.repeats.FORMS) need each row's logsumexp over the whole catalogue, which
    the index never computes: the part scans the catalogue for it, exactly, in chunks
    (:func:`recsys.repeats.catalogue_logsumexp`), so an indexed catalogue with a repeat part costs a full scan per
    row on top of the index's top-k (the first form did not need it)."""
    rep = online.model.device_model.repeat_bias(vectors, online.item_targets_t.T, repeats)
    if rep is None:
        return bias
    dense = torch.zeros(vectors.shape[0], online.n_items) if bias is None else bias.clone()
    return dense.scatter_add_(1, *rep)


@torch.inference_mode()
def _index_top_k(
    index: NormOrderedIndex,
    vectors: Tensor,
    queries: Sequence[RankQuery],
    seen: Sequence[list[int]],
    bias: Tensor | None = None,
) -> dict[int, tuple[Tensor, Tensor]]:
    """Top-k of every row through the exact index (a large catalogue's rows, none with candidates), with the rows'
    group bias [B, N] when given (the index stays exact: :meth:`NormOrderedIndex.top_k`)."""
    width = max((len(s) for s in seen), default=0)
    exclude = torch.full((len(seen), max(width, 1)), PAD, dtype=torch.long)  # PAD is not in the index: skips nothing
    for n, items in enumerate(seen):
        if items:
            exclude[n, : len(items)] = torch.tensor(items, dtype=torch.long)
    indices, values = index.top_k(vectors, max(q.k for q in queries), exclude, bias)
    return {n: (indices[n, : q.k], values[n, : q.k]) for n, q in enumerate(queries)}


@torch.inference_mode()
def _batched_top_k(
    scores: Tensor, queries: Sequence[RankQuery], seen: Sequence[list[int]]
) -> dict[int, tuple[Tensor, Tensor]]:
    """Top-k (indices, values) of every row of ``scores`` [B, N] without candidates, in one masked topk call.

    One call over the whole batch instead of one per row (measured at 1M items before the index existed: the
    per-row calls were a third of a batch's time). Rows are masked in place (``exclude_seen``), exactly as
    :func:`_top_k` masks a single row.
    """
    plain = [n for n, q in enumerate(queries) if q.candidates is None]
    if not plain:
        return {}
    for n in plain:
        if seen[n]:
            scores[n, seen[n]] = float("-inf")
    k = min(max(queries[n].k for n in plain), scores.shape[1] - 2)
    sub = scores if len(plain) == len(queries) else scores[plain]
    top = torch.topk(sub, k, dim=1)
    return {n: (top.indices[m, : queries[n].k], top.values[m, : queries[n].k]) for m, n in enumerate(plain)}


@torch.inference_mode()  # the scores are inference tensors: masking them in place needs the same mode
def _top_k(
    online: OnlineModel, scores: Tensor, seen: list[int], q: RankQuery, *, shared: bool = False
) -> tuple[list[tuple[str, float]], list[str]]:
    """Mask (seen items, candidates) and take the top k; items that cannot rank (-inf) are never returned.

    The masking is :meth:`OnlineModel.rank`'s, so the API and the library agree item for item; but the
    row is masked in place (it is this request's own scores unless ``shared``) and candidates are ranked
    by gathering their scores, not by adding a full-catalogue mask: with 1M items those copies dominated.
    """
    s = scores.clone() if shared else scores
    if seen:
        s[seen] = float("-inf")
    unknown_candidates: list[str] = []
    if q.candidates is not None:
        idx = []
        for c in q.candidates:
            i = online.index_of(c)
            if i > UNK:
                idx.append(i)
            else:
                unknown_candidates.append(c)
        if not idx:
            return [], unknown_candidates
        pool = torch.unique(torch.tensor(idx, dtype=torch.long))
        best = torch.topk(s[pool], min(q.k, len(pool)))
        return _named(online, pool[best.indices], best.values), unknown_candidates
    best = torch.topk(s, min(q.k, s.shape[0] - 2))
    return _named(online, best.indices, best.values), unknown_candidates


def _named(online: OnlineModel, indices: Tensor, values: Tensor) -> list[tuple[str, float]]:
    """(item id, score) pairs, best first; items that cannot rank (-inf) are dropped."""
    names = online.item_names
    return [(names[i], v) for i, v in zip(indices.tolist(), values.tolist(), strict=True) if v != float("-inf")]
