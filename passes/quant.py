"""Power-of-two fake quantisation: the shared core of sliver's quantisation passes.

A quantised tensor is an integer tensor ``q`` and an integer *exponent* ``e``; it stands for the
real value ``q * 2^-e`` (scale ``2^-e``, zero-point 0). Quantising a real tensor ``x`` at ``bits``
bits is ``q = clamp(round(x * 2^e), qmin, qmax)`` with ``[qmin, qmax] = [-2^(b-1), 2^(b-1) - 1]``
(signed) or ``[0, 2^b - 1]`` (unsigned). Because the scale is a power of two, quantise, dequantise
and requantise are bit shifts (RAPQ, IJCAI 2022, arXiv 2204.12322, Sec. 3).

Rounding: a quantiser fed by a graph input rounds half to even, the rule of ONNX
``QuantizeLinear``, which is the op that quantises the input in the integer graph. Every other
quantiser requantises an integer accumulator by an arithmetic right shift, which rounds half up
(``(acc + 2^(s-1)) >> s``, the ``sliver.ShiftRequant`` op); those quantisers round half up too, so
the integer graph and this reference agree bit for bit.

Modules (what the passes build on):

- :class:`PoTQuantizer`: per-tensor activation quantiser (``bits``, ``signed``, integer
  ``exponent``);
- :class:`QConv2d`, :class:`QLinear`: a layer with an input quantiser and integer weights
  (``weight_int``, per-output-channel ``weight_exponent``, ``wbits``; signed, zero-point 0) and a
  bias quantised to the accumulator's scale. :meth:`QLayer.integer_operands` hands out everything
  an integer kernel (or an approximate multiplier) needs;
- :class:`QMatMul`: activation x activation product (attention), two input quantisers.

Exact mode (``exact=True``, what the passes leave behind): the layers compute on the integers in
float64, where products and sums of 8-bit integers are exact, so the outputs are exactly
``acc * 2^-(e_x + e_w)``, the value the int32 accumulator of the integer graph stands for. In
ONNX export the modules emit standard QDQ (``QuantizeLinear``/``DequantizeLinear`` with scales
``2^-e``; a ``Clip`` on the integers for widths below 8 bits; weights as an int8 initializer
dequantised per channel).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "PoTQuantizer",
    "QLayer",
    "QConv2d",
    "QLinear",
    "QMatMul",
    "int_range",
    "round_half_up",
    "quantize_pot",
    "nearest_exponent",
    "mse_exponent",
    "quant_layers",
    "quantizers",
    "set_exact",
]


def int_range(bits: int, signed: bool) -> tuple:
    """(qmin, qmax) of a ``bits``-bit integer."""
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def round_half_up(x: torch.Tensor) -> torch.Tensor:
    return torch.floor(x + 0.5)


def quantize_pot(x: torch.Tensor, exponent, bits: int, signed: bool, half_even: bool = False) -> torch.Tensor:
    """The integers ``clamp(round(x * 2^exponent), qmin, qmax)`` as a tensor of x's float dtype.

    ``exponent`` is an int or an integer tensor that broadcasts against ``x`` (per channel).
    """
    lo, hi = int_range(bits, signed)
    scaled = x * torch.pow(torch.tensor(2.0, dtype=x.dtype), torch.as_tensor(exponent, dtype=x.dtype))
    q = torch.round(scaled) if half_even else round_half_up(scaled)
    return torch.clamp(q, lo, hi)


def nearest_exponent(max_abs: float, bits: int, signed: bool) -> int:
    """The per-layer nearest power-of-two exponent (the ``pot-naive`` rule): the scale
    ``max|x| / qmax`` rounded to the nearest power of two in the log domain."""
    qmax = int_range(bits, signed)[1]
    if max_abs <= 0:
        return 0
    return int(-round(math.log2(max_abs / qmax)))


def mse_exponent(x: torch.Tensor, bits: int, signed: bool, around: int | None = None, span: int = 2) -> int:
    """The exponent in ``around +- span`` that minimises ``||Q(x) - x||^2`` (per tensor)."""
    if around is None:
        around = nearest_exponent(float(x.abs().max()), bits, signed)
    best, best_err = around, None
    for e in range(around - span, around + span + 1):
        err = float(((quantize_pot(x, e, bits, signed) * 2.0 ** -e - x) ** 2).sum())
        if best_err is None or err < best_err:
            best, best_err = e, err
    return best


# ------------------------------------------------------------------------------------------------
# export helpers: standard QDQ


class _QDQ(torch.autograd.Function):
    """Fake quantisation that exports as QuantizeLinear [-> Clip] -> DequantizeLinear."""

    @staticmethod
    def forward(ctx, x, exponent, bits, signed, half_even):
        return quantize_pot(x, exponent, bits, signed, half_even) * 2.0 ** -exponent

    @staticmethod
    def symbolic(g, x, exponent, bits, signed, half_even):
        scale = g.op("Constant", value_t=torch.tensor(2.0 ** -exponent, dtype=torch.float32))
        container = torch.int8 if signed else torch.uint8
        zero = g.op("Constant", value_t=torch.tensor(0, dtype=container))
        q = g.op("QuantizeLinear", x, scale, zero)
        if bits < 8:
            lo, hi = int_range(bits, signed)
            q = g.op(
                "Clip",
                q,
                g.op("Constant", value_t=torch.tensor(lo, dtype=container)),
                g.op("Constant", value_t=torch.tensor(hi, dtype=container)),
            )
        return g.op("DequantizeLinear", q, scale, zero)


class _WeightDQ(torch.autograd.Function):
    """Integer weights dequantised per output channel: exports as DequantizeLinear(axis=0)."""

    @staticmethod
    def forward(ctx, weight_int, exponent):
        shape = (-1,) + (1,) * (weight_int.dim() - 1)
        return weight_int.float() * torch.pow(2.0, -torch.tensor(exponent, dtype=torch.float32)).reshape(shape)

    @staticmethod
    def symbolic(g, weight_int, exponent):
        exponent = torch.tensor(exponent, dtype=torch.float32)
        scales = g.op("Constant", value_t=torch.pow(2.0, -exponent).reshape(-1))
        zeros = g.op("Constant", value_t=torch.zeros(exponent.numel(), dtype=torch.int8))
        return g.op("DequantizeLinear", weight_int, scales, zeros, axis_i=0)


def _exporting() -> bool:
    return torch.onnx.is_in_onnx_export()


# ------------------------------------------------------------------------------------------------
# modules

#: float32 holds every integer below 2^24 exactly; the exact reference stays exact below it
FLOAT32_EXACT = 1 << 24


def _exact_out(acc: torch.Tensor, scale: torch.Tensor, dtype) -> torch.Tensor:
    """``acc * scale`` in the caller's dtype; exact while ``|acc| < 2^24`` (checked)."""
    if dtype == torch.float32 and acc.numel() and float(acc.abs().max()) >= FLOAT32_EXACT:
        raise OverflowError("an accumulator reached 2^24: the float32 reference is no longer exact; "
                            "run the model in float64")
    return (acc * scale).to(dtype)


