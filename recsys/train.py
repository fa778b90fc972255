"""The three training stages of METHOD.md §4: base model, adapter, prototypes (with alternating rounds).

Every stage early-stops on validation NDCG@10 (the last slice of the training period, never the test
period) and keeps its best weights.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import logging
import math
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from recsys.evaluate import BaseMethod, Method, PersonaMethod, evaluate_method, warm_switches
from recsys.metrics import RankingMetrics, target_ranks
from recsys.model import (
    PAD,
    UNK,
    ModelConfig,
    PersonaModel,
    PrototypeBank,
    count_next_items,
    cross_entropy,
    fine_nearest,
    nearest_history_groups,
    next_item_distributions,
    window_sums,
)
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
    patience: int = 5  # the adapter's, the prototypes' and the repeat part's stages
    # The base model's own patience: on a small validation set its curve peaks early, falls and stays flat for 15-20
    # epochs, then climbs again (leave-one-out on MovieLens-100K: 0.040 test NDCG@10 at patience 5, 0.058 at 50;
    # docs/results.md). A later stage starts from a trained base, so its curve has no such second climb.
    base_patience: int = 50
    batch_size: int = 256
    lr: float = 1e-3
    k_candidates: tuple[int, ...] = (4, 8, 16, 32, 64)
    residual_weights: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    # the prototypes' group bias (METHOD.md §3b), chosen on validation with K and λ; β = 0 is always a candidate
    group_bias_weights: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0)
    group_bias_decays: tuple[float, ...] = (1.0, 0.999)  # 0.99 lost on both ML-100K and synthetic (docs/method.md)
    group_bias_smoothings: tuple[float, ...] = (1.0, 3.0)
    # the fine groups (ModelConfig.fine_groups), chosen on validation after the prototypes' group bias: K2, τ2, β2, α2
    # (none is always a candidate; docs/results.md, "Fine groups"). () = no fine groups.
    fine_group_counts: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048)
    fine_temperatures: tuple[float, ...] = (0.0, 0.05, 0.2)
    fine_bias_weights: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)
    fine_bias_smoothings: tuple[float, ...] = (1.0, 3.0)
    # the history groups (ModelConfig.history_groups), chosen on validation after the fine groups: G, γ3, β3, α3 (none
    # is always a candidate; docs/results.md, "Groups keyed by the whole window"). A count above one group per
    # HISTORY_USERS_PER_GROUP training users is skipped. () = no history groups.
    history_group_counts: tuple[int, ...] = (8, 16, 32, 64, 128, 256, 512)
    history_bias_weights: tuple[float, ...] = (0.25, 0.5, 1.0)
    history_bias_smoothings: tuple[float, ...] = (1.0, 3.0)
    history_bias_decays: tuple[float, ...] = (1.0, 0.999)
    # the repeat part (recsys.repeats): trained after the base model on its frozen state, kept only if it raises the
    # base model's validation NDCG@10 (so data without re-consumption gets the model without it)
    repeat_epochs: int = 20
    # a mixture form's p(repeat): chosen on validation from these once its repeat distribution is trained
    repeat_gates: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    seed: int = 0
    valid_batch: int = 1024
    max_valid: int | None = 20_000  # cap on validation examples per check (time, not accuracy)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in _TUPLE_FIELDS:  # as JSON lists
            d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        data = dict(data)
        for key in _TUPLE_FIELDS:
            if key in data:
                data[key] = tuple(data[key])
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


#: TrainConfig's tuple fields (lists in a bundle's JSON).
_TUPLE_FIELDS = (
    "k_candidates",
    "residual_weights",
    "group_bias_weights",
    "group_bias_decays",
    "group_bias_smoothings",
    "repeat_gates",
    "fine_group_counts",
    "fine_temperatures",
    "fine_bias_weights",
    "fine_bias_smoothings",
    "history_group_counts",
    "history_bias_weights",
    "history_bias_smoothings",
    "history_bias_decays",
)


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
    group_bias: GroupBias
    fine_groups: FineGroups | None = None
    history_groups: HistoryGroups | None = None


class Batch(NamedTuple):
    """A shuffled training batch: example rows [B], histories [B, T], targets [B], item counts [B, R, W] or None."""

    rows: Tensor
    histories: Tensor
    targets: Tensor
    repeats: Tensor | None


def _batches(examples: Examples, batch_size: int, g: torch.Generator) -> Iterable[Batch]:
    order = torch.randperm(len(examples), generator=g).numpy()
    for start in range(0, len(order), batch_size):
        idx = np.sort(order[start : start + batch_size])
        reps = None if examples.repeats is None else torch.from_numpy(examples.repeats[idx])
        yield Batch(
            torch.from_numpy(idx),
            torch.from_numpy(examples.histories[idx]),
            torch.from_numpy(examples.targets[idx]),
            reps,
        )


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
    return evaluate_method(method, latest_examples(valid, tc.max_valid), batch_size=tc.valid_batch)["ndcg@10"]


def latest_examples(examples: Examples, n: int | None) -> Examples:
    """The most recent ``n`` examples (all of them when ``n`` is None): validation checks are capped in time, and
    the latest slice is the one closest to the period the model will serve."""
    if n is None or len(examples) <= n:
        return examples
    return examples.subset(np.arange(len(examples) - n, len(examples)))  # the most recent slice


def stage_seed_offset(name: str) -> int:
    """A stable offset in [0, 1000) for a training stage's name (the same in every process)."""
    return zlib.crc32(name.encode()) % 1000


