"""pot-shift: fold power-of-two QDQ scales into an integer-only graph (onnx level).

Input: a QDQ model whose scales are all powers of two (``rapq`` / ``pot-naive`` exported to
ONNX). Output: the same network in integers, in the form HAWQ-V3 (Yao et al., ICML 2021) calls
integer-only with dyadic requantisation, here with numerators 1 (scales ``2^-k``):

- ``Conv`` / ``Gemm`` on dequantised operands -> ``ConvInteger`` / ``MatMulInteger`` on the int8 /
  uint8 integers, int32 accumulation; the bias becomes int32 at the accumulator's scale
  ``2^-(e_x + e_w[c])`` (BatchNorm is already folded by the quantiser);
- each quantiser on an integer value becomes ``sliver.ShiftRequant``: rounding (half up)
  arithmetic right shift by ``e_in[c] - e_out`` per channel, saturation to the quantiser's range
  (where that shift is negative, a ``Mul`` by ``2^(e_out - e_in[c])`` first, which is exact);
- between layers: ``Relu`` on int32; ReLU6's ``Clip(0, 6)`` -> ``Relu`` and ``x - Relu(x - h)`` with
  the per-channel integer bound ``h = floor(6 * 2^e)``; ``Add`` aligns both operands to the finer exponent by exact
  left shifts (``Mul`` by ``2^k``); global average pooling over a power-of-two number of positions
  -> ``ReduceSum`` and ``+log2 n`` on the exponent; ``Flatten``/``Reshape``/``Transpose``/``Gather``
  apply to the integers, the exponent (tracked per element) going through the same layout change;
  ``Mul`` by a constant ``2^k`` only changes the exponent (attention's ``q * 16^-0.5``);
- a ViT's integer non-linearities (``rapq{int_nonlinear=true}``, I-BERT): the export already has
  them as ``sliver.PoTQuantize`` (a 16-bit quantiser, here ``ShiftRequant`` to int32) -> integer
  ops (``sliver.IntLayerNorm`` / ``IntSoftmax`` / ``IntGELU``, the class token's ``Concat`` and the
  position embedding's ``Add`` on int32) -> ``DequantizeLinear``, whose scale gives the exponent
  of the integers after it; those integer ops are kept as they are.

The exponent of every integer value is tracked per channel at compile time; no float op remains
between the input's ``QuantizeLinear`` and the output's ``DequantizeLinear``, and the pass checks
that: an op with no integer form is a one-line :class:`UnsupportedOpError` naming the node, or,
with ``allow_float=true``, is kept in float between a ``DequantizeLinear`` and a fresh
``QuantizeLinear``, with a warning and the node listed in the report (``float_nodes``).

``sliver.ShiftRequant`` is defined in :mod:`sliver.ir.opdefs`; the model carries its body of
exact standard integer ops as a model-local function (ONNX Runtime inlines it) and TVM lowers it
with :mod:`sliver.backends.lowering`. The bit widths of every integer layer are stored in the
model's metadata (``sliver.bits``: node -> [weight bits, input bits]) for the FPGA cost model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ...ir import opdefs
from ...ir.errors import PassError, UnsupportedOpError
from ...ir.onnx_level import SLIVER_DOMAIN, make_program, value_types
from ...ir.program import Program
from ..infra.base import Pass, option, register
from ..infra.facts import FLOAT_TOKEN_SCORES, INTEGER_ONLY, QUANTIZED_POT

BITS_METADATA = "sliver.bits"
_DATA_INTS = (TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16, TensorProto.INT32)
_INT_TYPES = {TensorProto.INT8: (np.int8, True), TensorProto.UINT8: (np.uint8, False)}


@dataclasses.dataclass
class PotShiftOptions:
    allow_float: bool = option(False, "keep ops with no integer form in float (with a warning) instead of failing")


@dataclasses.dataclass
class IntValue:
    """An integer tensor standing for ``value * 2^-exponent`` (exponent broadcasts per channel)."""

    name: str
    exponent: np.ndarray  # int64, broadcastable against the tensor
    dtype: int  # TensorProto elem type of ``name``
    bits: int = 32
    signed: bool = True
    #: the tensor stands for ``value * 2^-exponent / divisor``: a sum over ``divisor`` positions
    #: (an average pool over a window that is not a power of two) waiting for the quantiser after
    #: it, which divides by a dyadic multiplier (``sliver.DyadicRequant``) in the same rounding
    divisor: int = 1


@dataclasses.dataclass
class WeightValue:
    integers: np.ndarray  # int8, (out, in, ...)
    exponent: np.ndarray  # per output channel (axis 0)
    bits: int
    transposed: bool = False  # used as W^T (the input of a MatMul)


def _compress(e: np.ndarray) -> np.ndarray:
    """Drop repetition: every axis along which ``e`` is constant shrinks to length 1."""
    e = np.asarray(e, np.int64)
    for axis in range(e.ndim):
        if e.shape[axis] > 1 and (e == e.take([0], axis=axis)).all():
            e = e.take([0], axis=axis)
    if e.size == 1:
        return e.reshape(())
    return e


def _ranked(e: np.ndarray, rank: int) -> np.ndarray:
    """``e`` compressed, with leading 1s up to ``rank`` dims (TVM 0.27's layout conversion
    rejects rank-0 operands of binary ops next to NHWC convolutions)."""
    e = _compress(e)
    return e.reshape((1,) * (rank - e.ndim) + e.shape)


@register
class PotShift(Pass):
    name = "pot-shift"
    level = "onnx"
    summary = "fold power-of-two QDQ scales into an integer-only graph (int8 ops, int32 accumulators, shifts)"
    requires = (QUANTIZED_POT,)
    # ``integer-only`` is added by run() itself, and only when no op was left in float
    provides = ()
    check_tolerance = None
    Options = PotShiftOptions
    refuses = {FLOAT_TOKEN_SCORES: "its token selector scores with float ops (softmax, sigmoid, norms) that have "
                                   "no integer form; use evit (whose selection pot-shift makes integer) or "
                                   "pot-shift{allow_float=true}"}

    def refused_facts(self) -> dict:
        return {} if self.options.allow_float else dict(self.refuses)

    def run(self, program: Program, ctx) -> Program:
        model = program.module
        builder = _Builder(model, self.options.allow_float)
        new = builder.build()
        if builder.float_nodes:
            warnings.warn(
                f"pot-shift left {len(builder.float_nodes)} op(s) in float: "
                f"{', '.join(builder.float_nodes[:5])}{' ...' if len(builder.float_nodes) > 5 else ''}",
                stacklevel=2,
            )
        ctx.record("float_nodes", list(builder.float_nodes))
        ctx.record("requantizers", builder.requant_count)
        ctx.record("integer_layers", len(builder.bits))
        out = make_program(program, new, f"pot-shift output of {program.name}")
        check_integer_only(out.module, allow=builder.dequantizers)
        if builder.float_nodes:  # not integer-only: the fact would be a lie
            return out.replace(facts=out.facts - {INTEGER_ONLY})
        return out.with_facts(INTEGER_ONLY)


def check_integer_only(model: onnx.ModelProto, allow: set = frozenset()) -> None:
    """Raise unless every float value computed from an integer one is the graph output's
    ``DequantizeLinear`` (or a node named in ``allow``, the dequantisers of allowed float ops)."""
    types = value_types(model)
    outputs = {o.name for o in model.graph.output}
    for node in model.graph.node:
        # integer data (int64 inputs are shapes, axes and indices)
        from_int = any(types.get(i, (TensorProto.FLOAT,))[0] in _DATA_INTS for i in node.input if i)
        makes_float = any(types.get(o, (None,))[0] == TensorProto.FLOAT for o in node.output)
        if not (from_int and makes_float) or node.name in allow:
            continue
        if node.op_type == "DequantizeLinear" and all(o in outputs for o in node.output):
            continue
        raise UnsupportedOpError(
            f"pot-shift: node {node.name or node.op_type!r} ({node.op_type}) computes in float between the input "
            "quantizer and the output dequantizer; the graph is not integer-only"
        )


class _Builder:
    def __init__(self, model: onnx.ModelProto, allow_float: bool):
        self.model = model
        self.allow_float = allow_float
        g = model.graph
        self.inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        self.consts = dict(self.inits)
        for node in g.node:
            if node.op_type == "Constant":
                for a in node.attribute:
                    if a.name == "value":
                        self.consts[node.output[0]] = numpy_helper.to_array(a.t)
        self.types = value_types(model)
        self.consumers: dict = {}
        for node in g.node:
            for i in node.input:
                self.consumers.setdefault(i, []).append(node)
        self.outputs = {o.name for o in g.output}
        self.nodes: list = []
        self.new_inits: list = []
        self.ints: dict = {}  # float tensor name -> IntValue
        self.weights: dict = {}  # float tensor name -> WeightValue
        self.float_nodes: list = []
        self.bits: dict = {}
        self.requant_count = 0
        self.used_names = {n for node in g.node for n in list(node.input) + list(node.output)} | set(self.inits)
        self.skip = set()
        self.region: set = set()  # float values computed from dequantised integers
        self.dequantizers: set = set()  # names of the DequantizeLinear nodes allow_float adds
        #: integer tensors of the input graph (outputs of sliver.PoTQuantize and of the integer ops
        #: after it) -> their name in the new graph; a DequantizeLinear turns one into an IntValue
        self.raw: dict = {}
        self.shape_values: set = set()  # int64 shape tensors computed from integer values
        self.static: set = set()  # values computed from constants only (e.g. an Expand's shape)

    # -- small emitters ---------------------------------------------------------------------
    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.used_names:
            name = f"{base}.{k}"
            k += 1
        self.used_names.add(name)
        return name

    def const(self, base: str, array: np.ndarray) -> str:
        name = self.fresh(base)
        self.new_inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def emit(self, op: str, inputs: list, base: str, domain: str = "", **attrs) -> str:
        out = self.fresh(base)
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, domain=domain, **attrs))
        return out

    def shape(self, name: str) -> tuple:
        return tuple(self.types[name][1])

    def to_int32(self, v: IntValue, base: str) -> str:
        if v.dtype == TensorProto.INT32:
            return v.name
        return self.emit("Cast", [v.name], f"{base}/to_int32", to=TensorProto.INT32)

    def scale_by_pow2(self, name: str, shift: np.ndarray, base: str, rank: int) -> str:
        """``name * 2^shift`` (shift >= 0, int32, exact)."""
        shift = _ranked(shift, rank)
        if not shift.any():
            return name
        factor = self.const(f"{base}/pow2", np.power(2, shift).astype(np.int32))
        return self.emit("Mul", [name, factor], f"{base}/align")

    # -- the walk ---------------------------------------------------------------------------
    def build(self) -> onnx.ModelProto:
        g = self.model.graph
        for node in g.node:
            if id(node) in self.skip:
                continue
            handler = getattr(self, "_" + node.op_type, None)
            int_inputs = [i for i in node.input if i in self.ints or i in self.weights]
            if node.domain == SLIVER_DOMAIN and node.op_type == "PoTQuantize":
                self._pot_quantize(node)
            elif any(i in self.raw for i in node.input):
                self._raw_node(node)
            elif node.op_type == "QuantizeLinear":
                self._quantizer(node)
            elif node.op_type == "DequantizeLinear":
                self._dequantize(node)
            elif node.op_type == "Constant" and not int_inputs:
                self.nodes.append(node)
            elif not int_inputs:
                self._float_node(node)
            elif node.op_type == "Transpose" and node.input[0] in self.weights:
                w = self.weights[node.input[0]]
                perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
                if w.integers.ndim != 2 or perm not in (None, [1, 0]):
                    self._no_integer_form(node)
                else:  # weights of a linear exported as MatMul(x, W^T): channels now on the last axis
                    self.weights[node.output[0]] = WeightValue(w.integers, w.exponent, w.bits, transposed=True)
            elif any(i in self.weights for i in node.input) and node.op_type not in ("Conv", "Gemm", "MatMul"):
                self._no_integer_form(node)
            elif any(self.ints[i].divisor != 1 for i in node.input if i in self.ints) and node.op_type not in self.DIVIDED_OPS:
                self._no_integer_form(node)
            elif handler is not None and self._can(node):
                handler(node)
            else:
                self._no_integer_form(node)
        return self._finish()

    #: ops that take a value still to be divided (an average's sum): layout ops and ReLU commute
    #: with the division; the quantiser after them divides
    DIVIDED_OPS = {"Flatten", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Transpose", "Relu", "Shape"}

    def _can(self, node) -> bool:
        return all(i in self.ints or i in self.weights or i in self.consts or i in self.shape_values or not i
                   for i in node.input)

    def _Shape(self, node) -> None:
        """The shape of an integer value (an int64 shape tensor, e.g. attention's ``B, N, C = x.shape``)."""
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.input[0] = self.ints[node.input[0]].name
        self.nodes.append(copy)
        self.shape_values.update(node.output)

    def _float_node(self, node) -> None:
        # a float op on float values: before the input quantizer (fine), or inside a float region
        if any(i in self.shape_values for i in node.input):  # shape arithmetic on int64 shapes
            self.shape_values.update(node.output)
        if all((not i) or i in self.consts or i in self.static for i in node.input):
            self.static.update(node.output)
        self.nodes.append(node)
        if any(i in self.region for i in node.input):
            self.region.update(node.output)
            if node.name not in self.float_nodes:
                self.float_nodes.append(node.name or node.op_type)

    def _no_integer_form(self, node) -> None:
        label = node.name or node.output[0]
        if not self.allow_float:
            raise UnsupportedOpError(
                f"pot-shift: node {label!r} ({node.op_type}) has no integer form; "
                "quantise around it, or run pot-shift{allow_float=true} to keep it in float"
            )
        # dequantise its integer inputs and keep the node in float
        renamed = []
        for i in node.input:
            if i in self.ints:
                renamed.append(self._materialize(self.ints[i], f"{label}/dequantize"))
            elif i in self.weights:
                renamed.append(self._materialize_weight(i, f"{label}/dequantize_weight"))
            else:
                renamed.append(i)
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        del copy.input[:]
        copy.input.extend(renamed)
        self.nodes.append(copy)
        self.region.update(node.output)
        self.float_nodes.append(label)

    def _materialize(self, v: IntValue, base: str) -> str:
        e = _compress(v.exponent)
        src = v.name
        if v.divisor != 1:  # an average's sum: the float op gets the average
            scale = self.const(f"{base}/scale", (np.power(2.0, -e.astype(np.float64)) / v.divisor).astype(np.float32))
            real = self.emit("Cast", [v.name], f"{base}/to_float", to=TensorProto.FLOAT)
            out = self.emit("Mul", [real, scale], base)
            self.dequantizers.update({real, out})
            return out
        if e.ndim == 0:
            scale = self.const(f"{base}/scale", np.array(2.0 ** -float(e), np.float32))
            out = self.emit("DequantizeLinear", [src, scale], base)
            self.dequantizers.add(out)
            return out
        axes = [a for a in range(e.ndim) if e.shape[a] > 1]
        if len(axes) != 1:  # exponents vary along several axes: integers times a table of 2^-e
            scale = self.const(f"{base}/scale", np.power(2.0, -e).astype(np.float32))
            real = self.emit("Cast", [v.name], f"{base}/to_float", to=TensorProto.FLOAT)
            out = self.emit("Mul", [real, scale], base)
            self.dequantizers.update({real, out})
            return out
        scale = self.const(f"{base}/scale", np.power(2.0, -e.reshape(-1)).astype(np.float32))
        src = self.to_int32(v, base)
        out = self.emit("DequantizeLinear", [src, scale], base, axis=axes[0])
        self.dequantizers.add(out)
        return out

    def _materialize_weight(self, name: str, base: str) -> str:
        w = self.weights[name]
        integers = self.const(f"{base}/int", w.integers)
        scale = self.const(f"{base}/scale", np.power(2.0, -w.exponent).astype(np.float32))
        zero = self.const(f"{base}/zero", np.zeros(len(w.exponent), np.int8))
        out = self.emit("DequantizeLinear", [integers, scale, zero], base, axis=0)
        self.dequantizers.add(out)
        return out

    # -- quantisers -------------------------------------------------------------------------
    def _qdq_params(self, node) -> tuple:
        scale = np.asarray(self.consts[node.input[1]], np.float64)
        zero = self.consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else np.array(0, np.uint8)
        if np.any(zero != 0):
            raise UnsupportedOpError(f"pot-shift: quantizer {node.name!r} has a non-zero zero-point; PoT "
                                     "quantisation is symmetric (zero-point 0)")
        exps = -np.log2(scale)
        if not np.all(np.isfinite(exps)) or np.any(exps != np.round(exps)):
            raise UnsupportedOpError(f"pot-shift: quantizer {node.name!r} has a scale that is not a power of two; "
                                     "quantise with rapq or pot-naive first")
        return np.round(exps).astype(np.int64), zero

    def _quantizer(self, q) -> None:
        """QuantizeLinear [-> Clip] -> DequantizeLinear: one quantiser. Without the
        DequantizeLinear (integers read by integer ops, e.g. an AppMul layer's ``AppMatMul``) the
        integers start an integer island, as after ``sliver.PoTQuantize``."""
        exponent, zero = self._qdq_params(q)
        if exponent.ndim != 0:
            raise UnsupportedOpError(f"pot-shift: activation quantizer {q.name!r} is per channel; PoT activations "
                                     "are per tensor")
        out = q.output[0]
        chain = [q]
        lo, hi = (-128, 127) if zero.dtype == np.int8 else (0, 255)
        nxt = self.consumers.get(out, [])
        if len(nxt) == 1 and nxt[0].op_type == "Clip":
            clip = nxt[0]
            lo, hi = int(self.consts[clip.input[1]]), int(self.consts[clip.input[2]])
            chain.append(clip)
            out = clip.output[0]
            nxt = self.consumers.get(out, [])
        dtype = TensorProto.INT8 if zero.dtype == np.int8 else TensorProto.UINT8
        self._requantize(q, chain, out, int(exponent), lo, hi, dtype)

    def _requantize(self, first, chain: list, out: str, exponent: int, lo: int, hi: int, dtype: int) -> None:
        """The quantiser ``chain`` (its nodes from ``first``; ``out``: its integers) to ``dtype``:
        ``ShiftRequant`` of an integer source (rounding half up), the nodes as they are on a float
        source (the graph input). A following DequantizeLinear makes the integers an IntValue;
        other consumers read them as an integer island (``raw``)."""
        nxt = self.consumers.get(out, [])
        dq = nxt[0] if len(nxt) == 1 and nxt[0].op_type == "DequantizeLinear" else None
        if dq is not None:
            dq_exponent, _ = self._qdq_params(dq)
            if dq_exponent.ndim != 0 or int(dq_exponent) != exponent:
                dq = None
        for n in chain[1:] + ([dq] if dq is not None else []):
            self.skip.add(id(n))
        signed = lo < 0
        bits = int(round(math.log2(hi - lo + 1)))
        source = first.input[0]
        label = first.name or out
        if source in self.ints:
            name = self._requant(self.ints[source], exponent, lo, hi, dtype, label, len(self.shape(source)))
        elif source in self.weights:
            return self._no_integer_form(first)
        else:
            # entry quantiser: float input (the graph input, or a float region) -> integers
            for n in chain:
                self.nodes.append(n)
            name = out
        if dq is None:
            self.raw[out] = name
            return
        self.ints[dq.output[0]] = IntValue(name, np.asarray(exponent), dtype, bits, signed)
        if dq.output[0] in self.outputs:
            scale = self.const(f"{label}/output_scale", np.array(2.0 ** -float(exponent), np.float32))
            zero_name = self.const(f"{label}/output_zero", np.array(0, np.int8 if signed else np.uint8))
            self.nodes.append(helper.make_node("DequantizeLinear", [name, scale, zero_name], [dq.output[0]],
                                               name=dq.name or dq.output[0]))

    def _requant(self, v: IntValue, exponent: int, lo: int, hi: int, dtype: int, label: str, rank: int) -> str:
        """``v`` at the exponent ``exponent``, rounded half up and saturated to [lo, hi]:
        ``sliver.ShiftRequant`` (after an exact left shift where the exponent grows), or, for a
        value still to be divided (an average's sum), ``sliver.DyadicRequant`` by the dyadic
        number nearest ``2^(exponent - e) / divisor`` per channel (HAWQ-V3)."""
        self.requant_count += 1
        acc = self.to_int32(v, label)
        shift = np.asarray(v.exponent) - exponent  # >0: right shift; <0: exact left shift first
        if v.divisor != 1:
            m, s = opdefs.dyadic_constants(np.power(2.0, -shift.astype(np.float64)) / v.divisor)
            mult = self.const(f"{label}/multiplier", _ranked(m, rank).astype(np.int64))
            right = self.const(f"{label}/shift", _ranked(s, rank).astype(np.int64))
            return self.emit("DyadicRequant", [acc, mult, right], f"{label}/requant", domain=SLIVER_DOMAIN,
                             lo=lo, hi=hi, to=dtype)
        acc = self.scale_by_pow2(acc, np.maximum(-shift, 0), label, rank)
        right = self.const(f"{label}/shift", _ranked(np.maximum(shift, 0), rank).astype(np.int64))
        return self.emit("ShiftRequant", [acc, right], f"{label}/requant", domain=SLIVER_DOMAIN, lo=lo, hi=hi, to=dtype)

    def _dequantize(self, node) -> None:
        """A DequantizeLinear without a QuantizeLinear before it: integer weights."""
        src = node.input[0]
        if src not in self.consts:
            raise UnsupportedOpError(f"pot-shift: DequantizeLinear {node.name!r} has no QuantizeLinear before it and "
                                     "no constant integers")
        exponent, _ = self._qdq_params(node)
        integers = np.asarray(self.consts[src])
        if integers.dtype != np.int8:
            raise UnsupportedOpError(f"pot-shift: weights {src!r} are {integers.dtype}, expected int8")
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if exponent.ndim == 0:
            exponent = np.full(integers.shape[0], int(exponent))
        elif axis != 0:
            raise UnsupportedOpError(f"pot-shift: weights {src!r} are quantised along axis {axis}; expected 0")
        # the narrowest signed width holding the integers (the exporter keeps them in int8)
        bits = next(b for b in range(2, 9) if -(1 << (b - 1)) <= int(integers.min()) and int(integers.max()) < (1 << (b - 1)))
        self.weights[node.output[0]] = WeightValue(integers, exponent.astype(np.int64), bits)

    # -- integer islands: sliver.PoTQuantize -> integer ops -> DequantizeLinear --------------
    #: ops the integer non-linearities of ``rapq{int_nonlinear=true}`` are exported with
    #: and of the token selection stage of ``QTokenFusion`` (top-k on integer scores, a gather of
    #: integer tokens, the fused token as an int64 matrix product and a rounding division)
    RAW_OPS = {"IntSoftmax", "IntGELU", "IntLayerNorm", "Concat", "Add", "Sub", "Mul", "Slice", "Identity",
               "Reshape", "Squeeze", "Unsqueeze", "Transpose",
               # an AppMul layer (appmul on a rapq/pot-naive model): zero padding and im2col of its
               # integer input, the approximate products, correction and bias on the accumulator
               "Cast", "Pad", "Gather", "Flatten", "AppMatMul",
               "TopK", "GatherElements", "Expand", "MatMul", "ReduceSum", "Equal", "Less", "Abs", "Neg",
               "Div", "Where"}

    def _pot_quantize(self, node) -> None:
        """``sliver.PoTQuantize`` (float -> int32, rounding half up): on an integer value it becomes
        ``ShiftRequant`` (rounding half up, saturating to [lo, hi]) like a QuantizeLinear. Followed
        by a ``Cast`` to int8/uint8 it is an activation quantiser (``rapq``'s half-up quantisers
        export so), requantised straight to that type; else a wide (int32) quantiser."""
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        exponent, lo, hi = int(attrs["exponent"]), int(attrs["lo"]), int(attrs["hi"])
        source, label = node.input[0], node.name or node.output[0]
        nxt = self.consumers.get(node.output[0], [])
        if len(nxt) == 1 and nxt[0].op_type == "Cast":
            to = next(a.i for a in nxt[0].attribute if a.name == "to")
            if to in _INT_TYPES and lo >= (-128 if to == TensorProto.INT8 else 0) and hi <= (
                    127 if to == TensorProto.INT8 else 255):
                return self._requantize(node, [node, nxt[0]], nxt[0].output[0], exponent, lo, hi, to)
        if source in self.ints:
            rank = len(self.shape(source))
            self.raw[node.output[0]] = self._requant(self.ints[source], exponent, lo, hi, TensorProto.INT32, label, rank)
        elif source in self.weights:
            self._no_integer_form(node)
        else:  # entry from a float value
            self.nodes.append(node)
            self.raw[node.output[0]] = node.output[0]

    def _raw_node(self, node) -> None:
        label = node.name or node.output[0]
        if node.op_type == "DequantizeLinear":
            exponent, _ = self._qdq_params(node)
            if exponent.ndim != 0:  # per channel (an AppMul layer's accumulator): along ``axis``
                rank = len(self.shape(node.input[0]))
                axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % rank
                exponent = exponent.reshape([-1 if d == axis else 1 for d in range(rank)])
            src_type = self.types.get(node.input[0], (TensorProto.INT32,))[0]
            if src_type in _INT_TYPES:
                lo = -128 if src_type == TensorProto.INT8 else 0
                self.ints[node.output[0]] = IntValue(self.raw[node.input[0]], _compress(exponent), src_type, 8, lo < 0)
            else:
                self.ints[node.output[0]] = IntValue(self.raw[node.input[0]], _compress(exponent), TensorProto.INT32)
            if node.output[0] in self.outputs:
                copy = onnx.NodeProto()
                copy.CopyFrom(node)
                copy.input[0] = self.raw[node.input[0]]
                self.nodes.append(copy)
            return
        ok = node.op_type in self.RAW_OPS and all(
            (not i) or i in self.raw or i in self.consts or i in self.static for i in node.input)
        if node.op_type == "Cast":  # integers stay integers
            to = next(a.i for a in node.attribute if a.name == "to")
            ok = ok and to in _DATA_INTS + (TensorProto.INT64, TensorProto.BOOL)
        if not ok:
            raise UnsupportedOpError(f"pot-shift: node {label!r} ({node.op_type}) computes on the integers of a "
                                     "sliver.PoTQuantize but is not an exact integer op")
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        for k, i in enumerate(node.input):
            if i in self.raw:
                copy.input[k] = self.raw[i]
        self.nodes.append(copy)
        for o in node.output:
            self.raw[o] = o

    def _Mul(self, node) -> None:
        """An integer value times a constant power of two ``2^k`` (e.g. attention's
        ``q * head_dim^-0.5`` with head_dim 16): the integers are unchanged, the exponent drops by k."""
        consts = [i for i in node.input if i in self.consts and i not in self.ints]
        if len(consts) != 1 or len(node.input) != 2:
            return self._no_integer_form(node)
        c = np.asarray(self.consts[consts[0]], np.float64)
        value = float(c.reshape(-1)[0]) if c.size else 0.0
        k = math.log2(value) if value > 0 else 0.5
        if c.size != 1 or k != round(k):
            return self._no_integer_form(node)
        v = self.ints[next(i for i in node.input if i not in consts)]
        self.ints[node.output[0]] = dataclasses.replace(v, exponent=np.asarray(v.exponent) - int(round(k)))

    def _Gather(self, node) -> None:
        """Gather of an integer value at constant indices (attention's q/k/v, the class token)."""
        if node.input[1] not in self.consts or node.input[0] not in self.ints:
            return self._no_integer_form(node)
        v = self.ints[node.input[0]]
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        full = self._full_exponent(v, node.input[0])
        e = np.take(full, np.asarray(self.consts[node.input[1]]), axis=axis)
        self._copy_with_exponent(node, v, e)

    # -- layers -----------------------------------------------------------------------------
    def _operand(self, node, index: int) -> IntValue:
        name = node.input[index]
        v = self.ints.get(name)
        if v is None or v.dtype not in _INT_TYPES:
            raise UnsupportedOpError(f"pot-shift: input {index} of {node.name!r} ({node.op_type}) is not the output "
                                     "of a quantizer; quantise the inputs of every conv/linear")
        return v

    def _bias(self, node, index: int, acc_exponent: np.ndarray, base: str):
        if len(node.input) <= index or not node.input[index]:
            return None
        b = np.asarray(self.consts[node.input[index]], np.float64).reshape(-1)
        scaled = b * np.power(2.0, acc_exponent.reshape(-1).astype(np.float64))
        ints = np.round(scaled)
        if np.any(ints != scaled) or np.abs(ints).max(initial=0) >= 2 ** 31:
            raise UnsupportedOpError(f"pot-shift: the bias of {node.name!r} is not an integer at the accumulator scale; "
                                     "quantise with rapq or pot-naive first")
        return ints.astype(np.int32)

    def _Conv(self, node) -> None:
        x = self._operand(node, 0)
        w = self.weights.get(node.input[1])
        if w is None or x.exponent.ndim != 0:
            return self._no_integer_form(node)
        label = node.name or node.output[0]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        winit = self.const(f"{label}/weight_int", w.integers)
        acc = self.emit("ConvInteger", [x.name, winit], f"{label}/conv_integer", **attrs)
        exponent = (w.exponent + int(x.exponent)).reshape(1, -1, 1, 1)
        bias = self._bias(node, 2, exponent, label)
        if bias is not None:
            acc = self.emit("Add", [acc, self.const(f"{label}/bias_int", bias.reshape(1, -1, 1, 1))], f"{label}/bias")
        self.bits[self.nodes[-1 if bias is None else -2].name] = [w.bits, x.bits]
        self.ints[node.output[0]] = IntValue(acc, _compress(exponent), TensorProto.INT32)

    def _Gemm(self, node) -> None:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        x = self._operand(node, 0)
        w = self.weights.get(node.input[1])
        if (w is None or attrs.get("transA", 0) or not attrs.get("transB", 0) or attrs.get("alpha", 1.0) != 1.0
                or attrs.get("beta", 1.0) != 1.0 or x.exponent.ndim != 0):
            return self._no_integer_form(node)
        label = node.name or node.output[0]
        winit = self.const(f"{label}/weight_int", np.ascontiguousarray(w.integers.T))
        acc = self.emit("MatMulInteger", [x.name, winit], f"{label}/matmul_integer")
        exponent = (w.exponent + int(x.exponent)).reshape(1, -1)
        bias = self._bias(node, 2, exponent, label)
        if bias is not None:
            acc = self.emit("Add", [acc, self.const(f"{label}/bias_int", bias.reshape(1, -1))], f"{label}/bias")
        self.bits[self.nodes[-1 if bias is None else -2].name] = [w.bits, x.bits]
        self.ints[node.output[0]] = IntValue(acc, _compress(exponent), TensorProto.INT32)

    def _Relu(self, node) -> None:
        v = self.ints[node.input[0]]
        label = node.name or node.output[0]
        if v.dtype != TensorProto.INT32 and not v.signed:
            self.ints[node.output[0]] = v
            return
        out = self.emit("Relu", [self.to_int32(v, label)], f"{label}/relu")
        self.ints[node.output[0]] = IntValue(out, v.exponent, TensorProto.INT32, divisor=v.divisor)

    def _Clip(self, node) -> None:
        """Clip(lo, hi) on an integer value with per-channel exponents: the bounds become the
        integers ``ceil(lo * 2^e)``, ``floor(hi * 2^e)``. Lower bound 0 is ``Relu``; an upper bound
        is ``x - Relu(x - hi)`` (integer Max/Min next to NHWC convolutions do not build in TVM 0.27)."""
        v = self.ints[node.input[0]]
        label = node.name or node.output[0]
        bounds = [None, None]
        for k in (1, 2):
            if len(node.input) > k and node.input[k]:
                bounds[k - 1] = float(np.asarray(self.consts[node.input[k]]).reshape(()))
        x = self.to_int32(v, label)
        e = np.asarray(v.exponent, np.float64)
        rank = len(self.shape(node.input[0]))
        if bounds[0] is not None:
            lo = _ranked(np.ceil(bounds[0] * np.power(2.0, e)), rank).astype(np.int32)
            if lo.any():
                x = self.emit("Sub", [x, self.const(f"{label}/lo", lo)], f"{label}/minus_lo")
            x = self.emit("Relu", [x], f"{label}/relu")
            if lo.any():
                x = self.emit("Add", [x, self.const(f"{label}/lo_back", lo)], f"{label}/plus_lo")
        if bounds[1] is not None:
            hi = self.const(f"{label}/hi", _ranked(np.floor(bounds[1] * np.power(2.0, e)), rank).astype(np.int32))
            over = self.emit("Relu", [self.emit("Sub", [x, hi], f"{label}/minus_hi")], f"{label}/over_hi")
            x = self.emit("Sub", [x, over], f"{label}/min_hi")
        self.ints[node.output[0]] = IntValue(x, v.exponent, TensorProto.INT32)

    def _Add(self, node) -> None:
        consts = [i for i in node.input if i in self.consts and i not in self.ints]
        if len(consts) == 1 and len(node.input) == 2:  # a bias: exact integers at the value's scale
            v = self.ints[next(i for i in node.input if i not in consts)]
            c = np.asarray(self.consts[consts[0]], np.float64)
            scaled = c * np.power(2.0, np.asarray(v.exponent, np.float64))
            if np.array_equal(scaled, np.round(scaled)) and np.abs(scaled).max(initial=0) < 2 ** 31:
                label = node.name or node.output[0]
                rank = len(self.shape(node.output[0]))
                out = self.emit("Add", [self.to_int32(v, label), self.const(f"{label}/bias_int", _ranked(
                    np.round(scaled), rank).astype(np.int32))], f"{label}/bias")
                self.ints[node.output[0]] = IntValue(out, v.exponent, TensorProto.INT32)
                return
        if not all(i in self.ints for i in node.input):
            return self._no_integer_form(node)
        a, b = self.ints[node.input[0]], self.ints[node.input[1]]
        label = node.name or node.output[0]
        e = np.maximum(a.exponent, b.exponent)
        rank = len(self.shape(node.output[0]))
        ia = self.scale_by_pow2(self.to_int32(a, label), e - a.exponent, f"{label}/a", rank)
        ib = self.scale_by_pow2(self.to_int32(b, label), e - b.exponent, f"{label}/b", rank)
        out = self.emit("Add", [ia, ib], f"{label}/add")
        self.ints[node.output[0]] = IntValue(out, _compress(e), TensorProto.INT32)

    def _pool(self, node, axes: list, keepdims: int = 1) -> None:
        v = self.ints[node.input[0]]
        label = node.name or node.output[0]
        shape = self.shape(node.input[0])
        count = int(np.prod([shape[a] for a in axes]))
        full = self._full_exponent(v, node.input[0])
        first = full[tuple(slice(0, 1) if a in axes else slice(None) for a in range(full.ndim))]
        if not (full == first).all():  # the summed integers must share an exponent
            return self._no_integer_form(node)
        e = first if keepdims else first.reshape([n for a, n in enumerate(first.shape) if a not in axes])
        axes_name = self.const(f"{label}/axes", np.array(axes, np.int64))
        out = self.emit("ReduceSum", [self.to_int32(v, label), axes_name], f"{label}/sum", keepdims=keepdims)
        if count & (count - 1):  # the sum, divided by the next quantiser (DyadicRequant)
            self.ints[node.output[0]] = IntValue(out, _compress(e), TensorProto.INT32, divisor=count)
        else:  # a power of two: only the exponent changes
            self.ints[node.output[0]] = IntValue(out, _compress(e + int(math.log2(count))), TensorProto.INT32)

    def _MaxPool(self, node) -> None:
        """Max pooling commutes with the per-channel scales ``2^-e[c] > 0``: the same pooling on
        the integers, exact. int8/uint8 values use ONNX ``MaxPool``; int32 ones (a ReLU'd
        accumulator, ResNet's stem) ``sliver.IntMaxPool`` (ONNX Runtime's MaxPool has no int32)."""
        v = self.ints[node.input[0]]
        label = node.name or node.output[0]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        e = np.asarray(v.exponent)
        rank = len(self.shape(node.input[0]))
        full = e.reshape((1,) * (rank - e.ndim) + e.shape)
        if rank < 3 or any(d > 1 for d in full.shape[2:]) or full.shape[0] > 1 or attrs.get("ceil_mode", 0) \
                or attrs.get("storage_order", 0) or len(node.output) > 1 and node.output[1]:
            return self._no_integer_form(node)
        nd = rank - 2
        if v.dtype in _INT_TYPES:
            out = self.emit("MaxPool", [v.name], f"{label}/max_pool", **attrs)
        else:
            full_attrs = {"kernel_shape": list(attrs["kernel_shape"]), "strides": list(attrs.get("strides", [1] * nd)),
                          "pads": list(attrs.get("pads", [0] * 2 * nd)), "dilations": list(attrs.get("dilations", [1] * nd))}
            out = self.emit("IntMaxPool", [self.to_int32(v, label)], f"{label}/max_pool", domain=SLIVER_DOMAIN,
                            **full_attrs)
        self.ints[node.output[0]] = dataclasses.replace(v, name=out)

    def _AveragePool(self, node) -> None:
        """AveragePool as the zoo exports it: a 1x1 window with stride 1 (AdaptiveAvgPool2d(7) on a
        7x7 map, VGG) is the identity; a window over the whole map without padding is the global
        average (integer sum, then the quantiser after it divides). Other windows have no
        integer form yet."""
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        shape = self.shape(node.input[0])
        kernel = list(attrs.get("kernel_shape", []))
        nd = len(kernel)
        strides = list(attrs.get("strides", [1] * nd))
        pads = list(attrs.get("pads", [0] * 2 * nd))
        if any(pads) or attrs.get("ceil_mode", 0) or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            return self._no_integer_form(node)
        if all(k == 1 for k in kernel) and all(st == 1 for st in strides):
            self.ints[node.output[0]] = self.ints[node.input[0]]
            return
        if list(shape[2:]) == kernel:
            return self._pool(node, list(range(2, len(shape))))
        self._no_integer_form(node)

    def _GlobalAveragePool(self, node) -> None:
        self._pool(node, list(range(2, len(self.shape(node.input[0])))))

    def _ReduceMean(self, node) -> None:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        axes = attrs.get("axes")
        if axes is None and len(node.input) > 1:
            axes = [int(a) for a in np.asarray(self.consts[node.input[1]]).reshape(-1)]
        rank = len(self.shape(node.input[0]))
        if axes is None:
            return self._no_integer_form(node)
        self._pool(node, sorted(a % rank for a in axes), int(attrs.get("keepdims", 1)))

    def _Slice(self, node) -> None:
        """A slice of an integer value at constant starts/ends/axes/steps (a token pass's CLS
        attention row): the exponent goes through the same slice."""
        v = self.ints[node.input[0]]
        full = self._full_exponent(v, node.input[0])
        args = [np.asarray(self.consts[i]).reshape(-1) if i else None for i in list(node.input[1:]) + [""] * 4][:4]
        starts, ends, axes, steps = args
        axes = np.arange(len(starts)) if axes is None else axes
        steps = np.ones(len(starts), np.int64) if steps is None else steps
        index = [slice(None)] * full.ndim
        for s, e, a, k in zip(starts, ends, axes, steps):
            n = full.shape[int(a)]
            index[int(a)] = slice(*slice(int(max(min(s, n), -n - 1)), int(max(min(e, n), -n - 1)), int(k)).indices(n))
        self._copy_with_exponent(node, v, full[tuple(index)])

    def _full_exponent(self, v: IntValue, name: str) -> np.ndarray:
        """The exponent of ``v`` broadcast to the full (static) shape of ``name``."""
        shape = self.shape(name)
        e = np.asarray(v.exponent)
        e = e.reshape((1,) * (len(shape) - e.ndim) + e.shape)
        return np.broadcast_to(e, shape)

    def _copy_with_exponent(self, node, v: IntValue, e: np.ndarray) -> None:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        out = self.fresh(f"{node.name or node.output[0]}/int")
        copy.input[0] = v.name
        del copy.output[:]
        copy.output.append(out)
        copy.name = out
        self.nodes.append(copy)
        self.ints[node.output[0]] = dataclasses.replace(v, name=out, exponent=_compress(e))

    def _shape_op(self, node) -> None:
        """A layout op on integers: its exponent (per element, broadcast to the full shape) goes
        through the same layout change."""
        v = self.ints[node.input[0]]
        full = self._full_exponent(v, node.input[0])
        if node.op_type == "Transpose":
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            e = np.transpose(full, perm)
        else:  # Flatten, Reshape, Squeeze, Unsqueeze, Identity keep the element order
            e = np.ascontiguousarray(full).reshape(self.shape(node.output[0]))
        self._copy_with_exponent(node, v, e)

    _Flatten = _Reshape = _Squeeze = _Unsqueeze = _Identity = _Transpose = _shape_op

    def _MatMul(self, node) -> None:
        """Activation x activation (attention), both from per-tensor quantisers, or activation x
        W^T (a linear on a 3-D input); its bias comes as a following ``Add`` of a constant."""
        w = self.weights.get(node.input[1])
        if w is not None and w.transposed and node.input[0] in self.ints:
            x = self._operand(node, 0)
            if x.exponent.size != 1:
                return self._no_integer_form(node)
            label = node.name or node.output[0]
            winit = self.const(f"{label}/weight_int", np.ascontiguousarray(w.integers.T))
            acc = self.emit("MatMulInteger", [x.name, winit], f"{label}/matmul_integer")
            self.bits[acc] = [w.bits, x.bits]
            rank = len(self.shape(node.output[0]))
            e = (w.exponent + int(x.exponent.reshape(-1)[0])).reshape((1,) * (rank - 1) + (-1,))
            self.ints[node.output[0]] = IntValue(acc, _compress(e), TensorProto.INT32)
            return
        if not all(i in self.ints for i in node.input):
            return self._no_integer_form(node)
        a, b = self.ints[node.input[0]], self.ints[node.input[1]]
        if a.dtype not in _INT_TYPES or b.dtype not in _INT_TYPES or a.exponent.size != 1 or b.exponent.size != 1:
            return self._no_integer_form(node)
        label = node.name or node.output[0]
        acc = self.emit("MatMulInteger", [a.name, b.name], f"{label}/matmul_integer")
        self.bits[acc] = [b.bits, a.bits]
        e = np.asarray(int(a.exponent.reshape(-1)[0]) + int(b.exponent.reshape(-1)[0]))
        self.ints[node.output[0]] = IntValue(acc, e, TensorProto.INT32)

    # -- the new model ----------------------------------------------------------------------
    def _finish(self) -> onnx.ModelProto:
        g = self.model.graph
        outputs = {o.name for o in g.output}
        while True:  # drop constants (scales, zero-points of the folded quantisers) nothing reads
            used = {i for n in self.nodes for i in n.input} | outputs
            keep = [n for n in self.nodes if n.op_type != "Constant" or any(o in used for o in n.output)]
            if len(keep) == len(self.nodes):
                break
            self.nodes = keep
        inits = [i for i in g.initializer if i.name in used] + [i for i in self.new_inits if i.name in used]
        graph = helper.make_graph(self.nodes, g.name, list(g.input), list(g.output), inits)
        opsets = [o for o in self.model.opset_import if o.domain != SLIVER_DOMAIN]
        version = max(o.version for o in opsets if o.domain in ("", "ai.onnx"))
        functions = []
        if any(n.op_type == "ShiftRequant" for n in self.nodes):
            functions.append(opdefs.shift_requant_function(version))
        if any(n.domain == SLIVER_DOMAIN for n in self.nodes):
            opsets.append(helper.make_opsetid(SLIVER_DOMAIN, 1))
        model = helper.make_model(graph, opset_imports=opsets, functions=functions,
                                  producer_name=self.model.producer_name, ir_version=min(self.model.ir_version, 9) or 8)
        opdefs.attach_functions(model)  # bodies of the integer non-linearities (sliver.IntSoftmax, ...)
        model.ir_version = max(model.ir_version, 8)
        helper.set_model_props(model, {BITS_METADATA: json.dumps(self.bits, sort_keys=True)})
        return model
