"""The online edit check of bench/edit_trust_variants.py, whose figures docs/results.md reports: its switch follows
the decayed mean gain, and switched on it scores exactly as ``persona evaluate``'s Persona."""

from __future__ import annotations

import copy

import torch

from bench.edit_trust_variants import EditTrust, TrustedPersona, gains
from recsys.evaluate import PersonaMethod
from recsys.model import PersonaModel
from tests.test_model import histories, small_cfg


def test_the_switch_follows_each_prototypes_decayed_mean_gain() -> None:
    trust = EditTrust(3, decay=0.5, margin=0.0, per_prototype=True)
    protos = torch.tensor([0, 1, 1])
    assert trust.scale(torch.arange(3)).tolist() == [1.0, 1.0, 1.0]  # nothing seen: trusted
    trust.update(protos, torch.tensor([-1.0, 2.0, -1.0]))
    assert trust.scale(torch.arange(3)).tolist() == [0.0, 1.0, 1.0]
    # prototype 1: its two events decay by 0.5 ** 2, then a loss of 1.0 outweighs the remaining 0.25
    trust.update(torch.tensor([1]), torch.tensor([-1.0]))
    assert trust.scale(torch.arange(3)).tolist() == [0.0, 0.0, 1.0]
    pooled = EditTrust(3, decay=1.0, margin=0.0, per_prototype=False)
    pooled.update(protos, torch.tensor([-1.0, 2.0, -0.5]))
    assert pooled.scale(protos).tolist() == [1.0, 1.0, 1.0]  # one switch for all: mean +0.17


def test_switched_on_it_is_persona_and_switched_off_it_is_the_base_model_with_group_terms() -> None:
    torch.manual_seed(0)
    cfg = small_cfg()
    model = PersonaModel(cfg).eval()
    with torch.no_grad():
        model.adapter.gen_weight.normal_(std=0.5)
        model.adapter.gen_bias.normal_(std=0.5)
        h = histories(6, cfg)
        on = TrustedPersona(copy.deepcopy(model), EditTrust(3, 1.0, 0.0, True), None)
        assert torch.equal(on.score(h), PersonaMethod(model, "p", "prototype").score(h))
        off_trust = EditTrust(3, 1.0, 0.0, True)
        off_trust.update(torch.arange(3), -torch.ones(3))
        off = TrustedPersona(copy.deepcopy(model), off_trust, None)
        assert torch.allclose(off.score(h), model.score(h), atol=1e-6)  # no group counts here: the base model
        edit = model.session_edit(h, "prototype")
        edit_gain, _ = gains(model, h, edit, torch.full((6,), 5), None)
        manual = torch.log_softmax(model.score(h, edit), -1)[:, 5] - torch.log_softmax(model.score(h), -1)[:, 5]
        assert torch.allclose(edit_gain, manual, atol=1e-5)
