"""One evaluation path for every method (RecBole-style), so comparisons are fair by construction.

Every method implements :class:`Method`: ``score`` a batch of histories over the full catalogue, then
optionally ``observe`` the batch (online methods update themselves *after* scoring, like the live stream).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import Tensor

from recsys.baselines import (
    FinetuneChoice,
    FinetuneMethod,
    RecentPopularityMethod,
    SessionRepeatMethod,
)
from recsys.edit_rows import EditRows
from recsys.metrics import RankingMetrics, per_example_ndcg, sample_negatives, sampled_ranks, target_ranks
from recsys.model import Edit, PersonaModel
from recsys.progress import track
from recsys.splits import Examples
from recsys.switch import TermRanks, switched_scores, terms_on, update_switches

METHOD_NAMES = (
    "popularity",
    "recent-popularity",
    "session-repeat",
    "base",
    "base-no-repeat",
    "persona",
    "persona-no-prototypes",
    "persona-static-prototypes",
    "finetune",
)

#: The paired comparisons ``persona evaluate`` reports: label → (method, the method it is divided by).
PAIRED: dict[str, tuple[str, str]] = {
    "persona_vs_base": ("persona", "base"),
    "persona_vs_no_prototypes": ("persona", "persona-no-prototypes"),
    "persona_vs_finetune": ("persona", "finetune"),
    "persona_vs_recent_popularity": ("persona", "recent-popularity"),
    "persona_vs_session_repeat": ("persona", "session-repeat"),
    "persona_vs_base_no_repeat": ("persona", "base-no-repeat"),
}


class Method(Protocol):
    name: str

    def score(self, histories: Tensor) -> Tensor:
        """Scores [B, N] for histories [B, T]."""
        ...

    def observe(self, histories: Tensor, targets: Tensor) -> None:
        """See the batch's true next items after scoring it (online methods learn here)."""
        ...


def score_batch(method: Method, histories: Tensor, repeats: Tensor | None) -> Tensor:
    """``method.score``, with the sessions' whole-history item counts [B, R, W] for a method that reads them
    (``reads_repeats``: the device model's repeat part, session-repeat)."""
    if repeats is not None and getattr(method, "reads_repeats", False):
        out: Tensor = method.score(histories, repeats)  # type: ignore[call-arg]
        return out
    return method.score(histories)


class PopularityMethod:
    """Most-interacted items of the training period, the same list for everyone."""

    name = "popularity"

    def __init__(self, item_counts: np.ndarray) -> None:
        self.counts = torch.as_tensor(item_counts, dtype=torch.float32)

    def score(self, histories: Tensor) -> Tensor:
        return self.counts.unsqueeze(0).expand(histories.shape[0], -1)

    def observe(self, histories: Tensor, targets: Tensor) -> None:
        return None


class BaseMethod:
    """The un-edited device model (``repeats=False``: without its repeat part, the ablation)."""

    def __init__(self, model: PersonaModel, *, repeats: bool = True) -> None:
        self.model = model
        self.reads_repeats = repeats
        self.name = "base" if repeats else "base-no-repeat"

    def score(self, histories: Tensor, repeats: Tensor | None = None) -> Tensor:
        return self.model.score(histories, repeats=repeats)

    def observe(self, histories: Tensor, targets: Tensor) -> None:
        return None


class PersonaMethod:
    """Persona edits: ``mode="session"`` (no prototypes) or ``"prototype"``, optionally refining the bank.

    With ``refine=True`` the method works on its own copy of the prototype bank and, after scoring each batch, moves
    centres toward its session codes, adds its next items to the prototypes' counts (the group bias) and updates the
    prototypes' switches for the edit and the group terms with their gains (:mod:`recsys.switch`), exactly as the
    consumer does online; without it the bank and its switches stay as trained ("static prototypes"). Prototype mode
    serves each session under its prototype's switches.
    """

    reads_repeats = True

    def __init__(
        self,
        model: PersonaModel,
        name: str,
        mode: Literal["session", "prototype"] = "prototype",
        refine: bool = False,
    ) -> None:
        self.name = name
        self.mode: Literal["session", "prototype"] = mode
        self.refine = refine
        self.model = copy.deepcopy(model) if refine else model
        self._codes: Tensor | None = None
        self._edit: Edit | None = None
        self._terms: tuple[Tensor, Tensor, Tensor | None] | None = None

    def score(self, histories: Tensor, repeats: Tensor | None = None) -> Tensor:
        self._codes = self.model.codes(histories)
        self._edit = self.model.edit_for(self._codes, self.mode, histories)
        if self.mode == "session":
            return self.model.score(histories, self._edit, repeats=repeats)
        self._terms = edited, plain, bias = self.model.term_scores(histories, self._edit, repeats=repeats)
        return switched_scores(edited, plain, bias, *terms_on(self.model.bank.switches, self._edit.prototype))

    def observe(self, histories: Tensor, targets: Tensor) -> None:
        if self.refine and self._codes is not None and self._edit is not None:
            # after scoring, like the consumer: the switches learn the terms' gains, centres move toward the codes,
            # and each prototype counts what its members chose next (the group bias, in prototype mode only)
            bank, protos = self.model.bank, self._edit.prototype
            if self._terms is not None:
                update_switches(bank.switches, protos, *TermRanks.of(*self._terms, targets).gains())
            bank.refine(self._codes, protos)
            bank.observe(protos, targets)
        self._terms = None


