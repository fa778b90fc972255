"""The ``persona`` command: composes the recsys, store, streaming and serving commands.

Heavy imports (torch, kafka, fastapi) happen inside each command so that ``persona --help`` is instant.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from recsys.errors import PersonaError

app = typer.Typer(
    name="persona",
    help="Persona: real-time personalized recommendation by prototype-based parameter editing.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(
    config: Annotated[
        Path | None, typer.Option("--config", help="TOML settings file (same keys as PERSONA_* variables).")
    ] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Debug logging, third-party libraries' included.")
    ] = False,
) -> None:
    """Persona: real-time personalized recommendation by prototype-based parameter editing.

    Settings come from PERSONA_* environment variables and an optional TOML file (--config or PERSONA_CONFIG).
    """
    import os

    if config is not None:
        os.environ["PERSONA_CONFIG"] = str(config)
    from persona import logs

    logs.configure(verbose)


def _register() -> None:
    from persona_cli.commands import recsys_commands

    recsys_commands.register(app)
    for optional in ("store_commands", "streaming_commands", "serving_commands", "demo_commands"):
        try:
            module = __import__(f"persona_cli.commands.{optional}", fromlist=["register"])
        except ModuleNotFoundError as exc:
            if exc.name != f"persona_cli.commands.{optional}":
                raise
            continue
        module.register(app)


_register()


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors become one line on stderr and exit code 2, never a traceback."""
    try:
        app(args=argv, standalone_mode=True)
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    except PersonaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
