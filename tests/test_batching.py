"""Micro-batching of concurrent rankings: one forward for many requests, same results, errors kept apart."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from persona.ingest import Ingestor
from persona.models import ModelProvider
from persona.store import Store
from serving.batching import RankBatcher
from serving.problems import InvalidInput, Overloaded
from serving.ranking import Ranker, RankQuery, RankResult
from tests.test_ingest import make_events


@pytest.fixture
def ranker(store: Store, tiny_bundle: Path) -> Iterator[Ranker]:
    models = ModelProvider(store, model_dir=tiny_bundle)
    Ingestor(store, models).apply(make_events(models.get(), 200, sessions=10, seed=7))
    yield Ranker(store, models)


def _gather(batcher: RankBatcher, queries: list[RankQuery]) -> list[RankResult | BaseException]:
    async def main() -> list[RankResult | BaseException]:
        return await asyncio.gather(*(batcher.rank(q) for q in queries), return_exceptions=True)

    return asyncio.run(main())


#: The default keeps the tiny test model on the event loop; 1 sends every batch to the worker threads.
PLACES = pytest.mark.parametrize("offload_floats", [None, 1], ids=["on-loop", "worker-threads"])


def _batcher(ranker: Ranker, offload_floats: int | None, **kw: object) -> RankBatcher:
    batcher = RankBatcher(ranker, **kw) if offload_floats is None else RankBatcher(ranker, offload_floats=1, **kw)
    assert batcher.offloads() == (offload_floats is not None)
    return batcher


@PLACES
def test_concurrent_requests_share_one_forward_and_get_their_own_ranking(
    ranker: Ranker, offload_floats: int | None
) -> None:
    sizes: list[int] = []
    batcher = _batcher(ranker, offload_floats, on_batch=sizes.append)
    queries = [RankQuery(session_id=f"s{n}", k=5) for n in range(10)]
    results = _gather(batcher, queries)
    assert sizes == [10]  # all ten were pending when the drain ran: one batched forward
    alone = [ranker.rank([q])[0] for q in queries]
    for got, expected in zip(results, alone, strict=True):
        assert isinstance(got, RankResult)
        assert got.session_id == expected.session_id
        assert [i for i, _ in got.items] == [i for i, _ in expected.items]
        assert [s for _, s in got.items] == pytest.approx([s for _, s in expected.items], rel=1e-5, abs=1e-6)


@PLACES
def test_batches_are_capped(ranker: Ranker, offload_floats: int | None) -> None:
    sizes: list[int] = []
    batcher = _batcher(ranker, offload_floats, max_batch=4, on_batch=sizes.append)
    results = _gather(batcher, [RankQuery(session_id=f"s{n % 10}") for n in range(10)])
    batcher.close()
    assert sorted(sizes, reverse=True) == [4, 4, 2]  # on worker threads two batches may run at once
    assert all(isinstance(r, RankResult) for r in results)


@PLACES
def test_a_bad_query_fails_only_its_own_request(ranker: Ranker, offload_floats: int | None) -> None:
    queries = [RankQuery(session_id="s1"), RankQuery(), RankQuery(session_id="s2")]  # the middle one is empty
    results = _gather(_batcher(ranker, offload_floats), queries)
    assert isinstance(results[0], RankResult) and results[0].session_id == "s1"
    assert isinstance(results[1], InvalidInput)
    assert isinstance(results[2], RankResult) and results[2].session_id == "s2"


def test_a_lone_request_is_ranked_without_waiting_for_company(ranker: Ranker) -> None:
    sizes: list[int] = []
    batcher = RankBatcher(ranker, on_batch=sizes.append)
    for n in range(3):
        [result] = _gather(batcher, [RankQuery(session_id=f"s{n}")])
        assert isinstance(result, RankResult)
    assert sizes == [1, 1, 1]


@PLACES
def test_back_to_back_requests_on_one_loop_are_all_served(ranker: Ranker, offload_floats: int | None) -> None:
    """A request that arrives just as the previous drain ends must still be ranked (regression: it waited
    forever when the finished drainer was still counted as running)."""
    batcher = _batcher(ranker, offload_floats)

    async def one_after_another() -> list[RankResult]:
        return [await batcher.rank(RankQuery(session_id=f"s{n}")) for n in range(6)]

    async def main() -> list[RankResult]:
        return await asyncio.wait_for(one_after_another(), timeout=10)

    results = asyncio.run(main())
    batcher.close()
    assert [r.session_id for r in results] == [f"s{n}" for n in range(6)]


def test_max_batch_must_be_positive(ranker: Ranker) -> None:
    with pytest.raises(ValueError, match="max_batch"):
        RankBatcher(ranker, max_batch=0)
    with pytest.raises(ValueError, match="workers"):
        RankBatcher(ranker, workers=0)


def test_a_full_queue_sheds_the_request_at_once_and_the_rest_are_served(ranker: Ranker) -> None:
    shed: list[int] = []
    batcher = RankBatcher(ranker, max_pending=3, on_shed=lambda: shed.append(1))
    results = _gather(batcher, [RankQuery(session_id=f"s{n}", k=5) for n in range(5)])
    assert [type(r).__name__ for r in results] == ["RankResult"] * 3 + ["Overloaded"] * 2
    refused = results[3]
    assert isinstance(refused, Overloaded) and refused.status == 503 and "3 ranking requests" in str(refused)
    assert len(shed) == 2 and batcher._pending == []
    # Once the queue drained, requests are taken again.
    assert all(isinstance(r, RankResult) for r in _gather(batcher, [RankQuery(session_id="s1", k=5)] * 3))
