"""bench/strip_history_groups.py, whose copies docs/results.md compares: the same model without its history groups."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.strip_history_groups import strip_history_groups
from recsys.bundle import load_bundle
from recsys.online import OnlineModel
from recsys.switch import terms_on


def test_the_copy_is_the_same_model_without_its_history_groups(group_bias_bundle: Path, tmp_path: Path) -> None:
    assert strip_history_groups(group_bias_bundle, tmp_path / "copy") == 5
    full, copy = OnlineModel.load(group_bias_bundle), OnlineModel.load(tmp_path / "copy")
    assert full.model.bank.has_history_groups() and not copy.model.bank.has_history_groups()
    kept = load_bundle(tmp_path / "copy").tensors["model"]
    original = load_bundle(group_bias_bundle).tensors["model"]
    assert set(original) - set(kept) == {"bank.history_centres", "bank.history_items"}
    assert all(torch.equal(kept[k], original[k]) for k in kept)  # weights, prototypes, fine groups, switches
    hist = full.histories([list(full.vocab.ids)[5:25], list(full.vocab.ids)[40:47]])
    with_groups = full.edit(full.codes(hist), histories=hist)
    without = copy.edit(copy.codes(hist), histories=hist)
    assert without.groups is None and with_groups.groups is not None
    # windows passed as a callable (the API's edit export): built only for a model that reads them
    calls: list[int] = []

    def windows() -> torch.Tensor:
        calls.append(1)
        return hist

    assert copy.edit(copy.codes(hist), histories=windows).groups is None and calls == []
    lazy = full.edit(full.codes(hist), histories=windows)
    assert lazy.groups is not None and torch.equal(lazy.groups, with_groups.groups) and calls == [1]
    # the copy scores as the full model does with the history groups' bias taken out
    history = full._history
    assert history is not None and bool(terms_on(full.initial_bank.switches, with_groups.prototype)[1].all())
    expected = full.scores(hist, with_groups) - history.bias(with_groups.groups, with_groups.prototype)
    torch.testing.assert_close(copy.scores(hist, without)[:, 2:], expected[:, 2:], atol=1e-4, rtol=1e-5)
    with pytest.raises(SystemExit, match="no history groups"):
        strip_history_groups(tmp_path / "copy", tmp_path / "again")
