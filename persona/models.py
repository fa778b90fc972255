"""Which model is live: the registry's active version, loaded once and swapped atomically on change.

The consumer and every API replica hold a :class:`ModelProvider`; ``persona models activate V`` flips the
registry and each process picks the new bundle up within ``refresh_s`` — no restart, no dropped request
(a request keeps the model object it started with; the swap is a single reference assignment).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from persona.store import ModelVersionRow, Store, StoreUnavailable
from recsys.bundle import bundle_sha256, verify_bundle
from recsys.errors import BundleError, PersonaError
from recsys.online import OnlineModel

log = logging.getLogger(__name__)


def register_bundle(store: Store, path: Path, *, activate: bool = True) -> ModelVersionRow:
    """Verify a bundle and record it in the registry (idempotent); optionally make it the active version."""
    manifest = verify_bundle(path)
    metrics = {}
    metrics_file = path / "metrics.json"
    if metrics_file.exists():
        import json

        valid = json.loads(metrics_file.read_text()).get("valid", {})
        metrics = {name: {k: v for k, v in m.items() if k in ("ndcg@10", "hr@10")} for name, m in valid.items()}
    with store.transaction() as uow:
        row = uow.register_model(str(manifest["version"]), str(path.resolve()), bundle_sha256(path), metrics)
        if activate:
            row = uow.activate(row.version)
    return row


class ModelProvider:
    """Keeps the active model loaded; thread-safe; background refresh optional.

    With ``model_dir`` the bundle there is registered (and activated when no version is active yet), so a
    fresh deployment works with just ``PERSONA_MODEL_DIR``; afterwards the registry decides.
    """

    def __init__(self, store: Store, *, model_dir: Path | None = None, refresh_s: float = 5.0) -> None:
        self.store = store
        self.model_dir = model_dir
        self.refresh_s = refresh_s
        self.reloads = 0
        self._model: OnlineModel | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if model_dir is not None:
            active = store.active_model()
            row = register_bundle(store, model_dir, activate=False)
            if active is None:
                with store.transaction() as uow:
                    uow.activate(row.version)
        self.refresh()

    @property
    def version(self) -> str | None:
        model = self._model
        return model.version if model is not None else None

    def get(self) -> OnlineModel:
        """The live model; a clear error when none is registered yet."""
        model = self._model
        if model is None:
            raise PersonaError(
                "no active model",
                "train one with `persona train --out DIR`, then set PERSONA_MODEL_DIR=DIR or run "
                "`persona models register DIR` and `persona models activate VERSION`",
            )
        return model

    def refresh(self) -> bool:
        """Re-read the registry; load and swap in the active version if it changed. True when swapped."""
        with self._lock:
            row = self.store.active_model()
            if row is None or (self._model is not None and self._model.version == row.version):
                return False
            try:
                model = OnlineModel.load(Path(row.path))
            except BundleError as exc:
                if self._model is None:
                    raise
                log.error("active model %s cannot be loaded, keeping %s: %s", row.version, self._model.version, exc)
                return False
            if model.version != row.version:
                raise BundleError(
                    f"registry says version {row.version} lives at {row.path}, but that bundle is {model.version}",
                    "re-register the bundle with `persona models register`",
                )
            previous = self._model
            self._model = model
            if previous is not None:
                self.reloads += 1
                log.info("model %s replaced %s", model.version, previous.version)
            else:
                log.info("model %s loaded", model.version)
            return True

    def start(self) -> None:
        """Refresh every ``refresh_s`` seconds in a daemon thread."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="model-refresh", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        down_since: float | None = None
        while not self._stop.wait(self.refresh_s):
            try:
                self.refresh()
            except StoreUnavailable as exc:  # an outage: one line when it starts, one when it ends
                if down_since is None:
                    down_since = time.monotonic()
                    log.warning("model refresh paused, keeping %s: %s", self.version, exc.message)
                continue
            except Exception:  # keep serving the current model whatever the registry does
                log.exception("model refresh failed")
            if down_since is not None:
                log.info("model refresh resumed: the store is back after %.1fs", time.monotonic() - down_since)
                down_since = None

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
