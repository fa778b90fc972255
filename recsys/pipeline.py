"""Dataset → split → trained model → bundle, and bundle → ready-to-use model.

The bundle records how its data was prepared (source, columns, k-core, protocol) and the data's
fingerprint, so evaluation rebuilds exactly the same split and refuses data that changed.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from recsys.bundle import ITEMS, Bundle, ItemMetadata, load_bundle, save_bundle
from recsys.data import fingerprint, load_interactions, load_item_metadata
from recsys.drift import DriftReference, drift_reference
from recsys.errors import BundleError, DataError
from recsys.export import DEVICE_DOCUMENT, DEVICE_ONNX, device_manifest, export_onnx
from recsys.model import ModelConfig, PersonaModel
from recsys.splits import PROTOCOLS, Split, k_core, make_split
from recsys.train import TrainConfig, TrainResult, train_persona
from recsys.vocab import ItemVocab

log = logging.getLogger(__name__)


@dataclass
class DatasetSpec:
    """How the training data was obtained and cut; stored in the bundle as ``dataset.json``."""

    source: str = "ml-100k"
    user_col: str | None = None
    item_col: str | None = None
    time_col: str | None = None
    min_user: int = 5
    min_item: int = 5
    protocol: str = "time-shift"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DatasetSpec:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass
class Prepared:
    spec: DatasetSpec
    interactions: pl.DataFrame
    split: Split
    fingerprint: str
    items: pl.DataFrame | None = None  # the source's item attributes (recsys.data.load_item_metadata), if any


def prepare(spec: DatasetSpec, *, max_len: int = 50, window_stride: int = 0, repeat_size: int = 0) -> Prepared:
    """Load, k-core filter and split the data as ``spec`` says (``repeat_size`` > 0: with each example's
    whole-history item counts, :mod:`recsys.repeats`)."""
    if spec.protocol not in PROTOCOLS:
        raise DataError(f"unknown protocol {spec.protocol!r}", f"use one of: {', '.join(PROTOCOLS)}")
    df = load_interactions(spec.source, user_col=spec.user_col, item_col=spec.item_col, time_col=spec.time_col)
    df = k_core(df, spec.min_user, spec.min_item)
    if df.height == 0:
        raise DataError(
            f"no interactions left after {spec.min_user}-core users / {spec.min_item}-core items",
            "lower --min-user/--min-item or use a larger dataset",
        )
    split = make_split(df, spec.protocol, max_len=max_len, window_stride=window_stride, repeat_size=repeat_size)
    log.info(
        "data %s: %d interactions, %d users, %d items; train/valid/test examples %d/%d/%d",
        spec.source,
        df.height,
        int(split.stats.get("n_users", 0)),
        split.vocab.size - 2,
        len(split.train),
        len(split.valid),
        len(split.test),
    )
    return Prepared(spec, df, split, fingerprint(df), load_item_metadata(spec.source))


def align_items(frame: pl.DataFrame, vocab: ItemVocab) -> ItemMetadata:
    """Item attributes (``item_id`` + columns) → lists aligned with ``vocab``; None for items the file lacks."""
    ids = frame.get_column("item_id").to_list()
    columns: dict[str, list[Any]] = {}
    for name in frame.columns:
        if name != "item_id":
            by_id = dict(zip(ids, frame.get_column(name).to_list(), strict=True))
            columns[name] = [None] * vocab.OFFSET + [by_id.get(item) for item in vocab.ids]
    return ItemMetadata(columns)


@dataclass
class TrainedModel:
    """A bundle loaded for use: the model (eval mode), its no-prototype ablation, vocabulary and metadata."""

    model: PersonaModel
    no_prototype_model: PersonaModel
    vocab: ItemVocab
    spec: DatasetSpec
    train_config: TrainConfig
    item_counts: np.ndarray
    drift: DriftReference
    bundle: Bundle
    items: ItemMetadata | None = None  # titles and other attributes, when the dataset shipped them

    @property
    def version(self) -> str:
        return self.bundle.version


def device_files(model: PersonaModel, vocab: ItemVocab) -> tuple[dict[str, bytes], dict[str, Any]]:
    """The bundle's device model (``device.onnx``, :mod:`recsys.export`) and its ``device`` document; none when the
    export fails (logged: the trained model is worth keeping, and the API exports on first request instead)."""
    try:
        graph = export_onnx(model, vocab, None)
    except Exception:
        log.exception("exporting the device model failed; the bundle is written without device.onnx")
        return {}, {}
    return {DEVICE_ONNX: graph}, {DEVICE_DOCUMENT: device_manifest(model, vocab, None)}


def save_trained(out: Path, prepared: Prepared, result: TrainResult, tc: TrainConfig, *, overwrite: bool) -> Bundle:
    model = result.model
    artifacts, device_doc = device_files(model, prepared.split.vocab)
    items = {} if prepared.items is None else {ITEMS: align_items(prepared.items, prepared.split.vocab).to_document()}
    return save_bundle(
        out,
        tensors={
            "model": model.state_dict(),
            "adapter_no_prototypes": result.no_prototype_adapter,
            "stats": {"item_counts": torch.from_numpy(prepared.split.item_counts.astype(np.int64))},
        },
        documents={
            "config": {"model": model.cfg.to_dict(), "train": tc.to_dict()},
            "vocab": prepared.split.vocab.to_json(),
            "drift": drift_reference(model, prepared.split.valid).to_json(),
            "dataset": {"spec": prepared.spec.to_dict(), "stats": prepared.split.stats},
            "metrics": {
                "valid": result.valid_metrics,
                "chosen_k": result.chosen_k,
                "residual_weight": model.cfg.residual_weight,
                "group_bias": asdict(result.group_bias),
                "fine_groups": None if result.fine_groups is None else result.fine_groups.as_dict(),
                "history_groups": None if result.history_groups is None else result.history_groups.as_dict(),
                "k_scores": {str(k): v for k, v in result.k_scores.items()},
                "stages": [asdict(s) for s in result.stages],
            },
            **device_doc,
            **items,
        },
        artifacts=artifacts,
        data_fingerprint=prepared.fingerprint,
        overwrite=overwrite,
    )


def train_bundle(
    spec: DatasetSpec,
    out: Path,
    *,
    model_overrides: dict[str, Any] | None = None,
    tc: TrainConfig | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> tuple[Bundle, TrainResult]:
    """``persona train``: prepare the data, run the three stages, write the bundle."""
    tc = tc or TrainConfig()
    if out.exists() and not overwrite:
        raise DataError(f"{out} already exists", "pass --overwrite to replace it or choose another --out")
    shape = ModelConfig.from_dict({**(model_overrides or {}), "n_items": 1})  # the window before the vocabulary
    prepared = prepare(spec, max_len=shape.max_len, window_stride=shape.stride, repeat_size=shape.repeat_size)
    cfg = ModelConfig.from_dict({**shape.to_dict(), "n_items": prepared.split.vocab.size})
    result = train_persona(prepared.split, cfg, tc, progress=progress)
    bundle = save_trained(out, prepared, result, tc, overwrite=overwrite)
    log.info("wrote bundle %s (version %s)", out, bundle.version)
    return bundle, result


def load_trained(path: Path) -> TrainedModel:
    """Load and verify a bundle; refuses one this code cannot rebuild, with a clear message."""
    bundle = load_bundle(path)
    try:
        cfg = ModelConfig.from_stored(bundle.documents["config"]["model"])
        tc = TrainConfig.from_dict(bundle.documents["config"]["train"])
        spec = DatasetSpec.from_dict(bundle.documents["dataset"]["spec"])
        vocab = ItemVocab.from_json(bundle.documents["vocab"])
        state = bundle.tensors["model"]
        no_proto_state = bundle.tensors["adapter_no_prototypes"]
        counts = bundle.tensors["stats"]["item_counts"].numpy()
        drift = DriftReference.from_json(bundle.documents["drift"])
        items = ItemMetadata.from_document(bundle.documents[ITEMS], vocab.size) if ITEMS in bundle.documents else None
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(
            f"bundle {path} lacks a part this persona needs ({exc})", "retrain with `persona train`"
        ) from None
    model = PersonaModel(cfg)
    state = with_group_counts(state, model)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise BundleError(
            f"bundle {path} does not fit this model code: {first}", "retrain with `persona train`"
        ) from None
    model.eval()
    no_proto = PersonaModel(cfg)
    no_proto.load_state_dict(state)
    try:
        no_proto.adapter.load_state_dict(no_proto_state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise BundleError(
            f"bundle {path} does not fit this model code: {first}", "retrain with `persona train`"
        ) from None
    no_proto.eval()
    return TrainedModel(model, no_proto, vocab, spec, tc, counts, drift, bundle, items)


def with_group_counts(state: dict[str, torch.Tensor], model: PersonaModel) -> dict[str, torch.Tensor]:
    """A bundle trained before prototypes counted their members' next items has no ``bank.next_items``: it loads
    with empty counts, which add no group bias (and its config has β = 0), so it serves exactly as it was trained;
    one trained before the fine groups (or the history groups) loads with none, one before the online switches with all
    of them on."""
    if "bank.centres" not in state:
        return state
    out = dict(state)
    if "bank.next_items" not in state:
        out["bank.next_items"] = torch.zeros(state["bank.centres"].shape[0], model.cfg.n_items)
    # one trained before the fine groups has none (and its config 0 of them): it serves exactly as it was trained;
    # one trained before the online switches starts with every term on
    for name in ("fine_centres", "fine_items", "history_centres", "history_items", "switches"):
        out.setdefault(f"bank.{name}", getattr(model.bank, name))
    return out
