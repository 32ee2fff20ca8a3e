"""Taylor estimate of the loss increase caused by one approximate multiplier in one layer.

FAMES (arXiv 2411.18055) estimates the accuracy impact of each (layer, AppMul) pair from a Taylor
expansion of the loss instead of evaluating every assignment; its exact formula is not public. Our
principled version, for a layer with output ``y`` (per sample ``n``: ``y_n``, gradient
``g_n = dL_n/dy_n`` measured on calibration data with exact multipliers):

1. The multiplier's error ``e(a, w) = LUT[a][w] - a w`` on the layer's *actual operands*: per
   input channel ``c`` the histogram ``p_c(a)`` of its quantized values, and each weight ``w`` at
   its kernel tap. A tap inside the image draws ``a`` from ``p_c`` (mean ``mu_c(w)``, variance
   ``s2_c(w)``); a tap in the zero padding multiplies ``a = 0`` and adds exactly ``e(0, w)``, which
   the perforated/broken Baugh-Wooley arrays make non-zero. Output positions are grouped into
   classes by which taps are padded (interior, edges, corners), and per output channel ``o`` and
   class ``k`` the error has mean ``b_ok = S_o (sum_valid mu_c(w) + sum_padded e(0, w))`` and variance
   ``r_ok = S_o^2 sum_valid s2_c(w)``, with ``S_o = act_scale * weight_scale_o`` (dequantisation).
   With bias compensation the layer subtracts the same expectation, rounded, per channel and
   class (:meth:`AppMulLayer.expected_error`), so only the rounding residue remains in ``b``.
   Each sample ``n`` also has its own operand histogram ``p_n(a)`` (a sparser image has more
   ``a = 0``, where truncations do not err); the shift ``d_nok = S_o sum_valid (mu_n(w) - mu(w))``
   is shared by all positions of the sample, so it is added to the mean (:func:`sample_bias`).
2. Second-order expansion of each sample's loss with the empirical-Fisher (Gauss-Newton for
   cross-entropy) curvature ``H_n ~ g_n g_n^T``: ``dL_n ~ g_n.d + (g_n.d)^2 / 2``. The first-order
   term is dropped, as in OBS/HAWQ-style analyses: at a trained model the mean gradient vanishes
   and on a small calibration set that term is noise whose sign made damaging multipliers look
   free (measured: a tiny ResNet selected with it fell from 98.1% to 68.6%). The expectation of
   the second-order term over the error ``d`` (mean ``b + d_n``, independent noise of variance
   ``r``) is ``((G1_n.(b + d_n))^2 + G2_n.r) / 2`` with ``G1_n[o, k] = sum_{pos in k} g_n[o, pos]``
   and ``G2_n[o, k] = sum_{pos in k} g_n[o, pos]^2``; it is never negative.
3. The estimate is the mean over the calibration samples. It is cheap: one forward and backward
   pass per calibration batch serves every (layer, multiplier) pair.

What we measured (README, protocol there): on the 6,5x11,6-bit tiny ResNet the estimate ranks
layers like the measured loss changes (per design, Spearman across the 13 layers: median 0.85
over 15 designs; 0.88 over all pairs) but underestimates their size 10-100x (the loss is far
from quadratic for large errors, and errors of neighbouring products are correlated), so the
pass's ``budget`` is in these proxy units, not in nats. Before the padding taps, per-channel
histograms and the per-sample shift were modelled the layer median was 0.54; most of that gap was
a real defect of the compensation (border outputs were over-corrected; fixing it cut the last
stage's measured loss changes 5-10x). Tried and not used: the exact first-order expansion in
the LUT entries (Spearman 0.68, 50x slower); Gauss-Newton curvature with the softmax Hessian
instead of the empirical Fisher (10 backward passes; median 0.82, magnitude 4x closer); errors
fully correlated across positions (median 0.65).
Zero padding of convolutions (products with ``a = 0`` outside the image) is left out of the
histograms; its taps enter through ``e(0, w)`` (step 1).
"""

from __future__ import annotations


from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...ir.errors import PassError
from ..qlayers import straight_through
from .emulate import AppMulLayer
from .library import AppMul


