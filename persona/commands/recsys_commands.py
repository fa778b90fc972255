"""``persona train`` and ``persona evaluate``: the offline half of the product."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from recsys.errors import PersonaError

log = logging.getLogger("persona.offline")

DatasetOpt = Annotated[
    str,
    typer.Option(
        "--dataset",
        "-d",
        help="ml-100k (bundled), synthetic[:key=value,...], or a path: u.data, ratings.dat, ratings.csv, "
        "a RecBole .inter file, or any CSV/TSV/Parquet of interactions.",
    ),
]
UserCol = Annotated[str | None, typer.Option(help="User column of a CSV/Parquet file.")]
ItemCol = Annotated[str | None, typer.Option(help="Item column of a CSV/Parquet file.")]
TimeCol = Annotated[
    str | None,
    typer.Option(help="Time column: datetimes, epoch seconds or any sortable number (e.g. an order)."),
]


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("evaluate")(evaluate)


def train(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory of the model bundle to write.")],
    dataset: DatasetOpt = "ml-100k",
    user_col: UserCol = None,
    item_col: ItemCol = None,
    time_col: TimeCol = None,
    protocol: Annotated[str, typer.Option(help="Split: time-shift (primary) or leave-one-out.")] = "time-shift",
    min_user: Annotated[int, typer.Option(min=1, help="k-core: keep users with at least this many events.")] = 5,
    min_item: Annotated[int, typer.Option(min=1, help="k-core: keep items with at least this many events.")] = 5,
    encoder: Annotated[str, typer.Option(help="Sequence encoder of the device model: sasrec or gru4rec.")] = "sasrec",
    dim: Annotated[int, typer.Option(min=8, help="Embedding width D.")] = 64,
    max_len: Annotated[int, typer.Option(min=2, help="History length T the device model reads.")] = 50,
    edit_layers: Annotated[int, typer.Option(min=1, max=4, help="Editable head layers L.")] = 2,
    code_dim: Annotated[int, typer.Option(min=4, help="Edit code width d.")] = 32,
    edit_rank: Annotated[int, typer.Option(min=0, help="0 = full D×D edits; r > 0 = rank-r edits.")] = 0,
    tau: Annotated[float, typer.Option(min=0.0, help="Clip of generated edit entries.")] = 0.5,
    epochs: Annotated[int, typer.Option(min=0, help="Max epochs of the base model.")] = 30,
    adapter_epochs: Annotated[int, typer.Option(min=0, help="Max epochs of the adapter.")] = 20,
    proto_rounds: Annotated[int, typer.Option(min=0, help="Alternating prototype rounds.")] = 1,
    k: Annotated[
        str,
        typer.Option("--prototypes", help="Candidate prototype counts K, comma separated (chosen on validation)."),
    ] = "4,8,16,32",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing bundle at --out.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Train the base model, the cloud adapter and the prototypes; write a model bundle."""
    from recsys.pipeline import DatasetSpec, train_bundle
    from recsys.train import TrainConfig

    if encoder not in ("sasrec", "gru4rec"):
        raise PersonaError(f"unknown encoder {encoder!r}", "use --encoder sasrec or --encoder gru4rec")
    try:
        ks = tuple(int(x) for x in k.split(",") if x.strip())
    except ValueError:
        raise PersonaError(f"--prototypes {k!r} is not a list of integers", "e.g. --prototypes 4,8,16") from None
    if not ks or min(ks) < 1:
        raise PersonaError("--prototypes needs at least one positive count", "e.g. --prototypes 8")
    spec = DatasetSpec(dataset, user_col, item_col, time_col, min_user, min_item, protocol)
    tc = TrainConfig(
        epochs=epochs, adapter_epochs=adapter_epochs, proto_rounds=proto_rounds, k_candidates=ks, seed=seed
    )
    overrides = {
        "encoder": encoder,
        "dim": dim,
        "max_len": max_len,
        "n_edit_layers": edit_layers,
        "code_dim": code_dim,
        "edit_rank": edit_rank,
        "tau": tau,
        "residual_tau": tau / 2,
    }
    start = time.perf_counter()
    bundle, result = train_bundle(spec, out, model_overrides=overrides, tc=tc, overwrite=overwrite, progress=progress)
    typer.echo(f"bundle {bundle.path} version {bundle.version} ({time.perf_counter() - start:.0f} s)")
    typer.echo(f"prototypes: K={result.chosen_k} (validation NDCG@10 by K: {result.k_scores})")
    _print_table("validation (full ranking)", result.valid_metrics)


