"""A TorchRec two-tower retrieval model trained with the sharded negative cache (torchrun, CPU, gloo).

    torchrun --standalone --nproc_per_node=2 -m examples.torchrec_two_tower.train

TorchRec's way: id features travel as one ``KeyedJaggedTensor`` (user id, the user's variable-length
item history, item id, item category), one ``EmbeddingBagCollection`` holds the tables (the item
table is shared by the item-id and history features), and ``DistributedModelParallel`` shards every
table row-wise over the ranks (fused row-wise Adagrad in the backward) and wraps the MLPs in DDP.
The data come from the generative process of ``data.py``.

The cache rows keep an item's id and category, so the handler re-encodes a sampled item with the
*sharded* item tower. Sharded lookups are collectives (all-to-all of ids, reduce-scatter of pooled
rows) that every rank must call with the same batch size (the gloo backward needs it), so the
document network pads each rank's sampled rows to a fixed ``batch * negatives`` with empty bags.
The handler calls it on a rank only when that rank sampled something: that is every step but the
first (the cache starts empty on every rank, so all ranks skip it together).

Rank 0 writes ``<out>/metrics.json``: held-out Recall@{10,100} and MRR@10 over all items (exact),
before and after training, with the generating process itself (the oracle) and item popularity
as references.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.modules.embedding_configs import PoolingType
from torchrec.optim.optimizers import in_backward_optimizer_filter
from tqdm import tqdm

from sharded_negcache import FieldSpec, ShardedCacheLossHandler

from . import data as data_lib

FEATURES = ("user_id", "history", "item_id", "item_category")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=128, help="examples per rank per step")
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--scale", type=float, default=20.0, help="score = scale * cosine")
    p.add_argument("--cache-size", type=int, default=4096)
    p.add_argument("--negatives", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3, help="Adam, MLPs")
    p.add_argument("--embedding-lr", type=float, default=0.05, help="fused row-wise Adagrad, tables")
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--items", type=int, default=4000)
    p.add_argument("--interactions", type=int, default=30, help="per user; the last one is held out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--out", default="runs/torchrec_two_tower")
    return p.parse_args(argv)


def init_distributed() -> tuple[int, int]:
    """gloo process group from torchrun's environment, or a world of one when run directly."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


