"""Run under torchrun by tests/test_sharding.py: sharded lookups must equal lookups in the gathered table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from recsys.model import ItemTable
from recsys.sharding import init_distributed, local_rows, shard_item_table, shutdown_distributed

rank, world, device = init_distributed()
torch.manual_seed(0)
n_items = 1001  # not divisible by the world size on purpose
sharded = shard_item_table(ItemTable(n_items, 8), device)
shard = local_rows(sharded).contiguous()
parts: list[torch.Tensor | None] = [None] * world
dist.all_gather_object(parts, shard)  # shards differ in size (1001 rows over 2 ranks)
full = torch.cat([p for p in parts if p is not None])
ids = torch.randint(0, n_items, (6, 7), generator=torch.Generator().manual_seed(1))
out = sharded(ids)
result = {"rank": rank, "rows": shard.shape[0], "total_rows": full.shape[0], "equal": bool(torch.equal(out, full[ids]))}
Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps(result))
shutdown_distributed()
