"""A reference Persona device: ranks on the device with the server's edit, never runs backpropagation.

Needs only ``numpy`` and ``onnxruntime`` (no torch, nothing of Persona's own code): what a phone app would do,
written so it can be ported line by line to any language with an ONNX runtime (docs/device.md).

    device = Device("http://127.0.0.1:8000", cache_dir=Path("~/.persona-device").expanduser())
    device.observe("session-1", ["50", "172", "133"])  # this session's items, oldest first
    for item_id, score in device.recommend("session-1", k=10):
        print(item_id, score)

Each ``recommend`` asks the server for the session's current edit (binary, float16); the edit names the model
version it fits, and the device downloads that version's ONNX graph once (it revalidates with ``If-None-Match``:
304 keeps its copy). Without a connection it ranks with the last model and edit it stored. Ranking follows the
server's rules: the encoder's window of the history (``window_stride``), the edit added to the editable layers,
the prototype's item bias added to the scores, and the session's last ``max_len`` items never recommended. For a
model with a repeat part (the manifest's ``repeat`` block) the device also keeps the session's whole-history item
counts by the server's rule (:class:`RepeatCounts`) and feeds them as ``repeat_entries``; such a model recommends
the session's own items again, as the server does by default.
"""

from __future__ import annotations

import json
import struct
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

__all__ = ["Device", "Edit", "RepeatCounts", "decode_edit", "window_length"]

# ---------------------------------------------------------------------------------------- binary edit (docs/device.md)
HEADER = struct.Struct("<4sHBBHHHHIiQ")  # magic, format, dtype, flags, L, D, r, m, N, prototype, edit version
DTYPES = {1: np.dtype("<f2"), 2: np.dtype("<f4")}


@dataclass
class Edit:
    """A decoded edit: ΔW [L, D, D] and Δb [L, D] (float32), the item bias [N] or None, and what it fits."""

    model_version: str
    edit_version: int
    prototype_id: int
    weight: np.ndarray
    bias: np.ndarray
    item_bias: np.ndarray | None


def decode_edit(data: bytes) -> Edit:
    """Parse the binary edit layout; low-rank factors are multiplied out (ΔW_l = U_l V_l)."""
    magic, fmt, code, flags, n_layers, dim, rank, m, n_items, proto, version = HEADER.unpack_from(data)
    if magic != b"PEDT" or fmt != 1 or code not in DTYPES:
        raise ValueError("not a Persona edit this device can read")
    dtype = DTYPES[code]
    pos = HEADER.size + m + (-m % 4)
    model_version = data[HEADER.size : HEADER.size + m].decode("utf-8")

    def take(*shape: int) -> np.ndarray:
        nonlocal pos
        count = int(np.prod(shape))
        if pos + count * dtype.itemsize > len(data):
            raise ValueError("edit truncated")
        out = np.frombuffer(data, dtype=dtype, count=count, offset=pos).reshape(shape).astype(np.float32)
        pos += count * dtype.itemsize
        pos += -pos % 4
        return out

    if flags & 1:
        u, v = take(n_layers, dim, rank), take(n_layers, rank, dim)
        weight = np.matmul(u, v)
    else:
        weight = take(n_layers, dim, dim)
    bias = take(n_layers, dim)
    item_bias = take(n_items) if flags & 2 else None
    if pos != len(data):
        raise ValueError("edit has trailing bytes")
    return Edit(model_version, version, proto, weight, bias, item_bias)


def window_length(n: int, max_len: int, stride: int) -> int:
    """How many of the last ``n`` items the encoder reads (the server's rule, recsys/windows.py)."""
    if stride <= 0 or n <= max_len:
        return min(n, max_len)
    return max_len - stride + 1 + (n - max_len - 1) % stride


