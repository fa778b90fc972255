"""One evaluation path for every method (RecBole-style), so comparisons are fair by construction.

Every method implements :class:`Method`: ``score`` a batch of histories over the full catalogue, then
optionally ``observe`` the batch (online methods update themselves *after* scoring, like the live stream).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from recsys.metrics import RankingMetrics, sample_negatives, sampled_ranks, target_ranks
from recsys.model import PAD, UNK, Edit, PersonaModel
from recsys.progress import track
from recsys.splits import Examples

METHOD_NAMES = (
    "popularity",
    "base",
    "persona",
    "persona-no-prototypes",
    "persona-static-prototypes",
    "finetune",
)


class Method(Protocol):
    name: str

    def score(self, histories: Tensor) -> Tensor:
        """Scores [B, N] for histories [B, T]."""
        ...

    def observe(self, histories: Tensor, targets: Tensor) -> None:
        """See the batch's true next items after scoring it (online methods learn here)."""
        ...


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
    """The un-edited device model."""

    name = "base"

    def __init__(self, model: PersonaModel) -> None:
        self.model = model

    def score(self, histories: Tensor) -> Tensor:
        return self.model.score(histories)

    def observe(self, histories: Tensor, targets: Tensor) -> None:
        return None


class PersonaMethod:
    """Persona edits: ``mode="session"`` (no prototypes) or ``"prototype"``, optionally refining the bank.

    With ``refine=True`` the method works on its own copy of the prototype bank and, after scoring each batch, moves
    centres toward its session codes and adds its next items to the prototypes' counts (the group bias), exactly as
    the consumer does online; without it the bank stays as trained ("static prototypes").
    """

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

    def score(self, histories: Tensor) -> Tensor:
        self._codes = self.model.codes(histories)
        self._edit = self.model.edit_for(self._codes, self.mode)
        return self.model.score(histories, self._edit)

    def observe(self, histories: Tensor, targets: Tensor) -> None:
        if self.refine and self._codes is not None and self._edit is not None:
            # after scoring, like the consumer: centres move toward the codes, and each prototype counts what its
            # members chose next (the group bias, in prototype mode only)
            self.model.bank.refine(self._codes, self._edit.prototype)
            self.model.bank.observe(self._edit.prototype, targets)


def finetune_edit(model: PersonaModel, histories: Tensor, *, steps: int = 3, lr: float = 0.1, window: int = 5) -> Edit:
    """Per-session fine-tuning of the editable head by backprop, the baseline Persona replaces.

    Each session [B, T] trains its own copy of the head for ``steps`` gradient steps on its last ``window``
    next-item pairs (full-catalogue cross-entropy); the result is returned as an :class:`Edit`.
    """
    dm = model.device_model
    cfg = model.cfg
    b, t = histories.shape
    with torch.inference_mode(False), torch.enable_grad():
        histories = histories.clone()  # a normal tensor, usable for autograd even under inference_mode
        prefix = torch.stack([F.pad(histories[:, :-j], (j, 0), value=PAD) for j in range(1, window + 1)], 1)
        target = torch.stack([histories[:, -j] for j in range(1, window + 1)], 1).view(b * window)
        prefix = prefix.view(b * window, t)
        usable = (target > UNK) & (prefix[:, -1] != PAD)
        with torch.no_grad():
            states = dm.encode(prefix)
            item_t = dm.item_targets()
        dw = torch.zeros(b, cfg.n_edit_layers, cfg.dim, cfg.dim, requires_grad=True)
        db = torch.zeros(b, cfg.n_edit_layers, cfg.dim, requires_grad=True)
        none = torch.full((b,), -1, dtype=torch.long)
        for _ in range(steps):
            edit = Edit(dw.repeat_interleave(window, 0), db.repeat_interleave(window, 0), none)
            logits = dm.head(states, edit) @ item_t.T
            logits[:, PAD] = float("-inf")
            logits[:, UNK] = float("-inf")
            losses = F.cross_entropy(logits, target.clamp(min=UNK + 1), reduction="none") * usable
            per_session = losses.view(b, window).sum(1) / usable.view(b, window).sum(1).clamp(min=1)
            gw, gb = torch.autograd.grad(per_session.sum(), [dw, db])
            with torch.no_grad():
                dw -= lr * gw
                db -= lr * gb
    return Edit(dw.detach(), db.detach(), none)


