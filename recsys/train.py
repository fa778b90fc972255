"""The three training stages of METHOD.md §4: base model, adapter, prototypes (with alternating rounds).

Every stage early-stops on validation NDCG@10 (the last slice of the training period, never the test
period) and keeps its best weights.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from recsys.evaluate import BaseMethod, Method, PersonaMethod, evaluate_method
from recsys.model import PAD, UNK, ModelConfig, PersonaModel, PrototypeBank, cross_entropy
from recsys.progress import track
from recsys.splits import Examples, Split

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Optimisation settings (METHOD.md §4 defaults, with smaller epoch caps for 2-core machines)."""

    epochs: int = 100
    base_batch_size: int = 128
    base_stride: int = 25  # the base model trains on every position of windows this far apart
    adapter_epochs: int = 20
    proto_rounds: int = 1
    proto_epochs: int = 2
    patience: int = 5
    batch_size: int = 256
    lr: float = 1e-3
    k_candidates: tuple[int, ...] = (4, 8, 16, 32)
    residual_weights: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    seed: int = 0
    valid_batch: int = 1024
    max_valid: int | None = 20_000  # cap on validation examples per check (time, not accuracy)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["k_candidates"] = list(self.k_candidates)
        d["residual_weights"] = list(self.residual_weights)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        data = dict(data)
        for key in ("k_candidates", "residual_weights"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass
class StageLog:
    name: str
    epochs: int = 0
    best_epoch: int = 0
    best_ndcg10: float = 0.0
    seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class TrainResult:
    model: PersonaModel
    no_prototype_adapter: dict[str, Tensor]
    stages: list[StageLog]
    valid_metrics: dict[str, dict[str, float]]
    chosen_k: int
    k_scores: dict[int, float]


def _batches(examples: Examples, batch_size: int, g: torch.Generator) -> Iterable[tuple[Tensor, Tensor]]:
    order = torch.randperm(len(examples), generator=g).numpy()
    for start in range(0, len(order), batch_size):
        idx = np.sort(order[start : start + batch_size])
        yield torch.from_numpy(examples.histories[idx]), torch.from_numpy(examples.targets[idx])


def causal_windows(train: Examples, stride: int) -> Examples:
    """Every ``stride``-th example of each user, counted back from the last one.

    An example's history plus target is a window of T + 1 consecutive items; with a causal encoder each
    window trains T next-item predictions, so these few windows cover every training target.
    """
    order = np.lexsort((train.ts, train.users))
    users = train.users[order]
    starts = np.r_[0, np.flatnonzero(np.diff(users)) + 1]
    counts = np.diff(np.r_[starts, len(users)])
    pos = np.arange(len(users)) - np.repeat(starts, counts)
    from_end = np.repeat(counts, counts) - 1 - pos
    keep = np.sort(order[from_end % max(stride, 1) == 0])
    return train.subset(keep)


def valid_ndcg(method: Method, valid: Examples, tc: TrainConfig) -> float:
    return evaluate_method(method, _cap(valid, tc.max_valid), batch_size=tc.valid_batch)["ndcg@10"]


def _cap(examples: Examples, n: int | None) -> Examples:
    if n is None or len(examples) <= n:
        return examples
    return examples.subset(np.arange(len(examples) - n, len(examples)))  # the most recent slice


def stage_seed_offset(name: str) -> int:
    """A stable offset in [0, 1000) for a training stage's name (the same in every process)."""
    return zlib.crc32(name.encode()) % 1000


def fit_stage(
    name: str,
    trainable: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    validate: Callable[[], float],
    train: Examples,
    tc: TrainConfig,
    epochs: int,
    *,
    set_modes: Callable[[], None],
    progress: bool = True,
    batch_size: int | None = None,
) -> StageLog:
    """Adam on ``trainable``'s parameters with early stopping; restores the best state at the end."""
    params = [p for p in trainable.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=tc.lr)
    # A per-stage shuffle stream that is the same in every process: zlib.crc32, not hash(), which Python
    # randomises per process for str (PYTHONHASHSEED) and made the same seed train different weights.
    g = torch.Generator().manual_seed(tc.seed * 1000 + stage_seed_offset(name))
    stage = StageLog(name)
    start = time.perf_counter()
    best_state = copy.deepcopy(trainable.state_dict())
    best, bad = validate(), 0
    stage.best_ndcg10 = best
    log.info("%s: start, valid NDCG@10 %.4f", name, best)
    bs = batch_size or tc.batch_size
    n_batches = (len(train) + bs - 1) // bs
    for epoch in range(1, epochs + 1):
        set_modes()
        total, count = 0.0, 0
        for hist, tgt in track(_batches(train, bs, g), f"{name} epoch {epoch}", n_batches, enabled=progress):
            loss = loss_fn(hist, tgt)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 5.0)
            opt.step()
            total += loss.item() * len(tgt)
            count += len(tgt)
        score = validate()
        stage.history.append({"epoch": epoch, "loss": total / max(count, 1), "valid_ndcg@10": score})
        log.info("%s: epoch %d loss %.4f valid NDCG@10 %.4f", name, epoch, total / max(count, 1), score)
        stage.epochs = epoch
        if score > best:
            best, bad = score, 0
            stage.best_epoch, stage.best_ndcg10 = epoch, score
            best_state = copy.deepcopy(trainable.state_dict())
        else:
            bad += 1
            if bad >= tc.patience:
                break
    trainable.load_state_dict(best_state)
    stage.seconds = time.perf_counter() - start
    return stage


