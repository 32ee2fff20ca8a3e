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
    #: (opset) -> onnx.FunctionProto: the op's body of exact standard ops, attached to exported
    #: models by :func:`attach_functions` (None: the op has no such body)
    function: Optional[Callable] = None


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


def attach_functions(model) -> None:
    """Give ``model`` (in place) the model-local function of every custom op its graph uses that
    defines one (``CustomOp.function``) and the opset import of that op's domain, so that ONNX
    Runtime and shape inference can run it. Functions already present are kept."""
    from onnx import helper

    have = {(f.domain, f.name) for f in model.functions}
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=17)
    domains = {o.domain for o in model.opset_import}
    for node in model.graph.node:
        spec = custom_op(node)
        if spec is None or spec.function is None or (spec.domain, spec.op_type) in have:
            continue
        model.functions.append(spec.function(opset))
        have.add((spec.domain, spec.op_type))
        if spec.domain not in domains:
            model.opset_import.append(helper.make_opsetid(spec.domain, 1))
            domains.add(spec.domain)


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


# ------------------------------------------------------------------------------------------------
# sliver.AppMatMul: a matmul whose products come from an approximate multiplier's table
# (issue #8, FAMES arXiv 2411.18055; written by the appmul work, keep this block together)


def _app_matmul_operands(inputs):
    import numpy as np

    a, w, lut = (np.asarray(t) for t in inputs[:3])
    side = lut.shape[0] if lut.ndim == 2 else 0
    if lut.ndim != 2 or lut.shape[0] != lut.shape[1] or side < 4 or side & (side - 1):
        raise ValueError(f"AppMatMul's table must be square with a power-of-two side >= 4, got {lut.shape}")
    if w.ndim != 2 or a.ndim < 1 or a.shape[-1] != w.shape[0]:
        raise ValueError(f"AppMatMul needs A (..., K) and W (K, N), got {a.shape} and {w.shape}")
    half = side // 2
    for name, t in (("A", a), ("W", w)):
        if t.size and (int(t.min()) < -half or int(t.max()) >= half):
            raise ValueError(f"AppMatMul operand {name} leaves the table's signed range [{-half}, {half - 1}]")
    return a.astype(np.int64), w.astype(np.int64), lut.astype(np.int64), side


def app_matmul_reference(inputs, attrs):
    """``Y[..., n] = sum_k LUT[A[..., k] mod S, W[k, n] mod S]`` in int64, returned as int32.

    Inputs: A (..., K) and W (K, N), signed integers of an ``n``-bit multiplier (held in int8),
    and LUT (S, S), S = 2^n, int32: ``LUT[i, j]`` is the product the multiplier returns for the
    operands whose two's-complement bit patterns are i and j (row/column ``i`` is the value
    ``i`` for ``i < S/2`` and ``i - S`` above: the order in which ONNX ``Gather``/``OneHot`` read
    negative indices). An exact multiplier's table gives ``A @ W``. Attributes (``multiplier``,
    ``bits``, ``energy_ratio``) only describe the table."""
    import numpy as np

    a, w, lut, side = _app_matmul_operands(inputs)
    ai, wi = a % side, w % side
    out = np.zeros(a.shape[:-1] + (w.shape[1],), np.int64)
    for k in range(w.shape[0]):  # the definition: one table lookup per product
        out += lut[ai[..., k : k + 1], wi[k]]
    if out.size and (out.min() < -(1 << 31) or out.max() >= 1 << 31):
        raise ValueError("AppMatMul accumulator overflows int32")
    return [out.astype(np.int32)]


def app_matmul_macs(node, types) -> int:
    import numpy as np

    a, w = types[node.input[0]][1], types[node.input[1]][1]
    return int(np.prod(a, dtype=np.int64)) * int(w[-1])


def app_matmul_function(opset: int = 17):
    """``sliver.AppMatMul`` as a model-local ONNX function of exact standard integer ops: the
    decomposition ``sum_v f_v(A) @ 1[W == v]`` (REFERENCE.md, FAMES) as

        F = Gather(LUT, A)                       (..., K, S)   F[..., k, v] = f_v(A[..., k])
        M = OneHot(W, S, [0, 1], axis=1)         (K, S, N)     M[k, v, n] = 1[W[k, n] == v]
        Y = Einsum("...kv,kvn->...n", F, M)      in int64 (ONNX Runtime's OneHot kernels), cast to int32

    Negative operands index the table from its end (Gather and OneHot both take indices in
    [-S, S-1]), which is the two's-complement order of its rows and columns."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    const = lambda name, v, dt: helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(v, dt)))
    nodes = [
        helper.make_node("Cast", ["A"], ["a64"], to=TensorProto.INT64),
        helper.make_node("Gather", ["LUT", "a64"], ["F"], axis=0),
        helper.make_node("Cast", ["W"], ["w64"], to=TensorProto.INT64),
        helper.make_node("Shape", ["LUT"], ["side"], start=1, end=2),
        const("off_on", [0, 1], np.int64),
        helper.make_node("OneHot", ["w64", "side", "off_on"], ["M"], axis=1),
        helper.make_node("Cast", ["F"], ["F64"], to=TensorProto.INT64),
        helper.make_node("Einsum", ["F64", "M"], ["Y64"], equation="...kv,kvn->...n"),
        helper.make_node("Cast", ["Y64"], ["Y"], to=TensorProto.INT32),
    ]
    return helper.make_function(SLIVER_DOMAIN, "AppMatMul", ["A", "W", "LUT"], ["Y"], nodes,
                                [helper.make_opsetid("", opset)], attributes=["multiplier", "bits", "energy_ratio"])


APP_MATMUL = define(
    CustomOp(
        op_type="AppMatMul",
        doc="integer matmul on an approximate multiplier: Y (..., N) int32 = sum_k LUT[A[..., k], W[k, n]] "
        "for A (..., K) and W (K, N) n-bit signed integers (int8 containers) and the multiplier's "
        "table LUT (2^n, 2^n) int32 in two's-complement index order; attributes multiplier (name), "
        "bits, energy_ratio (its energy relative to the exact n-bit multiplier, for costing); "
        "ir.opdefs.app_matmul_function() gives its exact standard-op body",
        macs=app_matmul_macs,
        reference=app_matmul_reference,
        function=app_matmul_function,
    )
)
