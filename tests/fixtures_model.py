"""Model fixtures: one tiny bundle trained on synthetic data per test session (a few seconds).

``tiny_bundle`` is the bundle directory; tests that need the model load it with
``OnlineModel.load(tiny_bundle)`` (the ingestion and serving tests share it).
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a tiny trained bundle (synthetic: 200 users, 100 items, 6000 events; dim 16, 4 prototypes)."""
    from streaming.bench import train_tiny_bundle

    return train_tiny_bundle(tmp_path_factory.mktemp("tiny-model") / "bundle")
