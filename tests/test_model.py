"""The method's invariants (METHOD.md §1–3), each a property the rest of the product relies on."""

from __future__ import annotations

import pytest
import torch

from recsys.baselines import finetune_edit
from recsys.model import (
    PAD,
    CloudAdapter,
    Edit,
    ModelConfig,
    PersonaModel,
    PrototypeBank,
    cross_entropy,
    last_state,
    reseed_idle,
)


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
