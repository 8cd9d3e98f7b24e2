"""The comparison: trains the code-search towers with each loss, one after another, and tabulates them.

    python -m examples.code_search.compare                 # the README's main job (a few minutes, 2 CPU cores)
    python -m examples.code_search.compare --steps 20      # any other option goes to train.py

Each loss runs as ``torchrun --standalone --nproc_per_node=2 -m examples.code_search.train`` (gloo,
CPU) with the same towers, data order, steps and batch size, once per seed (default 0 1 2: the
towers' initialisation, the data order and the cache's sampling follow the seed, and the same seed
gives every loss the same initial towers and data order). Writes under ``--out``:
``results.json`` (every run's metrics.json plus launch wall times), ``results.md`` (the table),
``mrr_curve.png`` (held-out MRR@10 against steps, one line per loss) and each run's own folder
with ``metrics.json`` and TensorBoard logs (``tensorboard --logdir runs/code_search``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from . import data as data_lib
from .train import LOSSES

LABELS = {"in_batch": "in-batch negatives", "cache": "negative cache", "both": "cache + in-batch"}
COLUMNS = ("mrr@10", "recall@1", "recall@10", "recall@100")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES))
    p.add_argument("--nproc", type=int, default=2, help="ranks per run (torchrun --nproc_per_node)")
    p.add_argument("--out", default="runs/code_search")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training runs per loss")
    p.add_argument("--packages", nargs="*", default=None, help="only these stdlib packages (tests)")
    return p.parse_known_args(argv)


def engine_version() -> str:
    """The package version and, in a git checkout, the commit (with '+dirty' for local engine edits)."""
    import sharded_negcache

    version = sharded_negcache.__version__
    try:
        root = Path(sharded_negcache.__file__).resolve().parents[1]
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "sharded_negcache"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return f"{version} ({commit}{'+dirty' if dirty else ''})"
    except (OSError, subprocess.CalledProcessError):
        return version


def run_one(loss: str, args: argparse.Namespace, train_args: list[str]) -> tuple[dict, float]:
    """One torchrun launch; returns its metrics.json and the launch's wall time (start-up included)."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
        "-m", "examples.code_search.train", "--loss", loss, "--out", args.out,
        "--data-dir", str(Path(args.out) / "data"), "--seeds", *map(str, args.seeds), *train_args,
    ]
    if args.packages:
        cmd += ["--packages", *args.packages]
    print(f"\n=== {LABELS[loss]}: {' '.join(cmd[1:])}", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    launch = time.perf_counter() - t0
    metrics = json.loads((Path(args.out) / loss / "metrics.json").read_text())
    return metrics, launch


def table(results: dict[str, dict]) -> str:
    """Markdown table: one row per loss, the final held-out metrics (mean ± std over seeds) and the times."""
    lines = [
        "| loss | " + " | ".join(c.replace("recall", "R") for c in COLUMNS)
        + " | train time per run (s) | launch wall time, all seeds (s) |",
        "|---|" + "---:|" * (len(COLUMNS) + 2),
    ]
    for loss, r in results.items():
        cells = [f"{r['final'][c]:.4f} ± {r['final_std'][c]:.4f}" for c in COLUMNS]
        lines.append(f"| {LABELS[loss]} | " + " | ".join(cells) + f" | {r['train_time_s']:.1f} | {r['launch_wall_s']:.1f} |")
    return "\n".join(lines)


def per_seed_table(results: dict[str, dict]) -> str:
    """Held-out MRR@10 of every seed, to show whether the ordering holds seed by seed."""
    seeds = next(iter(results.values()))["seeds"]
    lines = ["| loss | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---:|" * len(seeds)]
    for loss, r in results.items():
        lines.append(f"| {LABELS[loss]} | " + " | ".join(f"{run['final']['mrr@10']:.4f}" for run in r["per_seed"]) + " |")
    return "\n".join(lines)


def plot(results: dict[str, dict], path: Path) -> None:
    """Held-out MRR@10 against training steps, one line per loss (mean over seeds, band: min to max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for loss, r in results.items():
        steps = [c["step"] for c in r["curve"]]
        line, = ax.plot(steps, [c["mrr@10"] for c in r["curve"]], marker="o", ms=3, label=LABELS[loss])
        if len(r["per_seed"]) > 1:
            per_seed = [[run["curve"][i]["mrr@10"] for run in r["per_seed"]] for i in range(len(steps))]
            ax.fill_between(steps, [min(v) for v in per_seed], [max(v) for v in per_seed], color=line.get_color(), alpha=0.15)
    any_run = next(iter(results.values()))
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out MRR@10")
    ax.set_title(f"code search over the Python {any_run['data']['python']} stdlib: {any_run['data']['held_out_pairs']} "
                 f"held-out functions\nglobal batch {any_run['global_batch']}, mean of seeds {any_run['seeds']} "
                 "(band: min to max)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args, train_args = parse_args(argv)
    out = Path(args.out)
    t0 = time.perf_counter()
    load_start = os.getloadavg()[0]  # wall times mean little on a busy machine: record how busy it was
    # Build (or load) the data set once, before the launches, so no rank waits on it.
    kwargs = {"packages": args.packages} if args.packages else {}
    data = data_lib.load_or_build(out / "data", **kwargs)
    print(f"data: {data.summary()['train_pairs']} train / {data.summary()['held_out_pairs']} held-out pairs, "
          f"vocabulary {len(data.vocab)} ({time.perf_counter() - t0:.1f} s)", flush=True)

    results = {}
    for loss in args.losses:
        metrics, launch = run_one(loss, args, train_args)
        metrics["launch_wall_s"] = launch
        results[loss] = metrics

    text = table(results) + "\n\nHeld-out MRR@10 per seed:\n\n" + per_seed_table(results)
    any_run = next(iter(results.values()))
    cfg = any_run["config"]
    header = (
        f"{cfg['steps']} steps, seeds {cfg['seeds']}, {args.nproc} ranks x {cfg['batch_size']} pairs "
        f"(global batch {any_run['global_batch']}), "
        f"dim {cfg['dim']}, scale {cfg['scale']}, cache {cfg['cache_size']} rows, {cfg['negatives']} negatives/query; "
        f"{any_run['data']['train_pairs']} train / {any_run['data']['held_out_pairs']} held-out pairs "
        f"(Python {any_run['data']['python']} stdlib); sharded_negcache {engine_version()}"
    )
    machine = (f"{os.cpu_count()} CPUs, 1-minute load average {load_start:.1f} at the start and "
               f"{os.getloadavg()[0]:.1f} at the end, total {time.perf_counter() - t0:.0f} s")
    header += "\n\nMachine: " + machine
    (out / "results.md").write_text(header + "\n\n" + text + "\n")
    (out / "results.json").write_text(json.dumps({"setting": header, "machine": machine, "runs": results}, indent=1))
    plot(results, out / "mrr_curve.png")
    print("\n" + header + "\n\n" + text)
    print(f"\nwrote {out / 'results.md'}, {out / 'results.json'}, {out / 'mrr_curve.png'} "
          f"(total {time.perf_counter() - t0:.0f} s)")
    return results


if __name__ == "__main__":
    main()
