"""Torch emulation of integer layers whose multiplies go through an AppMul LUT.

The integer interface (what a quantization pass hands over; sliver's PoT quantizer can attach
here later): an integer weight tensor ``weight_int`` (``n``-bit two's complement, the shape of the
float weight), a per-output-channel ``weight_scale``, a per-tensor activation scale ``act_scale``
and the operand width ``bits``; activations are quantized as ``clamp(round(x / act_scale))`` to
the same signed ``n``-bit range. :class:`AppMulLayer` builds that interface itself from a float
``nn.Conv2d``/``nn.Linear`` (symmetric per-channel weights, activation scale from calibration)
until a quantized layer from the PoT passes is available.

Emulation (the decomposition every LUT emulator relies on, REFERENCE.md "FAMES"): with weights
taking the values ``v``,

    sum_k LUT[a_k][w_k] = sum_v f_v(A) @ 1[W == v],   f_v(a) = LUT[a][v],

so the layer is a handful of ordinary convolutions/matmuls of elementwise-tabulated activations
against 0/1 weight masks. Only the values ``v`` that occur in ``W`` are visited; they are stacked
along the reduction axis in chunks (one conv/matmul per chunk). Zero padding is applied to the
integer activations *before* the table lookup, because the hardware multiplier sees ``a = 0``
there and an approximate multiplier need not return 0 for it. Accumulation runs in float32 when
every partial sum is an integer below 2^24 (exact), otherwise in float64.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...ir.errors import PassError
from .library import AppMul, operand_range

#: largest number of stacked (channel x value) planes handled by one conv/matmul
CHUNK_ELEMENTS = 2**24


class AppMulLayer(nn.Module):
    """A conv2d or linear layer computed with integer operands and an (approximate) multiplier."""

    def __init__(self, layer: nn.Module, bits: int, act_scale: float) -> None:
        super().__init__()
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            raise PassError(f"appmul emulates Conv2d and Linear layers, not {type(layer).__name__}")
        if not 2 <= bits <= 8:
            raise PassError(f"appmul: operand width {bits} is outside the library's 2..8 bits; choose bits in 2..8")
        if not act_scale > 0:
            raise PassError("appmul: activation scale must be > 0 (calibrate on data that reaches the layer)")
        self.kind = "conv" if isinstance(layer, nn.Conv2d) else "linear"
        self.bits = int(bits)
        self.low, self.high = operand_range(self.bits, True)
        w = layer.weight.detach().to(torch.float64)
        flat = w.reshape(w.shape[0], -1)
        scale = flat.abs().amax(dim=1).clamp_min(1e-12) / self.high
        w_int = torch.clamp(torch.round(flat / scale[:, None]), self.low, self.high).reshape(w.shape)
        self.register_buffer("weight_int", w_int.to(torch.int64))
        self.register_buffer("weight_scale", scale.to(torch.float32))
        self.act_scale = float(act_scale)
        bias = layer.bias.detach().clone() if layer.bias is not None else None
        self.register_buffer("bias", bias)
        if self.kind == "conv":
            if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
                raise PassError("appmul: only convolutions with numeric zero padding are supported")
            self.stride, self.padding = tuple(layer.stride), tuple(layer.padding)
            self.dilation, self.groups = tuple(layer.dilation), layer.groups
        self.multiplier: AppMul | None = None
        self.register_buffer("lut", None)
        #: probabilities of the quantized input values (set by the sensitivity profile)
        self.act_hist: np.ndarray | None = None
        #: integer per-output-channel correction subtracted from the accumulator (bias compensation)
        self.register_buffer("correction", None)
        self.capture = False
        self.captured_input = None
        self.captured_output = None

    # -- configuration ---------------------------------------------------------------------------
    def set_multiplier(self, multiplier: AppMul | None, compensate: bool = False) -> None:
        """Use ``multiplier`` (None or an exact one: plain integer arithmetic).

        With ``compensate``, the expected accumulator error of each output channel on this
        layer's measured input distribution, ``sum_v count_o(v) * sum_a p(a) e(a, v)``, is rounded
        to an integer and subtracted from the accumulator: the constant-correction idea of
        truncated multipliers (Schulte & Swartzlander 1993) moved to the layer, where it costs
        one integer add per output (it folds into the layer's bias)."""
        if multiplier is not None and (multiplier.bits != self.bits or not multiplier.signed):
            raise PassError(
                f"appmul: multiplier {multiplier.name} does not fit a signed {self.bits}-bit layer; "
                f"pick one of the library's s{self.bits}_* multipliers"
            )
        self.multiplier = None if multiplier is None or multiplier.is_exact else multiplier
        self.lut = None if self.multiplier is None else torch.from_numpy(self.multiplier.table.copy())
        self.correction = None
        if compensate and self.multiplier is not None:
            if self.act_hist is None:
                raise PassError("appmul: bias compensation needs the layer's input histogram; profile the layer first")
            self.correction = torch.from_numpy(np.round(self.expected_error(self.multiplier)).astype(np.int64))

    def weight_counts(self) -> np.ndarray:
        """(O, 2^n): how many weights of each output channel equal each operand value."""
        w = (self.weight_int.reshape(self.weight_int.shape[0], -1) - self.low).numpy()
        side = 1 << self.bits
        return np.stack([np.bincount(row, minlength=side) for row in w]).astype(np.float64)

    def expected_error(self, multiplier: AppMul) -> np.ndarray:
        """(O,) expected accumulator error per output channel under ``act_hist``."""
        mu = self.act_hist @ multiplier.error.astype(np.float64)
        return self.weight_counts() @ mu

    @property
    def multiplier_name(self) -> str:
        return self.multiplier.name if self.multiplier is not None else f"s{self.bits}_exact"

    def reduction_size(self) -> int:
        return int(np.prod(self.weight_int.shape[1:]))

    def _dtype(self, table_max: int) -> torch.dtype:
        return torch.float32 if self.reduction_size() * table_max < 2**24 else torch.float64

    # -- forward -----------------------------------------------------------------------------------
    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Integer activations; the rounding passes gradients straight through (STE) so the
        sensitivity analysis sees every layer's output gradient."""
        u = x / self.act_scale
        u = u + (torch.round(u) - u).detach()
        return torch.clamp(u, self.low, self.high)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_int = self.quantize_input(x)
        if self.capture:
            self.captured_input = x_int.detach().to(torch.int64)
        acc = self.accumulate(x_int)
        if self.correction is not None:
            shape_c = (1, -1, 1, 1) if self.kind == "conv" else (1,) * (acc.dim() - 1) + (-1,)
            acc = acc - self.correction.to(acc.dtype).view(shape_c)
        scale = self.act_scale * self.weight_scale.to(acc.dtype)
        shape = (1, -1, 1, 1) if self.kind == "conv" else (1,) * (acc.dim() - 1) + (-1,)
        y = (acc * scale.view(shape)).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.view(shape)
        if self.capture:
            if y.requires_grad:
                y.retain_grad()
            self.captured_output = y
        return y

    def accumulate(self, x_int: torch.Tensor, decompose: bool | None = None) -> torch.Tensor:
        """The integer accumulator sum_k mult(a_k, w_k), as a float tensor holding integers."""
        if self.multiplier is None and not decompose:
            dtype = self._dtype(self.high * self.high + 1)
            return self._op(x_int.to(dtype), self.weight_int.to(dtype))
        table = self.lut if self.lut is not None else _exact_table(self.bits)
        return self._decomposed(x_int, table)

    def _op(self, x: torch.Tensor, w: torch.Tensor, padded: bool = False) -> torch.Tensor:
        if self.kind == "linear":
            return x @ w.t()
        return F.conv2d(x, w, None, self.stride, 0 if padded else self.padding, self.dilation, self.groups)

    def _decomposed(self, x_int: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """sum_v f_v(A) @ 1[W == v] over the weight values v present, in chunks."""
        dtype = self._dtype(int(table.abs().max()) + 1)
        idx = (x_int.to(torch.int64) - self.low)
        if self.kind == "conv" and any(self.padding):
            ph, pw = self.padding
            idx = F.pad(idx, (pw, pw, ph, ph), value=-self.low)  # a = 0 in the padding
        values = torch.unique(self.weight_int)
        w = self.weight_int
        chunk = max(1, CHUNK_ELEMENTS // max(1, idx.numel()))
        acc = None
        for start in range(0, values.numel(), chunk):
            vs = values[start : start + chunk]
            cols = table[:, vs - self.low].to(dtype)  # (2^n, |vs|): f_v for each v
            f = cols[idx]  # (..., |vs|): f_v(A)
            masks = (w.unsqueeze(-1) == vs).to(dtype)  # (O, ..., |vs|): 1[W == v]
            if self.kind == "linear":
                part = f.flatten(-2) @ masks.flatten(1).t()
            else:
                # stack (channel, value) planes channel-major so groups stay contiguous
                b, c, h, wd, nv = f.shape
                f = f.permute(0, 1, 4, 2, 3).reshape(b, c * nv, h, wd)
                o, ci, kh, kw, _ = masks.shape
                masks = masks.permute(0, 1, 4, 2, 3).reshape(o, ci * nv, kh, kw)
                part = self._op(f, masks, padded=True)
            acc = part if acc is None else acc + part
        return acc

    def extra_repr(self) -> str:
        return f"{self.kind}, bits={self.bits}, multiplier={self.multiplier_name}, act_scale={self.act_scale:.4g}"


_EXACT: dict = {}


def _exact_table(bits: int) -> torch.Tensor:
    if bits not in _EXACT:
        lo, hi = operand_range(bits, True)
        v = torch.arange(lo, hi + 1, dtype=torch.int64)
        _EXACT[bits] = v[:, None] * v[None, :]
    return _EXACT[bits]


# ------------------------------------------------------------------------------------------------
# building an emulated model


def quantizable_layers(module: nn.Module) -> list:
    """Names of the Conv2d / Linear submodules, in module order."""
    return [n for n, m in module.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@torch.no_grad()
def calibrate_act_scales(module: nn.Module, names: list, bits: dict, images: torch.Tensor, batch: int = 128) -> dict:
    """Per-layer activation scale max|x| / (2^(n-1) - 1) over ``images`` (float model)."""
    peaks = {n: 0.0 for n in names}
    hooks = []
    for n in names:
        def hook(mod, inputs, _n=n):
            peaks[_n] = max(peaks[_n], float(inputs[0].detach().abs().max()))
        hooks.append(module.get_submodule(n).register_forward_pre_hook(hook))
    try:
        for start in range(0, images.shape[0], batch):
            module(images[start : start + batch])
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for n in names:
        if peaks[n] <= 0:
            raise PassError(f"appmul: layer {n} saw only zeros during calibration; give calibration data that exercises it")
        out[n] = peaks[n] / ((1 << (bits[n] - 1)) - 1)
    return out


def attach(module: nn.Module, bits: dict, images: torch.Tensor) -> dict:
    """Replace each named layer of ``module`` (in place) by an exact :class:`AppMulLayer` with the
    given operand width, calibrated on ``images``; returns name -> AppMulLayer."""
    names = list(bits)
    scales = calibrate_act_scales(module, names, bits, images)
    layers = {}
    for n in names:
        layer = AppMulLayer(module.get_submodule(n), bits[n], scales[n])
        _set_submodule(module, n, layer)
        layers[n] = layer
    return layers


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)
