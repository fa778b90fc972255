"""Schemathesis over the API's own OpenAPI document: no 5xx, and every response matches its schema.

Runs against the real app (ASGI, in process) on a SQLite store with the tiny bundle and a few sessions, so
generated ids sometimes hit stored state. Bounded: ``max_examples`` per operation, no deadline.
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
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def app_under_test(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    db = tmp_path_factory.mktemp("schema") / "persona.db"
    store = Store.open(f"sqlite:///{db.as_posix()}")
    models = ModelProvider(store, model_dir=tiny_bundle, refresh_s=60)
    app = create_app(Settings(admin_api_keys=[KEY]), store=store, models=models)
    ingestor = app.state.ctx.ingestor
    from persona.events import Event, validate_event_dict

    items = models.get().vocab.ids
    events = [
        validate_event_dict({"event_id": f"e{n}", "session_id": sid, "item_id": items[n % 30], "ts": 1.7e9 + n})
        for n, sid in enumerate(["0", "a", "s-42"] * 5)
    ]
    ingestor.apply([e for e in events if isinstance(e, Event)], source="http")
    yield app
    store.close()


@pytest.mark.slow
def test_api_conforms_to_its_openapi_schema(app_under_test: object) -> None:
    """Every operation, ``max_examples`` generated cases each (valid and invalid): no 5xx, no schema drift."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", app_under_test)
    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case: schemathesis.Case) -> None:
            case.call_and_validate(headers={"X-API-Key": KEY}, checks=CHECKS)

        try:
            check()
        except Exception as exc:  # collect every operation's failure, then report them together
            failures.append(f"{operation.label}: {str(exc)[:1500]}")
    assert operations >= 10
    assert not failures, "\n\n".join(failures)


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
                elif path != "/metrics":
                    assert "application/json" in response["content"], (method, path, code)
