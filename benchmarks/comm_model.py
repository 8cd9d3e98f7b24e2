"""A communication model of the sharded step, calibrated on the measured run, predicting W = 8 ... 1024.

Inputs measured by ``bench_scaling.py`` (``results/scaling.json``):

* ``t_pair``: per-rank scoring seconds per (query, cached row) pair = scoring time / (queries scored x
  rows per rank), from the sharded runs that are not oversubscribed (W <= 2). The engine's scoring time
  is its ``negcache/score`` profiler range (``split_s``: wall time on the rank's one thread, which other
  jobs on a shared machine can inflate); results written before the split came from the ranges carry a
  CPU-time split (``cpu_split_s``), which is used where present;
* the local non-scoring time per step (fetch, re-encode, write-back, other) of the sharded W=2 run;
* bytes per rank per step of each collective (the engine's ``Comm`` tags), divided by the protocol's
  formula (``_common.protocol_bytes``) at the same W and batch: the *calibration factor* of each tag
  (1.0 for the deterministic tags; slightly under 1 for the row traffic, because of duplicate samples).

Stated interconnect: bandwidth ``BW`` per rank and latency ``alpha`` per message. Collective cost:
all-gather and all-to-all ``(W-1)*alpha + bytes_sent/BW`` (ring / pairwise exchange); all-reduce
``2(W-1)*alpha + 2(W-1)/W * bytes/BW``. The engine issues 8 collectives per step (agree, gather
queries, partials, row counts, row ids, row fetch, write-back, stats); no overlap with compute assumed.

Scenarios (every rank holds ``n`` rows; ``B`` queries per rank; ``B_g`` = global batch):

* ``weak_fixed_global_batch``: n fixed, B_g fixed (B = B_g / W): the cache grows with W at constant
  scoring work per rank (B_g x n); only latency terms grow with W.
* ``dp_fixed_cache``: data-parallel batch (B fixed, B_g = W*B) and a fixed global cache N (n = N/W):
  scoring per rank B*N is constant, the all-gather of queries grows as (W-1)*B*d: this is where it
  becomes the limit, at W* ~ N * t_pair * BW / (d * s) (s = bytes per query element).
* ``dp_weak``: data-parallel batch and n fixed: every term, scoring included, grows as W (each rank
  scores all W*B queries against its n rows).

Profiles: ``cpu`` (this machine, measured: d and t_pair from the run) and ``gpu`` (d=768, bf16 rows, 8M
rows per rank; t_pair from ``results/gpu_check.json`` when it exists, else an *assumed* 40 TFLOP/s
effective scoring rate, stated in the output).

Two-level layout (``shard_group_size=G``, issue 14), ``dp_weak`` with G = 8, 64 and W (flat): the
protocol runs inside a group of G ranks (scoring ``G*B*n`` pairs; queries, partials and rows over G
ranks), only the agreement all-gather and the statistics all-reduce span all W ranks. Written to
``comm_model.json`` (``two_level``) and ``comm_model_two_level.png`` (per-rank step and bytes vs W).

Usage: ``.venv/bin/python benchmarks/comm_model.py [results/scaling.json] --bandwidth-gbs 25 --latency-us 5``
(also called at the end of ``bench_scaling.py``). Writes ``comm_model.json`` and ``comm_model.png``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from _common import RESULTS_DIR, median, protocol_bytes, size_label, table, write_json

WORLDS = [8, 16, 32, 64, 128, 256, 512, 1024]
ALL_GATHER = ("agree", "gather_queries")
ALL_TO_ALL = ("partials", "row_counts", "row_ids", "row_fetch", "write_back")
ALL_REDUCE = ("stats",)
GROUP_SIZES = (8, 64)  # the two-level layouts modelled, next to the flat one (G = W)
OUTER_TAGS = ("agree", "stats")  # the collectives that span all W ranks in the two-level layout
GPU_ASSUMED_FLOPS = 40e12  # effective fp32 scoring rate incl. the softmax passes (assumption, not measured)


def collective_seconds(tag: str, nbytes: float, world: int, bw: float, alpha: float) -> float:
    if world <= 1:
        return 0.0
    if tag in ALL_REDUCE:
        return 2 * (world - 1) * alpha + 2 * (world - 1) / world * nbytes / bw
    return (world - 1) * alpha + nbytes / bw


def calibrate(res: dict) -> dict[str, Any]:
    """t_pair, local time and per-tag byte calibration factors from a bench_scaling result."""
    cfg = res["config"]
    sharded = [r for r in res["rows"] if r["design"] == "sharded"]
    pts = [(cfg["global_batch"] * (r["cache_rows"] // r["world"]), cfg["global_batch"], _split(r)["scoring"])
           for r in sharded if r["world"] <= 2]
    t_pair, t_query = _fit_scoring(pts)
    pairs = [t / x for x, _, t in pts]
    ref = next((r for r in sharded if r["experiment"] == "weak" and r["world"] == 2), None)
    local_keys = ("fetch", "reencode", "writeback", "other")
    local = sum(_split(ref)[k] for k in local_keys) if ref else 0.0
    local_split = {k: _split(ref)[k] for k in local_keys} if ref else {}
    # byte calibration: the largest-W sharded run that has engine counters
    cands = [r for r in sharded if r["world"] > 1 and r.get("comm_tags_per_rank")]
    factors: dict[str, float] = {}
    row_bytes = None
    if cands:
        ref_b = max(cands, key=lambda r: (r["world"], r["experiment"] == "weak"))
        w, b = ref_b["world"], ref_b["batch_per_rank"]
        per = [p for p in res["per_rank"] if p["experiment"] == ref_b["experiment"] and p["design"] == "sharded"
               and p["world"] == w and p["cache_rows"] == ref_b["cache_rows"]]
        row_bytes = cfg["feat"] * 4 + cfg["dim"] * 4 + 8  # fp32 codec, one float feature field, int64 age
        formula = protocol_bytes(w, b, cfg["draws"], cfg["dim"], row_bytes)
        for tag, want in formula.items():
            got = ref_b["comm_tags_per_rank"].get(tag, 0.0)
            factors[tag] = got / want if want else 1.0
        calib_from = {"experiment": ref_b["experiment"], "world": w, "batch_per_rank": b,
                      "ranks": len(per), "measured": ref_b["comm_tags_per_rank"], "formula": formula}
    else:
        calib_from = None
    return {"t_pair_s": t_pair, "t_query_s": t_query, "t_pair_samples": pairs, "local_s": local, "local_split_s": local_split,
            "byte_factors": factors, "calibrated_on": calib_from, "row_bytes_cpu": row_bytes}


def _split(row: dict) -> dict[str, float]:
    """A row's per-step split: CPU time where the run has it, else the engine's profiler ranges (wall)."""
    return row.get("cpu_split_s") or row["split_s"]


def _fit_scoring(pts: list[tuple[float, float, float]]) -> tuple[float, float]:
    """Least squares ``t = t_pair * (queries x rows) + t_query * queries`` over (pairs, queries, seconds).

    The per-query term is the work that does not grow with the shard (stage 2 picking each draw's row
    from the winning block's scores the scan already holds, design §9; the Gumbel keys). Falls back to a
    pure per-pair rate when the fit is degenerate.
    """
    if not pts:
        return float("nan"), 0.0
    sxx = sum(x * x for x, _, _ in pts)
    syy = sum(y * y for _, y, _ in pts)
    sxy = sum(x * y for x, y, _ in pts)
    sxt = sum(x * t for x, _, t in pts)
    syt = sum(y * t for _, y, t in pts)
    det = sxx * syy - sxy * sxy
    if len({x for x, _, _ in pts}) >= 2 and det > 0:
        a = (sxt * syy - syt * sxy) / det
        c = (sxx * syt - sxy * sxt) / det
        if a > 0 and c >= 0:
            return a, c
    return median([t / x for x, _, t in pts]), 0.0


def gpu_profile(gpu_json: Path | None) -> dict[str, Any]:
    d = 768
    prof = {"dim": d, "rows_per_rank": 8 << 20, "row_bytes": d * 2 + 16 * 4 + 8, "query_bytes": 4,
            "t_pair_s": 2 * d / GPU_ASSUMED_FLOPS, "source": f"assumed {GPU_ASSUMED_FLOPS / 1e12:.0f} TFLOP/s"}
    if gpu_json and gpu_json.exists():
        try:
            g = json.loads(gpu_json.read_text())
            best = min((r for r in g.get("bench", []) if r.get("handler_s")),
                       key=lambda r: r["handler_s"] / (r["batch"] * r["rows"]))
            prof.update(dim=best["dim"], rows_per_rank=best["rows"],
                        t_pair_s=best["handler_s"] / (best["batch"] * best["rows"]),
                        source=f"measured by gpu_check ({g.get('device', 'gpu')}), whole handler step")
        except (ValueError, KeyError, TypeError):
            pass
    return prof


def predict(world: int, batch: int, n: int, dim: int, draws: int, row_bytes: int, t_pair: float,
            local: float, factors: dict[str, float], bw: float, alpha: float, query_bytes: int = 4,
            t_query: float = 0.0) -> dict:
    """Per-rank step time and its parts for one W (every rank: ``batch`` queries, ``n`` rows)."""
    nbytes = protocol_bytes(world, batch, draws, dim, row_bytes, query_bytes=query_bytes)
    nbytes = {k: v * factors.get(k, 1.0) for k, v in nbytes.items()}
    comm = {k: collective_seconds(k, v, world, bw, alpha) for k, v in nbytes.items()}
    scoring = world * batch * (n * t_pair + t_query)
    total = scoring + local + sum(comm.values())
    return {"world": world, "batch_per_rank": batch, "global_batch": world * batch, "rows_per_rank": n,
            "scoring_s": scoring, "local_s": local, "comm_s": comm, "comm_total_s": sum(comm.values()),
            "gather_queries_s": comm["gather_queries"], "latency_s": sum(
                (2 if k in ALL_REDUCE else 1) * (world - 1) * alpha for k in comm),
            "bytes_per_rank": sum(nbytes.values()), "bytes_by_tag": nbytes, "step_s": total}


def predict_two_level(world: int, group: int, batch: int, n: int, dim: int, draws: int, row_bytes: int,
                      t_pair: float, local: float, factors: dict[str, float], bw: float, alpha: float,
                      query_bytes: int = 4, t_query: float = 0.0) -> dict:
    """Per-rank step of the two-level layout: :func:`predict` for a world of ``group`` ranks, with the
    agreement and statistics collectives over all ``world`` ranks. ``group == world`` is the flat layout."""
    p = predict(group, batch, n, dim, draws, row_bytes, t_pair, local, factors, bw, alpha, query_bytes, t_query)
    outer = protocol_bytes(world, batch, draws, dim, row_bytes, query_bytes=query_bytes)
    for tag in OUTER_TAGS:
        p["bytes_by_tag"][tag] = outer[tag] * factors.get(tag, 1.0)
        p["comm_s"][tag] = collective_seconds(tag, p["bytes_by_tag"][tag], world, bw, alpha)
    p["latency_s"] = sum((2 if k in ALL_REDUCE else 1) * ((world if k in OUTER_TAGS else group) - 1) * alpha
                         for k in p["comm_s"])
    p["comm_total_s"] = sum(p["comm_s"].values())
    p["bytes_per_rank"] = sum(p["bytes_by_tag"].values())
    p["step_s"] = p["scoring_s"] + p["local_s"] + p["comm_total_s"]
    p.update(world=world, group_size=group, global_batch=world * batch, rows_per_group=group * n)
    return p


def two_level_points(prof: dict, draws: int, factors: dict[str, float], bw: float, alpha: float,
                     batch: int) -> dict[str, list[dict]]:
    """dp_weak (``batch`` queries and ``rows_per_rank`` rows per rank) for G = 8, 64 (W >= G) and flat."""
    args = (prof["dim"], draws, prof["row_bytes"], prof["t_pair_s"], prof["local_s"], factors, bw, alpha,
            prof["query_bytes"], prof["t_query_s"])
    n = prof["rows_per_rank"]
    out = {f"G={g}": [predict_two_level(w, g, batch, n, *args) for w in WORLDS if w >= g] for g in GROUP_SIZES}
    out["flat (G=W)"] = [predict_two_level(w, w, batch, n, *args) for w in WORLDS]
    return out


def alternatives(world: int, batch: int, n: int, dim: int, draws: int, row_bytes: int, bw: float,
                 alpha: float, feat_bytes: int) -> dict:
    """Bytes and wire seconds per rank per step of the two alternatives (same batch and cache)."""
    w1 = world - 1
    gather_bytes = w1 * n * (row_bytes + 1)  # whole cache: rows + filled flag
    repl_bytes = w1 * (batch * draws * (8 + 4 * dim) + batch * (4 * dim + feat_bytes) + 16)
    return {
        "gather_bytes": gather_bytes, "gather_s": 4 * w1 * alpha + gather_bytes / bw,
        "replicated_bytes": repl_bytes, "replicated_s": 6 * w1 * alpha + repl_bytes / bw,
        "replicated_rows_per_rank": n * world,
    }


def crossover(points: list[dict], key: str = "gather_queries_s") -> int | None:
    """Smallest W at which the given communication term is at least the scoring time."""
    for p in points:
        if p[key] >= p["scoring_s"]:
            return p["world"]
    return None


def run(res: dict, bandwidth_gbs: float = 25.0, latency_us: float = 5.0, out_dir: Path = RESULTS_DIR,
        gpu_json: Path | None = None, verbose: bool = True) -> dict:
    cfg = res["config"]
    cal = calibrate(res)
    bw, alpha = bandwidth_gbs * 1e9, latency_us * 1e-6
    gpu_json = gpu_json or (out_dir / "gpu_check.json")
    profiles = {
        "cpu": {"dim": cfg["dim"], "rows_per_rank": cfg["weak_rows"], "row_bytes": cal["row_bytes_cpu"] or
                cfg["feat"] * 4 + cfg["dim"] * 4 + 8, "query_bytes": 4, "t_pair_s": cal["t_pair_s"],
                "t_query_s": cal["t_query_s"],
                "local_s": cal["local_s"], "source": "measured on this machine (1 thread per rank)"},
        "gpu": {**gpu_profile(gpu_json), "local_s": 0.0, "t_query_s": 0.0},
    }
    draws, feat_bytes = cfg["draws"], cfg["feat"] * 4
    b_dp = 512
    out: dict[str, Any] = {"bandwidth_gbs": bandwidth_gbs, "latency_us": latency_us, "calibration": cal,
                           "profiles": profiles, "scenarios": {}}
    for pname, prof in profiles.items():
        d, n, rb, t, loc = prof["dim"], prof["rows_per_rank"], prof["row_bytes"], prof["t_pair_s"], prof["local_s"]
        tq = prof["t_query_s"]
        n_total = n * 16  # fixed global cache of the dp_fixed_cache scenario: 16 ranks' worth
        bg = 8192  # fixed global batch of the weak scenario (>= W up to 8192 ranks)
        sc = {
            "weak_fixed_global_batch": [
                {**predict(w, max(bg // w, 1), n, d, draws, rb, t, loc, cal["byte_factors"], bw, alpha,
                           prof["query_bytes"], tq),
                 **alternatives(w, max(bg // w, 1), n, d, draws, rb, bw, alpha, feat_bytes)} for w in WORLDS],
            "dp_fixed_cache": [
                predict(w, b_dp, max(n_total // w, 1), d, draws, rb, t, loc, cal["byte_factors"], bw, alpha,
                        prof["query_bytes"], tq) for w in WORLDS],
            "dp_weak": [
                predict(w, b_dp, n, d, draws, rb, t, loc, cal["byte_factors"], bw, alpha, prof["query_bytes"], tq)
                for w in WORLDS],
        }
        # analytic crossover of the query all-gather in dp_fixed_cache:
        # (W-1)(alpha + B d s / BW) = B N t_pair  ->  W* = 1 + B N t / (alpha + B d s / BW)
        w_star = 1 + b_dp * n_total * t / (alpha + b_dp * d * prof["query_bytes"] / bw)
        n_star = (alpha / b_dp + d * prof["query_bytes"] / bw) / t  # rows per rank below which it dominates
        out["scenarios"][pname] = {
            "params": {"rows_per_rank": n, "fixed_global_cache": n_total, "fixed_global_batch": bg,
                       "dp_batch_per_rank": b_dp, "dim": d, "t_pair_s": t, "t_query_s": tq, "local_s": loc},
            "points": sc,
            "query_gather_limit": {
                "dp_fixed_cache_W_star": w_star,
                "rows_per_rank_below_which_query_gather_dominates": n_star,
                "first_W_gather_ge_scoring": {k: crossover(v) for k, v in sc.items()},
                "first_W_comm_ge_scoring": {k: crossover(v, "comm_total_s") for k, v in sc.items()},
            },
        }
    out["two_level"] = {pname: two_level_points(prof, draws, cal["byte_factors"], bw, alpha, b_dp)
                        for pname, prof in profiles.items()}
    write_json(out_dir / "comm_model.json", out)
    plot(out, out_dir / "comm_model.png")
    plot_two_level(out, out_dir / "comm_model_two_level.png")
    if verbose:
        print(summary_text(out))
        print(two_level_text(out))
    return out


def summary_text(model: dict) -> str:
    lines = [f"Communication model: BW = {model['bandwidth_gbs']:g} GB/s per rank, latency = "
             f"{model['latency_us']:g} us per message, 8 collectives per step, no overlap."]
    cal = model["calibration"]
    lines.append("byte calibration (measured / formula): " + ", ".join(
        f"{k}={v:.3f}" for k, v in cal["byte_factors"].items()))
    for pname, s in model["scenarios"].items():
        prof = model["profiles"][pname]
        p = s["params"]
        lines.append("")
        lines.append(f"[{pname}] d={p['dim']}, scoring = {p['t_pair_s'] * 1e12:.3g} ps per (query,row) + "
                     f"{p['t_query_s'] * 1e6:.3g} us per query ({prof['source']}), local non-scoring "
                     f"{1e3 * p['local_s']:.3g} ms")
        rows = []
        for name, pts in s["points"].items():
            for q in pts:
                if q["world"] not in (8, 64, 256, 1024):
                    continue
                rows.append({"scenario": name, "W": q["world"], "B/rank": q["batch_per_rank"],
                             "rows/rank": size_label(q["rows_per_rank"]) if q["rows_per_rank"] >= 1024 else
                             q["rows_per_rank"], "scoring_ms": 1e3 * q["scoring_s"],
                             "gather_q_ms": 1e3 * q["gather_queries_s"], "comm_ms": 1e3 * q["comm_total_s"],
                             "latency_ms": 1e3 * q["latency_s"], "step_ms": 1e3 * q["step_s"],
                             "MiB/rank": q["bytes_per_rank"] / 2**20,
                             "gather_all_GiB": q.get("gather_bytes", float("nan")) / 2**30})
        lines.append(table(rows, list(rows[0])))
        lim = s["query_gather_limit"]
        lines.append(
            f"query all-gather >= scoring: dp_fixed_cache (N={size_label(p['fixed_global_cache'])}, "
            f"B={p['dp_batch_per_rank']}/rank) from W* ~ {lim['dp_fixed_cache_W_star']:.3g}; in general once a "
            f"rank holds fewer than ~{lim['rows_per_rank_below_which_query_gather_dominates']:.3g} rows. "
            f"First W in 8..1024 with gather >= scoring: {lim['first_W_gather_ge_scoring']}; "
            f"with all comm >= scoring: {lim['first_W_comm_ge_scoring']}")
    return "\n".join(lines)


def two_level_text(model: dict) -> str:
    lines = ["", "Two-level layout (dp_weak: 512 queries and the profile's rows per rank; G ranks share one cache):"]
    for pname, layouts in model["two_level"].items():
        rows = [{"profile": pname, "layout": name, "W": q["world"], "G": q["group_size"],
                 "rows/group": size_label(q["rows_per_group"]), "scoring_ms": 1e3 * q["scoring_s"],
                 "comm_ms": 1e3 * q["comm_total_s"], "step_ms": 1e3 * q["step_s"],
                 "MiB/rank": q["bytes_per_rank"] / 2**20}
                for name, pts in layouts.items() for q in pts if q["world"] in (8, 64, 256, 1024)]
        lines.append(table(rows, list(rows[0])))
    return "\n".join(lines)


def plot_two_level(model: dict, path: Path) -> None:
    """Per-rank step time and bytes vs W for G = 8, 64 and the flat layout, both profiles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5), sharex=True)
    for col, (pname, layouts) in enumerate(model["two_level"].items()):
        prof = model["profiles"][pname]
        for color, (name, pts) in zip(("C0", "C1", "C3"), layouts.items()):
            ws = [p["world"] for p in pts]
            axes[0, col].plot(ws, [p["step_s"] for p in pts], "o-", color=color, label=f"{name}: step")
            axes[0, col].plot(ws, [p["comm_total_s"] for p in pts], ":", color=color, label=f"{name}: communication")
            axes[1, col].plot(ws, [p["bytes_per_rank"] / 2**20 for p in pts], "o-", color=color, label=name)
        axes[0, col].set(xscale="log", yscale="log", ylabel="seconds per step per rank (predicted)",
                         title=f"{pname}: d={prof['dim']}, {size_label(prof['rows_per_rank'])} rows and 512 queries "
                               f"per rank; scoring {prof['source']}")
        axes[1, col].set(xscale="log", yscale="log", xlabel="W (ranks)", ylabel="MiB sent per rank per step",
                         title=f"{model['bandwidth_gbs']:g} GB/s, {model['latency_us']:g} us per message")
        for ax in axes[:, col]:
            ax.title.set_fontsize(8)
            ax.legend(fontsize=7, loc="upper left", framealpha=0.6)
    fig.suptitle("Two-level layout: each group of G ranks holds its own cache; the per-rank step stays flat in W "
                 "for a fixed G", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(model: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    styles = {"weak_fixed_global_batch": "C0", "dp_fixed_cache": "C1", "dp_weak": "C2"}
    for ax, (pname, s) in zip(axes, model["scenarios"].items()):
        for name, pts in s["points"].items():
            ws = [p["world"] for p in pts]
            ax.plot(ws, [p["step_s"] for p in pts], "o-", color=styles[name], label=f"{name}: step")
            ax.plot(ws, [p["gather_queries_s"] for p in pts], "--", color=styles[name],
                    label=f"{name}: all-gather of queries")
            ax.plot(ws, [p["comm_total_s"] for p in pts], ":", color=styles[name], label=f"{name}: all comm")
        pts = s["points"]["weak_fixed_global_batch"]
        ax.plot([p["world"] for p in pts], [p["gather_s"] for p in pts], "x-", color="grey",
                label="gather-everything wire time (weak)")
        p = s["params"]
        ax.set(xscale="log", yscale="log", xlabel="W (ranks)", ylabel="seconds per step (predicted)",
               title=f"{pname}: d={p['dim']}, {size_label(p['rows_per_rank'])} rows/rank, "
                     f"{model['bandwidth_gbs']:g} GB/s, {model['latency_us']:g} us")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=6, loc="lower right", framealpha=0.6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("scaling_json", nargs="?", type=Path, default=RESULTS_DIR / "scaling.json")
    ap.add_argument("--bandwidth-gbs", type=float, default=25.0)
    ap.add_argument("--latency-us", type=float, default=5.0)
    ap.add_argument("--gpu-json", type=Path, default=None, help="gpu_check.json to take the GPU scoring rate from")
    ap.add_argument("--out-dir", type=Path, default=None)
    args = ap.parse_args()
    res = json.loads(args.scaling_json.read_text())
    run(res, args.bandwidth_gbs, args.latency_us, args.out_dir or args.scaling_json.parent, args.gpu_json)


if __name__ == "__main__":
    main()
