"""Measure what a device pays and gets (docs/device.md "Measured"): bytes per edit, ranking latency on the device
(onnxruntime) against the server's in-process ranking, and the accuracy cost of float16 (and low-rank) edits on the
time-shift test.

    OMP_NUM_THREADS=1 .venv/bin/python bench/device_measure.py --model runs/device/ml-s0 --json out.json

Accuracy: every method scores the same test examples in time order with its own copy of the prototype bank refined
after each batch (exactly ``persona evaluate``'s "persona"); the float16 method rounds the edit and the item bias
to float16 before scoring, as a device receiving ``format=binary`` does. NDCG@10 per example, paired bootstrap CI
of the difference (1,000 resamples).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor

from recsys.edit_codec import DeviceEdit, encode_edit, low_rank_factors
from recsys.export import export_onnx
from recsys.metrics import target_ranks
from recsys.model import Edit, PersonaModel
from recsys.online import OnlineModel
from recsys.pipeline import load_trained, prepare
from serving.schemas import EditLayer, SessionEdit


def _round(edit: Edit, bias: Tensor | None, dtype: str, rank: int) -> tuple[Edit, Tensor | None]:
    """The edit (and item bias) as the device decodes it: float16 rounding and/or rank-``rank`` factors."""
    w = edit.weight
    if rank:
        u, v = low_rank_factors(w.numpy(), rank) if w.dim() == 3 else _batched_factors(w.numpy(), rank)
        w = torch.from_numpy(np.matmul(u.astype(dtype).astype(np.float32), v.astype(dtype).astype(np.float32)))
    elif dtype == "float16":
        w = w.half().float()
    b = edit.bias.half().float() if dtype == "float16" else edit.bias
    if bias is not None and dtype == "float16":
        bias = bias.half().float()
    return Edit(w, b, edit.prototype), bias


def _batched_factors(w: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    b, layers, d, _ = w.shape
    u, v = low_rank_factors(w.reshape(b * layers, d, d), rank)
    return u.reshape(b, layers, d, rank), v.reshape(b, layers, rank, d)


@torch.inference_mode()
def accuracy(model: PersonaModel, histories: np.ndarray, targets: np.ndarray, variants: dict[str, tuple[str, int]]):
    """Per-example 0-based ranks [M] of each variant (name -> (dtype, rank)); each refines its own bank copy."""
    out: dict[str, list[np.ndarray]] = {name: [] for name in variants}
    models = {name: copy.deepcopy(model) for name in variants}
    for start in range(0, len(targets), 512):
        hist = torch.from_numpy(histories[start : start + 512])
        tgt = torch.from_numpy(targets[start : start + 512])
        for name, (dtype, rank) in variants.items():
            m = models[name]
            codes = m.codes(hist)
            edit = m.edit_for(codes, "prototype", hist)
            bias = m.bank.item_bias(edit.prototype, edit.codes, edit.groups)
            edit_d, bias_d = _round(edit, bias, dtype, rank)
            scores = m.device_model(hist, edit_d)
            if bias_d is not None:
                scores = scores + bias_d
            out[name].append(target_ranks(scores, tgt).numpy())
            m.bank.refine(codes, edit.prototype)
            m.bank.observe(edit.prototype, tgt)
    return {name: np.concatenate(r) for name, r in out.items()}


def ndcg10(ranks: np.ndarray) -> np.ndarray:
    return np.where(ranks < 10, 1.0 / np.log2(ranks + 2.0), 0.0)


def paired_ci(a: np.ndarray, b: np.ndarray, n: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of a − b and its 95 % paired bootstrap interval."""
    diff = a - b
    rng = np.random.default_rng(seed)
    means = np.array([diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(n)])
    return float(diff.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def _median_ms(fn: Any, repeats: int) -> float:
    for _ in range(10):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


@torch.inference_mode()
def sizes_and_latency(online: OnlineModel, histories: np.ndarray, repeats: int, ranks: list[int]) -> dict[str, Any]:
    """Bytes of one session's edit in every form, and single-session ranking latency on both sides."""
    hist = torch.from_numpy(histories[-1:])  # the last test example: a full history window
    codes = online.codes(hist)
    edit = online.edit(codes, histories=hist)
    group = online.group_bias(edit.prototype, edit.codes, groups=edit.groups)
    w, b = edit.weight[0], edit.bias[0]
    json_body = SessionEdit(
        session_id="session-0000001",
        model_version=online.version,
        prototype_id=int(edit.prototype[0]),
        edit_version=42,
        layers=[EditLayer(weight=wl.tolist(), bias=bl.tolist()) for wl, bl in zip(w, b, strict=True)],
        code=codes[0].tolist(),
        item_bias=None if group is None else group[0].tolist(),
    ).model_dump_json()
    item_bias = None if group is None else group[0].numpy()
    full = DeviceEdit(online.version, 42, int(edit.prototype[0]), b.numpy(), weight=w.numpy(), item_bias=item_bias)
    sizes: dict[str, int] = {
        "json": len(json_body.encode()),
        "binary_float32": len(encode_edit(full, "float32")),
        "binary_float16": len(encode_edit(full, "float16")),
    }
    rel_err = {}
    for r in ranks:
        u, v = low_rank_factors(w.numpy(), r)
        low = DeviceEdit(online.version, 42, 0, b.numpy(), factors=(u, v), item_bias=item_bias)
        sizes[f"binary_rank{r}_float16"] = len(encode_edit(low, "float16"))
        rel_err[f"rank{r}"] = float(np.linalg.norm(u @ v - w.numpy()) / max(np.linalg.norm(w.numpy()), 1e-12))
    if item_bias is not None:
        no_bias = DeviceEdit(online.version, 42, 0, b.numpy(), weight=w.numpy())
        sizes["binary_float16_without_item_bias"] = len(encode_edit(no_bias, "float16"))

    graph = export_onnx(online.model, online.vocab, online.version)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    bias_in = (group if group is not None else torch.zeros(1, online.n_items)).numpy()
    feeds = {
        "history": hist.numpy(),
        "seen": hist.numpy(),
        "delta_weight": edit.weight.numpy(),
        "delta_bias": edit.bias.numpy(),
        "item_bias": bias_in,
    }
    torch.set_num_threads(1)
    state = online.user_states(hist)
    bank = online.initial_bank

    def server_full() -> None:  # a session the server must encode (history carried in the request)
        h = online.user_states(hist)
        s = online.scores_from_queries(*online.served_terms(h, codes, edit.prototype, bank, hist))
        s[0, hist[0]] = float("-inf")
        torch.topk(s, 10)

    def server_stored() -> None:  # a stored session: the consumer's user state and code are reused
        s = online.scores_from_queries(*online.served_terms(state, codes, edit.prototype, bank, hist))
        s[0, hist[0]] = float("-inf")
        torch.topk(s, 10)

    latency = {
        "device_onnxruntime_ms": _median_ms(lambda: session.run(["top_indices", "top_scores"], feeds), repeats),
        "server_in_process_encode_ms": _median_ms(server_full, repeats),
        "server_in_process_stored_state_ms": _median_ms(server_stored, repeats),
    }
    return {"bytes": sizes, "low_rank_relative_error": rel_err, "onnx_bytes": len(graph), "latency": latency}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="A bundle trained with --protocol time-shift.")
    parser.add_argument("--json", type=Path, help="Write the results here.")
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--ranks", default="8,16", help="Low-rank forms to measure (comma separated).")
    parser.add_argument("--no-accuracy", action="store_true", help="Bytes and latency only.")
    args = parser.parse_args()
    torch.set_num_threads(1)
    trained = load_trained(args.model)
    online = OnlineModel(trained)
    cfg = trained.model.cfg
    prepared = prepare(trained.spec, max_len=cfg.max_len, window_stride=cfg.stride)
    test = prepared.split.test
    ranks = [int(r) for r in args.ranks.split(",") if r]
    report: dict[str, Any] = {
        "model": str(args.model),
        "version": trained.version,
        "shapes": {"n_items": cfg.n_items, "dim": cfg.dim, "layers": cfg.n_edit_layers, "max_len": cfg.max_len},
        "group_bias_weight": cfg.group_bias_weight,
        **sizes_and_latency(online, test.histories, args.repeats, ranks),
    }
    if not args.no_accuracy:
        variants = {"float32": ("float32", 0), "float16": ("float16", 0)}
        variants.update({f"rank{r}_float16": ("float16", r) for r in ranks})
        start = time.perf_counter()
        result = accuracy(trained.model, test.histories, test.targets, variants)
        ref = ndcg10(result["float32"])
        report["accuracy"] = {
            "examples": len(ref),
            "seconds": time.perf_counter() - start,
            "ndcg@10": {name: float(ndcg10(r).mean()) for name, r in result.items()},
            "target_rank_changed": {name: float((r != result["float32"]).mean()) for name, r in result.items()},
            "ndcg@10_minus_float32": {
                name: paired_ci(ndcg10(r), ref) for name, r in result.items() if name != "float32"
            },
        }
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
