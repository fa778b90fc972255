"""The browser device: examples/device-web in headless Chromium ranks like the server.

The page is served by the API's own server (same origin, so no CORS), runs the device model with onnxruntime-web
(npm, pinned in examples/device-web/package.json) and POSTs its top-10 to a route the test adds. ``make test``
installs Chromium and the npm packages when they are missing (devtools/test_prereqs.py).
"""

from __future__ import annotations

import json
import queue
import shutil
import subprocess
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import Request
from fastapi.staticfiles import StaticFiles

from devtools.test_prereqs import chromium_binary
from persona.models import ModelProvider
from persona.settings import Settings
from persona.store import Store
from serving.app import create_app
from tests.test_device import repeating_sessions, same_ranking
from tests.uvicorn_thread import serve_in_thread

WEB = Path(__file__).resolve().parents[1] / "examples" / "device-web"


@pytest.fixture(params=["group_bias_bundle", "repeat_bundle"])
def web_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, ModelProvider, queue.Queue[Any]]]:
    """The API with the page mounted, serving a bundle with a group bias, or one with a repeat part."""
    if not (WEB / "node_modules" / "onnxruntime-web" / "dist").is_dir():
        pytest.fail("onnxruntime-web is not installed: run `make test-prereqs` (npm ci in examples/device-web)")
    store = Store.open(f"sqlite:///{(tmp_path / 'persona.db').as_posix()}")
    models = ModelProvider(store, model_dir=request.getfixturevalue(request.param), refresh_s=60)
    app = create_app(Settings(), store=store, models=models)
    reports: queue.Queue[Any] = queue.Queue()

    @app.post("/test-report", include_in_schema=False)
    async def report(request: Request) -> dict[str, bool]:
        reports.put(await request.json())
        return {"ok": True}

    app.mount("/device-web", StaticFiles(directory=WEB), name="device-web")
    try:
        with serve_in_thread(app) as url:
            yield url, models, reports
    finally:
        store.close()


def _open_page(url: str, profile: Path) -> subprocess.Popen[bytes]:
    exe = chromium_binary()
    if exe is None:
        pytest.fail("Chromium is not installed: run `make test-prereqs` (apt-get install chromium)")
    args = [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={profile}"]
    return subprocess.Popen([*args, url], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.slow
def test_browser_device_ranks_like_the_server(
    web_server: tuple[str, ModelProvider, queue.Queue[Any]], tmp_path: Path
) -> None:
    base_url, models, reports = web_server
    online = models.get()
    ids = list(online.vocab.ids)
    rng = np.random.default_rng(3)
    if online.has_repeat_part:  # re-consuming sessions; the longest one is chosen on the page itself
        sessions = {sid.replace("dev", "web"): v for sid, v in repeating_sessions(ids, [2, 9, 31], seed=3).items()}
        on_page = {"web-2"}
    else:
        sessions = {f"web-{n}": [ids[i] for i in rng.choice(len(ids), size=size)] for n, size in enumerate([2, 9, 31])}
        on_page = set()
    with httpx.Client(base_url=base_url, timeout=60) as http:
        for sid, items in sessions.items():
            if sid in on_page:
                continue
            events = [{"event_id": f"{sid}-{n}", "session_id": sid, "item_id": i, "ts": 1.7e9 + n} for n, i in
                      enumerate(items)]  # fmt: skip
            assert http.post("/v1/events", json={"events": events}).status_code == 200
        http.get(f"/v1/models/{online.version}/device")  # exported now (this bundle has no device.onnx)
        repeated = 0
        for sid, items in sessions.items():
            url = f"{base_url}/device-web/index.html?session={sid}&k=10&report={base_url}/test-report"
            if sid in on_page:  # the page sends the events and keeps the counts itself
                url += "&observe=" + urllib.parse.quote(json.dumps(items))
            browser = _open_page(url, tmp_path / f"profile-{sid}")
            try:
                page = reports.get(timeout=120)
            finally:
                browser.kill()
                browser.wait(timeout=30)
            assert "error" not in page, page
            assert page["session"] == sid and page["modelVersion"] == online.version
            served = http.get(f"/v1/sessions/{sid}/recommendations", params={"k": 10}).json()["items"]
            # float16 edit: scores within its tolerance, the same items in the same order but for near-ties
            same_ranking([(i, s) for i, s in page["items"]], served, atol=5e-3, swaps=True)
            if online.has_repeat_part:
                # the page's own counts where it saw every event, the server's stored ones where it did not
                assert page["counts"] == ("local" if sid in on_page else "server")
                repeated += served[0]["item_id"] in items
            else:
                assert page["counts"] is None
    if online.has_repeat_part:  # the part really ranks: the session's own items come first
        assert repeated >= len(sessions) - 1, repeated


def test_chromium_lookup_finds_debian_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert chromium_binary() is None
    exe = tmp_path / "chromium"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    assert chromium_binary() == str(exe) == shutil.which("chromium")
