"""Efficiency study: does the negative cache at small batch match large-batch in-batch negatives on transformer towers?

One ``torchrun`` launch (2 ranks, gloo, DDP) trains, one after another, every (method, seed) of the grid for
the same wall-time budget each, from scratch, on the code-search corpus (``examples/code_search/data.py``
with the installed third-party libraries), and evaluates held-out retrieval at fixed fractions of the
budget. Methods (global batch = both ranks together):

- ``mnrl_b{32,128,512}``: sentence-transformers' ``MultipleNegativesRankingLoss`` with
  ``gather_across_devices=True`` (the global batch's positives are the negatives);
- ``cmnrl_b512``: ``CachedMultipleNegativesRankingLoss`` (GradCache), mini-batches of 32, same negatives as
  ``mnrl_b512`` in less activation memory;
- ``cache_b32``: :class:`CachedNegativesRankingLoss`, a sharded negative cache, m negatives per query;
- ``cache_ib_b32``: the same with the global batch's positives as extra (exact) negatives.

The towers are one small BERT (shared by queries and code, as a SentenceTransformer), a WordPiece tokenizer
trained on the training pairs, nothing downloaded. Each step's time is split into tower forward, cache
re-encoding forward, the rest of the loss (handler: scoring, sampling, collectives; or the in-batch
softmax), and backward + optimiser. Memory per rank: the peak bytes of tensors autograd keeps for backward
(activations: what grows with the batch), measured with saved-tensor hooks, plus the cache's buffers.

Run: ``make study`` (or ``torchrun --standalone --nproc_per_node=2 -m examples.efficiency.study``);
``--tiny`` is the test-sized version. Writes ``<out>/results.json``, ``<out>/table.md`` and ``<out>/study.png``.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from examples.code_search import data as code_data  # noqa: E402
from examples.efficiency.towers import build_sentence_transformer, train_tokenizer  # noqa: E402

METHODS = ("mnrl_b32", "mnrl_b128", "mnrl_b512", "cmnrl_b512", "cache_b32", "cache_ib_b32")


@dataclass
class Settings:
    out: str = "examples/efficiency/results"
    data_dir: str = "runs/efficiency/data"
    methods: tuple[str, ...] = METHODS
    seeds: tuple[int, ...] = (0, 1, 2)
    budget_s: float = 120.0  # training wall time per run (evaluation excluded)
    eval_fractions: tuple[float, ...] = (1 / 3, 2 / 3, 1.0)
    eval_pairs: int = 1000  # held-out queries, each retrieved among the same number of held-out functions
    layers: int = 2
    hidden: int = 64
    heads: int = 4
    max_length: int = 64
    vocab_size: int = 4000
    lr: float = 5e-4
    warmup_steps: int = 20
    scale: float = 20.0
    cache_size: int = 4096
    num_negatives: int = 2
    cmnrl_mini_batch: int = 32
    libraries: bool = True
    packages: tuple[str, ...] | None = None  # stdlib packages only (tiny runs)


@dataclass
class RunResult:
    method: str
    seed: int
    global_batch: int
    steps: int = 0
    train_s: float = 0.0
    evals: list[dict] = field(default_factory=list)
    split_s: dict[str, float] = field(default_factory=dict)
    activation_peak_mb: float = 0.0  # per rank, max over ranks
    cache_mb: float = 0.0  # per rank
    final: dict = field(default_factory=dict)


# ---- memory: bytes autograd keeps for backward ----------------------------------------------------
class _Held:
    """A saved tensor and its size; its finaliser tells the meter when autograd let go of it."""

    __slots__ = ("tensor", "size", "meter")

    def __init__(self, tensor: torch.Tensor, meter: "SavedTensorMeter") -> None:
        self.tensor, self.size, self.meter = tensor, tensor.numel() * tensor.element_size(), meter
        meter.alive += self.size
        meter.record_peak()

    def __del__(self) -> None:
        self.meter.alive -= self.size


class SavedTensorMeter:
    """Peak bytes of tensors saved for backward (activations), tracked while alive via pack/unpack hooks.

    The peak is per step: the largest rise of the saved bytes above what was alive when the step's
    :meth:`hooks` context opened.
    """

    def __init__(self) -> None:
        self.alive = 0
        self.peak = 0  # the largest rise of ``alive`` within one step (see :meth:`hooks`)
        self._base = 0

    def _pack(self, t: torch.Tensor) -> _Held:
        return _Held(t, self)

    def record_peak(self) -> None:
        """Raises ``peak`` to the saved bytes alive now above the step's start (called as each tensor is saved)."""
        self.peak = max(self.peak, self.alive - self._base)

    @staticmethod
    def _unpack(held: _Held) -> torch.Tensor:
        return held.tensor

    def hooks(self):
        """One step's context: the peak is measured from what was alive when it opened, so tensors that some
        library keeps past its step (measured: ~15 small [batch, width] tensors a step with
        sentence-transformers' MNRL) do not accumulate into later steps' peaks."""
        self._base = self.alive
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)


