"""A trained model ready for live use: item ids in, codes, edits and rankings out (METHOD.md §6).

This is the one place the consumer and the API turn session state into model inputs, so both agree
exactly. It knows nothing of Kafka, HTTP or SQL: session state comes in as plain Python values.

    >>> online = OnlineModel.load(Path("bundle"))                       # doctest: +SKIP
    >>> hist = online.histories([["50", "172", "133"]])
    >>> codes = online.codes(hist)                                     # [1, L, d]
    >>> edit = online.edit(codes, histories=hist)                      # nearest prototype + residual
    >>> items, scores = online.rank(hist, edit, k=10)
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from recsys.bundle import ItemMetadata
from recsys.edit_rows import EditRows
from recsys.edited_head import EditedHead, GeneratorTerms
from recsys.fine_rows import fine_rows_of
from recsys.group_rows import GroupRows
from recsys.history_rows import history_rows_of
from recsys.metrics import target_ranks
from recsys.model import (
    PAD,
    UNK,
    Edit,
    ModelConfig,
    PersonaModel,
    add_bias,
    count_next_items,
    fine_group_bias,
    group_bias,
    refine_centres,
)
from recsys.pipeline import TrainedModel, load_trained
from recsys.repeat_rows import SMALL_BATCH, PreparedRows, RepeatRows
from recsys.repeats import ENTRY_WIDTH, REPEAT_SIZE, CountsSnapshots, RepeatCounts, entries_tensor
from recsys.retrieval import NormOrderedIndex
from recsys.stored_rows import overlay_stored
from recsys.switch import terms_on, update_switches
from recsys.vocab import ItemVocab
from recsys.windows import window_length

#: Catalogues from this size on rank through :class:`NormOrderedIndex` instead of scoring every item.
INDEXED_FROM = 200_000

#: Rows per encoder call: [64, T, D] activations stay in cache (larger chunks measured slower on CPU).
ENCODE_CHUNK = 64

#: Sessions' encoder windows [B, T], or a zero-argument callable that builds them: the history groups read them, and
#: a caller that has not built them yet passes the callable so that nothing is built for a model without the groups.
Windows = Tensor | Callable[[], Tensor]


class _Indices(dict[str, int]):
    """Item id → vocabulary index; an unknown id maps to ``UNK`` (so a plain ``map`` can look up many)."""

    def __missing__(self, key: str) -> int:
        return UNK


@dataclass(frozen=True)
class BankState:
    """A snapshot of the prototype centres [K, L, d] and their counts [K], with the version it came from, the
    prototypes' decayed next-item counts [K, N] (their group bias, METHOD.md §3b; ``None``: no group bias) and their
    switches for the edit and the group terms [K, 3] (:mod:`recsys.switch`; ``None``: every term on)."""

    centres: Tensor
    counts: Tensor
    version: int = 0
    next_items: Tensor | None = None
    switches: Tensor | None = None
    # The prototypes' own edits and the factored head built from them, computed on first use; keyed by the centres'
    # in-place version counter so an in-place change (re-seeding) can never serve stale edits.
    _edits: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict, compare=False, repr=False)
    _heads: dict[int, EditedHead] = field(default_factory=dict, compare=False, repr=False)


class OnlineModel:
    """Inference-only wrapper around a bundle; thread-safe for concurrent requests (its only mutable state, the
    lazily built top-k index of a large catalogue, is built once under a lock)."""

    def __init__(self, trained: TrainedModel) -> None:
        self.trained = trained
        self.model: PersonaModel = trained.model
        self.model.eval()
        self.cfg: ModelConfig = self.model.cfg
        self.vocab: ItemVocab = trained.vocab
        self.version: str = trained.version
        with torch.inference_mode():
            # Kept as [D, N] (contiguous): scoring is then a plain [B, D] × [D, N] product, measured 2× faster
            # for one row at 1M items than multiplying by the transposed view of an [N, D] table.
            self.item_targets_t = self.model.device_model.item_targets().T.contiguous()
        part = self.model.device_model.repeat
        # a few rows' repeat part in NumPy (single rankings), built here so that it needs no lock
        self._repeat_rows = None if part is None else RepeatRows(part, self.item_targets_t.T)
        bank = self.model.bank
        # the group counts only where the model uses them (β > 0): a bank without them stores and ships less
        group = bank.next_items.clone() if self.cfg.group_bias_weight > 0 else None
        self.initial_bank = BankState(bank.centres.clone(), bank.counts.clone(), 0, group, bank.switches.clone())
        self.item_counts = trained.item_counts
        self.drift = trained.drift
        self._index = _Indices({item: i + ItemVocab.OFFSET for i, item in enumerate(self.vocab.ids)})
        #: Vocabulary index → item id (the reserved slots hold their tokens): :meth:`decode` as a plain list.
        self.item_names: list[str] = self.vocab.decode(np.arange(self.vocab.size))
        #: Titles and other item attributes, when the bundle has them (``items.json``); ``None`` otherwise.
        self.items: ItemMetadata | None = trained.items
        self._index_built: NormOrderedIndex | None = None
        self._index_lock = threading.Lock()
        self._generator_terms: GeneratorTerms | None = None
        self._group_rows_built: GroupRows | None = None  # a single ranking's group terms in NumPy, on first use
        self._history = history_rows_of(self.model)  # the history groups, fixed: their bias rows computed once
        self._item_inputs: Tensor | None = None  # the adapter's per-item input projections, built on first use
        self._edit_rows_built: EditRows | None = None  # a few rows' codes and edits in NumPy, built on first use
        #: The bundle it was loaded from (``None`` when built in memory): another process can load it from there.
        self.path: Path | None = None

    @classmethod
    def load(cls, path: Path) -> OnlineModel:
        online = cls(load_trained(path))
        online.path = path
        return online

    # ------------------------------------------------------------------ inputs
    @property
    def n_items(self) -> int:
        return self.vocab.size

    def index_of(self, item_id: str) -> int:
        """Vocabulary index of an item id; ``UNK`` (1) when the model does not know it."""
        return self._index.get(item_id, UNK)

    def indices_of(self, item_ids: Sequence[str]) -> list[int]:
        """:meth:`index_of` of every item id, in order (one C-level pass: this runs per session and request)."""
        return list(map(self._index.__getitem__, item_ids))

    def describe(self, item_ids: Sequence[str], fields: Sequence[str] = ()) -> list[dict[str, Any]]:
        """``title`` plus ``fields`` of each item (see :meth:`ItemMetadata.describe`); ``{"title": None}`` each when
        the bundle has no item attributes. Callers check ``fields`` against ``items.fields`` first."""
        if self.items is None:
            return [{"title": None} for _ in item_ids]
        describe = self.items.describe
        return [describe(i, fields) for i in self.indices_of(item_ids)]

    @property
    def item_codes(self) -> Mapping[str, int]:
        """Item id → vocabulary index, ``UNK`` for an id the model does not know (read-only by contract)."""
        return self._index

    def known(self, item_id: str) -> bool:
        return item_id in self._index

    def histories(self, recent: Sequence[Sequence[str]], before: Sequence[int] | None = None) -> Tensor:
        """Left-padded history [B, T] of each session's item ids (most recent last; unknown → UNK): the encoder's
        window (:func:`recsys.windows.window_length`) of a history of ``before[b] + len(recent[b])`` items, where
        ``before`` counts the session's items older than ``recent`` (default none)."""
        t = self.cfg.max_len
        out = torch.zeros(len(recent), t, dtype=torch.long)
        for row, items in enumerate(recent):
            n = len(items)
            c = min(window_length(n + (before[row] if before is not None else 0), t, self.cfg.stride), n)
            idx = self.indices_of(list(items)[n - c :])
            if idx:
                out[row, t - len(idx) :] = torch.tensor(idx, dtype=torch.long)
        return out

    # ------------------------------------------------------------------ edits
    @torch.inference_mode()
    def codes(self, histories: Tensor) -> Tensor:
        """Edit codes [B, L, d] of the sessions (histories [B, T], or just their last ``adapter_window`` items)."""
        if self._item_inputs is None:
            self._item_inputs = self.model.adapter.item_inputs(self.model.device_model.items.weight)
        if 0 < histories.shape[0] <= SMALL_BATCH:  # a single request: NumPy, without torch's per-call overhead
            return torch.from_numpy(self._edit_rows().codes(histories.numpy()))
        return self.model.adapter.codes_from_inputs(self.model.recent(histories), self._item_inputs)

    def _edit_rows(self) -> EditRows:
        if self._edit_rows_built is None:
            self._edit_rows_built = EditRows(self.model, self._item_inputs)
        return self._edit_rows_built

    def _bank(self, bank: BankState | None) -> BankState:
        return bank or self.initial_bank

    @torch.inference_mode()
    def assign(self, codes: Tensor, bank: BankState | None = None) -> Tensor:
        """Nearest prototype [B] of each code."""
        centres = self._bank(bank).centres
        return torch.cdist(codes.flatten(1), centres.flatten(1)).argmin(1)

    def _bank_edits(self, b: BankState) -> tuple[Tensor, Tensor]:
        key = b.centres._version
        bank_edits = b._edits.get(key)
        if bank_edits is None:
            bank_edits = self.model.prototype_edits(b.centres)
            b._edits.clear()
            b._edits[key] = bank_edits
        return bank_edits

    @torch.inference_mode()
    def edit(
        self,
        codes: Tensor,
        bank: BankState | None = None,
        prototypes: Tensor | None = None,
        histories: Windows | None = None,
    ) -> Edit:
        """Prototype edit + clipped residual for codes [B, L, d] (prototypes assigned if not given), as served: zero
        for a session whose prototype has its edit switched off (:mod:`recsys.switch`). With the sessions' encoder
        windows ``histories`` [B, T] (those the codes came from, or a callable that builds them, called only when the
        model has history groups) it carries their history groups (``Edit.groups``, :meth:`history_groups`), which the
        scores' group bias reads; without them it has none."""
        b = self._bank(bank)
        proto = self.assign(codes, b) if prototypes is None else prototypes
        if 0 < codes.shape[0] <= SMALL_BATCH:  # a single request: in NumPy (EditRows)
            w, bias = self._edit_rows().edit(codes.numpy(), b.centres.numpy(), proto.numpy(), self._bank_edits(b))
            edit = Edit(torch.from_numpy(w), torch.from_numpy(bias), proto, codes)
        else:
            edit = self.model.prototype_edit(codes, b.centres, proto, self._bank_edits(b))
        groups = self._groups_of(histories)
        if groups is not None:
            edit = edit._replace(groups=groups)
        edit_on, _group_on = terms_on(b.switches, proto)
        if bool(edit_on.all()):
            return edit
        keep = edit_on.to(edit.weight.dtype)
        return edit._replace(weight=edit.weight * keep[:, None, None, None], bias=edit.bias * keep[:, None, None])

    @torch.inference_mode()
    def edited_head(self, bank: BankState | None = None) -> EditedHead:
        """The factored edited head of a bank snapshot (:mod:`recsys.edited_head`), built once per snapshot."""
        b = self._bank(bank)
        key = b.centres._version
        head = b._heads.get(key)
        if head is None:
            head = EditedHead.build(self.model, b.centres, self._bank_edits(b), self._generators())
            b._heads.clear()
            b._heads[key] = head
        return head

    @torch.inference_mode()
    def edited_queries(
        self,
        states: Tensor,
        codes: Tensor,
        prototypes: Tensor,
        bank: BankState | None = None,
        first: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The Persona-edited head's outputs [B, D] and edit-norm ratios [B] for user states [B, D], codes
        [B, L, d] and prototypes [B]: ``queries(states, edit(codes, bank, prototypes))`` without materialising the
        edits (see :mod:`recsys.edited_head`), whatever the switches (the prequential check measures the edit's
        gain; :meth:`served_terms` applies them). ``first``: the states' :meth:`first_products`, if computed."""
        b = self._bank(bank)
        return self.edited_head(b).queries(states, codes, prototypes, b.centres, first)

    @torch.inference_mode()
    def history_groups(self, histories: Tensor) -> Tensor | None:
        """The history group [B] of each session's encoder window [B, T] (-1: empty window;
        :meth:`recsys.model.PersonaModel.history_groups`); ``None`` when the model has none."""
        return self._groups_of(histories)

    def _groups_of(self, histories: Windows | None) -> Tensor | None:
        """:meth:`history_groups` of windows that may be a callable building them, called only when it is needed."""
        if histories is None or self._history is None:
            return None
        windows = histories() if callable(histories) else histories
        if windows.shape[0] <= SMALL_BATCH:  # a single request: in NumPy (HistoryRows)
            return self._history.groups(windows.numpy())
        return self.model.history_groups(windows)

    @torch.inference_mode()
    def served_terms(
        self,
        states: Tensor,
        codes: Tensor,
        prototypes: Tensor,
        bank: BankState | None = None,
        histories: Windows | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """What a ranking request scores with, under the switches (:mod:`recsys.switch`): head outputs [B, D], edited
        where the session's prototype applies its edit and plain where not, and the group bias [B, N] where it
        applies its group terms (``None``: no row gets any). As :meth:`edited_queries` and :meth:`group_bias` with
        their switches on, reading the switches once and skipping the work of a term no row applies: the sessions'
        encoder windows ``histories`` [B, T] (or a callable that builds them), which only the history groups read,
        are built only when a row applies its group terms and the model has history groups."""
        b = self._bank(bank)
        edit_on, group_on = terms_on(b.switches, prototypes)
        if not bool(edit_on.any()):
            queries = self.queries(states)
        else:
            queries = self.edited_head(b).queries(states, codes, prototypes, b.centres)[0]
            if not bool(edit_on.all()):
                queries = torch.where(edit_on[:, None], queries, self.queries(states))
        if not bool(group_on.any()):
            return queries, None
        bias = self.group_bias(prototypes, codes, b, switched=False, groups=self._groups_of(histories))
        return queries, None if bias is None else _rows_on(bias, group_on)

    def first_products(self, states: Tensor) -> Tensor:
        """The bank-independent first products of the factored edited head for user states [B, D]
        (:meth:`recsys.edited_head.GeneratorTerms.first_products`)."""
        return self._generators().first_products(states)

    def _generators(self) -> GeneratorTerms:
        if self._generator_terms is None:
            self._generator_terms = GeneratorTerms.build(self.model)
        return self._generator_terms

    @torch.inference_mode()
    def group_bias(
        self,
        prototypes: Tensor,
        codes: Tensor | None,
        bank: BankState | None = None,
        *,
        switched: bool = True,
        groups: Tensor | None = None,
    ) -> Tensor | None:
        """The group bias [B, N] that prototype-mode scores add for sessions assigned to ``prototypes`` [B] (-1 = none)
        under ``bank``'s next-item counts (:func:`recsys.model.group_bias`), plus the fine groups' bias of their edit
        ``codes`` [B, L, d] (:func:`recsys.model.fine_group_bias`; every caller with prototypes has the codes they
        came from), plus the history groups' bias of their history ``groups`` [B] (:meth:`history_groups`;
        :func:`recsys.model.history_group_bias`); ``None`` when the model has none of them. Zero for a row whose
        prototype has its group terms switched off (:mod:`recsys.switch`), unless ``switched`` is false."""
        b = self._bank(bank)
        counts = b.next_items
        if codes is not None and 0 < codes.shape[0] <= SMALL_BATCH:  # a single request: in NumPy (GroupRows)
            bias = self._group_rows()(counts, prototypes, codes, groups)
        else:
            bias = None if counts is None else group_bias(counts, prototypes, self.cfg)
            if codes is not None:
                fine = self.model.bank
                bias = add_bias(bias, fine_group_bias(codes, prototypes, fine.fine_centres, fine.fine_items, self.cfg))
            if groups is not None and self._history is not None:
                bias = add_bias(bias, self._history.bias(groups, prototypes))
        if bias is None or not switched:
            return bias
        return _rows_on(bias, terms_on(b.switches, prototypes)[1])

    def _group_rows(self) -> GroupRows:
        if self._group_rows_built is None:  # the fine and the history groups are fixed: built once
            fine = fine_rows_of(self.model.bank, self.cfg)
            self._group_rows_built = GroupRows(self.cfg, fine, self._history)
        return self._group_rows_built

    @torch.inference_mode()
    def distances(self, codes: Tensor, prototypes: Tensor, bank: BankState | None = None) -> Tensor:
        """Distance of each code to its prototype's centre [B] (the OOD signal before scaling)."""
        return (codes - self._bank(bank).centres[prototypes]).flatten(1).norm(dim=1)

    # ------------------------------------------------------------------ scores
    @torch.inference_mode()
    def user_states(self, histories: Tensor, pool: Executor | None = None) -> Tensor:
        """The device encoder's output h [B, D] for histories [B, T]: the costly, edit-independent part.

        A session's h depends on its history alone, so the consumer stores it with the session and the API
        scores from it. Rows are encoded shortest first in chunks of :data:`ENCODE_CHUNK` (activations stay in
        cache), each chunk cut to its longest history: positions are right-aligned and padding is masked out
        of attention, so the leading all-padding columns change nothing but cost a quadratic share of the work.
        With a ``pool`` the chunks run on its threads side by side (see :meth:`submit_user_states`).
        """
        if pool is not None:
            return self.submit_user_states(histories, pool).result()
        out = torch.empty(histories.shape[0], self.cfg.dim)
        for chunk in self._encode_chunks(histories, out):
            chunk()
        return out

    def submit_user_states(self, histories: Tensor, pool: Executor) -> Future[Tensor]:
        """:meth:`user_states` with its chunks submitted to ``pool`` (longest first); the future completes with
        the states [B, D] once every chunk has. Rows are independent, so the result is the same; torch releases
        the GIL inside each op, so the chunks really run side by side and the caller can go on meanwhile."""
        out = torch.empty(histories.shape[0], self.cfg.dim)
        chunks = self._encode_chunks(histories, out)
        done: Future[Tensor] = Future()
        left = [len(chunks)]
        lock = threading.Lock()

        def finished(chunk: Future[None]) -> None:
            error = chunk.exception()
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if done.done():
                return
            if error is not None:
                done.set_exception(error)
            elif last:
                done.set_result(out)

        for chunk in reversed(chunks):
            pool.submit(chunk).add_done_callback(finished)
        return done

    def _encode_chunks(self, histories: Tensor, out: Tensor) -> list[Callable[[], None]]:
        """Closures that each encode one chunk of rows into ``out`` (shortest rows first)."""
        dm = self.model.device_model
        lengths = (histories != PAD).sum(1)
        order = torch.argsort(lengths, stable=True)

        def chunk(start: int) -> Callable[[], None]:
            @torch.inference_mode()  # thread-local: a pool thread needs its own
            def encode() -> None:
                rows = order[start : start + ENCODE_CHUNK]
                out[rows] = dm.encode(histories[rows, -max(int(lengths[rows[-1]]), 1) :])

            return encode

        return [chunk(start) for start in range(0, histories.shape[0], ENCODE_CHUNK)]

    @torch.inference_mode()
    def queries(self, states: Tensor, edit: Edit | None = None) -> Tensor:
        """The (edited) head's output [B, D] for user states [B, D]: an item's score is its dot product."""
        return self.model.device_model.head(states, edit)

    @property
    def has_group_terms(self) -> bool:
        """Whether prototype-mode scores add group terms (the prototypes' group bias, the fine and history groups')."""
        cfg, bank = self.cfg, self.model.bank
        fine = cfg.fine_bias_weight > 0 and bank.fine_centres.shape[0] > 0
        return cfg.group_bias_weight > 0 or fine or bank.has_history_groups()

    @property
    def has_repeat_part(self) -> bool:
        """Whether the device model mixes repeating the session's items with exploring (:mod:`recsys.repeats`)."""
        return self._repeat_rows is not None  # an attribute, not the module's: asked once per touched session

    def repeat_entries(self, counts: Sequence[RepeatCounts[str] | None]) -> Tensor | None:
        """The model's input [B, R, W] (:func:`recsys.repeats.encode_entries`) of each session's whole-history item
        counts (``None``: a session without counts); ``None`` when the model has no repeat part. Items it does not
        know are left out."""
        if not self.has_repeat_part:
            return None
        size = self.cfg.repeat_size
        rows = [np.zeros((size, ENTRY_WIDTH), dtype=np.float32) if c is None else self.encode_counts(c) for c in counts]
        return entries_tensor(rows) if rows else torch.zeros(0, size, ENTRY_WIDTH)

    def session_counts(self, stored: dict[str, Any] | None, recent_items: Sequence[str] = ()) -> RepeatCounts[str]:
        """A session's item counts: as ``stored`` (:meth:`RepeatCounts.to_json`), or, when it has none (a stateless
        request, a session stored before it kept counts), started from its known ``recent_items``."""
        size = self.cfg.repeat_size if self.has_repeat_part else REPEAT_SIZE
        if stored is not None:
            return RepeatCounts.from_json(stored, size)
        return RepeatCounts.of([i for i in recent_items if i in self._index], size)

    @property
    def repeat_rows(self) -> RepeatRows:
        """The repeat part with frozen weights (:class:`recsys.repeat_rows.RepeatRows`)."""
        assert self._repeat_rows is not None, "the model has no repeat part"
        return self._repeat_rows

    def prepared_snapshots(self, snapshots: CountsSnapshots[str]) -> PreparedRows:
        """Many sessions' counts as the repeat part's input, prepared for scoring twice (the consumer's checks of
        the edited and the base model): everything that reads the entries alone, computed once, in NumPy, on the
        real entries (:meth:`recsys.repeat_rows.RepeatRows.prepare`)."""
        return self.repeat_rows.prepare(snapshots, self.cfg.repeat_size)

    def encode_counts(self, counts: RepeatCounts[str]) -> np.ndarray:
        """One session's counts as the repeat part's input [R, W] float32 (:func:`recsys.repeats.encode_entries`);
        unknown items left out."""
        return counts.encode(self._index.__getitem__, self.cfg.repeat_size)

    @torch.inference_mode()
    def scores_from_states(
        self, states: Tensor, edit: Edit | None = None, bank: BankState | None = None, repeats: Tensor | None = None
    ) -> Tensor:
        """Scores [B, N] from user states [B, D] (edited head, then every item, plus a prototype-mode edit's group
        bias under ``bank`` and the repeat part's bias from ``repeats`` [B, R, W]); PAD/UNK never rank."""
        bias = None if edit is None else self.group_bias(edit.prototype, edit.codes, bank, groups=edit.groups)
        return self.scores_from_queries(self.queries(states, edit), bias, repeats)

    @torch.inference_mode()
    def scores_from_queries(
        self, queries: Tensor, bias: Tensor | None = None, repeats: Tensor | PreparedRows | None = None
    ) -> Tensor:
        """Scores [B, N] of head outputs [B, D] against every item, plus ``bias`` [B, N] (the group bias of
        :meth:`group_bias`) when given, plus the repeat part's bias at each session's items (``repeats`` [B, R, W],
        :meth:`repeat_entries`, or many sessions' counts as :meth:`prepared_snapshots` gives them); PAD/UNK never
        rank."""
        s = queries @ self.item_targets_t
        if isinstance(repeats, PreparedRows):
            rep: tuple[Tensor, Tensor] | None = self.repeat_rows.score(queries, repeats, s)
        elif repeats is not None and self.has_repeat_part and queries.shape[0] <= SMALL_BATCH:
            rep = self.repeat_rows(queries, repeats, s)
        else:
            rep = self.model.device_model.repeat_bias(queries, self.item_targets_t.T, repeats, s)
        if rep is not None:
            s.scatter_add_(1, *rep)
        if bias is not None:
            s += bias
        s[:, PAD] = float("-inf")
        s[:, UNK] = float("-inf")
        return s

    @property
    def index(self) -> NormOrderedIndex | None:
        """For catalogues of :data:`INDEXED_FROM` items and more: an exact top-k index that scores only the
        items that can still make the top-k (see :mod:`recsys.retrieval`); built on first use, once."""
        if self.n_items < INDEXED_FROM:
            return None
        if self._index_built is None:
            with self._index_lock:
                if self._index_built is None:
                    self._index_built = NormOrderedIndex(self.item_targets_t.T, excluded=(PAD, UNK))
        return self._index_built

    @torch.inference_mode()
    def scores(
        self, histories: Tensor, edit: Edit | None = None, bank: BankState | None = None, repeats: Tensor | None = None
    ) -> Tensor:
        """Scores [B, N] of the base (``edit=None``) or edited device model, with the group bias of a prototype-mode
        edit's prototypes under ``bank`` (the bundle's by default) and the repeat part's bias from ``repeats``
        (:meth:`repeat_entries`) and the history groups' bias of the edit's groups (:meth:`edit`'s ``histories``);
        PAD/UNK never rank."""
        return self.scores_from_states(self.user_states(histories), edit, bank, repeats)

    @torch.inference_mode()
    def rank(
        self,
        histories: Tensor,
        edit: Edit | None = None,
        *,
        k: int = 10,
        exclude_seen: bool = False,
        candidates: Sequence[Sequence[int]] | None = None,
        bank: BankState | None = None,
        repeats: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Top-k item indices and scores, each [B, k'] (k' = min(k, rankable items)).

        ``exclude_seen`` drops the items in each history; ``candidates`` restricts each row to those indices.
        """
        s = self.scores(histories, edit, bank, repeats)
        if exclude_seen:
            s.scatter_(1, histories, float("-inf"))
            s[:, PAD] = float("-inf")
        if candidates is not None:
            allowed = torch.full_like(s, float("-inf"))
            for row, cand in enumerate(candidates):
                idx = torch.tensor([c for c in cand if c > UNK], dtype=torch.long)
                if len(idx):
                    allowed[row, idx] = 0.0
            s = s + allowed
        kk = min(k, s.shape[1] - 2)
        top = torch.topk(s, kk, dim=1)
        return top.indices, top.values

    @torch.inference_mode()
    def target_ranks(
        self,
        histories: Tensor,
        targets: Tensor,
        edit: Edit | None = None,
        bank: BankState | None = None,
        repeats: Tensor | None = None,
    ) -> Tensor:
        """0-based full-catalogue rank [B] of each target (the prequential hit check)."""
        return target_ranks(self.scores(histories, edit, bank, repeats), targets)

    def decode(self, indices: Tensor | np.ndarray | Sequence[int]) -> list[str]:
        return self.vocab.decode(np.asarray(indices, dtype=np.int64))


def _rows_on(bias: Tensor, on: Tensor) -> Tensor:
    """``bias`` [B, N] with the rows whose switch ``on`` [B] is off zeroed (``bias`` itself when all are on)."""
    return bias if bool(on.all()) else bias * on[:, None].to(bias.dtype)


def _float32_bytes(values: Tensor) -> bytes:
    return values.detach().to(torch.float32).contiguous().numpy().tobytes()


def _float32_tensor(raw: bytes, size: int, what: str) -> Tensor:
    arr = np.frombuffer(raw, dtype=np.float32)
    if arr.size != size:
        raise ValueError(f"stored {what} has {arr.size} floats, model expects {size}")
    return torch.from_numpy(arr.copy())


def state_to_bytes(state: Tensor) -> bytes:
    """One session's user state h [D] as float32 bytes for the store (D·4 bytes)."""
    return _float32_bytes(state)


def state_from_bytes(raw: bytes, cfg: ModelConfig) -> Tensor:
    """Inverse of :func:`state_to_bytes`; raises ``ValueError`` when the size does not fit the model."""
    return _float32_tensor(raw, cfg.dim, "user state")


def code_to_bytes(code: Tensor) -> bytes:
    """One session's code [L, d] as float32 bytes for the store (rows stay small: L·d·4 bytes)."""
    return _float32_bytes(code)


def code_from_bytes(raw: bytes, cfg: ModelConfig) -> Tensor:
    """Inverse of :func:`code_to_bytes`; raises ``ValueError`` when the size does not fit the model."""
    return _float32_tensor(raw, cfg.n_edit_layers * cfg.code_dim, "code").view(cfg.n_edit_layers, cfg.code_dim)


def refine_bank(
    bank: BankState,
    codes: Tensor,
    prototypes: Tensor,
    cfg: ModelConfig,
    chosen: tuple[Tensor, Tensor] | None = None,
    gains: tuple[Tensor, Tensor] | None = None,
) -> BankState:
    """Streaming k-means over codes [B, L, d] in order: ``μ_k ← μ_k + η_k (c − μ_k)`` (METHOD.md §3), the
    group counts of ``chosen`` = (prototypes [P], items [P]): what sessions assigned to those prototypes chose next,
    counted in order after they were scored (:func:`recsys.model.count_next_items`, METHOD.md §3b), and the same
    predictions' ``gains`` = (the edit's [P], the group terms' [P]) added to their prototypes' switches
    (:func:`recsys.switch.update_switches`).

    Returns a new state (version + 1); the input is left untouched so readers never see half an update.
    """
    centres, counts = bank.centres.clone(), bank.counts.clone()
    refine_centres(centres, counts, codes, prototypes, cfg)
    next_items = bank.next_items
    if next_items is not None and chosen is not None and len(chosen[0]):
        next_items = next_items.clone()
        count_next_items(next_items, chosen[0], chosen[1], cfg.group_bias_decay)
    switches = None if bank.switches is None else bank.switches.clone()  # K × 3: re-seeding resets rows in place
    if switches is not None and chosen is not None and gains is not None and len(chosen[0]):
        update_switches(switches, chosen[0], *gains)
    return BankState(centres, counts, bank.version + 1, next_items, switches)


def next_items_to_bytes(counts: Tensor) -> bytes:
    """One prototype's next-item counts [N] as float32 bytes for the store (N·4 bytes)."""
    return _float32_bytes(counts)


def stored_next_items(stored: Sequence[bytes | None], initial: Tensor | None, cfg: ModelConfig) -> Tensor | None:
    """The bank's next-item counts [K, N] from the stored rows' bytes (in prototype order): a row stored before the
    counts were (``None``) keeps the bundle's ``initial`` row. ``None`` when the model has no group bias. Raises
    ``ValueError`` when a stored row does not fit the model."""
    if initial is None:
        return None
    return overlay_stored(initial, stored, lambda raw: _float32_tensor(raw, cfg.n_items, "next-item counts"))
