"""The fast inference paths give what the plain model defines: the functional encoder, the factored edited head,
batched metric observations and sliding counts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry, Histogram

from recsys.drift import SlidingCounts
from recsys.edited_head import SMALL_BATCH, EditedHead
from recsys.model import PAD, ModelConfig, PersonaModel, edit_norm_ratio
from streaming.metrics import observe_many


def _model(**overrides: object) -> PersonaModel:
    torch.manual_seed(0)
    cfg = ModelConfig(n_items=60, dim=16, code_dim=8, max_len=12, n_prototypes=4, **overrides)  # type: ignore[arg-type]
    model = PersonaModel(cfg).eval()
    with torch.no_grad():  # a trained-looking model: generators and offsets away from their tiny initial values
        model.bank.centres.normal_(0, 0.5)
        model.bank.weight_offset.normal_(0, 0.05)
        for p in model.adapter.parameters():
            p.mul_(3.0)
    return model


def _histories(n: int, max_len: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    hist = torch.randint(2, 60, (n, max_len), generator=g)
    lengths = torch.randint(0, max_len + 1, (n,), generator=g)  # empty histories included
    for row, length in enumerate(lengths.tolist()):
        hist[row, : max_len - length] = PAD
    return hist


def test_functional_encoder_equals_the_module_path() -> None:
    model = _model()
    dm = model.device_model
    hist = _histories(40, 12)
    with torch.enable_grad():  # the module path (the one training uses)
        expected = dm.encoder(dm.items(hist), hist != PAD, last_only=True).detach()
    with torch.inference_mode():
        got = dm.encode(hist)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_adapter_codes_from_item_inputs_equal_the_packed_gru() -> None:
    """The written-out GRU over per-item input projections (inference) against the packed module (training):
    full, partly padded and empty windows."""
    model = _model()
    hist = _histories(40, 12, seed=3)
    adapter = model.adapter
    with torch.enable_grad():
        expected = model.codes(hist).detach()
    with torch.inference_mode():
        inputs = adapter.item_inputs(model.device_model.items.weight)
        got = adapter.codes_from_inputs(model.recent(hist), inputs)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("rank", [0, 3])
def test_a_few_sessions_codes_and_edits_in_numpy_equal_the_model(rank: int) -> None:
    """EditRows (one request's codes and edit, without torch's per-call overhead) against the model: full, partly
    padded and empty windows, unknown items, a full-rank and a low-rank generator; and OnlineModel takes that path
    for a few rows and torch's for more, with the same results."""
    from recsys.edit_rows import EditRows

    model = _model(edit_rank=rank, residual_weight=0.7, adapter_window=5)
    hist = _histories(40, 12, seed=5)
    hist[3, -2] = 1  # UNK reads as an item, as the model reads it
    rows = EditRows(model)
    with torch.inference_mode():
        codes = model.codes(hist)
        protos = model.bank.assign(codes)
        expected = model.prototype_edit(codes, model.bank.centres, protos)
        proto_w, proto_b = model.prototype_edits(model.bank.centres)
    got = rows.codes(hist.numpy())
    np.testing.assert_allclose(got, codes.numpy(), atol=1e-6, rtol=1e-5)
    res_w, res_b = rows.residual(codes.numpy(), model.bank.centres[protos].numpy())
    np.testing.assert_allclose(proto_w[protos].numpy() + res_w, expected.weight.numpy(), atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(proto_b[protos].numpy() + res_b, expected.bias.numpy(), atol=1e-6, rtol=1e-5)
    assert float(np.abs(res_w).max()) > 0  # the residual is not trivially zero here
    # the whole single-session edit (what OnlineModel and `persona evaluate` run for one session)
    w, b = rows.edit(got, model.bank.centres.numpy(), protos.numpy(), (proto_w, proto_b))
    np.testing.assert_allclose(w, expected.weight.numpy(), atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(b, expected.bias.numpy(), atol=1e-6, rtol=1e-5)


def test_online_codes_and_edits_take_numpy_for_a_few_rows_with_the_same_results(tiny_bundle: Path) -> None:
    """OnlineModel computes one request's codes and edit in NumPy (EditRows) and a batch's in torch: the same."""
    from recsys.online import OnlineModel

    online = OnlineModel.load(tiny_bundle)
    hist = torch.from_numpy(np.random.default_rng(0).integers(2, online.n_items, (9, online.cfg.max_len)))
    hist[2, :-1] = PAD  # one item
    hist[4] = PAD  # none
    with torch.inference_mode():
        batched = online.codes(hist)  # 9 rows: torch
        batched_edit = online.edit(batched)
        none = online.codes(hist[:0])  # no rows (a batch of unknown items): torch's empty result
        assert none.shape == (0, *batched.shape[1:]) and online.edit(none).weight.shape[0] == 0
    for n in (1, 3):  # NumPy
        with torch.inference_mode():
            few = torch.cat([online.codes(hist[i : i + n]) for i in range(0, 9 - n + 1, n)])
            edit = online.edit(online.codes(hist[:n]))
        torch.testing.assert_close(few, batched[: len(few)], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(edit.weight, batched_edit.weight[:n], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(edit.bias, batched_edit.bias[:n], atol=1e-6, rtol=1e-5)
        assert torch.equal(edit.prototype, batched_edit.prototype[:n])


@pytest.mark.parametrize("rank", [0, 3])
@pytest.mark.parametrize("rows", [1, SMALL_BATCH, 33])
def test_factored_head_equals_the_materialised_edit(rank: int, rows: int) -> None:
    model = _model(edit_rank=rank, residual_weight=0.7)
    hist = _histories(rows, 12, seed=rows)
    with torch.inference_mode():
        states = model.device_model.encode(hist)
        codes = model.codes(hist)
        centres = model.bank.centres
        protos = model.bank.assign(codes)
        edit = model.prototype_edit(codes, centres, protos)
        expected = model.device_model.head(states, edit)
        expected_ratio = edit_norm_ratio(model, edit)
        head = EditedHead.build(model, centres)
        got, ratio = head.queries(states, codes, protos, centres)
        # the bank-independent first products computed beforehand (the consumer does so while it prepares)
        early, early_ratio = head.queries(states, codes, protos, centres, head.gen.first_products(states))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ratio, expected_ratio, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(early, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(early_ratio, expected_ratio, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 33])
def test_rows_whose_residual_clip_may_engage_take_the_materialised_path(rows: int) -> None:
    """With a tight residual clip the factored form would be wrong; those rows must still get the exact edit."""
    model = _model(residual_tau=0.01)
    hist = _histories(rows, 12, seed=7)
    with torch.inference_mode():
        states, codes = model.device_model.encode(hist), model.codes(hist)
        centres = model.bank.centres
        protos = model.bank.assign(codes)
        edit = model.prototype_edit(codes, centres, protos)
        assert bool((model.adapter.raw_edit((codes - centres[protos]) * 1.0)[0].abs() > 0.01).any())  # clip engages
        got, ratio = EditedHead.build(model, centres).queries(states, codes, protos, centres)
        expected, expected_ratio = model.device_model.head(states, edit), edit_norm_ratio(model, edit)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ratio, expected_ratio, atol=1e-5, rtol=1e-5)


def test_a_head_built_for_other_centres_is_not_reused_silently() -> None:
    """The head is per bank snapshot: built for one bank, it gives that bank's edits, not another's."""
    model = _model(residual_weight=0.5)  # with a full residual (1.0) the centre cancels out of the edit
    hist = _histories(8, 12)
    with torch.inference_mode():
        states, codes = model.device_model.encode(hist), model.codes(hist)
        centres = model.bank.centres
        moved = centres + 0.3
        protos = model.bank.assign(codes)
        head = EditedHead.build(model, moved)
        got, _ = head.queries(states, codes, protos, moved)
        expected = model.device_model.head(states, model.prototype_edit(codes, moved, protos))
        stale = model.device_model.head(states, model.prototype_edit(codes, centres, protos))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, stale, atol=1e-4)


def test_observe_many_equals_observe_one_by_one() -> None:
    buckets = (0.1, 0.5, 1.0, 5.0)
    values = [0.0, 0.1, 0.10001, 0.5, 0.7, 1.0, 4.9, 5.0, 5.1, 100.0, -3.0]
    one, many = CollectorRegistry(), CollectorRegistry()
    a = Histogram("h", "one", buckets=buckets, registry=one)
    b = Histogram("h", "many", buckets=buckets, registry=many)
    for v in values:
        a.observe(v)
    observe_many(b, values)
    observe_many(b, [])
    samples_a = {(s.name, tuple(s.labels.items())): s.value for m in one.collect() for s in m.samples}
    samples_b = {(s.name, tuple(s.labels.items())): s.value for m in many.collect() for s in m.samples}
    samples_a = {k: v for k, v in samples_a.items() if not k[0].endswith("_created")}
    samples_b = {k: v for k, v in samples_b.items() if not k[0].endswith("_created")}
    assert samples_a == pytest.approx(samples_b)


def test_sliding_counts_add_many_equals_add_one_by_one() -> None:
    rng = np.random.default_rng(0)
    one, many = SlidingCounts(7, 50), SlidingCounts(7, 50)
    for size in (3, 40, 0, 90, 1, 17):
        batch = rng.integers(0, 7, size).tolist()
        for c in batch:
            one.add(c)
        many.add_many(batch)
        assert one.counts.tolist() == many.counts.tolist() and len(one) == len(many)


def test_edited_head_is_a_frozen_snapshot() -> None:
    head = EditedHead.build(_model(), _model().bank.centres)
    with pytest.raises(dataclasses.FrozenInstanceError):
        head.n_prototypes = 3  # type: ignore[misc]


@pytest.mark.parametrize("temperature", [0.0, 0.05, 0.7])
def test_a_few_rows_fine_group_bias_in_numpy_equals_the_model(temperature: float) -> None:
    """A single ranking's fine-group bias (NumPy, recsys/fine_rows.py) is the model's (torch) within float32
    rounding: nearest groups, weights, the torch median, and no bias for a session without a prototype."""
    from recsys.fine_rows import FineRows
    from recsys.group_rows import GroupRows
    from recsys.model import fine_group_bias

    g = torch.Generator().manual_seed(7)
    cfg = ModelConfig(n_items=50, code_dim=4, n_edit_layers=2, fine_groups=20, fine_bias_weight=0.7)
    cfg.fine_temperature, cfg.fine_bias_smoothing = temperature, 3.0
    centres = torch.randn(20, 2, 4, generator=g)
    items = torch.rand(20, 50, generator=g).pow(4)
    items = items / items.sum(1, keepdim=True)
    codes = torch.randn(3, 2, 4, generator=g)
    protos = torch.tensor([2, -1, 0])
    expected = fine_group_bias(codes, protos, centres, items, cfg)
    assert expected is not None
    got = GroupRows(cfg, FineRows(centres, items, cfg), None)(None, protos, codes, None)  # the fine term alone
    assert got is not None
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(got[1], torch.zeros(50)) and float(got[0].abs().max()) > 0.1


def test_a_few_rows_history_groups_in_numpy_equal_the_model() -> None:
    """A single ranking's history groups and their bias (NumPy, recsys/history_rows.py) are the model's (torch):
    the same group for every window (empty ones: none), and exactly the same bias, none without a prototype."""
    from recsys.history_rows import history_rows_of
    from recsys.model import distribution_bias

    torch.manual_seed(3)
    cfg = ModelConfig(n_items=50, dim=16, max_len=12, history_groups=9, history_bias_weight=0.7)
    cfg.history_bias_smoothing = 3.0
    model = PersonaModel(cfg).eval()
    g = torch.Generator().manual_seed(7)
    model.bank.history_centres.copy_(torch.nn.functional.normalize(torch.randn(9, 16, generator=g), dim=1))
    items = torch.rand(9, 50, generator=g).pow(4)
    model.bank.history_items.copy_(items / items.sum(1, keepdim=True))
    hist = torch.randint(2, 50, (64, 12), generator=g)
    for row in range(64):
        hist[row, : row % 12] = PAD  # windows of every length
    hist[5] = PAD  # and an empty one
    rows = history_rows_of(model)
    assert rows is not None
    with torch.no_grad():
        expected = model.history_groups(hist)
    assert expected is not None and len(set(expected.tolist())) > 4
    got = rows.groups(hist.numpy())
    assert torch.equal(got, expected) and int(got[5]) == -1
    protos = torch.arange(64) % 3 - 1  # every third session without a prototype
    per_session = distribution_bias(model.bank.history_items[expected.clamp(min=0)], 0.7, 3.0)  # each row's own
    bias = per_session * ((protos >= 0) & (expected >= 0)).unsqueeze(1)
    assert float(bias.abs().max()) > 0.1
    assert torch.equal(rows.bias(got, protos), bias)
    model.cfg.history_bias_weight = 0.0
    assert history_rows_of(model) is None


def test_a_single_rankings_whole_group_bias_in_numpy_equals_the_torch_terms_summed() -> None:
    """A few rows' group bias (NumPy, recsys/group_rows.py: counts, fine and history terms summed in one pass) is the
    torch path's within float32 rounding: no bias without a prototype, none from a prototype without counts, no
    history term for an empty window or when the groups are not read, and ``None`` for a model without any term."""
    from recsys.fine_rows import fine_rows_of
    from recsys.group_rows import GroupRows
    from recsys.history_rows import history_rows_of
    from recsys.model import add_bias, fine_group_bias, group_bias

    g = torch.Generator().manual_seed(11)
    cfg = ModelConfig(n_items=40, dim=16, code_dim=4, n_edit_layers=2, fine_groups=6, history_groups=5)
    cfg.group_bias_weight, cfg.group_bias_smoothing = 0.8, 2.0
    cfg.fine_bias_weight, cfg.fine_temperature, cfg.fine_bias_smoothing = 0.5, 0.3, 1.0
    cfg.history_bias_weight, cfg.history_bias_smoothing = 0.7, 3.0
    model = PersonaModel(cfg).eval()
    bank = model.bank
    bank.fine_centres.copy_(torch.randn(bank.fine_centres.shape, generator=g))
    bank.fine_items.copy_(torch.rand(6, 40, generator=g).pow(4).div(torch.rand(6, 1, generator=g) + 5))
    bank.history_centres.copy_(torch.nn.functional.normalize(torch.randn(5, 16, generator=g), dim=1))
    bank.history_items.copy_(torch.rand(5, 40, generator=g).pow(4).div(10))
    next_items = torch.rand(bank.next_items.shape, generator=g).pow(3) * 9
    next_items[1] = 0.0  # a prototype that has counted nothing yet
    codes = torch.randn(4, 2, 4, generator=g)
    protos, groups = torch.tensor([0, -1, 1, 2]), torch.tensor([3, 1, 0, -1])
    history = history_rows_of(model)
    rows = GroupRows(cfg, fine_rows_of(bank, cfg), history)
    assert history is not None
    fine = fine_group_bias(codes, protos, bank.fine_centres, bank.fine_items, cfg)
    expected = add_bias(add_bias(group_bias(next_items, protos, cfg), fine), history.bias(groups, protos))
    assert expected is not None
    got = rows(next_items, protos, codes, groups)
    assert got is not None
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[1], torch.zeros(40)) and float(got[0].abs().max()) > 0.1
    without = rows(next_items, protos, codes, None)  # windows not read: no history term
    assert without is not None and torch.allclose(without, add_bias(group_bias(next_items, protos, cfg), fine))
    assert float((got - without)[0].abs().max()) > 0.1 and torch.equal(got[3], without[3])  # row 3: empty window
    plain = dataclasses.replace(cfg, group_bias_weight=0.0)
    assert GroupRows(plain, None, None)(next_items, protos, codes, groups) is None


@pytest.mark.parametrize("groups", [1, 2, 7, 8, 2048])
def test_the_fine_groups_median_is_torchs_lower_middle_value(groups: int) -> None:
    """The fine groups' temperature scale reads each row's median through NumPy's partition: exactly the value
    torch.median gives, for odd and even counts and with ties."""
    from recsys.model import lower_median

    g = torch.Generator().manual_seed(groups)
    rows = torch.rand(5, groups, generator=g, dtype=torch.float64)
    rows[1] = rows[1].round(decimals=1)  # ties
    assert torch.equal(lower_median(rows), rows.median(dim=1, keepdim=True).values)
