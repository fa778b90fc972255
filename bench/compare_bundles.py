"""Two bundles trained on the same data, paired on its test period: one method's NDCG@10 of the second over the first.

The evidence for "the new default against the previous one" in docs/results.md: both bundles' methods (as
``persona evaluate`` defines them) score the same test examples in the same order, so the paired bootstrap over
examples (:func:`recsys.bootstrap.paired_ratio`) gives the CI of the ratio. A research script, not a test; a few
minutes per bundle on one core::

    PYTHONPATH=. .venv/bin/python bench/compare_bundles.py runs/offline/prev-s1 runs/offline/ts-s1
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from recsys.bootstrap import paired_ratio
from recsys.evaluate import BaseMethod, PersonaMethod, evaluate_examples
from recsys.pipeline import load_trained, prepare


def test_ndcg10(bundle: Path, method: str) -> tuple[np.ndarray, np.ndarray]:
    """Per test example: NDCG@10 of ``method`` ("persona" or "base") under the bundle, and the examples' targets
    (to check that two bundles are paired on the same examples)."""
    trained = load_trained(bundle)
    model, cfg = trained.model.eval(), trained.model.cfg
    split = prepare(trained.spec, max_len=cfg.max_len, window_stride=cfg.stride, repeat_size=cfg.repeat_size).split
    scorer = BaseMethod(model) if method == "base" else PersonaMethod(model, "persona", "prototype", refine=True)
    return evaluate_examples(scorer, split.test).ndcg10, split.test.targets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("first", type=Path, help="The reference bundle (e.g. the previous default).")
    ap.add_argument("second", type=Path, help="The bundle compared with it.")
    ap.add_argument("--method", choices=("persona", "base"), default="persona")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    first, first_targets = test_ndcg10(args.first, args.method)
    second, second_targets = test_ndcg10(args.second, args.method)
    if not np.array_equal(first_targets, second_targets):
        raise SystemExit("the two bundles' test periods differ: train both on the same data and protocol")
    print(f"{args.method} test NDCG@10: {args.first} {first.mean():.4f}, {args.second} {second.mean():.4f}")
    print(f"second / first {paired_ratio(second, first)}")


if __name__ == "__main__":
    main()