# ---- the model ---------------------------------------------------------------------------------
class TwoTower(nn.Module):
    """User tower (user id + mean of history items) and item tower (item id + category), one EBC."""

    def __init__(self, num_users: int, num_items: int, num_categories: int, dim: int, device: torch.device) -> None:
        super().__init__()
        self.ebc = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(name="user_table", embedding_dim=dim, num_embeddings=num_users, feature_names=["user_id"]),
                EmbeddingBagConfig(name="item_table", embedding_dim=dim, num_embeddings=num_items,
                                   feature_names=["item_id", "history"], pooling=PoolingType.MEAN),
                EmbeddingBagConfig(name="category_table", embedding_dim=dim, num_embeddings=num_categories,
                                   feature_names=["item_category"]),
            ],
            device=device,  # "meta": DMP allocates each rank's shard
        )
        self.user_mlp = nn.Sequential(nn.Linear(2 * dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))
        self.item_mlp = nn.Sequential(nn.Linear(2 * dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))

    def encode_users(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        pooled = self.ebc(kjt)
        return F.normalize(self.user_mlp(torch.cat([pooled["user_id"], pooled["history"]], 1)), dim=-1)

    def encode_items(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        pooled = self.ebc(kjt)
        return F.normalize(self.item_mlp(torch.cat([pooled["item_id"], pooled["item_category"]], 1)), dim=-1)

    def forward(self, kjt: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.ebc(kjt)  # one sharded lookup for both towers
        users = self.user_mlp(torch.cat([pooled["user_id"], pooled["history"]], 1))
        items = self.item_mlp(torch.cat([pooled["item_id"], pooled["item_category"]], 1))
        return F.normalize(users, dim=-1), F.normalize(items, dim=-1)


def make_kjt(batch: int, **features: tuple[torch.Tensor, torch.Tensor]) -> KeyedJaggedTensor:
    """A KJT over all FEATURES for ``batch`` examples; ``features[name] = (values, lengths)``, absent = empty bags."""
    values, lengths = [], []
    for name in FEATURES:
        v, n = features.get(name, (torch.zeros(0, dtype=torch.int64), torch.zeros(batch, dtype=torch.int64)))
        values.append(v)
        lengths.append(n)
    return KeyedJaggedTensor.from_lengths_sync(keys=list(FEATURES), values=torch.cat(values), lengths=torch.cat(lengths))


def user_kjt(examples: data_lib.Interactions) -> dict:
    ones = torch.ones(len(examples), dtype=torch.int64)
    return {"user_id": (examples.users, ones), "history": (examples.history_values, examples.history_lengths)}


def item_kjt(items: torch.Tensor, categories: torch.Tensor, pad_to: int | None = None) -> KeyedJaggedTensor:
    """Items as a KJT, padded with empty bags to ``pad_to`` examples (equal sizes on every rank)."""
    count = items.numel()
    size = count if pad_to is None else pad_to
    lengths = (torch.arange(size) < count).to(torch.int64)
    return make_kjt(size, item_id=(items, lengths), item_category=(categories, lengths))


def shard_model(model: TwoTower, embedding_lr: float) -> DistributedModelParallel:
    """Every table row-wise over all ranks, fused row-wise Adagrad applied in the backward."""
    sharder = EmbeddingBagCollectionSharder(
        fused_params={"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": embedding_lr}
    )
    world = dist.get_world_size()
    tables = {name: row_wise(compute_kernel="fused") for name in ("user_table", "item_table", "category_table")}
    plan = ShardingPlan({"ebc": construct_module_sharding_plan(
        model.ebc, tables, sharder=sharder, local_size=world, world_size=world, device_type="cpu")})
    return DistributedModelParallel(
        model, env=ShardingEnv.from_process_group(dist.group.WORLD), device=torch.device("cpu"),
        plan=plan, sharders=[sharder],
    )


# ---- evaluation --------------------------------------------------------------------------------
def ranks_of(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    right = scores.gather(1, target.unsqueeze(1))
    return 1 + (scores > right).sum(1)


def summarize(ranks: torch.Tensor) -> dict[str, float]:
    r = ranks.double()
    return {
        "mrr@10": torch.where(r <= 10, 1.0 / r, 0.0).mean().item(),
        "recall@10": (r <= 10).double().mean().item(),
        "recall@100": (r <= 100).double().mean().item(),
    }


@torch.no_grad()
def evaluate(model: TwoTower, data: data_lib.RecData) -> dict[str, float]:
    """Exact retrieval of each held-out item among all items. Every rank encodes an equal share of
    the items and of the test users (sharded lookups are collectives), then the counts are summed."""
    rank, world = dist.get_rank(), dist.get_world_size()
    per_rank = -(-data.num_items // world)
    mine = torch.arange(rank * per_rank, min((rank + 1) * per_rank, data.num_items))
    items = model.encode_items(item_kjt(mine, data.item_category[mine], pad_to=per_rank))
    gathered = [torch.empty_like(items) for _ in range(world)]
    dist.all_gather(gathered, items)
    all_items = torch.cat(gathered)[: data.num_items]

    per_rank = -(-len(data.test) // world)
    index = torch.arange(rank * per_rank, (rank + 1) * per_rank)
    valid = index < len(data.test)
    test = data.test.select(index.clamp(max=len(data.test) - 1))  # padded with a repeat, masked below
    users = model.encode_users(make_kjt(per_rank, **user_kjt(test)))
    r = ranks_of(users @ all_items.t(), test.items)[valid].double()
    sums = torch.stack([torch.where(r <= 10, 1.0 / r, 0.0).sum(), (r <= 10).sum().double(),
                        (r <= 100).sum().double(), torch.tensor(float(valid.sum()), dtype=torch.float64)])
    dist.all_reduce(sums)
    mrr, r10, r100, n = sums.tolist()
    return {"mrr@10": mrr / n, "recall@10": r10 / n, "recall@100": r100 / n}


# ---- training ----------------------------------------------------------------------------------
def epoch_order(num_examples: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of one epoch; the global batch i is its slice i, each rank taking a part."""
    return torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed * 1000 + epoch))


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    rank, world = init_distributed()
    data = data_lib.generate(
        num_users=args.users, num_items=args.items, interactions_per_user=args.interactions, seed=args.seed
    )
    out = Path(args.out)

    torch.manual_seed(args.seed)  # same MLPs on every rank (DDP broadcasts rank 0's anyway)
    dmp = shard_model(TwoTower(data.num_users, data.num_items, data.num_categories, args.dim, torch.device("meta")),
                      args.embedding_lr)
    model: TwoTower = dmp.module  # the sharded module without the DDP wrapper
    dense = [p for _, p in in_backward_optimizer_filter(dmp.named_parameters())]  # the MLPs
    optimizer = torch.optim.Adam(dense, lr=args.lr)

    specs = {
        "item_id": FieldSpec((1,), torch.int64),
        "item_category": FieldSpec((1,), torch.int64),
        "embedding": FieldSpec((args.dim,), torch.float32),
    }
    handler = ShardedCacheLossHandler(
        specs, args.cache_size, "embedding", ("item_id", "item_category"),
        score_transform=args.scale, num_negatives=args.negatives, seed=args.seed, doc_id_key="item_id",
    )
    capacity = args.batch_size * args.negatives  # most distinct rows one rank can sample in a step

    def item_network(rows: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sampled cache rows through the sharded item tower, padded to the same size on every rank.
        Called outside DMP's forward: autograd sums both uses of each MLP weight before DDP's
        per-parameter hook fires, and the fused tables update from both lookups' backward."""
        count = rows["item_id"].shape[0]
        kjt = item_kjt(rows["item_id"].reshape(-1), rows["item_category"].reshape(-1), pad_to=capacity)
        return model.encode_items(kjt)[:count]

    reference = {
        "oracle": summarize(ranks_of(data.oracle_scores(data.test.users), data.test.items)),
        "popularity": summarize(ranks_of(data.item_bias.expand(len(data.test), -1), data.test.items)),
    }
    curve = [{"step": 0, **evaluate(model, data)}]
    global_batch = args.batch_size * world
    steps_per_epoch = len(data.train) // global_batch
    t_train = 0.0
    bar = tqdm(range(1, args.steps + 1), desc="train two-tower", disable=rank != 0, dynamic_ncols=True)
    order, order_epoch = epoch_order(len(data.train), args.seed, 0), 0
    for step in bar:
        t0 = time.perf_counter()
        epoch, i = divmod(step - 1, steps_per_epoch)
        if epoch != order_epoch:
            order, order_epoch = epoch_order(len(data.train), args.seed, epoch), epoch
        idx = order[i * global_batch + rank * args.batch_size : i * global_batch + (rank + 1) * args.batch_size]
        batch = data.train.select(idx)
        categories = data.item_category[batch.items]
        ones = torch.ones(len(batch), dtype=torch.int64)
        kjt = make_kjt(len(batch), **user_kjt(batch), item_id=(batch.items, ones), item_category=(categories, ones))
        users, items = dmp(kjt)
        rows = {"item_id": batch.items.unsqueeze(1), "item_category": categories.unsqueeze(1)}
        loss = handler(item_network, users, items, rows)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # the tables' fused optimizer steps here
        optimizer.step()
        t_train += time.perf_counter() - t0
        bar.set_postfix(ce=f"{handler.last_step.metrics['interpretable_loss']:.3f}")
        if step % args.eval_every == 0 or step == args.steps:
            curve.append({"step": step, **evaluate(model, data)})
            if rank == 0:
                bar.write(f"step {step:5d}  " + "  ".join(f"{k} {v:.4f}" for k, v in curve[-1].items() if k != "step"))

    # The MLPs are replicated (DDP inside DMP): their copies must be identical on every rank.
    flat = torch.cat([p.detach().reshape(-1) for p in dense])
    copies = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(copies, flat)
    divergence = max((c - flat).abs().max().item() for c in copies)

    result = None
    if rank == 0:
        result = {
            "dense_replica_divergence": divergence,
            "initial": curve[0], "final": curve[-1], "curve": curve, "reference": reference,
            "train_time_s": t_train, "last_cross_entropy": handler.last_step.metrics["interpretable_loss"],
            "cache_stats": handler.last_step.metrics, "world_size": world, "global_batch": global_batch,
            "config": vars(args),
            "data": {"users": data.num_users, "items": data.num_items, "categories": data.num_categories,
                     "train_examples": len(data.train), "test_examples": len(data.test)},
        }
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(result, indent=1))
        print("two-tower: " + "  ".join(f"{k} {v:.4f}" for k, v in curve[-1].items() if k != "step")
              + f"  (oracle mrr@10 {reference['oracle']['mrr@10']:.4f}, popularity {reference['popularity']['mrr@10']:.4f})"
              + f"  -> {out / 'metrics.json'}")
    # DDP and process-group handles must be gone before the group is destroyed: with torch 2.13 and
    # gloo, a reducer collected after destroy_process_group can abort the process at exit.
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
