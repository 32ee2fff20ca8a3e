#!/usr/bin/env python3
"""Accuracy versus cost of one trained tiny model under several pipelines, as a PNG (and JSON).

    python tools/report.py tiny_deit --pipeline fold-bn --pipeline fold-bn,cleanup --out build/deit.png
    python tools/report.py tiny_resnet --pipeline "fold-bn,cleanup" --checkpoint build/resnet.pt --out r.png
    python tools/report.py tiny_deit --recipe int-vit-fpga --recipe float-vit-cpu --out build/deit-recipes.png

``--recipe NAME`` (repeatable) adds the composition of a recipe (``sliver.passes.recipes``): every
pass of it alone (with the earlier passes of the recipe it requires, e.g. ``rapq,pot-shift``), then
the whole recipe. Each row is also costed on the FPGA model (``--accel``, ``--bits``; latency and
energy of the program the pipeline ends with, at the onnx level), the picture has two panels
(score versus MACs, score versus FPGA energy) and a composition table goes next to OUT with
``.md``. Pipelines that share a prefix (a recipe and its passes alone) run that prefix once.

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
    p.add_argument("--recipe", action="append", default=[], help="a recipe: its passes alone and the whole "
                                                                 "recipe (repeat for more; --list-recipes of compile.py)")
    p.add_argument("--accel", default="zcu102", help="FPGA accelerator preset for the energy axis (default: zcu102)")
    p.add_argument("--bits", type=int, default=8, help="bit width of float values on the FPGA model (default: 8)")
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


def composition(recipe_name: str) -> list:
    """(label, pipeline text) rows of a recipe: each pass alone (with the earlier passes of the
    recipe that provide what it requires), then the whole recipe."""
    from sliver import passes

    recipe = passes.recipes.get(recipe_name)
    steps = recipe.parse().passes
    rows, seen = [], set()
    for k, p in enumerate(steps):
        keep, needed = {k}, set(p.requires)
        for j in range(k - 1, -1, -1):  # the latest earlier pass providing each required fact
            provided = needed & set(steps[j].provides)
            if provided:
                keep.add(j)
                needed = (needed - provided) | set(steps[j].requires)
        text = str(passes.Pipeline([steps[j] for j in sorted(keep)]))
        if text not in seen and text != recipe.pipeline:
            seen.add(text)
            rows.append((f"{p.name} alone", text))
    rows.append((f"recipe {recipe.name}", recipe.pipeline))
    return rows


def measure(net, model: str, pipelines, *, dataset: str, split: str = "test", seed: int = 0,
            tvm: bool = False, limit: int | None = None, accel: str = "zcu102", bits: int = 8) -> list:
    """One row per pipeline (the dense model first): MACs per image, params, score, FPGA latency
    and energy, seconds. ``pipelines`` are texts or (label, text) pairs. A prefix shared by
    several pipelines runs once (its program is kept and the rest runs on it)."""
    import torch

    from sliver import backends, ir, models, passes
    from sliver.backends import fpga
    from sliver.backends.evaluate import score
    from sliver.models import data as datasets

    example = torch.zeros(models.input_shape(model))
    program = ir.trace(net, example, name=model)
    data = datasets.context_data(dataset)
    labelled = [("dense", "")] + [p if isinstance(p, tuple) else ("", p) for p in pipelines
                                  if (p[1] if isinstance(p, tuple) else p).strip()]
    parsed = [passes.parse(t) for _, t in labelled]  # every pipeline parses before anything runs
    for pipe in parsed:
        pipe.validate(program.level, program.facts)
    cost_model = fpga.CostModel(accel=accel, bits=bits)
    prefixes = {(): program}  # pass texts -> program after them

    def run(pipe):
        texts = tuple(p.text() for p in pipe.passes)
        k = max(n for n in range(len(texts) + 1) if texts[:n] in prefixes)
        current = prefixes[texts[:k]]
        for n in range(k, len(texts)):
            ctx = passes.PassContext(data=data, seed=seed, cost_model=cost_model)
            current = passes.Pipeline([pipe.passes[n]]).run(current, ctx).program
            prefixes[texts[:n + 1]] = current
        return current

    rows = []
    for (label, text), pipe in zip(labelled, parsed):
        t0 = time.perf_counter()
        final = run(pipe)
        stats = final.stats().totals()
        batch = program.input_shapes[0][0]
        evaluation = score(final, split, data=dataset, limit=limit)
        lowered = final if final.level != "torch" else ir.to_onnx(final)
        nonlinear = "poly" if "poly-act" in lowered.facts else "exact"
        fpga_totals = fpga.cost(lowered, accel=accel, bits=bits, nonlinear=nonlinear).totals()
        row = {
            "label": label or str(pipe),
            "pipeline": str(pipe) or "(dense)",
            "level": final.level,
            "macs": stats.get("macs", 0) // batch,
            "params": stats.get("params", 0),
            "metric": evaluation.metric,
            "score": evaluation.value,
            "dataset": evaluation.dataset,
            "integer_only": "integer-only" in final.facts,
            "fpga_latency_ms": fpga_totals["latency_ms"] / batch,
            "fpga_energy_mj": fpga_totals["energy_mj"] / batch,
        }
        if tvm:
            row["tvm_score"] = score(backends.tvm.build(lowered, "x86"), split, data=dataset, limit=limit).value
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(f"[report] {row['pipeline']}: {row['metric']} {row['score']:.2f}%, {row['macs'] / 1e6:.2f} MMACs, "
              f"FPGA {row['fpga_energy_mj']:.4f} mJ", file=sys.stderr, flush=True)
    return rows


def table(rows: list) -> str:
    """The composition table (Markdown): one row per pipeline, changes against the dense model."""
    dense = rows[0]

    def rel(key, row):
        return f"{100.0 * (row[key] - dense[key]) / dense[key]:+.1f}%" if dense[key] else "n/a"

    lines = [f"| row | pipeline | MMACs | FPGA ms | FPGA mJ | {dense['metric']} % | change pt | integer-only |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        lines.append(
            f"| {row['label']} | `{row['pipeline']}` | {row['macs'] / 1e6:.2f} ({rel('macs', row)}) | "
            f"{row['fpga_latency_ms']:.4f} ({rel('fpga_latency_ms', row)}) | "
            f"{row['fpga_energy_mj']:.4f} ({rel('fpga_energy_mj', row)}) | {row['score']:.2f} | "
            f"{row['score'] - dense['score']:+.2f} | {'yes' if row['integer_only'] else 'no'} |")
    return "\n".join(lines) + "\n"


def plot(rows: list, path: str, title: str) -> str:
    """Write the accuracy-versus-MACs scatter to ``path`` (PNG), atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_x = [("macs", 1e-6, "MACs per image (millions)")]
    if rows and all("fpga_energy_mj" in r for r in rows):
        axes_x.append(("fpga_energy_mj", 1.0, "FPGA energy per image (mJ)"))
    fig, axes = plt.subplots(1, len(axes_x), figsize=(7.2 * len(axes_x), 4.6), dpi=120, squeeze=False)
    markers = "os^Dvp<>hX"
    metric = "mIoU" if rows and rows[0]["metric"] == "miou" else "accuracy"
    ys = [r["score"] for r in rows] + [r["tvm_score"] for r in rows if "tvm_score" in r]
    for ax, (key, scale, xlabel) in zip(axes[0], axes_x):
        seen: dict = {}
        for i, row in enumerate(rows):
            dense = i == 0
            x, y = row[key] * scale, row["score"]
            name = row.get("label") or row["pipeline"]
            label = f"{i}: {name}" + (f"  (tvm {row['tvm_score']:.2f}%)" if "tvm_score" in row else "")
            ax.scatter([x], [y], s=90 if dense else 45, marker="*" if dense else markers[(i - 1) % len(markers)],
                       color="black" if dense else f"C{(i - 1) % 10}", zorder=4 if dense else 3, label=label)
            stacked = seen.get((round(x, 4), round(y, 2)), 0)  # coinciding points: number them side by side
            seen[(round(x, 4), round(y, 2))] = stacked + 1
            ax.annotate(str(i), (x, y), textcoords="offset points", xytext=(7 + 9 * stacked, 5), fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{metric} on {rows[0]['dataset'] if rows else ''} (%)")
        ax.set_title(title, fontsize=9)
        ax.grid(True, alpha=0.3)
        xs = [r[key] * scale for r in rows]
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
        from sliver import passes

        for name in args.recipe:
            passes.recipes.get(name)  # every recipe exists before anything runs
        pipelines = list(args.pipeline) + [row for name in args.recipe for row in composition(name)]
        rows = measure(net, args.model, pipelines, dataset=config.dataset, split=args.split,
                       seed=args.seed, tvm=args.tvm, limit=args.limit, accel=args.accel, bits=args.bits)
        plot(rows, args.out, f"{args.model}: {rows[0]['metric']} vs cost ({rows[0]['dataset']})")
        md_path = os.path.splitext(args.out)[0] + ".md"
        tmp = md_path + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{args.model} on {rows[0]['dataset']}, FPGA model {args.accel} at {args.bits} bits\n\n")
            f.write(table(rows))
        os.replace(tmp, md_path)
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
        print(f"{row['pipeline']:<40}{row['macs'] / 1e6:>10.2f} MMACs{row['fpga_energy_mj']:>9.4f} mJ"
              f"{row['score']:>9.2f}% {row['metric']}")
    print(f"wrote {args.out}, {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
