"""``persona bench rank``: throughput and latency of the real API over loopback.

What runs: a real uvicorn process (``serving.app:create_server_app --factory``, one worker) on a SQLite
store with ``sessions`` pre-populated sessions (20–50 random catalogue items each; their codes and
prototypes computed by the model exactly as the consumer would, written directly through the store),
driven by ``httpx`` clients in threads (one connection each, keep-alive). Latency is measured client-side,
so it includes HTTP and the client's own overhead; every phase is bounded by a request count and a duration.

The 1M-item run serves a bundle whose item table has 1,000,000 rows, built directly (random weights, small
``dim``): ranking cost depends on the table's size and width, not on what the weights learned, and training
a 1M-item model would take far longer than the benchmark itself.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from persona.models import register_bundle
from persona.net import free_port
from persona.store import SessionState, Store
from persona.user_state import pack_user_state
from recsys.errors import PersonaError
from recsys.online import OnlineModel, code_to_bytes


@dataclass(frozen=True)
class LoadResult:
    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, float]:
        return {
            "rps": round(self.rps, 1),
            "p50_ms": round(self.p50_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
            "requests": self.requests,
            "errors": self.errors,
            "seconds": round(self.seconds, 2),
        }


def populate_sessions(store: Store, online: OnlineModel, n: int, *, seed: int = 0, batch: int = 500) -> list[str]:
    """Write ``n`` sessions of 20–50 random items, with codes/prototypes (and, for a model with a repeat part, item
    counts) from the model (consumer's formula)."""
    rng = random.Random(seed)
    ids = online.vocab.ids
    now = datetime.now(UTC)
    names: list[str] = []
    for start in range(0, n, batch):
        recents = [rng.sample(ids, rng.randint(20, min(50, len(ids)))) for _ in range(start, min(n, start + batch))]
        recents = [r[-online.cfg.max_len :] for r in recents]
        hist = online.histories(recents)
        codes = online.codes(hist)
        user_states = online.user_states(hist)
        protos = online.assign(codes)
        states = []
        rows = zip(recents, codes, user_states, protos.tolist(), strict=True)
        for j, (recent, code, user_state, proto) in enumerate(rows):
            sid = f"bench-{start + j}"
            names.append(sid)
            states.append(
                SessionState(
                    session_id=sid,
                    recent_items=recent,
                    event_count=len(recent),
                    prototype_id=int(proto),
                    code=code_to_bytes(code),
                    user_state=pack_user_state(user_state, len(recent)),
                    edit_version=len(recent),
                    model_version=online.version,
                    last_event_at=now,
                    updated_at=now,
                    # a model with a repeat part reads the session's stored whole-history counts, as the consumer
                    # writes them
                    item_counts=online.session_counts(None, recent).to_json() if online.has_repeat_part else None,
                )
            )
        with store.transaction() as uow:
            uow.upsert_sessions(states)
    return names


def build_large_bundle(out: Path, n_items: int = 1_000_000, *, dim: int = 16, seed: int = 0) -> Path:
    """A bundle with an ``n_items``-row item table and random weights (latency tests only; see module doc)."""
    from recsys.bundle import save_bundle
    from recsys.drift import DriftReference
    from recsys.model import ModelConfig, PersonaModel
    from recsys.pipeline import DatasetSpec
    from recsys.train import TrainConfig
    from recsys.vocab import ItemVocab

    torch.manual_seed(seed)
    vocab = ItemVocab(ids=sorted(f"i{n}" for n in range(n_items)))
    cfg = ModelConfig(n_items=vocab.size, dim=dim, code_dim=8, max_len=50, n_prototypes=8)
    model = PersonaModel(cfg).eval()
    with torch.no_grad():
        model.bank.centres.normal_(0, 0.3)
    counts = np.zeros(vocab.size, dtype=np.int64)
    counts[2:] = np.random.default_rng(seed).zipf(1.3, n_items).clip(max=10**6)
    k = cfg.n_prototypes
    save_bundle(
        out,
        tensors={
            "model": model.state_dict(),
            "adapter_no_prototypes": model.adapter.state_dict(),
            "stats": {"item_counts": torch.from_numpy(counts)},
        },
        documents={
            "config": {"model": cfg.to_dict(), "train": TrainConfig().to_dict()},
            "vocab": vocab.to_json(),
            "drift": DriftReference([1 / k] * k, {"q50": 1.0, "q90": 1.0, "q99": 1.0}, {"q50": 1.0}).to_json(),
            "dataset": {"spec": DatasetSpec(source=f"random:items={n_items}").to_dict(), "stats": {}},
            "metrics": {},
        },
        data_fingerprint=f"random-{n_items}-{seed}",
        overwrite=True,
    )
    return out


class ApiProcess:
    """``uvicorn serving.app:create_server_app --factory`` in a subprocess, on a free loopback port."""

    def __init__(self, database_url: str, *, workers: int = 1, ready_timeout_s: float = 180.0) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PERSONA_DATABASE_URL": database_url, "PERSONA_LOG_LEVEL": "WARNING"}
        env.pop("PERSONA_MODEL_DIR", None)
        cmd = [sys.executable, "-m", "uvicorn", "serving.app:create_server_app", "--factory"]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--workers", str(workers)]
        cmd += ["--log-level", "warning", "--no-access-log"]
        self.proc = subprocess.Popen(cmd, env=env)
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PersonaError(f"the API process exited with code {self.proc.returncode}")
            try:
                if httpx.get(f"{self.base_url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.close()
        raise PersonaError(f"the API did not become ready within {ready_timeout_s:.0f}s")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def drive(
    base_url: str, paths: list[str], *, concurrency: int, requests: int, max_seconds: float, warmup: int = 200
) -> LoadResult:
    """``concurrency`` threads, each a keep-alive client, GET ``paths`` round-robin until the budget is spent."""
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    per_thread = max(1, requests // concurrency)
    clock = [0.0, 0.0]  # start, deadline: set by the barrier's action, before any worker is released

    def go() -> None:
        clock[0] = time.perf_counter()
        clock[1] = clock[0] + max_seconds

    start_gate = threading.Barrier(concurrency, action=go)

    def worker(n: int) -> None:
        with httpx.Client(base_url=base_url, timeout=10) as client:
            for j in range(warmup // concurrency):
                client.get(paths[(n + j * concurrency) % len(paths)])
            start_gate.wait()
            out = latencies[n]
            for j in range(per_thread):
                if time.perf_counter() > clock[1]:
                    break
                t0 = time.perf_counter()
                r = client.get(paths[(n * per_thread + j) % len(paths)])
                out.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    errors[n] += 1

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - clock[0]
    flat = np.asarray([x for lat in latencies for x in lat]) * 1000
    return LoadResult(
        requests=len(flat),
        errors=sum(errors),
        seconds=elapsed,
        p50_ms=float(np.percentile(flat, 50)) if len(flat) else -1.0,
        p99_ms=float(np.percentile(flat, 99)) if len(flat) else -1.0,
    )


def _serve_and_measure(
    workdir: Path,
    name: str,
    model_dir: Path,
    *,
    sessions: int,
    concurrencies: list[int],
    requests: int,
    max_seconds: float,
    health: bool,
    k: int,
) -> dict[str, Any]:
    url = f"sqlite:///{(workdir / f'{name}.db').as_posix()}"
    store = Store.open(url)
    try:
        row = register_bundle(store, model_dir, activate=True)
        online = OnlineModel.load(model_dir)
        t0 = time.perf_counter()
        names = populate_sessions(store, online, sessions)
        populate_s = time.perf_counter() - t0
    finally:
        store.close()
    n_items = online.n_items - 2
    del online
    api = ApiProcess(url)
    try:
        rank_paths = [f"/v1/sessions/{s}/recommendations?k={k}" for s in names]
        out: dict[str, Any] = {
            "model_version": row.version,
            "catalogue_items": n_items,
            "sessions": sessions,
            "populate_s": round(populate_s, 1),
            "by_concurrency": {},
        }
        for c in concurrencies:
            entry = {"rank": drive(api.base_url, rank_paths, concurrency=c, requests=requests, max_seconds=max_seconds)}
            if health:
                entry["health"] = drive(
                    api.base_url, ["/healthz"], concurrency=c, requests=requests, max_seconds=max_seconds
                )
            out["by_concurrency"][str(c)] = {key: v.to_json() for key, v in entry.items()}
        return out
    finally:
        api.close()


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def bench_rank(
    model_dir: Path,
    *,
    sessions: int = 5000,
    requests: int = 4000,
    max_seconds: float = 20.0,
    concurrencies: tuple[int, ...] = (4, 16),
    large_items: int = 1_000_000,
    k: int = 10,
    command: str = "",
) -> dict[str, Any]:
    """The whole benchmark; returns the JSON report (headline keys at concurrency 4)."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request would skew the clients
    if not model_dir.exists():
        raise PersonaError(f"model bundle {model_dir} does not exist", "train one with `persona train --out DIR`")
    with tempfile.TemporaryDirectory(prefix="persona-bench-") as tmp:
        workdir = Path(tmp)
        main = _serve_and_measure(
            workdir,
            "main",
            model_dir,
            sessions=sessions,
            concurrencies=list(concurrencies),
            requests=requests,
            max_seconds=max_seconds,
            health=True,
            k=k,
        )
        large: dict[str, Any] | None = None
        if large_items > 0:
            t0 = time.perf_counter()
            big = build_large_bundle(workdir / "large-bundle", large_items)
            build_s = time.perf_counter() - t0
            large = _serve_and_measure(
                workdir,
                "large",
                big,
                sessions=min(sessions, 2000),
                concurrencies=[concurrencies[0]],
                requests=requests,
                max_seconds=max_seconds,
                health=False,
                k=k,
            )
            large["build_s"] = round(build_s, 1)
    head = main["by_concurrency"][str(concurrencies[0])]
    report: dict[str, Any] = {
        "rank_rps": head["rank"]["rps"],
        "health_rps": head["health"]["rps"],
        "rank_p50_ms": head["rank"]["p50_ms"],
        "rank_p99_ms": head["rank"]["p99_ms"],
        "health_p50_ms": head["health"]["p50_ms"],
        "health_p99_ms": head["health"]["p99_ms"],
        "concurrency": concurrencies[0],
        "main": main,
    }
    if large is not None:
        lhead = large["by_concurrency"][str(concurrencies[0])]["rank"]
        report.update(rank_1m_p50_ms=lhead["p50_ms"], rank_1m_p99_ms=lhead["p99_ms"], rank_1m_rps=lhead["rps"])
        report["large"] = large
    report["targets"] = {
        "rank_rps_over_health_rps": round(report["rank_rps"] / max(report["health_rps"], 1e-9), 3),
        "rank_p99_ms_le_10": report["rank_p99_ms"] <= 10.0,
        "rank_1m_p99_ms_le_25": report["rank_1m_p99_ms"] <= 25.0 if "rank_1m_p99_ms" in report else None,
    }
    report["machine"] = machine()
    report["command"] = command
    report["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    return report


def write_report(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
