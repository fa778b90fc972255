"""The same seed gives the same bundle: bit-identical weights from two separate processes.

Two processes, not two calls: Python randomises ``str`` hashes per process (``PYTHONHASHSEED``), so anything
derived from ``hash()`` of a name differs between processes while looking stable inside one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

_TRAIN = """
import sys
from pathlib import Path
from recsys.pipeline import DatasetSpec, train_bundle
from recsys.train import TrainConfig
train_bundle(
    DatasetSpec(source="synthetic:users=60,items=40,events=1500,clusters=4", min_user=2, min_item=2),
    Path(sys.argv[1]),
    model_overrides={"dim": 8, "code_dim": 4, "max_len": 10},
    tc=TrainConfig(epochs=2, adapter_epochs=1, proto_rounds=1, proto_epochs=1, k_candidates=(2,), seed=3),
    progress=False,
)
"""


def _train(out: Path, hash_seed: str) -> None:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    subprocess.run([sys.executable, "-c", _TRAIN, str(out)], env=env, check=True, cwd=Path(__file__).parents[1])


def test_same_seed_gives_bit_identical_weights_in_two_processes(tmp_path: Path) -> None:
    _train(tmp_path / "a", "1")
    _train(tmp_path / "b", "2")
    files = sorted(p.name for p in (tmp_path / "a").glob("*.safetensors"))
    assert "model.safetensors" in files and "adapter_no_prototypes.safetensors" in files
    assert files == sorted(p.name for p in (tmp_path / "b").glob("*.safetensors"))
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
