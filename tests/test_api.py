"""The serving API end to end: real app, real store (SQLite and PostgreSQL), the tiny trained bundle.

Every ranking is checked against the recsys library's own output for the same stored state, so the API can
never drift from what the consumer and an on-device copy of the model compute.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from persona.bank_rows import bank_from_rows
from persona.models import ModelProvider
from persona.settings import Settings
from persona.store import Store
from persona.user_state import pack_user_state
from recsys.model import Edit
from recsys.online import BankState, OnlineModel, code_from_bytes
from serving.admission import TokenBuckets, key_matches
from serving.app import create_app
from tests.fixtures_store import set_reachable

KEY = "s3cret-admin-key"
CLIENT_KEY = "s3cret-client-key"


@dataclass
class Api:
    client: TestClient
    store: Store
    models: ModelProvider

    @property
    def online(self) -> OnlineModel:
        return self.models.get()

    def ingest(self, session_id: str, items: list[str], start: int = 0) -> dict[str, Any]:
        events = [
            {"event_id": f"{session_id}-{start + n}", "session_id": session_id, "item_id": item, "ts": 1.7e9 + n}
            for n, item in enumerate(items)
        ]
        r = self.client.post("/v1/events", json={"events": events})
        assert r.status_code == 200, r.text
        return dict(r.json())


def _app(store: Store, models: ModelProvider, **settings: Any) -> TestClient:
    return TestClient(create_app(Settings(**settings), store=store, models=models), raise_server_exceptions=False)


@pytest.fixture
def api(store_url: str, tiny_bundle: Path) -> Iterator[Api]:
    store = Store.open(store_url)
    models = ModelProvider(store, model_dir=tiny_bundle, refresh_s=60)
    try:
        with _app(store, models, admin_api_keys=[KEY], api_keys=[CLIENT_KEY]) as client:
            yield Api(client, store, models)
    finally:
        store.close()


def _items(api: Api, start: int, n: int) -> list[str]:
    return api.online.vocab.ids[start : start + n]


def _bank(api: Api) -> BankState:
    """The stored bank as the consumer reads it (:func:`persona.bank_rows.bank_from_rows`): centres, the group
    counts the consumer refined and the prototypes' switches."""
    rows = api.store.load_prototypes(api.online.version)
    return bank_from_rows(rows, api.online) if rows else api.online.initial_bank


def _library_ranking(api: Api, session_id: str, k: int = 10, exclude_seen: bool = True) -> list[str]:
    """What the recsys library ranks for this session's stored state (DESIGN: stored code + prototype)."""
    online = api.online
    state = api.store.get_session(session_id)
    assert state is not None and state.code is not None and state.prototype_id is not None
    code = code_from_bytes(state.code, online.cfg)
    bank = _bank(api)  # the stored bank: centres and the group counts the consumer refined
    hist = online.histories([state.recent_items])
    edit = online.edit(code.unsqueeze(0), bank, prototypes=torch.tensor([state.prototype_id]), histories=hist)
    idx, scores = online.rank(hist, edit, k=k, exclude_seen=exclude_seen, bank=bank)
    keep = torch.isfinite(scores[0])
    return online.decode(idx[0][keep])


def _ranked(body: dict[str, Any]) -> list[str]:
    return [i["item_id"] for i in body["items"]]


def test_rankings_follow_each_sessions_history_and_equal_the_library(api: Api) -> None:
    api.ingest("a", _items(api, 0, 8))
    api.ingest("b", _items(api, 50, 8))
    ra = api.client.get("/v1/sessions/a/recommendations", params={"k": 10}).json()
    rb = api.client.get("/v1/sessions/b/recommendations", params={"k": 10}).json()
    assert _ranked(ra) != _ranked(rb)
    for sid, body in (("a", ra), ("b", rb)):
        assert _ranked(body) == _library_ranking(api, sid)
        assert body["model_version"] == api.online.version
        assert body["fallback"] is None and body["known_session"] is True
        assert body["edit_version"] == 8 and body["prototype_id"] is not None
        assert [i["rank"] for i in body["items"]] == list(range(1, 11))
        scores = [i["score"] for i in body["items"]]
        assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("user_state", [None, b"\0" * 12, "older-writer"])