def fit_stage(
    name: str,
    trainable: nn.Module,
    loss_fn: Callable[[Batch], Tensor],
    validate: Callable[[], float],
    train: Examples,
    tc: TrainConfig,
    epochs: int,
    *,
    set_modes: Callable[[], None],
    progress: bool = True,
    batch_size: int | None = None,
    patience: int | None = None,
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
        for batch in track(_batches(train, bs, g), f"{name} epoch {epoch}", n_batches, enabled=progress):
            loss = loss_fn(batch)
            tgt = batch.targets
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
            if bad >= (patience or tc.patience):
                break
    trainable.load_state_dict(best_state)
    stage.seconds = time.perf_counter() - start
    return stage


@torch.inference_mode()
def example_codes(model: PersonaModel, examples: Examples, batch: int = 2048) -> Tensor:
    """The adapter's codes [M, L, d] of the examples' histories (eval mode), in batches: what prototypes and fine
    groups are fitted on and assigned by."""
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

    def base_loss(batch: Batch) -> Tensor:
        h, t = batch.histories, batch.targets
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
            # without the repeat part: it is not trained yet (a mixture form starts as a working mixture), and its
            # stage compares itself with this score
            lambda: valid_ndcg(BaseMethod(_eval(model), repeats=False), split.valid, tc),
            causal_windows(split.train, tc.base_stride),
            tc,
            tc.epochs,
            set_modes=base_modes,
            progress=progress,
            batch_size=tc.base_batch_size,
            patience=tc.base_patience,
        )
    )

    model.freeze_device_model()
    repeat_stage = train_repeat_part(model, split, tc, base_score=stages[-1].best_ndcg10, progress=progress)
    if repeat_stage is not None:
        stages.append(repeat_stage)

    def adapter_modes() -> None:
        model.train()
        dm.eval()  # the device model is frozen: no dropout while the adapter learns to edit it

    def session_loss(b: Batch) -> Tensor:
        h = b.histories
        return cross_entropy(model.score(h, model.session_edit(h, "session"), repeats=b.repeats), b.targets)

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

    def proto_loss(b: Batch) -> Tensor:
        # without the group bias: the training period's counts contain each example's own target
        edit = model.session_edit(b.histories, "prototype")
        return cross_entropy(model.device_model(b.histories, edit, None, b.repeats), b.targets)

    def proto_valid() -> float:
        with _group_bias_off(model):
            return valid_ndcg(PersonaMethod(_eval(model), "static", "prototype"), split.valid, tc)

    # Prototype initialisation: k-means on the training sessions' codes. K, the residual weight λ (how far a
    # session's edit may move away from its prototype's) and the group bias (β, α, γ) are chosen together on
    # validation, on the adapter as trained; the device model and the adapter are frozen here, so the validation
    # sessions' states and codes are computed once.
    train_codes = example_codes(model, split.train)
    probe = ValidProbe.build(model, latest_examples(split.valid, tc.max_valid))
    k_scores: dict[int, float] = {}
    best: tuple[float, int, float, GroupBias, PrototypeBank] | None = None
    for k in tc.k_candidates:
        if k > len(train_codes):
            continue
        model.cfg.n_prototypes = k
        model.bank = PrototypeBank(model.cfg)
        train_assignment = model.bank.fit(train_codes, seed=tc.seed)
        scores = {}
        with _group_bias_off(model):
            for weight in tc.residual_weights:
                model.cfg.residual_weight = weight
                scores[weight] = probe.ndcg10(model, refine=False)
                log.info("prototypes: K=%d residual weight %.2f valid NDCG@10 %.4f", k, weight, scores[weight])
        model.cfg.residual_weight = max(scores, key=lambda w: scores[w])
        bias = choose_group_bias(model, probe, train_assignment, split.train.targets, tc)
        k_scores[k] = bias.score
        if best is None or bias.score > best[0]:
            best = (bias.score, k, model.cfg.residual_weight, bias, copy.deepcopy(model.bank))
    if best is None:
        raise ValueError("no prototype count fits the training data")
    _, best_k, model.cfg.residual_weight, chosen_bias, model.bank = best
    model.bank.cfg = model.cfg  # the copy brought its own config: the group bias must read the model's
    model.cfg.n_prototypes = best_k
    chosen_bias.apply(model.cfg)

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
        codes = example_codes(model, split.train)
        assignment = model.bank.assign(codes)
        with torch.no_grad():
            for j in range(best_k):
                members = codes[assignment == j]
                if len(members):
                    model.bank.centres[j] = members.mean(0)
            model.bank.counts.copy_(torch.bincount(assignment, minlength=best_k).float())
        score = proto_valid()
        rounds.history.append({"round": r, "train_best": stage.best_ndcg10, "valid_ndcg@10": score})
        log.info("prototype round %d: valid NDCG@10 %.4f", r, score)
        if score > best_score:
            best_score, best_state = score, copy.deepcopy(model.state_dict())
            rounds.best_epoch, rounds.best_ndcg10 = r, score
        rounds.epochs = r
    model.load_state_dict(best_state)
    rounds.seconds = time.perf_counter() - start
    stages.append(rounds)

    # The group bias on the final bank: its β, α and γ again (the rounds moved codes and centres), then the counts
    # a live bank would hold when the test period starts: the training period's, then the validation period's.
    codes = example_codes(model, split.train)
    train_assignment = model.bank.assign(codes)
    probe = ValidProbe.build(model, latest_examples(split.valid, tc.max_valid), with_sums=bool(tc.history_group_counts))
    chosen_bias = choose_group_bias(model, probe, train_assignment, split.train.targets, tc)  # counts: training's
    fine = choose_fine_groups(model, probe, codes, split.train.targets, tc)
    history = choose_history_groups(model, probe, split.train, tc)

    _eval(model)
    no_proto = copy.deepcopy(model)
    no_proto.adapter.load_state_dict(no_proto_state)
    valid_metrics = {
        "base": evaluate_method(BaseMethod(model), split.valid),
        "persona-no-prototypes": evaluate_method(PersonaMethod(no_proto, "no-proto", "session"), split.valid),
        "persona-static-prototypes": evaluate_method(PersonaMethod(model, "static", "prototype"), split.valid),
        "persona": evaluate_method(PersonaMethod(model, "persona", "prototype", refine=True), split.valid),
    }
    with torch.no_grad():  # then the validation period's, as a live bank would have counted them
        valid_codes = example_codes(model, split.valid)
        model.bank.observe(model.bank.assign(valid_codes), torch.from_numpy(split.valid.targets))
        if fine is not None:  # the fine groups' distributions: the training and validation periods'
            fine.add(valid_codes, split.valid.targets)
            model.bank.fine_items = fine.distributions()
        if history is not None:  # and the history groups': the training and validation periods'
            history.add(history.groups_of(model, split.valid), split.valid.targets)
            model.bank.history_items = history.distributions()
        warm_switches(model, split.valid)  # and the switches the validation period's gains
    return TrainResult(model, no_proto_state, stages, valid_metrics, best_k, k_scores, chosen_bias, fine, history)


