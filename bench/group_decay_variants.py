"""The prototypes' group bias re-chosen on a trained bundle with more decays γ: does faster forgetting pay?

Run on demand (docs/results.md, "A stream with group-level drift"); a research script, not a test:

    PYTHONPATH=. .venv/bin/python bench/group_decay_variants.py runs/q/c20-s0 --decays 1,0.999,0.99,0.95

Nothing is retrained: on the bundle's frozen model and prototypes, β, α and γ are chosen on validation exactly as
``persona train`` chooses them (``recsys.train.choose_group_bias``, over ``--decays`` instead of the default grid),
the bank then counts the validation period as a trained bundle's does, and the test period is evaluated once:
Persona (prototype mode, refined live) against the base model, with paired bootstrap CIs, next to the bundle's own
choice and to the bundle with its group bias switched off (β = 0, every weight the same).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
from pathlib import Path

import torch

from recsys.bootstrap import paired_ratio
from recsys.evaluate import BaseMethod, PersonaMethod, evaluate_examples
from recsys.pipeline import load_trained, prepare
from recsys.train import ValidProbe, choose_group_bias, example_codes, latest_examples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--decays", default="1,0.999,0.99,0.95", help="Comma-separated γ candidates.")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)  # every setting tried, with its score
    logging.getLogger("recsys").setLevel(logging.INFO)
    trained = load_trained(args.bundle)
    model, cfg, tc = trained.model.eval(), trained.model.cfg, trained.train_config
    split = prepare(trained.spec, max_len=cfg.max_len, window_stride=cfg.stride, repeat_size=cfg.repeat_size).split
    own = copy.deepcopy(model)
    print(f"bundle's choice: β {cfg.group_bias_weight:g}, α {cfg.group_bias_smoothing:g}, γ {cfg.group_bias_decay:g}")

    codes = example_codes(model, split.train)
    assignment = model.bank.assign(codes)
    probe = ValidProbe.build(
        model, latest_examples(split.valid, tc.max_valid), with_sums=model.bank.has_history_groups()
    )
    grid = dataclasses.replace(tc, group_bias_decays=tuple(float(g) for g in args.decays.split(",")))
    chosen = choose_group_bias(model, probe, assignment, split.train.targets, grid)
    setting = f"β {chosen.weight:g}, α {chosen.smoothing:g}, γ {chosen.decay:g}"
    print(f"re-chosen on validation: {setting} ({chosen.score:.4f})")
    valid_codes = example_codes(model, split.valid)
    model.bank.observe(model.bank.assign(valid_codes), torch.from_numpy(split.valid.targets))

    base = evaluate_examples(BaseMethod(model), split.test).ndcg10
    off = copy.deepcopy(own)
    off.cfg.group_bias_weight = 0.0  # the same bundle without its group bias: what the bias itself adds
    bundles = {"bundle's choice": own, "re-chosen": model, "bundle's choice, group bias off (β 0)": off}
    for name, m in bundles.items():
        persona = evaluate_examples(PersonaMethod(m, "persona", "prototype", refine=True), split.test).ndcg10
        ratio = paired_ratio(persona, base)
        print(f"{name}: test NDCG@10 base {base.mean():.4f}, Persona {persona.mean():.4f}; Persona / base {ratio}")


if __name__ == "__main__":
    main()
