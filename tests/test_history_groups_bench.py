"""The pieces of bench/history_groups.py whose figures docs/results.md reports: the key, the groups' term (the
prototypes' own bias form), counting after scoring, and validation scored as training scored it."""

from __future__ import annotations

import numpy as np
import torch

from bench.history_groups import GroupTerm, before_validation, history_keys
from recsys.model import PersonaModel, count_next_items, fine_nearest, group_bias
from recsys.splits import Examples, Split
from recsys.switch import neutral_switches
from recsys.train import example_codes
from recsys.vocab import ItemVocab
from tests.test_model import histories, small_cfg


def _examples(h: torch.Tensor, seed: int) -> Examples:
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(2, 60, (h.shape[0],), generator=g).numpy()
    n = h.shape[0]
    return Examples(h.numpy(), targets, np.arange(n), np.arange(n, dtype=np.float64))


def test_the_key_is_the_normalised_mean_embedding_of_the_window_items_only() -> None:
    torch.manual_seed(0)
    model = PersonaModel(small_cfg()).eval()
    h = torch.full((1, 12), ItemVocab.PAD)
    h[0, -2:] = torch.tensor([7, 9])
    key = history_keys(model, _examples(h, 0))
    table = model.device_model.items.weight.detach()
    expected = torch.nn.functional.normalize((table[7] + table[9]).unsqueeze(0), dim=1)
    assert torch.allclose(key, expected, atol=1e-6)
    recent = history_keys(model, _examples(h, 0), recent=1)  # the last item's half appended
    assert torch.allclose(recent[0, 16:] * 2**0.5, torch.nn.functional.normalize(table[9], dim=0), atol=1e-6)


def test_the_log_linear_term_is_the_prototypes_group_bias() -> None:
    cfg = small_cfg(group_bias_weight=0.5, group_bias_smoothing=3.0)
    counts = torch.rand(4, cfg.n_items, dtype=torch.float64) * (torch.rand(4, cfg.n_items) > 0.7)
    groups = torch.tensor([2, 0, 3])
    scores = torch.randn(3, cfg.n_items)
    expected = group_bias(counts, groups, cfg)
    assert expected is not None
    got = GroupTerm().add(scores, counts[groups], 0.5, 3.0)
    assert torch.allclose(got, scores + expected.float(), atol=1e-6)


def test_each_batch_is_scored_before_its_next_items_are_counted() -> None:
    row = [0.0, 0.0, 3.0, 2.0, 1.0, 0.5]  # items 0 and 1 are PAD and UNK; the target, item 4, ranks third
    scores = [torch.tensor([row, row])]
    groups, targets = torch.tensor([1, 1]), torch.tensor([4, 4])
    counts = torch.zeros(2, 6, dtype=torch.float64)
    first = GroupTerm().ndcg10(scores, groups, targets, counts, 2.0, 1.0, 1.0)
    assert first.tolist() == [0.5, 0.5]  # 1 / log2(2 + 2): no counts yet, not even the batch's own
    assert counts[1].tolist() == [0.0, 0.0, 0.0, 0.0, 2.0, 0.0] and counts[0].sum() == 0
    again = GroupTerm().ndcg10(scores, groups, targets, counts.clone(), 2.0, 1.0, 1.0)
    assert again.tolist() == [1.0, 1.0]  # 2 · log1p(2 / (1 · 1/3)) = 3.9 lifts item 4 to the top
    frozen = torch.zeros(2, 6, dtype=torch.float64)
    GroupTerm(live=False).ndcg10(scores, groups, targets, frozen, 2.0, 1.0, 1.0)
    assert frozen.sum() == 0


def test_before_validation_the_bank_holds_the_training_period_alone() -> None:
    torch.manual_seed(0)
    cfg = small_cfg(group_bias_weight=1.0, group_bias_decay=0.9, fine_groups=2, history_groups=3)
    model = PersonaModel(cfg).eval()
    with torch.no_grad():
        model.bank.centres.normal_()
        model.bank.fine_centres.normal_()
        model.bank.history_centres.copy_(torch.nn.functional.normalize(torch.randn(3, cfg.dim), dim=1))
        train, valid = _examples(histories(40, cfg, seed=1), 1), _examples(histories(20, cfg, seed=2), 2)
        split = Split("time-shift", ItemVocab(ids=[]), train, valid, valid, np.zeros(cfg.n_items, np.int64), [])
        model.bank.next_items.fill_(5.0)  # a saved bundle: it has counted validation too
        model.bank.fine_items.fill_(0.5)
        model.bank.history_items.fill_(0.5)
        model.bank.switches.fill_(-1.0)
        earlier = before_validation(model, split)
        codes = example_codes(model, train)
        expected = torch.zeros_like(model.bank.next_items)
        count_next_items(expected, model.bank.assign(codes), torch.from_numpy(train.targets), 0.9)
        fine = torch.zeros(2, cfg.n_items)
        for group, target in zip(fine_nearest(codes, model.bank.fine_centres).tolist(), train.targets, strict=True):
            fine[group, target] += 1.0
        keys = history_keys(model, train)  # unit mean embeddings: their nearest centre is the groups'
        history = torch.zeros(3, cfg.n_items)
        for group, target in zip((keys @ model.bank.history_centres.T).argmax(1).tolist(), train.targets, strict=True):
            history[group, target] += 1.0
    assert torch.equal(earlier.bank.next_items, expected)
    assert torch.allclose(earlier.bank.fine_items, fine / fine.sum(1, keepdim=True).clamp(min=1.0))
    assert torch.allclose(earlier.bank.history_items, history / history.sum(1, keepdim=True).clamp(min=1.0))
    assert torch.equal(earlier.bank.switches, neutral_switches(cfg.n_prototypes))
    assert float(model.bank.next_items[0, 0]) == 5.0 and float(model.bank.switches[0, 0]) == -1.0  # untouched
