"""The store: session state, the event log, prototype banks and the model registry (SQLAlchemy).

``Store.open(url)`` connects and migrates; ``store.transaction()`` yields a :class:`UnitOfWork` whose
operations all commit or roll back together.
"""

from persona.store.engine import current_revision, ensure_schema, head_revision, make_engine, upgrade
from persona.store.repository import (
    ModelVersionRow,
    NewEvent,
    PrototypeRow,
    SessionState,
    Store,
    StoredEvent,
    StoreUnavailable,
    UnitOfWork,
)

__all__ = [
    "ModelVersionRow",
    "NewEvent",
    "PrototypeRow",
    "SessionState",
    "Store",
    "StoreUnavailable",
    "StoredEvent",
    "UnitOfWork",
    "current_revision",
    "ensure_schema",
    "head_revision",
    "make_engine",
    "upgrade",
]
