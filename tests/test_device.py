"""The device model: ONNX export, binary edits, the device routes, and the reference device against the server.

The reference device (examples/device) ranks with onnxruntime only; its top-10 must be the server's for every
session, item for item and in order, with the edit's float16 rounding as the only slack on the scores.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import torch
from fastapi.testclient import TestClient

from persona.models import ModelProvider
from persona.net import free_port
from persona.settings import Settings
from persona.store import Store
from recsys.bundle import load_bundle, read_artifact, verify_bundle
from recsys.edit_codec import DeviceEdit, decode_edit, encode_edit, encoded_size, low_rank_factors
from recsys.errors import BundleError
from recsys.export import DEVICE_DOCUMENT, DEVICE_ONNX, export_onnx
from recsys.model import PAD, UNK, Edit, ModelConfig, PersonaModel
from recsys.online import OnlineModel
from recsys.vocab import ItemVocab
from serving.app import create_app
from tests.uvicorn_thread import serve_in_thread

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "device" / "persona_device.py"


def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("persona_device", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["persona_device"] = module
    spec.loader.exec_module(module)
    return module


def _run(graph: bytes, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    out: list[np.ndarray] = session.run(None, inputs)
    return out


def _inputs(hist: torch.Tensor, edit: Edit | None, bias: torch.Tensor | None, n_items: int, cfg: ModelConfig) -> Any:
    b = hist.shape[0]
    return {
        "history": hist.numpy(),
        "seen": np.zeros((b, 1), dtype=np.int64),
        "delta_weight": (
            edit.weight if edit is not None else torch.zeros(b, cfg.n_edit_layers, cfg.dim, cfg.dim)
        ).numpy(),
        "delta_bias": (edit.bias if edit is not None else torch.zeros(b, cfg.n_edit_layers, cfg.dim)).numpy(),
        "item_bias": (bias if bias is not None else torch.zeros(b, n_items)).numpy(),
    }


def _close(device: np.ndarray, torch_scores: torch.Tensor, atol: float = 1e-4) -> None:
    ref = torch_scores.numpy()
    assert np.array_equal(np.isfinite(device), np.isfinite(ref))
    finite = np.isfinite(ref)
    np.testing.assert_allclose(device[finite], ref[finite], atol=atol, rtol=1e-4)


# --------------------------------------------------------------------------------------------- export round trip


def test_bundle_carries_a_checked_device_model(tiny_bundle: Path, tmp_path: Path) -> None:
    manifest = verify_bundle(tiny_bundle)
    assert DEVICE_ONNX in manifest["files"]
    bundle = load_bundle(tiny_bundle)
    doc = bundle.documents[DEVICE_DOCUMENT]
    assert doc["items"] == bundle.documents["vocab"]["ids"]  # the vocabulary ships beside the graph
    assert doc["max_len"] == bundle.documents["config"]["model"]["max_len"]
    graph = read_artifact(tiny_bundle, DEVICE_ONNX)
    assert graph is not None
    assert ort.InferenceSession(graph).get_modelmeta().custom_metadata_map["persona"]  # self-describing too
    # a tampered graph is refused like any other bundle file
    copy = tmp_path / "copy"
    shutil.copytree(tiny_bundle, copy)
    raw = bytearray((copy / DEVICE_ONNX).read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (copy / DEVICE_ONNX).write_bytes(bytes(raw))
    with pytest.raises(BundleError, match=r"device\.onnx"):
        verify_bundle(copy)
    with pytest.raises(BundleError, match=r"device\.onnx"):
        read_artifact(copy, DEVICE_ONNX)


def test_bundled_graph_scores_like_the_server_with_edit_and_bias(group_bias_bundle: Path, tiny_bundle: Path) -> None:
    online = OnlineModel.load(group_bias_bundle)
    graph = read_artifact(tiny_bundle, DEVICE_ONNX)  # same weights: the group-bias bundle only changes β and counts
    assert graph is not None
    ids = online.vocab.ids
    hist = online.histories([ids[5:25], ids[3:4], ids[40:47], ids[10:13] + ids[60:70]])
    edit = online.edit(online.codes(hist), histories=hist)
    assert edit.groups is not None  # the history groups' bias is part of what the device gets
    bias = online.group_bias(edit.prototype, edit.codes, groups=edit.groups)
    assert bias is not None and float(bias.abs().max()) > 0.1  # the bias is really exercised
    scores, top_i, top_s = _run(graph, _inputs(hist, edit, bias, online.n_items, online.cfg))
    expected = online.scores(hist, edit)
    _close(scores, expected)
    top = torch.topk(expected, top_i.shape[1], dim=1)
    assert np.array_equal(top_i, top.indices.numpy())
    np.testing.assert_allclose(top_s, top.values.numpy(), atol=1e-4)
    # zero edit, zero bias: the base model
    base, _, _ = _run(graph, _inputs(hist, None, None, online.n_items, online.cfg))
    _close(base, online.scores(hist))
    assert not np.allclose(base[np.isfinite(base)], scores[np.isfinite(scores)], atol=1e-3)  # the edit matters
    # seen items never rank
    inputs = _inputs(hist, edit, bias, online.n_items, online.cfg)
    inputs["seen"] = hist.numpy()
    masked = _run(graph, inputs)[0]
    for row in range(hist.shape[0]):
        assert np.isneginf(masked[row, hist[row].numpy()]).all()
        assert np.isneginf(masked[row, [PAD, UNK]]).all()


def test_gru4rec_and_sliding_window_export(tmp_path: Path) -> None:
    torch.manual_seed(0)
    for cfg in (
        ModelConfig(n_items=40, dim=8, max_len=6, encoder="gru4rec", code_dim=4, n_prototypes=2),
        ModelConfig(n_items=40, dim=8, max_len=6, code_dim=4, n_prototypes=2, window_stride=0, n_heads=2),
    ):
        model = PersonaModel(cfg).eval()
        vocab = ItemVocab([str(i) for i in range(cfg.n_items - 2)])
        graph = export_onnx(model, vocab, "test", k=5)
        hist = torch.tensor([[0, 0, 0, 5, 9, 3], [0, 0, 0, 0, 0, 0], [2, 3, 4, 5, 6, 7]])
        with torch.no_grad():
            edit = model.session_edit(hist, mode="session")
            expected = model.score(hist, edit)
        expected[:, PAD] = float("-inf")
        expected[:, UNK] = float("-inf")
        scores, top_i, _ = _run(graph, _inputs(hist, edit, None, cfg.n_items, cfg))
        _close(scores, expected)
        assert np.array_equal(top_i, torch.topk(expected, 5, dim=1).indices.numpy())


def test_export_command_writes_graph_and_manifest(
    tiny_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from persona_cli.main import main

    out = tmp_path / "phone" / "model.onnx"
    assert main(["export", "--model", str(tiny_bundle), "--format", "onnx", "--out", str(out), "--k", "5"]) == 0
    manifest = json.loads(out.with_suffix(".json").read_text())
    version = load_bundle(tiny_bundle).version
    assert manifest["model_version"] == version and manifest["k"] == 5 and len(manifest["items"]) == 100
    session = ort.InferenceSession(out.read_bytes())
    assert [o.shape[1] for o in session.get_outputs()[1:]] == [5, 5]
    assert json.loads(session.get_modelmeta().custom_metadata_map["persona"])["model_version"] == version
    assert main(["export", "--model", str(tiny_bundle), "--format", "tflite", "--out", str(out)]) == 2
    assert main(["export", "--model", str(tmp_path / "nothing"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "use --format onnx" in err and "no model bundle" in err and "Traceback" not in err


# --------------------------------------------------------------------------------------------- binary edits


def _edit(rng: np.random.Generator, layers: int = 2, dim: int = 8, n: int = 30, bias: bool = True) -> DeviceEdit:
    return DeviceEdit(
        model_version="20261201T000000Z-abcdef12",
        edit_version=2**40 + 7,
        prototype_id=3,
        weight=rng.normal(scale=0.2, size=(layers, dim, dim)).astype(np.float32),
        bias=rng.normal(scale=0.2, size=(layers, dim)).astype(np.float32),
        item_bias=rng.random(n).astype(np.float32) * 3 if bias else None,
    )


@pytest.mark.parametrize("dtype,atol", [("float32", 0.0), ("float16", 1e-3)])
def test_binary_edit_round_trip(dtype: str, atol: float) -> None:
    rng = np.random.default_rng(0)
    for with_bias in (True, False):
        edit = _edit(rng, bias=with_bias)
        data = encode_edit(edit, dtype)
        n = 0 if edit.item_bias is None else len(edit.item_bias)
        assert len(data) == encoded_size(2, 8, dtype=dtype, n_items=n, version=edit.model_version)
        back = decode_edit(data)
        assert (back.model_version, back.edit_version, back.prototype_id) == (
            edit.model_version,
            edit.edit_version,
            3,
        )
        assert back.weight is not None and back.weight.dtype == np.dtype(dtype)
        np.testing.assert_allclose(back.full_weight(), edit.weight, atol=atol)
        np.testing.assert_allclose(back.bias, edit.bias, atol=atol)
        if edit.item_bias is None:
            assert back.item_bias is None
        else:
            assert back.item_bias is not None
            np.testing.assert_allclose(back.item_bias, edit.item_bias, atol=atol * 4)
        # the example device's own decoder reads the same bytes
        theirs = _example().decode_edit(data)
        np.testing.assert_allclose(theirs.weight, back.full_weight())
    assert len(encode_edit(edit, "float16")) < len(encode_edit(edit, "float32")) * 0.55


def test_low_rank_edit_is_exact_for_low_rank_and_smaller() -> None:
    rng = np.random.default_rng(1)
    edit = _edit(rng, dim=16)
    u0, v0 = rng.normal(size=(2, 16, 3)), rng.normal(size=(2, 3, 16))
    weight = (u0 @ v0 * 0.05).astype(np.float32)  # exactly rank 3
    factored = DeviceEdit(
        edit.model_version, 1, 0, edit.bias, factors=low_rank_factors(weight, 3), item_bias=edit.item_bias
    )
    data = encode_edit(factored, "float32")
    assert len(data) == encoded_size(2, 16, dtype="float32", rank=3, n_items=30, version=edit.model_version)
    back = decode_edit(data)
    assert back.weight is None and back.factors is not None
    np.testing.assert_allclose(back.full_weight(), weight, atol=1e-5)
    np.testing.assert_allclose(_example().decode_edit(data).weight, weight, atol=1e-5)
    full = DeviceEdit(edit.model_version, 1, 0, edit.bias, weight=weight, item_bias=edit.item_bias)
    assert len(data) < len(encode_edit(full, "float32"))


def test_binary_edit_rejects_garbage() -> None:
    data = encode_edit(_edit(np.random.default_rng(2)), "float16")
    with pytest.raises(ValueError, match="magic"):
        decode_edit(b"XXXX" + data[4:])
    with pytest.raises(ValueError, match="truncated"):
        decode_edit(data[:-8])
    with pytest.raises(ValueError, match="trailing"):
        decode_edit(data + b"\0\0\0\0")
    with pytest.raises(ValueError, match="at least"):
        decode_edit(data[:10])


# --------------------------------------------------------------------------------------------- API


@pytest.fixture
def client(tmp_path: Path, tiny_bundle: Path) -> Iterator[tuple[TestClient, ModelProvider]]:
    store = Store.open(f"sqlite:///{(tmp_path / 'persona.db').as_posix()}")
    models = ModelProvider(store, model_dir=tiny_bundle, refresh_s=60)
    try:
        with TestClient(create_app(Settings(), store=store, models=models), raise_server_exceptions=False) as c:
            yield c, models
    finally:
        store.close()


def test_device_model_route_etag_304(client: tuple[TestClient, ModelProvider], tiny_bundle: Path) -> None:
    c, models = client
    version = models.get().version
    r = c.get(f"/v1/models/{version}/device")
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    assert r.content == read_artifact(tiny_bundle, DEVICE_ONNX)  # the bundle's own graph
    etag = r.headers["etag"]
    again = c.get(f"/v1/models/{version}/device", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
    assert c.get(f"/v1/models/{version}/device", headers={"If-None-Match": '"other"'}).status_code == 200
    meta = c.get(f"/v1/models/{version}/device/manifest")
    assert meta.status_code == 200
    body = meta.json()
    assert body["model_version"] == version and body["items"] == list(models.get().vocab.ids)
    assert body["max_len"] == models.get().cfg.max_len and body["window_stride"] == models.get().cfg.stride
    m_tag = meta.headers["etag"]
    assert c.get(f"/v1/models/{version}/device/manifest", headers={"If-None-Match": m_tag}).status_code == 304
    missing = c.get("/v1/models/not-this-one/device")
    assert missing.status_code == 404 and version in missing.json()["detail"]


def test_binary_edit_route_matches_json(client: tuple[TestClient, ModelProvider]) -> None:
    c, models = client
    ids = models.get().vocab.ids
    events = [{"event_id": f"e{n}", "session_id": "s1", "item_id": i, "ts": 1.7e9 + n} for n, i in enumerate(ids[4:11])]
    assert c.post("/v1/events", json={"events": events}).status_code == 200
    js = c.get("/v1/sessions/s1/edit").json()
    f32 = c.get("/v1/sessions/s1/edit", params={"format": "binary", "dtype": "float32"})
    f16 = c.get("/v1/sessions/s1/edit", params={"format": "binary"})
    low = c.get("/v1/sessions/s1/edit", params={"format": "binary", "rank": 4})
    assert f32.status_code == f16.status_code == low.status_code == 200
    assert f32.headers["content-type"] == "application/octet-stream"
    assert js["binary_bytes"] == {"float16": len(f16.content), "float32": len(f32.content)}
    weight = np.array([layer["weight"] for layer in js["layers"]], dtype=np.float32)
    bias = np.array([layer["bias"] for layer in js["layers"]], dtype=np.float32)
    e32, e16, elow = decode_edit(f32.content), decode_edit(f16.content), decode_edit(low.content)
    assert e32.model_version == js["model_version"] and e32.edit_version == js["edit_version"]
    assert e32.prototype_id == js["prototype_id"]
    np.testing.assert_array_equal(e32.full_weight(), weight)
    np.testing.assert_array_equal(e32.bias, bias)
    np.testing.assert_allclose(e16.full_weight(), weight, atol=1e-3)
    assert (e32.item_bias is None) == (js["item_bias"] is None)
    if e32.item_bias is not None:
        np.testing.assert_array_equal(e32.item_bias, np.array(js["item_bias"], dtype=np.float32))
    assert elow.factors is not None and elow.factors[0].shape[2] == 4
    assert len(low.content) < len(f16.content)
    np.testing.assert_allclose(
        elow.full_weight(), low_rank_factors(weight, 4)[0] @ low_rank_factors(weight, 4)[1], atol=2e-3
    )
    assert c.get("/v1/sessions/s1/edit", params={"format": "binary", "rank": 999}).status_code == 422
    assert c.get("/v1/sessions/s1/edit", params={"format": "binary", "dtype": "int8"}).status_code == 422
    assert c.get("/v1/sessions/nobody/edit", params={"format": "binary"}).status_code == 404


# --------------------------------------------------------------------------------------------- reference device


def test_reference_device_needs_no_torch() -> None:
    code = "import sys; sys.modules['torch'] = None; sys.path.insert(0, sys.argv[1]); import persona_device"
    done = subprocess.run([sys.executable, "-c", code, str(EXAMPLE.parent)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.fixture(params=["group_bias_bundle", "repeat_bundle"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, ModelProvider, Store]]:
    """The API on a free port, serving a bundle with a group bias, or one with a repeat part."""
    store = Store.open(f"sqlite:///{(tmp_path / 'persona.db').as_posix()}")
    models = ModelProvider(store, model_dir=request.getfixturevalue(request.param), refresh_s=60)
    app = create_app(Settings(), store=store, models=models)
    try:
        with serve_in_thread(app) as url:
            yield url, models, store
    finally:
        store.close()


def same_ranking(device: list[tuple[str, float]], server: list[dict[str, Any]], atol: float, swaps: bool) -> None:
    """Device top-k == server top-k: same scores rank by rank (within ``atol``), same items in the same order; with
    ``swaps``, two neighbours may trade places only when the server scores them within ``2·atol`` (a near-tie that
    float16 rounding can flip)."""
    assert len(device) == len(server)
    for (_, ds), s in zip(device, server, strict=True):
        assert abs(ds - s["score"]) <= atol + 1e-4 * abs(s["score"])
    mine, theirs = [i for i, _ in device], [s["item_id"] for s in server]
    if mine == theirs or not swaps:
        assert mine == theirs
        return
    score = {s["item_id"]: s["score"] for s in server}
    for a, b in zip(mine, theirs, strict=True):
        if a != b:
            assert a in score and abs(score[a] - score[b]) <= 2 * atol, (mine, theirs)


def repeating_sessions(ids: list[str], lengths: list[int], seed: int) -> dict[str, list[str]]:
    """Sessions that re-consume: each draws from a pool of 12 of the catalogue's items, recent ones more often, so
    items come back and (beyond 8 distinct items) the repeat part's bounded counts evict entries."""
    rng = np.random.default_rng(seed)
    out = {}
    for n, length in enumerate(lengths):
        pool = [ids[i] for i in rng.choice(len(ids), size=12, replace=False)]
        weights = np.linspace(1.0, 3.0, 12)
        out[f"dev-{n}"] = [pool[i] for i in rng.choice(12, size=length, p=weights / weights.sum())]
    return out


