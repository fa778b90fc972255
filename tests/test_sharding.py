"""The item table shards row-wise over ranks with TorchRec DistributedModelParallel (gloo on CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_row_wise_sharded_lookups_match_the_whole_table(tmp_path: Path) -> None:
    worker = Path(__file__).with_name("sharding_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker)]
    proc = subprocess.run([*cmd, str(tmp_path)], capture_output=True, text=True, timeout=240, cwd=worker.parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["equal"] for r in results)
    assert sum(r["rows"] for r in results) == 1001  # every row lives on exactly one rank
    assert all(0 < r["rows"] < 1001 for r in results)
