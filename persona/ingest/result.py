"""What one batch did, in plain values: the prequential counters and per-event figures the callers turn into
their own metrics, and how a batch's model outcome is collected into them (:func:`conclude`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from persona.events import Event, Rejection
from persona.ingest.model_work import Outcome
from persona.ingest.plan import Plan
from persona.store import SessionState
from persona.user_state import pack_user_states
from recsys.index_rows import index_of
from recsys.online import OnlineModel

#: Cut-offs of the prequential hit-rate and NDCG counters.
KS: tuple[int, ...] = (10, 20)
#: The two rankers compared live: the edited model and the unedited base model.
VARIANTS: tuple[str, ...] = ("persona", "base")


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
    #: (the edit's [P], the group terms' [P]): each scored prediction's gains for its prototype's switches
    #: (:mod:`recsys.switch`), counted with ``chosen``
    gains: tuple[torch.Tensor, torch.Tensor] | None = None
    #: prototypes applying the edit and the group terms under the bank as committed (``None``: no bank written)
    terms_on: tuple[int, int] | None = None


def conclude(online: OnlineModel, plan: Plan, outcome: Outcome | None, result: IngestResult) -> Tensor | None:
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
        count_ranks(result, "persona", outcome.persona)
        count_ranks(result, "base", outcome.base)
        result.edit_norm_ratios = outcome.ratios.tolist()
        # what each prediction's prototype chose next: its group counts it once the batch commits
        result.chosen = (outcome.pred_protos, index_of([t for _r, t in plan.pre_rows]))
        result.gains = (outcome.edit_gains, outcome.group_gains)
    q99 = max(online.drift.distance_quantiles.get("q99", 1.0), 1e-9)
    result.prototypes = outcome.protos.tolist()
    result.ood_scores = (outcome.dists / q99).tolist()
    code_np = outcome.codes.to(torch.float32).contiguous().numpy()
    latest = [w for w in plan.sessions.values() if w.row >= 0]
    packed = pack_user_states(outcome.states[index_of([w.row for w in latest])], [w.state.edit_version for w in latest])
    for w, user_state in zip(latest, packed, strict=True):
        w.state.code = code_np[w.row].tobytes()
        w.state.user_state = user_state
        w.state.prototype_id = result.prototypes[w.row]
    return outcome.codes


def count_ranks(result: IngestResult, variant: str, ranks: torch.Tensor) -> None:
    """Add one variant's prequential counters for 0-based ranks [P]."""
    r = ranks.to(torch.float64)
    result.predictions[variant] += int(r.numel())
    result.reciprocal_rank[variant] += float((1.0 / (r + 1.0)).sum())
    gain = 1.0 / torch.log2(r + 2.0)
    for k in KS:
        hit = r < k
        result.hits[(variant, k)] += int(hit.sum())
        result.ndcg[(variant, k)] += float(gain[hit].sum())


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
