"""``persona train`` and ``persona evaluate``."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Attach the offline commands (filled in with the model library)."""