def _eval(model: PersonaModel) -> PersonaModel:
    model.eval()
    return model


@dataclass
class GroupBias:
    """A choice of the group bias's settings (β, α, γ) with its validation NDCG@10."""

    weight: float
    smoothing: float
    decay: float
    score: float

    def apply(self, cfg: ModelConfig) -> None:
        cfg.group_bias_weight, cfg.group_bias_smoothing, cfg.group_bias_decay = self.weight, self.smoothing, self.decay


@contextlib.contextmanager
def _group_bias_off(model: PersonaModel) -> Iterator[None]:
    weight = model.cfg.group_bias_weight
    model.cfg.group_bias_weight = 0.0
    try:
        yield
    finally:
        model.cfg.group_bias_weight = weight


@dataclass
class ValidProbe:
    """The validation sessions' user states, codes and targets, for the many settings tried on one frozen adapter."""

    states: Tensor
    codes: Tensor
    targets: Tensor
    repeats: Tensor | None = None
    sums: Tensor | None = None  # their windows' item-embedding sums [M, D] (the history groups' key)
    batch: int = 512

    @classmethod
    @torch.inference_mode()
    def build(cls, model: PersonaModel, valid: Examples, *, with_sums: bool = False, batch: int = 2048) -> ValidProbe:
        """``with_sums``: also the windows' keys, which only trying history groups reads."""
        model.eval()
        states, codes, sums = [], [], []
        items = model.device_model.items.weight
        for i in range(0, len(valid), batch):
            h = torch.from_numpy(valid.histories[i : i + batch])
            states.append(model.device_model.encode(h))
            codes.append(model.codes(h))
            if with_sums:
                sums.append(window_sums(items, h))
        reps = None if valid.repeats is None else torch.from_numpy(valid.repeats)
        window_keys = torch.cat(sums) if with_sums else None
        return cls(torch.cat(states), torch.cat(codes), torch.from_numpy(valid.targets), reps, window_keys)

    @torch.inference_mode()
    def ndcg10(self, model: PersonaModel, *, refine: bool) -> float:
        """Validation NDCG@10 of prototype mode on these sessions in time order, exactly as ``persona`` (refine) or
        ``persona-static-prototypes`` evaluate it, on a copy of the bank."""
        bank = copy.deepcopy(model.bank)
        bank.cfg = model.cfg  # the settings being tried are the model's (a deep copy would freeze them)
        if self.sums is None and bank.has_history_groups():
            raise ValueError("this validation probe has no window keys for the history groups: build it with_sums")
        dm = model.device_model
        item_targets = dm.item_targets()
        metrics = RankingMetrics()
        for i in range(0, len(self.targets), self.batch):
            codes, tgt = self.codes[i : i + self.batch], self.targets[i : i + self.batch]
            reps = None if self.repeats is None else self.repeats[i : i + self.batch]
            protos = bank.assign(codes)
            edit = model.prototype_edit(codes, bank.centres, protos)
            scores = dm.scores_from_head(dm.head(self.states[i : i + self.batch], edit), item_targets, reps)
            groups = None
            if self.sums is not None and bank.has_history_groups():
                groups = nearest_history_groups(self.sums[i : i + self.batch], bank.history_centres)
            bias = bank.item_bias(protos, codes, groups)
            metrics.update(target_ranks(scores if bias is None else scores + bias, tgt))
            if refine:
                bank.refine(codes, protos)
                bank.observe(protos, tgt)
        return metrics.compute()["ndcg@10"]


