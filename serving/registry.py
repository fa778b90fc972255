"""Model registry operations behind the admin routes: list, activate and reload without restart.

Activation writes the registry (the same transaction ``persona models activate`` runs), then refreshes this
replica at once; other replicas follow within their ``refresh_s``.
"""

from __future__ import annotations

from persona.models import ModelProvider
from persona.store import ModelVersionRow, Store
from serving.problems import NotFound


def list_models(store: Store) -> list[ModelVersionRow]:
    return store.list_models()


def activate(store: Store, models: ModelProvider, version: str) -> bool:
    """Make ``version`` active in the registry and swap it in here; True when this replica swapped."""
    if version not in {row.version for row in store.list_models()}:
        raise NotFound(f"unknown model version {version!r}", "register it with `persona models register`")
    with store.transaction() as uow:
        uow.activate(version)
    return models.refresh()


def reload(models: ModelProvider) -> bool:
    """Re-read the registry now instead of waiting for the background refresh."""
    return models.refresh()
