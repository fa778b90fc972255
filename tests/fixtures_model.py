"""Model fixtures: one tiny bundle trained on synthetic data per test session (a few seconds).

``tiny_bundle`` is the bundle directory; tests that need the model load it with
``OnlineModel.load(tiny_bundle)`` (the ingestion and serving tests share it).
"""

from __future__ import annotations

from pathlib import Path

import pytest

#: The item ``items_bundle``'s item file has no row for.
MISSING_ITEM = "i0"


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a tiny trained bundle (synthetic: 200 users, 100 items, 6000 events; dim 16, 4 prototypes)."""
    from streaming.bench import train_tiny_bundle

    return train_tiny_bundle(tmp_path_factory.mktemp("tiny-model") / "bundle")


@pytest.fixture(scope="session")
def sliding_window_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny bundle's recipe with ``window_stride=0``: the sliding window of bundles trained before windows had a
    stride (positions counted back from the most recent item; no encoder cache)."""
    from recsys.pipeline import DatasetSpec, train_bundle
    from recsys.train import TrainConfig
    from streaming.bench import TINY_SOURCE

    out = tmp_path_factory.mktemp("sliding-model") / "bundle"
    train_bundle(
        DatasetSpec(source=TINY_SOURCE, min_user=2, min_item=2),
        out,
        model_overrides={"dim": 16, "code_dim": 8, "max_len": 20, "window_stride": 0},
        tc=TrainConfig(epochs=1, adapter_epochs=1, proto_rounds=1, proto_epochs=1, k_candidates=(4,)),
        progress=False,
    )
    return out


@pytest.fixture(scope="session")
def items_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny bundle's recipe trained from a RecBole ``.inter`` file with an ``.item`` file beside it (titles, year,
    genres, MovieLens' column names), so the bundle carries item metadata. The item file leaves out the
    smallest item id (``MISSING_ITEM``): an item without a row has null attributes."""
    from recsys.data import load_interactions
    from recsys.pipeline import DatasetSpec, train_bundle
    from recsys.train import TrainConfig
    from streaming.bench import TINY_SOURCE

    root = tmp_path_factory.mktemp("items-model")
    df = load_interactions(TINY_SOURCE)
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    lines += [f"{u}\t{i}\t{t}" for u, i, t in df.iter_rows()]
    (root / "tiny.inter").write_text("\n".join(lines) + "\n")
    items = sorted(set(df["item_id"].to_list()))
    rows = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"]
    assert items[0] == MISSING_ITEM
    rows += [f"{item}\tFilm {item}\t{1900 + n}\tDrama Sci-Fi" for n, item in enumerate(items) if n]
    (root / "tiny.item").write_text("\n".join(rows) + "\n")
    out = root / "bundle"
    train_bundle(
        DatasetSpec(source=str(root / "tiny.inter"), min_user=2, min_item=2),
        out,
        model_overrides={"dim": 16, "code_dim": 8, "max_len": 20},
        tc=TrainConfig(epochs=1, adapter_epochs=1, proto_rounds=1, proto_epochs=1, k_candidates=(4,)),
        progress=False,
    )
    return out
