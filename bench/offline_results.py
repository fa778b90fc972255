"""Train and evaluate on MovieLens-100K for both protocols and several seeds; write docs/results.md.

Run on demand (not in CI), from the repository root:

    .venv/bin/python bench/offline_results.py --seeds 0 1 --out runs/offline

Bundles and per-run JSON land under ``--out``; a run whose JSON exists is reused (delete it to redo).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

METHODS = (
    "popularity",
    "recent-popularity",
    "session-repeat",
    "base",
    "finetune",
    "persona-no-prototypes",
    "persona-static-prototypes",
    "persona",
)
COLS = ("hr@5", "hr@10", "hr@20", "ndcg@10", "ndcg@20", "mrr")


def run(cmd: list[str], log: Path) -> float:
    start = time.perf_counter()
    with log.open("a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        subprocess.run(cmd, check=True, stdout=fh, stderr=subprocess.STDOUT)
    return time.perf_counter() - start


def one(protocol: str, seed: int, out: Path, extra: list[str]) -> dict:
    name = f"{protocol}-s{seed}"
    result = out / f"{name}.json"
    if result.exists():
        return json.loads(result.read_text())
    bundle = out / name
    log = out / f"{name}.log"
    persona = os.path.relpath(Path(sys.executable).parent / "persona")
    train_cmd = [persona, "train", "--out", str(bundle), "--protocol", protocol, "--seed", str(seed), "--overwrite"]
    train_s = run([*train_cmd, "--no-progress", *extra], log)
    eval_cmd = [persona, "evaluate", "--model", str(bundle), "--json", str(out / f"{name}.eval.json")]
    eval_s = run([*eval_cmd, "--no-progress"], log)
    report = json.loads((out / f"{name}.eval.json").read_text())
    report["train_seconds"], report["evaluate_seconds"] = train_s, eval_s
    report["commands"] = [" ".join(train_cmd + extra), " ".join(eval_cmd)]
    report["validation"] = json.loads((bundle / "metrics.json").read_text())
    result.write_text(json.dumps(report, indent=2) + "\n")
    return report


def fmt(values: list[float]) -> str:
    mean = statistics.fmean(values)
    spread = (max(values) - min(values)) / 2 if len(values) > 1 else 0.0
    return f"{mean:.4f} ± {spread:.4f}"


def paired(p: dict) -> str:
    if p["ratio"] is None:
        return "n/a"
    ci = f" [{p['ci95'][0]:.3f}, {p['ci95'][1]:.3f}]" if p["ci95"] else ""
    return f"{p['ratio']:.3f}{ci}"


def table(reports: list[dict]) -> list[str]:
    lines = ["| method | " + " | ".join(c.upper() for c in COLS) + " |", "|---" * (len(COLS) + 1) + "|"]
    for m in METHODS:
        cells = [fmt([r["methods"][m][c] for r in reports]) for c in COLS]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    base = [r["methods"]["base"]["ndcg@10"] for r in reports]
    lines.append("")
    for m in ("persona", "persona-no-prototypes", "persona-static-prototypes", "finetune"):
        ratios = [r["methods"][m]["ndcg@10"] / b for r, b in zip(reports, base, strict=True)]
        lines.append(f"- {m} NDCG@10 / base: {fmt(ratios)}")
    for label in reports[0].get("paired", {}):
        per_seed = [paired(r["paired"][label]) for r in reports]
        lines.append(f"- {label.replace('_', ' ')}, NDCG@10 ratio [paired 95% CI] per seed: {'; '.join(per_seed)}")
    t = [r["timing"] for r in reports]
    lines.append(
        f"- cost per session (the edit against per-session fine-tuning, same sessions, one run): one at a time "
        f"{fmt([x['edit_ms_per_session'] for x in t])} ms against {fmt([x['finetune_ms_per_session'] for x in t])} "
        f"ms ({fmt([x['finetune_over_edit_single'] for x in t])} × cheaper); batched "
        f"{statistics.fmean(x['edit_batch_sessions_per_s'] for x in t):.0f} against "
        f"{statistics.fmean(x['finetune_batch_sessions_per_s'] for x in t):.0f} sessions/s "
        f"({fmt([x['finetune_over_edit_batch'] for x in t])} × cheaper)"
    )
    settings = [r.get("settings") or {} for r in reports]
    finetune = [f"{x['finetune']['optimizer']} {x['finetune']['lr']:g}" for x in settings if x.get("finetune")]
    windows = [x["recent_popularity"]["window"] for x in settings if x.get("recent_popularity")]
    lines.append(f"- chosen on validation per seed: fine-tuning {finetune}, recent-popularity window {windows}")
    walls = [round(r["train_seconds"] + r["evaluate_seconds"]) for r in reports]
    lines.append(
        f"- chosen K per seed: {[r['validation']['chosen_k'] for r in reports]}; "
        f"wall time per seed (train + evaluate): {walls} s"
    )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--protocols", nargs="+", default=["time-shift", "leave-one-out"])
    ap.add_argument("--out", type=Path, default=Path("runs/offline"))
    ap.add_argument("--doc", type=Path, default=Path("docs/results.md"))
    ap.add_argument("extra", nargs="*", help="extra `persona train` options, after --")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sections: list[str] = []
    for protocol in args.protocols:
        reports = [one(protocol, s, args.out, args.extra) for s in args.seeds]
        sections += [f"### {protocol} (full-catalogue ranking, {reports[0]['n_test']} test examples)", ""]
        sections += [*table(reports), ""]
        sections += ["Commands (per seed):", "", "```", *reports[0]["commands"], "```", ""]
    cpu = platform.processor() or platform.machine()
    header = [
        "# Offline results on MovieLens-100K",
        "",
        f"Produced by `bench/offline_results.py --seeds {' '.join(map(str, args.seeds))}` on {os.cpu_count()} CPU "
        f"cores ({cpu}, {platform.system()}), torch CPU; mean ± half-range over seeds. Settings were chosen on "
        "validation data only (the last 10% of the training period); the test period was used once.",
        "",
    ]
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    marker = "<!-- generated above, notes below -->"
    notes = args.doc.read_text().split(marker, 1)[1] if args.doc.exists() and marker in args.doc.read_text() else ""
    args.doc.write_text("\n".join(header + sections) + "\n" + marker + notes)
    print(f"wrote {args.doc}")


if __name__ == "__main__":
    main()
