#!/usr/bin/env python3
"""Measure aftrans on the small-digit set against the single-scale ViT with the same fine-tuning.

    python tools/aftrans_measure.py --epochs 2            # both fine-tuned 2 epochs, then ablations

Starts from the trained tiny DeiT (``sliver.models.training.cached("tiny_deit")``, trained on
the digits). Prints: test accuracy of the single-scale ViT and of aftrans (before and after the
same fine-tuning), the MACs of both scales, the fraction of test canvases whose SACM box has
IoU >= 0.5 with the true digit box (and what the box rule would give a perfect attention map:
the patches the digit touches), and the ablation (rollout / last-layer attention x adaptive /
fixed filter x extent / moments box) on the fine-tuned aftrans encoder (SACM swapped, no new
fine-tuning).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import numpy as np
import torch



def accuracy(module, dataset, batch=100) -> float:
    correct = 0
    with torch.no_grad():
        for images, targets in dataset.batches(batch):
            out = module(images)
            out = out[0] if isinstance(out, tuple) else out
            correct += int((out.argmax(1) == targets).sum())
    return 100.0 * correct / len(dataset)


def localisation(program, dataset) -> tuple:
    from sliver.passes.tokens import aftrans

    boxes = aftrans.regions(program, dataset.images.numpy())
    scores = aftrans.iou(boxes, dataset.meta["boxes"].numpy())
    return 100.0 * float((scores >= 0.5).mean()), float(scores.mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs for both models")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--options", default="", help="extra aftrans options, e.g. 'margin=1'")
    p.add_argument("--json", help="write the numbers here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from sliver import ir, passes
    from sliver.models import data, training
    from sliver.passes.tokens.aftrans import fine_tune

    net, _ = training.cached("tiny_deit", seed=args.seed)
    train, test = data.small_digits("train"), data.small_digits("test")
    out = {"epochs": args.epochs, "lr": args.lr, "seed": args.seed}
    out["single_scale_before"] = accuracy(net, test)
    single = copy.deepcopy(net)
    fine_tune(single, train, epochs=args.epochs, lr=args.lr, batch_size=32, seed=args.seed)
    out["single_scale_after"] = accuracy(single, test)
    print(f"single-scale ViT: test accuracy {out['single_scale_before']:.2f} -> {out['single_scale_after']:.2f}", flush=True)

    prog = ir.trace(net, test.images[:1], name="tiny_deit")
    ctx_data = data.context_data("small-digits")
    extra = (" " + args.options) if args.options else ""
    before = passes.parse(f"aftrans{{epochs=0{extra}}}").run(prog, data=ctx_data).program
    out["aftrans_before"] = accuracy(before.module, test)
    out["iou50_before"], out["iou_mean_before"] = localisation(before, test)
    from sliver.passes.tokens.aftrans import box_ceiling

    sacm = before.module.sacm
    ceiling = box_ceiling(test.meta["boxes"].numpy(), grid=sacm.grid, patch=sacm.patch, image=sacm.image,
                          margin=sacm.margin, min_side=sacm.min_side)
    out["iou50_ceiling"], out["iou_mean_ceiling"] = 100.0 * float((ceiling >= 0.5).mean()), float(ceiling.mean())
    print(f"box rule with a perfect component (margin {sacm.margin}): IoU>=0.5 on {out['iou50_ceiling']:.1f}% "
          f"(mean IoU {out['iou_mean_ceiling']:.3f})", flush=True)
    result = passes.parse(f"aftrans{{epochs={args.epochs} lr={args.lr}{extra}}}").run(prog, data=ctx_data, seed=args.seed)
    two = result.program
    notes = result.report.steps[0].notes
    out["macs"] = notes["macs"]
    out["train_loss"] = notes.get("train_loss")
    out["aftrans_after"] = accuracy(two.module, test)
    out["iou50_after"], out["iou_mean_after"] = localisation(two, test)
    print(f"aftrans: test accuracy {out['aftrans_before']:.2f} -> {out['aftrans_after']:.2f}; "
          f"IoU>=0.5 on {out['iou50_before']:.1f}% -> {out['iou50_after']:.1f}% of test canvases "
          f"(mean IoU {out['iou_mean_before']:.3f} -> {out['iou_mean_after']:.3f})", flush=True)
    print(f"MACs per image: global {out['macs']['global']:,}, second pass {out['macs']['second_pass']:,} "
          f"({100 * out['macs']['second_pass_share']:.1f}% of the global pass)", flush=True)
    ablation = {}
    sacm = two.module.sacm
    for collect in ("rollout", "last"):
        for filt in ("adaptive", "fixed"):
            for box in ("extent", "moments"):
                sacm.collect, sacm.filter, sacm.box_rule = collect, filt, box
                acc = accuracy(two.module, test)
                hit, mean = localisation(two, test)
                ablation[f"{collect}/{filt}/{box}"] = {"accuracy": acc, "iou50": hit, "iou_mean": mean}
                print(f"  ablation {collect:7s} {filt:8s} {box:7s}: accuracy {acc:.2f}, IoU>=0.5 {hit:.1f}%, "
                      f"mean IoU {mean:.3f}", flush=True)
    out["ablation"] = ablation
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
