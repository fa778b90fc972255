"""Ingestor.apply in process (no Kafka): events/s of the model + store work alone, on SQLite.

Run on demand (results are quoted in docs/performance.md); it is not a test:

    .venv/bin/python bench/ingest_apply.py --model data/bundles/ml100k --threads 1

Traffic: uniform items over the model's vocabulary, ``--sessions`` sessions; ``--warm`` batches first so that
histories have grown, then ``--batches`` timed batches of ``--batch`` events. Prints one JSON line, with
``cpu_us_per_event``: this process's CPU time (user + system, all its threads: the ingestor runs its model work
in process here) over the timed batches, per event. Unlike events/s it does not count time the process waited
for a core, so it is the steadier figure on a shared machine. After the warm batches the objects alive are frozen
(``gc.freeze()``), as ``persona consume`` does once it is loaded.

On this shared 2-core VM CPU time per event moves by 10-30 % from run to run. ``--instructions`` counts the
instructions of the timed batches instead, which valgrind's callgrind counts the same whatever else the machine
is doing (two runs here: 0.03 % apart); run under it with instrumentation off until the timed loop:

    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=cg.%p \\
        .venv/bin/python bench/ingest_apply.py --model BUNDLE --instructions

It prints ``instructions_per_event`` from callgrind's dump of the timed loop. Instructions are not time (cache
misses cost time and no instructions), so they complement CPU time rather than replace it.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import random
import shutil
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="Model bundle directory.")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (persona consume uses 1).")
    ap.add_argument(
        "--compute-threads", type=int, default=1, help="Ingestor compute threads (PERSONA_CONSUMER_THREADS)."
    )
    ap.add_argument("--sessions", type=int, default=600)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--warm", type=int, default=10)
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument(
        "--instructions",
        action="store_true",
        help="Run under valgrind --tool=callgrind --instr-atstart=no: count the timed batches' instructions.",
    )
    args = ap.parse_args()
    counter = InstructionCounter() if args.instructions else None
    torch.set_num_threads(args.threads)

    from persona.events import Event
    from persona.ingest import Ingestor
    from persona.models import ModelProvider
    from persona.store import Store

    with tempfile.TemporaryDirectory() as tmp:
        store = Store.open(f"sqlite:///{tmp}/bench.db")
        models = ModelProvider(store, model_dir=args.model)
        items = models.get().vocab.ids
        ingestor = Ingestor(store, models, compute_threads=args.compute_threads)
        rng = random.Random(0)
        batches = [
            [
                Event(
                    f"e{b}-{i}", f"s{rng.randrange(args.sessions)}", items[rng.randrange(len(items))], datetime.now(UTC)
                )
                for i in range(args.batch)
            ]
            for b in range(args.warm + args.batches)
        ]
        for batch in batches[: args.warm]:
            ingestor.apply(batch)
        gc.collect()
        gc.freeze()  # as `persona consume` does once loaded: full collections then skip the model and the modules
        if counter is not None:
            counter.start()
        start, cpu_start = time.perf_counter(), time.process_time()
        for batch in batches[args.warm :]:
            ingestor.apply(batch)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        if counter is not None:
            counter.stop()
        ingestor.close()
        store.close()
    events = args.batches * args.batch
    counted = {} if counter is None else {"instructions_per_event": round(counter.total() / events)}
    print(
        json.dumps(
            {
                **counted,
                "events_per_s": round(events / elapsed, 1),
                "ms_per_batch": round(elapsed / args.batches * 1e3, 1),
                "cpu_us_per_event": round(cpu / events * 1e6, 1),
                "threads": args.threads,
                "compute_threads": args.compute_threads,
                "batch": args.batch,
                "sessions": args.sessions,
            }
        )
    )


class InstructionCounter:
    """Callgrind's client requests around the timed loop (valgrind's C macros, compiled at start into a small library:
    they are instruction sequences that only valgrind recognises, not functions Python could call)."""

    SOURCE = """#include <valgrind/callgrind.h>
void start(void) { CALLGRIND_ZERO_STATS; CALLGRIND_START_INSTRUMENTATION; }
void stop(void) { CALLGRIND_STOP_INSTRUMENTATION; CALLGRIND_DUMP_STATS_AT("timed"); }
"""

    def __init__(self) -> None:
        if "vgpreload" not in os.environ.get("LD_PRELOAD", ""):  # valgrind preloads its core
            raise SystemExit(
                "--instructions: run under valgrind --tool=callgrind --instr-atstart=no (see this script's docstring)"
            )
        self.dir = Path(tempfile.mkdtemp(prefix="ingest-cg-"))
        (self.dir / "cg.c").write_text(self.SOURCE)
        lib = self.dir / "libcg.so"
        subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(lib), str(self.dir / "cg.c")], check=True)
        self.lib = ctypes.CDLL(str(lib))
        shutil.rmtree(self.dir)  # loaded: the file is no longer needed
        self.pid = os.getpid()

    def start(self) -> None:
        self.lib.start()

    def stop(self) -> None:
        self.lib.stop()

    def total(self) -> int:
        """Instructions in the timed loop's dump (callgrind writes it as ``<out file>.<n>``; its ``totals:`` line:
        ``summary:`` reads 0 after the zeroing)."""
        for path in Path.cwd().iterdir():
            if str(self.pid) not in path.name.split(".") or not path.is_file():
                continue
            for line in path.read_text(errors="replace").splitlines():
                if line.startswith("totals:"):
                    return int(line.split()[1])
        raise SystemExit(f"--instructions: no callgrind dump for process {self.pid} in {Path.cwd()}")


if __name__ == "__main__":
    main()