@pytest.mark.slow
def test_reference_device_ranks_like_the_server(server: tuple[str, ModelProvider, Store], tmp_path: Path) -> None:
    base_url, models, store = server
    online = models.get()
    device_mod = _example()
    rng = np.random.default_rng(7)
    ids = list(online.vocab.ids)
    lengths = [1, 2, 5, 9, 14, 20, 21, 27, 33, 48]
    if online.has_repeat_part:
        sessions = repeating_sessions(ids, lengths, seed=7)
    else:
        sessions = {f"dev-{n}": [ids[i] for i in rng.choice(len(ids), size=length)] for n, length in
                    enumerate(lengths)}  # fmt: skip
    # a bundle without device.onnx (this one is re-saved by its fixture): the first download exports it (seconds)
    f32 = device_mod.Device(base_url, tmp_path / "dev32", dtype="float32", timeout_s=120)
    f16 = device_mod.Device(base_url, tmp_path / "dev16", timeout_s=120)
    with httpx.Client(base_url=base_url, timeout=30) as http:
        for sid, items in sessions.items():
            # sent in two batches so the stored state has gone through the consumer's incremental path
            for part, chunk in enumerate((items[: len(items) // 2], items[len(items) // 2 :])):
                if not chunk:
                    continue
                events = [
                    {"event_id": f"{sid}-{part}-{n}", "session_id": sid, "item_id": i, "ts": 1.7e9 + 100 * part + n}
                    for n, i in enumerate(chunk)
                ]
                assert http.post("/v1/events", json={"events": events}).status_code == 200
            f32.observe(sid, items)
            f16.observe(sid, items)
        biased = repeated = 0
        for sid, items in sessions.items():
            served = http.get(f"/v1/sessions/{sid}/recommendations", params={"k": 10}).json()
            assert served["fallback"] is None, served
            same_ranking(f32.recommend(sid, k=10), served["items"], atol=1e-4, swaps=False)
            same_ranking(f16.recommend(sid, k=10), served["items"], atol=5e-3, swaps=True)
            edit = http.get(f"/v1/sessions/{sid}/edit").json()
            biased += edit["item_bias"] is not None and max(edit["item_bias"]) > 0.1
            repeated += served["items"][0]["item_id"] in items
            if online.has_repeat_part:  # the device's counts are the server's, entry for entry and in order
                with store.transaction() as uow:
                    stored = uow.get_sessions([sid])[sid].item_counts
                assert f32.counts[sid][0].table == {row[0]: row[1:] for row in stored["items"]}
                assert list(f32.counts[sid][0].table) == [row[0] for row in stored["items"]]
                assert f32.counts[sid][0].n == stored["n"] == len(items)
                assert len(stored["items"]) == min(len(set(items)), online.cfg.repeat_size)
        if online.has_repeat_part:  # the part really ranks: the session's own items come first, as the server has it
            assert repeated >= len(sessions) - 1, repeated
            assert any(len(set(items)) > online.cfg.repeat_size for items in sessions.values())  # entries evicted
        else:
            assert biased == len(sessions)  # every session's ranking includes its prototype's group bias
    # the model was downloaded once per device; later rankings only revalidated it (304)
    assert f16.stats["model_downloads"] == 1 and f16.stats["model_revalidated"] >= len(sessions) - 1
    # offline: the server is unreachable, the device ranks with the last model and edit it stored
    last = f16.recommend("dev-9", k=10)
    f16.base_url = f"http://127.0.0.1:{free_port()}"
    assert f16.recommend("dev-9", k=10) == last and not f16.online
    with pytest.raises(device_mod.Offline):
        f16.recommend("never-fetched", k=10)
