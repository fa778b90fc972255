"""Item names and attributes: read from the dataset's item file, kept in the bundle, returned by the API.

A bundle trained with an item file answers every ranked item with its title, and the attributes a client asks
for with ``fields``; a bundle without one ranks exactly as before, with a null title, and refuses ``fields``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from persona.models import ModelProvider
from persona.settings import Settings
from persona.store import Store
from recsys.bundle import ITEMS, load_bundle, verify_bundle
from recsys.data import load_item_metadata, read_item_file
from recsys.errors import BundleError
from recsys.online import OnlineModel
from serving.app import create_app
from tests.fixtures_model import MISSING_ITEM


def test_ml100k_item_file_gives_titles_years_and_genres() -> None:
    meta = load_item_metadata("ml-100k")
    assert meta is not None and meta.columns == ["item_id", "title", "year", "genres"]
    assert meta.height == 1682 and meta["item_id"].n_unique() == 1682
    star_wars = meta.filter(meta["item_id"] == "50").row(0, named=True)
    assert star_wars == {
        "item_id": "50",
        "title": "Star Wars",
        "year": 1977,
        "genres": ["Action", "Adventure", "Romance", "Sci-Fi", "War"],
    }
    assert meta["year"].null_count() == 2  # the file's two non-years ('V', 'unkonwn') are unknown, not text


def test_sources_without_an_item_file_have_no_metadata(tmp_path: Path) -> None:
    assert load_item_metadata("synthetic:users=10,items=5,events=50") is None
    inter = tmp_path / "x.inter"
    inter.write_text("user_id:token\titem_id:token\ttimestamp:float\nu\ti\t1\n")
    assert load_item_metadata(str(inter)) is None
    (tmp_path / "x.csv").write_text("user_id,item_id,ts\nu,i,1\n")
    assert load_item_metadata(str(tmp_path / "x.csv")) is None


def test_item_file_types_follow_its_header_and_reserved_names_are_prefixed(tmp_path: Path) -> None:
    path = tmp_path / "shop.item"
    path.write_text(
        "item_id:token\tname:token_seq\tprice:float\ttags:token_seq\tscore:token\n"
        "a\tRed Shoe\t9.5\tshoe red\thigh\n"
        "b\t\t\t\t\n"
        "a\tduplicate row\t1\tx\ty\n"
    )
    meta = read_item_file(path)
    assert meta.columns == ["item_id", "title", "price", "tags", "item_score"]
    assert meta.to_dicts() == [
        {"item_id": "a", "title": "Red Shoe", "price": 9.5, "tags": ["shoe", "red"], "item_score": "high"},
        {"item_id": "b", "title": None, "price": None, "tags": None, "item_score": None},
    ]


def test_the_bundle_keeps_the_item_table_checksummed(items_bundle: Path, tmp_path: Path) -> None:
    manifest = verify_bundle(items_bundle)
    assert f"{ITEMS}.json" in manifest["files"]
    online = OnlineModel.load(items_bundle)
    assert online.items is not None and online.items.fields == ("title", "year", "genres")
    item = online.vocab.ids[3]
    assert online.describe([item], ["genres"]) == [{"title": f"Film {item}", "genres": ["Drama", "Sci-Fi"]}]
    assert online.known(MISSING_ITEM)
    assert online.describe([MISSING_ITEM], ["year"]) == [{"title": None, "year": None}]

    copy = tmp_path / "copy"
    shutil.copytree(items_bundle, copy)
    doc = json.loads((copy / "items.json").read_text())
    doc["columns"]["title"][3] = "Another title"
    (copy / "items.json").write_text(json.dumps(doc))
    with pytest.raises(BundleError, match=r"items\.json (is truncated or altered|fails its checksum)"):
        load_bundle(copy)


def test_a_bundle_without_item_metadata_has_no_items_file(tiny_bundle: Path) -> None:
    assert f"{ITEMS}.json" not in verify_bundle(tiny_bundle)["files"]
    online = OnlineModel.load(tiny_bundle)
    assert online.items is None
    assert online.describe(online.vocab.ids[:2], ()) == [{"title": None}, {"title": None}]


@pytest.fixture
def client_for(tmp_path: Path) -> Iterator[Any]:
    opened: list[tuple[Store, TestClient]] = []

    def make(bundle: Path) -> TestClient:
        store = Store.open(f"sqlite:///{(tmp_path / f'store-{len(opened)}' / 'p.db').as_posix()}")
        models = ModelProvider(store, model_dir=bundle, refresh_s=60)
        client = TestClient(create_app(Settings(), store=store, models=models), raise_server_exceptions=False)
        client.__enter__()
        opened.append((store, client))
        events = [
            {"event_id": f"e{n}", "session_id": "s", "item_id": item, "ts": 1.7e9 + n}
            for n, item in enumerate(models.get().vocab.ids[10:16])
        ]
        assert client.post("/v1/events", json={"events": events}).status_code == 200
        return client

    yield make
    for store, client in opened:
        client.__exit__(None, None, None)
        store.close()


def test_rankings_carry_titles_and_the_requested_fields(items_bundle: Path, client_for: Any) -> None:
    client = client_for(items_bundle)
    plain = client.get("/v1/sessions/s/recommendations", params={"k": 5}).json()
    assert len(plain["items"]) == 5
    for item in plain["items"]:
        assert set(item) == {"item_id", "score", "rank", "title"}
        assert item["title"] == (None if item["item_id"] == MISSING_ITEM else f"Film {item['item_id']}")

    wide = client.get("/v1/sessions/s/recommendations", params={"k": 5, "fields": "year, genres,year"}).json()
    assert [i["item_id"] for i in wide["items"]] == [i["item_id"] for i in plain["items"]]  # same ranking
    for item in wide["items"]:
        assert set(item) == {"item_id", "score", "rank", "title", "year", "genres"}
        if item["item_id"] != MISSING_ITEM:
            assert isinstance(item["year"], int) and item["genres"] == ["Drama", "Sci-Fi"]

    body = {"session_id": "s", "k": 5, "fields": ["genres"]}
    posted = client.post("/v1/recommendations", json=body).json()
    assert [set(i) for i in posted["items"]] == [{"item_id", "score", "rank", "title", "genres"}] * 5
    batch = client.post("/v1/recommendations:batch", json={"requests": [body, {"session_id": "s", "k": 2}]}).json()
    without_scores = [{k: v for k, v in i.items() if k != "score"} for i in posted["items"]]
    assert [{k: v for k, v in i.items() if k != "score"} for i in batch["results"][0]["items"]] == without_scores
    assert [set(i) for i in batch["results"][1]["items"]] == [{"item_id", "score", "rank", "title"}] * 2

    missing = client.post("/v1/recommendations", json={"recent_items": ["i5"], "candidates": [MISSING_ITEM]}).json()
    assert missing["items"][0]["title"] is None

    bad = client.get("/v1/sessions/s/recommendations", params={"fields": "year,colour"})
    assert bad.status_code == 422
    problem = bad.json()
    assert "unknown item field 'colour'" in problem["detail"] and "title, year, genres" in problem["detail"]


def test_without_item_metadata_rankings_are_unchanged_and_fields_are_refused(
    tiny_bundle: Path, client_for: Any
) -> None:
    client = client_for(tiny_bundle)
    body = client.get("/v1/sessions/s/recommendations", params={"k": 5}).json()
    assert [set(i) for i in body["items"]] == [{"item_id", "score", "rank", "title"}] * 5
    assert all(i["title"] is None for i in body["items"])
    bad = client.post("/v1/recommendations", json={"session_id": "s", "fields": ["year"]})
    assert bad.status_code == 422
    assert bad.json()["errors"][0]["loc"] == ["body", "fields"]
    assert "no item metadata" in bad.json()["detail"]
