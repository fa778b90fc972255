"""Variants of the repeat part's training on one bundle's frozen base model: validation NDCG@10 only.

Run on demand (not in CI), from the repository root:

    PYTHONPATH=. .venv/bin/python bench/repeat_variants.py runs/repeat/mixture-s1 \
        --variants mixture,mixture-attention,mixture:gate=count,mixture:gate=fixed

Each variant is a fresh :class:`recsys.repeats.RepeatPart` of a form, trained exactly as ``persona train``'s repeat
stage does (:func:`recsys.train.fit_stage` on the base model's head outputs of the training examples, early-stopped
on validation NDCG@10 of the base model with the part), with the gate optionally restricted: ``gate=count`` reads
only the session's count summary (its weights on ``x`` held at 0), ``gate=fixed`` keeps p(repeat) at its initial
value; ``p=0.7`` sets that initial value. Prints each variant's validation NDCG@10 at initialisation and at its best
epoch, and the base model's without the part. The test period is never scored.
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

import torch

from recsys.evaluate import BaseMethod
from recsys.pipeline import load_trained, prepare
from recsys.repeats import REPEAT_SIZE, RepeatPart
from recsys.train import Batch, _eval, _head_states, cross_entropy, fit_stage, valid_ndcg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--variants", default="mixture,mixture-attention")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    trained = load_trained(args.bundle)
    model = trained.model
    cfg = model.cfg
    size = cfg.repeat_size or REPEAT_SIZE
    cfg.repeat_size = size
    split = prepare(trained.spec, max_len=cfg.max_len, window_stride=cfg.stride, repeat_size=size).split
    tc = trained.train_config
    dm = model.device_model
    dm.repeat = None
    base = valid_ndcg(BaseMethod(_eval(model), repeats=False), split.valid, tc)
    print(f"base without the part: valid NDCG@10 {base:.4f}")
    states = _head_states(model, split.train)
    targets = dm.item_targets().detach()
    for spec in args.variants.split(","):
        form, *opts = spec.split(":")
        options = dict(o.split("=") for o in opts)
        torch.manual_seed(tc.seed)
        part = RepeatPart(cfg.dim, form)
        p0 = float(options.get("p", 0.6))
        with torch.no_grad():
            if part.mixture:
                part.gate.bias.fill_(math.log(p0 / (1 - p0)))
        gate = options.get("gate", "full")
        if gate == "fixed":
            part.gate.requires_grad_(False)
        elif gate == "count":
            mask = torch.zeros_like(part.gate.weight)
            mask[:, cfg.dim :] = 1.0
            with torch.no_grad():
                part.gate.weight.mul_(mask)
            part.gate.weight.register_hook(lambda g, m=mask: g * m)
        dm.repeat = part

        def loss(b: Batch) -> torch.Tensor:
            return cross_entropy(dm.scores_from_head(states[b.rows], targets, b.repeats), b.targets)

        def modes(part: RepeatPart = part) -> None:
            model.eval()
            part.train()

        stage = fit_stage(
            f"repeat-{spec}",
            part,
            loss,
            lambda: valid_ndcg(BaseMethod(_eval(model)), split.valid, tc),
            split.train,
            tc,
            tc.repeat_epochs,
            set_modes=modes,
            progress=False,
        )
        start = stage.history and stage.history[0]
        print(
            f"{spec}: valid NDCG@10 best {stage.best_ndcg10:.4f} (epoch {stage.best_epoch}; "
            f"{stage.best_ndcg10 / base:.3f} x base without the part); first epoch {start}"
        )


if __name__ == "__main__":
    main()