@torch.no_grad()
def warm_switches(model: PersonaModel, examples: Examples, batch_size: int = 512) -> None:
    """Start the prototypes' switches (:mod:`recsys.switch`) on ``examples`` in time order, under the bank as it is
    (training's last step, on the validation period: a live bank starts the test period with them, as with its
    counts)."""
    for histories, targets, repeats in _batches(examples, batch_size):
        edit = model.session_edit(histories, "prototype")
        ranks = TermRanks.of(*model.term_scores(histories, edit, repeats=repeats), targets)
        update_switches(model.bank.switches, edit.prototype, *ranks.gains())


def _batches(examples: Examples, batch_size: int) -> Iterable[tuple[Tensor, Tensor, Tensor | None]]:
    for start in range(0, len(examples), batch_size):
        stop = start + batch_size
        yield (
            torch.from_numpy(examples.histories[start:stop]),
            torch.from_numpy(examples.targets[start:stop]),
            None if examples.repeats is None else torch.from_numpy(examples.repeats[start:stop]),
        )


@dataclass
class Evaluation:
    """A method's metrics over some examples, and its NDCG@10 on each of them (float64 [M], in example order)
    for paired comparisons (:mod:`recsys.bootstrap`)."""

    metrics: dict[str, float]
    ndcg10: np.ndarray = field(repr=False)


def evaluate_method(method: Method, examples: Examples, **options: Any) -> dict[str, float]:
    """HR/NDCG/MRR of one method over examples in time order: :func:`evaluate_examples`' metrics alone."""
    return evaluate_examples(method, examples, **options).metrics


