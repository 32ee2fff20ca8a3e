#!/usr/bin/env python3
"""Accuracy versus MACs of one trained tiny model under several pipelines, as a PNG (and JSON).

    python tools/report.py tiny_deit --pipeline fold-bn --pipeline fold-bn,cleanup --out build/deit.png
    python tools/report.py tiny_resnet --pipeline "fold-bn,cleanup" --checkpoint build/resnet.pt --out r.png

The model is a trained tiny zoo model: from ``--checkpoint`` (written by tools/train.py) or, by
default, from the per-machine training cache (trained there on first use, about a minute). The
dense model (the empty pipeline) is always the first point. Each pipeline runs through
``sliver.passes.parse(text).run(program, data=data.context_data(dataset), seed=SEED)``; its result is
scored on ``--split`` of the model's data set (digits: accuracy, digit scenes: mIoU) at the level
the pipeline ends on, and, with ``--tvm``, also as a TVM build for this machine. MACs are per image.

Next to ``OUT`` (the PNG) goes ``OUT`` with ``.json``: one row per pipeline. Errors exit with code
2 and one line ``error: ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        sys.stderr.write(f"error: {message} (see --help)\n")
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="report.py", description="Plot accuracy versus MACs for pipelines on one trained model.")
    p.add_argument("model", help="tiny zoo model (tiny_deit, tiny_resnet, tiny_mobilenet_v2, tiny_vgg, tiny_segmenter)")
    p.add_argument("--pipeline", action="append", default=[], help="a pipeline; repeat for more (the dense "
                                                                       "model is always included)")
    p.add_argument("--out", required=True, help="PNG path; the rows go to the same path with .json")
    p.add_argument("--checkpoint", help="checkpoint from tools/train.py (default: the training cache)")
    p.add_argument("--split", default="test", help="split to score on (default: test)")
    p.add_argument("--seed", type=int, default=0, help="seed of the cached training run and of the passes")
    p.add_argument("--tvm", action="store_true", help="also score each result as a TVM build for this machine")
    p.add_argument("--limit", type=int, help="score only the first N images (quick looks)")
    return p


def load_trained(model: str, checkpoint: str | None, seed: int):
    """(eager module, checkpoint dict) from a checkpoint file or the training cache."""
    from sliver.ir.errors import ModelInputError
    from sliver.models import training

    if checkpoint:
        net, ckpt = training.load_checkpoint(checkpoint)
        if ckpt["model"] != model:
            raise ModelInputError(f"{checkpoint} holds {ckpt['model']}, not {model}")
        return net, ckpt
    return training.cached(model, seed=seed, progress=True)


def measure(net, model: str, pipelines, *, dataset: str, split: str = "test", seed: int = 0,
            tvm: bool = False, limit: int | None = None) -> list:
    """One row per pipeline (the dense model first): MACs per image, params, score, seconds."""
    import torch

    from sliver import backends, ir, models, passes
    from sliver.backends.evaluate import score
    from sliver.models import data as datasets

    example = torch.zeros(models.input_shape(model))
    program = ir.trace(net, example, name=model)
    data = datasets.context_data(dataset)
    texts = [""] + [p for p in pipelines if p.strip()]
    parsed = [passes.parse(t) for t in texts]  # every pipeline parses before anything runs
    for pipe in parsed:
        pipe.validate(program.level, program.facts)
    rows = []
    for text, pipe in zip(texts, parsed):
        t0 = time.perf_counter()
        result = pipe.run(program, data=data, seed=seed)
        final = result.program
        stats = final.stats().totals() if final.level != "tvm" else result.report.after or {}
        batch = program.input_shapes[0][0]
        evaluation = score(final, split, data=dataset, limit=limit)
        row = {
            "pipeline": str(pipe) or "(dense)",
            "level": final.level,
            "macs": stats.get("macs", 0) // batch,
            "params": stats.get("params", 0),
            "metric": evaluation.metric,
            "score": evaluation.value,
            "dataset": evaluation.dataset,
        }
        if tvm:
            lowered = final if final.level != "torch" else ir.to_onnx(final)
            row["tvm_score"] = score(backends.tvm.build(lowered, "x86"), split, data=dataset, limit=limit).value
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(f"[report] {row['pipeline']}: {row['metric']} {row['score']:.2f}%, {row['macs'] / 1e6:.2f} MMACs",
              file=sys.stderr, flush=True)
    return rows


def plot(rows: list, path: str, title: str) -> str:
    """Write the accuracy-versus-MACs scatter to ``path`` (PNG), atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 4.6), dpi=120)
    markers = "os^Dvp<>hX"
    seen: dict = {}
    for i, row in enumerate(rows):
        dense = i == 0
        x, y = row["macs"] / 1e6, row["score"]
        label = f"{i}: {row['pipeline']}" + (f"  (tvm {row['tvm_score']:.2f}%)" if "tvm_score" in row else "")
        ax.scatter([x], [y], s=90 if dense else 45, marker="*" if dense else markers[(i - 1) % len(markers)],
                   color="black" if dense else f"C{(i - 1) % 10}", zorder=4 if dense else 3, label=label)
        stacked = seen.get((round(x, 3), round(y, 2)), 0)  # coinciding points: number them side by side
        seen[(round(x, 3), round(y, 2))] = stacked + 1
        ax.annotate(str(i), (x, y), textcoords="offset points", xytext=(7 + 9 * stacked, 5), fontsize=8)
    metric = "mIoU" if rows and rows[0]["metric"] == "miou" else "accuracy"
    ax.set_xlabel("MACs per image (millions)")
    ax.set_ylabel(f"{metric} on {rows[0]['dataset'] if rows else ''} (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    xs = [r["macs"] / 1e6 for r in rows]
    ys = [r["score"] for r in rows] + [r["tvm_score"] for r in rows if "tvm_score" in r]
    if xs:
        ax.set_xlim(0, max(xs) * 1.15 or 1)
        ax.set_ylim(max(0.0, min(ys) - 3), min(100.5, max(ys) + 1.5))
    ax.legend(fontsize=7, loc="lower left", frameon=True)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from sliver.ir.errors import DataError, SliverError
    from sliver.models import data as datasets
    from sliver.models import training

    try:
        if not args.out.lower().endswith(".png"):
            raise DataError(f"--out {args.out} must name a .png file")
        datasets.check_split(args.split)
        config = training.config_for(args.model, seed=args.seed)  # also rejects untrainable models
        net, ckpt = load_trained(args.model, args.checkpoint, args.seed)
        rows = measure(net, args.model, args.pipeline, dataset=config.dataset, split=args.split,
                       seed=args.seed, tvm=args.tvm, limit=args.limit)
        plot(rows, args.out, f"{args.model}: {rows[0]['metric']} vs MACs ({rows[0]['dataset']})")
        json_path = os.path.splitext(args.out)[0] + ".json"
        tmp = json_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"model": args.model, "seed": args.seed, "checkpoint": args.checkpoint or "cache",
                       "rows": rows}, f, indent=2)
        os.replace(tmp, json_path)
    except SliverError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    for row in rows:
        print(f"{row['pipeline']:<40}{row['macs'] / 1e6:>10.2f} MMACs{row['score']:>9.2f}% {row['metric']}")
    print(f"wrote {args.out} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