class PoTQuantizer(nn.Module):
    """Per-tensor power-of-two activation quantiser with an integer exponent.

    ``enabled=False`` passes values through (used while calibrating layers downstream of it).
    ``half_even`` picks the rounding rule (see the module docstring).
    """

    def __init__(self, bits: int = 8, signed: bool = True, exponent: int = 0, half_even: bool = False):
        super().__init__()
        self.bits, self.signed, self.half_even = int(bits), bool(signed), bool(half_even)
        self.exponent = int(exponent)
        self.enabled = True

    def extra_repr(self) -> str:
        sign = "int" if self.signed else "uint"
        return f"{sign}{self.bits}, exponent={self.exponent}, round={'half_even' if self.half_even else 'half_up'}"

    def integers(self, x: torch.Tensor) -> torch.Tensor:
        """The integers ``q`` (in x's float dtype) this quantiser maps ``x`` to."""
        return quantize_pot(x, self.exponent, self.bits, self.signed, self.half_even)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if _exporting():
            return _QDQ.apply(x, self.exponent, self.bits, self.signed, self.half_even)
        return self.integers(x) * 2.0 ** -self.exponent


class QLayer(nn.Module):
    """Common part of quantised conv / linear layers (see the module docstring)."""

    def _init_quant(self, weight: torch.Tensor, bias, wbits: int, abits: int, signed_input: bool) -> None:
        self.wbits, self.abits = int(wbits), int(abits)
        self.input_quantizer = PoTQuantizer(abits, signed_input)
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)  # float reference
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        out = weight.shape[0]
        self.register_buffer("weight_exponent", torch.zeros(out, dtype=torch.int64))
        self.register_buffer("weight_int", torch.zeros_like(weight, dtype=torch.int8))
        self.quantized = False  # False: float layer (before calibration reaches it)
        self.exact = False
        #: importance weight of each output channel in the reconstruction loss (BN statistics)
        self.register_buffer("channel_weight", torch.ones(out))

    # -- integer view -----------------------------------------------------------------------
    def _shape(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape((-1,) + (1,) * (self.weight.dim() - 1))

    def set_weights(self, exponent: torch.Tensor, weight_int: torch.Tensor) -> None:
        lo, hi = int_range(self.wbits, True)
        wi = torch.as_tensor(weight_int)
        if wi.min() < lo or wi.max() > hi:
            raise ValueError(f"weight integers outside [{lo}, {hi}]")
        self.weight_exponent.copy_(torch.as_tensor(exponent, dtype=torch.int64))
        self.weight_int.copy_(wi.to(torch.int8))
        self.quantized = True

    def weight_dequantized(self, dtype=torch.float32) -> torch.Tensor:
        scale = torch.pow(torch.tensor(2.0, dtype=dtype), -self.weight_exponent.to(dtype))
        return self.weight_int.to(dtype) * self._shape(scale)

    def accumulator_exponent(self) -> torch.Tensor:
        """Per-output-channel exponent of the integer accumulator: ``e_x + e_w``."""
        return self.weight_exponent + self.input_quantizer.exponent

    def bias_int(self) -> torch.Tensor | None:
        """The bias as integers at the accumulator's scale (round half up), int64."""
        if self.bias is None:
            return None
        scaled = self.bias.detach().double() * torch.pow(2.0, self.accumulator_exponent().double())
        return round_half_up(scaled).to(torch.int64)

    def bias_dequantized(self, dtype=torch.float32) -> torch.Tensor | None:
        b = self.bias_int()
        if b is None:
            return None
        return (b.double() * torch.pow(2.0, -self.accumulator_exponent().double())).to(dtype)

    def integer_operands(self) -> dict:
        """What an integer kernel needs: integer weights and exponents, bit widths, signedness."""
        q = self.input_quantizer
        return {
            "weight_int": self.weight_int.clone(),
            "weight_exponent": self.weight_exponent.clone(),
            "wbits": self.wbits,
            "weight_signed": True,
            "input_exponent": q.exponent,
            "abits": q.bits,
            "input_signed": q.signed,
            "bias_int": self.bias_int(),
            "accumulator_exponent": self.accumulator_exponent(),
        }

    # -- forward ----------------------------------------------------------------------------
    def _op(self, x, w, b):  # pragma: no cover - overridden
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quantized:
            return self._op(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        if _exporting():
            x = self.input_quantizer(x)
            w = _WeightDQ.apply(self.weight_int, tuple(int(e) for e in self.weight_exponent))
            bias = self.bias_dequantized()
            # a constant of the exported graph, not the ops that computed it
            bias = None if bias is None else torch.tensor(bias.tolist(), dtype=torch.float32)
            return self._op(x, w, bias)
        if self.exact:
            # integers in float64: every product and partial sum is exact
            xq = self.input_quantizer.integers(x.double())
            acc = self._op(xq, self.weight_int.double(), None)
            shape = self._acc_shape(acc)
            if self.bias is not None:
                acc = acc + self.bias_int().double().reshape(shape)
            return _exact_out(acc, torch.pow(2.0, -self.accumulator_exponent().double()).reshape(shape), x.dtype)
        x = self.input_quantizer(x)
        return self._op(x, self.weight_dequantized(x.dtype), self.bias_dequantized(x.dtype))

    def _acc_shape(self, acc):  # pragma: no cover - overridden
        raise NotImplementedError


class QConv2d(QLayer):
    def __init__(self, conv: nn.Conv2d, wbits: int = 8, abits: int = 8, signed_input: bool = True):
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("only zero padding with explicit sizes is supported")
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.in_channels, self.out_channels, self.kernel_size = conv.in_channels, conv.out_channels, conv.kernel_size
        self._init_quant(conv.weight, conv.bias, wbits, abits, signed_input)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"groups={self.groups}, wbits={self.wbits}, abits={self.abits}")

    def _op(self, x, w, b):
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def _acc_shape(self, acc):
        return (1, -1, 1, 1)


class QLinear(QLayer):
    def __init__(self, linear: nn.Linear, wbits: int = 8, abits: int = 8, signed_input: bool = True):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._init_quant(linear.weight, linear.bias, wbits, abits, signed_input)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, wbits={self.wbits}, abits={self.abits}"

    def _op(self, x, w, b):
        return F.linear(x, w, b)

    def _acc_shape(self, acc):
        return (-1,)


class QMatMul(nn.Module):
    """``a @ b`` of two activations, each through its own per-tensor quantiser."""

    def __init__(self, abits: int = 8, signed_a: bool = True, signed_b: bool = True):
        super().__init__()
        self.abits = int(abits)
        self.quantizer_a = PoTQuantizer(abits, signed_a)
        self.quantizer_b = PoTQuantizer(abits, signed_b)
        self.quantized = False
        self.exact = False

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if not self.quantized:
            return a @ b
        if self.exact and not _exporting():
            qa = self.quantizer_a.integers(a.double())
            qb = self.quantizer_b.integers(b.double())
            scale = torch.tensor(2.0 ** -(self.quantizer_a.exponent + self.quantizer_b.exponent), dtype=torch.float64)
            return _exact_out(qa @ qb, scale, a.dtype)
        return self.quantizer_a(a) @ self.quantizer_b(b)


# ------------------------------------------------------------------------------------------------
# walking a model


def quant_layers(module: nn.Module) -> list:
    """(name, module) of every QLayer / QMatMul in ``module``, in registration order."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, (QLayer, QMatMul))]


def quantizers(module: nn.Module) -> list:
    return [(n, m) for n, m in module.named_modules() if isinstance(m, PoTQuantizer)]


def set_exact(module: nn.Module, exact: bool = True) -> None:
    """Switch every quantised layer of ``module`` to (or from) exact integer arithmetic."""
    for _, m in quant_layers(module):
        m.exact = exact
