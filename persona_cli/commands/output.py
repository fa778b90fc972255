"""How listing commands print: a table for people, ``--json`` for scripts, and identifiers never cut short.

Rich sizes a table to the console, and a console that is not a terminal is 80 columns wide: versions and paths were
truncated with an ellipsis (``20261201T20065…``) when piped. Identifier columns therefore fold on a terminal (the
whole value, over several lines if it must) and off a terminal the table is printed at its natural width.
"""

from __future__ import annotations

import json
import sys
from typing import Any

UNLIMITED_WIDTH = 100_000


def console() -> Any:
    """A console for stdout: the terminal's width on a terminal, unlimited (no wrapping, no ellipsis) otherwise."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=UNLIMITED_WIDTH)


def table(*columns: str, title: str | None = None) -> Any:
    """A rich table whose cells are never truncated: long values fold inside their cell."""
    from rich.table import Table

    t = Table(title=title)
    for name in columns:
        t.add_column(name, overflow="fold")
    return t


def print_json(value: Any) -> None:
    """One JSON document on stdout (dates as ISO 8601), for scripts."""
    print(json.dumps(value, indent=2, default=_iso))


def _iso(value: Any) -> str:
    if hasattr(value, "isoformat"):
        return str(value.isoformat())
    raise TypeError(f"cannot write {type(value).__name__} as JSON")
