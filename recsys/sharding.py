"""Row-wise sharding of the item table across ranks with TorchRec ``DistributedModelParallel``.

For catalogues too large for one process: each rank holds a contiguous block of item rows and lookups are
routed to the owning rank (gloo on CPU, NCCL on GPU). Run under ``torchrun``; see docs/scaling.md.

    >>> # torchrun --nproc_per_node 2 -m recsys.sharding --items 1000000 --dim 64
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingType

from recsys.model import ItemTable


def init_distributed() -> tuple[int, int, torch.device]:
    """Join the ``torchrun`` process group: gloo on CPU, NCCL when a GPU is there."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    rank = dist.get_rank()
    device = torch.device(f"cuda:{rank % torch.cuda.device_count()}") if backend == "nccl" else torch.device("cpu")
    return rank, dist.get_world_size(), device


def shutdown_distributed(exit_code: int = 0) -> NoReturn:
    """Leave the process group once every rank is done with it, then end the process without C++ teardown.

    About one run in fifteen, a worker that had finished and written everything died at interpreter exit with
    ``terminate called without an active exception`` (SIGABRT): a native thread still joinable while static
    destructors ran. The barrier keeps a fast rank from tearing gloo down under its peer; ``os._exit`` skips the
    static destructors. Call it last: nothing after it runs.
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


def shard_item_table(table: ItemTable, device: torch.device) -> DistributedModelParallel:
    """Wrap an :class:`ItemTable` so that its rows are split row-wise over the process group.

    Call args of the result: ``ids`` int64 [B, T] (the same on every rank). Returns [B, T, D].
    """
    sharder = EmbeddingCollectionSharder()
    constraints = {"item_table": ParameterConstraints(sharding_types=[ShardingType.ROW_WISE.value])}
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=dist.get_world_size(), compute_device=device.type), constraints=constraints
    )
    plan = planner.collective_plan(table, [sharder], dist.GroupMember.WORLD)
    return DistributedModelParallel(table, device=device, plan=plan, sharders=[sharder], init_data_parallel=False)


def local_rows(sharded: nn.Module) -> Tensor:
    """This rank's block of the table [rows_on_rank, D] (for checks and for saving shards)."""
    state = sharded.state_dict()
    key = next(k for k in state if k.endswith("item_table.weight"))
    return state[key].local_shards()[0].tensor


def main() -> None:
    ap = argparse.ArgumentParser(description="Measure sharded item-table lookups under torchrun.")
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seq", type=int, default=50)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    rank, world, device = init_distributed()
    torch.manual_seed(0)
    sharded = shard_item_table(ItemTable(args.items, args.dim), device)
    ids = torch.randint(2, args.items, (args.batch, args.seq), device=device)
    sharded(ids)  # warm-up
    start = time.perf_counter()
    for _ in range(args.steps):
        sharded(ids)
    per_step = (time.perf_counter() - start) / args.steps
    rows = local_rows(sharded).shape[0]
    print(f"rank {rank}/{world}: {rows} rows held, {per_step * 1e3:.2f} ms per {args.batch}x{args.seq} lookup")
    shutdown_distributed()


if __name__ == "__main__":
    main()