class FinetuneMethod:
    """Base model with its head fine-tuned per session (3 steps) before scoring."""

    name = "finetune"

    def __init__(self, model: PersonaModel, *, steps: int = 3, lr: float = 0.1, window: int = 5) -> None:
        self.model, self.steps, self.lr, self.window = model, steps, lr, window

    def score(self, histories: Tensor) -> Tensor:
        edit = finetune_edit(self.model, histories, steps=self.steps, lr=self.lr, window=self.window)
        return self.model.score(histories, edit)

    def observe(self, histories: Tensor, targets: Tensor) -> None:
        return None


def _batches(examples: Examples, batch_size: int) -> Iterable[tuple[Tensor, Tensor]]:
    for start in range(0, len(examples), batch_size):
        stop = start + batch_size
        yield (
            torch.from_numpy(examples.histories[start:stop]),
            torch.from_numpy(examples.targets[start:stop]),
        )


@torch.inference_mode()
def evaluate_method(
    method: Method,
    examples: Examples,
    *,
    batch_size: int = 512,
    sampled: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, float]:
    """HR/NDCG/MRR of one method over examples in time order (full-catalogue ranking by default).

    ``sampled=99`` ranks the target against 99 random negatives instead (the paper's protocol), with
    random tie-breaking; those numbers are not comparable with full-ranking ones.
    """
    metrics = RankingMetrics()
    g = torch.Generator().manual_seed(seed)
    n_batches = (len(examples) + batch_size - 1) // batch_size
    for hist, tgt in track(_batches(examples, batch_size), f"evaluating {method.name}", n_batches, enabled=progress):
        scores = method.score(hist)
        if sampled:
            neg = sample_negatives(scores.shape[1], tgt, sampled, g)
            ranks = sampled_ranks(scores, tgt, neg, g)
        else:
            ranks = target_ranks(scores, tgt)
        metrics.update(ranks)
        method.observe(hist, tgt)
    return metrics.compute()


def build_methods(
    model: PersonaModel,
    item_counts: np.ndarray,
    *,
    no_prototype_model: PersonaModel | None = None,
    finetune_lr: float = 0.1,
    names: Iterable[str] = METHOD_NAMES,
) -> list[Method]:
    """The methods of METHOD.md §5 on one trained model (the ablation may bring its own adapter)."""
    factories: dict[str, Callable[[], Method]] = {
        "popularity": lambda: PopularityMethod(item_counts),
        "base": lambda: BaseMethod(model),
        "persona": lambda: PersonaMethod(model, "persona", "prototype", refine=True),
        "persona-no-prototypes": lambda: PersonaMethod(no_prototype_model or model, "persona-no-prototypes", "session"),
        "persona-static-prototypes": lambda: PersonaMethod(model, "persona-static-prototypes", "prototype"),
        "finetune": lambda: FinetuneMethod(model, lr=finetune_lr),
    }
    return [factories[n]() for n in names]


@dataclass
class Timing:
    edit_ms_per_session: float
    edit_batch_sessions_per_s: float
    finetune_ms_per_session: float

    def as_dict(self) -> dict[str, float]:
        return {
            "edit_ms_per_session": self.edit_ms_per_session,
            "edit_batch_sessions_per_s": self.edit_batch_sessions_per_s,
            "finetune_ms_per_session": self.finetune_ms_per_session,
            "finetune_over_edit": self.finetune_ms_per_session / max(self.edit_ms_per_session, 1e-9),
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
def measure_cost(model: PersonaModel, examples: Examples, *, batch: int = 256, repeats: int = 30) -> Timing:
    """Edit generation (single and batched) against per-session fine-tuning, same machine, same run."""
    hist = torch.from_numpy(examples.histories[: max(batch, 1)])
    one = hist[:1]
    single = _median_seconds(lambda: model.session_edit(one), repeats)
    batched = _median_seconds(lambda: model.session_edit(hist), max(repeats // 3, 3))
    ft = _median_seconds(lambda: finetune_edit(model, one), max(repeats // 3, 3))
    return Timing(single * 1e3, len(hist) / batched, ft * 1e3)
