"""Model bundles: round trip, integrity checks, atomic writes, safe names."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

import recsys.bundle as bundle_module
from recsys.bundle import FORMAT_VERSION, bundle_sha256, load_bundle, save_bundle, verify_bundle
from recsys.errors import BundleError


def _tensors() -> dict[str, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    embedding = torch.randn(10, 4, generator=generator)
    return {
        "model": {
            "item_embedding.weight": embedding,
            "output.weight": embedding,  # tied weights share storage
            "head.bias": torch.randn(4, generator=generator).to(torch.float16),
            "step": torch.tensor(7, dtype=torch.int64),
            "transposed": torch.randn(3, 5, generator=generator).t(),  # not contiguous
        },
        "prototypes": {"bank": torch.randn(8, 4, generator=generator)},
    }


def _documents() -> dict[str, Any]:
    return {
        "config": {"dim": 4, "layers": [1, 2], "name": "persona ✓"},
        "vocabulary": ["<pad>", "<unk>", "a", "b"],
        "metrics": {"hr@10": 0.25},
    }


def _raw_bytes(tensor: torch.Tensor) -> list[int]:
    return tensor.contiguous().reshape(-1).view(torch.uint8).tolist()


def _save(out: Path, **kwargs: Any) -> bundle_module.Bundle:
    return save_bundle(out, tensors=_tensors(), documents=_documents(), data_fingerprint="fp-123", **kwargs)


def test_round_trip_is_bitwise_equal(tmp_path: Path) -> None:
    saved = _save(tmp_path / "b", meta={"seed": 1})
    loaded = load_bundle(tmp_path / "b")
    original = _tensors()
    assert loaded.tensors.keys() == original.keys()
    for stem, state in original.items():
        assert loaded.tensors[stem].keys() == state.keys()
        for key, tensor in state.items():
            got = loaded.tensors[stem][key]
            assert got.dtype == tensor.dtype and got.shape == tensor.shape
            assert _raw_bytes(got) == _raw_bytes(tensor)
            assert torch.equal(saved.tensors[stem][key], tensor)
    assert loaded.documents == _documents() == saved.documents
    assert loaded.manifest == saved.manifest
    assert loaded.version == saved.version
    manifest = loaded.manifest
    assert manifest["format"] == "persona-bundle" and manifest["format_version"] == FORMAT_VERSION
    assert manifest["data_fingerprint"] == "fp-123" and manifest["meta"] == {"seed": 1}
    assert manifest["library_version"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", manifest["created_at"])
    assert set(manifest["files"]) == {
        "model.safetensors",
        "prototypes.safetensors",
        "config.json",
        "vocabulary.json",
        "metrics.json",
    }
    assert verify_bundle(tmp_path / "b") == manifest


def test_default_version_is_utc_timestamp_and_content_hash(tmp_path: Path) -> None:
    first = _save(tmp_path / "a")
    second = _save(tmp_path / "b")
    assert re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{8}", first.version)
    assert first.version.split("-")[1] == second.version.split("-")[1]  # same content, same hash part
    other = save_bundle(tmp_path / "c", tensors={}, documents={"config": {"dim": 5}}, data_fingerprint="x")
    assert other.version.split("-")[1] != first.version.split("-")[1]
    assert _save(tmp_path / "d", version="v1.2").version == "v1.2"


def test_bundle_sha256_is_the_manifest_hash(tmp_path: Path) -> None:
    import hashlib

    _save(tmp_path / "b")
    expected = hashlib.sha256((tmp_path / "b" / "manifest.json").read_bytes()).hexdigest()
    assert bundle_sha256(tmp_path / "b") == expected
    with pytest.raises(BundleError):
        bundle_sha256(tmp_path / "missing")


def test_tampering_one_byte_names_the_file(tmp_path: Path) -> None:
    _save(tmp_path / "b")
    target = tmp_path / "b" / "prototypes.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0x01
    target.write_bytes(bytes(data))
    for check in (verify_bundle, load_bundle):  # same size, other bytes: the checksum is what differs
        with pytest.raises(BundleError, match=r"prototypes\.safetensors fails its checksum: sha256 ") as caught:
            check(tmp_path / "b")
        assert "bytes" not in str(caught.value)


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    _save(tmp_path / "b")
    target = tmp_path / "b" / "config.json"
    target.write_bytes(target.read_bytes()[:-5])
    for check in (verify_bundle, load_bundle):
        with pytest.raises(BundleError, match=r"config\.json is truncated or altered: \d+ bytes, its manifest says"):
            check(tmp_path / "b")


def test_missing_listed_file_is_refused(tmp_path: Path) -> None:
    _save(tmp_path / "b")
    (tmp_path / "b" / "model.safetensors").unlink()
    for check in (verify_bundle, load_bundle):
        with pytest.raises(BundleError, match=r"model\.safetensors is missing"):
            check(tmp_path / "b")


def _edit_manifest(bundle: Path, **changes: Any) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest.update(changes)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("found", [FORMAT_VERSION + 1, 0])
def test_other_format_version_is_refused(tmp_path: Path, found: int) -> None:
    _save(tmp_path / "b")
    _edit_manifest(tmp_path / "b", format_version=found)
    with pytest.raises(BundleError, match=f"bundle format {found}, this persona reads 1; retrain or upgrade"):
        load_bundle(tmp_path / "b")


def test_missing_or_not_a_directory_points_at_persona_train(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="no model bundle at") as missing:
        load_bundle(tmp_path / "nothing")
    assert missing.value.hint is not None and "persona train --out" in missing.value.hint
    (tmp_path / "file").write_text("x")
    with pytest.raises(BundleError, match="not a directory"):
        verify_bundle(tmp_path / "file")


def test_bad_manifests_are_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match=r"no manifest\.json"):
        load_bundle(tmp_path / "empty")
    _save(tmp_path / "b")
    (tmp_path / "b" / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(tmp_path / "b")
    _save(tmp_path / "c")
    _edit_manifest(tmp_path / "c", format="something-else")
    with pytest.raises(BundleError, match="not a persona-bundle manifest"):
        load_bundle(tmp_path / "c")


def test_manifest_pointing_outside_the_bundle_is_refused(tmp_path: Path) -> None:
    _save(tmp_path / "b")
    (tmp_path / "secret.json").write_text("{}")
    entry = {"sha256": "0" * 64, "bytes": 2}
    _edit_manifest(tmp_path / "b", files={"../secret.json": entry})
    with pytest.raises(BundleError, match="bad file name"):
        load_bundle(tmp_path / "b")


def test_unlisted_files_are_ignored_but_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _save(tmp_path / "b")
    safetensors.torch.save_file({"x": torch.zeros(1)}, str(tmp_path / "b" / "extra.safetensors"))
    (tmp_path / "b" / "notes.json").write_text("{}")
    with caplog.at_level(logging.WARNING, logger="recsys.bundle"):
        loaded = load_bundle(tmp_path / "b")
    assert "extra" not in loaded.tensors and "notes" not in loaded.documents
    assert "extra.safetensors" in caplog.text and "notes.json" in caplog.text


def test_existing_bundle_is_replaced_only_with_overwrite(tmp_path: Path) -> None:
    _save(tmp_path / "b", version="first")
    with pytest.raises(BundleError, match="already exists"):
        _save(tmp_path / "b", version="second")
    assert load_bundle(tmp_path / "b").version == "first"
    _save(tmp_path / "b", version="second", overwrite=True)
    assert load_bundle(tmp_path / "b").version == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no temporary or old directory left


def test_failed_save_leaves_no_half_bundle(tmp_path: Path) -> None:
    bad_tensors = {"model": {"w": torch.ones(2)}, "sparse": {"s": torch.eye(3).to_sparse()}}
    with pytest.raises(BundleError, match=r"sparse\.safetensors"):
        save_bundle(tmp_path / "b", tensors=bad_tensors, documents={}, data_fingerprint="x")
    with pytest.raises(BundleError, match="cannot be written as JSON"):
        save_bundle(tmp_path / "b", tensors=_tensors(), documents={"config": {"x": object()}}, data_fingerprint="x")
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_bundle(tmp_path: Path) -> None:
    _save(tmp_path / "b", version="first")
    with pytest.raises(BundleError):
        save_bundle(
            tmp_path / "b",
            tensors={"m": {"w": torch.eye(2).to_sparse()}},
            documents={},
            data_fingerprint="x",
            overwrite=True,
        )
    assert load_bundle(tmp_path / "b").version == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", ".hidden", "", "sp ace", "/abs"])
def test_unsafe_names_are_rejected(tmp_path: Path, name: str) -> None:
    with pytest.raises(BundleError, match="bad"):
        save_bundle(tmp_path / "b", tensors={name: {"w": torch.ones(1)}}, documents={}, data_fingerprint="x")
    with pytest.raises(BundleError, match="bad"):
        save_bundle(tmp_path / "b", tensors={}, documents={name: {}}, data_fingerprint="x")
    with pytest.raises(BundleError, match="bad"):
        save_bundle(tmp_path / "b", tensors={}, documents={}, data_fingerprint="x", version=name)
    assert list(tmp_path.iterdir()) == []


def test_document_named_manifest_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="manifest"):
        save_bundle(tmp_path / "b", tensors={}, documents={"manifest": {}}, data_fingerprint="x")