def choose_group_bias(
    model: PersonaModel, probe: ValidProbe, train_assignment: Tensor, train_targets: np.ndarray, tc: TrainConfig
) -> GroupBias:
    """β, α, γ of the group bias with the best validation NDCG@10 (β = 0 included: the bias is used only if it wins).

    Each prototype starts from its training members' decayed next-item counts (in time order) and keeps counting
    through the validation period after scoring each batch, as it will live. Leaves ``model``'s bank counts at the
    training period's under the chosen decay and its config at the choice.
    """
    cfg = model.cfg
    targets = torch.from_numpy(train_targets)
    choices: list[GroupBias] = []
    for decay in tc.group_bias_decays:
        counts = torch.zeros_like(model.bank.next_items)
        count_next_items(counts, train_assignment, targets, decay)
        model.bank.next_items.copy_(counts)
        cfg.group_bias_decay = decay
        for smoothing in tc.group_bias_smoothings:
            cfg.group_bias_smoothing = smoothing
            for weight in sorted({0.0, *tc.group_bias_weights}):
                if weight == 0.0 and choices:
                    continue  # β = 0 does not depend on α or γ
                cfg.group_bias_weight = weight
                score = probe.ndcg10(model, refine=True)
                log.info("group bias: β=%.2f α=%.2f γ=%.4f valid NDCG@10 %.4f", weight, smoothing, decay, score)
                choices.append(GroupBias(weight, smoothing, decay, score))
    chosen = max(choices, key=lambda c: c.score)  # the first of equals: β = 0 unless a bias helps
    chosen.apply(cfg)
    counts = torch.zeros_like(model.bank.next_items)
    count_next_items(counts, train_assignment, targets, chosen.decay)
    model.bank.next_items.copy_(counts)
    return chosen


