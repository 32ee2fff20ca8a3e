"""Taylor estimate of the loss increase caused by one approximate multiplier in one layer.

FAMES (arXiv 2411.18055) estimates the accuracy impact of each (layer, AppMul) pair from a Taylor
expansion of the loss instead of evaluating every assignment; its exact formula is not public. Our
principled version, for a layer with output ``y`` (per sample ``n``: ``y_n``, gradient
``g_n = dL_n/dy_n`` measured on calibration data with exact multipliers):

1. The multiplier's error ``e(a, w) = LUT[a][w] - a w`` on the layer's *actual operands*: the
   histogram ``p(a)`` of the layer's quantized input values and, per output channel ``o``, the
   count ``c_o(v)`` of weights equal to ``v``. Taking the ``K`` products of one output as
   independent draws of ``a`` against the fixed weights of channel ``o``:
   ``mu(v) = sum_a p(a) e(a, v)``, ``s2(v) = sum_a p(a) e(a, v)^2 - mu(v)^2``, and the error of
   each output of channel ``o`` has mean ``b_o = S_o sum_v c_o(v) mu(v)`` and variance
   ``r_o = S_o^2 sum_v c_o(v) s2(v)``, with ``S_o = act_scale * weight_scale_o`` (dequantisation).
   With bias compensation the layer subtracts the rounded mean, so only its rounding residue
   remains in ``b_o``.
2. Second-order expansion of each sample's loss with the empirical-Fisher (Gauss-Newton for
   cross-entropy) curvature ``H_n ~ g_n g_n^T``: ``dL_n ~ g_n.d + (g_n.d)^2 / 2``. The first-order
   term is dropped, as in OBS/HAWQ-style analyses: at a trained model the mean gradient vanishes
   and on a small calibration set that term is noise whose sign made damaging multipliers look
   free (measured: a tiny ResNet selected with it fell from 98.1% to 68.6%). The expectation of
   the second-order term over the error ``d`` (mean ``b``, independent noise of variance ``r``) is
   ``((G1_n.b)^2 + G2_n.r) / 2`` with ``G1_n[o] = sum_pos g_n[o, pos]`` and
   ``G2_n[o] = sum_pos g_n[o, pos]^2``; it is never negative.
3. The estimate is the mean over the calibration samples. It is cheap: one forward and backward
   pass per calibration batch serves every (layer, multiplier) pair.

What we measured (README): the estimate ranks (layer, multiplier) pairs like the measured loss
changes (Spearman 0.79 on the 4-bit tiny ResNet) but underestimates their size by one to two
orders of magnitude at 4-5 bits (errors of neighbouring products are correlated, and the loss is
far from quadratic for large errors), so the pass's ``budget`` is in these proxy units, not in
nats. We also tried the exact first-order expansion in the LUT entries (the gradient-weighted
operand-pair histogram): right magnitude for small errors but Spearman 0.68 and 50x slower, so it
is not used.

Zero padding of convolutions (products with ``a = 0`` outside the image) is left out of ``p(a)``.
"""

from __future__ import annotations

import contextlib

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...ir.errors import PassError
from .emulate import AppMulLayer
from .library import AppMul


@dataclass
class LayerProfile:
    name: str
    bits: int
    act_hist: np.ndarray  # (2^n,) probabilities of the quantized input values
    weight_counts: np.ndarray  # (O, 2^n) weights of channel o equal to each value
    dequant: np.ndarray  # (O,) act_scale * weight_scale
    g1: np.ndarray  # (N, O) per-sample sum of output gradients
    g2: np.ndarray  # (N, O) per-sample sum of squared output gradients
    macs: int  # multiply-accumulates per image


def _loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if logits.dim() != 2:
        raise PassError("appmul sensitivity needs a classifier (logits of shape (N, classes)); give a classification data set")
    return F.cross_entropy(logits, targets, reduction="sum")


def _positions_last(g: torch.Tensor, kind: str) -> torch.Tensor:
    """(N, O, positions) view of an output gradient (conv: pixels; linear: tokens)."""
    return g.flatten(2) if kind == "conv" else g.reshape(g.shape[0], -1, g.shape[-1]).transpose(1, 2)


@contextlib.contextmanager
def straight_through(model: nn.Module):
    """Within this block the power-of-two quantisers of a model quantised by passes/quant.py
    (activation quantisers of QMatMul, the output quantiser) pass gradients straight through
    (their rounding has zero gradient), and QMatMul and the QLayers left unreplaced run their
    fake-quant form instead of the exact float64 one, so that every AppMul layer's output
    gradient is seen (values agree up to float32 rounding)."""
    from ..quant import PoTQuantizer, QLayer, QMatMul

    patched, exact = [], []
    for m in model.modules():
        if isinstance(m, PoTQuantizer):
            def forward(x, _q=m, _f=type(m).forward):
                y = _f(_q, x)
                return x + (y - x).detach()
            m.forward = forward
            patched.append(m)
        elif isinstance(m, (QMatMul, QLayer)) and m.exact:
            m.exact = False
            exact.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward
        for m in exact:
            m.exact = True


