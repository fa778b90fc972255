"""Micro-batching: concurrent single ranking requests share one batched :meth:`Ranker.rank` call.

A ranking's cost is mostly per call, not per row (one store query, one edit generation, one head and item
matmul), so under concurrency many requests ranked together cost little more than one. The batcher lives on
the event loop: a request appends its query and awaits a future; the first request of an idle batcher starts
a drain task that ranks whatever is pending (at most ``max_batch`` at a time), resolves the futures and goes
again until nothing is left. Nobody waits for a batch to fill: with one request in flight it is ranked on the
next turn of the loop; batches only form from requests that arrive while an earlier batch runs.

The ranking runs on the loop thread itself, not in the threadpool: a thread hop per request cost more than a
whole stored-session ranking (measured in docs/performance.md), and rankings are short. ``max_batch`` bounds
how long the loop is held.

Errors stay per request: if a batch fails, each of its queries is ranked alone, so one bad query (or one that
trips a limit) fails only its own request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from serving.ranking import Ranker, RankQuery, RankResult


class RankBatcher:
    """Coalesces concurrent :class:`RankQuery` s of one event loop into batched :meth:`Ranker.rank` calls."""

    def __init__(self, ranker: Ranker, *, max_batch: int = 32, on_batch: Callable[[int], None] | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.ranker = ranker
        self.max_batch = max_batch
        self.on_batch = on_batch
        self._pending: list[tuple[RankQuery, asyncio.Future[RankResult]]] = []
        self._drainer: asyncio.Task[None] | None = None

    async def rank(self, query: RankQuery) -> RankResult:
        """Rank one query, together with whatever else is pending on this loop."""
        future: asyncio.Future[RankResult] = asyncio.get_running_loop().create_future()
        self._pending.append((query, future))
        if self._drainer is None:
            # A task of its own, so that each request waits for its own result only, not for the queue to empty.
            self._drainer = asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._pending:
                # One more turn of the loop first: requests whose bytes arrived together join this batch.
                await asyncio.sleep(0)
                batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
                self._run(batch)
        finally:
            self._drainer = None

    def _run(self, batch: list[tuple[RankQuery, asyncio.Future[RankResult]]]) -> None:
        if self.on_batch is not None:
            self.on_batch(len(batch))
        try:
            results = self.ranker.rank([q for q, _ in batch])
        except Exception as exc:
            if len(batch) == 1:
                _settle(batch[0][1], exc=exc)
                return
            for query, future in batch:  # attribute the failure to the query (or queries) that cause it
                try:
                    [result] = self.ranker.rank([query])
                except Exception as one:
                    _settle(future, exc=one)
                else:
                    _settle(future, result=result)
            return
        for (_query, future), result in zip(batch, results, strict=True):
            _settle(future, result=result)


def _settle(
    future: asyncio.Future[RankResult], *, result: RankResult | None = None, exc: BaseException | None = None
) -> None:
    if future.done():  # the client went away and its request was cancelled
        return
    if exc is not None:
        future.set_exception(exc)
    elif result is not None:
        future.set_result(result)
