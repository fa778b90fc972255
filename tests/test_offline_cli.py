"""`persona train` → `persona evaluate` end to end on synthetic data, and the CLI's answers to bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from persona_cli.main import main
from recsys.pipeline import load_trained

TINY = "synthetic:users=150,items=80,events=5000,clusters=6"
TINY_ARGS = [
    "--dataset", TINY, "--min-user", "2", "--min-item", "2", "--dim", "16", "--code-dim", "8", "--max-len", "15",
    "--epochs", "2", "--adapter-epochs", "1", "--proto-rounds", "1", "--prototypes", "2,4", "--patience", "3",
    "--base-patience", "4", "--no-progress",
]  # fmt: skip


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("offline") / "bundle"
    assert main(["train", "--out", str(out), *TINY_ARGS]) == 0
    return out


@pytest.mark.slow
def test_train_then_evaluate_writes_every_method_and_timing(
    bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "results.json"
    assert main(["evaluate", "--model", str(bundle), "--json", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["protocol"] == "time-shift"
    assert report["dataset"] == TINY
    # The repeat part is kept only where it wins on validation; with it, its ablation is evaluated too.
    has_repeat = load_trained(bundle).model.device_model.repeat is not None
    expected = {
        "popularity", "recent-popularity", "session-repeat", "base", "persona", "persona-no-prototypes",
        "persona-static-prototypes", "finetune", *(["base-no-repeat"] if has_repeat else []),
    }  # fmt: skip
    assert set(report["methods"]) == expected
    for metrics in report["methods"].values():
        assert set(metrics) >= {"hr@5", "hr@10", "hr@20", "ndcg@10", "ndcg@20", "mrr"}
        assert 0.0 <= metrics["hr@5"] <= metrics["hr@10"] <= metrics["hr@20"] <= 1.0
        assert metrics["ndcg@10"] <= metrics["ndcg@20"]
    timing = report["timing"]
    for key in ("edit_ms_per_session", "finetune_ms_per_session", "edit_batch_sessions_per_s"):
        assert timing[key] > 0
    assert timing["finetune_batch_sessions_per_s"] > 0
    assert timing["finetune_over_edit_batch"] == pytest.approx(
        timing["edit_batch_sessions_per_s"] / timing["finetune_batch_sessions_per_s"]
    )
    # every baseline's setting chosen on validation, with what was tried
    finetune = report["settings"]["finetune"]
    assert {"sgd@0.0001", "adam@0.001"} <= set(finetune["valid_ndcg@10"])
    assert finetune["valid_ndcg@10"][f"{finetune['optimizer']}@{finetune['lr']:g}"] == max(
        finetune["valid_ndcg@10"].values()
    )
    window = report["settings"]["recent_popularity"]
    assert str(window["window"]) in window["valid_ndcg@10"]
    # paired CIs of Persona against each baseline, ratio of the reported means
    assert set(report["paired"]) == {
        "persona_vs_base", "persona_vs_no_prototypes", "persona_vs_finetune", "persona_vs_recent_popularity",
        "persona_vs_session_repeat", *(["persona_vs_base_no_repeat"] if has_repeat else []),
    }  # fmt: skip
    methods = report["methods"]
    for label, other in (("persona_vs_base", "base"), ("persona_vs_no_prototypes", "persona-no-prototypes")):
        paired = report["paired"][label]
        assert paired["ratio"] == pytest.approx(methods["persona"]["ndcg@10"] / methods[other]["ndcg@10"])
        lo, hi = paired["ci95"]
        assert lo <= paired["ratio"] <= hi
    assert "paired 95% CI" in printed and "persona / base" in printed
    assert "recent-popularity window" in printed and "fine-tune setting" in printed


@pytest.mark.slow
def test_evaluate_a_subset_reports_only_the_pairs_it_has(bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "subset.json"
    args = ["evaluate", "--model", str(bundle), "--methods", "base,persona,session-repeat", "--json", str(out)]
    assert main([*args, "--no-progress"]) == 0
    report = json.loads(out.read_text())
    assert set(report["methods"]) == {"base", "persona", "session-repeat"}
    assert set(report["paired"]) == {"persona_vs_base", "persona_vs_session_repeat"}
    assert report["settings"] == {"finetune": None, "recent_popularity": None}


@pytest.mark.slow
def test_evaluate_report_has_one_plot_per_metric(bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    args = ["evaluate", "--model", str(bundle), "--methods", "popularity,base", "--no-progress", "--report", str(out)]
    assert main(args) == 0
    html = (out / "index.html").read_text()
    for metric in ("hr_5", "hr_10", "hr_20", "ndcg_10", "ndcg_20", "mrr"):
        png = out / f"{metric}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f'src="{metric}.png"' in html


@pytest.mark.slow
def test_bundle_records_validation_metrics_and_chosen_k(bundle: Path) -> None:
    metrics = json.loads((bundle / "metrics.json").read_text())
    assert metrics["chosen_k"] in (2, 4)
    assert json.loads((bundle / "config.json").read_text())["model"]["residual_weight"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert set(metrics["k_scores"]) == {"2", "4"}
    train = json.loads((bundle / "config.json").read_text())["train"]
    assert (train["patience"], train["base_patience"]) == (3, 4)  # both patiences reached training
    assert {"base", "persona", "persona-no-prototypes"} <= set(metrics["valid"])
    history = metrics["history_groups"]  # the history groups' choice, or None when none won on validation
    assert history is None or history["valid_ndcg@10"] > history["valid_ndcg@10_without"]


@pytest.mark.slow
def test_evaluate_refuses_a_protocol_the_bundle_was_not_trained_for(
    bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["evaluate", "--model", str(bundle), "--protocol", "leave-one-out", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "time-shift" in err[0]


@pytest.mark.slow
def test_evaluate_refuses_a_tampered_bundle(bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert main(["evaluate", "--model", str(copy), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--dataset", "no-such-dataset"], "no-such-dataset"),
        (["--dataset", "{csv}", "--user-col", "nope"], "nope"),
        (["--dataset", "{empty}"], "empty"),
        (["--dataset", "{badtime}"], "when"),
        (["--dataset", "synthetic:users=3,items=4,events=30", "--min-user", "1", "--min-item", "1"], "item"),
        (["--encoder", "lstm"], "encoder"),
        (["--prototypes", "four"], "prototypes"),
        (["--patience", "0"], "patience"),
        (["--base-patience", "0"], "--base-patience"),
        (["--group-bias", "half"], "--group-bias"),
        (["--group-bias", "0.5,-1"], "--group-bias"),
        (["--group-bias", "nan"], "--group-bias"),
        (["--fine-groups", "many"], "--fine-groups"),
        (["--history-groups", "many"], "--history-groups"),
        (["--history-groups", "1,8"], "--history-groups"),
    ],
)
def test_bad_training_input_is_one_line_and_exit_2(
    args: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv = tmp_path / "events.csv"
    csv.write_text("user,item,when\nu1,i1,1\nu1,i2,2\n")
    empty = tmp_path / "empty.csv"
    empty.write_text("user,item,when\n")
    badtime = tmp_path / "badtime.csv"
    badtime.write_text("user,item,when\nu1,i1,yesterday\nu1,i2,today\n")
    files = {"{csv}": str(csv), "{empty}": str(empty), "{badtime}": str(badtime)}
    args = [files.get(a, a) for a in args]
    code = main(["train", "--out", str(tmp_path / "b"), *args, "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error:") and needle.lower() in err[0].lower()


@pytest.mark.slow
def test_group_bias_zero_trains_a_model_without_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--group-bias 0` leaves β = 0 as the only candidate: the bundle's prototypes add no group bias; and
    `--history-groups 0` tries no history groups, and says so."""
    out = tmp_path / "bundle"
    assert main(["train", "--out", str(out), *TINY_ARGS, "--group-bias", "0", "--history-groups", "0"]) == 0
    assert "history groups: none (none tried)" in capsys.readouterr().out.splitlines()
    trained = load_trained(out)
    assert trained.train_config.group_bias_weights == (0.0,)
    assert trained.model.cfg.group_bias_weight == 0.0
    assert trained.train_config.history_group_counts == () and trained.model.cfg.history_groups == 0
    assert json.loads((out / "metrics.json").read_text())["history_groups"] is None


def test_evaluate_a_missing_bundle_says_how_to_make_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--model", str(tmp_path / "none")]) == 2
    assert "persona train" in capsys.readouterr().err