# ---- timing -------------------------------------------------------------------------------------
class Split:
    """Accumulated seconds per part of the step."""

    def __init__(self) -> None:
        self.s: dict[str, float] = {}
        self.active: set[str] = set()

    @contextlib.contextmanager
    def time(self, name: str):
        t = time.perf_counter()
        self.active.add(name)
        try:
            yield
        finally:
            self.active.discard(name)
            self.s[name] = self.s.get(name, 0.0) + time.perf_counter() - t


def _timed_model(model, split: Split, name: str):
    """A callable that runs ``model`` and books its time under ``name`` (towers' forward).

    A forward run inside backward (GradCache's re-forward) stays booked under backward.
    """

    class Timed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = model

        def forward(self, features):
            if "backward_opt" in split.active:
                return self.module(features)
            with split.time(name):
                return self.module(features)

    return Timed()


def instrument(loss_fn, ddp, split: Split, model_wrapper=None) -> None:
    """Makes ``loss_fn`` call ``ddp`` (as the trainer swaps in its DDP wrapper) with its towers' forward booked
    under ``tower_fwd`` and the cache's re-encoding under ``reencode_fwd``; ``model_wrapper`` (if given) wraps
    the timed model once more (e.g. to count tokens)."""
    timed = _timed_model(ddp, split, "tower_fwd")
    loss_fn.model = model_wrapper(timed) if model_wrapper is not None else timed
    plain = getattr(loss_fn, "encode_rows", None)  # the cache's tower: its re-encoding booked apart from the batch's
    if plain is not None:

        def reencode(rows, _plain=plain, **kwargs):
            with split.time("reencode_fwd"):
                before = split.s.get("tower_fwd", 0.0)
                out = _plain(rows, **kwargs)
                split.s["tower_fwd"] = before  # the inner tower call belongs to re-encoding
            return out

        loss_fn.encode_rows = reencode


# ---- data ---------------------------------------------------------------------------------------
def load_corpus(st: Settings):
    kwargs = dict(libraries=code_data.LIBRARIES) if st.libraries else {}
    if st.packages is not None:
        kwargs["packages"] = list(st.packages)
    return code_data.load_or_build(st.data_dir, **kwargs)


def eval_subset(held_out, n: int):
    rng = random.Random(1234)
    idx = sorted(rng.sample(range(len(held_out)), min(n, len(held_out))))
    return [held_out[i].query for i in idx], [held_out[i].code for i in idx]


@torch.no_grad()
def evaluate(model, queries: list[str], docs: list[str], rank: int, world: int, batch: int = 128,
             per_query: bool = False) -> dict:
    """Exact retrieval of each held-out query among the held-out functions: MRR@10, Recall@1/10 (all ranks);
    ``per_query`` adds each query's reciprocal rank (``rr@10``, for paired comparisons)."""
    model.eval()

    def encode(texts):
        per = math.ceil(len(texts) / world)
        mine = texts[rank * per : (rank + 1) * per]
        parts = [F.normalize(model(dict(model.preprocess(mine[i : i + batch])))["sentence_embedding"], dim=-1)
                 for i in range(0, len(mine), batch)]
        local = torch.cat(parts) if parts else torch.zeros(0, model.get_embedding_dimension())
        padded = torch.zeros(per, local.shape[1])
        padded[: len(local)] = local
        gathered = [torch.zeros_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded)
        return torch.cat(gathered)[: len(texts)]

    q, d = encode(queries), encode(docs)
    model.train()
    return retrieval_metrics(q @ d.t(), per_query)


