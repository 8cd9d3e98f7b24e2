"""A tiny DDP training job with the sharded cache, launched by tests under torchrun.

Prints one JSON line per step (rank 0); each rank writes its final parameter checksum to LOGDIR/rank{r}.json.
"""
from __future__ import annotations

import gc
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from sharded_negcache import FieldSpec, ShardedCacheLossHandler


class TwoTower(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query = torch.nn.Linear(6, 8)
        self.doc = torch.nn.Linear(6, 8)

    def forward(self, qx: torch.Tensor, dx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.query(qx), self.doc(dx)


def main(steps: int, logdir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = DDP(TwoTower())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    specs = {"x": FieldSpec((6,), torch.float32), "embedding": FieldSpec((8,), torch.float32)}
    handler = ShardedCacheLossHandler(specs, 64, "embedding", ("x",), score_transform=5.0, num_negatives=2, seed=3)
    writer = None
    os.makedirs(logdir, exist_ok=True)
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(logdir)
    gen = torch.Generator().manual_seed(100 + rank)
    for step in range(steps):
        n = 3 + (step + rank) % 3  # batch sizes differ between ranks and steps
        qx, dx = torch.randn(n, 6, generator=gen), torch.randn(n, 6, generator=gen)
        q, d = model(qx, dx)
        # The handler calls the inner doc tower on sampled rows; DDP's gradient hooks sit on the
        # parameters, so those gradients are all-reduced in the same backward.
        doc = model.module.doc
        loss = handler.update_cache_and_compute_loss(lambda f: doc(f["x"]), q, d, {"x": dx}, writer)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0:
            print(json.dumps({"step": step, "loss": loss.item(), **handler.last_step.metrics}), flush=True)
    checksum = sum(p.double().sum().item() for p in model.parameters())
    with open(os.path.join(logdir, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "checksum": checksum, "world": world}, f)
    if writer is not None:
        writer.close()
    del model, opt, handler  # release DDP before the group (torch 2.13 + gloo can abort at exit otherwise)
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
