"""``persona train`` and ``persona evaluate``: the offline half of the product."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from recsys.errors import PersonaError

if TYPE_CHECKING:  # the CLI imports recsys.train lazily (torch)
    from recsys.train import FineGroups, HistoryGroups

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
    app.command("export")(export)


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
    repeat_size: Annotated[
        int,
        typer.Option(
            min=0,
            help="Repeat part: the device model reads the session's whole history as this many (item, count, age) "
            "entries and mixes repeating them with exploring; kept only if it wins on validation. 0 = none.",
        ),
    ] = 64,
    repeat_form: Annotated[
        str,
        typer.Option(
            help="The repeat part's form: mixture (a probability-space mixture starting from the decayed counts), "
            "mixture-attention (plus an attention term) or additive (the first form).",
        ),
    ] = "mixture-attention",  # recsys.repeats.DEFAULT_FORM (not imported here: the CLI imports recsys lazily)
    epochs: Annotated[int, typer.Option(min=0, help="Max epochs of the base model.")] = 100,
    adapter_epochs: Annotated[int, typer.Option(min=0, help="Max epochs of the adapter.")] = 20,
    proto_rounds: Annotated[int, typer.Option(min=0, help="Alternating prototype rounds.")] = 1,
    patience: Annotated[
        int,
        typer.Option(
            help="Stop the adapter's, the prototypes' and the repeat part's training after this many epochs "
            "without a better validation NDCG@10.",
        ),
    ] = 5,
    base_patience: Annotated[
        int,
        typer.Option(
            help="Stop the base model's training after this many epochs without a better validation NDCG@10. "
            "Long, because its curve can fall and stay flat for 20 epochs before it climbs again "
            "(leave-one-out on MovieLens-100K, docs/results.md); the best epoch's weights are kept.",
        ),
    ] = 50,
    k: Annotated[
        str,
        typer.Option("--prototypes", help="Candidate prototype counts K, comma separated (chosen on validation)."),
    ] = "4,8,16,32,64",
    fine_groups: Annotated[
        str,
        typer.Option(
            "--fine-groups",
            help="Candidate counts K2 of fine groups, comma separated: finer groups of sessions whose next items add "
            "to their scores (chosen on validation with their weights; kept only if they win). 0 = none.",
        ),
    ] = "64,128,256,512,1024,2048",
    history_groups: Annotated[
        str,
        typer.Option(
            "--history-groups",
            help="Candidate counts G of history groups, comma separated: groups of sessions by their whole history "
            "window (its items' mean embedding), whose next items add to their scores (chosen on validation with "
            "their weights; kept only if they win; a count above one group per 8 training users is skipped). "
            "0 = none.",
        ),
    ] = "8,16,32,64,128,256,512",  # recsys.train.TrainConfig.history_group_counts
    group_bias: Annotated[
        str,
        typer.Option(
            "--group-bias",
            help="Candidate weights β of the prototypes' group bias (what a session's group chose next, added to "
            "its scores), comma separated, chosen on validation with its smoothing and decay; 0 = none. Where the "
            "whole population's tastes may move at once after training, use --group-bias 0 --fine-groups 0: "
            "validation cannot see such a move, prefers group-level counts, and the moved period pays for them "
            "(docs/results.md).",
        ),
    ] = "0.25,0.5,1,2",  # recsys.train.TrainConfig.group_bias_weights (β = 0 is always a candidate)
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
    fine_ks = _group_counts("--fine-groups", fine_groups)
    history_gs = _group_counts("--history-groups", history_groups)
    try:
        betas = tuple(float(x) for x in group_bias.split(",") if x.strip())
    except ValueError:
        raise PersonaError(
            f"--group-bias {group_bias!r} is not a list of numbers", "e.g. --group-bias 0.5,1, or 0 for none"
        ) from None
    if not betas or min(betas) < 0 or not all(math.isfinite(b) for b in betas):
        raise PersonaError(
            f"--group-bias {group_bias!r} needs weights of 0 or more", "e.g. --group-bias 0.5,1, or 0 for none"
        )
    for flag, value in (("--patience", patience), ("--base-patience", base_patience)):
        if value < 1:
            raise PersonaError(f"{flag} {value} stops before any epoch is compared", f"use {flag} 1 or more")
    from recsys.repeats import FORMS

    if repeat_form not in FORMS:
        raise PersonaError(f"unknown --repeat-form {repeat_form!r}", f"use one of {', '.join(FORMS)}")
    spec = DatasetSpec(dataset, user_col, item_col, time_col, min_user, min_item, protocol)
    tc = TrainConfig(
        epochs=epochs,
        adapter_epochs=adapter_epochs,
        proto_rounds=proto_rounds,
        k_candidates=ks,
        fine_group_counts=fine_ks,
        history_group_counts=history_gs,
        group_bias_weights=tuple(sorted({0.0, *betas})),
        seed=seed,
        patience=patience,
        base_patience=base_patience,
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
        "repeat_size": repeat_size,
        "repeat_form": repeat_form,
    }
    start = time.perf_counter()
    bundle, result = train_bundle(spec, out, model_overrides=overrides, tc=tc, overwrite=overwrite, progress=progress)
    typer.echo(f"bundle {bundle.path} version {bundle.version} ({time.perf_counter() - start:.0f} s)")
    typer.echo(f"prototypes: K={result.chosen_k} (validation NDCG@10 by K: {result.k_scores})")
    typer.echo(_group_choice("fine groups", result.fine_groups, tried=bool(tc.fine_group_counts)))
    typer.echo(_group_choice("history groups", result.history_groups, tried=bool(tc.history_group_counts)))
    _print_table("validation (full ranking)", result.valid_metrics)


def _group_choice(name: str, chosen: FineGroups | HistoryGroups | None, *, tried: bool) -> str:
    """One line on a partition of sessions chosen on validation: its settings and validation NDCG@10 against the model
    without it, or why it has none."""
    if chosen is None:
        return f"{name}: none ({'none beat the model without them on validation' if tried else 'none tried'})"
    return f"{name}: {chosen.settings()} (validation NDCG@10 {chosen.score:.4f} against {chosen.baseline:.4f} without)"


def _group_counts(flag: str, text: str) -> tuple[int, ...]:
    """A ``--fine-groups``/``--history-groups`` list of candidate counts (0 left out: none is always a candidate)."""
    try:
        counts = tuple(n for n in (int(x) for x in text.split(",") if x.strip()) if n != 0)
    except ValueError:
        raise PersonaError(f"{flag} {text!r} is not a list of integers", f"e.g. {flag} 64,128") from None
    if counts and min(counts) < 2:
        raise PersonaError(f"{flag} {text!r} has a count below 2", f"e.g. {flag} 64,128, or 0 for none")
    return counts


def export(
    model: Annotated[Path, typer.Option("--model", "-m", help="Model bundle directory.")],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="The device model file to write (its manifest goes beside).")
    ],
    format: Annotated[str, typer.Option("--format", "-f", help="Device model format: onnx.")] = "onnx",
    k: Annotated[int, typer.Option(min=1, help="k of the graph's top-k outputs.")] = 10,
) -> None:
    """Write a bundle's device model for phones and browsers: the ONNX graph and, beside it (same name, .json), the
    vocabulary and shapes a device needs (docs/device.md). ``persona train`` puts the same into the bundle."""
    from recsys.export import device_manifest as manifest_of
    from recsys.export import export_onnx, write_device_files
    from recsys.pipeline import load_trained as load

    if format != "onnx":
        raise PersonaError(f"unknown device model format {format!r}", "use --format onnx")
    if out.is_dir():
        raise PersonaError(f"{out} is a directory", "give the file to write, e.g. --out device.onnx")
    trained = load(model)
    graph = export_onnx(trained.model, trained.vocab, trained.version, k=k)
    onnx_path, meta_path = write_device_files(out, graph, manifest_of(trained.model, trained.vocab, trained.version, k))
    typer.echo(f"wrote {onnx_path} ({len(graph):,} bytes, model {trained.version}) and {meta_path}")


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
            help="Comma-separated subset of: popularity, recent-popularity, session-repeat, base, base-no-repeat, "
            "persona, "
            "persona-no-prototypes, persona-static-prototypes, finetune."
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

    from recsys.baselines import choose_finetune, choose_recent_window, stream_before
    from recsys.bootstrap import RESAMPLES, paired_comparisons
    from recsys.evaluate import METHOD_NAMES, PAIRED, PersonaMethod, build_methods, evaluate_examples, measure_cost
    from recsys.pipeline import load_trained as load
    from recsys.pipeline import prepare
    from recsys.repeats import REPEAT_SIZE
    from recsys.switch import describe

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
    # every example with its whole-history item counts where a method reads them: the repeat part, session-repeat
    cfg = trained.model.cfg
    counts = cfg.repeat_size or (REPEAT_SIZE if "session-repeat" in names else 0)
    prepared = prepare(trained.spec, max_len=cfg.max_len, window_stride=cfg.stride, repeat_size=counts)
    if prepared.fingerprint != trained.bundle.manifest.get("data_fingerprint"):
        raise PersonaError(
            f"the data of {trained.spec.source} changed since bundle {model} was trained",
            "retrain on the current data",
        )
    split = prepared.split
    torch.manual_seed(0)
    # Every baseline's own setting is chosen on validation, like Persona's (never on the test period).
    finetune = choose_finetune(trained.model, split.valid) if "finetune" in names else None
    window = (
        choose_recent_window(split.item_counts, stream_before(split.train), split.valid)
        if "recent-popularity" in names
        else None
    )
    results: dict[str, dict[str, float]] = {}
    per_example = {}
    for method in build_methods(
        trained.model,
        split.item_counts,
        no_prototype_model=trained.no_prototype_model,
        finetune=finetune,
        recent_prior=stream_before(split.train, split.valid),
        recent_window=window.window if window else 1000,
        names=names,
    ):
        start = time.perf_counter()
        evaluation = evaluate_examples(method, split.test, sampled=sampled, progress=progress)
        results[method.name], per_example[method.name] = evaluation.metrics, evaluation.ndcg10
        log.info("%s evaluated in %.1f s", method.name, time.perf_counter() - start)
        if isinstance(method, PersonaMethod) and method.refine and method.mode == "prototype":
            switches = describe(method.model.bank.switches)
            log.info("%s's switches at the end of the test period: %s", method.name, switches)
    paired = paired_comparisons(per_example, PAIRED)
    timing = measure_cost(trained.model, split.test, finetune=finetune).as_dict()
    report: dict[str, Any] = {
        "dataset": trained.spec.source,
        "protocol": proto,
        "ranking": f"sampled-{sampled}" if sampled else "full",
        "model_version": trained.version,
        "n_test": len(split.test),
        "settings": {
            "finetune": finetune.as_dict() if finetune else None,
            "recent_popularity": window.as_dict() if window else None,
        },
        "methods": results,
        "paired": {label: r.as_dict() for label, r in paired.items()},
        "paired_method": f"NDCG@10 ratio of means, paired bootstrap over test examples, {RESAMPLES} resamples",
        "timing": timing,
    }
    _print_table(f"test, {proto}, {report['ranking']} ranking, {len(split.test)} examples", results)
    if paired:
        _print_paired(paired, PAIRED, RESAMPLES)
    if finetune:
        typer.echo(f"fine-tune setting (chosen on validation): {finetune.optimizer}, step size {finetune.lr:g}")
    if window:
        typer.echo(f"recent-popularity window (chosen on validation): {window.window} interactions")
    typer.echo(
        f"cost per session: edit {timing['edit_ms_per_session']:.3f} ms single, "
        f"{timing['edit_batch_sessions_per_s']:.0f} sessions/s batched; fine-tune "
        f"{timing['finetune_ms_per_session']:.2f} ms single, {timing['finetune_batch_sessions_per_s']:.0f} sessions/s "
        f"batched ({timing['batch_sessions']} sessions); an edit is {timing['finetune_over_edit_single']:.0f}x "
        f"cheaper single, {timing['finetune_over_edit_batch']:.0f}x batched"
    )
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=2) + "\n")
        typer.echo(f"wrote {json_out}")
    if report_dir:
        typer.echo(f"report: {write_evaluation_report(report_dir, report)}")


def write_evaluation_report(out: Path, report: dict[str, Any]) -> Path:
    """``persona evaluate --report``: the results dict (as written by ``--json``) as ``out/index.html`` + PNGs."""
    from persona_cli.report import evaluate_charts, write_report

    keys = ("dataset", "protocol", "ranking", "model_version", "n_test")
    facts = {k.replace("_", " "): str(report[k]) for k in keys if k in report}
    return write_report(out, "Persona offline evaluation", evaluate_charts(report), facts)


def _print_paired(paired: dict[str, Any], pairs: dict[str, tuple[str, str]], resamples: int) -> None:
    from rich.table import Table

    from persona_cli.commands import output

    table = Table(title=f"NDCG@10 ratio, paired 95% CI ({resamples} bootstrap resamples of the test examples)")
    for col in ("comparison", "ratio", "95% CI"):
        table.add_column(col, justify="left" if col == "comparison" else "right", overflow="fold")
    for label, r in paired.items():
        a, b = pairs[label]
        ratio = "n/a" if r.ratio is None else f"{r.ratio:.3f}"
        ci = "n/a" if r.ci95 is None else f"{r.ci95[0]:.3f} – {r.ci95[1]:.3f}"
        table.add_row(f"{a} / {b}", ratio, ci)
    output.console().print(table)


def _print_table(title: str, results: dict[str, dict[str, float]]) -> None:
    from rich.table import Table

    from persona_cli.commands import output

    cols = ("hr@5", "hr@10", "hr@20", "ndcg@10", "ndcg@20", "mrr")
    table = Table(title=title)
    table.add_column("method", overflow="fold")
    for c in cols:
        table.add_column(c.upper(), justify="right")
    for name, m in results.items():
        table.add_row(name, *(f"{m.get(c, 0.0):.4f}" for c in cols))
    output.console().print(table)
