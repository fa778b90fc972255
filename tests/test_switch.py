"""The online switches for the edit and the group terms (recsys.switch): their decayed sums, what they serve offline
(``persona evaluate``) and live (the consumer's check, the store, the API's edits), and where they start."""

from __future__ import annotations

import copy
import dataclasses
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import torch
from torch import Tensor

from persona.bank_rows import bank_from_rows
from persona.events import Event
from persona.ingest import Ingestor, model_work
from persona.models import ModelProvider
from persona.store import Store
from recsys.bundle import load_bundle
from recsys.errors import PersonaError
from recsys.evaluate import BaseMethod, PersonaMethod, warm_switches
from recsys.metrics import target_ranks
from recsys.model import PersonaModel
from recsys.online import OnlineModel
from recsys.pipeline import load_trained, prepare
from recsys.switch import (
    EDIT_GAIN,
    EVENTS,
    GROUP_GAIN,
    TermRanks,
    neutral_switches,
    stored_switches,
    switched_scores,
    switches_to_bytes,
    terms_on,
    update_switches,
)
from serving.ranking import _bank_from_rows
from tests.fixtures_model import _rewritten
from tests.test_model import histories, small_cfg

T0 = datetime(2026, 11, 1, tzinfo=UTC)


def test_each_prototype_keeps_decayed_sums_in_event_order() -> None:
    switches = neutral_switches(3)
    protos = torch.tensor([0, 1, -1, 1])
    update_switches(switches, protos, torch.tensor([-1.0, 2.0, 9.0, -1.0]), torch.tensor([0.5, 0.0, 9.0, 1.0]), 0.5)
    # prototype 1: its first event decays once (0.5) before the second is added; -1 counts nowhere
    assert switches[0].tolist() == [-1.0, 0.5, 1.0]
    assert switches[1].tolist() == [2.0 * 0.5 - 1.0, 0.0 * 0.5 + 1.0, 0.5 + 1.0]
    assert switches[2].tolist() == [0.0, 0.0, 0.0]
    # one batch or the same events in two: the same sums
    split = neutral_switches(3)
    update_switches(split, protos[:2], torch.tensor([-1.0, 2.0]), torch.tensor([0.5, 0.0]), 0.5)
    update_switches(split, protos[2:], torch.tensor([9.0, -1.0]), torch.tensor([9.0, 1.0]), 0.5)
    assert torch.equal(split, switches)


def test_a_term_is_on_while_its_sum_is_not_negative() -> None:
    switches = neutral_switches(3)
    switches[1, EDIT_GAIN] = -0.1
    switches[2, GROUP_GAIN] = -0.1
    edit_on, group_on = terms_on(switches, torch.tensor([0, 1, 2, -1]))
    assert edit_on.tolist() == [True, False, True, True]  # no events yet, or no prototype: on
    assert group_on.tolist() == [True, True, False, True]
    assert [t.tolist() for t in terms_on(None, torch.tensor([1]))] == [[True], [True]]


def test_term_ranks_serve_and_measure_each_term() -> None:
    ranks = TermRanks(torch.tensor([0, 0]), torch.tensor([1, 1]), torch.tensor([3, 3]), torch.tensor([4, 4]))
    yes, no = torch.tensor([True, True]), torch.tensor([False, False])
    assert ranks.served(yes, yes).tolist() == [0, 0]
    assert ranks.served(no, yes).tolist() == [1, 1]  # the base model with the group terms
    assert ranks.served(yes, no).tolist() == [3, 3]  # the edited model alone
    assert ranks.served(torch.tensor([False, True]), no).tolist() == [4, 3]
    edit_gain, group_gain = ranks.gains()
    assert edit_gain.tolist() == [1.0 - 0.5] * 2  # with the group terms: 1/1 - 1/2
    assert group_gain.tolist() == [1.0 - 0.25] * 2  # on the edited model: 1/1 - 1/4
    scores = torch.tensor([[0.0, 0.0, 3.0, 1.0]])  # columns 0 and 1: padding and unknown, never ranked
    bias = torch.tensor([[0.0, 0.0, 0.0, 5.0]])
    assert TermRanks.of(scores, scores, bias, torch.tensor([3])).edited_grouped.tolist() == [0]
    assert TermRanks.of(scores, scores, None, torch.tensor([3])).edited_grouped.tolist() == [1]


