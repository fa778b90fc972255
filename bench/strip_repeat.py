"""Copy a bundle without its repeat part: the baseline of the repeat part's serving-cost benchmark.

Run on demand (docs/performance.md, "Repeat part: serving cost"); it is not a test:

    .venv/bin/python bench/strip_repeat.py runs/bench/rep runs/bench/rep-without

The copy has ``repeat_size`` 0 and no ``device_model.repeat.*`` tensors; every other weight is the same, so the
two bundles serve the same base model and a release from before the part loads the copy as it is. A bundle trained
with ``--fine-groups 0`` also loses its empty fine-group tensors and settings, which releases from before them do
not know (with fine groups the copy keeps them: strip a bundle without them for the previous release). The copy
also loses the bank's online switches (``bank.switches``), which releases from before them do not know; today's code
loads it with every term on, and its ingestion does the same work either way (the online switches' cost benchmark
in docs/performance.md compares two releases on such a copy).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from recsys.bundle import ARTIFACT_SUFFIXES, load_bundle, read_artifact, save_bundle

PREFIX = "device_model.repeat."
FINE_KEYS = ("bank.fine_centres", "bank.fine_items")
SWITCHES = "bank.switches"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", type=Path, help="Bundle with a repeat part.")
    ap.add_argument("out", type=Path, help="Where to write the copy (replaced if it exists).")
    args = ap.parse_args()
    bundle = load_bundle(args.source)
    documents = dict(bundle.documents)
    config = dict(documents["config"])
    model = {k: v for k, v in config["model"].items() if k != "repeat_form"} | {"repeat_size": 0}
    no_fine = not model.get("fine_groups")
    if no_fine:
        model = {k: v for k, v in model.items() if not k.startswith("fine_")}
    config["model"] = model
    documents["config"] = config
    tensors = {
        stem: {
            k: v
            for k, v in state.items()
            if not k.startswith(PREFIX) and not (no_fine and k in FINE_KEYS) and k != SWITCHES
        }
        for stem, state in bundle.tensors.items()
    }
    # the device graph holds the part too; a copy without it serves from the weights alone
    artifacts = {
        name: data
        for name in bundle.manifest["files"]
        if name.endswith(ARTIFACT_SUFFIXES) and name != "device.onnx"
        if (data := read_artifact(args.source, name)) is not None
    }
    save_bundle(
        args.out,
        tensors=tensors,
        documents=documents,
        data_fingerprint=bundle.manifest["data_fingerprint"],
        meta={**bundle.manifest.get("meta", {}), "stripped_from": bundle.manifest["version"]},
        overwrite=True,
        artifacts=artifacts,
    )
    print(f"wrote {args.out} ({sum(k.startswith(PREFIX) for s in bundle.tensors.values() for k in s)} tensors dropped)")


if __name__ == "__main__":
    main()
