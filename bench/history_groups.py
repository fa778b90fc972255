"""Groups keyed by a session's whole history, with live next-item counts: do they carry a group's drift?

Run on demand (docs/results.md, "A stream with group-level drift"); a research script, not a method:

    PYTHONPATH=. .venv/bin/python bench/history_groups.py runs/q/c20-s0

The prototypes and the fine groups are keyed by the session's code, a function of its last items (its current
interest). On ``synthetic:...,cohorts=N`` a group's drift belongs to users who share a walk, and what tells a
cohort is the whole history (its home clusters). Here each session's key is the mean of the device model's own
item embeddings over its whole history window, L2-normalised; k-means on the training period's keys gives G
history groups; each group counts its members' next items, decayed by γ per group event, through the training
period and then live, after each batch is scored (as the consumer counts the prototypes'). Their bias
``β · log1p(n_gi / (α n̄_g))`` (the prototypes' form, ``recsys.model.group_bias``) is added to the bundle's Persona
scores. G, γ, α and β (β = 0 included) are chosen on validation NDCG@10; the test period is evaluated once, with
paired bootstrap CIs against Persona and the base model.

Validation is scored as ``persona train`` chose its settings: from the bundle's model before it counted the
validation period (:func:`before_validation`), counting it live; the test period from the saved bundle, as
``persona evaluate`` does.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from recsys.bootstrap import paired_ratio
from recsys.data import synthetic_config
from recsys.evaluate import BaseMethod, PersonaMethod, _batches, evaluate_examples, score_batch
from recsys.metrics import per_example_ndcg, target_ranks
from recsys.model import PersonaModel, count_next_items, fine_nearest, next_item_distributions
from recsys.pipeline import load_trained, prepare
from recsys.splits import Examples, Split
from recsys.switch import neutral_switches
from recsys.synthetic import draw
from recsys.train import HistoryGroups, example_codes, spherical_kmeans
from recsys.vocab import ItemVocab

BATCH = 512


def history_keys(model: PersonaModel, examples: Examples, recent: int = 0) -> Tensor:
    """[M, D]: the L2-normalised mean item embedding of each example's history window; with ``recent`` > 0, that of
    its last ``recent`` items appended ([M, 2D], halves weighted equally): where the session is now as well."""
    whole = _mean_keys(model, examples.histories)
    if not recent:
        return whole
    return torch.cat([whole, _mean_keys(model, examples.histories[:, -recent:])], 1) / 2**0.5


def _mean_keys(model: PersonaModel, histories: np.ndarray) -> Tensor:
    table = model.device_model.items.weight.detach()
    hist = torch.from_numpy(np.ascontiguousarray(histories))
    mask = (hist != ItemVocab.PAD).unsqueeze(-1).float()
    out = []
    for start in range(0, hist.shape[0], 4096):
        h, m = hist[start : start + 4096], mask[start : start + 4096]
        mean = (table[h] * m).sum(1) / m.sum(1).clamp(min=1.0)
        out.append(torch.nn.functional.normalize(mean, dim=1))
    return torch.cat(out)


def history_assignment(keys: dict[str, Tensor], k: int) -> dict[str, Tensor]:
    """Each period's examples in their nearest of k history groups (k-means on the training period's keys, as
    ``persona train`` fits the product's history groups)."""
    centres = spherical_kmeans(keys["train"], k)
    return {name: (v @ centres.T).argmax(1) for name, v in keys.items()}


def cohort_assignment(
    source: str, user_ids: list[str], splits: dict[str, Examples], vocab: ItemVocab, *, by_cluster: bool
) -> tuple[dict[str, Tensor], set[int]]:
    """Each period's examples under their user's cohort (the generator's shared walk), and the cohorts seen."""
    d = draw(synthetic_config(source))
    walks: dict[tuple[int, int], int] = {}
    cohort = [walks.setdefault((int(a), int(b)), len(walks)) for a, b in zip(d.perm_a, d.perm_b, strict=True)]
    of_user = torch.tensor([cohort[int(u.removeprefix("u"))] for u in user_ids])
    if not by_cluster:
        return {name: of_user[torch.from_numpy(ex.users)] for name, ex in splits.items()}, set(walks.values())
    c = d.cfg.clusters
    of_index = torch.zeros(vocab.size, dtype=torch.long)  # PAD, UNK: cluster 0
    for item, cluster in zip(d.item_of_slot.ravel(), d.cluster_of_slot.ravel(), strict=True):
        if f"i{int(item)}" in vocab:
            of_index[vocab.index_of(f"i{int(item)}")] = int(cluster)
    out = {}
    for name, ex in splits.items():
        last = of_index[torch.from_numpy(ex.histories[:, -1])]
        out[name] = of_user[torch.from_numpy(ex.users)] * c + last
    return out, set(range(len(walks) * c))