def _model_with_group_terms() -> PersonaModel:
    torch.manual_seed(0)
    cfg = small_cfg(group_bias_weight=1.0)
    model = PersonaModel(cfg).eval()
    with torch.no_grad():
        model.adapter.gen_weight.normal_(std=0.5)
        model.adapter.gen_bias.normal_(std=0.5)
        model.bank.centres.copy_(model.codes(histories(3, cfg, seed=1)))  # sessions spread over the prototypes
        model.bank.next_items.copy_(torch.rand(cfg.n_prototypes, cfg.n_items).pow(4) * 10)
    return model


@torch.no_grad()
def test_persona_serves_each_prototype_under_its_switches() -> None:
    model = _model_with_group_terms()
    h = histories(40, model.cfg)
    edit = model.session_edit(h, "prototype")
    assert len(edit.prototype.unique()) == 3  # every state below is served to someone
    neutral = PersonaMethod(model, "p", "prototype").score(h)
    assert torch.equal(neutral, model.score(h, edit))  # every term on: Persona as before the switches
    model.bank.switches[0, EDIT_GAIN] = -1.0  # prototype 0: the base model with its group terms
    model.bank.switches[1, GROUP_GAIN] = -1.0  # 1: the edited model alone
    model.bank.switches[2, [EDIT_GAIN, GROUP_GAIN]] = -1.0  # 2: the base model
    switched = PersonaMethod(model, "p", "prototype").score(h)
    base = BaseMethod(model).score(h)
    edited = model.device_model(h, edit)
    bias = model.bank.item_bias(edit.prototype, edit.codes)
    assert bias is not None
    expected = {0: base + bias, 1: edited, 2: base}
    for row, k in enumerate(edit.prototype.tolist()):
        assert torch.equal(switched[row], expected[k][row])
    assert not torch.equal(switched, neutral)


@torch.no_grad()
def test_refined_persona_updates_the_switches_after_scoring() -> None:
    model = _model_with_group_terms()
    h, targets = histories(30, model.cfg), torch.randint(2, model.cfg.n_items, (30,))
    method = PersonaMethod(model, "p", "prototype", refine=True)
    before = method.model.bank.switches.clone()
    method.score(h)
    edit = model.session_edit(h, "prototype")
    gains = TermRanks.of(*model.term_scores(h, edit), targets).gains()
    method.observe(h, targets)
    expected = before.clone()
    update_switches(expected, edit.prototype, *gains)
    assert torch.equal(method.model.bank.switches, expected)
    assert not torch.equal(expected, before)
    assert torch.equal(model.bank.switches, before)  # the method's own copy: the model stays as trained