def retrieval_metrics(scores: torch.Tensor, per_query: bool = False) -> dict:
    """MRR@10, Recall@1, Recall@10 when query i's right document is column i (ties count against it);
    ``per_query`` adds the list of each query's reciprocal rank cut at 10 (``rr@10``)."""
    rank_of_true = (scores >= scores.diagonal()[:, None]).sum(1) - 1  # 0 = first
    rr = torch.where(rank_of_true < 10, 1.0 / (rank_of_true + 1).double(), 0.0)
    out = {"mrr@10": float(rr.mean()), "recall@1": float((rank_of_true < 1).double().mean()),
           "recall@10": float((rank_of_true < 10).double().mean())}
    if per_query:
        out["rr@10"] = rr.tolist()
    return out


# ---- one run ------------------------------------------------------------------------------------
def make_loss(method: str, model, st: Settings, seed: int):
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        MultipleNegativesRankingLoss,
    )

    from sharded_negcache.integrations.sentence_transformers import CachedNegativesRankingLoss

    if method.startswith("mnrl"):
        return MultipleNegativesRankingLoss(model, scale=st.scale, gather_across_devices=True)
    if method.startswith("cmnrl"):
        return CachedMultipleNegativesRankingLoss(model, scale=st.scale, mini_batch_size=st.cmnrl_mini_batch,
                                                  gather_across_devices=True)
    return CachedNegativesRankingLoss(model, scale=st.scale, cache_size=st.cache_size,
                                      num_negatives=st.num_negatives, in_batch_negatives="_ib_" in method, seed=seed)


def global_batch(method: str) -> int:
    return int(method.rsplit("_b", 1)[1])


def run_one(method: str, seed: int, st: Settings, tokenizer, train_pairs, evalset, rank: int, world: int,
            workdir: str) -> RunResult:
    from torch.nn.parallel import DistributedDataParallel

    gb = global_batch(method)
    per_rank = gb // world
    if gb > len(train_pairs) or gb % world:
        raise ValueError(f"{method}: global batch {gb} must divide by {world} ranks and fit {len(train_pairs)} pairs")
    model = build_sentence_transformer(tokenizer, os.path.join(workdir, f"model-r{rank}"), layers=st.layers,
                                       hidden=st.hidden, heads=st.heads, max_length=st.max_length, seed=seed)
    split = Split()
    ddp = DistributedDataParallel(model, find_unused_parameters=True)  # the BERT pooler is unused
    loss_fn = make_loss(method, model, st, seed)
    instrument(loss_fn, ddp, split)
    opt = torch.optim.AdamW(model.parameters(), lr=st.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / st.warmup_steps))
    meter = SavedTensorMeter()
    result = RunResult(method, seed, gb)
    order = list(range(len(train_pairs)))
    random.Random(seed).shuffle(order)
    pos = 0
    eval_at = [f * st.budget_s for f in st.eval_fractions]
    train_s = 0.0
    torch.manual_seed(seed)
    while True:
        if pos + gb > len(order):
            random.Random(seed + pos).shuffle(order)
            pos = 0
        idx = order[pos + rank * per_rank : pos + (rank + 1) * per_rank]
        pos += gb
        anchors = [train_pairs[i].query for i in idx]
        docs = [train_pairs[i].code for i in idx]
        t0 = time.perf_counter()
        with split.time("tokenize"):
            feats = [dict(model.preprocess(anchors)), dict(model.preprocess(docs))]
        with meter.hooks():
            with split.time("loss_total"):
                loss = loss_fn(feats, None)
            with split.time("backward_opt"):
                loss.backward()
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
        result.steps += 1
        train_s += time.perf_counter() - t0
        # rank 0's clock decides, so both ranks stop after the same step
        flag = torch.tensor([train_s], dtype=torch.float64)
        dist.broadcast(flag, 0)
        elapsed = float(flag)
        while eval_at and elapsed >= eval_at[0]:
            eval_at.pop(0)
            metrics = evaluate(model, *evalset, rank, world)
            result.evals.append({"train_s": elapsed, "steps": result.steps, **metrics})
        if not eval_at:
            break
    result.train_s = elapsed
    s = split.s
    reenc = s.get("reencode_fwd", 0.0)
    result.split_s = {
        "tower_fwd": s.get("tower_fwd", 0.0),
        "reencode_fwd": reenc,
        "loss_rest": s.get("loss_total", 0.0) - s.get("tower_fwd", 0.0) - reenc,
        "backward_opt": s.get("backward_opt", 0.0),
        "tokenize": s.get("tokenize", 0.0),
    }
    peak = torch.tensor([meter.peak / 2**20], dtype=torch.float64)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    result.activation_peak_mb = float(peak)
    handler = getattr(loss_fn, "handler", None)
    if handler is not None:
        result.cache_mb = cache_megabytes(handler)
    result.final = result.evals[-1] if result.evals else {}
    del ddp, loss_fn, opt
    return result