@dataclass
class FineGroups:
    """The fine groups chosen on validation (``ModelConfig.fine_groups``): their centres [K2, L, d], their members'
    next-item counts [K2, N] so far, and the settings with their validation NDCG@10 (``score``; ``baseline``: the
    model without them)."""

    centres: Tensor
    counts: Tensor
    temperature: float
    weight: float
    smoothing: float
    score: float
    baseline: float

    def add(self, codes: Tensor, targets: np.ndarray) -> None:
        """Count the next items ``targets`` [M] of sessions with ``codes`` [M, L, d] into their nearest groups."""
        nearest = fine_nearest(codes, self.centres)
        self.counts.index_put_((nearest, torch.from_numpy(targets)), torch.ones(len(targets)), accumulate=True)

    def distributions(self) -> Tensor:
        """Each group's next-item distribution [K2, N] (a group without members: zeros, no bias)."""
        return next_item_distributions(self.counts)

    def settings(self) -> str:
        """The chosen settings as ``persona train`` prints them."""
        return f"K2={self.centres.shape[0]}, τ2={self.temperature:g}, β2={self.weight:g}, α2={self.smoothing:g}"

    def as_dict(self) -> dict[str, float]:
        return {
            "groups": int(self.centres.shape[0]),
            "temperature": self.temperature,
            "weight": self.weight,
            "smoothing": self.smoothing,
            "valid_ndcg@10": self.score,
            "valid_ndcg@10_without": self.baseline,
        }


def _fine_settings(cfg: ModelConfig) -> tuple[float, float, float]:
    """The fine groups' τ2, β2, α2 as set now (for the log)."""
    return cfg.fine_temperature, cfg.fine_bias_weight, cfg.fine_bias_smoothing


#: Fine groups × items the bank may hold (float32): 64 MB. Larger catalogues get fewer groups, or none.
FINE_CELLS = 1 << 24


