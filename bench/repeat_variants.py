"""The repeat part's forms trained on one bundle's frozen base model: validation NDCG@10 only.

Run on demand (not in CI), from the repository root:

    PYTHONPATH=. .venv/bin/python bench/repeat_variants.py runs/repeat/mixture-s1 --forms mixture,mixture-attention

Each form is a fresh :class:`recsys.repeats.RepeatPart` trained exactly as ``persona train``'s repeat stage does
(:func:`recsys.train.train_repeat_part` on the bundle's base model, its own part removed first), so a form can be
compared without training the base model, the adapter and the prototypes again. Prints the base model's validation
NDCG@10 without a part and each form's with it (``--gates`` overrides the mixture forms' p(repeat) candidates). The
test period is never scored.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import torch

from recsys.evaluate import BaseMethod
from recsys.pipeline import load_trained, prepare
from recsys.repeats import FORMS, REPEAT_SIZE, RepeatPart
from recsys.train import _eval, train_repeat_part, valid_ndcg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--forms", default=",".join(FORMS))
    ap.add_argument("--gates", default=None, help="comma-separated p(repeat) candidates, e.g. 0.5,0.7,0.9,0.95")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    trained = load_trained(args.bundle)
    model = trained.model
    cfg = model.cfg
    size = cfg.repeat_size or REPEAT_SIZE
    split = prepare(trained.spec, max_len=cfg.max_len, window_stride=cfg.stride, repeat_size=size).split
    tc = trained.train_config
    if args.gates:
        tc = dataclasses.replace(tc, repeat_gates=tuple(float(g) for g in args.gates.split(",")))
    dm = model.device_model
    dm.repeat = None
    base = valid_ndcg(BaseMethod(_eval(model), repeats=False), split.valid, tc)
    print(f"base without the part: valid NDCG@10 {base:.4f}")
    for form in args.forms.split(","):
        torch.manual_seed(tc.seed)
        cfg.repeat_size, cfg.repeat_form = size, form
        dm.repeat = RepeatPart(cfg.dim, form)
        stage = train_repeat_part(model, split, tc, base_score=base, progress=False)
        assert stage is not None
        print(f"{form}: valid NDCG@10 {stage.best_ndcg10:.4f} ({stage.best_ndcg10 / base:.3f} x base without the part)")


if __name__ == "__main__":
    main()