@pytest.fixture(scope="session")
def switched_bundle(group_bias_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The group-bias bundle (4 prototypes) with prototype 0's edit off, 1's group terms off, 2's both, 3's neither:
    sums of ±1,000, which no test's few events can flip."""
    bundle = load_bundle(group_bias_bundle)
    model = dict(bundle.tensors["model"])
    switches = torch.zeros_like(model["bank.switches"])
    assert switches.shape[0] == 4
    switches[:, EDIT_GAIN] = torch.tensor([-1000.0, 1000.0, -1000.0, 1000.0])
    switches[:, GROUP_GAIN] = torch.tensor([1000.0, -1000.0, -1000.0, 1000.0])
    model["bank.switches"] = switches
    return _rewritten(bundle, model, bundle.documents["config"], tmp_path_factory.mktemp("switched-model"))


def _offline_terms(online: OnlineModel, seq: list[str]) -> tuple[list[int], list[int], TermRanks]:
    """Per prediction of ``seq`` (from its second item) under the bundle's bank: its prototype, its rank as served
    and its four term ranks, by recsys.model's definitions."""
    model = online.model
    protos, served, parts = [], [], []
    with torch.inference_mode():
        for i in range(1, len(seq)):
            hist = online.histories([seq[:i]])
            edit = model.edit_for(online.codes(hist), "prototype", hist)
            target = torch.tensor([online.index_of(seq[i])])
            terms = model.term_scores(hist, edit)
            on = terms_on(model.bank.switches, edit.prototype)
            served.append(int(target_ranks(switched_scores(*terms, *on), target)[0]))
            parts.append(TermRanks.of(*terms, target))
            protos.append(int(edit.prototype[0]))
    return protos, served, TermRanks(*(torch.cat(r) for r in zip(*parts, strict=True)))


@pytest.mark.parametrize(
    ("model_process", "score_budget"),
    # a budget of one score: the early half keeps no scores and the check scores one row at a time
    [(False, None), (True, None), (False, 1)],
)
def test_the_consumer_serves_under_the_switches_and_stores_their_update(
    store: Store,
    switched_bundle: Path,
    model_process: bool,
    score_budget: int | None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    if score_budget is not None:
        monkeypatch.setattr(model_work, "_SCORE_BUDGET", score_budget)
    models = ModelProvider(store, model_dir=switched_bundle)
    online = models.get()
    items = list(online.vocab.ids)
    seqs = {f"s{n}": [items[(7 * n + 3 * j) % len(items)] for j in range(8)] for n in range(12)}
    events = [
        Event(f"{sid}-{j}", sid, item, T0 + timedelta(seconds=10 * j + n))
        for j in range(8)
        for n, (sid, seq) in enumerate(seqs.items())
        for item in [seq[j]]
    ]
    ingestor = Ingestor(store, models, model_process=model_process)
    try:
        result = ingestor.apply(events)  # one batch: every prediction scored under the bundle's bank
    finally:
        ingestor.close()
    offline = {sid: _offline_terms(online, seq) for sid, seq in seqs.items()}
    protos = sorted({k for p, _s, _t in offline.values() for k in p})
    assert len(protos) >= 3, protos  # sessions under several switch states, so the checks below can fail
    served = [r for _p, s, _t in offline.values() for r in s]
    unswitched = [int(r) for _p, _s, t in offline.values() for r in t.edited_grouped]
    assert served != unswitched
    assert result.reciprocal_rank["persona"] == pytest.approx(sum(1 / (r + 1) for r in served))
    assert result.terms_on == (2, 2)  # the dashboard's gauge: the edit on for 1 and 3, the group terms for 0 and 3

    # the stored switches: the bundle's, plus each prediction's gains for its prototype
    rows = store.load_prototypes(online.version)
    stored = stored_switches([r.switches for r in rows], torch.zeros(4, 3, dtype=torch.float64))
    initial = online.initial_bank.switches
    assert initial is not None
    expected = initial.clone()
    for p, _s, terms in offline.values():  # sessions are independent: their order within a prototype barely matters
        update_switches(expected, torch.tensor(p), *terms.gains())
    assert torch.allclose(stored[:, EVENTS], expected[:, EVENTS], rtol=1e-3)
    assert torch.allclose(stored, expected, rtol=1e-3, atol=1e-3)
    assert not torch.equal(stored, initial)
    # read back as the next consumer and the API read the bank
    assert torch.equal(bank_from_rows(rows, online).switches, stored)
    assert torch.equal(_bank_from_rows(rows, online).switches, stored)
    # rows that do not fit the model: the consumer refuses them, the API ranks with the bundle's bank and says why
    misfit = [dataclasses.replace(r, switches=b"\0" * 8) for r in rows]
    with pytest.raises(PersonaError, match="unusable"):
        bank_from_rows(misfit, online)
    with caplog.at_level(logging.WARNING, logger="persona.serving"):
        assert _bank_from_rows(misfit, online) is online.initial_bank
    assert "using the bundle's bank" in caplog.text


def test_the_check_adds_the_group_terms_to_the_early_plain_scores_as_to_a_second_scoring(
    switched_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Predictions from stored states: the early half keeps the plain model's scores and the check adds the group
    terms to them; with a budget of one score it scores the catalogue again, a row at a time. Same ranks, same gains."""
    online = OnlineModel.load(switched_bundle)
    kept = model_work.warm_up(online, with_cache=False)  # half its predictions come from stored states
    monkeypatch.setattr(model_work, "_SCORE_BUDGET", 1)
    again = model_work.warm_up(online, with_cache=False)
    for name in ("persona", "base", "edit_gains", "group_gains"):
        assert torch.equal(getattr(kept, name), getattr(again, name)), name
    assert kept.edit_gains.abs().sum() > 0  # the plain model's grouped ranks differ from the edited ones


def test_a_ranking_request_scores_each_session_under_its_prototypes_switches(switched_bundle: Path) -> None:
    """What the API ranks with (OnlineModel.served_terms) against the offline definition, for a batch (torch) and
    a single row (the NumPy paths), and for banks where no row applies the edit or the group terms."""
    online = OnlineModel.load(switched_bundle)
    items = list(online.vocab.ids)
    hist = online.histories([[items[(5 * n + j) % len(items)] for j in range(6)] for n in range(20)])
    states, codes = online.user_states(hist), online.codes(hist)
    protos = online.assign(codes)
    assert set(protos.tolist()) == {0, 1, 2, 3}  # every switch state is served to someone
    all_off = dataclasses.replace(online.initial_bank, switches=online.initial_bank.switches * 0 - 1.0)
    edited, plain, bias = online.model.term_scores(hist, online.model.edit_for(codes, "prototype", hist))
    groups = online.history_groups(hist)
    assert groups is not None and len(set(groups.tolist())) > 1  # the history groups' bias differs between rows
    for bank in (online.initial_bank, all_off):
        assert bank.switches is not None
        expected = switched_scores(edited, plain, bias, *terms_on(bank.switches, protos))
        for rows in (list(range(20)), [int(protos.eq(0).nonzero()[0])], [int(protos.eq(1).nonzero()[0])]):
            sel = torch.tensor(rows)
            built: list[Tensor] = []  # the windows are built only when some row applies its group terms

            def windows(sel: Tensor = sel, built: list[Tensor] = built) -> Tensor:
                built.append(hist[sel])
                return built[-1]

            queries, group = online.served_terms(states[sel], codes[sel], protos[sel], bank, windows)
            got = online.scores_from_queries(queries, group)
            assert torch.allclose(got[:, 2:], expected[sel][:, 2:], atol=1e-4), (bank is all_off, rows)
            assert len(built) == int(bool(terms_on(bank.switches, protos[sel])[1].any())), (bank is all_off, rows)
    assert online.served_terms(states, codes, protos, all_off)[1] is None


def test_a_stored_row_without_switches_keeps_the_bundles_and_a_bad_one_is_refused() -> None:
    initial = neutral_switches(2)
    initial[1, EDIT_GAIN] = -3.0
    row = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    out = stored_switches([switches_to_bytes(row), None], initial)
    assert out[0].tolist() == [1.0, 2.0, 3.0] and out[1].tolist() == [-3.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="24"):
        stored_switches([b"\x00" * 8, None], initial)


def test_the_edit_a_device_downloads_is_zero_where_the_edit_is_off(switched_bundle: Path) -> None:
    online = OnlineModel.load(switched_bundle)
    items = list(online.vocab.ids)
    hist = online.histories([[items[(5 * n + j) % len(items)] for j in range(6)] for n in range(20)])
    codes = online.codes(hist)
    protos = online.assign(codes)
    edit_off = protos.eq(0) | protos.eq(2)
    assert edit_off.any() and (~edit_off).any()
    for rows in (range(20), [int(edit_off.nonzero()[0])]):  # a batch, and one row (the NumPy path)
        sel = torch.tensor(list(rows))
        edit = online.edit(codes[sel], prototypes=protos[sel])
        raw = online.model.prototype_edit(codes[sel], online.initial_bank.centres, protos[sel])
        for n, k in enumerate(protos[sel].tolist()):
            if k in (0, 2):
                assert not edit.weight[n].any() and not edit.bias[n].any()
            else:
                assert torch.allclose(edit.weight[n], raw.weight[n], atol=1e-6)


def test_a_bundle_from_before_the_switches_serves_with_every_term_on(pre_group_bias_bundle: Path) -> None:
    trained = load_trained(pre_group_bias_bundle)
    assert torch.equal(trained.model.bank.switches, neutral_switches(trained.model.cfg.n_prototypes))


def test_training_starts_the_switches_on_the_validation_period(tiny_bundle: Path) -> None:
    trained = load_trained(tiny_bundle)
    model, cfg = trained.model.eval(), trained.model.cfg
    split = prepare(trained.spec, max_len=cfg.max_len, window_stride=cfg.stride, repeat_size=cfg.repeat_size).split
    fresh = copy.deepcopy(model)
    fresh.bank.switches.zero_()
    warm_switches(fresh, split.valid)
    assert bool((model.bank.switches[:, EVENTS] > 0).all())
    assert torch.allclose(model.bank.switches, fresh.bank.switches)
