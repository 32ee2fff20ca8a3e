#!/usr/bin/env python
"""The appmul layer-level sensitivity protocol (README, appmul "Layer-level protocol, v2").

    python tools/appmul_protocol.py tiny_deit --bits 6
    python tools/appmul_protocol.py tiny_resnet --bits 6,5,5,5,5,5,5,5,5,5,5,5,6 \\
        --designs truncated_k2,truncated_k4,perforated_s0_m1,perforated_s1_m2,broken_h2_v5

The trained digits model is quantised as the appmul pass does (activation scales, histograms and
both estimates from train[:128]). For each (layer, design) pair, with only that layer
approximate (bias compensation on), every one of the other non-test digits (train[128:], calib,
val: 1565 images) gives a KL divergence from the exact model and a cross-entropy change. Printed:
per design, Spearman across the layers of the Taylor and the probe estimate against the mean KL
and against the mean cross-entropy change, their medians and the Spearman over all pairs, and
each measurement's own split-half agreement (random halves of the images, 30 splits). A design
is a multiplier family with its parameters at each layer's own width. ``--out`` saves the
per-image measurements and the estimates (.npz). One core: ~8 min for tiny_resnet, ~30 min for
tiny_deit.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time

import numpy as np

DEFAULT_DESIGNS = "truncated_k2,truncated_k4,perforated_s0_m1,broken_h2_v5,broken_h2_v7"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", choices=("tiny_resnet", "tiny_deit", "tiny_mobilenet_v2", "tiny_vgg"))
    ap.add_argument("--bits", default="6", help="one signed operand width, or one per conv/linear layer in module order")
    ap.add_argument("--designs", default=DEFAULT_DESIGNS, help="comma-separated multiplier designs (library names without the sN_ prefix)")
    ap.add_argument("--seed", type=int, default=0, help="training seed of the cached model")
    ap.add_argument("--out", help="save measurements and estimates to this .npz")
    args = ap.parse_args(argv)

    import torch
    from scipy.stats import spearmanr

    from sliver.ir.errors import SliverError
    from sliver.models import data, training
    from sliver.passes.appmul import emulate, library, sensitivity

    lib = library.load()
    designs = [d.strip() for d in args.designs.split(",") if d.strip()]
    try:
        widths_list = [int(b) for b in args.bits.split(",")]
    except ValueError:
        ap.error(f"--bits {args.bits!r}: give integers, e.g. 6 or 6,5,5")
    net, _ = training.cached(args.model, seed=args.seed, progress=True)
    net = copy.deepcopy(net).eval()
    names = emulate.quantizable_layers(net)
    if len(widths_list) not in (1, len(names)):
        ap.error(f"--bits lists {len(widths_list)} widths but {args.model} has {len(names)} conv/linear layers")
    widths = {n: widths_list[0] if len(widths_list) == 1 else widths_list[i] for i, n in enumerate(names)}
    missing = [f"s{w}_{d}" for d in designs for w in sorted(set(widths.values())) if f"s{w}_{d}" not in lib.by_name]
    if missing:
        ap.error(f"not in the AppMul library: {', '.join(missing)} (python tools/gen_appmul.py lists the library)")

    train, calib, val = data.digits("train"), data.digits("calib"), data.digits("val")
    xt, yt = train.images[:128], train.targets[:128]
    x = torch.cat([train.images[128:], calib.images, val.images])
    y = torch.cat([train.targets[128:], calib.targets, val.targets])
    try:
        layers = emulate.attach(net, widths, xt)
        profiles = sensitivity.profile(net, layers, xt, yt)
        t0 = time.time()
        response = sensitivity.noise_response(net, layers, xt)
    except SliverError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"probe: {time.time() - t0:.0f} s; measuring {len(names)} layers x {len(designs)} designs on {len(x)} images",
          flush=True)

    ref = sensitivity.log_probs(net, x)
    ce0 = -ref.gather(1, y.view(-1, 1))[:, 0]
    kl = np.zeros((len(names), len(designs), len(x)))
    ce = np.zeros_like(kl)
    est = {"taylor": np.zeros((len(names), len(designs))), "probe": np.zeros((len(names), len(designs)))}
    t0 = time.time()
    for i, n in enumerate(names):
        for j, d in enumerate(designs):
            m = lib[f"s{widths[n]}_{d}"]
            est["taylor"][i, j] = sensitivity.taylor_estimate(profiles[n], [m], compensate=True)[0]
            est["probe"][i, j] = sensitivity.probe_estimate(profiles[n], response[n], [m], compensate=True)[0]
            layers[n].set_multiplier(m, compensate=True)
            lp = sensitivity.log_probs(net, x)
            layers[n].set_multiplier(None)
            kl[i, j] = (ref.exp() * (ref - lp)).sum(1).numpy()
            ce[i, j] = (-lp.gather(1, y.view(-1, 1))[:, 0] - ce0).numpy()
        print(f"  {n} ({i + 1}/{len(names)}, {time.time() - t0:.0f} s)", flush=True)

    if args.out:
        fd, tmp = tempfile.mkstemp(suffix=".npz", dir=os.path.dirname(os.path.abspath(args.out)))
        os.close(fd)
        np.savez(tmp, K=kl, D=ce, names=np.array(names), designs=np.array(designs),
                 widths=np.array([widths[n] for n in names]), **est)
        os.replace(tmp, args.out)

    def per_design(a, b):
        return np.array([spearmanr(a[:, j], b[:, j]).correlation for j in range(a.shape[1])])

    rng = np.random.default_rng(0)
    for label, per_image in (("KL", kl), ("CE change", ce)):
        n_img = per_image.shape[2]
        halves = [np.median(per_design(per_image[:, :, p[: n_img // 2]].mean(2), per_image[:, :, p[n_img // 2 :]].mean(2)))
                  for p in (rng.permutation(n_img) for _ in range(30))]
        mean = per_image.mean(2)
        print(f"{label}: split-half agreement (median over designs) {np.mean(halves):.3f}")
        for tag, e in est.items():
            r = per_design(e, mean)
            print(f"  {tag:6s} " + " ".join(f"{d}={v:.2f}" for d, v in zip(designs, r))
                  + f" | median {np.median(r):.3f} | pairs {spearmanr(e.ravel(), mean.ravel()).correlation:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