@torch.no_grad()
def choose_fine_groups(
    model: PersonaModel, probe: ValidProbe, train_codes: Tensor, train_targets: np.ndarray, tc: TrainConfig
) -> FineGroups | None:
    """K2, τ2, β2 and α2 of the fine groups with the best validation NDCG@10 of Persona as it will serve (prototype
    mode, the group bias as chosen, the bank refined and counting through validation); ``None`` (the model keeps
    none) unless some setting beats the model without them. Each K2's groups are k-means of the training codes, with
    their members' next items of the training period. Leaves ``model``'s config and bank at the choice."""
    cfg, bank = model.cfg, model.bank
    cfg.fine_groups, cfg.fine_bias_weight = 0, 0.0
    baseline = probe.ndcg10(model, refine=True)
    best: FineGroups | None = None
    for k2 in tc.fine_group_counts:
        if k2 > len(train_codes) or k2 * cfg.n_items > FINE_CELLS:
            log.info("fine groups: K2=%d skipped (%d training sessions, %d items)", k2, len(train_codes), cfg.n_items)
            continue
        grouping = PrototypeBank(dataclasses.replace(cfg, n_prototypes=k2))
        grouping.fit(train_codes, seed=tc.seed)
        fine = FineGroups(grouping.centres.clone(), torch.zeros(k2, cfg.n_items), 0.0, 0.0, 1.0, 0.0, baseline)
        fine.add(train_codes, train_targets)
        bank.fine_centres, bank.fine_items = fine.centres, fine.distributions()
        cfg.fine_groups = k2
        for temperature, weight, smoothing in itertools.product(
            tc.fine_temperatures, tc.fine_bias_weights, tc.fine_bias_smoothings
        ):
            cfg.fine_temperature, cfg.fine_bias_weight, cfg.fine_bias_smoothing = temperature, weight, smoothing
            score = probe.ndcg10(model, refine=True)
            log.info("fine groups: K2=%d τ2=%.2f β2=%.2f α2=%.1f valid NDCG@10 %.4f", k2, *_fine_settings(cfg), score)
            if score > (baseline if best is None else best.score):
                best = dataclasses.replace(fine, temperature=temperature, weight=weight, smoothing=smoothing)
                best.score = score
    if best is None:
        cfg.fine_groups, cfg.fine_bias_weight = 0, 0.0
        bank.fine_centres = torch.zeros(0, cfg.n_edit_layers, cfg.code_dim)
        bank.fine_items = torch.zeros(0, cfg.n_items)
        return None
    cfg.fine_groups, cfg.fine_temperature = best.centres.shape[0], best.temperature
    cfg.fine_bias_weight, cfg.fine_bias_smoothing = best.weight, best.smoothing
    bank.fine_centres, bank.fine_items = best.centres, best.distributions()
    return best


#: The history groups' cap: at most one group per this many users of the training period (more groups than that
#: fit validation's noise: docs/results.md, "Groups keyed by the whole window").
HISTORY_USERS_PER_GROUP = 8


@dataclass
class HistoryGroups:
    """The history groups chosen on validation (``ModelConfig.history_groups``): their unit centres [G, D] in
    item-embedding space, their members' decayed next-item counts [G, N] so far, and the settings with their
    validation NDCG@10 (``score``; ``baseline``: the model without them)."""

    centres: Tensor
    counts: Tensor
    weight: float
    smoothing: float
    decay: float
    score: float
    baseline: float

    def groups_of(self, model: PersonaModel, examples: Examples) -> Tensor:
        """The nearest group [M] of each example's window."""
        return nearest_history_groups(example_window_sums(model, examples), self.centres)

    def add(self, groups: Tensor, targets: np.ndarray) -> None:
        """Count the next items ``targets`` [M] of sessions in ``groups`` [M], in order (γ3 per member event)."""
        count_next_items(self.counts, groups, torch.from_numpy(targets), self.decay)

    def distributions(self) -> Tensor:
        """Each group's next-item distribution [G, N] float32 (a group without members: zeros, no bias)."""
        return next_item_distributions(self.counts).float()

    def settings(self) -> str:
        """The chosen settings as ``persona train`` prints them."""
        return f"G={self.centres.shape[0]}, γ3={self.decay:g}, β3={self.weight:g}, α3={self.smoothing:g}"

    def as_dict(self) -> dict[str, float]:
        return {
            "groups": int(self.centres.shape[0]),
            "weight": self.weight,
            "smoothing": self.smoothing,
            "decay": self.decay,
            "valid_ndcg@10": self.score,
            "valid_ndcg@10_without": self.baseline,
        }


@torch.no_grad()
def example_window_sums(model: PersonaModel, examples: Examples, batch: int = 4096) -> Tensor:
    """The item-embedding sums [M, D] of the examples' windows (:func:`recsys.model.window_sums`), in batches."""
    items = model.device_model.items.weight.detach()
    parts = [
        window_sums(items, torch.from_numpy(examples.histories[i : i + batch])) for i in range(0, len(examples), batch)
    ]
    return torch.cat(parts) if parts else torch.zeros(0, items.shape[1], dtype=torch.float64)