def profile(model: nn.Module, layers: dict, images: torch.Tensor, targets: torch.Tensor, batch: int = 128) -> dict:
    """Operand histograms and per-sample output-gradient sums of every layer (exact multipliers)."""
    model.eval()
    side = {n: 1 << layer.bits for n, layer in layers.items()}
    hist = {n: np.zeros(side[n]) for n in layers}
    g1 = {n: [] for n in layers}
    g2 = {n: [] for n in layers}
    macs = {}
    saved = {n: (layer.multiplier, layer.correction) for n, layer in layers.items()}
    for layer in layers.values():
        layer.set_multiplier(None)
        layer.capture = True
    through = straight_through(model)
    through.__enter__()
    try:
        for start in range(0, images.shape[0], batch):
            x = images[start : start + batch].clone().requires_grad_(True)  # gradients reach every layer
            model.zero_grad(set_to_none=True)
            _loss(model(x), targets[start : start + batch]).backward()
            for n, layer in layers.items():
                hist[n] += np.bincount((layer.captured_input - layer.low).reshape(-1).numpy(), minlength=side[n])
                y = layer.captured_output
                if y.grad is None:
                    raise PassError(f"appmul: layer {n} does not reach the loss; it cannot be profiled")
                g = _positions_last(y.grad.detach().to(torch.float64), layer.kind)
                g1[n].append(g.sum(2).numpy())
                g2[n].append((g * g).sum(2).numpy())
                macs[n] = int(y[0].numel() * layer.reduction_size())
    finally:
        through.__exit__(None, None, None)
        for n, layer in layers.items():
            layer.capture = False
            layer.captured_input = layer.captured_output = None
            layer.set_multiplier(saved[n][0])
            layer.correction = saved[n][1]
    out = {}
    for n, layer in layers.items():
        if not any(g.any() for g in g2[n]):
            raise PassError(f"appmul: the loss gradient at layer {n}'s output is zero on every image; "
                            "something between it and the loss blocks gradients")
        layer.act_hist = hist[n] / hist[n].sum()
        out[n] = LayerProfile(
            n, layer.bits, layer.act_hist, layer.weight_counts(),
            (layer.act_scale * layer.weight_scale.to(torch.float64)).numpy(),
            np.concatenate(g1[n]), np.concatenate(g2[n]), macs[n],
        )
    return out


def error_moments(prof: LayerProfile, multiplier: AppMul, compensate: bool = False) -> tuple:
    """(b, r): per-output-channel mean and variance of one output's error (step 1)."""
    if multiplier.bits != prof.bits or not multiplier.signed:
        raise PassError(f"multiplier {multiplier.name} does not fit layer {prof.name} (signed {prof.bits}-bit)")
    e = multiplier.error.astype(np.float64)  # (a, w)
    mu = prof.act_hist @ e
    s2 = np.maximum(prof.act_hist @ (e * e) - mu * mu, 0.0)
    mean = prof.weight_counts @ mu
    if compensate:
        mean = mean - np.round(mean)
    return prof.dequant * mean, prof.dequant**2 * (prof.weight_counts @ s2)


def taylor_estimate(prof: LayerProfile, multipliers: list, compensate: bool = False) -> np.ndarray:
    """Estimated mean loss increase (steps 2-3) for each multiplier on this layer."""
    out = np.zeros(len(multipliers))
    for i, m in enumerate(multipliers):
        b, r = error_moments(prof, m, compensate)
        first = prof.g1 @ b
        out[i] = float(np.mean(0.5 * (first**2 + prof.g2 @ r)))
    return out


@torch.no_grad()
def mean_loss(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, batch: int = 256) -> float:
    total = 0.0
    for start in range(0, images.shape[0], batch):
        total += float(_loss(model(images[start : start + batch]), targets[start : start + batch]))
    return total / images.shape[0]


def measured_loss_change(model: nn.Module, layer: AppMulLayer, multiplier: AppMul, images, targets, base: float,
                         compensate: bool = False) -> float:
    """The true mean loss change when only ``layer`` uses ``multiplier``."""
    saved, saved_corr = layer.multiplier, layer.correction
    layer.set_multiplier(multiplier, compensate)
    try:
        return mean_loss(model, images, targets) - base
    finally:
        layer.set_multiplier(saved)
        layer.correction = saved_corr
