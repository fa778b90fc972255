"""The edit against per-session fine-tuning, cost only: ``recsys.evaluate.measure_cost`` on a bundle's test
sessions, several interleaved rounds, medians. What ``persona evaluate`` measures once at its end, re-measured on
its own (on a quiet machine, or with a chosen thread count).

Run on demand (results are quoted in docs/results.md); it is not a test:

    .venv/bin/python bench/edit_cost.py --model runs/offline/time-shift-s1 \\
        --eval runs/offline/time-shift-s1.eval.json --rounds 5

``--eval`` takes the fine-tuning setting ``persona evaluate`` chose on validation (its JSON report); without it,
SGD at 1e-4. Prints one JSON line: per round and the medians of ``edit_ms_per_session``,
``finetune_ms_per_session``, both batched throughputs and the two ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="Model bundle directory.")
    ap.add_argument("--eval", type=Path, help="`persona evaluate --json` report: its chosen fine-tuning setting.")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads.")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from recsys.baselines import FinetuneChoice
    from recsys.evaluate import measure_cost
    from recsys.pipeline import load_trained, prepare

    trained = load_trained(args.model)
    cfg = trained.model.cfg
    split = prepare(trained.spec, max_len=cfg.max_len, window_stride=cfg.stride, repeat_size=cfg.repeat_size).split
    choice = FinetuneChoice(optimizer="sgd", lr=1e-4)
    if args.eval is not None:
        chosen = json.loads(args.eval.read_text())["settings"]["finetune"]
        choice = FinetuneChoice(optimizer=chosen["optimizer"], lr=float(chosen["lr"]))
    torch.manual_seed(0)
    rounds = [measure_cost(trained.model, split.test, finetune=choice).as_dict() for _ in range(args.rounds)]
    keys = rounds[0].keys()
    medians = {k: statistics.median(float(r[k]) for r in rounds) for k in keys}
    print(
        json.dumps(
            {
                "threads": args.threads,
                "finetune": f"{choice.optimizer} {choice.lr:g}",
                "median": medians,
                "rounds": rounds,
            }
        )
    )


if __name__ == "__main__":
    main()
