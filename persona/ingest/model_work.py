"""A batch's model work as plain values: the part of :mod:`persona.ingest` that is nothing but tensor arithmetic.

The ingestor describes a batch's model work as a :class:`ModelJob` (padded adapter inputs, encoder-cache requests,
the stored states that predict events, the predictions' targets) and gets an :class:`Outcome` back. The same
functions run on the ingestor's compute threads or, for the consumer, in a process of its own
(:mod:`persona.ingest.model_worker`), so the two places cannot drift apart; everything here is picklable for that.

The work comes in two halves. :func:`start_job` needs only the batch: the encoder's user states of every post-event
history, the adapter's codes, and the bank-independent half of the prequential check (:class:`Early`). Once the
commit has read the prototype bank, :func:`outcome` assigns the new codes to prototypes and scores every
prediction under the Persona edit and the base model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from recsys.encoder_cache import EncoderCache, WindowRequest
from recsys.index_rows import index_of
from recsys.metrics import target_ranks
from recsys.model import SASRecEncoder
from recsys.online import BankState, OnlineModel
from recsys.repeat_rows import PreparedRows
from recsys.switch import TermRanks, terms_on
from recsys.vocab import ItemVocab

__all__ = [
    "Early",
    "EarlyInput",
    "ModelJob",
    "Outcome",
    "Started",
    "cached_states",
    "early_work",
    "encoder_cache_for",
    "outcome",
    "start_job",
    "uses_encoder_cache",
    "warm_up",
]

#: Scores per chunk of the prequential ranks (rows × catalogue): 4M floats (16 MB) bound the temporary [rows, N]
#: score matrices, so a 1M-item catalogue is ranked a few rows at a time and MovieLens in one go.
_SCORE_BUDGET = 1 << 22


@dataclass
class EarlyInput:
    """The predictions whose previous state was read from the store (not one a pending batch will write):
    ``which`` indexes ``ModelJob.pre_rows``; their user states [E, D] and target items [E]."""

    which: list[int]
    states: Tensor
    targets: Tensor
    repeats: PreparedRows | None = None  # their sessions' item counts before the event (the repeat part)


@dataclass
class ModelJob:
    """Everything a batch's model work reads.

    ``recent`` [B, W]: each post-event history's last ``adapter_window`` items (the adapter's input). The encoder
    reads either ``requests`` through an encoder cache (``order``: the post-event row of each state they give,
    in order) or ``histories`` [B, T], whole windows. ``pre_rows``: per prediction, the row of its previous state
    (>= 0: a post-event row of this batch; < 0: a stored state) and its target item. ``repeats``: per prediction,
    its session's item counts before the event, prepared for scoring (:meth:`OnlineModel.prepared_snapshots`;
    ``None`` when the model has no repeat part). ``history_groups``: per prediction, the history group of its
    previous window (:meth:`OnlineModel.history_groups`; ``None`` when the model has none).
    """

    version: str
    recent: Tensor
    pre_rows: list[tuple[int, int]]
    early: EarlyInput
    requests: list[WindowRequest] | None = None
    order: list[int] | None = None
    histories: Tensor | None = None
    repeats: PreparedRows | None = None
    history_groups: Tensor | None = None

    @property
    def rows(self) -> int:
        return int(self.recent.shape[0])


@dataclass
class Early:
    """The bank-independent half of the prequential check of :attr:`EarlyInput.which`: their base model ranks [E]
    and the first products of the edited head (:meth:`OnlineModel.first_products`)."""

    which: list[int]
    base: Tensor
    first: Tensor
    scores: Tensor | None = None  # their plain scores [E, N] without the group terms, kept for the check


@dataclass
class Started:
    """What :func:`start_job` gives: user states [B, D], codes [B, L, d] and the early half of the check."""

    states: Tensor
    codes: Tensor
    early: Early

    def forward(self) -> tuple[Tensor, Tensor]:
        """Codes and user states, as :func:`outcome` asks for them."""
        return self.codes, self.states


@dataclass
class Outcome:
    """Everything a batch's model work gives: codes [B, L, d], user states [B, D], prototypes [B] and their
    distances [B] of the applied events, and per prediction the edit-norm ratio, both variants' ranks (Persona as
    served, under its prototype's switches), the prototype it was scored under (whose group counts its item once the
    batch commits) and the edit's and the group terms' gains for that prototype's switches (:mod:`recsys.switch`),
    [P] each."""

    codes: Tensor
    states: Tensor
    protos: Tensor
    dists: Tensor
    ratios: Tensor
    persona: Tensor
    base: Tensor
    pred_protos: Tensor
    edit_gains: Tensor
    group_gains: Tensor


def uses_encoder_cache(online: OnlineModel, session_cache: int) -> bool:
    """Whether a batch's user states go through an encoder cache: SASRec models whose windows have a stride."""
    return session_cache > 0 and isinstance(online.model.device_model.encoder, SASRecEncoder) and online.cfg.stride > 0


