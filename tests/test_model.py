"""The method's invariants (METHOD.md §1–3), each a property the rest of the product relies on."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recsys.baselines import finetune_edit
from recsys.model import (
    FINE_NEAREST,
    PAD,
    CloudAdapter,
    Edit,
    ModelConfig,
    PersonaModel,
    PrototypeBank,
    count_next_items,
    cross_entropy,
    fine_group_bias,
    fine_sq_distances,
    fine_weights,
    group_bias,
    history_bias_rows,
    history_group_bias,
    last_state,
    nearest_history_groups,
    reseed_idle,
    window_sums,
)
from recsys.train import FineGroups


def small_cfg(**overrides: object) -> ModelConfig:
    base = {"n_items": 60, "dim": 16, "max_len": 12, "code_dim": 8, "n_prototypes": 3, "dropout": 0.0}
    base.update(overrides)
    return ModelConfig(**base)  # type: ignore[arg-type]


def histories(n: int, cfg: ModelConfig, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    h = torch.randint(2, cfg.n_items, (n, cfg.max_len), generator=g)
    lengths = torch.randint(1, cfg.max_len + 1, (n,), generator=g)
    for row, length in enumerate(lengths.tolist()):
        h[row, : cfg.max_len - length] = PAD
    return h


@pytest.mark.parametrize("encoder", ["sasrec", "gru4rec"])
def test_zero_code_gives_exactly_the_base_model(encoder: str) -> None:
    torch.manual_seed(0)
    cfg = small_cfg(encoder=encoder)
    model = PersonaModel(cfg).eval()
    with torch.no_grad():
        model.adapter.gen_weight.normal_(std=1.0)  # a trained-looking generator: zero must still mean zero
        model.adapter.gen_bias.normal_(std=1.0)
        h = histories(5, cfg)
        zero = model.adapter.edit_from_codes(torch.zeros(5, cfg.n_edit_layers, cfg.code_dim))
        assert torch.equal(zero.weight, torch.zeros_like(zero.weight))
        assert torch.equal(model.score(h, zero), model.score(h))


@pytest.mark.parametrize("rank", [0, 4])
def test_zero_code_gives_exactly_the_base_model_in_prototype_mode(rank: int) -> None:
    """Zero centres, zero offsets, zero code and empty group counts: the base model exactly, group bias on."""
    torch.manual_seed(0)
    cfg = small_cfg(edit_rank=rank, group_bias_weight=2.0)
    model = PersonaModel(cfg).eval()
    with torch.no_grad():
        for p in model.adapter.parameters():
            p.normal_(std=1.0)
        h = histories(5, cfg)
        edit = model.edit_for(torch.zeros(5, cfg.n_edit_layers, cfg.code_dim), "prototype")
        assert edit.prototype.min() >= 0
        assert torch.equal(model.score(h, edit), model.score(h))
        session = model.edit_for(torch.zeros(5, cfg.n_edit_layers, cfg.code_dim), "session")
        assert torch.equal(model.score(h, session), model.score(h))


def _prototype_lift(model: PersonaModel) -> torch.Tensor:
    """What prototype-mode scores add to the edited device model's for 4 sessions [4, N]; checks on the way that a
    session edit (no prototypes) adds nothing."""
    h = histories(4, model.cfg)
    with torch.no_grad():
        codes = model.codes(h)
        session, proto = model.edit_for(codes, "session"), model.edit_for(codes, "prototype")
        assert torch.equal(model.score(h, session), model.device_model(h, session))
        return model.score(h, proto) - model.device_model(h, proto)


def test_group_bias_is_the_stated_log_count_and_only_in_prototype_mode() -> None:
    cfg = small_cfg(n_items=6, n_prototypes=2, group_bias_weight=0.5, group_bias_smoothing=2.0)
    counts = torch.tensor([[0.0, 0.0, 6.0, 0.0, 0.0, 0.0], [0.0] * 6])
    bias = group_bias(counts, torch.tensor([0, 1, -1]), cfg)
    assert bias is not None
    mean = 1.0  # 6 counts over 6 items
    assert bias[0, 2].item() == pytest.approx(0.5 * math.log1p(6.0 / (2.0 * mean)))
    assert bias[0, 3].item() == 0.0
    assert torch.equal(bias[1], torch.zeros(6))  # no counts yet: no bias
    assert torch.equal(bias[2], torch.zeros(6))  # no prototype (a session edit): no bias
    assert group_bias(counts, torch.tensor([0]), small_cfg(group_bias_weight=0.0)) is None
    model = PersonaModel(small_cfg(group_bias_weight=1.0)).eval()
    model.bank.next_items[:, 5] = 3.0
    lift = _prototype_lift(model)
    assert torch.allclose(lift[:, 5], torch.full((4,), math.log1p(3.0 / (3.0 / 60))))
    assert torch.equal(lift[:, 4], torch.zeros(4))


def test_history_groups_key_the_whole_window_and_add_the_log_of_their_next_items() -> None:
    """A session's history group is the nearest unit centre (cosine) to the sum of its window's item embeddings, PAD
    left out, whatever the window's length; it adds β3 · log1p(P_g(i) · N / α3), nothing without a prototype or an
    item in the window, nothing when off; prototype-mode scores add it, session edits do not."""
    items = torch.tensor([[9.0, 9.0], [5.0, -5.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # rows 0, 1: PAD, UNK
    windows = torch.tensor([[PAD, PAD, 2], [PAD, 3, 3], [2, 2, 3], [PAD, PAD, PAD]])
    sums = window_sums(items, windows)
    assert sums.tolist() == [[1.0, 0.0], [0.0, 2.0], [2.0, 1.0], [0.0, 0.0]]  # PAD's embedding never counts
    centres = torch.nn.functional.normalize(torch.tensor([[1.0, 0.2], [0.2, 1.0]]), dim=1)
    groups = nearest_history_groups(sums, centres)
    assert groups.tolist() == [0, 1, 0, -1]  # the last window has no item: no group
    cfg = small_cfg(n_items=4, history_groups=2, history_bias_weight=0.5, history_bias_smoothing=2.0)
    dist = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.25, 0.75]])
    rows = history_bias_rows(dist, cfg)
    assert rows is not None
    bias = history_group_bias(groups, torch.tensor([0, 2, -1, 1]), rows)
    assert bias[0, 2].item() == pytest.approx(0.5 * math.log1p(1.0 * 4 / 2.0)) and bias[0, 3].item() == 0.0
    assert bias[1, 3].item() == pytest.approx(0.5 * math.log1p(0.75 * 4 / 2.0))
    assert torch.equal(bias[2], torch.zeros(4)) and torch.equal(bias[3], torch.zeros(4))  # no prototype, no group
    cfg.history_bias_weight = 0.0
    assert history_bias_rows(dist, cfg) is None
    # in the model: prototype-mode edits made from histories carry their groups, and the scores add their bias
    model = PersonaModel(small_cfg(history_groups=3, history_bias_weight=1.0)).eval()
    model.bank.history_centres.copy_(torch.nn.functional.normalize(torch.randn(3, 16), dim=1))
    model.bank.history_items[:, 5] = 1.0
    h = histories(4, model.cfg)
    with torch.no_grad():
        edit = model.session_edit(h)
        assert edit.groups is not None and torch.equal(edit.groups, model.history_groups(h))
        lift = model.score(h, edit) - model.device_model(h, edit)
        assert torch.allclose(lift[:, 5], torch.full((4,), math.log1p(60 / 1.0)))
        assert torch.equal(lift[:, 4], torch.zeros(4))
        assert model.edit_for(model.codes(h), "session", h).groups is None  # a session edit: no group terms
    model.cfg.history_bias_weight = 0.0
    assert model.history_groups(h) is None


def test_fine_groups_add_the_log_of_their_neighbourhoods_next_items() -> None:
    """A session adds β2 · log1p(Σ_f w_f P_f(i) · N / α2): its nearest group's distribution alone at τ2 = 0, a
    softmax-weighted mix otherwise; nothing for a session without a prototype, nothing when off."""
    cfg = small_cfg(n_items=4, n_edit_layers=1, code_dim=2, fine_groups=2, fine_bias_weight=0.5)
    cfg.fine_bias_smoothing = 2.0
    centres = torch.tensor([[[0.0, 0.0]], [[4.0, 0.0]]])
    items = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.25, 0.75]])
    codes = torch.tensor([[[1.0, 0.0]], [[3.5, 0.0]], [[1.0, 0.0]]])
    protos = torch.tensor([0, 3, -1])
    bias = fine_group_bias(codes, protos, centres, items, cfg)
    assert bias is not None
    assert bias[0, 2].item() == pytest.approx(0.5 * math.log1p(1.0 * 4 / 2.0))  # nearest: group 0
    assert bias[1, 3].item() == pytest.approx(0.5 * math.log1p(0.75 * 4 / 2.0))  # nearest: group 1
    assert bias[0, 3].item() == 0.0 and torch.equal(bias[2], torch.zeros(4))  # no prototype: no bias
    # soft: squared distances 1 and 9 for the first code; the median is torch's (the lower middle one: 1), so the
    # weights are ∝ exp(−(d² − 1) / (τ · 1))
    cfg.fine_temperature = 2.0
    groups, w = fine_weights(torch.tensor([[9.0, 1.0]]), 2.0)
    w0 = 1.0 / (1.0 + math.exp(-8.0 / 2.0))
    assert groups.tolist() == [[1, 0]] and w[0].tolist() == pytest.approx([w0, 1 - w0])  # nearest first
    soft = fine_group_bias(codes, protos, centres, items, cfg)
    assert soft is not None
    assert soft[0, 3].item() == pytest.approx(0.5 * math.log1p((1 - w0) * 0.75 * 4 / 2.0), rel=1e-5)
    assert [t.tolist() for t in fine_weights(torch.tensor([[1.0, 9.0]]), 0.0)] == [[[0]], [[1.0]]]
    # beyond the nearest FINE_NEAREST groups a session's weight is 0 (negligible at the temperatures chosen)
    far = torch.arange(20.0).flip(0).unsqueeze(0)
    groups, w = fine_weights(far, 100.0)
    assert groups.shape == (1, FINE_NEAREST) and set(groups[0].tolist()) == set(range(19, 19 - FINE_NEAREST, -1))
    assert float(w.sum()) == pytest.approx(1.0)
    cfg.fine_bias_weight = 0.0
    assert fine_group_bias(codes, protos, centres, items, cfg) is None
    # in the model: prototype-mode edits carry their codes, so the scores add both biases; session edits neither
    model = PersonaModel(small_cfg(fine_groups=3, fine_bias_weight=1.0)).eval()
    model.bank.fine_items[:, 5] = 1.0
    lift = _prototype_lift(model)
    assert torch.allclose(lift[:, 5], torch.full((4,), math.log1p(1.0 * model.cfg.n_items)))
    assert torch.equal(lift[:, 4], torch.zeros(4))


def test_group_counts_decay_per_member_event_in_order() -> None:
    counts = torch.zeros(2, 5)
    count_next_items(counts, torch.tensor([0, 1, 0, -1, 0]), torch.tensor([2, 3, 4, 2, 2]), 0.5)
    # prototype 0 saw 2, 4, 2: ((1·½ + 0)·½ + 1) for item 2, ½ for item 4; prototype 1 saw 3; -1 is not counted
    assert counts[0].tolist() == [0.0, 0.0, 1.25, 0.0, 0.5]
    assert counts[1].tolist() == [0.0, 0.0, 0.0, 1.0, 0.0]
    one_by_one = torch.zeros(2, 5)
    for k, t in [(0, 2), (1, 3), (0, 4), (0, 2)]:
        count_next_items(one_by_one, torch.tensor([k]), torch.tensor([t]), 0.5)
    assert torch.equal(one_by_one, counts)


def test_fresh_adapter_starts_at_the_base_model() -> None:
    torch.manual_seed(0)
    cfg = small_cfg()
    model = PersonaModel(cfg).eval()
    with torch.no_grad():
        h = histories(8, cfg)
        edited = model.score(h, model.session_edit(h, "session"))
        assert (edited - model.score(h)).abs().mean() < 0.05  # σ = 1e-2 generators: a small nudge only
        assert model.session_edit(h, "session").weight.abs().max() < 0.05


@pytest.mark.parametrize("rank", [0, 4])
def test_edits_are_clipped_to_tau(rank: int) -> None:
    torch.manual_seed(0)
    cfg = small_cfg(tau=0.3, residual_tau=0.1, edit_rank=rank)
    model = PersonaModel(cfg).eval()
    with torch.no_grad():
        for p in model.adapter.parameters():
            p.mul_(100.0)  # push raw edits far past the limit
        codes = torch.randn(6, cfg.n_edit_layers, cfg.code_dim) * 10
        session = model.adapter.edit_from_codes(codes)
        assert session.weight.abs().max() <= 0.3 + 1e-6
        assert session.bias.abs().max() <= 0.3 + 1e-6
        assert session.weight.abs().max() == pytest.approx(0.3)  # the clip is actually reached
        model.bank.centres.copy_(torch.randn_like(model.bank.centres))
        proto = model.edit_for(codes, "prototype")
        centre_edit = model.adapter.edit_from_codes(model.bank.centres[proto.prototype])
        assert (proto.weight - centre_edit.weight).abs().max() <= 0.1 + 1e-6


def test_cross_layer_codes_depend_on_the_previous_layer() -> None:
    torch.manual_seed(0)
    adapter = CloudAdapter(small_cfg(n_edit_layers=3))
    steps = torch.randn(2, 3, 8, requires_grad=True)
    out, _ = adapter.layer_gru(steps)
    (grad_later,) = torch.autograd.grad(out[:, 1].sum(), steps, retain_graph=True)
    assert grad_later[:, 0].abs().sum() > 0  # layer 2's code reads layer 1's recurrent state
    (grad_first,) = torch.autograd.grad(out[:, 0].sum(), steps)
    assert grad_first[:, 1:].abs().sum() == 0  # and never the other way round
    codes = adapter.layer_codes(torch.randn(4, 8))
    assert codes.shape == (4, 3, 8)
    assert not torch.allclose(codes[:, 0], codes[:, 1])  # same input z, different layer codes


def test_prototype_assignment_picks_the_nearest_centre() -> None:
    cfg = small_cfg(n_edit_layers=1, code_dim=2, n_prototypes=3)
    bank = PrototypeBank(cfg)
    bank.centres.copy_(torch.tensor([[[0.0, 0.0]], [[10.0, 0.0]], [[0.0, 10.0]]]))
    codes = torch.tensor([[[1.0, 1.0]], [[9.0, 1.0]], [[1.0, 8.0]], [[6.0, 0.0]]])
    assert bank.assign(codes).tolist() == [0, 1, 2, 1]
    assert bank.distances(codes, bank.assign(codes))[0].item() == pytest.approx(2**0.5)


def test_refinement_moves_the_centre_by_the_stated_rule() -> None:
    cfg = small_cfg(n_edit_layers=1, code_dim=2, n_prototypes=2, proto_n0=10.0, proto_eta_floor=0.05)
    bank = PrototypeBank(cfg)
    bank.counts.copy_(torch.tensor([0.0, 1000.0]))
    code = torch.tensor([[[10.0, 0.0]]])
    bank.refine(code, torch.tensor([0]))
    assert bank.centres[0, 0].tolist() == pytest.approx([1.0, 0.0])  # η = 1 / (0 + 10)
    assert bank.counts[0].item() == 1
    bank.refine(code, torch.tensor([0]))
    assert bank.centres[0, 0, 0].item() == pytest.approx(1.0 + (10.0 - 1.0) / 11)  # η = 1 / (1 + 10)
    bank.refine(code, torch.tensor([1]))
    assert bank.centres[1, 0, 0].item() == pytest.approx(0.05 * 10.0)  # floor beats 1 / 1010
    assert bank.centres[1, 0, 1].item() == 0.0


def test_kmeans_recovers_separated_groups() -> None:
    cfg = small_cfg(n_edit_layers=1, code_dim=2, n_prototypes=3)
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [20.0, 0.0], [0.0, 20.0]])
    codes = (centres.repeat_interleave(50, 0) + torch.randn(150, 2, generator=g)).unsqueeze(1)
    bank = PrototypeBank(cfg)
    assignment = bank.fit(codes)
    for group in range(3):
        assert assignment[group * 50 : (group + 1) * 50].unique().numel() == 1
    assert sorted(bank.counts.tolist()) == [50.0, 50.0, 50.0]


def test_gru_state_ignores_left_padding_exactly() -> None:
    torch.manual_seed(0)
    gru = torch.nn.GRU(4, 4, batch_first=True)
    seq = torch.randn(1, 3, 4)
    padded = torch.cat([torch.randn(1, 5, 4), seq], 1)  # garbage in the padding positions
    mask = torch.tensor([[False] * 5 + [True] * 3])
    _, h = gru(seq)
    assert torch.allclose(last_state(gru, padded, mask), h[-1], atol=1e-6)


@pytest.mark.parametrize("encoder", ["sasrec", "gru4rec"])
def test_encoder_is_causal(encoder: str) -> None:
    torch.manual_seed(0)
    cfg = small_cfg(encoder=encoder)
    dm = PersonaModel(cfg).eval().device_model
    h = histories(3, cfg, seed=1)
    h[:, : cfg.max_len // 2] = PAD
    h[:, cfg.max_len // 2 :] = torch.randint(2, cfg.n_items, (3, cfg.max_len - cfg.max_len // 2))
    changed = h.clone()
    changed[:, -1] = (changed[:, -1] + 1 - 2) % (cfg.n_items - 2) + 2  # only the last item differs
    with torch.no_grad():
        a, b = dm.encode_all(h), dm.encode_all(changed)
        assert torch.allclose(a[:, :-1], b[:, :-1], atol=1e-5)
        assert not torch.allclose(a[:, -1], b[:, -1])
        assert torch.allclose(dm.encode(h), a[:, -1], atol=1e-5)  # the last-query-only fast path


def test_training_counts_each_next_item_in_the_group_that_weighs_most_when_served() -> None:
    """Codes 1e-6 off the midpoint of two fine groups' centres (near ties that float32 ``torch.cdist`` resolves the
    other way for about 2 % of them): training counts every next item in the group that serving ranks first."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(16, 10, 8, generator=g) * 3
    a = torch.randint(0, 16, (4000,), generator=g)
    b = (a + 1 + torch.randint(0, 15, (4000,), generator=g)) % 16
    t = (0.5 + torch.randn(4000, generator=g) * 1e-6)[:, None, None]
    codes = centres[a] * t + centres[b] * (1 - t)
    served_first = fine_weights(fine_sq_distances(codes, centres), 0.05)[0][:, 0]
    fine = FineGroups(centres, torch.zeros(16, 4000), 0.05, 1.0, 1.0, 0.0, 0.0)
    fine.add(codes, np.arange(4000))
    assert torch.equal(fine.counts.argmax(0), served_first)
    assert float(fine.counts.sum()) == 4000.0


