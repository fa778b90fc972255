"""``persona demo``: the first thing a new user runs (``make demo``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

log = logging.getLogger("persona.demo")

DEFAULT_BUNDLE = Path("data/bundles/ml-100k")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)


def ensure_bundle(path: Path, *, retrain: bool = False, progress: bool = True) -> Path:
    """Reuse a valid cached bundle; train one on MovieLens-100K otherwise (a few minutes on 2 cores)."""
    from recsys.errors import BundleError
    from recsys.pipeline import DatasetSpec, load_trained, train_bundle

    if path.exists() and not retrain:
        try:
            load_trained(path)
            log.info("reusing the trained bundle at %s (--retrain to train again)", path)
            return path
        except BundleError as exc:
            log.warning("cached bundle unusable (%s); training a new one", exc)
    typer.echo(f"training on MovieLens-100K into {path} (first run only) ...")
    train_bundle(DatasetSpec(), path, overwrite=True, progress=progress)
    return path


def demo(
    bundle: Annotated[Path, typer.Option(help="Where the demo's model bundle is cached.")] = DEFAULT_BUNDLE,
    retrain: Annotated[bool, typer.Option(help="Train a new bundle even if a cached one is valid.")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the summary as JSON.")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Train on MovieLens-100K (or reuse the cached bundle), evaluate every method, print the results."""
    from persona.commands.recsys_commands import evaluate

    ensure_bundle(bundle, retrain=retrain, progress=progress)
    evaluate(model=bundle, protocol=None, json_out=json_out, methods="all", sampled=None, progress=progress)
    if json_out:
        log.info("summary: %s", json.loads(json_out.read_text())["methods"].get("persona"))
