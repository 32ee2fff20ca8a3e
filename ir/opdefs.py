"""sliver's custom-domain ONNX ops: names, attributes and cost, defined once.

Passes that emit a custom op (``sliver.ShiftRequant``, ``sliver.AppMatMul``, ...) and backends
that lower it both read its definition here, so neither depends on the other (DESIGN.md,
"Dependencies point one way"). A definition gives the op's MAC count for the statistics and, where
it has one, a reference implementation (numpy) that fixes its semantics for the runtimes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from .onnx_level import SLIVER_DOMAIN


@dataclass(frozen=True)
class CustomOp:
    op_type: str
    doc: str
    #: (node, value_types) -> MACs; None for ops that do no multiply-accumulates
    macs: Optional[Callable] = None
    #: (inputs: list[np.ndarray], attrs: dict) -> list[np.ndarray]
    reference: Optional[Callable] = None
    domain: str = SLIVER_DOMAIN


_OPS: dict = {}


def define(op: CustomOp) -> CustomOp:
    """Register a custom op definition (once per op type)."""
    key = (op.domain, op.op_type)
    if key in _OPS:
        raise ValueError(f"custom op {op.domain}.{op.op_type} is defined twice")
    _OPS[key] = op
    return op


def lookup(domain: str, op_type: str) -> Optional[CustomOp]:
    """The definition of ``domain.op_type``, or None."""
    return _OPS.get((domain, op_type))


def custom_op(node) -> Optional[CustomOp]:
    """The definition of an ONNX node's op, if it is one of sliver's custom ops."""
    return _OPS.get((node.domain, node.op_type))


def defined_ops() -> list:
    return sorted(_OPS.values(), key=lambda o: (o.domain, o.op_type))


# ------------------------------------------------------------------------------------------------
# definitions

INT8_RANGE = (-128, 127)


def shift_requant_reference(inputs, attrs):
    """int32 x -> integers ``clip((x + 2^(s-1)) >> s, lo, hi)`` (round half up; s = 0: x).

    ``s`` is the attribute ``shift`` or, when given, the second input (int64, broadcast against
    x: one shift per channel, every s in 0..40). ``lo``/``hi`` default to the int8 range and
    ``to`` (an ONNX TensorProto type, default INT8) is the output type."""
    import numpy as np
    from onnx import helper

    x = np.asarray(inputs[0]).astype(np.int64)
    if len(inputs) > 1 and inputs[1] is not None:
        shift = np.asarray(inputs[1]).astype(np.int64)
    else:
        shift = np.asarray(int(attrs.get("shift", 0)), np.int64)
    if (shift < 0).any() or (shift > MAX_SHIFT).any():
        raise ValueError(f"ShiftRequant shifts must be 0..{MAX_SHIFT}")
    rounding = np.where(shift > 0, np.left_shift(np.int64(1), np.maximum(shift - 1, 0)), 0)
    x = (x + rounding) >> shift
    lo, hi = int(attrs.get("lo", INT8_RANGE[0])), int(attrs.get("hi", INT8_RANGE[1]))
    to = helper.tensor_dtype_to_np_dtype(int(attrs.get("to", 3)))  # 3 = INT8
    return [np.clip(x, lo, hi).astype(to)]


#: largest right shift ShiftRequant takes (its exact standard-op body offsets by 2^40)
MAX_SHIFT = 40


def shift_requant_function(opset: int = 17):
    """``sliver.ShiftRequant`` as an ONNX model-local function made of exact standard integer ops,
    so that ONNX Runtime (which inlines model-local functions) runs it without a custom kernel.

    Signed arithmetic right shift with round-half-up from unsigned ``BitShift`` (ONNX's only shift):
    with the offset ``B = 2^40`` (a multiple of ``2^s``; |x| < 2^31 keeps x + B positive),
    ``floor((x + r) / 2^s) = ((x + B + r) >> s) - (B >> s)``, ``r = 2^s >> 1`` (0 for s = 0),
    computed in uint64, then ``Clip(lo, hi)`` in int64 and ``Cast(to)``. Inputs: x (int32),
    shift (int64, broadcastable); attributes lo, hi, to."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def ref(node_attr: str, attr: str, kind) -> onnx.AttributeProto:
        a = onnx.AttributeProto()
        a.name, a.ref_attr_name, a.type = node_attr, attr, kind
        return a

    const = lambda name, v, dt: helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(v, dt)))
    nodes = [
        const("one", 1, np.uint64),
        const("offset", 1 << MAX_SHIFT, np.uint64),
        helper.make_node("Cast", ["shift"], ["s"], to=TensorProto.UINT64),
        helper.make_node("BitShift", ["one", "s"], ["pow2"], direction="LEFT"),
        helper.make_node("BitShift", ["pow2", "one"], ["half"], direction="RIGHT"),
        helper.make_node("Cast", ["x"], ["x64"], to=TensorProto.INT64),
        helper.make_node("Cast", ["offset"], ["offset64"], to=TensorProto.INT64),
        helper.make_node("Add", ["x64", "offset64"], ["positive"]),
        helper.make_node("Cast", ["positive"], ["positive_u"], to=TensorProto.UINT64),
        helper.make_node("Add", ["positive_u", "half"], ["rounded"]),
        helper.make_node("BitShift", ["rounded", "s"], ["shifted"], direction="RIGHT"),
        helper.make_node("BitShift", ["offset", "s"], ["offset_shifted"], direction="RIGHT"),
        helper.make_node("Cast", ["shifted"], ["shifted64"], to=TensorProto.INT64),
        helper.make_node("Cast", ["offset_shifted"], ["offset_shifted64"], to=TensorProto.INT64),
        helper.make_node("Sub", ["shifted64", "offset_shifted64"], ["value"]),
    ]
    lo = helper.make_node("Constant", [], ["lo"])
    lo.attribute.append(ref("value_int", "lo", onnx.AttributeProto.INT))
    hi = helper.make_node("Constant", [], ["hi"])
    hi.attribute.append(ref("value_int", "hi", onnx.AttributeProto.INT))
    cast = helper.make_node("Cast", ["clipped"], ["y"])
    cast.attribute.append(ref("to", "to", onnx.AttributeProto.INT))
    nodes += [lo, hi, helper.make_node("Clip", ["value", "lo", "hi"], ["clipped"]), cast]
    return helper.make_function(SLIVER_DOMAIN, "ShiftRequant", ["x", "shift"], ["y"], nodes,
                                [helper.make_opsetid("", opset)], attributes=["lo", "hi", "to"])


SHIFT_REQUANT = define(
    CustomOp(
        op_type="ShiftRequant",
        doc="requantise an int32 accumulator: rounding (half up) arithmetic right shift by the "
        "attribute `shift` (>= 0) or by the optional second input (int64 per-channel shifts, 0..40), then "
        "saturate to [lo, hi] (default [-128, 127]) and cast to `to` (default INT8); "
        "ir.opdefs.shift_requant_function() gives its exact standard-op body",
        reference=shift_requant_reference,
    )
)
