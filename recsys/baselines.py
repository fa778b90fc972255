"""The baselines Persona has to beat, each a :class:`recsys.evaluate.Method` on the same inputs, and the
validation searches that give each its best setting (never the test period).

- :class:`RecentPopularityMethod`: counts over a sliding window of the stream's most recent interactions,
  the simplest answer to a real-time shift;
- :class:`SessionRepeatMethod`: the session's own past items, strong where people re-consume;
- :class:`FinetuneMethod`: the editable head fine-tuned per session by backprop, what an edit replaces.

Scores are ranked with pessimistic ties (:func:`recsys.metrics.target_ranks`), so where a rule leaves ties
(equal counts) training-period popularity breaks them: it always sits below one count.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from recsys.model import PAD, UNK, DeviceModel, Edit, PersonaModel
from recsys.splits import Examples

log = logging.getLogger(__name__)

Optimizer = Literal["sgd", "adam"]

#: Sliding-window lengths (interactions) tried on validation: from a few minutes of a busy stream to about
#: the whole training period (where it becomes plain popularity).
RECENT_WINDOWS = (100, 300, 1_000, 3_000, 10_000, 30_000, 100_000)
#: Fine-tuning settings tried on validation: the smallest steps leave the model almost unchanged, so the
#: baseline can always choose to do no harm.
FINETUNE_GRID: tuple[tuple[Optimizer, float], ...] = (
    *(("sgd", lr) for lr in (1e-4, 1e-3, 1e-2, 1e-1, 1.0)),
    *(("adam", lr) for lr in (1e-4, 1e-3, 1e-2, 1e-1)),
)


def tie_break(item_counts: np.ndarray) -> Tensor:
    """Training-period popularity scaled into [0, 1): added to integer counts it orders equal counts without
    ever overtaking a larger one. float64 [N] (counts up to 2**53 stay exact)."""
    counts = torch.as_tensor(item_counts, dtype=torch.float64)
    return counts / (float(counts.max()) + 1.0)


class RecentPopularityMethod:
    """Items ranked by their count over the ``window`` most recent interactions of the stream.

    ``prior`` int64 [P]: the interactions before the evaluated ones, oldest first (the window starts as the
    last ``window`` of them). After scoring a batch it observes the batch's true items, like the live stream.
    """

    name = "recent-popularity"

    def __init__(self, item_counts: np.ndarray, prior: np.ndarray, window: int) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        self.n_items = len(item_counts)
        self._tie = tie_break(item_counts)
        self._recent = np.asarray(prior, dtype=np.int64)[-window:]
        self._scores = self._count()

    def _count(self) -> Tensor:
        counts = np.bincount(self._recent, minlength=self.n_items).astype(np.float64)
        return torch.from_numpy(counts) + self._tie

    def score(self, histories: Tensor) -> Tensor:
        return self._scores.unsqueeze(0).expand(histories.shape[0], -1)

    def observe(self, histories: Tensor, targets: Tensor) -> None:
        self._recent = np.concatenate([self._recent, targets.numpy()])[-self.window :]
        self._scores = self._count()


class SessionRepeatMethod:
    """The session's own past items first, by how often they occur in its history (ties: the more recent
    first), then every other item by training-period popularity."""

    name = "session-repeat"
    reads_repeats = True  # given the session's whole-history item counts, it ranks by those (recsys.repeats)

    def __init__(self, item_counts: np.ndarray) -> None:
        self._tie = tie_break(item_counts).float()

    def score(self, histories: Tensor, repeats: Tensor | None = None) -> Tensor:
        if repeats is not None:
            return self._score_counts(histories.shape[0], repeats)
        b, t = histories.shape
        real = histories > UNK
        # Per history position: how often its item occurs in the session and where it last occurs ([B, T, T],
        # not [B, N]: the catalogue may be large, the history is not).
        same = (histories.unsqueeze(2) == histories.unsqueeze(1)) & real.unsqueeze(1)
        count = same.sum(2).float()
        last = torch.where(same, torch.arange(t, dtype=torch.float32), -1.0).amax(2)
        # One more occurrence always outweighs recency (T + 1 > T - 1); any session item outranks any other.
        value = torch.where(real, 1.0 + count * (t + 1) + last, 0.0)
        scores = self._tie.expand(b, -1).clone()
        return scores.scatter_(1, torch.where(real, histories, PAD), value)  # padding writes PAD, never ranked

    def _score_counts(self, b: int, repeats: Tensor) -> Tensor:
        """From whole-history entries [B, R, W] (item, count, age, ...): more occurrences first, then more recent."""
        items, count, age = repeats[..., 0].long(), repeats[..., 1].float(), repeats[..., 2].float()
        real = items > UNK
        horizon = float(age.max()) + 1.0 if age.numel() else 1.0
        # recency as a fraction in (0, 1): one more occurrence outweighs it; any session item outranks any other
        value = torch.where(real, 1.0 + count + (horizon - age) / (horizon + 1.0), 0.0)
        scores = self._tie.expand(b, -1).clone()
        return scores.scatter_(1, torch.where(real, items, PAD), value)

    def observe(self, histories: Tensor, targets: Tensor) -> None:
        return None


class _Head(nn.Module):
    """The device model's editable head as a module of its own, so ``functional_call`` can swap in one set of
    head parameters per session."""

    def __init__(self, dm: DeviceModel) -> None:
        super().__init__()
        self.dm = dm

    def forward(self, states: Tensor) -> Tensor:
        out: Tensor = self.dm.head(states)
        return out


def finetune_edit(
    model: PersonaModel,
    histories: Tensor,
    *,
    steps: int = 3,
    lr: float = 0.1,
    optimizer: Optimizer = "sgd",
    window: int = 5,
) -> Edit:
    """Per-session fine-tuning of the editable head by backprop, the baseline Persona replaces.

    Each session [B, T] trains its own copy of the head parameters for ``steps`` steps of SGD or Adam on its
    last ``window`` next-item pairs (full-catalogue cross-entropy); batched over sessions with ``torch.func``
    (``vmap`` of ``grad`` of a ``functional_call`` with per-session head parameters), so one session or a
    thousand run the same code. Returns the change of the head as an :class:`Edit`.
    """
    dm = model.device_model
    b, t = histories.shape
    with torch.inference_mode(False), torch.no_grad():
        histories = histories.clone()  # a normal tensor, usable by autograd even under inference_mode
        prefix = torch.stack([F.pad(histories[:, :-j], (j, 0), value=PAD) for j in range(1, window + 1)], 1)
        target = torch.stack([histories[:, -j] for j in range(1, window + 1)], 1)  # [B, window]
        usable = ((target > UNK) & (prefix[..., -1] != PAD)).to(torch.float32)
        states = dm.encode(prefix.view(b * window, t)).view(b, window, -1)
        item_t = dm.item_targets()
        never = torch.zeros(item_t.shape[0])
        never[[PAD, UNK]] = float("-inf")  # padding and unknown are never answers
        target = target.clamp(min=UNK + 1)
        head = _Head(dm)

        def session_loss(w: Tensor, bias: Tensor, s: Tensor, y: Tensor, use: Tensor) -> Tensor:
            h = functional_call(head, {"dm.head_weight": w, "dm.head_bias": bias}, (s,))
            losses = F.cross_entropy(h @ item_t.T + never, y, reduction="none")
            return (losses * use).sum() / use.sum().clamp(min=1.0)

        per_session_grad = vmap(grad(session_loss, argnums=(0, 1)))
        w0, b0 = dm.head_weight.detach(), dm.head_bias.detach()
        params = [w0.expand(b, *w0.shape).clone(), b0.expand(b, *b0.shape).clone()]
        moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
        for step in range(1, steps + 1):
            grads = per_session_grad(params[0], params[1], states, target, usable)
            for p, g, (m, v) in zip(params, grads, moments, strict=True):
                if optimizer == "sgd":
                    p -= lr * g
                else:  # Adam is elementwise, so the batched update is every session's own Adam
                    m.mul_(0.9).add_(g, alpha=0.1)
                    v.mul_(0.999).addcmul_(g, g, value=0.001)
                    p -= lr * (m / (1 - 0.9**step)) / ((v / (1 - 0.999**step)).sqrt() + 1e-8)
        none = torch.full((b,), -1, dtype=torch.long)
        return Edit(params[0] - w0, params[1] - b0, none)


class FinetuneMethod:
    """Base model with its head fine-tuned per session (``steps`` steps of ``optimizer``) before scoring; it reads
    the sessions' whole-history item counts like the base model (its repeat part scores with the fine-tuned head),
    so a step of 0 is exactly the base model."""

    name = "finetune"
    reads_repeats = True

    def __init__(
        self, model: PersonaModel, *, steps: int = 3, lr: float = 0.1, optimizer: Optimizer = "sgd", window: int = 5
    ) -> None:
        self.model, self.steps, self.lr, self.optimizer, self.window = model, steps, lr, optimizer, window

    def edit(self, histories: Tensor) -> Edit:
        return finetune_edit(
            self.model, histories, steps=self.steps, lr=self.lr, optimizer=self.optimizer, window=self.window
        )

    def score(self, histories: Tensor, repeats: Tensor | None = None) -> Tensor:
        return self.model.score(histories, self.edit(histories), repeats=repeats)

    def observe(self, histories: Tensor, targets: Tensor) -> None:
        return None


# --------------------------------------------------------------------------------------------- validation


@dataclass
class FinetuneChoice:
    """The fine-tuning setting chosen on validation, with the validation NDCG@10 of every one tried."""

    optimizer: Optimizer = "sgd"
    lr: float = 0.1
    valid_ndcg10: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {"optimizer": self.optimizer, "lr": self.lr, "valid_ndcg@10": self.valid_ndcg10}


@dataclass
class WindowChoice:
    """The recent-popularity window chosen on validation, with the validation NDCG@10 of every one tried."""

    window: int = RECENT_WINDOWS[0]
    valid_ndcg10: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {"window": self.window, "valid_ndcg@10": self.valid_ndcg10}


def stream_before(*parts: Examples) -> np.ndarray:
    """The interactions of ``parts`` as one stream, oldest first (the target items ordered by time): what a
    live stream had seen before the evaluated period. int64 [P]."""
    targets = np.concatenate([p.targets for p in parts])
    ts = np.concatenate([p.ts for p in parts])
    return targets[np.argsort(ts, kind="stable")]


def choose_finetune(
    model: PersonaModel,
    valid: Examples,
    *,
    grid: Iterable[tuple[Optimizer, float]] = FINETUNE_GRID,
    max_examples: int = 3000,
) -> FinetuneChoice:
    """The optimizer and step size with the best NDCG@10 on the most recent ``max_examples`` validation
    examples (ties: the earlier in ``grid``, so the smallest step)."""
    from recsys.evaluate import evaluate_method

    sample = valid.subset(np.arange(max(0, len(valid) - max_examples), len(valid)))
    best: FinetuneChoice | None = None
    scores: dict[str, float] = {}
    for opt, lr in grid:
        score = evaluate_method(FinetuneMethod(model, lr=lr, optimizer=opt), sample)["ndcg@10"]
        scores[f"{opt}@{lr:g}"] = score
        if best is None or score > scores[f"{best.optimizer}@{best.lr:g}"]:
            best = FinetuneChoice(opt, lr)
    if best is None:
        raise ValueError("the fine-tuning grid is empty")
    best.valid_ndcg10 = scores
    log.info("fine-tuning on validation: %s -> %s %g", scores, best.optimizer, best.lr)
    return best


def choose_recent_window(
    item_counts: np.ndarray, prior: np.ndarray, valid: Examples, *, windows: Iterable[int] = RECENT_WINDOWS
) -> WindowChoice:
    """The sliding-window length with the best NDCG@10 on validation, the stream starting from ``prior``
    (the interactions before the validation period; ties: the shorter window)."""
    from recsys.evaluate import evaluate_method

    scores = {w: evaluate_method(RecentPopularityMethod(item_counts, prior, w), valid)["ndcg@10"] for w in windows}
    if not scores:
        raise ValueError("no window lengths to try")
    best = max(scores, key=lambda w: (scores[w], -w))
    log.info("recent-popularity window on validation: %s -> %d", scores, best)
    return WindowChoice(best, {str(w): s for w, s in scores.items()})
