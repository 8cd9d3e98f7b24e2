"""Trains the code-search dual encoder with one loss, under torchrun (gloo, CPU, DDP), and evaluates it.

    torchrun --standalone --nproc_per_node=2 -m examples.code_search.train --loss cache --seeds 0 1 2

Losses (same towers, data order, steps and batch for all three):
  in_batch  the usual cross-device baseline: every rank's positives are gathered (with gradient) and
            each query's softmax runs over the global batch's documents.
  cache     the sharded negative cache: positive + the whole cache, m negatives sampled and re-encoded.
  both      the cache plus the global batch's other positives as fresh candidates (design §2,
            ``in_batch_negatives=True`` in the handler).

Held-out MRR@10 and Recall@{1,10,100} are measured by exact retrieval over all held-out functions,
at step 0, every ``--eval-every`` steps and at the end. ``--seeds`` trains once per seed (towers'
initialisation, data order and the cache's sampling all follow the seed) in the same launch; rank 0
writes ``<out>/<loss>/metrics.json`` (per seed, and the mean and spread over seeds) and TensorBoard
logs in ``<out>/<loss>/tb/seed<N>``. Without torchrun it runs as a single process (world 1).

The defaults are the setting of the comparison in ``examples/README.md``.
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
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from sharded_negcache import FieldSpec, ShardedCacheLossHandler

from . import data as data_lib
from .model import DualEncoder, retrieval_metrics

LOSSES = ("in_batch", "cache", "both")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loss", choices=LOSSES, required=True)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=16, help="pairs per rank per step")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--scale", type=float, default=10.0, help="score = scale * cosine (all losses)")
    p.add_argument("--cache-size", type=int, default=4096, help="global rows, split over the ranks (of a group)")
    p.add_argument("--shard-group-size", type=int, default=None,
                   help="two-level layout: groups of G ranks, each with its own cache of --cache-size rows")
    p.add_argument("--negatives", type=int, default=8, help="negatives sampled from the cache per query")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one training run per seed")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--out", default="runs/code_search")
    p.add_argument("--data-dir", default="runs/code_search/data", help="where the built data set is saved")
    p.add_argument("--packages", nargs="*", default=None, help="only these top-level stdlib packages (tests)")
    return p.parse_args(argv)


# ---- distributed setup ---------------------------------------------------------------------------
def init_distributed() -> tuple[int, int]:
    """gloo process group from torchrun's environment, or a world of one when run directly."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def batch_indices(num_pairs: int, batch_size: int, rank: int, world: int, seed: int):
    """Endless per-rank batches: one shuffled global order per epoch, cut into global batches, each
    rank taking its slice. The order depends only on (seed, epoch), so every loss sees the same data."""
    global_batch = batch_size * world
    epoch = 0
    while True:
        order = torch.randperm(num_pairs, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        for start in range(0, num_pairs - global_batch + 1, global_batch):
            yield order[start + rank * batch_size : start + (rank + 1) * batch_size]
        epoch += 1


# ---- the in-batch baseline -----------------------------------------------------------------------
class GatherWithGrad(torch.autograd.Function):
    """All-gather of equal-size rows whose backward hands each rank the summed gradient of its rows
    (an all-reduce then its own slice: works on gloo, which has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad)
        rows = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * rows : (dist.get_rank() + 1) * rows]


def in_batch_loss(q: torch.Tensor, d: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax cross-entropy of each query over the positives of the whole global batch.

    The gather is differentiable: the backward sends each rank the gradient that every rank's
    queries put on its positives. With the mean over local queries and DDP's gradient average,
    the step follows the mean loss over the global batch.
    """
    docs = GatherWithGrad.apply(d)
    logits = scale * q @ docs.t()
    labels = torch.arange(q.shape[0]) + dist.get_rank() * q.shape[0]
    return F.cross_entropy(logits, labels)


def make_handler(args: argparse.Namespace, doc_len: int, seed: int) -> ShardedCacheLossHandler:
    """The sharded cache: each row keeps a document's tokens (to re-encode it) and its id (so a query
    never samples its own positive as a negative). The engine's default sampling blocks are used.
    """
    specs = {
        "doc_tokens": FieldSpec((doc_len,), torch.int32),
        "doc_id": FieldSpec((1,), torch.int64),
        "embedding": FieldSpec((args.dim,), torch.float32),
    }
    return ShardedCacheLossHandler(
        specs, args.cache_size, "embedding", ("doc_tokens",),
        score_transform=args.scale, num_negatives=args.negatives, seed=seed,
        doc_id_key="doc_id", in_batch_negatives=args.loss == "both",
        shard_group_size=args.shard_group_size,
    )


# ---- training ------------------------------------------------------------------------------------
def load_data(args: argparse.Namespace, rank: int) -> data_lib.CodeSearchData:
    """Rank 0 builds (or loads) the data set; the others wait and load the saved copy."""
    build_kwargs = {"packages": args.packages} if args.packages else {}
    if rank == 0:
        data = data_lib.load_or_build(args.data_dir, **build_kwargs)
    dist.barrier()
    if rank != 0:
        data = data_lib.load_or_build(args.data_dir, **build_kwargs)
    return data


def train(args: argparse.Namespace, data: data_lib.CodeSearchData, seed: int) -> dict | None:
    """Trains and evaluates one loss with one seed in the current process group; rank 0 returns the results."""
    rank, world = dist.get_rank(), dist.get_world_size()
    is_main = rank == 0
    train_set, held = data.train_tensors, data.held_out_tensors
    doc_len = train_set["doc_tokens"].shape[1]
    if len(data.train) < args.batch_size * world:
        raise SystemExit(f"{len(data.train)} training pairs are fewer than one global batch")

    torch.manual_seed(seed)  # same initial towers for every loss (DDP also broadcasts rank 0's)
    model = DualEncoder(len(data.vocab), args.dim)
    ddp_model = DDP(model)
    optimizer = torch.optim.Adam(ddp_model.parameters(), lr=args.lr)
    handler = make_handler(args, doc_len, seed) if args.loss != "in_batch" else None

    # The handler re-encodes the sampled cache rows with the *inner* document tower (a second forward
    # outside DDP's forward). Gradients still sync correctly: DDP hooks each parameter's gradient
    # accumulator, and autograd sums every use of a parameter in the graph (the DDP forward and the
    # re-encode) before that accumulator fires once per backward, so DDP all-reduces the total.
    def document_network(rows: dict[str, torch.Tensor]) -> torch.Tensor:
        return model.encode_docs(rows["doc_tokens"])

    writer = SummaryWriter(str(Path(args.out) / args.loss / "tb" / f"seed{seed}")) if is_main else None
    curve: list[dict] = []

    def evaluate(step: int, progress: bool = False) -> dict[str, float]:
        metrics = retrieval_metrics(model, held["query_tokens"], held["doc_tokens"], progress=progress)
        curve.append({"step": step, **metrics})
        for name, value in metrics.items():
            writer.add_scalar(f"eval/{name}", value, step)
        return metrics

    batches = batch_indices(len(data.train), args.batch_size, rank, world, seed)
    train_time = eval_time = 0.0
    last_loss = last_ce = float("nan")
    if is_main:
        evaluate(0)
    bar = tqdm(range(1, args.steps + 1), desc=f"train {args.loss} seed {seed}", disable=not is_main, dynamic_ncols=True)
    for step in bar:
        t0 = time.perf_counter()
        idx = next(batches)
        qt, dt = train_set["query_tokens"][idx], train_set["doc_tokens"][idx]
        q, d = ddp_model(qt, dt)
        if handler is None:
            loss = in_batch_loss(q, d, args.scale)
        else:
            rows = {"doc_tokens": dt, "doc_id": idx.unsqueeze(1)}
            log = (writer, step) if is_main else None
            loss = handler.update_cache_and_compute_loss(document_network, q, d, rows, writer=log)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        train_time += time.perf_counter() - t0

        last_loss = loss.item()
        # The cache's training loss is a surrogate (its value is not a cross-entropy); the handler
        # reports the cross-entropy over positive + cache (+ batch) as the "interpretable" loss.
        last_ce = last_loss if handler is None else handler.last_step.metrics["interpretable_loss"]
        if is_main:
            writer.add_scalar("train/loss", last_loss, step)
            writer.add_scalar("train/cross_entropy", last_ce, step)
            bar.set_postfix(loss=f"{last_loss:.3f}", ce=f"{last_ce:.3f}")
        if step % args.eval_every == 0 or step == args.steps:
            t0 = time.perf_counter()
            if is_main:
                metrics = evaluate(step, progress=step == args.steps)
                bar.write(f"step {step:5d}  " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            dist.barrier()
            eval_time += time.perf_counter() - t0
    bar.close()
    divergence = replica_divergence(model)
    if not is_main:
        return None
    writer.close()
    return {
        "seed": seed,
        "replica_divergence": divergence,
        "final": curve[-1],
        "curve": curve,
        "train_time_s": train_time,
        "eval_time_s": eval_time,
        "last_train_loss": last_loss,
        "last_cross_entropy": last_ce,
        "cache_stats": handler.last_step.metrics if handler is not None else {},
    }


def replica_divergence(model: torch.nn.Module) -> float:
    """Largest difference between ranks' copies of any parameter: 0.0 when DDP kept them in sync
    (which it does only if every gradient, the re-encoded negatives' included, was all-reduced)."""
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    copies = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(copies, flat)
    return max((c - flat).abs().max().item() for c in copies)


def summarize(args: argparse.Namespace, runs: list[dict], data: data_lib.CodeSearchData) -> dict:
    """Mean and standard deviation over seeds of the final metrics and of every point of the curve."""
    def stats(points: list[dict]) -> tuple[dict, dict]:
        keys = [k for k in points[0] if k != "step"]
        values = {k: torch.tensor([p[k] for p in points], dtype=torch.float64) for k in keys}
        std = {k: v.std().item() if len(v) > 1 else 0.0 for k, v in values.items()}
        return {"step": points[0]["step"], **{k: v.mean().item() for k, v in values.items()}}, std

    final, final_std = stats([r["final"] for r in runs])
    curve = [stats([r["curve"][i] for r in runs])[0] for i in range(len(runs[0]["curve"]))]
    return {
        "loss": args.loss,
        "seeds": args.seeds,
        "final": final,
        "final_std": final_std,
        "curve": curve,
        "train_time_s": sum(r["train_time_s"] for r in runs) / len(runs),  # per run (one seed)
        "per_seed": runs,
        "world_size": dist.get_world_size(),
        "global_batch": args.batch_size * dist.get_world_size(),
        "config": vars(args),
        "data": data.summary(),
    }


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    rank, _ = init_distributed()
    data = load_data(args, rank)
    runs = [train(args, data, seed) for seed in args.seeds]
    result = None
    if rank == 0:
        result = summarize(args, runs, data)
        result["wall_time_s"] = time.perf_counter() - t_start
        out_dir = Path(args.out) / args.loss
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.json").write_text(json.dumps(result, indent=1))
        final = "  ".join(f"{k} {v:.4f}" for k, v in result["final"].items() if k != "step")
        print(f"{args.loss} (mean of {len(runs)} seeds): {final}  -> {out_dir / 'metrics.json'}")
    # DDP and process-group handles must be gone before the group is destroyed: with torch 2.13 and
    # gloo, a reducer collected after destroy_process_group can abort the process at exit.
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