def encoder_cache_for(online: OnlineModel, session_cache: int) -> EncoderCache | None:
    """A new encoder cache of ``session_cache`` sessions for this model; ``None`` where it does not apply (turned
    off, GRU4Rec, a sliding window)."""
    return EncoderCache(online.model.device_model, session_cache) if uses_encoder_cache(online, session_cache) else None


@torch.inference_mode()
def early_work(online: OnlineModel, early: EarlyInput) -> Early:
    """See :class:`Early`; :func:`outcome` does the rest of the prequential check."""
    if not early.which:
        return Early([], torch.empty(0, dtype=torch.long), torch.empty(0))
    queries, first = online.queries(early.states), online.first_products(early.states)
    if online.has_group_terms and len(early.which) * online.n_items <= _SCORE_BUDGET:
        # the check ranks the plain model with the group terms too: keep its scores (one chunk, as ranks scores
        # them) so that the bank-dependent half adds the terms instead of scoring the catalogue again
        scores = online.scores_from_queries(queries, None, early.repeats)
        return Early(early.which, target_ranks(scores, early.targets), first, scores)
    return Early(early.which, ranks(online, queries, early.targets, repeats=early.repeats)[0], first)


def cached_states(cache: EncoderCache, requests: list[WindowRequest], order: list[int], rows: int) -> Tensor:
    """User states [rows, D] of a batch's post-event rows through the encoder cache."""
    states = torch.empty(rows, cache.dim)
    states[index_of(order)] = cache.encode(requests)
    return states


def user_states(online: OnlineModel, cache: EncoderCache | None, job: ModelJob) -> Tensor:
    """The job's user states [B, D], on this thread: through ``cache`` when the job has requests for one."""
    if job.requests is not None:
        assert cache is not None and job.order is not None
        return cached_states(cache, job.requests, job.order, job.rows)
    assert job.histories is not None
    return online.user_states(job.histories)


def start_job(online: OnlineModel, cache: EncoderCache | None, job: ModelJob) -> Started:
    """The bank-independent half of a job, on this thread."""
    return Started(user_states(online, cache, job), online.codes(job.recent), early_work(online, job.early))


@torch.inference_mode()
def outcome(
    online: OnlineModel,
    bank: BankState,
    pre_rows: list[tuple[int, int]],
    early_half: Early,
    forward: Callable[[], tuple[Tensor, Tensor]],
    prev_codes: Tensor,
    prev_protos: Tensor,
    prev_states: Tensor,
    repeats: PreparedRows | None = None,
    history_groups: Tensor | None = None,
) -> Outcome:
    """A job's outcome under ``bank``: prototypes of the new codes, and the prequential check of every prediction,
    from a stored previous state (``prev_*``, indexed by ``-row - 2``) or from this batch's forward (a session's
    second event or later). ``forward()`` gives the batch's codes and user states; it is called once the stored
    states are scored, so on compute threads that scoring overlaps the forward still running. ``repeats``: the
    predictions' item counts before their events (:attr:`ModelJob.repeats`); ``history_groups``: their previous
    windows' history groups (:attr:`ModelJob.history_groups`)."""
    checks = _Checks.start(len(pre_rows), early_half, repeats, history_groups)
    early = [n for n, (r, _i) in enumerate(pre_rows) if r < -1]
    if early:
        sel = index_of([-pre_rows[n][0] - 2 for n in early])
        checks.score(online, bank, pre_rows, early, prev_codes[sel], prev_protos[sel], prev_states[sel])
    codes, states = forward()
    protos = online.assign(codes, bank)
    dists = online.distances(codes, protos, bank)
    late = [n for n, (r, _i) in enumerate(pre_rows) if r >= 0]
    if late:
        sel = index_of([pre_rows[n][0] for n in late])
        checks.score(online, bank, pre_rows, late, codes[sel], protos[sel], states[sel])
    return Outcome(
        codes, states, protos, dists, checks.ratios, checks.persona, checks.base, checks.protos, *checks.gains
    )


