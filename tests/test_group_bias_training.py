"""Training chooses the prototypes' group bias on validation with the settings it tries (METHOD.md §3b)."""

from __future__ import annotations

import copy

import pytest
import torch

from recsys.data import load_interactions
from recsys.model import ModelConfig, count_next_items
from recsys.splits import Split, k_core, make_split
from recsys.train import TrainConfig, ValidProbe, train_persona
from streaming.bench import TINY_SOURCE


def _split() -> Split:
    df = k_core(load_interactions(TINY_SOURCE), 2, 2)
    return make_split(df, "time-shift", max_len=20, window_stride=10)


def test_the_trained_bank_reads_the_models_settings_and_the_choice_sees_each_weight() -> None:
    split = _split()
    cfg = ModelConfig(n_items=split.vocab.size, dim=16, code_dim=8, max_len=20)
    tc = TrainConfig(epochs=1, adapter_epochs=1, proto_rounds=1, proto_epochs=1, k_candidates=(4, 8))
    result = train_persona(split, cfg, tc, progress=False)
    model = result.model
    assert model.bank.cfg is model.cfg  # a bank restored from a copy must not keep a stale β
    assert result.group_bias.weight == model.cfg.group_bias_weight
    # Each β tried is really scored with that β (the probe reads the model's settings, not a copy's).
    probe = ValidProbe.build(model, split.valid, with_sums=True)
    assignment = model.bank.assign(model.codes(torch.from_numpy(split.train.histories)))
    count_next_items(model.bank.next_items, assignment, torch.from_numpy(split.train.targets), 1.0)
    scores = {}
    for weight in (0.0, 4.0):
        model.cfg.group_bias_weight = weight
        scores[weight] = probe.ndcg10(model, refine=True)
    assert scores[0.0] != scores[4.0]


def test_fine_groups_are_kept_only_if_they_win_and_count_both_periods() -> None:
    """Training keeps fine groups only when some setting beats the model without them on validation; the kept groups'
    distributions are their nearest members' next items over the training and validation periods."""
    from recsys.train import choose_fine_groups, example_codes

    split = _split()
    cfg = ModelConfig(n_items=split.vocab.size, dim=16, code_dim=8, max_len=20)
    tc = TrainConfig(
        epochs=1, adapter_epochs=1, proto_rounds=1, proto_epochs=1, k_candidates=(4,), fine_group_counts=(8, 16)
    )
    result = train_persona(split, cfg, tc, progress=False)
    model, fine = result.model, result.fine_groups
    if fine is None:
        assert model.cfg.fine_groups == 0 and model.bank.fine_centres.shape[0] == 0
    else:
        assert fine.score > fine.baseline
        assert model.cfg.fine_groups == fine.centres.shape[0] == model.bank.fine_centres.shape[0]
        assert (model.cfg.fine_bias_weight, model.cfg.fine_temperature) == (fine.weight, fine.temperature)
        centres = model.bank.fine_centres.flatten(1)
        counts = torch.zeros(model.cfg.fine_groups, model.cfg.n_items)
        for examples in (split.train, split.valid):
            nearest = torch.cdist(example_codes(model, examples).flatten(1), centres).argmin(1)
            counts.index_put_((nearest, torch.from_numpy(examples.targets)), torch.ones(len(examples)), accumulate=True)
        expected = counts / counts.sum(1, keepdim=True).clamp(min=1.0)
        torch.testing.assert_close(model.bank.fine_items, expected)
    # no setting that can win (β2 = 0 adds nothing): none kept, and the model is left without them
    probe = ValidProbe.build(model, split.valid, with_sums=True)
    none = TrainConfig(fine_group_counts=(8,), fine_bias_weights=(0.0,))
    train_codes = example_codes(model, split.train)
    assert choose_fine_groups(model, probe, train_codes, split.train.targets, none) is None
    assert model.cfg.fine_groups == 0 and model.cfg.fine_bias_weight == 0.0
    assert model.bank.fine_centres.shape[0] == 0 and model.bank.fine_items.shape[0] == 0


def test_history_groups_are_kept_only_if_they_win_capped_by_users_and_count_both_periods() -> None:
    """Training keeps history groups only when some setting beats the model without them on validation, tries no more
    than one group per HISTORY_USERS_PER_GROUP training users, and the kept groups' distributions are their members'
    decayed next items over the training and validation periods, in time order."""
    import numpy as np

    from recsys.train import HISTORY_USERS_PER_GROUP, choose_history_groups, example_window_sums

    split = _split()
    users = int(np.unique(split.train.users).size)
    too_many = users // HISTORY_USERS_PER_GROUP + 1
    cfg = ModelConfig(n_items=split.vocab.size, dim=16, code_dim=8, max_len=20)
    tc = TrainConfig(
        epochs=1,
        adapter_epochs=1,
        proto_rounds=1,
        proto_epochs=1,
        k_candidates=(4,),
        fine_group_counts=(),
        history_group_counts=(4, 8, too_many),
        history_bias_weights=(1.0, 4.0),
    )
    result = train_persona(split, cfg, tc, progress=False)
    model, history = result.model, result.history_groups
    assert history is not None  # on this stream some β3 wins on validation (so the checks below run)
    assert history.score > history.baseline and model.cfg.history_groups in (4, 8)  # never the count above the cap
    assert model.cfg.history_groups == history.centres.shape[0] == model.bank.history_centres.shape[0]
    assert (model.cfg.history_bias_weight, model.cfg.history_bias_decay) == (history.weight, history.decay)
    assert torch.allclose(model.bank.history_centres.norm(dim=1), torch.ones(model.cfg.history_groups))
    counts = torch.zeros(model.cfg.history_groups, model.cfg.n_items, dtype=torch.float64)
    for examples in (split.train, split.valid):
        sums = example_window_sums(model, examples)
        nearest = (torch.nn.functional.normalize(sums, dim=1) @ model.bank.history_centres.double().T).argmax(1)
        count_next_items(counts, nearest, torch.from_numpy(examples.targets), history.decay)
    expected = (counts / counts.sum(1, keepdim=True).clamp(min=1.0)).float()
    torch.testing.assert_close(model.bank.history_items, expected)
    # a probe built without the windows' keys cannot score a model with history groups: refused, not scored without
    with pytest.raises(ValueError, match="with_sums"):
        ValidProbe.build(model, split.valid).ndcg10(model, refine=True)
    # no setting that can win (β3 = 0 adds nothing), or none to try (--history-groups 0): none kept, and the model
    # is left without them
    for none in (
        TrainConfig(history_group_counts=(4,), history_bias_weights=(0.0,)),
        TrainConfig(history_group_counts=()),
    ):
        trained = copy.deepcopy(model)
        probe = ValidProbe.build(trained, split.valid, with_sums=bool(none.history_group_counts))
        assert choose_history_groups(trained, probe, split.train, none) is None
        assert trained.cfg.history_groups == 0 and trained.cfg.history_bias_weight == 0.0
        assert trained.bank.history_centres.shape[0] == 0 and trained.bank.history_items.shape[0] == 0
        assert trained.history_groups(torch.from_numpy(split.valid.histories[:3])) is None
