"""A batch's model work while it runs: the job's inputs (:func:`build_job`), the futures of the work started on
the compute threads or in the model process (:class:`Work`), and the prequential outcome under the transaction's
bank (:class:`Scoring`)."""

from __future__ import annotations

import itertools
from concurrent.futures import Future, wait
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from persona.ingest.model_work import Early, ModelJob, Outcome, outcome
from persona.ingest.model_worker import ModelWorker, RemoteJob
from persona.ingest.plan import Plan
from persona.ingest.previous import Previous, early_input
from recsys.encoder_cache import WindowRequest
from recsys.model import PAD
from recsys.online import BankState, OnlineModel


@dataclass
class Work:
    """A plan's model work, started by :meth:`Ingestor._start` (maybe still running): in the model process
    (``remote``) or on this process's compute threads (the futures)."""

    job: ModelJob | None = None
    remote: RemoteJob | None = None
    codes: Future[Tensor] | None = None
    states: Future[Tensor] | None = None
    early: Future[Early] | None = None

    def abandon(self) -> None:
        """Drop the work (the results are not needed): compute threads must be free, the model process told."""
        if self.remote is not None:
            self.remote.drop()
        running: list[Future[Any]] = [f for f in (self.codes, self.states, self.early) if f is not None]
        wait(running)


@dataclass
class Scoring:
    """A plan's model outcome under the bank of its transaction (maybe still being computed)."""

    outcome: Future[Outcome | None] | None = None
    worker: ModelWorker | None = None  # computing it, when it is the model process

    def result(self) -> Outcome | None:
        assert self.outcome is not None
        return self.outcome.result() if self.worker is None else self.worker.wait(self.outcome)

    def abandon(self) -> None:
        """Wait until the compute threads let go of it; the model process just discards its answer."""
        if self.outcome is not None and self.worker is None:
            wait([self.outcome])


def done(value: Any) -> Future[Any]:
    done: Future[Any] = Future()
    done.set_result(value)
    return done


def local_outcome(online: OnlineModel, bank: BankState, work: Work, prev: Previous) -> Outcome:
    """:func:`persona.ingest.model_work.outcome` of work on this process's compute threads (waiting for its forward only
    once the stored previous states are scored)."""
    assert work.job is not None and work.codes is not None and work.states is not None and work.early is not None
    codes, states = work.codes, work.states
    return outcome(
        online,
        bank,
        work.job.pre_rows,
        work.early.result(),
        lambda: (codes.result(), states.result()),
        prev.codes,
        prev.protos,
        prev.states,
        repeats=work.job.repeats,
        history_groups=work.job.history_groups,
    )


def window_requests(plan: Plan) -> tuple[list[WindowRequest], list[int]]:
    """Encoder cache requests for a plan's post-event rows: one per run of a session's events in the same window
    (its rows are consecutive positions of that window); and the post-event row of each state they give."""
    requests: list[WindowRequest] = []
    order: list[int] = []
    for sid, w in plan.sessions.items():
        rows = w.rows
        lo = 0
        for hi in range(1, len(rows) + 1):
            if hi == len(rows) or rows[hi][1] != rows[lo][1]:
                last = rows[hi - 1][0]
                requests.append(WindowRequest(sid, rows[lo][1], plan.post_hist[last], hi - lo))
                order.extend(row for row, _ in rows[lo:hi])
                lo = hi
    return requests, order


def pad(histories: list[list[int]], t: int) -> torch.Tensor:
    """Left-padded [B, T] index tensor of these histories (each already at most T long)."""
    lengths = np.fromiter(map(len, histories), dtype=np.int64, count=len(histories))
    values = np.fromiter(itertools.chain.from_iterable(histories), dtype=np.int64, count=int(lengths.sum()))
    out = np.full((len(histories), t), PAD, dtype=np.int64)
    # row r's items go to its last lengths[r] columns: a boolean mask in row-major order matches the chain's order
    out[np.arange(t) >= (t - lengths)[:, None]] = values
    return torch.from_numpy(out)


def build_job(online: OnlineModel, plan: Plan, with_encoder_cache: bool) -> ModelJob:
    """The plan's model work as plain values (:mod:`persona.ingest.model_work`): the adapter's recent items, the
    stored states' half of the prequential check, the repeat counts, the predictions' history groups, and either the
    encoder cache's requests (``with_encoder_cache``) or the padded histories."""
    window = online.cfg.adapter_window
    with torch.inference_mode():
        recent = pad([h[-window:] for h in plan.post_hist], window)  # all the adapter reads
        job = ModelJob(online.version, recent, plan.pre_rows, early_input(online, plan))
        if plan.pre_counts:  # None without a repeat part, empty when nothing is predicted
            job.repeats = online.prepared_snapshots(plan.pre_counts)
            job.early.repeats = job.repeats[job.early.which]
        if online.model.bank.has_history_groups():  # each prediction's previous window: the state it is scored from
            windows = [plan.post_hist[r] if r >= 0 else plan.stored_prev[-r - 2][1] for r, _ in plan.pre_rows]
            job.history_groups = online.history_groups(pad(windows, online.cfg.max_len))
        if with_encoder_cache:
            job.requests, job.order = window_requests(plan)
        else:
            job.histories = pad(plan.post_hist, online.cfg.max_len)
    return job