@dataclass
class _Checks:
    """The prequential check of a job's predictions, filled in as they are scored: per prediction the edit-norm
    ratio, both variants' ranks and the switches' gains. ``early`` holds what :func:`early_work` computed."""

    ratios: Tensor
    persona: Tensor
    base: Tensor
    protos: Tensor
    gains: tuple[Tensor, Tensor]  # the edit's and the group terms' (TermRanks.gains)
    early: Early
    position: dict[int, int]  # prediction -> its row in early
    repeats: PreparedRows | None = None  # per prediction (OnlineModel.prepared_snapshots)
    history_groups: Tensor | None = None  # per prediction (ModelJob.history_groups)

    @classmethod
    def start(
        cls, n_pred: int, early: Early, repeats: PreparedRows | None = None, history_groups: Tensor | None = None
    ) -> _Checks:
        base = torch.empty(n_pred, dtype=torch.long)
        base[index_of(early.which)] = early.base
        position = {n: j for j, n in enumerate(early.which)}
        persona, protos = torch.empty(n_pred, dtype=torch.long), torch.empty(n_pred, dtype=torch.long)
        gains = torch.empty(n_pred, dtype=torch.float64), torch.empty(n_pred, dtype=torch.float64)
        return cls(torch.empty(n_pred), persona, base, protos, gains, early, position, repeats, history_groups)

    def score(
        self,
        online: OnlineModel,
        bank: BankState,
        pre_rows: list[tuple[int, int]],
        which: list[int],
        codes: Tensor,
        protos: Tensor,
        states: Tensor,
    ) -> None:
        """Score predictions ``which`` from their previous states (codes, prototypes, user states [P, ...]): the
        edited and the plain model, each with and without the group terms (:class:`recsys.switch.TermRanks`), so
        the switches learn every term's gain whichever of them is on; Persona's rank is the one it serves."""
        idx = index_of(which)
        targets = index_of([pre_rows[n][1] for n in which])
        rows = [self.position.get(n, -1) for n in which]
        all_early = bool(rows) and min(rows) >= 0  # every row's plain half done early: the usual case
        first = self.early.first[index_of(rows)] if all_early else None
        reps = None if self.repeats is None else self.repeats[idx]
        edited_q, self.ratios[idx] = online.edited_queries(states, codes, protos, bank, first)
        # the plain model with the group terms, only where the model has them: from the early half's scores when it
        # kept them, else one more scoring of these rows
        plain_q: Tensor | None = None
        plain_scores = self.early.scores[index_of(rows)] if all_early and self.early.scores is not None else None
        if online.has_group_terms and plain_scores is None:
            plain_q = online.queries(states)
        group = (protos, bank, codes, None if self.history_groups is None else self.history_groups[idx])
        edited, edited_grouped, plain_grouped = ranks(online, edited_q, targets, group, reps, plain_q, plain_scores)
        self.protos[idx] = protos
        todo_list = [j for j, r in enumerate(rows) if r < 0]
        if todo_list:
            todo = index_of(todo_list)
            base_reps = None if reps is None else reps[todo]
            self.base[idx[todo]] = ranks(online, online.queries(states[todo]), targets[todo], repeats=base_reps)[0]
        plain = self.base[idx]
        terms = TermRanks(edited_grouped, plain_grouped if online.has_group_terms else plain, edited, plain)
        self.persona[idx] = terms.served(*terms_on(bank.switches, protos))
        self.gains[0][idx], self.gains[1][idx] = terms.gains()