@dataclass
class LayerProfile:
    name: str
    bits: int
    act_hist: np.ndarray  # (2^n,) probabilities of the quantized input values
    weight_counts: np.ndarray  # (O, 2^n) weights of channel o equal to each value
    dequant: np.ndarray  # (O,) act_scale * weight_scale
    g1: np.ndarray  # (N, O, classes) per-sample sum of output gradients over each position class
    g2: np.ndarray  # (N, O, classes) the same for squared output gradients
    macs: int  # multiply-accumulates per image
    tap_counts: np.ndarray = None  # (O, taps, 2^n) weights of channel o at kernel tap k equal to each value
    valid: np.ndarray = None  # (classes, taps) 1 where the tap lies inside the image (0: zero padding)
    act_hist_channels: np.ndarray = None  # (C_in, 2^n) quantized input values per input channel
    weight_index: np.ndarray = None  # (O, C_in / groups, taps) operand index of each weight
    input_channel: np.ndarray = None  # (O, C_in / groups) global input channel of each weight column
    sample_hist: np.ndarray = None  # (N, 2^n) quantized input values of each calibration sample


def _loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy, in nats per image: a classifier's (logits (N, classes), labels (N,))
    or a segmenter's mean per-pixel cross-entropy of each image (logits (N, classes, H, W), labels
    (N, H, W)), so that budgets and max_loss mean the same per image for both tasks."""
    if logits.dim() == 2 and targets.dim() == 1:
        return F.cross_entropy(logits, targets, reduction="sum")
    if logits.dim() == 4 and targets.dim() == 3 and logits.shape[2:] == targets.shape[1:]:
        return F.cross_entropy(logits, targets, reduction="none").flatten(1).mean(1).sum()
    raise PassError(
        f"appmul sensitivity needs a classifier (logits (N, classes), labels (N,)) or a segmenter (logits "
        f"(N, classes, H, W), labels (N, H, W)); got logits {tuple(logits.shape)} and labels {tuple(targets.shape)}")


def _positions_last(g: torch.Tensor, kind: str) -> torch.Tensor:
    """(N, O, positions) view of an output gradient (conv: pixels; linear: tokens)."""
    return g.flatten(2) if kind == "conv" else g.reshape(g.shape[0], -1, g.shape[-1]).transpose(1, 2)


def profile(model: nn.Module, layers: dict, images: torch.Tensor, targets: torch.Tensor, batch: int = 128) -> dict:
    """Operand histograms and per-sample output-gradient sums of every layer (exact multipliers)."""
    model.eval()
    side = {n: 1 << layer.bits for n, layer in layers.items()}
    hist = {n: np.zeros(side[n]) for n in layers}
    g1 = {n: [] for n in layers}
    g2 = {n: [] for n in layers}
    macs, classes, chist, shist = {}, {}, {n: 0.0 for n in layers}, {n: [] for n in layers}
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
                a = layer.captured_input - layer.low
                a = a.transpose(0, 1).reshape(a.shape[1], -1) if layer.kind == "conv" else a.reshape(-1, a.shape[-1]).t()
                h = torch.zeros(a.shape[0], side[n], dtype=torch.float64)
                chist[n] = chist[n] + h.scatter_add_(1, a, torch.ones(a.shape, dtype=torch.float64)).numpy()
                a = layer.captured_input.reshape(layer.captured_input.shape[0], -1) - layer.low
                h = torch.zeros(a.shape[0], side[n], dtype=torch.float64)
                shist[n].append((h.scatter_add_(1, a, torch.ones(a.shape, dtype=torch.float64)) / a.shape[1]).numpy())
                y = layer.captured_output
                if y.grad is None:
                    raise PassError(f"appmul: layer {n} does not reach the loss; it cannot be profiled")
                g = _positions_last(y.grad.detach().to(torch.float64), layer.kind)
                if n not in classes:
                    classes[n] = layer.tap_classes()
                valid, index = classes[n]
                onehot = (torch.ones(g.shape[2], 1, dtype=torch.float64) if index is None else
                          F.one_hot(torch.from_numpy(index), valid.shape[0]).to(torch.float64))
                g1[n].append((g @ onehot).numpy())
                g2[n].append(((g * g) @ onehot).numpy())
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
        hist[n] = chist[n].sum(0)
        if not any(g.any() for g in g2[n]):
            raise PassError(f"appmul: the loss gradient at layer {n}'s output is zero on every image; "
                            "something between it and the loss blocks gradients")
        layer.act_hist = hist[n] / hist[n].sum()
        layer.act_hist_channels = chist[n] / np.maximum(chist[n].sum(1, keepdims=True), 1.0)
        out[n] = LayerProfile(
            n, layer.bits, layer.act_hist, layer.weight_counts(),
            (layer.act_scale * layer.weight_scale.to(torch.float64)).numpy(),
            np.concatenate(g1[n]), np.concatenate(g2[n]), macs[n], layer.tap_counts(), classes[n][0],
            layer.act_hist_channels, layer.weight_index(), layer.input_channel(), np.concatenate(shist[n]),
        )
    return out


def error_moments(prof: LayerProfile, multiplier: AppMul, compensate: bool = False) -> tuple:
    """(b, r): mean and variance of one output's error per output channel and position class
    (step 1), each (O, classes); a tap in the zero padding adds the fixed error e(0, v)."""
    if multiplier.bits != prof.bits or not multiplier.signed:
        raise PassError(f"multiplier {multiplier.name} does not fit layer {prof.name} (signed {prof.bits}-bit)")
    e = multiplier.error.astype(np.float64)  # (a, w)
    mu = prof.act_hist_channels @ e  # (C, 2^n) per input channel
    s2 = np.maximum(prof.act_hist_channels @ (e * e) - mu * mu, 0.0)
    low = -(1 << (prof.bits - 1))
    valid, chan, idx = prof.valid, prof.input_channel[:, :, None], prof.weight_index
    mean = mu[chan, idx].sum(1) @ valid.T + (prof.tap_counts @ e[-low]) @ (1.0 - valid).T
    if compensate:  # the layer subtracts the same rounded expectation (AppMulLayer.expected_error)
        mean = mean - np.round(mean)
    return prof.dequant[:, None] * mean, prof.dequant[:, None] ** 2 * (s2[chan, idx].sum(1) @ valid.T)


def sample_bias(prof: LayerProfile, multiplier: AppMul) -> np.ndarray:
    """(N, O, classes): how far each calibration sample's own mean error lies from the
    calibration-set mean (its operand histogram differs, e.g. a sparser image has more a = 0,
    where truncations do not err). This part of the error is shared by all output positions of
    the sample, so it enters with the gradient summed over positions, like a bias."""
    e = multiplier.error.astype(np.float64)
    dev = prof.sample_hist @ e - prof.act_hist @ e  # (N, 2^n)
    counts = np.einsum("otv,kt->okv", prof.tap_counts, prof.valid)  # weights at the valid taps
    return prof.dequant[None, :, None] * np.einsum("nv,okv->nok", dev, counts)


def taylor_estimate(prof: LayerProfile, multipliers: list, compensate: bool = False) -> np.ndarray:
    """Estimated mean loss increase (steps 2-3) for each multiplier on this layer."""
    out = np.zeros(len(multipliers))
    for i, m in enumerate(multipliers):
        b, r = error_moments(prof, m, compensate)
        first = np.einsum("nok,nok->n", prof.g1, b[None] + sample_bias(prof, m))
        out[i] = float(np.mean(0.5 * (first**2 + np.einsum("nok,ok->n", prof.g2, r))))
    return out


@torch.no_grad()
def mean_loss(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, batch: int = 256) -> float:
    total = 0.0
    for start in range(0, images.shape[0], batch):
        total += float(_loss(model(images[start : start + batch]), targets[start : start + batch]))
    return total / images.shape[0]


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, batch: int = 256) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * float(correct(model, images, targets, batch).float().mean())


@torch.no_grad()
def correct(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Per image, whether ``model``'s top-1 class is the target (a bool vector)."""
    return torch.cat([model(images[start : start + batch]).argmax(1) == targets[start : start + batch]
                      for start in range(0, images.shape[0], batch)])