@torch.no_grad()
def spherical_kmeans(keys: Tensor, k: int, *, seed: int = 0, rounds: int = 25) -> Tensor:
    """Unit centres [k, D] of k-means by cosine on unit ``keys`` [M, D], started at k distinct random keys."""
    g = torch.Generator().manual_seed(seed)
    centres = keys[torch.randperm(keys.shape[0], generator=g)[:k]].clone()
    for _ in range(rounds):
        assign = (keys @ centres.T).argmax(1)
        sums = torch.zeros_like(centres).index_add_(0, assign, keys)
        moved = torch.nn.functional.normalize(sums, dim=1)
        centres = torch.where(torch.bincount(assign, minlength=k).unsqueeze(1) > 0, moved, centres)
    return centres


@torch.no_grad()
def choose_history_groups(
    model: PersonaModel, probe: ValidProbe, train: Examples, tc: TrainConfig
) -> HistoryGroups | None:
    """G, γ3, β3 and α3 of the history groups with the best validation NDCG@10 of Persona as it will serve (prototype
    mode, the group bias and fine groups as chosen, the bank refined and counting through validation); ``None`` (the
    model keeps none) unless some setting beats the model without them. Each G's groups are spherical k-means of the
    training windows' keys, with their members' next items of the training period, fixed through validation as they
    will be through the test period. Leaves ``model``'s config and bank at the choice."""
    cfg, bank = model.cfg, model.bank
    cfg.history_groups, cfg.history_bias_weight = 0, 0.0
    best: HistoryGroups | None = None
    if not tc.history_group_counts:  # none to try (``--history-groups 0``)
        _without_history_groups(model)
        return None
    baseline = probe.ndcg10(model, refine=True)
    sums = example_window_sums(model, train)
    keys = torch.nn.functional.normalize(sums, dim=1)
    users = int(np.unique(train.users).size)
    for g in tc.history_group_counts:
        if g * HISTORY_USERS_PER_GROUP > users or g * cfg.n_items > FINE_CELLS:
            log.info("history groups: G=%d skipped (%d training users, %d items)", g, users, cfg.n_items)
            continue
        centres = spherical_kmeans(keys, g, seed=tc.seed).float()  # as the bundle holds them
        members = nearest_history_groups(sums, centres)
        bank.history_centres, cfg.history_groups = centres, g
        for decay in tc.history_bias_decays:
            counts = torch.zeros(g, cfg.n_items, dtype=torch.float64)
            history = HistoryGroups(centres, counts, 0.0, 1.0, decay, 0.0, baseline)
            history.add(members, train.targets)
            bank.history_items = history.distributions()
            for weight, smoothing in itertools.product(tc.history_bias_weights, tc.history_bias_smoothings):
                cfg.history_bias_weight, cfg.history_bias_smoothing = weight, smoothing
                score = probe.ndcg10(model, refine=True)
                log.info(
                    "history groups: G=%d γ3=%.4f β3=%.2f α3=%.1f valid NDCG@10 %.4f",
                    g,
                    decay,
                    weight,
                    smoothing,
                    score,
                )
                if score > (baseline if best is None else best.score):
                    best = dataclasses.replace(history, weight=weight, smoothing=smoothing, score=score)
    if best is None:
        _without_history_groups(model)
        return None
    cfg.history_groups, cfg.history_bias_decay = best.centres.shape[0], best.decay
    cfg.history_bias_weight, cfg.history_bias_smoothing = best.weight, best.smoothing
    bank.history_centres, bank.history_items = best.centres, best.distributions()
    return best


def _without_history_groups(model: PersonaModel) -> None:
    """Leave ``model`` without history groups (its config's and its bank's)."""
    cfg, bank = model.cfg, model.bank
    cfg.history_groups, cfg.history_bias_weight = 0, 0.0
    bank.history_centres, bank.history_items = torch.zeros(0, cfg.dim), torch.zeros(0, cfg.n_items)


@torch.no_grad()
def _choose_repeat_gate(model: PersonaModel, split: Split, tc: TrainConfig, stage: StageLog) -> None:
    """Set a mixture form's p(repeat) to the value of ``tc.repeat_gates`` that scores best on validation (the
    first among equals; the initial value is kept when no candidate beats the stage's best)."""
    part = model.device_model.repeat
    assert part is not None
    bias = part.gate.bias
    best, best_bias = stage.best_ndcg10, float(bias[0])
    scores = {}
    for p in tc.repeat_gates:
        bias.fill_(math.log(p / (1.0 - p)))
        scores[p] = valid_ndcg(BaseMethod(_eval(model)), split.valid, tc)
        if scores[p] > best:
            best, best_bias = scores[p], float(bias[0])
    bias.fill_(best_bias)
    stage.best_ndcg10 = best
    log.info(
        "repeat part: p(repeat) %.2f (validation NDCG@10 by p: %s)",
        1.0 / (1.0 + math.exp(-best_bias)),
        {p: round(v, 4) for p, v in scores.items()},
    )


