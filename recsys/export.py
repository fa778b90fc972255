"""The device model as a portable ONNX graph (METHOD.md §1 and §6 "Export to devices").

A device holds one graph per model version and never runs backpropagation: the cloud sends each session's edit
and the device feeds it in as an input. The graph computes exactly what :meth:`recsys.online.OnlineModel.rank`
does for one session with a given edit:

- ``history`` int64 [B, T]: the encoder's window of the session's item indices, left-padded with 0 (PAD), most
  recent last, T = ``max_len`` (:func:`device_inputs` builds it from item ids);
- ``seen`` int64 [B, S]: item indices that must not be recommended (the server's ``exclude_seen``: the session's
  last ``max_len`` items), padded with 0; any S ≥ 1;
- ``delta_weight`` float32 [B, L, D, D] and ``delta_bias`` float32 [B, L, D]: the edit of every editable layer,
  ``W_l + ΔW_l``, ``b_l + Δb_l`` (zeros = the base model);
- ``item_bias`` float32 [B, N]: an additive per-item score bias (the session's prototype's group bias, zeros = none);
- ``repeat_entries`` float32 [B, R, 5], only in the graph of a model with a repeat part (:mod:`recsys.repeats`):
  the session's whole-history item counts, rows ``(item index, count, age, decayed_short, decayed_long)`` (0 =
  empty), which the device keeps by the rule of :class:`recsys.repeats.RepeatCounts` (the manifest's ``repeat``
  block gives the size and the decays); the repeat part's bias is added at those items.

Outputs: ``scores`` [B, N] (PAD, UNK and ``seen`` at -inf) and ``top_indices`` int64 / ``top_scores`` float32
[B, k] for the ``k`` fixed at export time. Scores are ``<x_L, t(E_i)> + bias_i``: the item targets ``t(E)`` are a
constant of the graph, computed once at export time.

The vocabulary (item id ↔ index) and the shapes a device needs travel in a JSON document beside the graph
(:func:`device_manifest`), and inside the graph as ``metadata_props`` (key ``persona``) so a lone ``.onnx`` file is
still self-describing.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recsys.model import PAD, UNK, GRU4RecEncoder, PersonaModel, SASRecEncoder, feed_forward
from recsys.repeats import DECAYS, ENTRY_WIDTH
from recsys.vocab import ItemVocab
from recsys.windows import window_length

log = logging.getLogger(__name__)

#: The ONNX opset written (onnxruntime ≥ 1.20 runs it; onnxruntime-web too).
OPSET = 18
#: Version of the graph's input/output contract (bumped when an input or output changes meaning).
GRAPH_VERSION = 1
#: Default k of the graph's top-k outputs.
TOP_K = 10
#: The device model's names inside a bundle: the graph and its JSON document (:func:`device_manifest`).
DEVICE_ONNX = "device.onnx"
DEVICE_DOCUMENT = "device"
INPUTS = ("history", "seen", "delta_weight", "delta_bias", "item_bias")
REPEAT_INPUT = "repeat_entries"  # the extra input of a model with a repeat part


def graph_inputs(model: PersonaModel) -> tuple[str, ...]:
    """The graph's input names for this model: :data:`INPUTS`, plus :data:`REPEAT_INPUT` with a repeat part."""
    return (*INPUTS, REPEAT_INPUT) if model.device_model.repeat is not None else INPUTS


OUTPUTS = ("scores", "top_indices", "top_scores")


