"""The demo's example sessions: picked by a fixed rule, ranked just before their last event, printed side by side."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
from fastapi.testclient import TestClient

from persona.models import ModelProvider
from persona.settings import Settings
from persona.store import Store
from persona_cli.demo_sessions import (
    SessionExample,
    format_sessions,
    item_labels,
    pick_sessions,
    replayed_frame,
    session_examples,
)
from recsys.data import load_interactions
from recsys.online import OnlineModel
from serving.app import create_app
from streaming.bench import TINY_SOURCE


def _frame(rows: list[tuple[str, str]]) -> pl.DataFrame:
    return pl.DataFrame(
        {"user_id": [u for u, _ in rows], "item_id": [i for _, i in rows], "ts": [float(n) for n in range(len(rows))]}
    )


def test_sessions_are_picked_by_a_fixed_rule_on_catalogue_items() -> None:
    rows = []
    for user in ("10", "9", "100", "2", "x"):
        rows += [(user, f"i{n}") for n in range(6)]
    rows += [("3", f"i{n}") for n in range(5)]  # too short
    rows += [("4", "i1")] * 3 + [("4", f"i{n}") for n in range(2, 6)] + [("4", "i1")]  # last item chosen before
    rows += [("5", "unknown")] * 4 + [("5", "i1"), ("5", "i2")]  # four of its events are off the catalogue
    rows += [("2", "unknown")]  # after its last catalogue event: skipped by the consumer, so not its "last"
    catalogue = [f"i{n}" for n in range(6)]
    picked = pick_sessions(_frame(rows), catalogue)
    # candidates by numeric id: 2, 9, 10, 100, then the non-numeric x; first, middle, last
    assert [p[0] for p in picked] == ["2", "10", "x"]
    assert picked[0] == ("2", ["i0", "i1", "i2", "i3", "i4"], "i5")
    assert pick_sessions(_frame(rows), catalogue) == picked  # deterministic
    assert [p[0] for p in pick_sessions(_frame(rows), catalogue, n=10)] == ["2", "9", "10", "100", "x"]


def test_the_replayed_frame_is_the_replays_order_and_limit() -> None:
    df = pl.DataFrame({"user_id": ["a", "b", "c", "d", "e"], "item_id": ["1"] * 5, "ts": [5.0, 1.0, 3.0, 3.0, 4.0]})
    assert replayed_frame(df, 0.2)["user_id"].to_list() == ["c", "d", "e", "a"]  # ties keep file order
    assert replayed_frame(df, 0.2, limit=2)["user_id"].to_list() == ["c", "d"]


def test_the_sessions_section_marks_the_next_item_in_both_lists() -> None:
    titles = {"a": "Alien", "b": "Brazil", "c": "Casablanca", "t": "The Thing", "h": "Heat"}
    ex = SessionExample(
        "42",
        history=["h", "a", "b"],
        target="t",
        persona=["c", "t", "a", "b", "h", "x"],
        base=["a", "b", "c"],
    )
    lines = format_sessions([ex], lambda i: titles.get(i, f"item {i}"), width=12)
    assert lines[0].startswith("1 sessions of the replay, just before their last event")
    assert lines[2] == "session 42 (3 items before) · last: Heat · Alien · Brazil"
    assert lines[3] == "   #    Persona       base"
    assert lines[4] == "   1    Casablanca    Alien"
    assert lines[5] == "   2  * The Thing     Brazil"
    assert lines[6] == "   3    Alien         Casablanca"
    assert lines[8] == "   5    Heat"  # the base ranking has only three items
    assert lines[9] == "  next: The Thing: Persona rank 2 · base not in its top 3"


@pytest.fixture
def api(items_bundle: Path, tmp_path: Path) -> Iterator[TestClient]:
    store = Store.open(f"sqlite:///{(tmp_path / 'store' / 'p.db').as_posix()}")
    models = ModelProvider(store, model_dir=items_bundle, refresh_s=60)
    try:
        with TestClient(create_app(Settings(), store=store, models=models)) as client:
            yield client
    finally:
        store.close()


def test_examples_rank_each_session_before_its_last_event(api: TestClient, items_bundle: Path) -> None:
    online = OnlineModel.load(items_bundle)
    replayed = replayed_frame(load_interactions(TINY_SOURCE), 0.7)
    examples = session_examples(api, online, replayed)
    assert [e.session_id for e in examples] == [p[0] for p in pick_sessions(replayed, online.vocab.ids)]
    assert len(examples) == 3
    for ex in examples:
        history = ex.history[-online.cfg.max_len :]
        stateless = api.post("/v1/recommendations", json={"recent_items": history, "k": 1000}).json()
        assert ex.persona == [i["item_id"] for i in stateless["items"]]
        idx, _ = online.rank(online.histories([history]), k=10, exclude_seen=True)
        assert ex.base[:10] == online.decode(idx[0])
        assert len(ex.base) == online.n_items - 2 - len(set(history))  # the whole catalogue but the seen items
        assert not set(history) & set(ex.persona) and not set(history) & set(ex.base)
        assert ex.rank(ex.base) is not None and ex.base[ex.rank(ex.base) - 1] == ex.target  # type: ignore[operator]
        assert ex.target not in ex.history
    label = item_labels(online)
    item = online.vocab.ids[3]
    assert label(item).startswith(f"Film {item} (19")


def test_items_without_metadata_are_labelled_by_id(tiny_bundle: Path) -> None:
    online = OnlineModel.load(tiny_bundle)
    item = online.vocab.ids[0]
    assert item_labels(online)(item) == f"item {item}"