@torch.inference_mode()
def _head_states(model: PersonaModel, examples: Examples, batch: int = 2048) -> Tensor:
    """The frozen base model's head outputs [M, D] of every example (the repeat part's input)."""
    model.eval()
    dm = model.device_model
    parts = [
        dm.head(dm.encode(torch.from_numpy(examples.histories[i : i + batch]))) for i in range(0, len(examples), batch)
    ]
    return torch.cat(parts)


def train_repeat_part(
    model: PersonaModel, split: Split, tc: TrainConfig, *, base_score: float, progress: bool
) -> StageLog | None:
    """Train the device model's repeat part on the frozen base model; keep it only if it wins on validation.

    The base model is frozen, so its head outputs are computed once and the part trains on them (one small MLP per
    epoch instead of the encoder). If its best validation NDCG@10 does not exceed ``base_score`` (the base model's
    without it), the part is removed (``repeat_size`` 0): a model for data without re-consumption stays as it was.
    """
    dm = model.device_model
    part = dm.repeat
    if part is None:
        return None
    if split.train.repeats is None or split.valid.repeats is None:
        raise ValueError("the model has a repeat part but the split has no item counts (make_split repeat_size)")
    repeat_share = float((split.valid.repeats[:, :, 0] == split.valid.targets[:, None]).any(1).mean())
    if repeat_share == 0.0:
        # no validation target is among its session's counted items (nobody re-consumes): the part can only add
        # to items that are never the answer, so it cannot win; skip its training
        dm.repeat = None
        model.cfg.repeat_size = 0
        log.info("repeat part: no validation target repeats an earlier item; left out without training")
        return None
    states = _head_states(model, split.train)
    for p in part.parameters():
        p.requires_grad_(True)

    def repeat_loss(b: Batch) -> Tensor:
        targets = dm.item_targets().detach()
        return cross_entropy(dm.scores_from_head(states[b.rows], targets, b.repeats), b.targets)

    if part.mixture:
        # A mixture form learns its repeat distribution P_r by P_r's own likelihood, on the training examples whose
        # target is among the session's entries, and takes p(repeat) from validation (tc.repeat_gates; the gate
        # keeps its form, its weights on the state at 0). Trained through the mixture instead, on the frozen base
        # model's own training examples, where its explore softmax is sharper than on later data, the part learned
        # to trust exploring more than validation wants (synthetic repeat 0.5, seed 1: validation NDCG@10 0.4414
        # at initialisation, 0.417-0.422 after each of 5 epochs; docs/results.md).
        part.gate.requires_grad_(False)

        def likelihood(b: Batch) -> Tensor:
            assert b.repeats is not None
            items, real, _, log_p, _ = part.parts(states[b.rows], dm.item_targets().detach(), b.repeats)
            hit = (items == b.targets[:, None]) & real  # at most one entry per row: entries are distinct items
            return -(log_p * hit).sum() / hit.sum().clamp(min=1)

        repeat_loss = likelihood

    def repeat_modes() -> None:
        model.eval()
        part.train()

    stage = fit_stage(
        "repeat",
        part,
        repeat_loss,
        lambda: valid_ndcg(BaseMethod(_eval(model)), split.valid, tc),
        split.train,
        tc,
        tc.repeat_epochs,
        set_modes=repeat_modes,
        progress=progress,
    )
    for p in part.parameters():
        p.requires_grad_(False)
    if part.mixture:
        _choose_repeat_gate(model, split, tc, stage)
    log.info("repeat part: valid NDCG@10 %.4f with it, %.4f without", stage.best_ndcg10, base_score)
    if stage.best_ndcg10 <= base_score:
        dm.repeat = None
        model.cfg.repeat_size = 0
        log.info("repeat part: no gain on validation, left out")
    return stage
