"""Does an online switch for the adapter's edit pay? A decayed mean of the edit's gain on the events scored so far
(reciprocal rank or log-likelihood of the target, with the edit minus without it) decides whether the edit is
applied; optionally the group terms (prototype counts, fine groups) get a switch of their own. One switch for all
sessions or one per prototype.

The product switches each prototype's edit and group terms by reciprocal rank (:mod:`recsys.switch`); this script
measures the variants around that choice (one switch for all sessions, log-likelihood, scaling instead of switching),
each in place of the product's switches. A research script (docs/results.md, "An online switch for the edit and the
group terms"), not a test:

    PYTHONPATH=. .venv/bin/python bench/edit_trust_variants.py runs/csv/fl-s0 --signal rr --scopes global \
        --decays 0.999,0.99 --margins 0 --group-terms no,yes

``--margins`` above 0 scale the edit by ``clip(1 + mean / margin, 0, 1)`` instead of switching it. Nothing is
retrained. The switch starts from the validation period (as a live bank's counts do), then the test period is scored
in time order like ``persona evaluate``'s Persona (prototype mode, bank refined live), each batch under the
switches' current state, which is updated after the batch is scored.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import logging
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from recsys.bootstrap import PairedRatio, paired_ratio
from recsys.evaluate import BaseMethod, PersonaMethod, evaluate_examples
from recsys.metrics import per_example_ndcg, target_ranks
from recsys.model import Edit, PersonaModel
from recsys.pipeline import load_trained, prepare
from recsys.splits import Examples


class EditTrust:
    """Per-prototype (or one global) decayed sums of a term's gain (:func:`gains`) and of its events."""

    def __init__(self, k: int, decay: float, margin: float, per_prototype: bool) -> None:
        self.gain = torch.zeros(k if per_prototype else 1, dtype=torch.float64)
        self.events = torch.zeros_like(self.gain)
        self.decay, self.margin, self.per_prototype = decay, margin, per_prototype

    def slot(self, prototypes: Tensor) -> Tensor:
        return prototypes if self.per_prototype else torch.zeros_like(prototypes)

    def scale(self, prototypes: Tensor) -> Tensor:
        mean = self.gain / self.events.clamp_min(1e-9)
        w = (mean >= 0).double() if self.margin <= 0 else (1 + mean / self.margin).clamp(0, 1)
        w = torch.where(self.events > 0, w, torch.ones_like(w))
        return w[self.slot(prototypes)].float()

    def update(self, prototypes: Tensor, gains: Tensor) -> None:
        s = self.slot(prototypes)
        n = torch.bincount(s, minlength=len(self.gain)).double()
        keep = self.decay**n
        self.gain = self.gain * keep + torch.bincount(s, weights=gains.double(), minlength=len(self.gain))
        self.events = self.events * keep + n


#: How a term's gain on one event is measured: the target's log-likelihood, its reciprocal rank, or its NDCG@10.
SIGNALS = ("ll", "rr", "ndcg")


def _measure(scores: Tensor, tgt: Tensor, signal: str) -> Tensor:
    if signal == "ll":
        return torch.log_softmax(scores, -1)[torch.arange(len(tgt)), tgt]
    ranks = target_ranks(scores, tgt)
    return 1.0 / (ranks.double() + 1) if signal == "rr" else per_example_ndcg(ranks, 10)


def gains(
    model: PersonaModel, hist: Tensor, edit: Edit, tgt: Tensor, reps: Tensor | None, signal: str = "ll"
) -> tuple[Tensor, Tensor]:
    """Per example: the ``signal`` (one of :data:`SIGNALS`) of the target with the edit − without it, both with the
    group terms (log-likelihood: both without), and with the group terms − without them (on the edited model)."""
    dm = model.device_model
    edited = dm(hist, edit, None, reps)
    plain = dm(hist, None, None, reps)
    bias = model.bank.item_bias(edit.prototype, edit.codes, edit.groups)
    with_edit = _measure(edited, tgt, signal)
    if bias is None:
        return with_edit - _measure(plain, tgt, signal), torch.zeros(len(tgt))
    both = _measure(edited + bias, tgt, signal)
    if signal == "ll":
        return with_edit - _measure(plain, tgt, signal), both - with_edit
    return both - _measure(plain + bias, tgt, signal), both - with_edit


