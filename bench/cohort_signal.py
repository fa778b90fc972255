"""How much a cohort's recent choices say about a user's next item on a ``synthetic:...,cohorts=N`` stream.

Run on demand (docs/results.md, "A stream with group-level drift"); it is not a test and not a method:

    PYTHONPATH=. .venv/bin/python bench/cohort_signal.py "synthetic:users=1000,events=50000,cohorts=20"

It reads the generator's own cohorts (users who share a walk, ``recsys.synthetic.draw``) and, for every event in
the last 15 % of the stream, ranks the catalogue by the user's cohort's next-item counts so far, decayed by γ per
cohort event, against global counts (decayed by 0.999 per event where γ < 1). NDCG@10 with optimistic ties, over
the raw stream (no k-core, no split): an indicator of the group signal, not comparable with `persona evaluate`.
"""

from __future__ import annotations

import argparse

import numpy as np

from recsys.data import synthetic_config
from recsys.synthetic import draw


def _ndcg10(scores: np.ndarray, target: int) -> float:
    rank = int((scores > scores[target]).sum())
    return 1.0 / float(np.log2(rank + 2)) if rank < 10 else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", help='A synthetic spec with cohorts, e.g. "synthetic:cohorts=20".')
    ap.add_argument("--decays", default="1,0.99,0.95,0.9", help="Comma-separated γ per cohort event.")
    args = ap.parse_args()
    cfg = synthetic_config(args.spec)
    d = draw(cfg)
    n = d.step.size
    item, user = np.empty(n, np.int64), np.empty(n, np.int64)
    item[d.step], user[d.step] = d.item, d.user
    walks: dict[tuple[int, int], int] = {}
    cohort = np.array([walks.setdefault((int(a), int(b)), len(walks)) for a, b in zip(d.perm_a, d.perm_b, strict=True)])
    test_from = int(0.85 * n)
    print(f"{args.spec}: {len(walks)} distinct walks, {n - test_from} scored events")
    for gamma in (float(g) for g in args.decays.split(",")):
        by_cohort, overall = np.zeros((len(walks), cfg.items)), np.zeros(cfg.items)
        total_cohort = total_overall = 0.0
        for t in range(n):
            c, i = cohort[user[t]], item[t]
            if t >= test_from:
                total_cohort += _ndcg10(by_cohort[c] + 1e-9 * overall, i)
                total_overall += _ndcg10(overall, i)
            by_cohort[c] *= gamma
            by_cohort[c, i] += 1.0
            overall *= 1.0 if gamma == 1.0 else 0.999
            overall[i] += 1.0
        m = n - test_from
        print(f"γ {gamma:g}: cohort counts NDCG@10 {total_cohort / m:.4f}, global counts {total_overall / m:.4f}")


if __name__ == "__main__":
    main()