def ranks(
    online: OnlineModel,
    queries: Tensor,
    targets: Tensor,
    group: tuple[Tensor, BankState, Tensor, Tensor | None] | None = None,
    repeats: PreparedRows | None = None,
    plain: Tensor | None = None,
    plain_scores: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Prequential ranks [P] of the targets under head outputs [P, D], scored a chunk of rows at a time: without and
    with the group terms (the same tensor twice without ``group``), and with them under the second head outputs
    ``plain`` [P, D] when given, or the second head's scores ``plain_scores`` [P, N] without the group terms when
    already computed (the third tensor; the second again without either). ``group`` = (prototypes [P], bank,
    codes [P, L, d], history groups [P] or ``None``) gives the prototypes' group bias under that bank, the fine
    groups' bias of the codes and the history groups', computed once per chunk for both, whatever the bank's
    switches (the check measures their gains); ``repeats`` the repeat part's input (the sessions' item counts before
    the event, :meth:`OnlineModel.prepared_snapshots`: prepared once for every check)."""
    alone = torch.empty(len(targets), dtype=torch.long)
    grouped = alone if group is None else torch.empty(len(targets), dtype=torch.long)
    second = plain is not None or plain_scores is not None
    plain_grouped = torch.empty(len(targets), dtype=torch.long) if second else grouped
    step = max(1, _SCORE_BUDGET // max(online.n_items, 1))
    for start in range(0, len(targets), step):
        sl = slice(start, start + step)
        reps = None if repeats is None else repeats[sl]
        scores = online.scores_from_queries(queries[sl], None, reps)
        alone[sl] = target_ranks(scores, targets[sl])
        if group is None:
            continue
        history = None if group[3] is None else group[3][sl]
        bias = online.group_bias(group[0][sl], group[2][sl], group[1], switched=False, groups=history)
        grouped[sl] = alone[sl] if bias is None else target_ranks(scores.add_(bias), targets[sl])
        if plain_scores is not None:  # the same sums in the same order as scores_from_queries with the bias
            plain_grouped[sl] = target_ranks(plain_scores[sl] if bias is None else plain_scores[sl] + bias, targets[sl])
        elif plain is not None:
            plain_grouped[sl] = target_ranks(online.scores_from_queries(plain[sl], bias, reps), targets[sl])
    return alone, grouped, plain_grouped


def warm_up(online: OnlineModel, with_cache: bool, rows: int = 64) -> Outcome:
    """One small synthetic job through every step (its own throwaway encoder cache), so that the first real batch
    does not pay for first calls: the model's lazily built terms, the allocator's first blocks. A new consumer's
    first batches come all at once (measured: ~3× slower per event than later ones without this)."""
    cfg = online.cfg
    gen = torch.Generator().manual_seed(0)
    high = max(online.n_items, ItemVocab.OFFSET + 1)
    windows = [torch.randint(ItemVocab.OFFSET, high, (1 + r % cfg.max_len,), generator=gen) for r in range(rows)]
    recent = torch.zeros(rows, cfg.adapter_window, dtype=torch.long)
    for r, w in enumerate(windows):
        tail = w[-cfg.adapter_window :]
        recent[r, cfg.adapter_window - len(tail) :] = tail
    stored = rows // 2
    targets = [int(w[-1]) for w in windows]
    pre_rows = [(-(j + 2), targets[j]) for j in range(stored)] + [(r, targets[r]) for r in range(rows)]
    early = EarlyInput(list(range(stored)), torch.randn(stored, cfg.dim, generator=gen), torch.tensor(targets[:stored]))
    job = ModelJob(online.version, recent, pre_rows, early)
    cache: EncoderCache | None = None
    if with_cache:
        cache = EncoderCache(online.model.device_model, rows)
        job.requests = [WindowRequest(r, 0, w.tolist(), 1) for r, w in enumerate(windows)]
        job.order = list(range(rows))
    else:
        job.histories = torch.zeros(rows, cfg.max_len, dtype=torch.long)
        for r, w in enumerate(windows):
            job.histories[r, cfg.max_len - len(w) :] = w
    started = start_job(online, cache, job)
    bank = online.initial_bank
    prev_codes = torch.zeros(stored, cfg.n_edit_layers, cfg.code_dim)
    prev_protos = torch.zeros(stored, dtype=torch.long)
    groups = torch.zeros(len(pre_rows), dtype=torch.long) if online.model.bank.has_history_groups() else None
    return outcome(
        online, bank, pre_rows, started.early, started.forward, prev_codes, prev_protos, early.states, None, groups
    )
