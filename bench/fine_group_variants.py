"""Fine-group variants on a bundle trained without fine groups (``persona train --fine-groups 0``): the evidence in
docs/results.md, "Fine groups".

The bundle's own Persona (its prototypes' group bias as chosen) plus K2 fine groups fitted on its training codes as
``persona train`` fits them; K2, τ2, β2 and α2 chosen on validation only (the groups' counts: the training period's),
then the test period once (counts: training + validation, frozen), with paired bootstrap CIs against the base model
and against the bundle's Persona. ``--nearest 0`` spreads a session's membership over every group instead of its
:data:`recsys.model.FINE_NEAREST` nearest. A research script, not a test; a few minutes a bundle on one core::

    .venv/bin/python bench/fine_group_variants.py runs/offline/time-shift-s0 --nearest 0
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

import recsys.model as model_module
from recsys.bootstrap import paired_ratio
from recsys.metrics import per_example_ndcg, target_ranks
from recsys.model import (
    PrototypeBank,
    count_next_items,
    fine_group_bias,
    fine_nearest,
    group_bias,
    next_item_distributions,
)
from recsys.pipeline import load_trained, prepare
from recsys.splits import Examples

BATCH = 512  # as persona evaluate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--nearest", type=int, default=model_module.FINE_NEAREST, help="0 = every group")
    ap.add_argument("--groups", default="64,128,256,512,1024,2048")
    ap.add_argument("--temperatures", default="0,0.05,0.2")
    ap.add_argument("--strip", action="store_true", help="drop a bundle's own fine groups instead of refusing it")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    trained = load_trained(args.bundle)
    model, cfg, seed = trained.model.eval(), trained.model.cfg, trained.train_config.seed
    if cfg.fine_groups:
        if not args.strip:
            raise SystemExit(f"{args.bundle} has fine groups already: train one with --fine-groups 0, or --strip")
        # training is bit-identical up to the fine groups' stage, which comes last: without them this is the
        # bundle --fine-groups 0 trains (the bank's counts through validation do not depend on them)
        print(f"stripped the bundle's fine groups (K2={cfg.fine_groups})")
        cfg.fine_groups, cfg.fine_bias_weight = 0, 0.0
    split = prepare(trained.spec, max_len=cfg.max_len, window_stride=cfg.stride, repeat_size=cfg.repeat_size).split

    def codes_of(examples: Examples) -> Tensor:
        return torch.cat(
            [model.codes(torch.from_numpy(examples.histories[i : i + 2048])) for i in range(0, len(examples), 2048)]
        )

    train_codes = codes_of(split.train)
    train_targets = torch.from_numpy(split.train.targets)
    main_counts = torch.zeros_like(model.bank.next_items)  # the group counts at the end of training
    count_next_items(main_counts, model.bank.assign(train_codes), train_targets, cfg.group_bias_decay)
    valid, test = _scored(model, split.valid), _scored(model, split.test)
    valid_codes = torch.cat(valid["codes"])

    def fit(k2: int) -> tuple[Tensor, Tensor, Tensor]:
        grouping = PrototypeBank(dataclasses.replace(cfg, n_prototypes=k2))
        grouping.fit(train_codes, seed=seed)
        centres = grouping.centres.clone()
        counts = torch.zeros(k2, cfg.n_items)
        _count(counts, centres, train_codes, train_targets)
        train_only = counts.clone()
        _count(counts, centres, valid_codes, torch.from_numpy(split.valid.targets))
        return centres, next_item_distributions(train_only), next_item_distributions(counts)

    model_module.FINE_NEAREST = args.nearest or max(int(k) for k in args.groups.split(","))
    no_fine = _ndcg(valid, cfg, main_counts, None)
    best: tuple[float, dict[str, Any]] = (float(no_fine.mean()), {})
    fitted = {}
    for k2 in (int(k) for k in args.groups.split(",")):
        fitted[k2] = fit(k2)
        for temperature, weight, smoothing in itertools.product(
            (float(t) for t in args.temperatures.split(",")), (0.25, 0.5, 1.0, 2.0), (1.0, 3.0)
        ):
            setting = {"k2": k2, "temperature": temperature, "weight": weight, "smoothing": smoothing}
            score = float(_ndcg(valid, cfg, main_counts, (fitted[k2][0], fitted[k2][1], setting)).mean())
            if score > best[0]:
                best = (score, setting)
        print(f"after K2={k2}: best validation NDCG@10 {best[0]:.4f} {best[1]} (without: {no_fine.mean():.4f})")
    test_counts = model.bank.next_items  # the bundle's: training + validation
    base = _ndcg(test, cfg, test_counts, None, base=True)
    persona = _ndcg(test, cfg, test_counts, None)
    setting = best[1]
    fine = None if not setting else (fitted[setting["k2"]][0], fitted[setting["k2"]][2], setting)
    with_fine = _ndcg(test, cfg, test_counts, fine)
    print(f"test NDCG@10: base {base.mean():.4f}, Persona {persona.mean():.4f}, with fine {with_fine.mean():.4f}")
    print(f"  with fine groups / base: {paired_ratio(with_fine, base)}")
    print(f"  with fine groups / Persona: {paired_ratio(with_fine, persona)}")
    print(f"  Persona / base: {paired_ratio(persona, base)}")


def _count(counts: Tensor, centres: Tensor, codes: Tensor, targets: Tensor) -> None:
    nearest = fine_nearest(codes, centres)
    counts.index_put_((nearest, targets), torch.ones(len(targets)), accumulate=True)


def _scored(model: Any, examples: Examples) -> dict[str, list[Tensor]]:
    """Per batch, in time order: edited scores without biases, base scores, prototypes, codes and targets, with the
    bank refined after each batch as ``persona`` does (its counts are replayed by :func:`_ndcg`)."""
    bank = copy.deepcopy(model.bank)
    bank.cfg = model.cfg
    dm, items = model.device_model, model.device_model.item_targets()
    out: dict[str, list[Tensor]] = {"edited": [], "base": [], "protos": [], "codes": [], "targets": []}
    for i in range(0, len(examples), BATCH):
        h = torch.from_numpy(examples.histories[i : i + BATCH])
        reps = None if examples.repeats is None else torch.from_numpy(examples.repeats[i : i + BATCH])
        states, codes = dm.encode(h), model.codes(h)
        protos = bank.assign(codes)
        edit = model.prototype_edit(codes, bank.centres, protos)
        out["edited"].append(dm.scores_from_head(dm.head(states, edit), items, reps))
        out["base"].append(dm.scores_from_head(dm.head(states, None), items, reps))
        out["protos"].append(protos)
        out["codes"].append(codes)
        out["targets"].append(torch.from_numpy(examples.targets[i : i + BATCH]))
        bank.refine(codes, protos)
    return out


def _ndcg(
    scored: dict[str, list[Tensor]],
    cfg: Any,
    counts: Tensor,
    fine: tuple[Tensor, Tensor, dict[str, Any]] | None,
    *,
    base: bool = False,
) -> np.ndarray:
    """Per-example NDCG@10 of the scored batches with the group bias (its counts counting each batch after scoring
    it, as live) and the fine groups' frozen bias; ``base``: the base model's scores alone."""
    counts = counts.clone()
    fine_cfg = None
    if fine is not None:
        s = fine[2]
        fine_cfg = dataclasses.replace(
            cfg,
            fine_groups=fine[0].shape[0],
            fine_temperature=s["temperature"],
            fine_bias_weight=s["weight"],
            fine_bias_smoothing=s["smoothing"],
        )
    out = []
    for j, protos in enumerate(scored["protos"]):
        targets = scored["targets"][j]
        scores = scored["base"][j].clone() if base else scored["edited"][j].clone()
        if not base:
            bias = group_bias(counts, protos, cfg)
            if bias is not None:
                scores += bias
            if fine is not None and fine_cfg is not None:
                extra = fine_group_bias(scored["codes"][j], protos, fine[0], fine[1], fine_cfg)
                if extra is not None:
                    scores += extra
        out.append(per_example_ndcg(target_ranks(scores, targets), 10).numpy())
        count_next_items(counts, protos, targets, cfg.group_bias_decay)
    return np.concatenate(out)


if __name__ == "__main__":
    main()
