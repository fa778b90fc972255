"""Hot reload: activating another registered version reaches a running API without restart or failures.

A real uvicorn server on a free loopback port serves while client threads rank continuously; the registry
is flipped the way ``persona models activate`` does it. Zero failed requests, and after the swap every
response carries the new version.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from persona.models import ModelProvider, register_bundle
from persona.settings import Settings
from persona.store import Store
from recsys.bundle import load_bundle, save_bundle
from serving.app import create_app
from tests.uvicorn_thread import serve_in_thread


@pytest.fixture(scope="module")
def second_bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny bundle re-saved under another version, with a nudged head (no second training run)."""
    bundle = load_bundle(tiny_bundle)
    tensors = {stem: dict(state) for stem, state in bundle.tensors.items()}
    tensors["model"]["device_model.head_bias"] = tensors["model"]["device_model.head_bias"] + 0.01
    out = tmp_path_factory.mktemp("tiny-model-2") / "bundle"
    save_bundle(
        out,
        tensors=tensors,
        documents=bundle.documents,
        data_fingerprint=str(bundle.manifest.get("data_fingerprint", "tiny")),
        version="reload-test-v2",
    )
    return out


@pytest.fixture
def server(store_url: str, tiny_bundle: Path) -> Iterator[tuple[str, Store, ModelProvider]]:
    store = Store.open(store_url)
    models = ModelProvider(store, model_dir=tiny_bundle, refresh_s=0.2)
    app = create_app(Settings(), store=store, models=models)
    try:
        with serve_in_thread(app) as url:
            yield url, store, models
    finally:
        store.close()


def test_activating_another_version_swaps_under_load_with_zero_failures(
    server: tuple[str, Store, ModelProvider], second_bundle: Path
) -> None:
    base_url, store, models = server
    old = models.version
    new = register_bundle(store, second_bundle, activate=False).version
    assert new != old
    items = models.get().vocab.ids[:6]
    seen: list[tuple[float, int, str | None]] = []
    failures: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()

    def client(n: int) -> None:
        with httpx.Client(base_url=base_url, timeout=10) as c:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    if n % 2:
                        r = c.post("/v1/recommendations", json={"recent_items": items, "k": 5})
                    else:
                        r = c.get(f"/v1/sessions/s{n}/recommendations")
                    ok = r.status_code == 200
                    version = r.json().get("model_version") if ok else None
                    detail = f"{r.status_code}: {r.text[:300]}"
                except httpx.HTTPError as exc:
                    ok, version, detail = False, None, repr(exc)
                with lock:
                    if ok:
                        seen.append((started, n, version))
                    else:
                        failures.append(detail)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    with store.transaction() as uow:  # exactly what `persona models activate VERSION` runs
        uow.activate(new)
    activated = time.monotonic()
    deadline = activated + 15
    while models.version != new and time.monotonic() < deadline:
        time.sleep(0.05)
    swapped = time.monotonic()
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(timeout=10)

    assert not failures, failures[:3]
    assert models.version == new and swapped - activated < 5
    assert {v for _, _, v in seen} == {old, new}
    # A request that started after the swap was observed must have been served by the new model.
    assert all(v == new for ts, _, v in seen if ts > swapped)
    assert any(v == new for ts, _, v in seen if ts > swapped)
    with httpx.Client(base_url=base_url) as c:
        assert c.get("/readyz").json()["model_version"] == new
        metrics = c.get("/metrics").text
    assert "persona_model_reloads_total 1.0" in metrics
    assert f'persona_model_info{{version="{new}"}} 1.0' in metrics