def cache_megabytes(handler) -> float:
    """MiB of this rank's cache: the handler's buffers and its row store's (embeddings, ages, cached fields)."""
    tensors = {id(t): t for module in (handler, getattr(handler, "store", None)) if module is not None
               for t in module.buffers()}
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20


# ---- report -------------------------------------------------------------------------------------
def summarise(results: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds per method."""
    rows = []
    for method in dict.fromkeys(r["method"] for r in results):
        rs = [r for r in results if r["method"] == method]

        def stat(values):
            t = torch.tensor(values, dtype=torch.float64)
            return float(t.mean()), float(t.std()) if len(values) > 1 else 0.0

        row = {"method": method, "global_batch": rs[0]["global_batch"], "seeds": len(rs)}
        for key in ("mrr@10", "recall@1", "recall@10"):
            row[key] = stat([r["final"][key] for r in rs])
        row["steps"] = stat([r["steps"] for r in rs])
        row["train_s"] = stat([r["train_s"] for r in rs])
        row["step_ms"] = stat([1000 * r["train_s"] / max(r["steps"], 1) for r in rs])
        row["activation_peak_mb"] = stat([r["activation_peak_mb"] for r in rs])
        row["cache_mb"] = rs[0]["cache_mb"]
        total = {k: sum(r["split_s"][k] for r in rs) for k in rs[0]["split_s"]}
        whole = sum(total.values()) or 1.0
        row["split_pct"] = {k: 100 * v / whole for k, v in total.items()}
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    head = ("| method | global batch | MRR@10 | R@1 | R@10 | steps | ms/step | activations MB/rank | cache MB/rank "
            "| split: tower fwd / re-encode / loss+handler / bwd+opt / tokenize (%) |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        sp = r["split_pct"]
        lines.append(
            f"| {r['method']} | {r['global_batch']} | {r['mrr@10'][0]:.3f} ± {r['mrr@10'][1]:.3f} "
            f"| {r['recall@1'][0]:.3f} | {r['recall@10'][0]:.3f} | {r['steps'][0]:.0f} | {r['step_ms'][0]:.0f} "
            f"| {r['activation_peak_mb'][0]:.0f} | {r['cache_mb']:.1f} "
            f"| {sp['tower_fwd']:.0f} / {sp['reencode_fwd']:.0f} / {sp['loss_rest']:.0f} / {sp['backward_opt']:.0f} "
            f"/ {sp['tokenize']:.0f} |"
        )
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    """Held-out MRR@10 and Recall@10 against training wall time, and MRR@10 against steps (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for method in dict.fromkeys(r["method"] for r in results):
        rs = [r for r in results if r["method"] == method]
        n = min(len(r["evals"]) for r in rs)

        def mean(key, i):
            return sum(r["evals"][i][key] for r in rs) / len(rs)

        xs = [mean("train_s", i) for i in range(n)]
        axes[0].plot(xs, [mean("mrr@10", i) for i in range(n)], marker="o", label=method)
        axes[1].plot(xs, [mean("recall@10", i) for i in range(n)], marker="o", label=method)
        axes[2].plot([mean("steps", i) for i in range(n)], [mean("mrr@10", i) for i in range(n)], marker="o", label=method)
    for ax, (x, y) in zip(axes, (("training wall time per run (s)", "MRR@10"),
                                  ("training wall time per run (s)", "Recall@10"), ("optimizer steps", "MRR@10"))):
        ax.set_xlabel(x + ", 2 ranks")
        ax.set_ylabel(f"held-out {y} (mean over seeds)")
        ax.grid(alpha=0.3)
    axes[2].set_xscale("log")
    axes[2].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[2].xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axes[2].set_xticks([20, 50, 100, 200, 500, 1000])
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=Settings.out)
    parser.add_argument("--budget", type=float, default=Settings.budget_s, help="training seconds per run")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="keep <out>/results.json's runs, do only the missing ones")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--tiny", action="store_true", help="test size: stdlib json/csv corpus, tiny towers")
    parser.add_argument("--replot", action="store_true", help="only redraw table.md and study.png from <out>/results.json")
    args = parser.parse_args(argv)
    if args.replot:
        blob = json.loads((Path(args.out) / "results.json").read_text())
        (Path(args.out) / "table.md").write_text(table(summarise(blob["runs"])) + "\n")
        plot(blob["runs"], Path(args.out) / "study.png")
        return
    st = Settings(out=args.out, budget_s=args.budget, seeds=tuple(range(args.first_seed, args.first_seed + args.seeds)),
                  methods=tuple(args.methods.split(",")))
    if args.tiny:
        st.libraries, st.packages = False, ("json", "csv", "textwrap", "argparse", "email")
        st.data_dir = os.path.join(args.out, "data")
        st.eval_pairs, st.hidden, st.heads, st.layers, st.max_length, st.vocab_size = 64, 32, 2, 1, 32, 500
        st.cache_size, st.eval_fractions = 256, (0.5, 1.0)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(st.out)
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        corpus = load_corpus(st)  # built once (minutes with the libraries), then loaded from data_dir
    dist.barrier()
    corpus = load_corpus(st) if rank else corpus
    train_pairs = corpus.train
    evalset = eval_subset(corpus.held_out, st.eval_pairs)
    workdir = os.path.join(st.data_dir, "towers")
    tok_dir = os.path.join(workdir, f"tokenizer-{st.vocab_size}")
    if rank == 0:  # trained once, loaded by the other ranks: every rank holds the same vocabulary
        train_tokenizer((t for p in train_pairs for t in (p.query, p.code)), vocab_size=st.vocab_size).save_pretrained(tok_dir)
    dist.barrier()
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    results: list[dict] = []
    if args.resume and (out / "results.json").exists():
        results = json.loads((out / "results.json").read_text())["runs"]
    done = {(r["method"], r["seed"]) for r in results}
    started = time.time()
    for seed in st.seeds:
        for method in st.methods:
            if (method, seed) in done:
                continue
            gc.collect()
            r = run_one(method, seed, st, tokenizer, train_pairs, evalset, rank, world, workdir)
            results.append(asdict(r))
            if rank == 0:
                print(json.dumps({"method": method, "seed": seed, "steps": r.steps, **r.final,
                                  "activation_mb": round(r.activation_peak_mb, 1)}), flush=True)
                _write(out, st, corpus, results, started, world)
    dist.barrier()
    dist.destroy_process_group()


def _write(out: Path, st: Settings, corpus, results: list[dict], started: float, world: int) -> None:
    rows = summarise(results)
    summary = corpus.summary()
    blob = {
        "settings": asdict(st),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "world_size": world,
                    "torch": torch.__version__, "threads_per_rank": torch.get_num_threads(),
                    "load_average_at_end": os.getloadavg()},
        "corpus": {k: summary[k] for k in ("train_pairs", "held_out_pairs", "train_modules", "held_out_modules",
                                           "libraries", "train_pairs_by_package") if k in summary},
        "wall_s": time.time() - started,
        "summary": rows,
        "runs": results,
    }
    (out / "results.json").write_text(json.dumps(blob, indent=1))
    (out / "table.md").write_text(table(rows) + "\n")
    plot(results, out / "study.png")


if __name__ == "__main__":
    main(sys.argv[1:])
