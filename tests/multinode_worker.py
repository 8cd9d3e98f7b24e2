"""A small deterministic DDP job with the sharded cache, launched by the multi-node tests under torchrun.

Each rank writes ``OUT/rank{r}.json`` at the end: per step its loss (``float.hex``, exact), the sampled
rows, the rows it inserted and refreshed, the global metrics; then a checksum of the final towers and
of the whole cache, and where it ran (torchrun's node rank, the network namespace, the gloo interface).
The data of a step is a pure function of (global rank, step), so a run's results depend on the world
size and the seed only, never on how the ranks are spread over nodes.

Fault injection (the restart test): ``--die-rank R --die-step S`` makes rank R exit (code 13) inside the
document tower during step S (``--fault stall``: hang there instead), on the first attempt only
(``TORCHELASTIC_RESTART_COUNT`` = 0); every rank appends what happened to ``OUT/events.jsonl``
(attempt, rank, step, error and seconds taken).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from sharded_negcache import CollectiveFailed, FieldSpec, ShardedCacheLossHandler

FEAT, DIM, CORPUS = 6, 8, 40


class TwoTower(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query = torch.nn.Linear(FEAT, DIM)
        self.doc = torch.nn.Linear(FEAT, DIM)

    def forward(self, qx: torch.Tensor, dx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.query(qx), self.doc(dx)


def batch_size(step: int, rank: int) -> int:
    """Sizes differ across ranks and steps; rank 1 has an empty batch at step 2."""
    return 0 if (rank, step) == (1, 2) else 2 + (3 * step + rank) % 4


def log_event(out: str, **fields) -> None:
    with open(os.path.join(out, "events.jsonl"), "a") as f:
        f.write(json.dumps(fields) + "\n")
        f.flush()
        os.fsync(f.fileno())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", required=True)
    p.add_argument("--collective-timeout", type=float, default=300.0)
    p.add_argument("--die-rank", type=int, default=-1)
    p.add_argument("--die-step", type=int, default=-1)
    p.add_argument("--fault", choices=("die", "stall"), default="die", help="exit, or hang in the tower for 10 min")
    args = p.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    os.makedirs(args.out, exist_ok=True)

    torch.manual_seed(0)
    model = DDP(TwoTower())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    specs = {
        "x": FieldSpec((FEAT,), torch.float32),
        "doc_id": FieldSpec((1,), torch.int64),
        "embedding": FieldSpec((DIM,), torch.float32),
    }
    handler = ShardedCacheLossHandler(
        specs, 16 * world, "embedding", ("x",), score_transform=4.0, num_negatives=2, seed=5,
        doc_id_key="doc_id", block_size=4, collective_timeout_s=args.collective_timeout,
    )
    docs = torch.randn(CORPUS, FEAT, generator=torch.Generator().manual_seed(99))

    steps = []
    for step in range(args.steps):
        g = torch.Generator().manual_seed(1000 * step + rank)
        n = batch_size(step, rank)
        ids = torch.randint(0, CORPUS, (n,), generator=g)
        qx = docs[ids] + 0.3 * torch.randn(n, FEAT, generator=g)
        dx = docs[ids]
        q, d = model(qx, dx)

        doc = model.module.doc

        def document_network(rows: dict[str, torch.Tensor]) -> torch.Tensor:
            if rank == args.die_rank and step == args.die_step and attempt == 0:
                if args.fault == "stall":
                    log_event(args.out, attempt=attempt, rank=rank, step=step, event="stalling")
                    time.sleep(600)
                log_event(args.out, attempt=attempt, rank=rank, step=step, event="dying")
                os._exit(13)
            return doc(rows["x"])

        start = time.monotonic()
        try:
            loss = handler.update_cache_and_compute_loss(document_network, q, d, {"x": dx, "doc_id": ids[:, None]})
        except CollectiveFailed as exc:
            log_event(args.out, attempt=attempt, rank=rank, step=step, event="CollectiveFailed",
                      error=str(exc), seconds=time.monotonic() - start)
            # The pattern docs/operations.md recommends: report, then leave at once. A normal exit would
            # wait for gloo's still-pending collective until the process-group timeout (30 min by default),
            # and torchrun restarts the group only when a worker has exited.
            sys.excepthook(*sys.exc_info())  # the usual traceback (torch prefixes it with [rankN]:)
            sys.stderr.flush()
            os._exit(1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        r = handler.last_step
        steps.append({
            "step": step, "batch": n, "loss": loss.item().hex(),
            "sampled": r.sampled_rows.tolist(), "inserted": r.inserted_rows.tolist(),
            "refreshed": r.refreshed_rows.tolist(),
            "metrics": {k: float(v).hex() for k, v in r.metrics.items()},
        })

    rows = handler.gather_global_rows()
    result = {
        "rank": rank, "world": world, "attempt": attempt, "steps": steps,
        "params": sum(p.double().sum().item() for p in model.parameters()).hex(),
        "cache": {k: v.double().sum().item().hex() for k, v in rows.items()},
        "where": {
            "group_rank": os.environ.get("GROUP_RANK"), "local_rank": os.environ.get("LOCAL_RANK"),
            "netns": os.readlink("/proc/self/ns/net"), "gloo_ifname": os.environ.get("GLOO_SOCKET_IFNAME"),
            "master_addr": os.environ.get("MASTER_ADDR"),
        },
    }
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    log_event(args.out, attempt=attempt, rank=rank, event="done")
    dist.barrier()
    del model, opt, handler  # release DDP before the group: torch 2.13 + gloo can deadlock at exit otherwise
    gc.collect()
    dist.destroy_process_group()
    print(f"rank {rank} done", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
