#!/usr/bin/env python3
"""Tri-Level E-ViT ablation: training wall time and test accuracy of the tiny DeiT on augmented
digits, dense and with each level alone and all three, medians over runs.

    python tools/trilevel_bench.py --epochs 30 --copies 10 --runs 3 --threads 1

Every configuration trains from the same initial weights per run (seed = run index) with the zoo
recipe (``sliver.models.training``) through the one trainer; the Tri-Level options are the
paper's defaults (keep 0.7, attn 0.3, remove 0.05 of the data set, blocks 3,6,9, schedules scaled
to the epochs). The training set is ``--copies`` jittered copies of the digits training split
(1,078 images each). Runs are interleaved (run 1 of every configuration, then run 2, ...) so a
change of machine load hits all configurations alike. Timings only mean something on a quiet
machine; the table prints the CPU (lscpu model name) it ran on.

Output: one line per run (``config run seconds accuracy``), then the table with medians, the
time ratio to dense and the accuracy change in points; ``--json PATH`` also writes them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CONFIGS = {
    "dense": None,
    "examples": "trilevel{keep=1 attn=1 remove=0.05}",
    "tokens": "trilevel{keep=0.7 attn=1 remove=0}",
    "attention": "trilevel{keep=1 attn=0.3 remove=0}",
    "all three": "trilevel{keep=0.7 attn=0.3 remove=0.05 blocks=3,6,9}",
}


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return "unknown CPU"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny_deit")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--copies", type=int, default=10, help="jittered copies of the digits training split")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of: " + ", ".join(CONFIGS))
    p.add_argument("--json", help="also write the runs and the table here")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    from sliver.models import training

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from train import sparsity_extensions

    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"unknown configuration(s) {unknown}; choose from {list(CONFIGS)}")
    torch.set_num_threads(args.threads)
    runs = {n: [] for n in names}
    for run in range(args.runs):
        for name in names:
            config = training.config_for(args.model, epochs=args.epochs, seed=run, threads=args.threads,
                                         train_copies=args.copies)
            result = training.train(config, progress=False, extensions=sparsity_extensions(CONFIGS[name], run))
            runs[name].append((result.train_seconds, result.scores["test"]))
            print(f"{name:<10} run {run}  {result.train_seconds:8.1f} s  test {result.scores['test']:.2f}%",
                  flush=True)
    table = []
    dense_s = statistics.median(s for s, _ in runs["dense"]) if "dense" in runs else None
    dense_a = statistics.median(a for _, a in runs["dense"]) if "dense" in runs else None
    print(f"\n{args.model}, {args.epochs} epochs, {args.copies} x 1078 training digits, {args.runs} runs, "
          f"{args.threads} thread(s), {cpu_name()}")
    print(f"{'config':<10} {'median s':>9} {'x dense':>8} {'median acc':>11} {'delta pt':>9}")
    for name in names:
        s = statistics.median(t for t, _ in runs[name])
        a = statistics.median(x for _, x in runs[name])
        row = {"config": name, "spec": CONFIGS[name], "median_seconds": s, "median_accuracy": a,
               "time_ratio": s / dense_s if dense_s else None, "delta_points": a - dense_a if dense_a else None}
        table.append(row)
        ratio = f"{row['time_ratio']:.3f}" if row["time_ratio"] is not None else "-"
        delta = f"{row['delta_points']:+.2f}" if row["delta_points"] is not None else "-"
        print(f"{name:<10} {s:9.1f} {ratio:>8} {a:10.2f}% {delta:>9}")
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"runs": runs, "table": table, "cpu": cpu_name(), "args": vars(args)}, f, indent=1)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