def test_a_missing_or_unfit_stored_user_state_is_recomputed(api: Api, user_state: bytes | str | None) -> None:
    """Rows written before migration 0002 (NULL), with a state of the wrong size, or whose state an older
    writer left behind for an earlier edit version still rank exactly."""
    api.ingest("old", _items(api, 5, 9))
    state = api.store.get_session("old")
    assert state is not None and state.user_state is not None
    if user_state == "older-writer":
        state.user_state = pack_user_state(torch.zeros(api.online.cfg.dim), state.edit_version - 1)
    else:
        assert not isinstance(user_state, str)
        state.user_state = user_state
    with api.store.transaction() as uow:
        uow.upsert_sessions([state])
    body = api.client.get("/v1/sessions/old/recommendations", params={"k": 10}).json()
    assert _ranked(body) == _library_ranking(api, "old")
    assert body["fallback"] is None


def test_exclude_seen_drops_history_items_and_can_be_turned_off(api: Api) -> None:
    history = _items(api, 10, 10)
    api.ingest("s", history)
    k = api.online.n_items - 2
    seen = api.client.get("/v1/sessions/s/recommendations", params={"k": k}).json()
    assert not set(_ranked(seen)) & set(history)
    everything = api.client.get("/v1/sessions/s/recommendations", params={"k": k, "exclude_seen": False}).json()
    assert set(history) <= set(_ranked(everything))
    assert _ranked(everything)[:10] == _library_ranking(api, "s", exclude_seen=False)


def test_stateless_ranking_agrees_with_the_stored_session_for_the_same_history(api: Api) -> None:
    history = _items(api, 30, 12)
    api.ingest("s", history)
    stored = api.client.get("/v1/sessions/s/recommendations").json()
    stateless = api.client.post("/v1/recommendations", json={"recent_items": history}).json()
    assert stateless["known_session"] is False and stateless["session_id"] is None
    assert stateless["prototype_id"] == stored["prototype_id"]
    assert _ranked(stateless) == _ranked(stored)
    # Carrying the latest items with the session id = stored history + carried items (read-your-writes).
    carried = api.client.post("/v1/recommendations", json={"session_id": "s", "recent_items": _items(api, 70, 2)})
    combined = api.client.post("/v1/recommendations", json={"recent_items": history + _items(api, 70, 2)})
    assert _ranked(carried.json()) == _ranked(combined.json())


def test_unknown_items_are_ignored_and_reported(api: Api) -> None:
    history = _items(api, 0, 5)
    body = api.client.post("/v1/recommendations", json={"recent_items": [*history, "no-such-item"]}).json()
    clean = api.client.post("/v1/recommendations", json={"recent_items": history}).json()
    assert body["unknown_items_ignored"] == ["no-such-item"]
    assert _ranked(body) == _ranked(clean)


def test_candidates_restrict_the_ranking(api: Api) -> None:
    api.ingest("s", _items(api, 0, 6))
    candidates = _items(api, 40, 5)
    body = api.client.post(
        "/v1/recommendations", json={"session_id": "s", "candidates": [*candidates, "nope"], "k": 10}
    ).json()
    assert sorted(_ranked(body)) == sorted(candidates)
    assert body["unknown_candidates"] == ["nope"]
    full = _ranked(api.client.post("/v1/recommendations", json={"session_id": "s", "k": 1000}).json())
    assert _ranked(body) == [i for i in full if i in candidates]


def test_unknown_session_is_a_popularity_cold_start(api: Api) -> None:
    r = api.client.get("/v1/sessions/never-seen/recommendations", params={"k": 5})
    assert r.status_code == 200
    body = r.json()
    assert body["fallback"] == "popularity" and body["known_session"] is False and body["prototype_id"] is None
    online = api.online
    counts = np.asarray(online.item_counts, dtype=np.float64)
    assert [i["score"] for i in body["items"]] == sorted(counts, reverse=True)[:5]
    assert all(counts[online.index_of(i["item_id"])] == i["score"] for i in body["items"])
    metrics = api.client.get("/metrics").text
    assert 'persona_fallbacks_total{reason="popularity"} 1.0' in metrics