def test_finetune_baseline_lowers_the_sessions_own_loss() -> None:
    torch.manual_seed(0)
    cfg = small_cfg()
    model = PersonaModel(cfg).eval()
    h = histories(4, cfg)
    h[:, :] = torch.randint(2, 6, h.shape)  # repetitive sessions: something to learn
    edit = finetune_edit(model, h, steps=3, lr=1.0, window=5)
    with torch.no_grad():
        prefix = torch.nn.functional.pad(h[:, :-1], (1, 0), value=PAD)
        none = Edit(torch.zeros_like(edit.weight), torch.zeros_like(edit.bias), edit.prototype)
        before = cross_entropy(model.score(prefix, none), h[:, -1])
        after = cross_entropy(model.score(prefix, edit), h[:, -1])
    assert after < before


def test_idle_prototypes_are_reseeded_at_the_worst_served_sessions() -> None:
    centres = torch.zeros(3, 1, 2)
    counts = torch.tensor([5.0, 7.0, 9.0])
    codes = torch.tensor([[[1.0, 0.0]], [[9.0, 9.0]], [[4.0, 4.0]]])
    distances = torch.tensor([1.0, 12.7, 5.6])
    assert reseed_idle(centres, counts, torch.tensor([False, True, True]), codes, distances) == [1, 2]
    assert centres[1, 0].tolist() == [9.0, 9.0] and centres[2, 0].tolist() == [4.0, 4.0]
    assert centres[0, 0].tolist() == [0.0, 0.0]
    assert counts.tolist() == [5.0, 0.0, 0.0]
    assert reseed_idle(centres, counts, torch.tensor([False, False, False]), codes, distances) == []


