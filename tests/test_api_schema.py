"""Schemathesis over the API's own OpenAPI document: no 5xx, and every response matches its schema.

Runs against the real app (ASGI, in process) on a SQLite store with the tiny bundle and a few sessions, so
generated ids sometimes hit stored state, with keys optional and with keys required, as six kinds of caller (no
key, client key, admin key, wrong key). Bounded: ``EXAMPLES`` per operation and caller, no deadline; at least
``MIN_CASES`` cases in all (counted as they run).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from persona.models import ModelProvider
from persona.settings import Settings
from persona.store import Store
from serving.app import create_app

KEY = "schema-test-key"
CLIENT_KEY = "schema-client-key"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
#: Generated cases per operation and key variant (hypothesis runs fewer where an operation has little to vary).
EXAMPLES = 25
#: The fault suite's floor for the whole run (issue 13).
MIN_CASES = 1000


def _seeded_app(tiny_bundle: Path, db: Path, settings: Settings) -> tuple[object, Store]:
    store = Store.open(f"sqlite:///{db.as_posix()}")
    models = ModelProvider(store, model_dir=tiny_bundle, refresh_s=60)
    app = create_app(settings, store=store, models=models)
    ingestor = app.state.ctx.ingestor
    from persona.events import Event, validate_event_dict

    items = models.get().vocab.ids
    events = [
        validate_event_dict({"event_id": f"e{n}", "session_id": sid, "item_id": items[n % 30], "ts": 1.7e9 + n})
        for n, sid in enumerate(["0", "a", "s-42"] * 5)
    ]
    ingestor.apply([e for e in events if isinstance(e, Event)], source="http")
    return app, store


@pytest.fixture(scope="module")
def app_under_test(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """Keys optional (the default), an admin key configured."""
    app, store = _seeded_app(
        tiny_bundle, tmp_path_factory.mktemp("schema") / "persona.db", Settings(admin_api_keys=[KEY])
    )
    yield app
    store.close()


@pytest.fixture(scope="module")
def locked_app(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """Every route behind a key (client or admin), the documentation left open so the schema can be read."""
    settings = Settings(api_keys=[CLIENT_KEY], admin_api_keys=[KEY], require_api_key=True, open_docs=True)
    app, store = _seeded_app(tiny_bundle, tmp_path_factory.mktemp("schema-locked") / "persona.db", settings)
    yield app
    store.close()


def _run_schema(app: object, headers: dict[str, str]) -> tuple[int, int, list[str]]:
    """Every operation of ``app``'s schema, :data:`EXAMPLES` generated cases each (valid and invalid) sent with
    ``headers``: (operations, cases run, failures)."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures: list[str] = []
    operations = cases = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case: schemathesis.Case) -> None:
            nonlocal cases
            cases += 1
            case.call_and_validate(headers=headers, checks=CHECKS)

        try:
            check()
        except (Exception, BaseExceptionGroup) as exc:  # collect every failure, then report them together
            failures.append(f"{operation.label} with {sorted(headers) or 'no key'}: {str(exc)[:1500]}")
    return operations, cases, failures


@pytest.mark.slow
@pytest.mark.fault
def test_api_conforms_to_its_openapi_schema_with_and_without_keys(app_under_test: object, locked_app: object) -> None:
    """Every operation with every kind of caller: keys optional (no key, the admin key) and keys required (the
    client key, the admin key as a bearer token, a wrong key, no key). No 5xx, no status, content type or body
    outside the schema, and at least :data:`MIN_CASES` cases in all."""
    variants = [
        (app_under_test, {}),
        (app_under_test, {"X-API-Key": KEY}),
        (locked_app, {"X-API-Key": CLIENT_KEY}),
        (locked_app, {"Authorization": f"Bearer {KEY}"}),
        (locked_app, {"X-API-Key": "wrong-key"}),
        (locked_app, {}),
    ]
    failures: list[str] = []
    total = 0
    for app, headers in variants:
        operations, cases, failed = _run_schema(app, headers)
        assert operations >= 10
        total += cases
        failures += failed
    print(f"schemathesis: {total} generated cases over {len(variants)} key variants")
    assert not failures, "\n\n".join(failures)
    assert total >= MIN_CASES, total


def test_openapi_documents_every_route_with_summary_and_problem_errors(app_under_test: object) -> None:
    from fastapi import FastAPI

    assert isinstance(app_under_test, FastAPI)
    doc = app_under_test.openapi()
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    for path, item in doc["paths"].items():
        for method, op in item.items():
            assert op.get("summary"), f"{method} {path} has no summary"
            for code, response in op["responses"].items():
                if int(code) >= 400:
                    assert list(response["content"]) == ["application/problem+json"], (method, path, code)
                elif code == "304":  # not modified (ETag): no body
                    assert "content" not in response, (method, path, code)
                elif path == "/v1/models/{version}/device":  # the ONNX graph
                    assert list(response["content"]) == ["application/octet-stream"], (method, path, code)
                elif path != "/metrics":
                    assert "application/json" in response["content"], (method, path, code)