def paired_drop(base: torch.Tensor, new: torch.Tensor) -> tuple[float, float]:
    """(drop, standard error) in accuracy points of ``new`` against ``base``, two per-image
    correctness vectors of one split. The drop is (lost - gained) / n; its standard error is the
    paired one (the images both get right or both get wrong carry no information about the
    difference): sqrt(lost + gained - (lost - gained)^2 / n) / n, the variance estimate behind
    McNemar's test."""
    n = base.numel()
    lost = int((base & ~new).sum())
    gained = int((~base & new).sum())
    diff = lost - gained
    return 100.0 * diff / n, 100.0 * max(lost + gained - diff * diff / n, 0.0) ** 0.5 / n


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


@torch.no_grad()
def log_probs(model: nn.Module, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([F.log_softmax(model(images[i : i + batch]).to(torch.float64), 1) for i in range(0, len(images), batch)])


#: standard deviations of the Gaussian probe errors per non-zero product (integer units), one per
#: decade; one forward pass each, for each of the two error kinds (half-decade steps ranked the
#: layers no better: README)
PROBE_LEVELS = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)


def _nonzero_operands(layer: AppMulLayer, x: torch.Tensor) -> torch.Tensor:
    """How many of each output's products have a non-zero activation operand: conv (N, 1, H, W),
    linear (..., 1)."""
    nz = (layer._round(x / layer.act_scale).clamp(layer.act_low, layer.act_high) != 0).to(torch.float32)
    if layer.kind == "linear":
        return nz.sum(-1, keepdim=True)
    ones = torch.ones(1, nz.shape[1], *layer.weight_int.shape[2:])
    return F.conv2d(nz, ones, None, layer.stride, layer.padding, layer.dilation) / layer.groups


