"""What a device downloads: the model version's ONNX graph with its manifest, and a session's edit as bytes.

The graph is the bundle's ``device.onnx`` (written by ``persona train``); a bundle written before devices existed
gets one exported from the loaded model on first request (once per process and version). Both are served with a
strong ``ETag`` (the sha256 of the bytes) so a device downloads each version once (docs/device.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import weakref
from dataclasses import dataclass
from typing import Any

from recsys.bundle import read_artifact
from recsys.edit_codec import DeviceEdit, encoded_size, low_rank_factors
from recsys.export import DEVICE_DOCUMENT, DEVICE_ONNX, device_manifest, export_onnx
from recsys.online import OnlineModel
from serving.problems import InvalidInput, NotFound
from serving.ranking import ExportedEdit

log = logging.getLogger("persona.serving")


@dataclass(frozen=True)
class DeviceArtifact:
    """The device graph of one model version and its manifest (vocabulary, shapes), each with its ETag."""

    version: str
    graph: bytes
    graph_etag: str
    manifest: bytes
    manifest_etag: str


def _etag(data: bytes) -> str:
    return f'"{hashlib.sha256(data).hexdigest()}"'


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """Whether an ``If-None-Match`` header names ``etag`` (or is ``*``): the client's copy is current (304)."""
    if not if_none_match:
        return False
    tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
    return "*" in tags or etag in tags


class DeviceModels:
    """The device artifact of each loaded model, built once per model object (thread-safe)."""

    def __init__(self) -> None:
        self._built: weakref.WeakKeyDictionary[OnlineModel, DeviceArtifact] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def artifact(self, online: OnlineModel, version: str) -> DeviceArtifact:
        """The device model of ``version``, which must be the served one (devices follow the version that their
        edits name; an edit only fits the model it was made for)."""
        if version != online.version:
            raise NotFound(
                f"model version {version!r} is not the one served here ({online.version})",
                f"download /v1/models/{online.version}/device: session edits are made for that version",
            )
        built = self._built.get(online)
        if built is not None:
            return built
        with self._lock:
            built = self._built.get(online)
            if built is None:
                built = self._build(online)
                self._built[online] = built
        return built

    @staticmethod
    def _build(online: OnlineModel) -> DeviceArtifact:
        graph = read_artifact(online.path, DEVICE_ONNX) if online.path is not None else None
        doc: dict[str, Any] | None = online.trained.bundle.documents.get(DEVICE_DOCUMENT)
        if graph is None or doc is None:
            log.info("model %s has no device.onnx in its bundle; exporting it now", online.version)
            graph = export_onnx(online.model, online.vocab, online.version)
            doc = device_manifest(online.model, online.vocab, online.version)
        manifest = json.dumps({**doc, "model_version": online.version}, separators=(",", ":")).encode()
        return DeviceArtifact(online.version, graph, _etag(graph), manifest, _etag(manifest))


def device_edit(e: ExportedEdit, rank: int) -> DeviceEdit:
    """The exported edit in the device's form; ``rank`` > 0 sends truncated-SVD factors of that rank."""
    weight = e.weight.detach().numpy()
    dim = weight.shape[-1]
    if rank > dim:
        raise InvalidInput(f"rank {rank} exceeds the layer width {dim}", f"ask for a rank from 1 to {dim}, or 0")
    return DeviceEdit(
        model_version=e.model_version,
        edit_version=e.edit_version,
        prototype_id=e.prototype_id,
        bias=e.bias.detach().numpy(),
        weight=None if rank else weight,
        factors=low_rank_factors(weight, rank) if rank else None,
        item_bias=None if e.item_bias is None else e.item_bias.detach().numpy(),
    )


def binary_sizes(e: ExportedEdit, rank: int) -> dict[str, int]:
    """Bytes of the binary forms of this edit: float16 and float32 (and their low-rank form when ``rank`` > 0)."""
    n_layers, dim = e.bias.shape
    n_items = 0 if e.item_bias is None else int(e.item_bias.shape[0])
    sizes = {}
    for dtype in ("float16", "float32"):
        sizes[dtype] = encoded_size(n_layers, dim, dtype=dtype, n_items=n_items, version=e.model_version)
        if rank:
            sizes[f"rank{rank}_{dtype}"] = encoded_size(
                n_layers, dim, dtype=dtype, rank=rank, n_items=n_items, version=e.model_version
            )
    return sizes
