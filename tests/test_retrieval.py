"""The norm-ordered index returns exactly the full-catalogue top-k, with exclusions, for any table."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import recsys.online
from persona.ingest import Ingestor
from persona.models import ModelProvider
from persona.store import Store
from recsys.model import PAD, UNK
from recsys.retrieval import NormOrderedIndex
from serving.ranking import Ranker, RankQuery
from tests.test_ingest import make_events

Tensor = torch.Tensor


def _full_top_k(targets: Tensor, queries: Tensor, k: int, never: tuple[int, ...], exclude: Tensor | None) -> Tensor:
    scores = queries @ targets.T
    scores[:, list(never)] = float("-inf")
    if exclude is not None:
        scores.scatter_(1, exclude, float("-inf"))
    return scores.topk(k, dim=1).values


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(3, 3000),
    dim=st.integers(1, 12),
    b=st.integers(1, 5),
    k=st.integers(1, 40),
    chunk=st.sampled_from([1, 7, 64, 1024]),
    seed=st.integers(0, 2**16),
    spread=st.sampled_from([0.1, 1.0, 10.0]),
)
def test_the_index_returns_exactly_the_full_top_k(
    n: int, dim: int, b: int, k: int, chunk: int, seed: int, spread: float
) -> None:
    g = torch.Generator().manual_seed(seed)
    # Norms from a wide range, as trained tables have (popular items far out), and a shared offset so that
    # many scores are negative.
    targets = torch.randn(n, dim, generator=g) * torch.rand(n, 1, generator=g).pow(3) * spread + 0.3
    queries = torch.randn(b, dim, generator=g)
    exclude = torch.randint(0, n, (b, 5), generator=g)
    index = NormOrderedIndex(targets, excluded=(PAD, UNK), chunk=chunk)
    kk = min(k, n - 2)
    indices, values = index.top_k(queries, k, exclude)
    expected = _full_top_k(targets, queries, kk, (PAD, UNK), exclude)
    torch.testing.assert_close(values, expected)
    # The returned items really have those scores (ties may swap items, never scores), and none is excluded.
    finite = torch.isfinite(values)
    got = (queries.unsqueeze(1) @ targets[indices].transpose(1, 2)).squeeze(1)
    torch.testing.assert_close(got[finite], values[finite])
    assert not bool(((indices.unsqueeze(2) == exclude.unsqueeze(1)).any(2) & finite).any())
    assert not bool(((indices == PAD) | (indices == UNK))[finite].any())


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(3, 2000),
    b=st.integers(1, 4),
    k=st.integers(1, 30),
    chunk=st.sampled_from([1, 16, 256]),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([0.0, 0.5, 5.0]),
)
def test_the_index_stays_exact_with_a_group_bias(n: int, b: int, k: int, chunk: int, seed: int, scale: float) -> None:
    """A non-negative per-row bias (the prototypes' group bias) added to the scores: still the full top-k."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.randn(n, 6, generator=g) * torch.rand(n, 1, generator=g).pow(3) * 3.0 + 0.3
    queries = torch.randn(b, 6, generator=g)
    bias = torch.rand(b, n, generator=g).pow(8) * scale  # a few items get most of it, as counts do
    index = NormOrderedIndex(targets, excluded=(PAD, UNK), chunk=chunk)
    values = index.top_k(queries, k, bias=bias)[1]
    scores = queries @ targets.T + bias
    scores[:, [PAD, UNK]] = float("-inf")
    torch.testing.assert_close(values, scores.topk(min(k, n - 2), dim=1).values)


def test_a_negative_bias_is_refused() -> None:
    index = NormOrderedIndex(torch.randn(10, 3), excluded=(PAD, UNK))
    with pytest.raises(ValueError, match=">= 0"):
        index.top_k(torch.randn(1, 3), 3, bias=torch.full((1, 10), -1.0))


def test_the_scan_stops_early_on_a_skewed_table() -> None:
    """What the index is for: with a few long vectors, the top-k is found without reading the rest."""
    g = torch.Generator().manual_seed(0)
    targets = torch.randn(100_000, 8, generator=g) * 0.1
    targets[:50] *= 100  # fifty far-out items
    index = NormOrderedIndex(targets, chunk=1000)
    scanned: list[int] = []
    original = index.table_t

    class Spy:
        """Records which columns of the table are read."""

        shape = original.shape

        def __getitem__(self, key: tuple[slice, slice]) -> Tensor:
            scanned.append(key[1].stop - key[1].start)
            return original[key]

    index.table_t = Spy()  # type: ignore[assignment]
    index.top_k(torch.randn(3, 8, generator=g), 10)
    assert sum(scanned) <= 2000  # two chunks of 1,000 out of 100,000


@pytest.fixture(params=["tiny", "group-bias"])
def models(store: Store, request: pytest.FixtureRequest) -> ModelProvider:
    """The tiny bundle, and the same with its prototypes' group bias on (rankings add it, the index too)."""
    bundle = request.getfixturevalue("tiny_bundle" if request.param == "tiny" else "group_bias_bundle")
    models = ModelProvider(store, model_dir=bundle)
    Ingestor(store, models).apply(make_events(models.get(), 200, sessions=8, seed=11))
    return models


def test_rankings_through_the_index_equal_full_scans(
    store: Store, models: ModelProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    ranker = Ranker(store, models)
    queries = [RankQuery(session_id=f"s{n}", k=15, exclude_seen=n % 2 == 0) for n in range(8)]
    assert models.get().index is None  # a small catalogue scores every item
    full = ranker.rank(queries)
    monkeypatch.setattr(recsys.online, "INDEXED_FROM", 0)
    assert models.get().index is not None
    indexed = ranker.rank(queries)
    for a, b in zip(full, indexed, strict=True):
        assert [s for _, s in a.items] == pytest.approx([s for _, s in b.items], rel=1e-5, abs=1e-6)
        assert [i for i, _ in a.items] == [i for i, _ in b.items]


def test_api_rankings_add_the_group_bias_of_the_sessions_prototype(store: Store, group_bias_bundle: Path) -> None:
    models = ModelProvider(store, model_dir=group_bias_bundle)
    online = models.get()
    Ingestor(store, models).apply(make_events(online, 200, sessions=8, seed=11))
    ranker = Ranker(store, models)
    result = ranker.rank([RankQuery(session_id="s3", k=10, exclude_seen=False)])[0]
    state = store.get_session("s3")
    assert state is not None and result.prototype_id == state.prototype_id
    bank = ranker.bank(online)
    assert bank.next_items is not None
    hist = online.histories([state.recent_items], [state.event_count - len(state.recent_items)])
    edit = online.edit(online.codes(hist), bank, torch.tensor([state.prototype_id]), hist)
    expected = online.rank(hist, edit, k=10, bank=bank)
    assert [i for i, _ in result.items] == online.decode(expected[0][0])
    without = online.scores_from_states(online.user_states(hist), edit._replace(prototype=torch.tensor([-1])))
    assert [i for i, _ in result.items] != online.decode(without.topk(10).indices[0])  # the bias matters here