def test_read_your_writes_a_ranking_right_after_an_event_reflects_it(api: Api) -> None:
    api.ingest("s", _items(api, 0, 4))
    before = api.client.get("/v1/sessions/s/recommendations").json()
    new_item = before["items"][0]["item_id"]  # the item ranked first is now seen
    api.ingest("s", [new_item], start=4)
    after = api.client.get("/v1/sessions/s/recommendations").json()
    assert after["edit_version"] == before["edit_version"] + 1
    assert new_item not in _ranked(after)
    summary = api.client.get("/v1/sessions/s").json()
    assert summary["recent_items"][-1] == new_item and summary["event_count"] == 5


def test_edit_export_round_trips_into_the_library(api: Api) -> None:
    api.ingest("s", _items(api, 20, 9))
    exported = api.client.get("/v1/sessions/s/edit").json()
    online = api.online
    cfg = online.cfg
    assert exported["encoding"] == "float32" and exported["model_version"] == online.version
    assert len(exported["layers"]) == cfg.n_edit_layers
    assert np.asarray(exported["layers"][0]["weight"]).shape == (cfg.dim, cfg.dim)
    assert np.asarray(exported["code"]).shape == (cfg.n_edit_layers, cfg.code_dim)
    state = api.store.get_session("s")
    assert state is not None
    hist = online.histories([state.recent_items])
    edit = Edit(
        torch.tensor([[layer["weight"] for layer in exported["layers"]]], dtype=torch.float32),
        torch.tensor([[layer["bias"] for layer in exported["layers"]]], dtype=torch.float32),
        torch.tensor([exported["prototype_id"]]),
        torch.tensor([exported["code"]], dtype=torch.float32),  # what the fine groups' bias reads
        online.history_groups(hist),  # and the history groups' (of the session's window)
    )
    bank = _bank(api)
    idx, _ = online.rank(hist, edit, k=10, exclude_seen=True, bank=bank)
    group = online.group_bias(edit.prototype, edit.codes, bank, groups=edit.groups)
    assert (exported["item_bias"] is None) == (group is None)  # the edit carries its prototype's group bias
    if group is not None:
        np.testing.assert_allclose(np.asarray(exported["item_bias"]), group[0].numpy(), rtol=1e-6)
    served = api.client.get("/v1/sessions/s/recommendations").json()
    assert online.decode(idx[0]) == _ranked(served)
    assert api.client.get("/v1/sessions/unknown/edit").status_code == 404


def test_batch_equals_single_requests(api: Api) -> None:
    api.ingest("a", _items(api, 0, 5))
    requests = [
        {"session_id": "a", "k": 3},
        {"recent_items": _items(api, 60, 4), "k": 4, "exclude_seen": False},
        {"session_id": "cold"},
        {"session_id": "a", "candidates": _items(api, 80, 3)},
    ]
    r = api.client.post("/v1/recommendations:batch", json={"requests": requests})
    assert r.status_code == 200, r.text
    singles = [api.client.post("/v1/recommendations", json=q).json() for q in requests]
    assert [_ranked(b) for b in r.json()["results"]] == [_ranked(s) for s in singles]
    alias = api.client.post("/v1/recommendations/batch", json={"requests": requests})
    assert alias.json() == r.json()


