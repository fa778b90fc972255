"""Model fixtures: one tiny bundle trained on synthetic data per test session (a few seconds).

``tiny_bundle`` is the bundle directory; tests that need the model load it with
``OnlineModel.load(tiny_bundle)`` (the ingestion and serving tests share it).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from torch import Tensor

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
        tc=TrainConfig(
            epochs=1, adapter_epochs=1, proto_rounds=1, proto_epochs=1, k_candidates=(4,), fine_group_counts=(8,)
        ),
        progress=False,
    )
    return out


@pytest.fixture(scope="session")
def group_bias_bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny bundle with its prototypes' group bias on (β = 1, α = 1, γ = 0.9) and uneven next-item counts, 6
    fine groups (β2 = 1, τ2 = 0.5) and 5 history groups (β3 = 1, α3 = 0.5), so the online paths are checked with
    every bias whatever the tiny bundle's validation chose."""
    import torch

    from recsys.bundle import load_bundle

    bundle = load_bundle(tiny_bundle)
    config = bundle.documents["config"]
    config["model"].update(group_bias_weight=1.0, group_bias_smoothing=1.0, group_bias_decay=0.9)
    model = dict(bundle.tensors["model"])
    g = torch.Generator().manual_seed(0)
    model["bank.next_items"] = torch.rand(model["bank.next_items"].shape, generator=g).pow(6) * 20.0
    # and fine groups (soft membership), spread like the prototypes' centres, with uneven next-item distributions
    config["model"].update(fine_groups=6, fine_bias_weight=1.0, fine_bias_smoothing=1.0, fine_temperature=0.5)
    centres = model["bank.centres"]
    picks = torch.randint(centres.shape[0], (6,), generator=g)
    model["bank.fine_centres"] = centres[picks] + 0.3 * torch.randn(6, *centres.shape[1:], generator=g)
    items = torch.rand(6, model["bank.next_items"].shape[1], generator=g).pow(6)
    model["bank.fine_items"] = items / items.sum(1, keepdim=True)
    # and 5 history groups (keyed by the window's item embeddings) centred on random items' embeddings
    config["model"].update(history_groups=5, history_bias_weight=1.0, history_bias_smoothing=0.5)
    table = model["device_model.items.collection.embeddings.item_table.weight"]
    picks = torch.randint(2, table.shape[0], (5,), generator=g)
    model["bank.history_centres"] = torch.nn.functional.normalize(table[picks], dim=1)
    items = torch.rand(5, model["bank.next_items"].shape[1], generator=g).pow(6)
    model["bank.history_items"] = items / items.sum(1, keepdim=True)
    model["bank.switches"] = always_on(model["bank.switches"])
    return _rewritten(bundle, model, config, tmp_path_factory.mktemp("group-bias-model"))


def always_on(switches: Tensor) -> Tensor:
    """Switch states [K, 3] that keep every term on through any test's few events (gains of +1,000 each, where an
    event's gain is at most 1 in reciprocal rank): the exactness checks of other parts compare the live paths with
    the offline definition of every term applied (tests/test_switch.py checks the switches themselves)."""
    from recsys.switch import EDIT_GAIN, GROUP_GAIN

    out = switches.clone()
    out[:, EDIT_GAIN] = out[:, GROUP_GAIN] = 1000.0
    return out


@pytest.fixture(scope="session")
def pre_group_bias_bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny bundle as written before prototypes counted next items: no ``bank.next_items``, no β in its config
    (and no fine groups, no history groups, no online switches)."""
    from recsys.bundle import load_bundle

    bundle = load_bundle(tiny_bundle)
    config = bundle.documents["config"]
    for key in ("group_bias_weight", "group_bias_smoothing", "group_bias_decay"):
        config["model"].pop(key, None)
    for key in ("fine_groups", "fine_bias_weight", "fine_bias_smoothing", "fine_temperature"):
        config["model"].pop(key, None)  # nor fine groups, which came later
    for key in ("history_groups", "history_bias_weight", "history_bias_smoothing", "history_bias_decay"):
        config["model"].pop(key, None)  # nor history groups, later still
    dropped = ("bank.next_items", "bank.fine_centres", "bank.fine_items", "bank.history_centres", "bank.history_items")
    dropped = (*dropped, "bank.switches")
    model = {k: v for k, v in bundle.tensors["model"].items() if k not in dropped}
    return _rewritten(bundle, model, config, tmp_path_factory.mktemp("old-model"))


@pytest.fixture(scope="session")
def repeat_bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny bundle with a repeat part (R = 8 entries) whose gate favours repeating, so the online paths are
    checked with the part changing rankings whatever the tiny bundle's validation would choose."""
    import torch

    from recsys.bundle import load_bundle
    from recsys.repeats import RepeatPart

    bundle = load_bundle(tiny_bundle)
    config = bundle.documents["config"]
    config["model"]["repeat_size"] = 8
    config["model"]["repeat_form"] = "mixture"
    # without the fine groups the tiny bundle may have chosen: the repeat part's checks compare exact ranks of the
    # live path (codes from the consumer's batches) with offline ones (codes from single rows), and a fine group's
    # bias moves with codes at the 1e-7 level, enough to flip a near tie (group_bias_bundle checks fine groups live)
    config["model"]["fine_bias_weight"] = 0.0
    dim = int(config["model"]["dim"])
    torch.manual_seed(3)
    part = RepeatPart(dim, "mixture")
    with torch.no_grad():
        part.gate.bias.fill_(4.0)  # p(repeat) 0.98
        torch.nn.init.normal_(part.features[2].weight, std=0.5)  # P_r is not the decayed count alone
    model = dict(bundle.tensors["model"])
    model.update({f"device_model.repeat.{k}": v for k, v in part.state_dict().items()})
    model["bank.switches"] = always_on(model["bank.switches"])
    return _rewritten(bundle, model, config, tmp_path_factory.mktemp("repeat-model"))


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
        tc=TrainConfig(
            epochs=1, adapter_epochs=1, proto_rounds=1, proto_epochs=1, k_candidates=(4,), fine_group_counts=(8,)
        ),
        progress=False,
    )
    return out


def _rewritten(bundle: Any, model: dict[str, Any], config: dict[str, Any], root: Path) -> Path:
    """``bundle`` saved again under ``root`` with its model tensors and config replaced (a variant for a test)."""
    from recsys.bundle import save_bundle

    out = root / "bundle"
    save_bundle(
        out,
        tensors={**bundle.tensors, "model": model},
        documents={**bundle.documents, "config": config},
        data_fingerprint=bundle.manifest["data_fingerprint"],
    )
    return out
