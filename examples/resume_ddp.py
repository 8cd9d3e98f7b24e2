"""Resumable DDP training of a dual encoder with the sharded negative cache: one DCP checkpoint for all.

The standard resume pattern:

1. every ``--save-every`` steps, model, optimizer and cache go into one ``torch.distributed.checkpoint``
   directory (``sharded_negcache.checkpoint.save``: the manifest is written last);
2. at start-up, every rank loads the latest *complete* checkpoint under ``--ckpt-dir`` (if any) and
   continues from its step counter;
3. the data of step ``s`` is a pure function of ``(data seed, s, rank)`` and the cache's randomness a
   function of ``(seed, s)``, so a restarted run repeats the uninterrupted run's losses exactly.

Run it on CPU with two processes, letting torchrun restart the job once after a rank dies::

    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 \\
    torchrun --standalone --nproc_per_node=2 --max-restarts=1 examples/resume_ddp.py \\
        --steps 12 --save-every 3 --ckpt-dir /tmp/negcache_ckpt --loss-log /tmp/negcache_log.jsonl \\
        --kill-at-step 7 --kill-rank 1

``--kill-at-step`` makes one rank SIGKILL itself at the start of that step, on the first attempt only
(``TORCHELASTIC_RESTART_COUNT`` = 0): torchrun stops the others and restarts the job, which resumes
from the last checkpoint. ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` gives each attempt its own
rendezvous store: with the shared default, restarted gloo workers can pick up the previous attempt's
addresses and fail to connect (pytorch/pytorch#135712).

Rank 0 appends one JSON line per step to ``--loss-log``: the attempt, the step, every rank's loss
(as ``float.hex``, exact) and a digest of the whole cache before the step. The cache may be resumed
on a different number of ranks (``cache_size`` must divide by it).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.nn.parallel import DistributedDataParallel as DDP

from sharded_negcache import FieldSpec, ShardedCacheLossHandler
from sharded_negcache.checkpoint import CacheCheckpoint, latest_checkpoint, load, row_hashes, save

FEAT, DIM, CORPUS = 16, 8, 512


class DualEncoder(nn.Module):
    """Query and document towers; ``forward`` embeds a batch of queries and their positive documents."""

    def __init__(self) -> None:
        super().__init__()
        self.query_tower = nn.Sequential(nn.Linear(FEAT, 32), nn.Tanh(), nn.Linear(32, DIM))
        self.doc_tower = nn.Sequential(nn.Linear(FEAT, 32), nn.Tanh(), nn.Linear(32, DIM))

    def forward(self, query_x: torch.Tensor, doc_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.query_tower(query_x), self.doc_tower(doc_x)


class TrainState:
    """Model and optimizer as one DCP ``Stateful`` (DCP's ``get_state_dict`` handles DDP/FSDP wrapping)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=state_dict["model"],
                       optim_state_dict=state_dict["optim"])


def corpus(seed: int) -> torch.Tensor:
    """A fixed synthetic document collection (features only), identical on every rank."""
    return torch.randn(CORPUS, FEAT, generator=torch.Generator().manual_seed(seed))


def batch_for(step: int, rank: int, docs: torch.Tensor, batch: int, seed: int) -> dict[str, torch.Tensor]:
    """The data of ``step`` on ``rank``: a pure function of (seed, step, rank), so a restart replays it."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 1_009 + rank)
    ids = torch.randint(0, CORPUS, (batch,), generator=g)
    doc_x = docs[ids]
    query_x = doc_x + 0.3 * torch.randn(batch, FEAT, generator=g)
    return {"query_x": query_x, "doc_x": doc_x, "doc_id": ids.unsqueeze(1)}


def cache_digest(handler: ShardedCacheLossHandler) -> int:
    """A world-size independent digest of the whole cache (sum of per-row hashes, one all-reduce)."""
    store = handler.store
    local = [store.embeddings, store.age, store.filled] + [store.feature(k) for k in sorted(store.feature_specs)]
    total = row_hashes(local, handler.layout.row_offset).sum().reshape(1)
    if handler.comm.active:
        dist.all_reduce(total, group=handler.comm.shard_group)
    return int(total.item())


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=8, help="queries per rank per step")
    p.add_argument("--cache-size", type=int, default=96)
    p.add_argument("--save-every", type=int, default=3)
    p.add_argument("--ckpt-dir", required=True)
    p.add_argument("--loss-log", required=True, help="JSON lines written by rank 0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kill-at-step", type=int, default=None)
    p.add_argument("--kill-rank", type=int, default=1)
    return p.parse_args()


def train(args: argparse.Namespace) -> None:
    """Builds model, optimizer and cache, resumes from the latest complete checkpoint, trains to ``--steps``."""
    device = torch.device("cpu")
    rank, world = dist.get_rank(), dist.get_world_size()
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    torch.set_num_threads(1)  # deterministic and polite on a shared CPU

    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = DDP(DualEncoder().to(device))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    specs = {
        "x": FieldSpec((FEAT,), torch.float32),
        "doc_id": FieldSpec((1,), torch.int64),
        "embedding": FieldSpec((DIM,), torch.float32),
    }
    handler = ShardedCacheLossHandler(
        specs, args.cache_size, "embedding", ("x",), score_transform=5.0, num_negatives=2,
        seed=args.seed, doc_id_key="doc_id", device=device,
    )
    state = {"train": TrainState(model, optimizer), "cache": CacheCheckpoint(handler)}

    resume_from = latest_checkpoint(args.ckpt_dir) if rank == 0 else None
    shared = [resume_from]
    dist.broadcast_object_list(shared, src=0)  # every rank loads the same one, even if a save races
    if shared[0] is not None:
        load(state, shared[0])
    start = handler.steps_done
    if rank == 0:
        print(f"attempt {attempt}: world size {world}, starting at step {start} from {shared[0]}", flush=True)

    docs = corpus(args.seed)
    def doc_network(rows: dict[str, torch.Tensor]) -> torch.Tensor:
        """Re-encodes sampled cache rows; through ``model.module``, the gradients still reach DDP's hooks."""
        return model.module.doc_tower(rows["x"])

    for step in range(start, args.steps):
        if args.kill_at_step == step and attempt == 0 and rank == args.kill_rank:
            os.kill(os.getpid(), signal.SIGKILL)  # a hard failure: no cleanup, no flush
        digest = cache_digest(handler)
        data = batch_for(step, rank, docs, args.batch, args.seed)
        query_emb, doc_emb = model(data["query_x"], data["doc_x"])
        loss = handler.update_cache_and_compute_loss(
            doc_network, query_emb, doc_emb, {"x": data["doc_x"], "doc_id": data["doc_id"]}
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

        losses = [None] * world
        dist.all_gather_object(losses, float(loss.detach()))
        if rank == 0:
            with open(args.loss_log, "a") as f:
                f.write(json.dumps({"attempt": attempt, "step": step, "world_size": world,
                                    "losses": [float.hex(x) for x in losses], "cache_digest": digest}) + "\n")
        if handler.steps_done % args.save_every == 0:
            save(state, os.path.join(args.ckpt_dir, f"step_{handler.steps_done:06d}"))


def main() -> None:
    args = parse_args()
    dist.init_process_group("gloo")
    train(args)
    # DDP and the checkpoint's device mesh are released when train() returns, while the process group is
    # still registered. Dropping the last reference to a gloo group from a destructor (e.g. DDP's reducer
    # after destroy_process_group) can deadlock against gloo's work threads on the GIL (torch 2.13), so the
    # group is destroyed last, after a barrier that lets those threads finish.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