@torch.no_grad()
def noise_response(model: nn.Module, layers: dict, images: torch.Tensor, levels: tuple = None, seed: int = 0) -> dict:
    """Each layer's loss response to an error of a given size: the mean KL divergence from the
    exact model on ``images`` when only that layer's accumulator gets Gaussian errors, one
    forward pass per level and kind. An output with ``k`` non-zero activation operands gets
    variance ``level^2 k`` (dequantised per output channel): ``level`` is the error's standard
    deviation per non-zero product (a product with ``a = 0`` does not err beyond the constant
    ``e(0, w)`` the compensation removes, so a sparse post-ReLU map errs only where there is
    ink). Two kinds: independent per output (row 0), and one error per sample and channel shared
    by all its positions or tokens (row 1; the per-sample mean shift of :func:`sample_bias`, which
    a global pooling sums instead of averaging out). Returns {layer: (2, len(levels)) nats}.

    Why (measured on the 6-bit tiny DeiT, README): behind a layer whose output is quantised again
    downstream, an error far below one quantisation step still flips some roundings of the next
    layer's input, and the flips cascade through the following requantisations to a KL that
    depends on the layer's depth much more than on the error's size (blocks.0.mlp.fc1: 2.3e-4 at
    0.01 accumulator units, 1.4e-3 at 1, 2.4e-3 at 100). A Taylor expansion of a smooth loss
    cannot express that; the response curve can, and for the last layer (no requantisation after
    it) it is the quadratic the Taylor term predicts (KL x100 per decade of the error)."""
    levels = PROBE_LEVELS if levels is None else levels
    generator = torch.Generator().manual_seed(seed)
    saved = {n: (layer.multiplier, layer.correction) for n, layer in layers.items()}
    for layer in layers.values():
        layer.set_multiplier(None)
    reference = log_probs(model, images)
    out = {}

    def add_noise(mod, args, y, level, shared):
        unit = (mod.act_scale * mod.weight_scale.to(torch.float64)).to(y.dtype)
        unit = unit.view((1, -1, 1, 1) if mod.kind == "conv" else (-1,))
        count = _nonzero_operands(mod, args[0])
        if not shared:
            return y + torch.randn(y.shape, generator=generator, dtype=y.dtype) * (level * unit * count.sqrt())
        positions = tuple(range(2, y.dim())) if mod.kind == "conv" else tuple(range(1, y.dim() - 1))
        shape = (y.shape[0], y.shape[1], 1, 1) if mod.kind == "conv" else (y.shape[0],) + (1,) * (y.dim() - 2) + (y.shape[-1],)
        count = count.mean(positions, keepdim=True) if positions else count
        return y + torch.randn(shape, generator=generator, dtype=y.dtype) * (level * unit * count.sqrt())

    try:
        for n, layer in layers.items():
            kl = np.zeros((2, len(levels)))
            for kind in (0, 1):
                for k, level in enumerate(levels):
                    handle = layer.register_forward_hook(
                        lambda mod, args, y, _l=float(level), _s=bool(kind): add_noise(mod, args, y, _l, _s))
                    try:
                        kl[kind, k] = float((reference.exp() * (reference - log_probs(model, images))).sum(1).mean())
                    finally:
                        handle.remove()
            out[n] = kl
    finally:
        for n, layer in layers.items():
            layer.set_multiplier(saved[n][0])
            layer.correction = saved[n][1]
    return out


