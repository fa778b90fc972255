"""Write a bundle again without its history groups: the same weights, prototypes, fine groups and switches.

What the history groups themselves add, in accuracy and in cost, measured on one bundle: the stripped copy is
what serving the same model without them gives (a bundle written before them loads the same way), so
``bench/compare_bundles.py STRIPPED BUNDLE`` pairs their test gain and ``bench/rank_inproc.py`` on both their
CPU per ranking, at equal switches. A research script, not a test::

    PYTHONPATH=. .venv/bin/python bench/strip_history_groups.py runs/csv/mls-s0 runs/csv/mls-s0-nohist
"""

from __future__ import annotations

import argparse
from pathlib import Path

from recsys.bundle import ARTIFACT_SUFFIXES, load_bundle, read_artifact, save_bundle

HISTORY_CONFIG = ("history_groups", "history_bias_weight", "history_bias_smoothing", "history_bias_decay")
HISTORY_TENSORS = ("bank.history_centres", "bank.history_items")


def strip_history_groups(bundle_dir: Path, out: Path) -> int:
    """Write ``bundle_dir`` again at ``out`` (replaced) without its history groups; returns how many it had."""
    bundle = load_bundle(bundle_dir)
    config = bundle.documents["config"]
    groups = int(config["model"].get("history_groups", 0))
    if not groups:
        raise SystemExit(f"{bundle_dir} has no history groups: nothing to strip")
    for key in HISTORY_CONFIG:
        config["model"].pop(key, None)
    model = {k: v for k, v in bundle.tensors["model"].items() if k not in HISTORY_TENSORS}
    names = [p.name for p in bundle_dir.iterdir() if p.suffix in ARTIFACT_SUFFIXES]  # the device graph: unchanged
    artifacts = {name: data for name in names if (data := read_artifact(bundle_dir, name)) is not None}
    save_bundle(
        out,
        tensors={**bundle.tensors, "model": model},
        documents={**bundle.documents, "config": config},
        data_fingerprint=bundle.manifest["data_fingerprint"],
        overwrite=True,
        artifacts=artifacts,
    )
    return groups


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path, help="A bundle with history groups.")
    ap.add_argument("out", type=Path, help="Where to write the copy without them (replaced if it exists).")
    args = ap.parse_args()
    groups = strip_history_groups(args.bundle, args.out)
    print(f"{args.out}: {args.bundle} without its {groups} history groups")


if __name__ == "__main__":
    main()
