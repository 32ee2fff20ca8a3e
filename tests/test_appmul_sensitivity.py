"""Taylor sensitivity of (layer, AppMul) pairs against measured loss changes on the trained tiny
ResNet (4-bit integer layers, digits calibration images)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from sliver.ir.errors import PassError
from sliver.models import data
from sliver.passes.appmul import emulate, library, sensitivity
from trained import trained

torch.set_num_threads(2)

CANDIDATES = ("s4_log_t1", "s4_truncated_k1", "s4_truncated_k2", "s4_perforated_s0_m1", "s4_truncated_k3")


@pytest.fixture(scope="module")
def setup():
    net, _ = trained("tiny_resnet")
    net = copy.deepcopy(net).eval()
    calib = data.digits("calib")
    x, y = calib.images[:64], calib.targets[:64]
    names = emulate.quantizable_layers(net)
    layers = emulate.attach(net, {n: 4 for n in names}, x)
    profiles = sensitivity.profile(net, layers, x, y)
    return net, layers, profiles, x, y


@pytest.mark.slow
def test_estimates_rank_pairs_like_measured_loss_changes(setup):
    net, layers, profiles, x, y = setup
    lib = library.load()
    cands = [lib[c] for c in CANDIDATES]
    base = sensitivity.mean_loss(net, x, y)
    est, meas = [], []
    for n in list(layers)[::2]:
        est.extend(sensitivity.taylor_estimate(profiles[n], cands, compensate=True))
        meas.extend(sensitivity.measured_loss_change(net, layers[n], m, x, y, base, compensate=True) for m in cands)
    rho = spearmanr(est, meas).correlation
    assert rho >= 0.75, rho


def test_profile_statistics(setup):
    net, layers, profiles, x, y = setup
    prof = profiles["layer1.0.conv1"]
    assert prof.act_hist.shape == (16,) and prof.act_hist.sum() == pytest.approx(1.0)
    assert prof.g1.shape == (64, 16) and (prof.g2 >= 0).all()
    assert prof.macs == 16 * 16 * 9 * 32 * 32
    lib = library.load()
    # the exact multiplier has no error: zero estimate; a coarser truncation costs more
    est = sensitivity.taylor_estimate(prof, [lib.exact(4, True), lib["s4_truncated_k1"], lib["s4_truncated_k3"]])
    assert est[0] == 0.0 and est[2] > est[1]
    with pytest.raises(PassError, match="does not fit"):
        sensitivity.taylor_estimate(prof, [lib["s5_exact"]])