def before_validation(model: PersonaModel, split: Split) -> PersonaModel:
    """A copy of the bundle's model as training chose its settings with, before it counted the validation period:
    the prototypes' next-item counts and the fine and history groups' distributions of the training period alone,
    and neutral switches. (A saved bundle has counted the validation period, so its Persona would score validation
    with each validation target already in its group's counts.)"""
    m = copy.deepcopy(model)
    bank, targets = m.bank, torch.from_numpy(split.train.targets)
    codes = example_codes(m, split.train)
    counts = torch.zeros_like(bank.next_items)
    count_next_items(counts, bank.assign(codes), targets, m.cfg.group_bias_decay)
    bank.next_items.copy_(counts)
    if m.cfg.fine_groups:
        fine = torch.zeros_like(bank.fine_items)
        fine.index_put_((fine_nearest(codes, bank.fine_centres), targets), torch.ones(len(targets)), accumulate=True)
        bank.fine_items.copy_(next_item_distributions(fine))
    if m.cfg.history_groups:
        counts = torch.zeros(bank.history_items.shape, dtype=torch.float64)
        history = HistoryGroups(bank.history_centres, counts, 0.0, 1.0, m.cfg.history_bias_decay, 0.0, 0.0)
        history.add(history.groups_of(m, split.train), split.train.targets)
        bank.history_items.copy_(history.distributions())
    bank.switches.copy_(neutral_switches(bank.switches.shape[0]))
    return m


def method_scores(method: object, examples: Examples) -> list[Tensor]:
    """The method's scores per batch of ``examples`` in time order (observing each batch after scoring it)."""
    out = []
    for hist, tgt, reps in _batches(examples, BATCH):
        out.append(score_batch(method, hist, reps).float())  # type: ignore[arg-type]
        method.observe(hist, tgt)  # type: ignore[attr-defined]
    return out