@torch.inference_mode()
def _codes(model: PersonaModel, examples: Examples, batch: int = 2048) -> Tensor:
    model.eval()
    parts = [model.codes(torch.from_numpy(examples.histories[i : i + batch])) for i in range(0, len(examples), batch)]
    return torch.cat(parts)


@contextlib.contextmanager
def deterministic() -> Iterator[None]:
    """Deterministic kernels while training, then the caller's setting again.

    With more than one thread some accumulating kernels (the gradient of indexing a tensor by prototype)
    add in a varying order, so the same seed gave weights differing in the last bits from run to run.
    """
    was, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn)


def train_persona(split: Split, cfg: ModelConfig, tc: TrainConfig, *, progress: bool = True) -> TrainResult:
    """Stage 1 base model, stage 2 adapter (no prototypes), stage 3 prototypes + alternating rounds.

    The same seed gives bit-identical weights in any process (same library versions and thread count).
    """
    with deterministic():
        return _train_persona(split, cfg, tc, progress=progress)


def _train_persona(split: Split, cfg: ModelConfig, tc: TrainConfig, *, progress: bool) -> TrainResult:
    torch.manual_seed(tc.seed)
    model = PersonaModel(cfg)
    dm = model.device_model
    stages: list[StageLog] = []

    def base_loss(h: Tensor, t: Tensor) -> Tensor:
        # Causal encoder: every position of the window predicts the item after it (SASRec-style).
        labels = torch.cat([h[:, 1:], t.unsqueeze(1)], 1)
        use = (h != PAD) & (labels > UNK)
        x = dm.head(dm.encode_all(h)[use])
        return cross_entropy(x @ dm.item_targets().T, labels[use])

    def base_modes() -> None:
        model.train()

    stages.append(
        fit_stage(
            "base",
            dm,
            base_loss,
            lambda: valid_ndcg(BaseMethod(_eval(model)), split.valid, tc),
            causal_windows(split.train, tc.base_stride),
            tc,
            tc.epochs,
            set_modes=base_modes,
            progress=progress,
            batch_size=tc.base_batch_size,
        )
    )

    model.freeze_device_model()

    def adapter_modes() -> None:
        model.train()
        dm.eval()  # the device model is frozen: no dropout while the adapter learns to edit it

    def session_loss(h: Tensor, t: Tensor) -> Tensor:
        return cross_entropy(model.score(h, model.session_edit(h, "session")), t)

    stages.append(
        fit_stage(
            "adapter",
            model.adapter,
            session_loss,
            lambda: valid_ndcg(PersonaMethod(_eval(model), "no-proto", "session"), split.valid, tc),
            split.train,
            tc,
            tc.adapter_epochs,
            set_modes=adapter_modes,
            progress=progress,
        )
    )
    no_proto_state = {k: v.clone() for k, v in model.adapter.state_dict().items()}

    def proto_loss(h: Tensor, t: Tensor) -> Tensor:
        return cross_entropy(model.score(h, model.session_edit(h, "prototype")), t)

    def proto_valid() -> float:
        return valid_ndcg(PersonaMethod(_eval(model), "static", "prototype"), split.valid, tc)

    # Prototype initialisation: k-means on the training sessions' codes. K and the residual weight λ (how far a
    # session's edit may move away from its prototype's) are chosen together on validation.
    train_codes = _codes(model, split.train)
    k_scores: dict[int, float] = {}
    best: tuple[float, int, float, PrototypeBank] | None = None
    for k in tc.k_candidates:
        if k > len(train_codes):
            continue
        model.cfg.n_prototypes = k
        model.bank = PrototypeBank(model.cfg)
        model.bank.fit(train_codes, seed=tc.seed)
        for weight in tc.residual_weights:
            model.cfg.residual_weight = weight
            score = proto_valid()
            log.info("prototypes: K=%d residual weight %.2f valid NDCG@10 %.4f", k, weight, score)
            k_scores[k] = max(k_scores.get(k, 0.0), score)
            if best is None or score > best[0]:
                best = (score, k, weight, copy.deepcopy(model.bank))
    if best is None:
        raise ValueError("no prototype count fits the training data")
    _, best_k, model.cfg.residual_weight, model.bank = best
    model.cfg.n_prototypes = best_k

    rounds = StageLog("prototype-rounds")
    best_state = copy.deepcopy(model.state_dict())
    best_score = proto_valid()
    start = time.perf_counter()
    for r in range(1, tc.proto_rounds + 1):
        # (b) train generators and GRUs under the prototype + residual edit, (a) assignment is per batch
        stage = fit_stage(
            f"prototype-round-{r}",
            model,  # the adapter and the prototypes' offsets (the device model is frozen)
            proto_loss,
            proto_valid,
            split.train,
            tc,
            tc.proto_epochs,
            set_modes=adapter_modes,
            progress=progress,
        )
        # (c) re-estimate the centres from the new codes, starting from the current ones
        codes = _codes(model, split.train)
        assignment = model.bank.assign(codes)
        with torch.no_grad():
            for j in range(best_k):
                members = codes[assignment == j]
                if len(members):
                    model.bank.centres[j] = members.mean(0)
            model.bank.counts.copy_(torch.bincount(assignment, minlength=best_k).float())
        score = valid_ndcg(PersonaMethod(_eval(model), "static", "prototype"), split.valid, tc)
        rounds.history.append({"round": r, "train_best": stage.best_ndcg10, "valid_ndcg@10": score})
        log.info("prototype round %d: valid NDCG@10 %.4f", r, score)
        if score > best_score:
            best_score, best_state = score, copy.deepcopy(model.state_dict())
            rounds.best_epoch, rounds.best_ndcg10 = r, score
        rounds.epochs = r
    model.load_state_dict(best_state)
    rounds.seconds = time.perf_counter() - start
    stages.append(rounds)

    _eval(model)
    no_proto = copy.deepcopy(model)
    no_proto.adapter.load_state_dict(no_proto_state)
    valid_metrics = {
        "base": evaluate_method(BaseMethod(model), split.valid),
        "persona-no-prototypes": evaluate_method(PersonaMethod(no_proto, "no-proto", "session"), split.valid),
        "persona-static-prototypes": evaluate_method(PersonaMethod(model, "static", "prototype"), split.valid),
        "persona": evaluate_method(PersonaMethod(model, "persona", "prototype", refine=True), split.valid),
    }
    return TrainResult(model, no_proto_state, stages, valid_metrics, best_k, k_scores)


def _eval(model: PersonaModel) -> PersonaModel:
    model.eval()
    return model
