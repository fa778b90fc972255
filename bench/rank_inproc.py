"""Ranking in process (no HTTP): CPU per ranking of ``serving.ranking.Ranker`` over a populated SQLite store.

Run on demand (results are quoted in docs/performance.md); it is not a test:

    .venv/bin/python bench/rank_inproc.py --model runs/rep --rankings 1000

One stored session per call, as ``GET /v1/sessions/{id}/recommendations`` does, without HTTP and without a load
generator in the process: the store holds ``--sessions`` sessions written by ``serving.bench.populate_sessions``
(with their item counts for a model with a repeat part), 200 warm-up calls, then ``--rankings`` timed ones. Prints
one JSON line: ``cpu_us_per_rank`` (process CPU time per ranking, the steadier figure on a shared machine) and the
wall-clock ``p50_ms`` / ``p99_ms``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="Model bundle directory.")
    ap.add_argument("--sessions", type=int, default=500)
    ap.add_argument("--rankings", type=int, default=1000)
    args = ap.parse_args()
    torch.set_num_threads(1)

    from persona.models import ModelProvider, register_bundle
    from persona.store import Store
    from recsys.online import OnlineModel
    from serving.bench import populate_sessions
    from serving.ranking import Ranker, RankQuery

    with tempfile.TemporaryDirectory() as tmp:
        store = Store.open(f"sqlite:///{tmp}/rank.db")
        register_bundle(store, args.model, activate=True)
        names = populate_sessions(store, OnlineModel.load(args.model), args.sessions)
        ranker = Ranker(store, ModelProvider(store))
        for name in names[:200]:
            ranker.rank([RankQuery(session_id=name, k=10)])
        latencies = []
        cpu_start = time.process_time()
        for j in range(args.rankings):
            start = time.perf_counter()
            ranker.rank([RankQuery(session_id=names[j % len(names)], k=10)])
            latencies.append(time.perf_counter() - start)
        cpu = time.process_time() - cpu_start
        store.close()
    ms = np.asarray(latencies) * 1e3
    print(
        json.dumps(
            {
                "cpu_us_per_rank": round(cpu / args.rankings * 1e6, 1),
                "p50_ms": round(float(np.percentile(ms, 50)), 3),
                "p99_ms": round(float(np.percentile(ms, 99)), 3),
                "sessions": args.sessions,
                "rankings": args.rankings,
            }
        )
    )


if __name__ == "__main__":
    main()
