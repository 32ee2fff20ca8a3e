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
the integer graph and this reference agree bit for bit. The export keeps each rule: a half-even
quantiser is ``QuantizeLinear``, a half-up one ``sliver.PoTQuantize`` -> ``Cast`` (int8/uint8) ->
``DequantizeLinear`` (``QuantizeLinear`` rounds half to even, and with power-of-two scales ties
are frequent: an accumulator shifted right by ``s`` bits lands on .5 once in ``2^s`` values, so
exporting every quantiser as ``QuantizeLinear`` made ONNX Runtime disagree with this reference on
a few percent of tiny_mobilenet_v2's test images, docs/composition.md).

Modules (what the passes build on):

- :class:`PoTQuantizer`: per-tensor activation quantiser (``bits``, ``signed``, integer
  ``exponent``);
- :class:`QConv2d`, :class:`QLinear`: a layer with an input quantiser and integer weights
  (``weight_int``, per-output-channel ``weight_exponent``, ``wbits``; signed, zero-point 0) and a
  bias quantised to the accumulator's scale. :meth:`QLayer.integer_operands` hands out everything
  an integer kernel (or an approximate multiplier) needs;
- :class:`QMatMul`: activation x activation product (attention), two input quantisers;
- :class:`QSoftmax`, :class:`QGELU`, :class:`QLayerNorm` (integer non-linearities after I-BERT)
  and :class:`QTokenEmbed` (class token and position embedding at one exponent): a ViT's
  non-linear parts on integers, so that ``pot-shift`` can make the whole ViT integer-only. Each
  quantises its input to ``WIDE_BITS`` (16) signed bits, runs the integer op whose semantics are
  the numpy reference in :mod:`sliver.ir.opdefs` (int64 arithmetic, floor semantics spelled out
  there), and hands on the exact value ``y * 2^-e_out`` of its 16-bit integer output ``y``; the
  next layer's own quantiser requantises it.

Exact mode (``exact=True``, what the passes leave behind): the layers compute on the integers in
float64, where products and sums of 8-bit integers are exact, so the outputs are exactly
``acc * 2^-(e_x + e_w)``, the value the int32 accumulator of the integer graph stands for. In
ONNX export the modules emit QDQ (``QuantizeLinear`` or ``sliver.PoTQuantize`` / ``DequantizeLinear``
with scales ``2^-e``; a ``Clip`` on the integers for widths below 8 bits; weights as an int8
initializer dequantised per channel).
"""

from __future__ import annotations

import contextlib
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
    "QNonLinear",
    "QSoftmax",
    "QGELU",
    "QLayerNorm",
    "QTokenEmbed",
    "QTokenFusion",
    "WIDE_BITS",
    "int_range",
    "round_half_up",
    "quantize_pot",
    "nearest_exponent",
    "mse_exponent",
    "quant_layers",
    "quantizers",
    "set_exact",
    "straight_through",
    "trainable_weights",
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


class _QuantizeInt(torch.autograd.Function):
    """Half-even quantisation to the integers: exports as QuantizeLinear [-> Clip] (int8/uint8)."""

    @staticmethod
    def forward(ctx, x, exponent, bits, signed):
        q = quantize_pot(x, exponent, bits, signed, True)
        return q.to(torch.int8 if signed else torch.uint8)

    @staticmethod
    def symbolic(g, x, exponent, bits, signed):
        scale = g.op("Constant", value_t=torch.tensor(2.0 ** -exponent, dtype=torch.float32))
        container = torch.int8 if signed else torch.uint8
        q = g.op("QuantizeLinear", x, scale, g.op("Constant", value_t=torch.tensor(0, dtype=container)))
        if bits < 8:
            lo, hi = int_range(bits, signed)
            q = g.op("Clip", q, g.op("Constant", value_t=torch.tensor(lo, dtype=container)),
                     g.op("Constant", value_t=torch.tensor(hi, dtype=container)))
        return q


class _Dequant8(torch.autograd.Function):
    """int8/uint8 integers at ``2^-exponent`` -> float: exports as ``DequantizeLinear``."""

    @staticmethod
    def forward(ctx, q, exponent, signed):
        return q.float() * 2.0 ** -exponent

    @staticmethod
    def symbolic(g, q, exponent, signed):
        scale = g.op("Constant", value_t=torch.tensor(2.0 ** -exponent, dtype=torch.float32))
        zero = g.op("Constant", value_t=torch.tensor(0, dtype=torch.int8 if signed else torch.uint8))
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
            if self.half_even:
                return _QDQ.apply(x, self.exponent, self.bits, self.signed, self.half_even)
            return _Dequant8.apply(self.export_integers(x), self.exponent, self.signed)
        return self.integers(x) * 2.0 ** -self.exponent

    def export_integers(self, x: torch.Tensor) -> torch.Tensor:
        """In ONNX export: the integers ``q`` as an int8 (signed) or uint8 tensor. Half up:
        ``sliver.PoTQuantize`` -> ``Cast``, the rule of the integer graph's ``ShiftRequant``;
        half even (fed by the graph input): ``QuantizeLinear`` [-> ``Clip``]."""
        lo, hi = int_range(self.bits, self.signed)
        if self.half_even:
            return _QuantizeInt.apply(x, self.exponent, self.bits, self.signed)
        q = _SliverOp.apply("PoTQuantize", (("exponent", self.exponent), ("lo", lo), ("hi", hi)), x)
        return q.to(torch.int8 if self.signed else torch.uint8)


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
        self.ste_weights = False  # True inside trainable_weights()
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
        if self.ste_weights:
            return self._op(x, self._ste_weight(x.dtype), self._ste_bias(x.dtype))
        return self._op(x, self.weight_dequantized(x.dtype), self.bias_dequantized(x.dtype))

    def _ste_weight(self, dtype) -> torch.Tensor:
        """The dequantised weight as a function of the float weight (straight-through rounding)."""
        step = self._shape(torch.pow(torch.tensor(2.0, dtype=dtype), -self.weight_exponent.to(dtype)))
        lo, hi = int_range(self.wbits, True)
        v = self.weight.to(dtype) / step
        return (v + (torch.clamp(round_half_up(v), lo, hi) - v).detach()) * step

    def _ste_bias(self, dtype) -> torch.Tensor | None:
        """The bias rounded to the accumulator's scale as a function of the float bias."""
        if self.bias is None:
            return None
        scale = torch.pow(torch.tensor(2.0, dtype=dtype), self.accumulator_exponent().to(dtype))
        b = self.bias.to(dtype)
        return b + (round_half_up(b * scale) / scale - b).detach()

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
    #: the role it fills in a transformer block (``sliver.passes.transformer.plays``): the block
    #: layouts still read a block whose linears rapq quantised
    replaces = nn.Linear

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
# integer non-linearities (issue #7; I-BERT, Kim et al., ICML 2021, arXiv 2101.01321)

#: width of the integers a ViT's non-linearities read and write. 16 bits: the residual stream and
#: the attention scores have a wide range (I-BERT feeds them int32); at 16 bits per tensor the
#: rounding is ~2^-15 of the range, below what the 8-bit (or 4-bit) layer quantisers that follow
#: resolve, and every intermediate of the integer ops stays inside int64 (checked by the
#: ``ir.opdefs.*_constants`` helpers).
WIDE_BITS = 16
#: output exponent of the integer softmax: probabilities on the grid 2^-15 (the attention's
#: ``attn @ v`` quantiser then rounds them to its own, coarser, grid)
SOFTMAX_OUT_EXPONENT = 15


def range_exponent(max_abs: float, bits: int, signed: bool = True) -> int:
    """The largest exponent at which ``max_abs`` (times 2, one bit of headroom for data the
    calibration did not see) does not clip: ``floor(log2(qmax / (2 max_abs)))``. Used for the
    16-bit quantisers of the non-linearities, where rounding is negligible and clipping is what
    would hurt (the 8-bit rule :func:`nearest_exponent` may clip up to 41%)."""
    qmax = int_range(bits, signed)[1]
    if max_abs <= 0:
        return 0
    return int(math.floor(math.log2(qmax / (2.0 * max_abs))))


class _SliverOp(torch.autograd.Function):
    """A ``sliver.*`` integer op of :mod:`sliver.ir.opdefs`: eagerly its numpy reference (int64
    arithmetic), exported as the custom-domain node (its model-local function body makes ONNX
    Runtime run it). ``attrs`` is a tuple of (name, int) pairs."""

    @staticmethod
    def forward(ctx, op_type, attrs, *tensors):
        from ..ir import opdefs

        spec = opdefs.lookup(opdefs.SLIVER_DOMAIN, op_type)
        out = spec.reference([t.detach().cpu().numpy() for t in tensors], dict(attrs))[0]
        return torch.from_numpy(out)

    @staticmethod
    def symbolic(g, op_type, attrs, *tensors):
        out = g.op(f"sliver::{op_type}", *tensors, **{f"{k}_i": int(v) for k, v in attrs})
        sizes = tensors[0].type().sizes()
        if sizes is not None:
            out.setType(tensors[0].type().with_dtype(torch.int32).with_sizes(list(sizes)))
        return out


class _Dequant(torch.autograd.Function):
    """int32 integers at ``2^-exponent`` -> float: exports as ``DequantizeLinear`` (int32 input)."""

    @staticmethod
    def forward(ctx, y, exponent):
        return (y.double() * 2.0 ** -exponent).float()

    @staticmethod
    def symbolic(g, y, exponent):
        scale = g.op("Constant", value_t=torch.tensor(2.0 ** -exponent, dtype=torch.float32))
        return g.op("DequantizeLinear", y, scale)


class QNonLinear(nn.Module):
    """Base of the integer non-linearities: a ``WIDE_BITS`` signed input quantiser (exponent from
    the calibration range, :func:`range_exponent`), the integer op, and the output exponent.

    Not quantised (``quantized=False``, before calibration reaches it or when the pass leaves the
    non-linearities in float): the float op. Quantised: ``q = clip(floor(x 2^e_in + 0.5))`` in
    float64 (= ``sliver.PoTQuantize``), the integer op on ``q`` (its numpy reference), and
    ``y * 2^-e_out`` exactly (|y| < 2^16, exact in float32)."""

    out_signed = True

    def __init__(self):
        super().__init__()
        self.input_quantizer = PoTQuantizer(WIDE_BITS, True)
        self.out_exponent = 0
        self.quantized = False

    def float_op(self, x):  # pragma: no cover - overridden
        raise NotImplementedError

    def attributes(self) -> dict:  # pragma: no cover - overridden
        raise NotImplementedError

    def int_op(self, q):  # pragma: no cover - overridden
        raise NotImplementedError

    def out_range(self) -> tuple:
        return int_range(WIDE_BITS, self.out_signed)

    def calibrate(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Exponents from the float input ``x`` and output ``y`` of this op, then integer mode."""
        self.input_quantizer.exponent = range_exponent(float(x.abs().max()), WIDE_BITS)
        self.out_exponent = range_exponent(float(y.abs().max()), WIDE_BITS, self.out_signed)
        self.attributes()  # raises if the exponents overflow int64 somewhere
        self.quantized = True

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        q = self.input_quantizer
        lo, hi = int_range(q.bits, q.signed)
        if _exporting():
            return _SliverOp.apply("PoTQuantize", (("exponent", q.exponent), ("lo", lo), ("hi", hi)), x)
        return q.integers(x.double()).to(torch.int32)

    def dequantize(self, y: torch.Tensor, exponent: int, dtype) -> torch.Tensor:
        if _exporting():
            return _Dequant.apply(y, exponent)
        return (y.double() * 2.0 ** -exponent).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quantized:
            return self.float_op(x)
        return self.dequantize(self.int_op(self.quantize_input(x)), self.out_exponent, x.dtype)


class QSoftmax(QNonLinear):
    """Softmax over the last axis on integers (``sliver.IntSoftmax``: I-BERT's i-exp, then
    ``floor(E 2^15 / sum E)``); output probabilities on the grid ``2^-15``."""

    out_signed = False

    def __init__(self, out_scale: float = 1.0):
        super().__init__()
        shift = -math.log2(out_scale) if out_scale > 0 else 0.5
        if shift != round(shift) or shift < 0:
            raise ValueError(f"a softmax scaled by {out_scale} has no integer form; the scale must be 2^-k "
                             "(poly-act's d2: 1 or 0.5)")
        #: probabilities times ``2^-scale_shift`` (poly-act's d2): the integers of IntSoftmax read at
        #: the exponent ``out_exponent + scale_shift``
        self.scale_shift = int(shift)

    def float_op(self, x):
        p = x.softmax(dim=-1)
        return p * 2.0 ** -self.scale_shift if self.scale_shift else p

    def forward(self, x):
        if not self.quantized:
            return self.float_op(x)
        y = self.int_op(self.quantize_input(x))
        return self.dequantize(y, self.out_exponent + self.scale_shift, x.dtype)

    def calibrate(self, x, y):
        self.input_quantizer.exponent = range_exponent(float(x.abs().max()), WIDE_BITS)
        self.out_exponent = SOFTMAX_OUT_EXPONENT
        self.attributes()
        self.quantized = True

    def attributes(self) -> dict:
        from ..ir import opdefs

        return opdefs.int_softmax_constants(self.input_quantizer.exponent, self.out_exponent)

    def int_op(self, q):
        return _SliverOp.apply("IntSoftmax", tuple(self.attributes().items()), q)


class QGELU(QNonLinear):
    """GELU on integers (``sliver.IntGELU``: I-BERT's i-GELU with the erf polynomial, d1 = 1)."""

    def float_op(self, x):
        return F.gelu(x)

    def attributes(self) -> dict:
        from ..ir import opdefs

        lo, hi = self.out_range()
        return opdefs.int_gelu_constants(self.input_quantizer.exponent, self.out_exponent, WIDE_BITS, lo, hi)

    def int_op(self, q):
        return _SliverOp.apply("IntGELU", tuple(self.attributes().items()), q)


class QLayerNorm(QNonLinear):
    """LayerNorm over the last axis on integers (``sliver.IntLayerNorm``; gamma and beta become
    integers, see ``ir.opdefs.int_layernorm_constants``)."""

    def __init__(self, norm: nn.LayerNorm):
        super().__init__()
        if len(norm.normalized_shape) != 1 or norm.weight is None:
            raise ValueError("QLayerNorm takes a LayerNorm over the last axis with an affine weight")
        self.weight = nn.Parameter(norm.weight.detach().clone(), requires_grad=False)
        self.bias = nn.Parameter(norm.bias.detach().clone() if norm.bias is not None
                                 else torch.zeros_like(norm.weight), requires_grad=False)
        self.eps = float(norm.eps)
        self.dim = int(norm.normalized_shape[0])
        self.register_buffer("gamma_int", torch.zeros(self.dim, dtype=torch.int64))
        self.register_buffer("beta_int", torch.zeros(self.dim, dtype=torch.int64))
        self._attrs = None

    def float_op(self, x):
        return F.layer_norm(x, (self.dim,), self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)

    def attributes(self) -> dict:
        from ..ir import opdefs

        lo, hi = self.out_range()
        attrs, g, b = opdefs.int_layernorm_constants(
            self.input_quantizer.exponent, self.dim, WIDE_BITS, self.weight.detach().double().numpy(),
            self.bias.detach().double().numpy(), self.eps, self.out_exponent, lo, hi)
        self.gamma_int.copy_(torch.from_numpy(g))
        self.beta_int.copy_(torch.from_numpy(b))
        self._attrs = attrs
        return attrs

    def int_op(self, q):
        attrs = self._attrs if self._attrs is not None else self.attributes()
        return _SliverOp.apply("IntLayerNorm", tuple(attrs.items()), q, self.gamma_int, self.beta_int)


class QTokenEmbed(nn.Module):
    """A ViT's class token and position embedding on integers at one exponent ``e``:
    ``concat(cls_int, q(patches)) + pos_int`` with ``cls_int = round(cls 2^e)``,
    ``pos_int = round(pos 2^e)`` (int32) and the patch tokens quantised to ``WIDE_BITS`` at ``e``.
    The class-token row is ``q[:, :1] * 0 + cls_int`` so that the export needs no shape ops."""

    def __init__(self, cls_token: torch.Tensor, pos_embed: torch.Tensor):
        super().__init__()
        self.cls_token = nn.Parameter(cls_token.detach().clone(), requires_grad=False)
        self.pos_embed = nn.Parameter(pos_embed.detach().clone(), requires_grad=False)
        self.input_quantizer = PoTQuantizer(WIDE_BITS, True)
        self.register_buffer("cls_int", torch.zeros(cls_token.shape, dtype=torch.int32))
        self.register_buffer("pos_int", torch.zeros(pos_embed.shape, dtype=torch.int32))
        self.quantized = False

    def float_op(self, x):
        cls = self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1)
        return torch.cat((cls, x), dim=1) + self.pos_embed.to(x.dtype)

    def calibrate(self, x, y):
        e = range_exponent(float(y.abs().max()), WIDE_BITS)
        self.input_quantizer.exponent = e
        self.cls_int.copy_(round_half_up(self.cls_token.detach().double() * 2.0 ** e).to(torch.int32))
        self.pos_int.copy_(round_half_up(self.pos_embed.detach().double() * 2.0 ** e).to(torch.int32))
        self.quantized = True

    def forward(self, x):
        if not self.quantized:
            return self.float_op(x)
        q = QNonLinear.quantize_input(self, x)
        y = torch.cat((q[:, :1] * 0 + self.cls_int, q), dim=1) + self.pos_int
        return QNonLinear.dequantize(self, y, self.input_quantizer.exponent, x.dtype)


class QTokenFusion(nn.Module):
    """A token pass's selection stage (:class:`sliver.passes.transformer.TokenFusion`: keep the
    top-k patch tokens by score, fuse the rest into one token) on integers.

    Tokens and scores are quantised to ``WIDE_BITS`` (tokens signed, scores unsigned; exponents
    from the calibration ranges, :func:`range_exponent`), then, all in integer arithmetic:

    - top-k of the integer scores (ties: lower index first, ONNX ``TopK``) and a gather of the
      integer tokens;
    - the fused token ``f = round(sum_rest s_i x_i / sum_rest s_i)`` from two integer matrix
      products, ``sum_all s x - sum_kept s x`` (int64: 16 x 16 bits over at most 2^15 tokens), and
      a division rounding half away from zero on the magnitudes (``(2|n| + d) // 2d``, both
      non-negative, so truncating and flooring division agree), ``d = 1`` where every rest score is
      0. The scores' exponent cancels: ``f`` is on the tokens' own grid.

    The output ``cat(cls, kept, fused)`` is read at the tokens' exponent. Eagerly these are torch
    integer ops; exported, the same ops on the integers of ``sliver.PoTQuantize`` (an integer
    island that ``pot-shift`` keeps as it is), so the program and its integer graph agree bit for
    bit."""

    def __init__(self, fusion: nn.Module):
        super().__init__()
        self.keep_tokens, self.absorbs_last = int(fusion.keep_tokens), bool(fusion.absorbs_last)
        self.input_quantizer = PoTQuantizer(WIDE_BITS, True)
        self.score_quantizer = PoTQuantizer(WIDE_BITS, False)
        self.quantized = False

    def extra_repr(self) -> str:
        return f"keep_tokens={self.keep_tokens}, absorbs_last={self.absorbs_last}"

    def calibrate(self, x_max: float, score_max: float) -> None:
        self.input_quantizer.exponent = range_exponent(float(x_max), WIDE_BITS)
        self.score_quantizer.exponent = range_exponent(float(score_max), WIDE_BITS, False)
        self.quantized = True

    def _integers(self, q: PoTQuantizer, x: torch.Tensor) -> torch.Tensor:
        lo, hi = int_range(q.bits, q.signed)
        if _exporting():
            return _SliverOp.apply("PoTQuantize", (("exponent", q.exponent), ("lo", lo), ("hi", hi)), x)
        return q.integers(x.double()).to(torch.int32)

    def forward(self, x: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        from .transformer import TokenFusion

        if not self.quantized:
            return TokenFusion.forward(self, x, scores)
        qx, qs = self._integers(self.input_quantizer, x), self._integers(self.score_quantizer, scores)
        y = integer_token_fusion(qx, qs, self.keep_tokens, self.absorbs_last)
        return QNonLinear.dequantize(self, y, self.input_quantizer.exponent, x.dtype)


def integer_token_fusion(qx: torch.Tensor, qs: torch.Tensor, keep_tokens: int, absorbs_last: bool) -> torch.Tensor:
    """:class:`QTokenFusion`'s integer arithmetic on int32 tokens ``qx`` (B, T, C) and scores
    ``qs`` (B, T - 1); returns int32 (B, keep_tokens + 2, C)."""
    from .transformer import select_tokens

    others = qx[:, 1:]
    end = others.shape[1] - 1 if absorbs_last else others.shape[1]
    kept, _, kept_scores = select_tokens(others[:, :end], qs[:, :end], keep_tokens)
    w, wk = qs.to(torch.int64), kept_scores.to(torch.int64)
    num = w.unsqueeze(1) @ others.to(torch.int64) - wk.unsqueeze(1) @ kept.to(torch.int64)  # (B, 1, C)
    den = (w.sum(dim=1) - wk.sum(dim=1)).reshape(-1, 1, 1)
    den = den + (den == 0).to(torch.int64)
    mag = torch.div(2 * num.abs() + den, 2 * den, rounding_mode="trunc")
    fused = torch.where(num < 0, -mag, mag).to(torch.int32)
    return torch.cat([qx[:, :1], kept, fused], dim=1)


def nonlinear_modules(module: nn.Module) -> list:
    """(name, module) of every integer non-linearity (QNonLinear / QTokenEmbed / QTokenFusion)
    in ``module``."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, (QNonLinear, QTokenEmbed, QTokenFusion))]


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


@contextlib.contextmanager
def straight_through(model: nn.Module):
    """Within this block the power-of-two quantisers of a model quantised by passes/qlayers.py
    (activation quantisers of QMatMul, the output quantiser) pass gradients straight through
    (their rounding has zero gradient), and QMatMul and the QLayers left unreplaced run their
    fake-quant form instead of the exact float64 one, so that every AppMul layer's output
    gradient is seen (values agree up to float32 rounding). A ViT's integer non-linearities and
    token selection (QSoftmax, QGELU, QLayerNorm, QTokenEmbed, QTokenFusion: integer ops without
    gradients) run their float form meanwhile (they differ from it by ~1e-3, far below the
    multiplier errors being profiled). Used by appmul's sensitivity profile and by
    :func:`trainable_weights`."""
    patched, exact = [], []
    floated = [m for _, m in nonlinear_modules(model) if m.quantized]
    for m in floated:
        m.quantized = False
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
        for m in floated:
            m.quantized = True


@contextlib.contextmanager
def trainable_weights(model: nn.Module):
    """Quantisation-aware training of a power-of-two quantised ``model``: within this block every
    quantised :class:`QLayer` computes with ``clamp(round(w * 2^e_w)) * 2^-e_w`` of its float
    weight ``w`` and the bias rounded to the accumulator's scale, both rounded with a
    straight-through gradient (the rounding's gradient taken as 1; Bengio et al. 2013, as in
    LSQ / QAT practice), the exponents frozen; the rest of the model runs as in
    :func:`straight_through`. Yields the parameters to optimise (the layers' float weights and
    biases). Each float weight is first moved into the rounding cell of its current integer (a
    learned rounding such as rapq's may have rounded it the other way), so that the first
    forward computes exactly the calibrated integers. On a normal exit the integers are
    re-derived from the trained float weights (the same rounding); the model is left in exact
    mode with frozen parameters either way."""
    layers = [m for m in model.modules() if isinstance(m, QLayer) and m.quantized]
    params = []
    with torch.no_grad():
        for m in layers:
            step = m._shape(torch.pow(2.0, -m.weight_exponent.to(m.weight.dtype)))
            q = m.weight_int.to(m.weight.dtype)
            # inside [q - 1/2, q + 1/2) of the round-half-up rule, a margin of 1% of a step
            m.weight.copy_(torch.minimum(torch.maximum(m.weight, (q - 0.49) * step), (q + 0.49) * step))
            m.ste_weights = True
            params.append(m.weight.requires_grad_(True))
            if m.bias is not None:
                params.append(m.bias.requires_grad_(True))
    done = False
    try:
        with straight_through(model):
            yield params
        done = True
    finally:
        with torch.no_grad():
            for m in layers:
                m.ste_weights = False
                m.weight.requires_grad_(False)
                if m.bias is not None:
                    m.bias.requires_grad_(False)
                if done:
                    m.weight_int.copy_(quantize_pot(m.weight, m._shape(m.weight_exponent), m.wbits, True).to(torch.int8))
