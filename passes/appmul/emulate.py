"""Torch emulation of integer layers whose multiplies go through an AppMul LUT.

The integer interface (what a quantization pass hands over; sliver's PoT quantizer can attach
here later): an integer weight tensor ``weight_int`` (``n``-bit two's complement, the shape of the
float weight), a per-output-channel ``weight_scale``, a per-tensor activation scale ``act_scale``
and the operand width ``bits``; activations are quantized as ``clamp(round(x / act_scale))`` to
the same signed ``n``-bit range. :class:`AppMulLayer` builds that interface itself from a float
``nn.Conv2d``/``nn.Linear`` (symmetric per-channel weights, activation scale from calibration)
until a quantized layer from the PoT passes is available.

Emulation (the decomposition every LUT emulator relies on: AdaPT, TFApprox, TorchApprox): with weights
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
        if self.kind == "linear":
            # the role it fills in a transformer block (``sliver.passes.transformer.plays``), so
            # the block layouts still read a block whose linears appmul replaced
            self.replaces = nn.Linear
            self.in_features, self.out_features = layer.in_features, layer.out_features
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
        #: (C_in, 2^n) per input channel (set by the profile; used instead of act_hist when present)
        self.act_hist_channels: np.ndarray | None = None
        #: integer correction subtracted from the accumulator (bias compensation): one per output
        #: channel, or per output channel and pixel, shape (O, H_out, W_out), for a zero-padded
        #: convolution (its border outputs see padded operands a = 0, see ``expected_error``)
        self.register_buffer("correction", None)
        #: spatial size of the last input (a padded convolution's border positions depend on it)
        self.in_hw: tuple | None = None
        self.capture = False
        self.captured_input = None
        self.captured_output = None
        #: activation operand range (a sub-range of the multiplier's signed range) and rounding
        self.act_low, self.act_high = self.low, self.high
        self.half_up = False
        #: integer bias added to the accumulator (layers taken from passes/qlayers.py), else None
        self.register_buffer("bias_int", None)
        #: the input quantiser of the power-of-two layer this one replaces (from_qlayer), else None
        self.pot_input = None

    @classmethod
    def from_qlayer(cls, qlayer) -> "AppMulLayer":
        """The AppMul layer of a power-of-two quantised ``QConv2d``/``QLinear`` (passes/qlayers.py,
        after ``rapq`` or ``pot-naive``), built from :meth:`QLayer.integer_operands` alone: its
        integer weights, per-channel weight exponents, input quantiser (exponent, width,
        signedness, rounding) and integer bias, so that with the exact multiplier it computes
        what the quantised layer computes in exact mode, bit for bit. The multiplier is signed and
        ``max(wbits, abits + 1 if the input is unsigned else abits)`` wide: the narrowest signed
        multiplier whose operand range holds both operands (an unsigned 4-bit activation 0..15
        needs the 5-bit signed multiplier, as the library has no mixed-sign multipliers)."""
        from ..qlayers import QConv2d, QLinear, int_range

        if not isinstance(qlayer, (QConv2d, QLinear)) or not qlayer.quantized:
            raise PassError(f"appmul takes calibrated QConv2d/QLinear layers, not {type(qlayer).__name__}")
        ops = qlayer.integer_operands()
        bits = max(ops["wbits"], ops["abits"] + (0 if ops["input_signed"] else 1))
        w = ops["weight_int"].to(torch.float32)
        if isinstance(qlayer, QConv2d):
            proxy = nn.Conv2d(w.shape[1] * qlayer.groups, w.shape[0], tuple(w.shape[2:]), qlayer.stride, qlayer.padding,
                              qlayer.dilation, qlayer.groups, bias=False)
        else:
            proxy = nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            proxy.weight.copy_(w)
        layer = cls(proxy, bits, 2.0 ** -ops["input_exponent"])
        layer.weight_int = ops["weight_int"].to(torch.int64)
        layer.weight_scale = torch.pow(2.0, -ops["weight_exponent"].to(torch.float32))
        layer.act_low, layer.act_high = int_range(ops["abits"], ops["input_signed"])
        layer.half_up = not qlayer.input_quantizer.half_even
        layer.bias_int = ops["bias_int"]
        # the power-of-two operands: the export quantises the input as the quantised layer does and
        # dequantises the int32 accumulator per channel, so that pot-shift reads it as integers
        layer.pot_input = qlayer.input_quantizer
        layer.register_buffer("accumulator_exponent", ops["accumulator_exponent"].clone())
        return layer

    # -- configuration ---------------------------------------------------------------------------
    def set_multiplier(self, multiplier: AppMul | None, compensate: bool = False) -> None:
        """Use ``multiplier`` (None or an exact one: plain integer arithmetic).

        With ``compensate``, the expected accumulator error of each output (:meth:`expected_error`)
        is rounded to an integer and subtracted from the accumulator: the constant-correction idea
        of truncated multipliers (Schulte & Swartzlander 1993) moved to the layer, where it costs
        one integer add per output (it folds into the layer's bias; for a zero-padded
        convolution the border outputs get their own constants, a per-pixel bias map)."""
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
            expected, index = self.expected_error(self.multiplier)
            corr = torch.from_numpy(np.round(expected).astype(np.int64))
            self.correction = corr[:, 0] if expected.shape[1] == 1 else corr[:, index].reshape(corr.shape[0], *self._out_hw())

    def weight_counts(self) -> np.ndarray:
        """(O, 2^n): how many weights of each output channel equal each operand value."""
        w = (self.weight_int.reshape(self.weight_int.shape[0], -1) - self.low).numpy()
        side = 1 << self.bits
        return np.stack([np.bincount(row, minlength=side) for row in w]).astype(np.float64)

    def tap_counts(self) -> np.ndarray:
        """(O, taps, 2^n): per output channel and kernel tap (kh x kw; 1 for linear), how many
        weights (over the input channels) equal each operand value."""
        w = self.weight_int
        w = (w.reshape(w.shape[0], w.shape[1], -1) if self.kind == "conv" else w.reshape(w.shape[0], -1, 1)) - self.low
        side = 1 << self.bits
        out = torch.zeros(w.shape[0], w.shape[2], side, dtype=torch.float64)
        out.scatter_add_(2, w.transpose(1, 2).contiguous(), torch.ones(w.shape[0], w.shape[2], w.shape[1], dtype=torch.float64))
        return out.numpy()

    def _out_hw(self) -> tuple:
        if self.in_hw is None:
            raise PassError("appmul: a padded convolution needs one forward pass (calibration) before compensation")
        (h, w), (kh, kw) = self.in_hw, self.weight_int.shape[2:]
        (sh, sw), (ph, pw), (dh, dw) = self.stride, self.padding, self.dilation
        return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1

    def tap_classes(self) -> tuple:
        """Output positions grouped by which kernel taps fall inside the image: ``(valid, index)``,
        ``valid`` (classes, taps) 0/1 and ``index`` (positions,) each position's class. A layer
        without zero padding (and a linear layer) has one class with every tap valid."""
        taps = 1 if self.kind == "linear" else int(np.prod(self.weight_int.shape[2:]))
        if self.kind == "linear" or not any(self.padding):
            return np.ones((1, taps)), None
        (ph, pw), (kh, kw) = self.padding, self.weight_int.shape[2:]
        self._out_hw()  # checks in_hw
        inside = F.pad(torch.ones(1, 1, *self.in_hw), (pw, pw, ph, ph))
        cols = F.unfold(inside, (kh, kw), dilation=self.dilation, stride=self.stride)[0].t()  # (positions, taps)
        valid, index = torch.unique(cols, dim=0, return_inverse=True)
        return valid.numpy().astype(np.float64), index.numpy()

    def weight_index(self) -> np.ndarray:
        """(O, C_in, taps) operand index (value - low) of each weight, with its global input channel
        in the middle axis (grouped convolutions: the other groups' channels are skipped)."""
        w = self.weight_int
        w = (w.reshape(w.shape[0], w.shape[1], -1) if self.kind == "conv" else w.reshape(w.shape[0], -1, 1)) - self.low
        return w.numpy()

    def input_channel(self) -> np.ndarray:
        """(O, C_in / groups): the global input channel of each weight column."""
        out_ch, cin = self.weight_int.shape[:2]
        groups = self.groups if self.kind == "conv" else 1
        return (np.arange(out_ch)[:, None] // (out_ch // groups)) * cin + np.arange(cin)[None, :]

    def expected_error(self, multiplier: AppMul) -> tuple:
        """Expected accumulator error ``(O, classes)`` per output channel and position class
        (:meth:`tap_classes`), and the classes' position index (None: one class). A tap inside the
        image draws its activation from ``act_hist``, so weight ``v`` adds ``sum_a p(a) e(a, v)``;
        a tap in the zero padding multiplies ``a = 0`` and adds exactly ``e(0, v)``, which is not
        zero for the Baugh-Wooley perforated/broken arrays, and which the histogram-only
        expectation got wrong at the border (measured on the 4x4 maps of the tiny ResNet's last
        stage: a third of the mean error left uncompensated)."""
        err = multiplier.error.astype(np.float64)
        counts = self.tap_counts()  # (O, taps, 2^n)
        valid, index = self.tap_classes()
        if self.act_hist_channels is not None:  # each input channel's own operand histogram
            mu = self.act_hist_channels @ err  # (C, 2^n)
            inner = mu[self.input_channel()[:, :, None], self.weight_index()].sum(1)  # (O, taps)
        else:
            inner = counts @ (self.act_hist @ err)  # (O, taps)
        pad = counts @ err[-self.low]  # (O, taps): e(0, v)
        return inner @ valid.T + pad @ (1.0 - valid).T, index

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
        u = u + (self._round(u) - u).detach()
        return torch.clamp(u, self.act_low, self.act_high)

    def _round(self, u: torch.Tensor) -> torch.Tensor:
        return torch.floor(u + 0.5) if self.half_up else torch.round(u)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            return self._export_forward(x)
        x_int = self.quantize_input(x)
        if self.kind == "conv":
            self.in_hw = tuple(x.shape[-2:])
        if self.capture:
            self.captured_input = x_int.detach().to(torch.int64)
        acc = self.accumulate(x_int)
        shape_c = (1, -1, 1, 1) if self.kind == "conv" else (1,) * (acc.dim() - 1) + (-1,)
        if self.correction is not None:
            acc = acc - self._correction_like(acc)
        if self.bias_int is not None:
            acc = acc + self.bias_int.to(acc.dtype).view(shape_c)
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

    def _correction_like(self, acc: torch.Tensor) -> torch.Tensor:
        corr = self.correction.to(acc.dtype)
        if corr.dim() == 1:
            return corr.view((1, -1, 1, 1) if self.kind == "conv" else (1,) * (acc.dim() - 1) + (-1,))
        if tuple(corr.shape[1:]) != tuple(acc.shape[2:]):
            raise PassError(f"appmul: the bias compensation was computed for {tuple(corr.shape[1:])} outputs, "
                            f"not {tuple(acc.shape[2:])}; set the multiplier again after a forward pass at this size")
        return corr.unsqueeze(0)

    def accumulate(self, x_int: torch.Tensor, decompose: bool | None = None) -> torch.Tensor:
        """The integer accumulator sum_k mult(a_k, w_k), as a float tensor holding integers."""
        if self.multiplier is None and not decompose:
            dtype = self._dtype(self.high * self.high + 1)
            return self._op(x_int.to(dtype), self.weight_int.to(dtype))
        table = self.lut if self.lut is not None else _exact_table(self.bits)
        planned = self._planned(x_int)
        return planned if planned is not None else self._decomposed(x_int, table)

    def _plan(self) -> dict | None:
        """The bit-factor plan of ``backends.lowering.app_matmul_plan`` for this layer's weights
        and multiplier, with its weights and bias as tensors and the float dtype that holds every
        partial sum exactly (bounded over the whole operand range, so decided once); cached per
        multiplier and weights. None when there is none (a logarithmic multiplier, a grouped
        convolution)."""
        if self.kind == "conv" and self.groups != 1:
            return None
        key = (self.multiplier_name, self.weight_int.data_ptr(), self.weight_int._version, tuple(self.weight_int.shape))
        cached = getattr(self, "_plan_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        from ...backends.lowering import app_matmul_plan
        from ...ir import opdefs

        plan = None
        table = self.table_twos_complement()
        factors = opdefs.app_matmul_bit_factors(table.numpy())
        if factors is not None:
            w = self.weight_int.reshape(self.weight_int.shape[0], -1).t().numpy()  # (K, N), K = (c, kh, kw)
            plan = app_matmul_plan(w, factors, self.bits)
        if plan is not None:
            weights = torch.from_numpy(np.ascontiguousarray(plan["weights"]))  # (P * K, N), part-major
            bias = torch.from_numpy(np.asarray(plan["bias"], dtype=np.int64))
            n_parts = len(plan["parts"])
            k = weights.shape[0] // n_parts
            grid = self._plan_parts(torch.arange(self.low, self.high + 1), plan["parts"])
            bound = k * sum(int(g.abs().max()) * int(weights[i * k:(i + 1) * k].abs().max())
                            for i, g in enumerate(grid))
            plan = {**plan, "weights": weights, "bias": bias,
                    "dtype": torch.float32 if bound + int(bias.abs().max()) < 2**24 else torch.float64,
                    # the dtype the decomposition gives: what the layer's dequantisation multiplies
                    "out_dtype": self._dtype(int(table.abs().max()) + 1)}
        self._plan_cache = (key, plan)
        return plan

    def _plan_parts(self, a: torch.Tensor, parts: list) -> list:
        """The plan's stored parts ``(raw - lo) >> shift`` of the integer operand ``a`` (int64)."""
        pattern = a % (1 << self.bits)
        out = []
        for kind, payload, lo, shift in parts:
            if kind == "a":
                raw = a
            elif kind == "bit":
                raw = (pattern >> int(payload)) & 1
            else:  # "sum": sum_i payload[i] bit_i(a)
                raw = sum(int(c) * ((pattern >> i) & 1) for i, c in enumerate(payload))
            out.append((raw - int(lo)) >> int(shift))
        return out

    def _planned(self, x_int: torch.Tensor) -> torch.Tensor | None:
        """sum_k LUT[a_k, w_k] as one product of the plan's parts of A with its weight blocks plus
        its bias (:func:`backends.lowering.app_matmul_plan`: the exact product and the
        multiplier's error split along the operand bits), exact in integers: the lowering's own
        arithmetic, (1 + error parts) times the layer's MACs instead of one product per weight
        value. A zero-padded convolution pads its operand with a = 0 before the parts are taken, as
        the integer graph's im2col does: the plan's constant terms (its bias) cover every tap."""
        plan = self._plan()
        if plan is None:
            return None
        a = x_int.detach().to(torch.int64)  # the lookup carries no gradient either
        if self.kind == "conv" and any(self.padding):
            ph, pw = self.padding
            a = F.pad(a, (pw, pw, ph, ph), value=0)  # parts of the padded operand a = 0, as the im2col has
        parts = self._plan_parts(a, plan["parts"])
        dtype, out_dtype, weights, bias = plan["dtype"], plan["out_dtype"], plan["weights"], plan["bias"]
        if self.kind == "linear":
            acc = torch.cat(parts, dim=-1).to(dtype) @ weights.to(dtype)
            return (acc + bias.to(dtype)).to(out_dtype)
        o, c, kh, kw = self.weight_int.shape
        w = weights.t().reshape(o, len(parts), c, kh, kw).reshape(o, len(parts) * c, kh, kw)
        acc = self._op(torch.cat(parts, dim=1).to(dtype), w.to(dtype), padded=True)
        return (acc + bias.to(dtype).view(1, -1, 1, 1)).to(out_dtype)

    def _op(self, x: torch.Tensor, w: torch.Tensor, padded: bool = False, strided: bool = False) -> torch.Tensor:
        if self.kind == "linear":
            return x @ w.t()
        return F.conv2d(x, w, None, 1 if strided else self.stride, 0 if padded else self.padding, self.dilation,
                        self.groups)

    def _decomposed(self, x_int: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """sum_v f_v(A) @ 1[W == v] over the weight values v present, in chunks."""
        dtype = self._dtype(int(table.abs().max()) + 1)
        idx = (x_int.to(torch.int64) - self.low)
        if self.kind == "conv" and any(self.padding):
            ph, pw = self.padding
            idx = F.pad(idx, (pw, pw, ph, ph), value=-self.low)  # a = 0 in the padding
        strided = self.kind == "conv" and tuple(self.weight_int.shape[2:]) == (1, 1) and self.stride != (1, 1)
        if strided:  # a strided 1x1 conv reads only every stride-th pixel: drop the others before the lookup
            idx = idx[:, :, :: self.stride[0], :: self.stride[1]]
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
                part = self._op(f, masks, padded=True, strided=strided)
            acc = part if acc is None else acc + part
        return acc

    def extra_repr(self) -> str:
        return f"{self.kind}, bits={self.bits}, multiplier={self.multiplier_name}, act_scale={self.act_scale:.4g}"

    # -- the integer graph (ONNX export) -------------------------------------------------------------
    def table_twos_complement(self) -> torch.Tensor:
        """The multiplier's table (int32) in the row/column order of ``sliver.AppMatMul``: index
        ``i`` is the operand whose ``bits``-bit two's-complement pattern is ``i``."""
        table = self.lut if self.lut is not None else _exact_table(self.bits)
        side = 1 << self.bits
        values = (torch.arange(side) + side // 2) % side - side // 2
        order = values - self.low
        return table[order][:, order].to(torch.int32)

    def _patch_index(self, channels: int, height: int, width: int) -> tuple:
        """(L, K) flat indices into a padded (C, H, W) map: the im2col of this convolution,
        K ordered (channel, kernel row, kernel column) as the weights are; and (H_out, W_out)."""
        kh, kw = self.weight_int.shape[2:]
        (sh, sw), (dh, dw) = self.stride, self.dilation
        ho, wo = (height - dh * (kh - 1) - 1) // sh + 1, (width - dw * (kw - 1) - 1) // sw + 1
        c, u, v = np.meshgrid(np.arange(channels), np.arange(kh), np.arange(kw), indexing="ij")
        i, j = np.meshgrid(np.arange(ho), np.arange(wo), indexing="ij")
        rows = i.reshape(-1, 1) * sh + u.reshape(1, -1) * dh
        cols = j.reshape(-1, 1) * sw + v.reshape(1, -1) * dw
        return torch.from_numpy(c.reshape(1, -1) * height * width + rows * width + cols), (ho, wo)

    def integer_accumulator(self, x_int: torch.Tensor) -> torch.Tensor:
        """The int32 accumulator through ``sliver.AppMatMul`` (what the ONNX export emits): a linear
        layer is one AppMatMul; a convolution pads the integer input with a = 0, gathers its
        patches (im2col, a constant index) and multiplies them with the (K, O) weight matrix.
        Eagerly it evaluates the op's numpy reference, so it also checks the emulation."""
        from ...ir.errors import UnsupportedOpError

        a = x_int.to(torch.int8)
        out_channels = self.weight_int.shape[0]
        w = self.weight_int.reshape(out_channels, -1).t().contiguous().to(torch.int8)
        attrs = (self.multiplier_name, self.bits, float(self.multiplier.energy_rel) if self.multiplier is not None else 1.0)
        if self.kind == "linear":
            return _AppMatMulOp.apply(a, w, self.table_twos_complement(), *attrs)
        if self.groups != 1:
            raise UnsupportedOpError(f"appmul: a grouped convolution (groups={self.groups}) has no AppMatMul export yet")
        ph, pw = self.padding
        if ph or pw:
            a = F.pad(a, (pw, pw, ph, ph))  # the multiplier sees a = 0 in the padding
        b, c, h, wd = (int(d) for d in a.shape)
        index, (ho, wo) = self._patch_index(c, h, wd)
        patches = a.reshape(b, c * h * wd)[:, index.reshape(-1)].reshape(b, ho * wo, -1)
        acc = _AppMatMulOp.apply(patches, w, self.table_twos_complement(), *attrs)
        return acc.transpose(1, 2).reshape(b, out_channels, ho, wo)

    def _export_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pot_input is not None:
            return self._export_pot(x)
        x_int = torch.clamp(self._round(x / self.act_scale), self.act_low, self.act_high)
        acc = self.integer_accumulator(x_int).to(x.dtype)
        shape = (1, -1, 1, 1) if self.kind == "conv" else (1,) * (acc.dim() - 1) + (-1,)
        if self.correction is not None:
            acc = acc - self._correction_like(acc)
        if self.bias_int is not None:
            acc = acc + self.bias_int.to(acc.dtype).view(shape)
        y = acc * (self.act_scale * self.weight_scale.to(acc.dtype)).view(shape)
        if self.bias is not None:
            y = y + self.bias.view(shape)
        return y


    def _export_pot(self, x: torch.Tensor) -> torch.Tensor:
        """The export of a layer of a power-of-two quantised model (:meth:`from_qlayer`): integers
        end to end, ``quantiser -> AppMatMul -> - correction + bias (int32) -> DequantizeLinear``
        at the accumulator's per-channel scale ``2^-(e_x + e_w)``; ``pot-shift`` turns the
        quantiser into a shift and keeps the rest as integer ops."""
        acc = self.integer_accumulator(self.pot_input.export_integers(x))
        shape = (1, -1, 1, 1) if self.kind == "conv" else (1,) * (acc.dim() - 1) + (-1,)
        if self.correction is not None:
            acc = acc - self._correction_like(acc).to(torch.int32)
        if self.bias_int is not None:
            acc = acc + self.bias_int.to(torch.int32).view(shape)
        axis = 1 if self.kind == "conv" else acc.dim() - 1
        return _ChannelDequant.apply(acc, tuple(int(e) for e in self.accumulator_exponent), axis)


class _ChannelDequant(torch.autograd.Function):
    """int32 accumulator at per-channel scales ``2^-e[c]`` -> float: exports as DequantizeLinear(axis)."""

    @staticmethod
    def forward(ctx, acc, exponents, axis):
        scale = torch.pow(2.0, -torch.tensor(exponents, dtype=torch.float64))
        shape = [1] * acc.dim()
        shape[axis] = -1
        return (acc.double() * scale.view(shape)).float()

    @staticmethod
    def symbolic(g, acc, exponents, axis):
        scales = g.op("Constant", value_t=torch.pow(2.0, -torch.tensor(exponents, dtype=torch.float32)))
        zeros = g.op("Constant", value_t=torch.zeros(len(exponents), dtype=torch.int32))
        return g.op("DequantizeLinear", acc, scales, zeros, axis_i=axis)


class _AppMatMulOp(torch.autograd.Function):
    """``sliver.AppMatMul`` (``ir.opdefs``): eagerly its numpy reference, exported as the node."""

    @staticmethod
    def forward(ctx, a, w, lut, multiplier, bits, energy_ratio):
        from ...ir import opdefs

        out = opdefs.app_matmul_reference([a.numpy(), w.numpy(), lut.numpy()], {})[0]
        return torch.from_numpy(out)

    @staticmethod
    def symbolic(g, a, w, lut, multiplier, bits, energy_ratio):
        out = g.op("sliver::AppMatMul", a, w, lut, multiplier_s=multiplier, bits_i=bits, energy_ratio_f=energy_ratio)
        sizes = a.type().sizes()
        if sizes is not None:
            out.setType(a.type().with_dtype(torch.int32).with_sizes(list(sizes[:-1]) + [w.type().sizes()[-1]]))
        return out


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


def quantized_layers(module: nn.Module) -> list:
    """Names of the calibrated QConv2d/QLinear layers of a model quantised by passes/qlayers.py."""
    from ..qlayers import QConv2d, QLinear

    return [n for n, m in module.named_modules() if isinstance(m, (QConv2d, QLinear)) and m.quantized]


def multiplier_width(qlayer) -> int:
    """The signed multiplier width a quantised layer needs (see :meth:`AppMulLayer.from_qlayer`)."""
    q = qlayer.input_quantizer
    return max(qlayer.wbits, q.bits + (0 if q.signed else 1))


def attach_quantized(module: nn.Module, names: list) -> dict:
    """Replace each named quantised layer (in place) by :meth:`AppMulLayer.from_qlayer`; layers
    whose operands need a multiplier wider than the library's 8 bits (an unsigned 8-bit input)
    and grouped convolutions (depthwise: ``sliver.AppMatMul`` has one weight matrix, a grouped
    convolution one per group) are left as they are (exact integer arithmetic) and not returned."""
    layers = {}
    for n in names:
        q = module.get_submodule(n)
        if multiplier_width(q) > 8 or getattr(q, "groups", 1) != 1:
            continue
        layer = AppMulLayer.from_qlayer(module.get_submodule(n))
        _set_submodule(module, n, layer)
        layers[n] = layer
    return layers


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)