def error_rms(prof: LayerProfile, multiplier: AppMul, compensate: bool = False) -> tuple:
    """The multiplier's error on this layer per non-zero product (integer units), split like
    :func:`noise_response`: (independent part: RMS of the accumulator error's standard deviation,
    shared part: RMS of its per-sample mean, the compensation's rounding residue plus
    :func:`sample_bias`), each averaged over output channels, position classes and samples and
    divided by the square root of the mean number of non-zero products per output."""
    b, r = error_moments(prof, multiplier, compensate)
    mean = b[None] + sample_bias(prof, multiplier)
    unit2 = prof.dequant[:, None] ** 2
    low = -(1 << (prof.bits - 1))
    nonzero = max(float(prof.weight_counts.sum(1).mean()) * (1.0 - prof.act_hist[-low]), 1e-12)
    return float(np.sqrt(np.mean(r / unit2) / nonzero)), float(np.sqrt(np.mean(mean * mean / unit2[None]) / nonzero))


def _read_response(response: np.ndarray, levels: tuple, x: float) -> float:
    """A response curve read at error size ``x``: log-log interpolation between the levels;
    below the smallest it falls linearly with the error (a rounding flip's probability is
    proportional to it), above the largest it grows with the error's square (Taylor regime)."""
    if x <= 0.0:
        return 0.0
    lv, resp, x = np.log(np.asarray(levels, dtype=np.float64)), np.log(np.maximum(response, 1e-300)), np.log(x)
    if x < lv[0]:
        return float(np.exp(resp[0] + (x - lv[0])))
    if x > lv[-1]:
        return float(np.exp(resp[-1] + 2.0 * (x - lv[-1])))
    return float(np.exp(np.interp(x, lv, resp)))


def probe_estimate(prof: LayerProfile, response: np.ndarray, multipliers: list, compensate: bool = False,
                   levels: tuple = None) -> np.ndarray:
    """Estimated loss increase (nats) of each multiplier on this layer: the layer's two noise
    responses (:func:`noise_response`) read at the multiplier's independent and shared error
    sizes on this layer's operands (:func:`error_rms`) and added. Exact: 0."""
    levels = PROBE_LEVELS if levels is None else levels
    out = np.zeros(len(multipliers))
    for i, m in enumerate(multipliers):
        if not m.is_exact:
            iid, shared = error_rms(prof, m, compensate)
            out[i] = _read_response(response[0], levels, iid) + _read_response(response[1], levels, shared)
    return out


def measured_divergence(model: nn.Module, layer: AppMulLayer, multipliers: list, images: torch.Tensor,
                        reference: torch.Tensor, compensate: bool = False) -> np.ndarray:
    """Mean KL(p_exact || p) over ``images`` when only ``layer`` uses each multiplier in turn
    (``reference``: the exact model's log-probabilities): the loss change the Taylor term
    estimates, measured (no first-order noise: it is >= 0 and zero for an exact layer)."""
    saved, saved_corr = layer.multiplier, layer.correction
    out = np.zeros(len(multipliers))
    try:
        for i, m in enumerate(multipliers):
            if m.is_exact:
                continue
            layer.set_multiplier(m, compensate)
            out[i] = float((reference.exp() * (reference - log_probs(model, images))).sum(1).mean())
    finally:
        layer.set_multiplier(saved)
        layer.correction = saved_corr
    return out

