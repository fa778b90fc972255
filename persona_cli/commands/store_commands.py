"""``persona db ...`` (schema migrations) and ``persona models ...`` (the model registry)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

db_app = typer.Typer(help="The store's schema: migrate it and show its revision.", no_args_is_help=True)
models_app = typer.Typer(help="The model registry: list, register and activate bundles.", no_args_is_help=True)


def _url() -> str:
    # Fresh settings on every command: PERSONA_* may differ between invocations in one process (tests).
    from persona.settings import load_settings

    return load_settings().resolved_database_url


@db_app.command("upgrade")
def db_upgrade(
    revision: Annotated[str, typer.Argument(help="Target revision (default: the newest).")] = "head",
) -> None:
    """Migrate the store (PERSONA_DATABASE_URL) to a revision; safe to run from several processes at once."""
    from persona.store import current_revision, make_engine, upgrade
    from persona.store.engine import mask_url
    from persona_cli.commands import output

    engine = make_engine(_url())
    try:
        upgrade(engine, revision)
        output.console().print(f"store {mask_url(engine.url)} is at revision [bold]{current_revision(engine)}[/]")
    finally:
        engine.dispose()


@db_app.command("current")
def db_current(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (for scripts) instead of a table.")] = False,
) -> None:
    """Show the store's revision and the newest one the code knows."""
    from persona.store import current_revision, head_revision, make_engine
    from persona.store.engine import mask_url
    from persona_cli.commands import output

    engine = make_engine(_url())
    try:
        current, head = current_revision(engine), head_revision()
    finally:
        engine.dispose()
    if as_json:
        output.print_json(
            {"database": mask_url(engine.url), "current": current, "head": head, "up_to_date": current == head}
        )
        return
    table = output.table("database", "current", "head", "status")
    status = "up to date" if current == head else "needs `persona db upgrade`"
    table.add_row(mask_url(engine.url), current or "(empty)", head or "-", status)
    output.console().print(table)


@models_app.command("list")
def models_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (for scripts) instead of a table.")] = False,
) -> None:
    """List registered model versions, oldest first (the active one is marked); nothing is shortened."""
    from persona.store import Store
    from persona_cli.commands import output

    store = Store.open(_url())
    try:
        rows = store.list_models()
    finally:
        store.close()
    if as_json:
        output.print_json(
            [
                {
                    "version": r.version,
                    "active": r.active,
                    "sha256": r.sha256,
                    "created_at": r.created_at,
                    "path": r.path,
                }
                for r in rows
            ]
        )
        return
    if not rows:
        output.console().print("no model versions registered (use `persona models register`)")
        return
    table = output.table("active", "version", "sha256", "created", "path", title="model versions")
    for row in rows:
        created = row.created_at.strftime("%Y-%m-%d %H:%M:%SZ")
        table.add_row("*" if row.active else "", row.version, row.sha256, created, row.path)
    output.console().print(table)


@models_app.command("register")
def models_register(
    path: Annotated[Path, typer.Argument(help="The model bundle directory written by `persona train`.")],
    activate: Annotated[bool, typer.Option("--activate", help="Also make it the active version.")] = False,
) -> None:
    """Verify a model bundle and record it in the registry (version and sha256 come from the bundle itself).

    Re-registering the same bundle is a no-op; it stays inactive until `persona models activate VERSION`.
    """
    from persona.models import register_bundle
    from persona.store import Store
    from persona_cli.commands import output

    store = Store.open(_url())
    try:
        row = register_bundle(store, path, activate=activate)
    finally:
        store.close()
    state = "active" if row.active else "inactive"
    output.console().print(f"registered model [bold]{row.version}[/] ({state}) at {row.path}")


@models_app.command("activate")
def models_activate(
    version: Annotated[str, typer.Argument(help="A registered version (see `persona models list`).")],
) -> None:
    """Make a version the single active model; API and consumers pick it up without restart."""
    from persona.store import Store
    from persona_cli.commands import output

    store = Store.open(_url())
    try:
        with store.transaction() as uow:
            row = uow.activate(version)
    finally:
        store.close()
    output.console().print(f"active model is now [bold]{row.version}[/]")


def register(app: typer.Typer) -> None:
    """Attach ``persona db`` and ``persona models``."""
    app.add_typer(db_app, name="db")
    app.add_typer(models_app, name="models")
