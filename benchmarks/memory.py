"""Memory-efficient mode against the standard mode: peak memory, time per training step, depth sweep.

1. For each model (densenet-bc-100-12 and densenet121-cifar by default, batch 64): the peak
   memory of a training step in each mode, each measured in a fresh child process
   (``densenet bench --mode train``, 1 warm-up + 2 steps; CPU: peak RSS, and the RSS just before
   the first step so that the steps' own memory can be read), and the time per step of both
   modes: each round one fresh process per mode (alternating), each mode by default with the
   malloc policy ``densenet train`` gives it; median of the rounds.
2. Depth sweep: densenet-bc-L-12 for several L (batch 16 by default), peak memory of both modes
   (child processes as above), as a table and a plot (PNG). Standard mode keeps every layer's
   concatenation and BN/ReLU maps, whose size grows with the layer's depth, so its memory grows
   quadratically with depth; the memory-efficient mode keeps per layer only maps of constant size.

    .venv/bin/python benchmarks/memory.py [--rounds 5] [--plot docs/memory_sweep.png] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import torch

from densenet.runtime import cpu_name, set_malloc_policy


def bench_child(model: str, batch: int, efficient: bool, threads: int | None, allocator: str,
                extra: list[str]) -> dict:
    """The JSON of ``densenet bench --mode train`` for ``model`` run in a fresh process."""
    cmd = [sys.executable, "-m", "densenet", "bench", "--model", model, "--mode", "train", "--batch-size",
           str(batch), "--device", "cpu", "--warmup", "1", "--json", "--allocator", allocator, *extra]
    if efficient:
        cmd.append("--memory-efficient")
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"child failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def child_peak(model: str, batch: int, efficient: bool, threads: int | None, allocator: str = "default") -> dict:
    """Peak memory of 1 warm-up + 2 training steps in a fresh process (``densenet bench``)."""
    r = bench_child(model, batch, efficient, threads, allocator, ["--steps", "2", "--_child"])
    return {"peak_mb": r["rss_peak_mb"], "before_mb": r["rss_before_mb"],
            "steps_mb": r["rss_peak_mb"] - r["rss_before_mb"], "ms_per_step": r["ms_per_step"]}


TRAIN_POLICY = {"standard": "retain", "efficient": "retain"}  # what `densenet train` sets (train.run)


def child_step_times(model: str, batch: int, rounds: int, steps: int, threads: int | None,
                     allocators: dict[str, str]) -> dict:
    """Seconds per training step of both modes, each round one fresh ``densenet bench`` process per mode.

    Fresh processes, because glibc's malloc adapts its thresholds to what a process has freed
    before: timing both modes in one process makes the second depend on the first. The modes
    alternate round by round; a round's figure is the median of its process's steps (after one
    warm-up step). ``allocators`` gives each mode's malloc policy.
    """
    times: dict[str, list[float]] = {"standard": [], "efficient": []}
    for _ in range(rounds):
        for mode in times:
            r = bench_child(model, batch, mode == "efficient", threads, allocators[mode],
                            ["--steps", str(steps), "--no-memory"])
            times[mode].append(r["ms_per_step"] / 1000)
    med = {mode: statistics.median(ts) for mode, ts in times.items()}
    paired = statistics.median(e / s for e, s in zip(times["efficient"], times["standard"]))
    return {"s_per_step": med, "extra_time_of_medians": med["efficient"] / med["standard"] - 1,
            "extra_time_median_paired": paired - 1, "rounds": times, "allocators": allocators, "steps": steps}


def plot_sweep(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = [r["depth"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for mode, style in (("standard", "o-"), ("efficient", "s-")):
        ax.plot(depths, [r[mode]["steps_mb"] for r in rows], style,
                label="standard" if mode == "standard" else "memory-efficient")
    ax.set_xlabel("depth L of DenseNet-BC (k=12)")
    ax.set_ylabel("memory of a training step (MiB)")
    ax.set_title(f"Peak RSS above the pre-step baseline, batch {rows[0]['batch']}, CPU", fontsize=10)
    ax.set_xticks(depths)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="densenet-bc-100-12,densenet121-cifar")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (at least 5)")
    parser.add_argument("--sweep", default="40,100,160,250", help="depths L of densenet-bc-L-12 ('' to skip)")
    parser.add_argument("--sweep-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--plot", default=None, help="PNG path for the depth-sweep plot")
    parser.add_argument("--json", default=None, help="write all results to this JSON file")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per timing process (after 1 warm-up)")
    parser.add_argument("--timing-allocators", choices=("train", "same"), default="train",
                        help="train: each mode with the malloc policy `densenet train` gives it (retain for both since "
                             "2026-11-22); same: both with --allocator")
    parser.add_argument("--allocator", choices=("default", "retain", "release"), default="default",
                        help="glibc malloc policy of the children and of the timing (densenet.runtime.set_malloc_policy)")
    args = parser.parse_args()
    if not set_malloc_policy(args.allocator):
        raise SystemExit(f"--allocator {args.allocator} needs glibc")
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = max(5, args.rounds)
    results: dict = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                     "allocator": args.allocator,
                     "load_average": list(os.getloadavg()), "models": {}, "sweep": []}
    print(f"{results['cpu']}, {results['threads']} threads, torch {results['torch']}, "
          f"load average {results['load_average']}, malloc policy {args.allocator}", flush=True)

    print("| model | batch | standard peak RSS (steps) MiB | efficient peak RSS (steps) MiB | steps' memory "
          "efficient/standard | standard ms/step | efficient ms/step | extra time (of medians) | extra time (paired median) |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    for name in [m for m in args.models.split(",") if m]:
        std = child_peak(name, args.batch, False, args.threads, args.allocator)
        eff = child_peak(name, args.batch, True, args.threads, args.allocator)
        row = {"batch": args.batch, "standard": std, "efficient": eff,
               "memory_ratio_steps": eff["steps_mb"] / std["steps_mb"], "memory_ratio_peak": eff["peak_mb"] / std["peak_mb"]}
        if not args.skip_timing:
            policies = (TRAIN_POLICY if args.timing_allocators == "train"
                        else {"standard": args.allocator, "efficient": args.allocator})
            row["time"] = child_step_times(name, args.batch, rounds, args.steps, args.threads, policies)
        results["models"][name] = row
        t = row.get("time")
        extra = (f"{1000 * t['s_per_step']['standard']:,.0f} | {1000 * t['s_per_step']['efficient']:,.0f} | "
                 f"{100 * t['extra_time_of_medians']:+.1f}% | {100 * t['extra_time_median_paired']:+.1f}%"
                 if t else "- | - | - | -")
        print(f"| {name} | {args.batch} | {std['peak_mb']:,.0f} ({std['steps_mb']:,.0f}) | "
              f"{eff['peak_mb']:,.0f} ({eff['steps_mb']:,.0f}) | {row['memory_ratio_steps']:.2f} "
              f"(whole process {row['memory_ratio_peak']:.2f}) | {extra} |", flush=True)

    depths = [int(d) for d in args.sweep.split(",") if d.strip()]
    if depths:
        print(f"\ndepth sweep, densenet-bc-L-12, batch {args.sweep_batch}")
        print("| L | standard peak RSS (steps) MiB | efficient peak RSS (steps) MiB | ratio (steps) |")
        print("|---|---|---|---|", flush=True)
    for depth in depths:
        name = f"densenet-bc-{depth}-12"
        std = child_peak(name, args.sweep_batch, False, args.threads, args.allocator)
        eff = child_peak(name, args.sweep_batch, True, args.threads, args.allocator)
        results["sweep"].append({"depth": depth, "batch": args.sweep_batch, "standard": std, "efficient": eff})
        print(f"| {depth} | {std['peak_mb']:,.0f} ({std['steps_mb']:,.0f}) | {eff['peak_mb']:,.0f} "
              f"({eff['steps_mb']:,.0f}) | {eff['steps_mb'] / std['steps_mb']:.2f} |", flush=True)
    if depths and args.plot:
        plot_sweep(results["sweep"], args.plot)
        print(f"wrote {args.plot}")
    results["load_average_end"] = list(os.getloadavg())
    print(f"load average at the end {results['load_average_end']}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