@torch.inference_mode()
def evaluate_examples(
    method: Method,
    examples: Examples,
    *,
    batch_size: int = 512,
    sampled: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> Evaluation:
    """HR/NDCG/MRR of one method over examples in time order (full-catalogue ranking by default), with its
    NDCG@10 per example.

    ``sampled=99`` ranks the target against 99 random negatives instead (the paper's protocol), with
    random tie-breaking; those numbers are not comparable with full-ranking ones.
    """
    metrics = RankingMetrics()
    per_example: list[np.ndarray] = []
    g = torch.Generator().manual_seed(seed)
    n_batches = (len(examples) + batch_size - 1) // batch_size
    for hist, tgt, reps in track(
        _batches(examples, batch_size), f"evaluating {method.name}", n_batches, enabled=progress
    ):
        scores = score_batch(method, hist, reps)
        if sampled:
            neg = sample_negatives(scores.shape[1], tgt, sampled, g)
            ranks = sampled_ranks(scores, tgt, neg, g)
        else:
            ranks = target_ranks(scores, tgt)
        metrics.update(ranks)
        per_example.append(per_example_ndcg(ranks, 10).numpy())
        method.observe(hist, tgt)
    ndcg10 = np.concatenate(per_example) if per_example else np.zeros(0)
    return Evaluation(metrics.compute(), ndcg10)


def build_methods(
    model: PersonaModel,
    item_counts: np.ndarray,
    *,
    no_prototype_model: PersonaModel | None = None,
    finetune: FinetuneChoice | None = None,
    recent_prior: np.ndarray | None = None,
    recent_window: int = 1000,
    names: Iterable[str] = METHOD_NAMES,
) -> list[Method]:
    """The methods of METHOD.md §5 on one trained model (the ablation may bring its own adapter).

    ``finetune``: the fine-tuning setting (chosen on validation); ``recent_prior``: the stream before the
    evaluated examples, oldest first, where recent-popularity's window starts (empty by default).
    """
    ft = finetune or FinetuneChoice()
    prior = recent_prior if recent_prior is not None else np.zeros(0, dtype=np.int64)
    factories: dict[str, Callable[[], Method]] = {
        "popularity": lambda: PopularityMethod(item_counts),
        "recent-popularity": lambda: RecentPopularityMethod(item_counts, prior, recent_window),
        "session-repeat": lambda: SessionRepeatMethod(item_counts),
        "base": lambda: BaseMethod(model),
        "base-no-repeat": lambda: BaseMethod(model, repeats=False),
        "persona": lambda: PersonaMethod(model, "persona", "prototype", refine=True),
        "persona-no-prototypes": lambda: PersonaMethod(no_prototype_model or model, "persona-no-prototypes", "session"),
        "persona-static-prototypes": lambda: PersonaMethod(model, "persona-static-prototypes", "prototype"),
        "finetune": lambda: FinetuneMethod(model, lr=ft.lr, optimizer=ft.optimizer),
    }
    # without a repeat part, base-no-repeat is base: not evaluated twice
    return [factories[n]() for n in names if n != "base-no-repeat" or model.device_model.repeat is not None]


@dataclass
class Timing:
    """Cost of producing a session's edit, like for like: one session at a time (ms) and batched (sessions/s),
    Persona's edit against per-session fine-tuning (``torch.func``-batched), measured in one run."""

    edit_ms_per_session: float
    finetune_ms_per_session: float
    edit_batch_sessions_per_s: float
    finetune_batch_sessions_per_s: float
    batch_sessions: int

    def as_dict(self) -> dict[str, float]:
        return {
            "edit_ms_per_session": self.edit_ms_per_session,
            "finetune_ms_per_session": self.finetune_ms_per_session,
            "edit_batch_sessions_per_s": self.edit_batch_sessions_per_s,
            "finetune_batch_sessions_per_s": self.finetune_batch_sessions_per_s,
            "batch_sessions": self.batch_sessions,
            # how many times cheaper an edit is than fine-tuning, in each mode
            "finetune_over_edit_single": self.finetune_ms_per_session / max(self.edit_ms_per_session, 1e-9),
            "finetune_over_edit_batch": self.edit_batch_sessions_per_s / max(self.finetune_batch_sessions_per_s, 1e-9),
        }


def _median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.inference_mode()
def measure_cost(
    model: PersonaModel,
    examples: Examples,
    *,
    finetune: FinetuneChoice | None = None,
    batch: int = 256,
    repeats: int = 30,
) -> Timing:
    """Edit generation against per-session fine-tuning (``finetune``'s setting), single and batched, same
    machine, same run, same sessions: the first ``batch`` examples (one of them for the single mode)."""
    choice = finetune or FinetuneChoice()
    ft = FinetuneMethod(model, lr=choice.lr, optimizer=choice.optimizer)
    hist = torch.from_numpy(examples.histories[: max(batch, 1)])
    one = hist[:1]
    few = max(repeats // 3, 3)
    # one session at a time as OnlineModel computes it for a single request (codes and edit in NumPy, the
    # assignment in torch, the bank's own prototype edits once per bank snapshot); batched in torch, as the consumer
    # and serving batch it
    if model.bank.centres.shape[0] > 0:
        rows = EditRows(model)
        with torch.inference_mode():
            centres = model.bank.centres.numpy().copy()
            proto_edits = tuple(t.numpy().copy() for t in model.prototype_edits(model.bank.centres))
        one_np = one.numpy()

        def single_edit() -> tuple[np.ndarray, np.ndarray]:
            codes = rows.codes(one_np)
            with torch.inference_mode():
                protos = model.bank.assign(torch.from_numpy(codes)).numpy()
            return rows.edit(codes, centres, protos, proto_edits)  # type: ignore[arg-type]

        edit_single = _median_seconds(single_edit, repeats)
    else:  # no prototype bank (nothing trained after the base model): the torch path is all there is
        edit_single = _median_seconds(lambda: model.session_edit(one), repeats)
    edit_batched = _median_seconds(lambda: model.session_edit(hist), few)
    ft_single = _median_seconds(lambda: ft.edit(one), few)
    ft_batched = _median_seconds(lambda: ft.edit(hist), few)
    return Timing(edit_single * 1e3, ft_single * 1e3, len(hist) / edit_batched, len(hist) / ft_batched, len(hist))