# ------------------------------------------------------------------------------- repeat counts (docs/device.md)
class RepeatCounts:
    """One session's whole-history item counts, bounded to ``size`` entries: the server's rule, line for line.

    Each known item the session chooses is ``add``-ed in order. An entry is ``[count, last, short, long]``: how
    often, the index of its latest occurrence among the counted events, and two decayed counts
    ``Σ γ^(age − 1)`` (γ = ``decays``) as of that occurrence. A new item always gets in; when the table is full it
    evicts the entry with the fewest occurrences, the oldest latest occurrence among equals. Entries keep the order
    they entered in (a dict's), and so does the graph's input.
    """

    def __init__(self, size: int, decays: tuple[float, float]) -> None:
        self.size, self.decays = size, decays
        self.table: dict[str, list[Any]] = {}
        self.n = 0  # events counted

    def add(self, item: str) -> None:
        short, long = self.decays
        entry = self.table.get(item)
        if entry is None:
            if len(self.table) >= self.size:
                del self.table[min(self.table.items(), key=lambda kv: (kv[1][0], kv[1][1]))[0]]
            self.table[item] = [1, self.n, 1.0, 1.0]
        else:
            gap = self.n - entry[1]
            entry[0] += 1
            entry[1] = self.n
            entry[2] = entry[2] * short**gap + 1.0
            entry[3] = entry[3] * long**gap + 1.0
        self.n += 1

    def encode(self, index: dict[str, int]) -> np.ndarray:
        """``repeat_entries`` of one session, float32 [size, 5]: ``(item index, count, age, decayed_short,
        decayed_long)`` per entry in table order, age = events since its latest occurrence, decayed counts read
        as of now; items the vocabulary does not know are left out, empty rows are 0."""
        short, long = self.decays
        out = np.zeros((self.size, 5), dtype=np.float32)
        j = 0
        for item, (count, last, dshort, dlong) in self.table.items():
            code = index.get(item, 1)
            if code <= 1 or j >= self.size:
                continue
            age = self.n - last
            out[j] = (code, count, age, dshort * short ** (age - 1.0), dlong * long ** (age - 1.0))
            j += 1
        return out


# ---------------------------------------------------------------------------------------------------------- device
class Offline(Exception):
    """The server cannot be reached (the device then ranks with what it stored)."""