def evaluate(
    model: Annotated[Path, typer.Option("--model", "-m", help="Model bundle directory.")],
    protocol: Annotated[
        str | None,
        typer.Option(help="time-shift or leave-one-out; must match the bundle (default: the bundle's)."),
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results here as JSON.")] = None,
    methods: Annotated[
        str,
        typer.Option(
            help="Comma-separated subset of: popularity, base, persona, persona-no-prototypes, "
            "persona-static-prototypes, finetune."
        ),
    ] = "all",
    sampled: Annotated[
        int | None,
        typer.Option(min=1, help="Rank against this many sampled negatives (e.g. 99) instead of all items."),
    ] = None,
    report_dir: Annotated[
        Path | None,
        typer.Option(
            "--report",
            help="Write DIR/index.html with one PNG plot per metric, methods side by side (95 % intervals as "
            "error bars where the results carry them).",
        ),
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Evaluate a bundle's methods on the test period with full-catalogue ranking; print a table."""
    import torch

    from recsys.evaluate import METHOD_NAMES, build_methods, evaluate_method, measure_cost
    from recsys.pipeline import load_trained as load
    from recsys.pipeline import prepare

    names = METHOD_NAMES if methods == "all" else tuple(m.strip() for m in methods.split(",") if m.strip())
    unknown = [m for m in names if m not in METHOD_NAMES]
    if unknown:
        raise PersonaError(f"unknown method(s) {', '.join(unknown)}", f"choose from {', '.join(METHOD_NAMES)}")
    trained = load(model)
    proto = protocol or trained.spec.protocol
    if proto != trained.spec.protocol:
        raise PersonaError(
            f"bundle {model} was trained for the {trained.spec.protocol} protocol, not {proto}: its training data "
            "overlaps that protocol's test set",
            f"train another bundle with --protocol {proto}",
        )
    prepared = prepare(trained.spec, max_len=trained.model.cfg.max_len, window_stride=trained.model.cfg.stride)
    if prepared.fingerprint != trained.bundle.manifest.get("data_fingerprint"):
        raise PersonaError(
            f"the data of {trained.spec.source} changed since bundle {model} was trained",
            "retrain on the current data",
        )
    split = prepared.split
    torch.manual_seed(0)
    finetune_lr = _choose_finetune_lr(trained, split.valid) if "finetune" in names else 0.1
    results: dict[str, dict[str, float]] = {}
    for method in build_methods(
        trained.model,
        split.item_counts,
        no_prototype_model=trained.no_prototype_model,
        finetune_lr=finetune_lr,
        names=names,
    ):
        start = time.perf_counter()
        results[method.name] = evaluate_method(method, split.test, sampled=sampled, progress=progress)
        log.info("%s evaluated in %.1f s", method.name, time.perf_counter() - start)
    timing = measure_cost(trained.model, split.test).as_dict()
    report: dict[str, Any] = {
        "dataset": trained.spec.source,
        "protocol": proto,
        "ranking": f"sampled-{sampled}" if sampled else "full",
        "model_version": trained.version,
        "n_test": len(split.test),
        "finetune_lr": finetune_lr,
        "methods": results,
        "timing": timing,
    }
    _print_table(f"test, {proto}, {report['ranking']} ranking, {len(split.test)} examples", results)
    typer.echo(
        f"edit: {timing['edit_ms_per_session']:.3f} ms/session single, {timing['edit_batch_sessions_per_s']:.0f} "
        f"sessions/s batched; fine-tune: {timing['finetune_ms_per_session']:.2f} ms/session "
        f"({timing['finetune_over_edit']:.0f}x the single edit)"
    )
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=2) + "\n")
        typer.echo(f"wrote {json_out}")
    if report_dir:
        typer.echo(f"report: {write_evaluation_report(report_dir, report)}")


def write_evaluation_report(out: Path, report: dict[str, Any]) -> Path:
    """``persona evaluate --report``: the results dict (as written by ``--json``) as ``out/index.html`` + PNGs."""
    from persona.report import evaluate_charts, write_report

    keys = ("dataset", "protocol", "ranking", "model_version", "n_test")
    facts = {k.replace("_", " "): str(report[k]) for k in keys if k in report}
    return write_report(out, "Persona offline evaluation", evaluate_charts(report), facts)


def _choose_finetune_lr(trained: Any, valid: Any) -> float:
    """The fine-tuning baseline gets its step size chosen on validation, like every other setting."""
    import numpy as np

    from recsys.evaluate import FinetuneMethod, evaluate_method

    sample = valid.subset(np.arange(max(0, len(valid) - 3000), len(valid)))
    scores = {lr: evaluate_method(FinetuneMethod(trained.model, lr=lr), sample)["ndcg@10"] for lr in (0.01, 0.1, 1.0)}
    best = max(scores, key=lambda lr: scores[lr])
    log.info("fine-tune step size on validation: %s -> %s", scores, best)
    return best


def _print_table(title: str, results: dict[str, dict[str, float]]) -> None:
    from rich.console import Console
    from rich.table import Table

    cols = ("hr@5", "hr@10", "hr@20", "ndcg@10", "ndcg@20", "mrr")
    table = Table(title=title)
    table.add_column("method")
    for c in cols:
        table.add_column(c.upper(), justify="right")
    for name, m in results.items():
        table.add_row(name, *(f"{m.get(c, 0.0):.4f}" for c in cols))
    Console().print(table)
