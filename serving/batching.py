"""Micro-batching: concurrent single ranking requests share one batched :meth:`Ranker.rank` call.

A ranking's cost is mostly per call, not per row (one store query, one edit generation, one head and item
matmul), so under concurrency many requests ranked together cost little more than one. The batcher lives on
the event loop: a request appends its query and awaits a future; the first request of an idle batcher starts
a drain task that ranks whatever is pending (at most ``max_batch`` at a time), resolves the futures and goes
again until nothing is left. Nobody waits for a batch to fill: with one request in flight it is ranked on the
next turn of the loop; batches only form from requests that arrive while an earlier batch runs.

Where a batch runs depends on the live model's catalogue. A small one (below ``offload_floats`` item-table
floats, e.g. MovieLens) is ranked on the loop thread itself: a thread hop per request cost more than a whole
stored-session ranking (docs/performance.md), and ``max_batch`` bounds how long the loop is held. A large one
(1M items: ~2 ms per ranking) goes to ``workers`` threads: the loop stays free for health checks and other routes.
One worker (the default) is usually best there: a ranking is bound by reading the item table, and one scan
serves a whole batch, so the requests that queue behind a running batch share the next scan instead of each
paying for its own on another thread (measured on 2 cores at concurrency 4: p99 ~19 ms with one worker, ~25 ms
with two, same throughput).

The queue is bounded (``max_pending``): a request arriving when that many are already waiting is refused at once
with 503 and ``Retry-After`` (load shedding), so an overload shows as fast refusals a client can retry elsewhere,
not as every request's latency growing without limit.

Errors stay per request: if a batch fails, each of its queries is ranked alone, so one bad query (or one that
trips a limit) fails only its own request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from serving.problems import Overloaded
from serving.ranking import Ranker, RankQuery, RankResult

#: Item-table size (items × dim floats) from which batches leave the event loop: 4M floats = 16 MB.
OFFLOAD_FLOATS = 1 << 22

Outcome = RankResult | Exception


class RankBatcher:
    """Coalesces concurrent :class:`RankQuery` s of one event loop into batched :meth:`Ranker.rank` calls."""

    def __init__(
        self,
        ranker: Ranker,
        *,
        max_batch: int = 32,
        workers: int = 1,
        max_pending: int = 1024,
        offload_floats: int = OFFLOAD_FLOATS,
        on_batch: Callable[[int], None] | None = None,
        on_shed: Callable[[], None] | None = None,
    ) -> None:
        if max_batch < 1 or workers < 1 or max_pending < 1:
            raise ValueError(
                f"max_batch, workers and max_pending must be >= 1, got {max_batch}, {workers}, {max_pending}"
            )
        self.ranker = ranker
        self.max_batch = max_batch
        self.max_pending = max_pending
        self.on_shed = on_shed
        self.workers = workers
        self.offload_floats = offload_floats
        self.on_batch = on_batch
        self._pending: list[tuple[RankQuery, asyncio.Future[RankResult]]] = []
        self._drainers: set[asyncio.Task[None]] = set()
        self._executor: ThreadPoolExecutor | None = None

    def offloads(self) -> bool:
        """Whether batches of the live model run on worker threads (large catalogue) or on the loop."""
        online = self.ranker.models.get()
        return online.n_items * online.cfg.dim >= self.offload_floats

    async def rank(self, query: RankQuery) -> RankResult:
        """Rank one query, together with whatever else is pending on this loop."""
        loop = asyncio.get_running_loop()
        # Drain tasks of their own, so that each request waits for its own result only. On the loop one drainer
        # is enough (a second would only split batches); worker threads get one each. Decided before queueing:
        # with no model loaded this raises (503) and nothing is left behind in the queue.
        drainers = self.workers if self.offloads() else 1
        if len(self._pending) >= self.max_pending:
            if self.on_shed is not None:
                self.on_shed()
            raise Overloaded(
                f"{len(self._pending)} ranking requests are already waiting in this process",
                "retry shortly, or on another replica",
            )
        future: asyncio.Future[RankResult] = loop.create_future()
        self._pending.append((query, future))
        if len(self._drainers) < drainers:
            self._drainers.add(loop.create_task(self._drain()))
        return await future

    def close(self) -> None:
        """Stop the worker threads (after the batches they run); the app's lifespan calls it on shutdown."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=False)
            self._executor = None

    async def _drain(self) -> None:
        try:
            while self._pending:
                await self._drain_one()
        finally:
            # Deregister in the same step that saw the queue empty: a done-callback would run a turn later, and a
            # request arriving in between would count this finished drainer as running and wait forever.
            task = asyncio.current_task()
            if task is not None:
                self._drainers.discard(task)

    async def _drain_one(self) -> None:
        # One more turn of the loop first: requests whose bytes arrived together join this batch.
        await asyncio.sleep(0)
        if self._pending:
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
            if self.on_batch is not None:
                self.on_batch(len(batch))
            queries = [q for q, _ in batch]
            try:
                if self.offloads():
                    if self._executor is None:
                        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="persona-rank")
                    loop = asyncio.get_running_loop()
                    outcomes = await loop.run_in_executor(self._executor, self._outcomes, queries)
                else:
                    outcomes = self._outcomes(queries)
            except BaseException as exc:  # never leave a request waiting: fail (or cancel) the whole batch
                for _query, future in batch:
                    if not future.done():
                        future.set_exception(exc) if isinstance(exc, Exception) else future.cancel()
                raise
            for (_query, future), outcome in zip(batch, outcomes, strict=True):
                if future.done():  # the client went away and its request was cancelled
                    continue
                if isinstance(outcome, Exception):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)

    def _outcomes(self, queries: Sequence[RankQuery]) -> list[Outcome]:
        """Each query's result or error (thread-safe: :class:`Ranker` keeps no per-request state)."""
        try:
            return list(self.ranker.rank(queries))
        except Exception as exc:
            if len(queries) == 1:
                return [exc]
        outcomes: list[Outcome] = []
        for query in queries:  # attribute the failure to the query (or queries) that cause it
            try:
                outcomes.extend(self.ranker.rank([query]))
            except Exception as one:
                outcomes.append(one)
        return outcomes