def test_batched_refinement_equals_the_code_by_code_rule() -> None:
    cfg = small_cfg(n_edit_layers=2, code_dim=3, n_prototypes=3, proto_n0=2.0, proto_eta_floor=0.2)
    g = torch.Generator().manual_seed(0)
    codes = torch.randn(40, 2, 3, generator=g)
    assignment = torch.randint(0, 3, (40,), generator=g)
    batched = PrototypeBank(cfg)
    batched.counts.copy_(torch.tensor([0.0, 3.0, 50.0]))
    one_by_one = PrototypeBank(cfg)
    one_by_one.load_state_dict(batched.state_dict())
    batched.refine(codes, assignment)
    for i in range(40):
        one_by_one.refine(codes[i : i + 1], assignment[i : i + 1])
    assert torch.allclose(batched.centres, one_by_one.centres, atol=1e-6)
    assert torch.equal(batched.counts, one_by_one.counts)


def test_persona_evaluation_counts_next_items_only_after_scoring() -> None:
    """``persona`` scores a batch under the counts before it, then counts its targets; static prototypes never do."""
    from recsys.evaluate import PersonaMethod

    torch.manual_seed(0)
    model = PersonaModel(small_cfg(group_bias_weight=1.0, group_bias_decay=0.5)).eval()
    h = histories(6, model.cfg)
    targets = torch.tensor([5, 5, 7, 9, 5, 11])
    live = PersonaMethod(model, "persona", "prototype", refine=True)
    static = PersonaMethod(model, "static", "prototype")
    with torch.no_grad():
        first = live.score(h)
        assert torch.equal(first, static.score(h))  # no counts yet: both are the edited model alone
        live.observe(h, targets)
        static.observe(h, targets)
        protos = live.model.bank.assign(live.model.codes(h))
        expected = torch.zeros_like(model.bank.next_items)
        count_next_items(expected, live._edit.prototype if live._edit is not None else protos, targets, 0.5)
        assert torch.equal(live.model.bank.next_items, expected)
        assert not bool(model.bank.next_items.any())  # the live method works on its own copy of the bank
        assert not torch.equal(live.score(h), static.score(h))