class DeviceGraph(nn.Module):
    """The frozen device model with the edit and the score bias as inputs (see the module docstring)."""

    item_targets: Tensor

    def __init__(self, model: PersonaModel, k: int = TOP_K) -> None:
        super().__init__()
        dm = model.device_model
        self.cfg = model.cfg
        self.k = k
        self.items = nn.Parameter(dm.items.weight.detach().clone(), requires_grad=False)
        self.encoder = dm.encoder
        self.head_weight = nn.Parameter(dm.head_weight.detach().clone(), requires_grad=False)
        self.head_bias = nn.Parameter(dm.head_bias.detach().clone(), requires_grad=False)
        with torch.no_grad():
            self.register_buffer("item_targets", dm.item_targets().detach().clone())
        self.repeat = dm.repeat
        self.eval()

    def encode(self, history: Tensor) -> Tensor:
        """User state h [B, D] of the left-padded window [B, T]: the serving path's arithmetic."""
        emb = F.embedding(history, self.items)
        mask = history != PAD
        if isinstance(self.encoder, SASRecEncoder):
            return self._sasrec(emb, mask)
        assert isinstance(self.encoder, GRU4RecEncoder)
        return self._gru(emb, mask)

    def _sasrec(self, emb: Tensor, mask: Tensor) -> Tensor:
        """:meth:`SASRecEncoder._infer_last`, with attention written out (exports to plain MatMul/Softmax)."""
        enc = self.encoder
        assert isinstance(enc, SASRecEncoder)
        b, t, dim = emb.shape
        heads = enc.n_heads
        hd = dim // heads
        x = emb * math.sqrt(dim) + enc.positions(mask)
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        allowed = (causal & mask.unsqueeze(1)) | torch.eye(t, dtype=torch.bool)  # [B, T, T]
        neg = torch.zeros(b, 1, t, t).masked_fill(~allowed.unsqueeze(1), float("-inf"))
        layers: Any = enc.blocks.layers
        for n, layer in enumerate(layers):
            sa = layer.self_attn
            h = F.layer_norm(x, (dim,), layer.norm1.weight, layer.norm1.bias, layer.norm1.eps)
            qkv = F.linear(h, sa.in_proj_weight, sa.in_proj_bias).view(b, t, 3, heads, hd).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
            last = n == len(layers) - 1
            if last:  # the user is the last position: the final block attends from that one query
                q, mask_n = q[:, :, -1:], neg[:, :, -1:]
            else:
                mask_n = neg
            att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + mask_n, dim=-1)
            o = (att @ v).transpose(1, 2).reshape(b, -1, dim)
            if last:
                y = x[:, -1:] + F.linear(o, sa.out_proj.weight, sa.out_proj.bias)
                y = y + feed_forward(layer, y)
                return F.layer_norm(y[:, 0], (dim,), enc.norm.weight, enc.norm.bias, enc.norm.eps)
            x = x + F.linear(o, sa.out_proj.weight, sa.out_proj.bias)
            x = x + feed_forward(layer, x)
        raise AssertionError("SASRec has at least one block")

    def _gru(self, emb: Tensor, mask: Tensor) -> Tensor:
        """The GRU's recurrence over the real items (padding skipped, as packing does), unrolled over T."""
        enc = self.encoder
        assert isinstance(enc, GRU4RecEncoder)
        gru = enc.gru
        x = F.linear(emb, gru.weight_ih_l0, gru.bias_ih_l0)  # type: ignore[arg-type]
        real = mask.clone()
        real[:, -1] |= ~mask.any(1)  # an empty window reads its last (padding) position, as packing does
        h = emb.new_zeros(emb.shape[0], gru.hidden_size)
        for t in range(emb.shape[1]):
            i_r, i_z, i_n = x[:, t].chunk(3, 1)
            h_r, h_z, h_n = F.linear(h, gru.weight_hh_l0, gru.bias_hh_l0).chunk(3, 1)  # type: ignore[arg-type]
            r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
            n = torch.tanh(i_n + r * h_n)
            h = torch.where(real[:, t : t + 1], n + z * (h - n), h)
        return h

    def forward(
        self, history: Tensor, seen: Tensor, delta_weight: Tensor, delta_bias: Tensor, item_bias: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        x = self.head(history, delta_weight, delta_bias)
        return self.rank(x @ self.item_targets.T + item_bias, seen)

    def head(self, history: Tensor, delta_weight: Tensor, delta_bias: Tensor) -> Tensor:
        """The edited head's output x [B, D]."""
        x = self.encode(history)
        n_layers = self.head_weight.shape[0]
        for layer in range(n_layers):
            w = self.head_weight[layer] + delta_weight[:, layer]  # [B, D, D]
            x = (w @ x.unsqueeze(-1)).squeeze(-1) + self.head_bias[layer] + delta_bias[:, layer]
            if layer < n_layers - 1:
                x = torch.tanh(x)
        return x

    def rank(self, s: Tensor, seen: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Scores with PAD, UNK and ``seen`` at -inf, and their top k."""
        never = torch.zeros_like(s[:1])
        never[:, PAD] = float("-inf")
        never[:, UNK] = float("-inf")
        s = (s + never).scatter(1, seen, float("-inf"))
        top = torch.topk(s, self.k, dim=1)
        return s, top.indices, top.values


class RepeatDeviceGraph(DeviceGraph):
    """:class:`DeviceGraph` of a model with a repeat part: one more input, ``repeat_entries`` [B, R, 5]."""

    def forward(  # type: ignore[override]
        self,
        history: Tensor,
        seen: Tensor,
        delta_weight: Tensor,
        delta_bias: Tensor,
        item_bias: Tensor,
        repeat_entries: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        x = self.head(history, delta_weight, delta_bias)
        assert self.repeat is not None
        logits = x @ self.item_targets.T
        items, bias = self.repeat(x, self.item_targets, repeat_entries, logits)
        return self.rank((logits + item_bias).scatter_add(1, items, bias), seen)


@dataclass(frozen=True)
class DeviceSpec:
    """What a device needs beside the graph to build its inputs (stored as ``device.json``)."""

    model_version: str | None  # None inside a bundle: its manifest's version is the model's (it hashes this file)
    n_items: int
    dim: int
    max_len: int
    window_stride: int
    n_edit_layers: int
    edit_rank: int
    k: int
    items: list[str]  # vocabulary: index i + 2 is item items[i]; 0 = padding, 1 = unknown
    repeat_size: int = 0  # entries of the repeat part's input (0: the model has none, nor the input)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": "persona-device",
            "graph_version": GRAPH_VERSION,
            "opset": OPSET,
            "model_version": self.model_version,
            "n_items": self.n_items,
            "dim": self.dim,
            "max_len": self.max_len,
            "window_stride": self.window_stride,
            "n_edit_layers": self.n_edit_layers,
            "edit_rank": self.edit_rank,
            "k": self.k,
            "pad_index": PAD,
            "unknown_index": UNK,
            "index_offset": ItemVocab.OFFSET,
            "inputs": [*INPUTS, REPEAT_INPUT] if self.repeat_size else list(INPUTS),
            "repeat": (
                {
                    "size": self.repeat_size,
                    "entry": ["item", "count", "age", *(f"decayed_{g}" for g in DECAYS)],
                    "decays": list(DECAYS),
                    "rule": "recsys.repeats.RepeatCounts",
                }
                if self.repeat_size
                else None
            ),
            "outputs": list(OUTPUTS),
            "items": self.items,
        }


def device_manifest(model: PersonaModel, vocab: ItemVocab, version: str | None, k: int = TOP_K) -> dict[str, Any]:
    """The JSON document that ships beside the graph: shapes, window rule and the vocabulary (``version``: the
    model version, ``None`` inside a bundle, whose version is a hash of its files, this one included)."""
    cfg = model.cfg
    return DeviceSpec(
        model_version=version,
        n_items=cfg.n_items,
        dim=cfg.dim,
        max_len=cfg.max_len,
        window_stride=cfg.stride,
        n_edit_layers=cfg.n_edit_layers,
        edit_rank=cfg.edit_rank,
        k=min(k, cfg.n_items - 2),
        items=list(vocab.ids),
        repeat_size=cfg.repeat_size if model.device_model.repeat is not None else 0,
    ).to_json()


def example_inputs(model: PersonaModel, batch: int = 1) -> tuple[Tensor, ...]:
    """Zero edit, zero bias, an empty history: valid inputs of the right shapes (for export and tests)."""
    cfg = model.cfg
    n, dim, layers = cfg.n_items, cfg.dim, cfg.n_edit_layers
    base = (
        torch.zeros(batch, cfg.max_len, dtype=torch.long),
        torch.zeros(batch, 1, dtype=torch.long),
        torch.zeros(batch, layers, dim, dim),
        torch.zeros(batch, layers, dim),
        torch.zeros(batch, n),
    )
    if model.device_model.repeat is None:
        return base
    return (*base, torch.zeros(batch, cfg.repeat_size, ENTRY_WIDTH))


def export_onnx(model: PersonaModel, vocab: ItemVocab, version: str | None, *, k: int = TOP_K) -> bytes:
    """The device graph of ``model`` as ONNX bytes (opset :data:`OPSET`), with :func:`device_manifest` embedded as
    the ``persona`` metadata property. ``k`` (the top-k outputs) must leave room in the catalogue."""
    import onnx

    k = min(k, model.cfg.n_items - 2)
    if k < 1:
        raise ValueError(f"the catalogue has {model.cfg.n_items - 2} items, too few for a top-k output")
    graph = DeviceGraph(model, k) if model.device_model.repeat is None else RepeatDeviceGraph(model, k)
    inputs = graph_inputs(model)
    batch = torch.export.Dim("batch", min=1)
    shapes = {
        "history": {0: batch},
        "seen": {0: batch, 1: torch.export.Dim("seen", min=1)},
        "delta_weight": {0: batch},
        "delta_bias": {0: batch},
        "item_bias": {0: batch},
    }
    if REPEAT_INPUT in inputs:
        shapes[REPEAT_INPUT] = {0: batch}
    with (
        torch.no_grad(),
        warnings.catch_warnings(),
        _quiet("torch.onnx", "torch.fx", "torch.fx._symbolic_trace", "torch.export"),
    ):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            graph,
            example_inputs(model, 2),
            input_names=list(inputs),
            output_names=list(OUTPUTS),
            opset_version=OPSET,
            dynamic_shapes=shapes,
            dynamo=True,
            optimize=True,
            verbose=False,
        )
    assert program is not None
    proto = program.model_proto
    meta = proto.metadata_props.add()
    meta.key = "persona"
    meta.value = json.dumps(device_manifest(model, vocab, version, k), separators=(",", ":"))
    proto.doc_string = f"Persona device model {version or ''}: inputs {', '.join(inputs)}; outputs {', '.join(OUTPUTS)}"
    buf = io.BytesIO()
    onnx.save_model(proto, buf)
    return buf.getvalue()


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Exporter chatter (optional torchvision ops skipped, tracing notes) off: only errors are worth a line."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def write_device_files(out: Path, onnx_bytes: bytes, manifest: dict[str, Any]) -> tuple[Path, Path]:
    """Write the graph to ``out`` and its manifest beside it (``<out stem>.json``); returns both paths."""
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = out.with_suffix(".json")
    out.write_bytes(onnx_bytes)
    meta.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return out, meta


def device_window(items: Sequence[int], max_len: int, stride: int) -> list[int]:
    """The encoder's window of a session's known item indices (oldest first): what ``history`` holds."""
    c = window_length(len(items), max_len, stride)
    return list(items[len(items) - c :])