class TrustedPersona(PersonaMethod):
    """Persona with each prototype's edit (and, with ``bias_trust``, its group terms) switched by an online trust."""

    def __init__(self, model: PersonaModel, trust: EditTrust, bias_trust: EditTrust | None, signal: str = "ll") -> None:
        super().__init__(model, "persona-trust", "prototype", refine=True)
        self.trust, self.bias_trust, self.signal = trust, bias_trust, signal
        self._hist: Tensor | None = None
        self._reps: Tensor | None = None

    def score(self, histories: Tensor, repeats: Tensor | None = None) -> Tensor:
        self._hist, self._reps = histories, repeats
        self._codes = self.model.codes(histories)
        self._edit = e = self.model.edit_for(self._codes, self.mode, histories)
        w = self.trust.scale(e.prototype)
        scaled = e._replace(weight=e.weight * w[:, None, None, None], bias=e.bias * w[:, None, None])
        scores = self.model.device_model(histories, scaled, None, repeats)
        bias = self.model.bank.item_bias(e.prototype, e.codes, e.groups)
        if bias is None:
            return scores
        b = torch.ones(len(histories)) if self.bias_trust is None else self.bias_trust.scale(e.prototype)
        return scores + b[:, None] * bias

    def observe(self, histories: Tensor, targets: Tensor) -> None:
        assert self._edit is not None and self._hist is not None
        edit_gain, bias_gain = gains(self.model, self._hist, self._edit, targets, self._reps, self.signal)
        self.trust.update(self._edit.prototype, edit_gain)
        if self.bias_trust is not None:
            self.bias_trust.update(self._edit.prototype, bias_gain)
        super().observe(histories, targets)


def warm(
    model: PersonaModel, trusts: tuple[EditTrust, EditTrust], examples: Examples, signal: str, batch: int = 512
) -> None:
    for start in range(0, len(examples), batch):
        hist = torch.from_numpy(examples.histories[start : start + batch])
        tgt = torch.from_numpy(examples.targets[start : start + batch])
        reps = None if examples.repeats is None else torch.from_numpy(examples.repeats[start : start + batch])
        edit = model.session_edit(hist, "prototype")
        for trust, gain in zip(trusts, gains(model, hist, edit, tgt, reps, signal), strict=True):
            trust.update(edit.prototype, gain)


def fmt(r: PairedRatio) -> str:
    return f"{r.ratio:.3f} ({r.ci95[0]:.3f}-{r.ci95[1]:.3f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--decays", default="0.999,0.99")
    ap.add_argument("--margins", default="0,0.05")
    ap.add_argument("--signal", choices=SIGNALS, default="ll")
    ap.add_argument("--scopes", default="per-prototype,global", help="One switch per prototype, one for all, or both.")
    ap.add_argument("--group-terms", default="no,yes", help="Switch the group terms too: no, yes or both.")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    logging.basicConfig(level=logging.WARNING)
    trained = load_trained(args.bundle)
    model, cfg = trained.model.eval(), trained.model.cfg
    split = prepare(trained.spec, max_len=cfg.max_len, window_stride=cfg.stride, repeat_size=cfg.repeat_size).split
    base = evaluate_examples(BaseMethod(model), split.test).ndcg10
    persona = evaluate_examples(PersonaMethod(model, "persona", "prototype", refine=True), split.test).ndcg10
    ratio = fmt(paired_ratio(persona, base))
    print(f"base {base.mean():.4f}  persona (the product's switches) {persona.mean():.4f}  persona/base {ratio}")
    for name, examples in (("validation", split.valid), ("test (bank as trained)", split.test)):
        overall = (EditTrust(1, 1.0, 0.0, False), EditTrust(1, 1.0, 0.0, False))
        warm(model, overall, examples, args.signal)
        e, b = (float(t.gain[0] / t.events[0]) for t in overall)
        print(f"{name}: mean gain ({args.signal}) of the edit {e:+.4f}, of the group terms {b:+.4f}")
    k = model.bank.centres.shape[0]
    for per, gate_bias, decay, margin in itertools.product(
        [scope == "per-prototype" for scope in args.scopes.split(",")],
        [gate == "yes" for gate in args.group_terms.split(",")],
        [float(x) for x in args.decays.split(",")],
        [float(x) for x in args.margins.split(",")],
    ):
        trust, bias_trust = EditTrust(k, decay, margin, per), EditTrust(k, decay, margin, per)
        warm(model, (trust, bias_trust), split.valid, args.signal)
        method = TrustedPersona(copy.deepcopy(model), trust, bias_trust if gate_bias else None, args.signal)
        ndcg = evaluate_examples(method, split.test).ndcg10
        w = trust.scale(torch.arange(k))
        kind = f"{'per-prototype' if per else 'global'}{', group terms too' if gate_bias else ''}"
        print(
            f"{kind:32s} γ {decay:g} margin {margin:g}: {ndcg.mean():.4f} "
            f"/base {fmt(paired_ratio(ndcg, base))} /persona {fmt(paired_ratio(ndcg, persona))} "
            f"edit scales {np.round(w.numpy(), 2).tolist()}"
        )


if __name__ == "__main__":
    main()