@dataclass(frozen=True)
class GroupTerm:
    """How the groups' counts enter the scores: the prototypes' log-linear bias, or a probability-space mixture
    ``(1 - β) p_model + β p_group``; counted live after each batch, or frozen."""

    mixture: bool = False
    live: bool = True

    def add(self, scores: Tensor, rows: Tensor, beta: float, alpha: float) -> Tensor:
        """``scores`` [B, N] with the term of the sessions' groups' counts ``rows`` [B, N]."""
        if not beta:
            return scores
        if self.mixture:  # the group's distribution, smoothed by α·0.001 per item
            smoothed = rows.float() + alpha * 1e-3
            p_group = smoothed / smoothed.sum(1, keepdim=True)
            return torch.log((1.0 - beta) * torch.softmax(scores, 1) + beta * p_group)
        mean = rows.mean(1, keepdim=True)
        scale = torch.where(mean > 0, 1.0 / (alpha * mean).clamp(min=1e-30), torch.zeros_like(mean))
        return scores + torch.log1p(rows * scale).float() * beta

    def ndcg10(
        self,
        scores: list[Tensor],
        groups: Tensor,
        targets: Tensor,
        counts: Tensor,
        beta: float,
        alpha: float,
        decay: float,
    ) -> np.ndarray:
        """Per-example NDCG@10 of ``scores`` (per batch of :data:`BATCH`, in time order) plus the groups' term, each
        batch scored before its next items are counted into ``counts`` [G, N] (in place; not at all when frozen)."""
        out = []
        for b, s in enumerate(scores):
            g, t = groups[b * BATCH : (b + 1) * BATCH], targets[b * BATCH : (b + 1) * BATCH]
            out.append(per_example_ndcg(target_ranks(self.add(s, counts[g], beta, alpha), t), 10).numpy())
            if self.live:
                count_next_items(counts, g, t, decay)
        return np.concatenate(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--groups", default="4,8,16,32,64,128", help="Comma-separated G candidates.")
    ap.add_argument("--decays", default="1,0.999,0.99,0.95", help="Comma-separated γ candidates.")
    ap.add_argument("--smoothings", default="1,3", help="Comma-separated α candidates.")
    ap.add_argument("--weights", default="0.25,0.5,1,2", help="Comma-separated β candidates (0 always tried).")
    ap.add_argument(
        "--oracle-cohorts",
        action="store_true",
        help="Group by the generator's own cohorts (a synthetic:...,cohorts=N bundle): the best any grouping can do.",
    )
    ap.add_argument(
        "--mixture",
        action="store_true",
        help="Mix in probability space, (1 - β) p_model + β p_group, instead of the log-linear bias (β < 1).",
    )
    ap.add_argument(
        "--by-cluster",
        action="store_true",
        help="With --oracle-cohorts: one group per (cohort, cluster of the session's last item).",
    )
    ap.add_argument("--recent", type=int, default=0, help="Key on the last R items as well as the whole window.")
    ap.add_argument(
        "--frozen",
        action="store_true",
        help="Count only the training period (and, for the test period, validation's): no live counting.",
    )
    args = ap.parse_args()
    term = GroupTerm(mixture=args.mixture, live=not args.frozen)
    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    trained = load_trained(args.bundle)
    model, cfg = trained.model.eval(), trained.model.cfg
    split = prepare(trained.spec, max_len=cfg.max_len, window_stride=cfg.stride, repeat_size=cfg.repeat_size).split
    valid_model = before_validation(model, split)
    valid_scores = method_scores(PersonaMethod(valid_model, "persona", "prototype", refine=True), split.valid)
    test_scores = method_scores(PersonaMethod(model, "persona", "prototype", refine=True), split.test)
    base_test = evaluate_examples(BaseMethod(model), split.test, batch_size=BATCH).ndcg10
    splits = {"train": split.train, "valid": split.valid, "test": split.test}
    keys = {name: history_keys(model, ex, args.recent) for name, ex in splits.items()}
    targets = {name: torch.from_numpy(ex.targets) for name, ex in splits.items()}
    print(f"{args.bundle}: scored in {time.perf_counter() - t0:.0f} s; N = {cfg.n_items}")

    floats = lambda text: [float(x) for x in text.split(",")]  # noqa: E731
    best: tuple[float, int, float, float, float] | None = None
    assignments: dict[int, dict[str, Tensor]] = {}
    base_valid = None
    oracle = (
        cohort_assignment(trained.spec.source, split.user_ids, splits, split.vocab, by_cluster=args.by_cluster)
        if args.oracle_cohorts
        else None
    )
    group_counts = [len(oracle[1])] if oracle else [int(x) for x in args.groups.split(",")]
    for k in group_counts:
        assign = assignments[k] = oracle[0] if oracle else history_assignment(keys, k)
        for decay in floats(args.decays):
            start = torch.zeros(k, cfg.n_items, dtype=torch.float64)
            count_next_items(start, assign["train"], targets["train"], decay)
            for alpha, beta in itertools.product(floats(args.smoothings), [0.0, *floats(args.weights)]):
                if beta == 0.0 and base_valid is not None:
                    continue
                score = float(
                    term.ndcg10(
                        valid_scores, assign["valid"], targets["valid"], start.clone(), beta, alpha, decay
                    ).mean()
                )
                if beta == 0.0:
                    base_valid = score
                print(f"G {k} γ {decay:g} α {alpha:g} β {beta:g}: valid NDCG@10 {score:.4f}")
                if best is None or score > best[0]:
                    best = (score, k, decay, alpha, beta)
    assert best is not None
    score, k, decay, alpha, beta = best
    print(
        f"chosen on validation: G {k} γ {decay:g} α {alpha:g} β {beta:g} ({score:.4f}, Persona alone {base_valid:.4f})"
    )
    assign = assignments[k]
    counts = torch.zeros(k, cfg.n_items, dtype=torch.float64)
    count_next_items(counts, assign["train"], targets["train"], decay)
    count_next_items(counts, assign["valid"], targets["valid"], decay)
    persona = term.ndcg10(test_scores, assign["test"], targets["test"], counts.clone(), 0.0, alpha, decay)
    grouped = term.ndcg10(test_scores, assign["test"], targets["test"], counts, beta, alpha, decay)
    print(
        f"test NDCG@10: base {base_test.mean():.4f}, Persona {persona.mean():.4f}, "
        f"+ history groups {grouped.mean():.4f}"
    )
    print(f"Persona / base {paired_ratio(persona, base_test)}")
    print(f"Persona + history groups / base {paired_ratio(grouped, base_test)}")
    print(f"Persona + history groups / Persona {paired_ratio(grouped, persona)}")


if __name__ == "__main__":
    main()