@dataclass
class Device:
    """One device: a local history per session, a cached model per version and the last edit per session."""

    base_url: str
    cache_dir: Path
    api_key: str | None = None
    dtype: str = "float16"
    timeout_s: float = 10.0
    history: dict[str, list[str]] = field(default_factory=dict)
    # per session: its item counts and how many of its history's items they have seen (models with a repeat part)
    counts: dict[str, tuple[RepeatCounts, int]] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=lambda: {"model_downloads": 0, "model_revalidated": 0})
    online: bool = True  # whether the last recommend() reached the server
    _loaded: tuple[str, ort.InferenceSession, dict[str, Any]] | None = field(default=None, init=False, repr=False)

    # ------------------------------------------------------------------ local state
    def observe(self, session_id: str, item_ids: list[str]) -> None:
        """Record this session's interactions (oldest first), as the device also sends them to the server."""
        self.history.setdefault(session_id, []).extend(item_ids)

    # ------------------------------------------------------------------ HTTP
    def _get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        request = urllib.request.Request(self.base_url.rstrip("/") + path, headers=dict(headers or {}))
        if self.api_key:
            request.add_header("X-API-Key", self.api_key)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return response.status, dict(response.headers.items()), response.read()
        except urllib.error.HTTPError as err:
            if err.code == 304:
                return 304, dict(err.headers.items()), b""
            raise
        except (urllib.error.URLError, OSError) as err:
            raise Offline(str(err)) from err

    # ------------------------------------------------------------------ model (once per version)
    def _model_dir(self, version: str) -> Path:
        return self.cache_dir / "models" / version

    def sync_model(self, version: str) -> None:
        """Make sure the device holds ``version``'s graph and manifest: revalidate with the stored ETags (304 keeps
        them), download otherwise."""
        folder = self._model_dir(version)
        folder.mkdir(parents=True, exist_ok=True)
        for name, path in (("device.onnx", ""), ("manifest.json", "/manifest")):
            tag_file = folder / f"{name}.etag"
            headers = {}
            if (folder / name).exists() and tag_file.exists():
                headers["If-None-Match"] = tag_file.read_text()
            status, reply, body = self._get(f"/v1/models/{version}/device{path}", headers)
            if status == 304:
                self.stats["model_revalidated"] += 1
                continue
            (folder / name).write_bytes(body)
            tag_file.write_text(reply.get("etag") or reply.get("ETag") or "")
            self.stats["model_downloads"] += name == "device.onnx"

    def _session(self, version: str) -> tuple[ort.InferenceSession, dict[str, Any]]:
        if self._loaded is None or self._loaded[0] != version:
            folder = self._model_dir(version)
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            graph = ort.InferenceSession(str(folder / "device.onnx"), options, providers=["CPUExecutionProvider"])
            manifest = json.loads((folder / "manifest.json").read_text())
            manifest["index"] = {item: i + manifest["index_offset"] for i, item in enumerate(manifest["items"])}
            self._loaded = (version, graph, manifest)
        return self._loaded[1], self._loaded[2]

    # ------------------------------------------------------------------ edit (per request, last one kept)
    def fetch_edit(self, session_id: str) -> Edit:
        """The session's current edit from the server, stored for offline use; the stored one when offline."""
        stored = self.cache_dir / "edits" / f"{session_id}.bin"
        try:
            _, _, body = self._get(f"/v1/sessions/{session_id}/edit?format=binary&dtype={self.dtype}")
            stored.parent.mkdir(parents=True, exist_ok=True)
            stored.write_bytes(body)
            self.online = True
        except Offline:
            if not stored.exists():
                raise
            body = stored.read_bytes()
            self.online = False
        return decode_edit(body)

    # ------------------------------------------------------------------ ranking
    def session_counts(self, session_id: str, manifest: dict[str, Any]) -> RepeatCounts:
        """The session's item counts, brought up to date with the items observed since the last call: only items
        the model knows are counted (the server does not apply the others), each once, in order."""
        repeat = manifest["repeat"]
        counts, done = self.counts.get(session_id) or (RepeatCounts(repeat["size"], tuple(repeat["decays"])), 0)
        history, index = self.history.get(session_id, []), manifest["index"]
        for item in history[done:]:
            if item in index:
                counts.add(item)
        self.counts[session_id] = (counts, len(history))
        return counts

    def recommend(self, session_id: str, k: int = 10, exclude_seen: bool | None = None) -> list[tuple[str, float]]:
        """Top-k (item id, score) for the session, ranked on the device with its current (or last) edit.
        ``exclude_seen`` as the server's (default: leave the history out, but not for a model with a repeat part)."""
        edit = self.fetch_edit(session_id)
        if self.online:
            self.sync_model(edit.model_version)
        graph, manifest = self._session(edit.model_version)
        counts = self.session_counts(session_id, manifest) if manifest.get("repeat") else None
        inputs = self.inputs(manifest, self.history.get(session_id, []), edit, counts, exclude_seen)
        scores = graph.run(["scores"], inputs)[0][0]
        order = np.argsort(-scores, kind="stable")[:k]
        items = manifest["items"]
        offset = manifest["index_offset"]
        return [(items[i - offset], float(scores[i])) for i in order if np.isfinite(scores[i])]

    @staticmethod
    def inputs(
        manifest: dict[str, Any],
        history: list[str],
        edit: Edit,
        counts: RepeatCounts | None = None,
        exclude_seen: bool | None = None,
    ) -> dict[str, np.ndarray]:
        """The graph's inputs for one session: its encoder window, the items never to recommend (its last
        ``max_len``, unless ``exclude_seen`` is false; by default false for a model with a repeat part, as on the
        server), the edit, the item bias and, for a model with a repeat part, its item counts."""
        index = manifest["index"]
        known = [index[i] for i in history if i in index]  # the server skips items its model does not know
        max_len, n_items = manifest["max_len"], manifest["n_items"]
        window = known[len(known) - window_length(len(known), max_len, manifest["window_stride"]) :]
        hist = np.zeros((1, max_len), dtype=np.int64)
        if window:
            hist[0, max_len - len(window) :] = window
        repeat = manifest.get("repeat")
        if exclude_seen is None:
            exclude_seen = repeat is None  # a re-consuming model is there to recommend seen items
        seen = np.array([(known[-max_len:] if exclude_seen else []) or [0]], dtype=np.int64)
        bias = edit.item_bias if edit.item_bias is not None else np.zeros(n_items, dtype=np.float32)
        out = {
            "history": hist,
            "seen": seen,
            "delta_weight": edit.weight[None].astype(np.float32),
            "delta_bias": edit.bias[None].astype(np.float32),
            "item_bias": bias[None].astype(np.float32),
        }
        if repeat:
            if counts is None:  # no counts kept: the history's known items, counted now
                counts = RepeatCounts(repeat["size"], tuple(repeat["decays"]))
                for item in history:
                    if item in index:
                        counts.add(item)
            out["repeat_entries"] = counts.encode(index)[None]
        return out