def _problem(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = dict(r.json())
    assert body["status"] == status and body["title"] and body["detail"]
    return body


def test_errors_are_problem_json(api: Api) -> None:
    _problem(api.client.get("/v1/sessions/nope"), 404)
    _problem(api.client.get("/no/such/route"), 404)
    bad_k = _problem(api.client.get("/v1/sessions/s/recommendations", params={"k": 0}), 422)
    assert bad_k["errors"][0]["loc"] == ["query", "k"]
    extra = _problem(api.client.post("/v1/recommendations", json={"session_id": "s", "exlude_seen": True}), 422)
    assert extra["errors"][0]["loc"] == ["body", "exlude_seen"]
    _problem(api.client.post("/v1/recommendations", json={}), 422)
    too_long = api.online.cfg.max_len * 4 + 1
    long = _problem(api.client.post("/v1/recommendations", json={"recent_items": ["x"] * too_long}), 422)
    assert long["errors"][0]["loc"] == ["body", "recent_items"]
    _problem(api.client.post("/v1/recommendations", json={"session_id": "x" * 129}), 422)
    _problem(
        api.client.post("/v1/recommendations", content=b"{not json", headers={"content-type": "application/json"}), 422
    )
    huge = b'{"recent_items": [' + b'"a",' * 300_000 + b'"a"]}'
    _problem(api.client.post("/v1/recommendations", content=huge, headers={"content-type": "application/json"}), 413)


def test_invalid_events_are_refused_with_each_index_and_reason(api: Api) -> None:
    good = {"event_id": "e1", "session_id": "s", "item_id": _items(api, 0, 1)[0], "ts": "2026-01-01T00:00:00Z"}
    bad = [good, {**good, "event_id": "e2", "ts": "yesterday"}, {"event_id": "e3", "session_id": "s"}]
    body = _problem(api.client.post("/v1/events", json={"events": bad}), 422)
    assert [e["loc"] for e in body["errors"]] == [["body", "events", 1], ["body", "events", 2]]
    assert [e["type"] for e in body["errors"]] == ["invalid_value", "missing_field"]
    assert api.store.count_events() == 0  # all or nothing
    one = api.client.post("/v1/events", json=good)
    assert one.status_code == 200 and one.json()["applied"] == 1
    again = api.client.post("/v1/events", json=good).json()
    assert again["applied"] == 0 and again["duplicates"] == 1


def test_events_kafka_refuses_are_refused_over_http_too(api: Api) -> None:
    """Lone surrogates (escaped or as raw bytes ED A0 80), NUL and oversized events: 422 problem+json naming the
    reason, never a 500 or a stored event ("same validation as Kafka")."""
    item = _items(api, 0, 1)[0]
    good = {"event_id": "e1", "session_id": "s", "item_id": item, "ts": "2026-01-01T00:00:00Z"}
    escaped = b'{"event_id":"e2","session_id":"s-\\ud800","item_id":"' + item.encode() + b'","ts":1.7e9}'
    raw = b'{"event_id":"e3","session_id":"s-\xed\xa0\x80","item_id":"' + item.encode() + b'","ts":1.7e9}'
    nul = b'{"event_id":"e4","session_id":"s","item_id":"' + item.encode() + b'","ts":1.7e9,"note":"a\\u0000"}'
    for body in (escaped, raw, nul, b'{"events": [' + escaped + b"]}"):
        problem = _problem(
            api.client.post("/v1/events", content=body, headers={"content-type": "application/json"}), 422
        )
        assert problem["errors"][0]["type"] == "invalid_value"
    oversized = {**good, "event_id": "e5", "pad": "x" * 16_384}
    problem = _problem(api.client.post("/v1/events", json={"events": [good, oversized]}), 422)
    assert [(e["loc"], e["type"]) for e in problem["errors"]] == [(["body", "events", 1], "oversized")]
    assert "limit 16384" in problem["errors"][0]["msg"]
    assert api.store.count_events() == 0
    assert api.client.post("/v1/events", json=good).json()["applied"] == 1


def test_a_store_outage_answers_503_with_retry_after_serves_stateless_rankings_and_logs_one_line_each(
    outage_db_url: str, tiny_bundle: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = Store.open(outage_db_url)
    models = ModelProvider(store, model_dir=tiny_bundle, refresh_s=60)
    try:
        with _app(store, models) as client:
            api = Api(client, store, models)
            items = _items(api, 0, 3)
            api.ingest("s", items)
            before = client.get("/v1/sessions/s/recommendations").json()
            set_reachable(outage_db_url, False)
            caplog.clear()
            caplog.set_level(logging.INFO)
            needs_store = [
                client.get("/v1/sessions/s/recommendations"),
                client.get("/v1/sessions/never-seen/recommendations"),  # cold or not: only the store can tell
                client.post("/v1/recommendations", json={"session_id": "s", "recent_items": items[:1]}),
                client.get("/v1/sessions/s"),
                client.post("/v1/events", json={"event_id": "x", "session_id": "s", "item_id": items[0], "ts": 1.7e9}),
                client.get("/readyz"),
            ]
            for r in needs_store:
                body = _problem(r, 503)
                assert r.headers["retry-after"] == "5"
                assert "postgresql" not in body["detail"]  # the server's address stays in the log
            # no session named: still served, with the bank read before the outage (or popularity)
            stateless = client.post("/v1/recommendations", json={"recent_items": items})
            assert stateless.status_code == 200 and _ranked(stateless.json()) == _ranked(before)
            cold = client.post("/v1/recommendations", json={"recent_items": ["not-an-item"]})
            assert cold.status_code == 200 and cold.json()["fallback"] == "popularity"
            failed = [r for r in caplog.records if r.levelno >= logging.WARNING]
            assert len(failed) == len(needs_store), [r.getMessage() for r in failed]
            assert not any(r.exc_info for r in caplog.records)  # an expected outage: no traceback
            set_reachable(outage_db_url, True)
            assert _ranked(client.get("/v1/sessions/s/recommendations").json()) == _ranked(before)
    finally:
        set_reachable(outage_db_url, True)
        store.close()


def test_an_unexpected_error_is_one_500_problem_and_one_traceback(
    api: Api, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_args: Any, **_kw: Any) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(api.client.app.state.ctx.store, "get_session", broken)  # type: ignore[attr-defined]
    caplog.set_level(logging.INFO)
    # Raising client: an exception that escapes the app is what makes the server log a second traceback.
    strict = TestClient(api.client.app, raise_server_exceptions=True)
    body = _problem(strict.get("/v1/sessions/s"), 500)
    assert "a bug" not in body["detail"]
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and "unhandled error on GET /v1/sessions/s" in tracebacks[0].getMessage()


def test_admin_needs_an_admin_key_compared_in_constant_time(api: Api) -> None:
    _problem(api.client.get("/v1/admin/models"), 401)
    _problem(api.client.get("/v1/admin/models", headers={"X-API-Key": "wrong"}), 403)
    ok = api.client.get("/v1/admin/models", headers={"X-API-Key": KEY})
    assert ok.status_code == 200 and ok.json()["serving"] == api.online.version
    bearer = api.client.post("/v1/admin/models/reload", headers={"Authorization": f"Bearer {KEY}"})
    assert bearer.status_code == 200 and bearer.json()["swapped"] is False
    _problem(api.client.post("/v1/admin/models/nope/activate", headers={"X-API-Key": KEY}), 404)
    assert key_matches(KEY, ["other", KEY]) and not key_matches(KEY[:-1], [KEY])
    # A client key opens no admin route, activation included.
    version = api.online.version
    body = _problem(api.client.post(f"/v1/admin/models/{version}/activate", headers={"X-API-Key": CLIENT_KEY}), 403)
    assert "client key" in body["detail"] and "PERSONA_ADMIN_API_KEYS" in body["detail"]
    # The public routes stay open unless require_api_key is set.
    assert api.client.get("/v1/sessions/x/recommendations").status_code == 200


def test_admin_api_is_disabled_without_keys_and_require_api_key_guards_everything(api: Api) -> None:
    with _app(api.store, api.models, api_keys=[CLIENT_KEY]) as client:
        body = _problem(client.get("/v1/admin/models", headers={"X-API-Key": CLIENT_KEY}), 403)
        assert "PERSONA_ADMIN_API_KEYS" in body["detail"]
    with _app(api.store, api.models, api_keys=[CLIENT_KEY], admin_api_keys=[KEY], require_api_key=True) as client:
        assert client.get("/healthz").status_code == 200
        for path in ("/v1/sessions/x/recommendations", "/readyz", "/docs", "/openapi.json", "/metrics"):
            _problem(client.get(path), 401)
            _problem(client.get(path, headers={"X-API-Key": "wrong"}), 403)
        for key in (CLIENT_KEY, KEY):  # an admin key opens everything a client key does
            assert client.get("/v1/sessions/x/recommendations", headers={"X-API-Key": key}).status_code == 200
            assert client.get("/openapi.json", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        # The key is checked before the body is read: a malformed body without a key is 401, not 422.
        bad = client.post("/v1/recommendations", content=b"{not json", headers={"content-type": "application/json"})
        _problem(bad, 401)


def test_request_bodies_take_declared_types_only(api: Api) -> None:
    item = _items(api, 2, 1)
    assert api.client.post("/v1/recommendations", json={"recent_items": item, "k": 3}).status_code == 200
    for wrong in ({"k": "10"}, {"exclude_seen": 0}, {"k": 2.0}, {"recent_items": [5]}):
        body = _problem(api.client.post("/v1/recommendations", json={"recent_items": item, **wrong}), 422)
        assert body["errors"][0]["loc"][:2] == ["body", next(iter(wrong))]


def test_openapi_documents_the_key_schemes(api: Api) -> None:
    doc = api.client.get("/openapi.json").json()
    assert doc["components"]["securitySchemes"]["ApiKey"] == {"type": "apiKey", "in": "header", "name": "X-API-Key"}
    assert doc["components"]["securitySchemes"]["Bearer"] == {"type": "http", "scheme": "bearer"}
    assert doc["paths"]["/v1/admin/models"]["get"]["security"] == [{"ApiKey": []}, {"Bearer": []}]
    assert "security" not in doc["paths"]["/v1/recommendations"]["post"]  # open unless require_api_key
    with _app(api.store, api.models, api_keys=[CLIENT_KEY], require_api_key=True) as client:
        keyed = client.get("/openapi.json", headers={"X-API-Key": CLIENT_KEY}).json()
    assert keyed["paths"]["/v1/recommendations"]["post"]["security"] == [{"ApiKey": []}, {"Bearer": []}]
    assert "security" not in keyed["paths"]["/healthz"]["get"]


def test_a_client_over_its_rate_gets_429_with_retry_after(api: Api) -> None:
    with _app(api.store, api.models, rate_limit_per_s=0.5, rate_limit_burst=2) as client:
        mine = {"X-API-Key": CLIENT_KEY}
        assert [client.get("/v1/sessions/x", headers=mine).status_code for _ in range(2)] == [404, 404]
        body = _problem(client.get("/v1/sessions/x", headers=mine), 429)
        assert "rate limit" in body["detail"]
        assert int(client.get("/v1/sessions/x", headers=mine).headers["Retry-After"]) in (1, 2)
        assert client.get("/v1/sessions/x", headers={"X-API-Key": "another-client"}).status_code == 404
        assert all(client.get("/healthz").status_code == 200 for _ in range(5))  # liveness is never limited
        metrics = client.get("/metrics", headers={"X-API-Key": "third-client"}).text
        assert 'status="429"' in metrics


def test_token_buckets_refill_at_their_rate_and_forget_the_oldest_client() -> None:
    buckets = TokenBuckets(rate=2.0, burst=2, max_clients=2)
    assert [buckets.take("a", now=0.0) for _ in range(2)] == [0.0, 0.0]
    assert buckets.take("a", now=0.0) == pytest.approx(0.5)  # one token in 1 / rate seconds
    assert buckets.take("a", now=0.5) == 0.0  # refilled, and taken
    buckets.take("b", now=0.5)
    buckets.take("c", now=0.5)  # a third client: "a" (least recently seen) is forgotten, so it starts full
    assert [buckets.take("a", now=0.5) for _ in range(2)] == [0.0, 0.0]


def test_health_readiness_and_metrics(api: Api, store_url: str) -> None:
    assert api.client.get("/healthz").json() == {"status": "ok"}
    assert api.client.get("/readyz").json() == {"status": "ready", "model_version": api.online.version}
    api.client.get("/v1/sessions/abc/recommendations")
    text = api.client.get("/metrics").text
    assert 'persona_requests_total{route="/v1/sessions/{session_id}/recommendations",status="200"}' in text
    assert "abc" not in text  # no per-session labels
    assert f'persona_model_info{{version="{api.online.version}"}} 1.0' in text
    assert "persona_request_seconds_bucket" in text
    assert "persona_rank_batch_size_count 1.0" in text  # the ranking went through the micro-batcher


def test_not_ready_without_a_model(tmp_path: Path) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 'empty.db'}")
    try:
        with _app(store, ModelProvider(store)) as client:
            assert client.get("/healthz").status_code == 200
            _problem(client.get("/readyz"), 503)
            _problem(client.get("/v1/sessions/s/recommendations"), 503)
            assert client.app.state.ctx.batcher._pending == []  # the refused request left nothing queued
    finally:
        store.close()


def test_micro_batching_is_configured_from_settings(store_url: str, tiny_bundle: Path) -> None:
    store = Store.open(store_url)
    try:
        models = ModelProvider(store, model_dir=tiny_bundle, refresh_s=60)
        app = create_app(Settings(rank_max_batch=3, rank_workers=5), store=store, models=models)
        batcher = app.state.ctx.batcher
        assert (batcher.max_batch, batcher.workers) == (3, 5)
        assert not batcher.offloads()  # the tiny catalogue ranks on the event loop
    finally:
        store.close()


def test_openapi_documents_the_event_body(api: Api) -> None:
    doc = api.client.get("/openapi.json").json()
    body = doc["paths"]["/v1/events"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"]["oneOf"] == [
        {"$ref": "#/components/schemas/Event"},
        {"$ref": "#/components/schemas/EventBatch"},
    ]
    event = doc["components"]["schemas"]["Event"]
    assert set(event["required"]) == {"event_id", "session_id", "item_id", "ts"}
    assert event["additionalProperties"] is True  # other fields are kept as attributes
    assert doc["components"]["schemas"]["EventBatch"]["properties"]["events"]["maxItems"] == 1000


def test_open_docs_keeps_the_documentation_open_and_the_data_behind_the_key(api: Api) -> None:
    with _app(api.store, api.models, api_keys=[CLIENT_KEY], require_api_key=True, open_docs=True) as client:
        assert client.get("/openapi.json").status_code == 200
        assert client.get("/docs").status_code == 200
        _problem(client.get("/v1/sessions/x/recommendations"), 401)
        _problem(client.get("/metrics"), 401)
        doc = client.get("/openapi.json").json()
        assert doc["paths"]["/v1/recommendations"]["post"]["security"] == [{"ApiKey": []}, {"Bearer": []}]


def test_the_access_log_has_route_status_latency_and_key_id_never_ids_or_keys(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    with _app(api.store, api.models, access_log=True) as client:
        caplog.clear()
        caplog.set_level(logging.INFO, logger="persona.access")
        client.get("/v1/sessions/secret-session/recommendations", headers={"X-API-Key": CLIENT_KEY})
        client.get("/healthz")
    lines = [r.getMessage() for r in caplog.records if r.name == "persona.access"]
    assert len(lines) == 2
    ranked, health = lines
    key_id = hashlib.sha256(CLIENT_KEY.encode()).hexdigest()[:12]
    assert ranked.startswith("GET /v1/sessions/{session_id}/recommendations 200 ")
    assert ranked.endswith(f"ms key={key_id}")
    assert "secret-session" not in ranked and CLIENT_KEY not in ranked
    assert health.startswith("GET /healthz 200 ") and health.endswith("key=-")
    with _app(api.store, api.models) as client:  # off by default
        caplog.clear()
        client.get("/healthz")
    assert not [r for r in caplog.records if r.name == "persona.access"]
