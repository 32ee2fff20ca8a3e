"""sliver's custom-domain ONNX ops: names, attributes and cost, defined once.

Passes that emit a custom op (``sliver.ShiftRequant``, ``sliver.AppMatMul``, ...) and backends
that lower it both read its definition here, so neither depends on the other (dependencies
point one way: passes and backends -> ir). A definition gives the op's MAC count for the statistics and, where
it has one, a reference implementation (numpy) that fixes its semantics for the runtimes.
"""

from __future__ import annotations

import math
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
    #: indices of the inputs that are the op's weights (counted as parameters by ``ir.stats``)
    weights: tuple = ()


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


def app_matmul_bit_factors(lut):
    """``C`` ((b+1) x (b+1) int64) with ``LUT[i, j] = x(i)^T C x(j)`` for every entry, where
    ``x(i) = [bit_0(i), ..., bit_{b-1}(i), 1]`` are the bits of the two's-complement pattern ``i``
    (S = 2^b), or ``None`` when no such ``C`` exists.

    A multiplier built from an AND array of partial products ``a_i w_j 2^(i+j)`` (exact,
    truncated, broken-array, perforated: every one in sliver's library but the logarithmic ones)
    keeps a subset of those products plus constants, so its table is bilinear in the operand bits.
    Then ``sum_k LUT[a_k, w_k] = sum_i bit_i(A) @ (sum_j C[i, j] x_j(W))``: b+1 ordinary integer
    matmuls instead of one lookup per product, exact in integers. ``C`` is solved in float (the
    basis has full column rank), rounded, and accepted only if it reproduces every entry exactly."""
    import numpy as np

    lut = np.asarray(lut, dtype=np.int64)
    side = lut.shape[0]
    b = side.bit_length() - 1
    x = np.concatenate([(np.arange(side)[:, None] >> np.arange(b)) & 1, np.ones((side, 1), np.int64)], axis=1)
    pinv = np.linalg.pinv(x.astype(np.float64))
    c = np.round(pinv @ lut.astype(np.float64) @ pinv.T)
    if not np.all(np.abs(c) < 2.0 ** 52):
        return None
    c = c.astype(np.int64)
    return c if np.array_equal(x @ c @ x.T, lut) else None


def app_matmul_exact_factors(bits: int):
    """``C`` of the exact signed product in the basis of :func:`app_matmul_bit_factors`:
    ``a = sum_{i<b-1} 2^i a_i - 2^(b-1) a_{b-1}``, so ``a w = x(a)^T (c c^T) x(w)``."""
    import numpy as np

    c = np.array([1 << i for i in range(bits - 1)] + [-(1 << (bits - 1)), 0], dtype=np.int64)
    return np.outer(c, c)


def app_matmul_macs(node, types) -> int:
    import numpy as np

    a, w = types[node.input[0]][1], types[node.input[1]][1]
    return int(np.prod(a, dtype=np.int64)) * int(w[-1])


def app_matmul_function(opset: int = 17):
    """``sliver.AppMatMul`` as a model-local ONNX function of exact standard integer ops: the
    decomposition ``sum_v f_v(A) @ 1[W == v]`` (the lookup-table emulation of AdaPT and TFApprox) as

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
        weights=(1,),
    )
)


# ------------------------------------------------------------------------------------------------
# integer non-linearities of a ViT (issue #7; I-BERT, Kim et al., ICML 2021, arXiv 2101.01321;
# keep this block together). Every op takes and returns integers; the runtime semantics use only
# the integer attributes, which the compile-time helpers ``*_constants`` compute once from the
# exponents (so the torch reference, ONNX Runtime and TVM all see the same integers).

#: I-BERT's second-order polynomial for exp on (-ln2, 0]: a (p + b)^2 + c
IEXP_A, IEXP_B, IEXP_C = 0.3585, 1.353, 0.344
#: I-BERT's polynomial for erf: sign(u) [a (min(|u|, -b) + b)^2 + 1]
IERF_A, IERF_B = -0.2888, -1.769
#: Newton steps of IntLayerNorm's integer square root from its per-row start (5 reach floor(sqrt V)
#: for every V < 2^63 checked: all 4^k - 1, 4^k, 4^k + 1 and 300k random values; 2 more as margin)
NEWTON_STEPS = 7
#: 4^k, k = 0..31: the per-row start of the square root is 2^m, m = #{k : V >= 4^k}, so that
#: sqrt(V) < 2^m <= 2 sqrt(V) (relative error <= 1 before the first step)
SQRT_START_POWERS = [4 ** k for k in range(32)]
#: int64 budget of every intermediate (checked at compile time by the ``*_constants`` helpers)
INT64_BITS = 62


def pot_quantize_reference(inputs, attrs):
    """float x -> int32 ``clip(floor(x * 2^exponent + 0.5), lo, hi)`` (round half up)."""
    import numpy as np

    x = np.asarray(inputs[0], np.float64)
    y = np.floor(x * 2.0 ** int(attrs["exponent"]) + 0.5)
    return [np.clip(y, int(attrs["lo"]), int(attrs["hi"])).astype(np.int32)]


def int_softmax_constants(exponent: int, out_exponent: int) -> dict:
    """Attributes of ``sliver.IntSoftmax`` for an input at scale ``2^-exponent`` and an output at
    ``2^-out_exponent`` (I-BERT Alg. 2, i-exp with the scale a power of two):
    ``ln2 = floor(ln 2 / S)``, ``b = floor(1.353 / S)``, ``c = floor(0.344 / (0.3585 S^2))``;
    ``zmax`` is the bit length of the polynomial's largest value ``b^2 + c`` (a larger shift gives
    0 anyway, and capping it keeps every shift below 64)."""
    e = int(exponent)
    ln2 = math.floor(math.log(2.0) * 2.0 ** e)
    b = math.floor(IEXP_B * 2.0 ** e)
    c = math.floor(IEXP_C / IEXP_A * 2.0 ** (2 * e))
    if ln2 < 4:
        raise ValueError(f"IntSoftmax input exponent {e} is too coarse (ln2 = {ln2} integer steps); use >= 3")
    zmax = (b * b + c).bit_length()
    if zmax + int(out_exponent) > INT64_BITS:
        raise ValueError(f"IntSoftmax: exponents {e}/{out_exponent} overflow int64 (2^{zmax + out_exponent})")
    return {"ln2": ln2, "b": b, "c": c, "zmax": zmax, "out_exponent": int(out_exponent)}


def int_softmax_reference(inputs, attrs):
    """Integer softmax over the last axis (I-BERT's i-exp, then an integer normalisation):

        x' = x - max(x)                    (<= 0)
        z  = floor(-x' / ln2)              (non-negative dividend: floor = truncation)
        p  = x' + z * ln2                  (in (-ln2, 0])
        E  = ((p + b)^2 + c) >> min(z, zmax)        exp(x') at the scale 0.3585 S^2
        y  = floor(E * 2^M / sum(E))       (M = out_exponent: y / 2^M is the probability)

    int32 in, int32 out (0 .. 2^M)."""
    import numpy as np

    x = np.asarray(inputs[0]).astype(np.int64)
    ln2, b, c, zmax, m = (int(attrs[k]) for k in ("ln2", "b", "c", "zmax", "out_exponent"))
    x = x - x.max(axis=-1, keepdims=True)
    z = (-x) // ln2
    p = x + z * ln2
    e = ((p + b) ** 2 + c) >> np.minimum(z, zmax)
    y = (e << m) // e.sum(axis=-1, keepdims=True)
    return [y.astype(np.int32)]


def int_gelu_constants(exponent: int, out_exponent: int, in_bits: int, lo: int, hi: int, frac: int = 16) -> dict:
    """Attributes of ``sliver.IntGELU`` (I-BERT Alg. 1, i-GELU with d1 = 1) for a signed
    ``in_bits``-bit input at scale ``S = 2^-exponent``, output at ``2^-out_exponent`` in [lo, hi].

    The erf argument x / sqrt2 has the scale ``S / sqrt2``: ``b = floor(-1.769 sqrt2 / S)``,
    ``c = floor(1 / (a S^2 / 2))`` (a = -0.2888; both negative). ``x (L + c)`` stands for GELU(x)
    at the scale ``a S^3 / 4``, which is not a power of two: the output is
    ``x * n * m / 2^(3 e + 2 + frac - e_out)`` with ``n = -(L + c) >= 0`` and the dyadic
    ``m = round(0.2888 * 2^frac)`` (frac = 16: relative error < 2e-5), shifted in two steps
    (``shift1`` before the product with m when x * n could pass 2^62 - 2^bitlen(m), then a rounding
    ``shift2``)."""
    e, eo = int(exponent), int(out_exponent)
    b = math.floor(IERF_B * math.sqrt(2.0) * 2.0 ** e)
    c = math.floor(2.0 ** (2 * e + 1) / IERF_A)
    m = round(-IERF_A * 2.0 ** frac)
    total = 3 * e + 2 + frac - eo
    n_max = max(-2 * c, b * b)
    t_bits = ((1 << (in_bits - 1)) * n_max).bit_length()
    shift1 = max(0, t_bits + m.bit_length() - INT64_BITS)
    if total - shift1 < 1:
        raise ValueError(f"IntGELU: output exponent {eo} is too fine for input exponent {e}")
    return {"b": b, "c": c, "m": m, "shift1": shift1, "shift2": total - shift1, "lo": int(lo), "hi": int(hi)}


def int_gelu_reference(inputs, attrs):
    """Integer GELU (I-BERT's i-GELU):

        L = sign(x) ((min(|x|, -b) + b)^2 + c)        erf(x / sqrt2) at the scale a S^2 / 2
        n = -(L + c)                                  (1 + erf) at the scale -a S^2 / 2, >= 0
        t = floor(x * n / 2^shift1)
        y = clip(floor((t * m + 2^(shift2 - 1)) / 2^shift2), lo, hi)   (round half up)

    int32 in, int32 out."""
    import numpy as np

    x = np.asarray(inputs[0]).astype(np.int64)
    b, c, m, s1, s2, lo, hi = (int(attrs[k]) for k in ("b", "c", "m", "shift1", "shift2", "lo", "hi"))
    a = np.minimum(np.abs(x), -b)
    big = np.sign(x) * ((a + b) ** 2 + c)
    n = -(big + c)
    t = (x * n) >> s1
    y = (t * m + (1 << (s2 - 1))) >> s2
    return [np.clip(y, lo, hi).astype(np.int32)]


def int_layernorm_constants(exponent: int, dim: int, in_bits: int, gamma, beta, eps: float, out_exponent: int,
                            lo: int, hi: int, gamma_bits: int = 16, frac: int = 14):
    """(attributes, gamma integers, beta integers) of ``sliver.IntLayerNorm`` over the last axis
    of length ``dim``, input signed ``in_bits`` bits at ``2^-exponent`` (I-BERT Sec. 3.5, integer
    square root by Newton's method).

    With ``c = dim * x - sum(x)`` (exact: the mean times dim) the normalised value is
    ``c 2^p / sqrt(V)``, ``V = floor(sum(c^2) 2^2p / dim) + eps_int``, ``eps_int = max(1, floor(eps
    dim^2 2^(2e + 2p)))``, with ``p = extra`` (6 for 16-bit inputs over 64 channels: the largest
    that keeps ``sum(c^2) 2^2p`` in int64; without it a row of small integers, V ~ 2^14, had a
    square root good to 1%, measured); ``r = floor(sqrt(V))`` by ``NEWTON_STEPS`` Newton steps from
    the per-row start ``2^m``, ``m = #{k < 32 : V >= 4^k}`` (so ``sqrt(V) < 2^m <= 2 sqrt(V)``; from
    there each step squares the relative error, and steps that would not decrease r are
    skipped, so r lands on floor(sqrt V) and stays - checked at run time by the reference, and
    for many V and the extremes by the tests). An earlier version started every row at
    ``2^start >= sqrt(V_max)`` and needed 36 unrolled steps; its TVM build of the tiny DeiT took
    5 minutes.
    ``n = floor(c 2^(frac + p) / r)`` has ``frac`` fraction bits; gamma is rounded to ``gamma_bits``
    signed bits at exponent ``e_g`` and beta to the exponent ``frac + e_g`` of ``n * gamma``;
    ``shift = frac + e_g - e_out`` (frac raised if needed so that it is >= 0)."""
    import numpy as np

    e, eo = int(exponent), int(out_exponent)
    gamma = np.asarray(gamma, np.float64).reshape(-1)
    beta = np.asarray(beta, np.float64).reshape(-1)
    gmax = float(np.abs(gamma).max())
    e_g = math.floor(math.log2(((1 << (gamma_bits - 1)) - 1) / gmax)) if gmax > 0 else 0
    frac = max(int(frac), eo - e_g)
    g = np.round(gamma * 2.0 ** e_g).astype(np.int64)
    bt = np.floor(beta * 2.0 ** (frac + e_g) + 0.5).astype(np.int64)
    c_max = dim * (1 << in_bits)
    # extra bits of the square root: V carries 2p more bits (floor(sqrt) is then exact to
    # 2^-p relative even for rows of tiny integers), within the int64 budget of sum(c^2) 2^2p
    extra = max(0, min(8, (INT64_BITS - (dim * c_max * c_max).bit_length()) // 2))
    eps_int = max(1, math.floor(eps * dim * dim * 2.0 ** (2 * e + 2 * extra)))
    v_max = ((dim * c_max * c_max) << (2 * extra)) // dim + eps_int
    n_max = (c_max << frac)
    if (n_max * int(np.abs(g).max(initial=1))).bit_length() + 1 > INT64_BITS or (c_max * c_max * dim).bit_length() > INT64_BITS:
        raise ValueError("IntLayerNorm: intermediates overflow int64; use fewer input bits")
    if v_max.bit_length() >= INT64_BITS:
        raise ValueError("IntLayerNorm: the variance overflows int64; use fewer input bits")
    attrs = {"eps": eps_int, "extra": extra, "frac": frac, "shift": frac + e_g - eo,
             "lo": int(lo), "hi": int(hi)}
    return attrs, g, bt


def int_layernorm_reference(inputs, attrs):
    """Integer LayerNorm over the last axis (see :func:`int_layernorm_constants`):

        c   = D x - sum(x)
        V   = floor(sum(c^2) 2^(2 extra) / D) + eps
        m   = #{k < 32 : V >= 4^k}; r = 2^m
        NEWTON_STEPS (7) times: r = min(r, floor((r + floor(V / r)) / 2))  (= floor(sqrt V))
        n   = floor(c 2^(frac + extra) / r)
        y   = clip(floor((n gamma + beta + 2^(shift-1)) / 2^shift), lo, hi)     (shift 0: no rounding)

    Inputs: x (int32), gamma (int64, D), beta (int64, D); int32 out."""
    import numpy as np

    x = np.asarray(inputs[0]).astype(np.int64)
    g = np.asarray(inputs[1]).astype(np.int64)
    bt = np.asarray(inputs[2]).astype(np.int64)
    eps, extra, frac, shift, lo, hi = (int(attrs[k]) for k in ("eps", "extra", "frac", "shift", "lo", "hi"))
    d = x.shape[-1]
    c = d * x - x.sum(axis=-1, keepdims=True)
    v = ((c * c).sum(axis=-1, keepdims=True) << (2 * extra)) // d + eps
    m = (v >= np.array(SQRT_START_POWERS, np.int64)).sum(axis=-1, keepdims=True)
    r = np.left_shift(np.int64(1), m).astype(np.int64)
    for _ in range(NEWTON_STEPS):
        r = np.minimum(r, (r + v // r) // 2)
    if np.any(r * r > v) or np.any((r + 1) * (r + 1) <= v):  # not seen for any V < 2^63 (see NEWTON_STEPS)
        raise ValueError("IntLayerNorm: the Newton steps did not reach floor(sqrt(V)); raise NEWTON_STEPS")
    n = (c << (frac + extra)) // r
    acc = n * g + bt
    if shift > 0:
        acc = (acc + (1 << (shift - 1))) >> shift
    return [np.clip(acc, lo, hi).astype(np.int32)]


class _Body:
    """Builds the node list of a model-local function (standard ONNX ops, int64 arithmetic)."""

    def __init__(self, opset: int):
        self.nodes, self.k, self.opset = [], 0, opset

    def op(self, op_type, *inputs, **attrs):
        from onnx import helper

        out = f"t{self.k}"
        self.k += 1
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def const(self, value, dtype="int64"):
        import numpy as np
        from onnx import numpy_helper

        return self.op("Constant", value=numpy_helper.from_array(np.array(value, dtype)))

    def attr(self, name, kind="int"):
        """A Constant holding the node attribute ``name`` (int64 scalar, or float)."""
        import onnx
        from onnx import helper

        out = f"t{self.k}"
        self.k += 1
        node = helper.make_node("Constant", [], [out])
        a = onnx.AttributeProto()
        a.name = "value_int" if kind == "int" else "value_float"
        a.ref_attr_name = name
        a.type = onnx.AttributeProto.INT if kind == "int" else onnx.AttributeProto.FLOAT
        node.attribute.append(a)
        self.nodes.append(node)
        return out

    def pow2(self, s):
        """2^s (int64) for int64 s >= 0 (a scalar or a tensor, elementwise)."""
        from onnx import TensorProto

        one = self.const(1, "uint64")
        return self.op("Cast", self.op("BitShift", one, self.op("Cast", s, to=TensorProto.UINT64), direction="LEFT"),
                       to=TensorProto.INT64)

    def floordiv(self, a, b):
        """floor(a / b) for b > 0 (ONNX integer Div truncates; integer Mod with fmod=0 takes the
        divisor's sign, so a - Mod(a, b) is an exact multiple of b)."""
        return self.op("Div", self.op("Sub", a, self.op("Mod", a, b)), b)

    def reduce(self, op_type, x):
        if op_type == "ReduceSum" or self.opset >= 18:
            return self.op(op_type, x, self.const([-1]), keepdims=1)
        return self.op(op_type, x, axes=[-1], keepdims=1)

    def function(self, name, inputs, outputs, attributes):
        from onnx import helper

        return helper.make_function(SLIVER_DOMAIN, name, inputs, outputs, self.nodes,
                                    [helper.make_opsetid("", self.opset)], attributes=attributes)


def pot_quantize_function(opset: int = 17):
    """``sliver.PoTQuantize`` as standard ops: Mul, Add 0.5, Floor, Clip, Cast(int32) (float)."""
    from onnx import TensorProto, helper

    f = _Body(opset)
    e = f.op("Cast", f.attr("exponent"), to=TensorProto.FLOAT)
    scale = f.op("Pow", f.const(2.0, "float32"), e)
    y = f.op("Floor", f.op("Add", f.op("Mul", "x", scale), f.const(0.5, "float32")))
    lo = f.op("Cast", f.attr("lo"), to=TensorProto.FLOAT)
    hi = f.op("Cast", f.attr("hi"), to=TensorProto.FLOAT)
    f.nodes.append(helper.make_node("Cast", [f.op("Clip", y, lo, hi)], ["y"], to=TensorProto.INT32))
    return f.function("PoTQuantize", ["x"], ["y"], ["exponent", "lo", "hi"])


def int_softmax_function(opset: int = 17):
    """``sliver.IntSoftmax`` as standard int64 ops (see :func:`int_softmax_reference`)."""
    from onnx import TensorProto, helper

    f = _Body(opset)
    x = f.op("Cast", "x", to=TensorProto.INT64)
    x = f.op("Sub", x, f.reduce("ReduceMax", x))
    ln2, b, c, zmax, m = (f.attr(k) for k in ("ln2", "b", "c", "zmax", "out_exponent"))
    negx = f.op("Neg", x)
    z = f.op("Div", negx, ln2)  # non-negative / positive: truncation is floor
    p = f.op("Add", x, f.op("Mul", z, ln2))
    pb = f.op("Add", p, b)
    poly = f.op("Add", f.op("Mul", pb, pb), c)
    shift = f.op("Cast", f.op("Min", z, zmax), to=TensorProto.UINT64)
    e = f.op("BitShift", f.op("Cast", poly, to=TensorProto.UINT64), shift, direction="RIGHT")
    e = f.op("Cast", e, to=TensorProto.INT64)
    y = f.op("Div", f.op("Mul", e, f.pow2(m)), f.reduce("ReduceSum", e))
    f.nodes.append(helper.make_node("Cast", [y], ["y"], to=TensorProto.INT32))
    return f.function("IntSoftmax", ["x"], ["y"], ["ln2", "b", "c", "zmax", "out_exponent"])


def int_gelu_function(opset: int = 17):
    """``sliver.IntGELU`` as standard int64 ops (see :func:`int_gelu_reference`)."""
    from onnx import TensorProto, helper

    f = _Body(opset)
    x = f.op("Cast", "x", to=TensorProto.INT64)
    b, c, m, s1, s2, lo, hi = (f.attr(k) for k in ("b", "c", "m", "shift1", "shift2", "lo", "hi"))
    a = f.op("Min", f.op("Abs", x), f.op("Neg", b))
    ab = f.op("Add", a, b)
    big = f.op("Mul", f.op("Sign", x), f.op("Add", f.op("Mul", ab, ab), c))
    n = f.op("Neg", f.op("Add", big, c))
    t = f.floordiv(f.op("Mul", x, n), f.pow2(s1))
    half = f.op("Div", f.pow2(s2), f.const(2))
    y = f.floordiv(f.op("Add", f.op("Mul", t, m), half), f.pow2(s2))
    f.nodes.append(helper.make_node("Cast", [f.op("Clip", y, lo, hi)], ["y"], to=TensorProto.INT32))
    return f.function("IntGELU", ["x"], ["y"], ["b", "c", "m", "shift1", "shift2", "lo", "hi"])


def int_layernorm_function(opset: int = 17):
    """``sliver.IntLayerNorm`` as standard int64 ops (see :func:`int_layernorm_reference`), the
    ``NEWTON_STEPS`` square-root steps unrolled (a ``Loop`` would leave the output shape unknown
    to ONNX shape inference)."""
    from onnx import TensorProto, helper

    f = _Body(opset)
    x = f.op("Cast", "x", to=TensorProto.INT64)
    g = f.op("Cast", "gamma", to=TensorProto.INT64)
    bt = f.op("Cast", "beta", to=TensorProto.INT64)
    eps, extra, frac, shift, lo, hi = (f.attr(k) for k in ("eps", "extra", "frac", "shift", "lo", "hi"))
    d = f.op("Gather", f.op("Shape", x), f.const(-1))
    c = f.op("Sub", f.op("Mul", x, d), f.reduce("ReduceSum", x))
    twice = f.op("Add", extra, extra)
    v = f.op("Add", f.op("Div", f.op("Mul", f.reduce("ReduceSum", f.op("Mul", c, c)), f.pow2(twice)), d), eps)
    m = f.op("ReduceSum", f.op("Cast", f.op("GreaterOrEqual", v, f.const(SQRT_START_POWERS)), to=TensorProto.INT64),
             f.const([-1]), keepdims=1)
    r = f.pow2(m)
    two = f.const(2)
    for _ in range(NEWTON_STEPS):
        r = f.op("Min", r, f.op("Div", f.op("Add", r, f.op("Div", v, r)), two))  # non-negative: Div = floor
    n = f.floordiv(f.op("Mul", c, f.pow2(f.op("Add", frac, extra))), r)
    acc = f.op("Add", f.op("Mul", n, g), bt)
    half = f.op("Div", f.pow2(shift), f.const(2))
    y = f.floordiv(f.op("Add", acc, half), f.pow2(shift))
    f.nodes.append(helper.make_node("Cast", [f.op("Clip", y, lo, hi)], ["y"], to=TensorProto.INT32))
    return f.function("IntLayerNorm", ["x", "gamma", "beta"], ["y"], ["eps", "extra", "frac", "shift", "lo", "hi"])


POT_QUANTIZE = define(CustomOp(
    op_type="PoTQuantize",
    doc="float -> int32 clip(floor(x * 2^exponent + 0.5), lo, hi): a power-of-two quantiser wider than "
        "8 bits (QuantizeLinear at opset 17 has only int8/uint8); pot-shift turns it into ShiftRequant",
    reference=pot_quantize_reference, function=pot_quantize_function))
INT_SOFTMAX = define(CustomOp(
    op_type="IntSoftmax",
    doc="integer softmax over the last axis (I-BERT i-exp + integer normalisation to 2^-out_exponent); "
        "attributes from ir.opdefs.int_softmax_constants",
    reference=int_softmax_reference, function=int_softmax_function))
INT_GELU = define(CustomOp(
    op_type="IntGELU",
    doc="integer GELU (I-BERT i-GELU, d1 = 1, dyadic output rescale); attributes from "
        "ir.opdefs.int_gelu_constants",
    reference=int_gelu_reference, function=int_gelu_function))
INT_LAYERNORM = define(CustomOp(
    op_type="IntLayerNorm",
    doc="integer LayerNorm over the last axis (exact mean by scaling, Newton integer square root, "
        "integer gamma/beta, rounding shift); inputs x, gamma, beta; attributes from "
        "ir.opdefs.int_layernorm_constants",
    reference=int_layernorm_reference, function=int_layernorm_function))


# ------------------------------------------------------------------------------------------------
# integer pooling and dyadic requantisation (issue #18: full-size CNNs integer-only; keep this
# block together)

#: the multiplier of DyadicRequant is below 2^31, so ``x * m`` of an int32 x stays within int64
DYADIC_MULTIPLIER_BITS = 31
#: largest right shift of DyadicRequant (its standard-op body offsets the product by 2^62)
DYADIC_MAX_SHIFT = 62


def dyadic_constants(factor, max_bits: int = DYADIC_MULTIPLIER_BITS) -> tuple:
    """``(m, s)`` with ``m / 2^s`` the dyadic number nearest a positive real ``factor`` (array:
    per element) among those with ``2^(max_bits - 1) <= m < 2^max_bits`` (HAWQ-V3, Yao et al.,
    ICML 2021, Sec. 3.3: every real rescale as an integer multiply and a right shift). A relative
    error of at most 2^-max_bits: an averaged value differs from its exact rounding only when it
    lies within that of a rounding boundary."""
    import numpy as np

    f = np.asarray(factor, np.float64)
    if np.any(f <= 0) or not np.all(np.isfinite(f)):
        raise ValueError("dyadic_constants: the factor must be positive and finite")
    # 2^(b-1) <= f 2^s < 2^b  ->  s = b - 1 - floor(log2 f)
    s = (max_bits - 1 - np.floor(np.log2(f))).astype(np.int64)
    m = np.round(f * np.power(2.0, s)).astype(np.int64)
    big = m >= (1 << max_bits)  # rounding reached 2^b: one bit less
    m = np.where(big, m >> 1, m)
    s = np.where(big, s - 1, s)
    if np.any(s < 1) or np.any(s > DYADIC_MAX_SHIFT):
        raise ValueError(f"dyadic_constants: factor {float(f.max()):g} needs a shift outside 1..{DYADIC_MAX_SHIFT}")
    return m, s


def dyadic_requant_reference(inputs, attrs):
    """int32 x, int64 multiplier m, int64 shift s (both broadcast against x) ->
    ``clip(floor((x * m + 2^(s-1)) / 2^s), lo, hi)`` cast to ``to`` (default INT8).

    HAWQ-V3's dyadic requantisation (round half up, as ShiftRequant); ``0 < m < 2^31`` and
    ``1 <= s <= 62``, so every intermediate fits in int64."""
    import numpy as np
    from onnx import helper

    x = np.asarray(inputs[0]).astype(np.int64)
    m = np.asarray(inputs[1]).astype(np.int64)
    s = np.asarray(inputs[2]).astype(np.int64)
    if (m <= 0).any() or (m >= 1 << DYADIC_MULTIPLIER_BITS).any():
        raise ValueError(f"DyadicRequant multipliers must be in 1..2^{DYADIC_MULTIPLIER_BITS} - 1")
    if (s < 1).any() or (s > DYADIC_MAX_SHIFT).any():
        raise ValueError(f"DyadicRequant shifts must be 1..{DYADIC_MAX_SHIFT}")
    y = (x * m + np.left_shift(np.int64(1), s - 1)) >> s
    lo, hi = int(attrs.get("lo", INT8_RANGE[0])), int(attrs.get("hi", INT8_RANGE[1]))
    to = helper.tensor_dtype_to_np_dtype(int(attrs.get("to", 3)))
    return [np.clip(y, lo, hi).astype(to)]


def dyadic_requant_function(opset: int = 17):
    """``sliver.DyadicRequant`` as exact standard integer ops: ``p = x * m`` in int64 (|p| < 2^62),
    then the floor shift of ShiftRequant's body with the offset ``B = 2^62`` (a multiple of every
    2^s, s <= 62): ``floor((p + r) / 2^s) = ((p + B + r) >> s) - (B >> s)`` in uint64."""
    from onnx import TensorProto, helper

    f = _Body(opset)
    x = f.op("Mul", f.op("Cast", "x", to=TensorProto.INT64), f.op("Cast", "multiplier", to=TensorProto.INT64))
    s = f.op("Cast", "shift", to=TensorProto.UINT64)
    one = f.const(1, "uint64")
    offset = f.const(1 << DYADIC_MAX_SHIFT, "uint64")
    half = f.op("BitShift", f.op("BitShift", one, s, direction="LEFT"), one, direction="RIGHT")
    positive = f.op("Cast", f.op("Add", x, f.op("Cast", offset, to=TensorProto.INT64)), to=TensorProto.UINT64)
    shifted = f.op("BitShift", f.op("Add", positive, half), s, direction="RIGHT")
    value = f.op("Sub", f.op("Cast", shifted, to=TensorProto.INT64),
                 f.op("Cast", f.op("BitShift", offset, s, direction="RIGHT"), to=TensorProto.INT64))
    lo, hi = f.attr("lo"), f.attr("hi")
    # Where/Less, not Clip or Max/Min: ONNX Runtime 1.31's int64 Clip, Max and Min let -2247827625
    # through a lower bound of -128 (measured); its Less is right
    value = f.op("Where", f.op("Less", hi, value), hi, value)
    cast = helper.make_node("Cast", [f.op("Where", f.op("Less", value, lo), lo, value)], ["y"])
    ref = onnx_attribute_ref("to", "to")
    cast.attribute.append(ref)
    f.nodes.append(cast)
    return f.function("DyadicRequant", ["x", "multiplier", "shift"], ["y"], ["lo", "hi", "to"])


def onnx_attribute_ref(node_attr: str, attr: str):
    import onnx

    a = onnx.AttributeProto()
    a.name, a.ref_attr_name, a.type = node_attr, attr, onnx.AttributeProto.INT
    return a


def _pool_geometry(shape, attrs):
    kernel = [int(k) for k in attrs["kernel_shape"]]
    nd = len(kernel)
    strides = [int(s) for s in attrs.get("strides", [1] * nd)]
    pads = [int(p) for p in attrs.get("pads", [0] * (2 * nd))]
    dil = [int(d) for d in attrs.get("dilations", [1] * nd)]
    if int(attrs.get("ceil_mode", 0)):
        raise ValueError("IntMaxPool: ceil_mode=1 is not supported; export with ceil_mode=False")
    out = [(shape[2 + a] + pads[a] + pads[a + nd] - dil[a] * (kernel[a] - 1) - 1) // strides[a] + 1 for a in range(nd)]
    return kernel, strides, pads, dil, out


def int_max_pool_reference(inputs, attrs):
    """Max pooling of integers (NCHW, any rank of spatial axes; attributes of ONNX MaxPool:
    kernel_shape, strides, pads, dilations; ceil_mode 0): padding never wins (it is the type's
    minimum), so the result is the maximum over the window's positions inside the input. Exact."""
    import itertools

    import numpy as np

    x = np.asarray(inputs[0])
    kernel, strides, pads, dil, out = _pool_geometry(x.shape, attrs)
    nd = len(kernel)
    lowest = np.iinfo(x.dtype).min
    padded = np.pad(x, [(0, 0), (0, 0)] + [(pads[a], pads[a + nd]) for a in range(nd)], constant_values=lowest)
    y = np.full(x.shape[:2] + tuple(out), lowest, x.dtype)
    for offs in itertools.product(*[range(k) for k in kernel]):
        idx = tuple(slice(o * d, o * d + (n - 1) * s + 1, s) for o, d, n, s in zip(offs, dil, out, strides))
        y = np.maximum(y, padded[(slice(None), slice(None)) + idx])
    return [y]


def int_max_pool_function(opset: int = 17):
    """``sliver.IntMaxPool`` for ONNX Runtime, whose MaxPool takes int8/uint8 but not int32:
    ``Cast`` to double, ``MaxPool``, ``Cast`` back. Exact: every int32 is a double, and a
    maximum selects one of its inputs (no arithmetic). The op's meaning is the integer maximum
    of :func:`int_max_pool_reference`; TVM lowers it to an int32 max-pool directly."""
    import onnx
    from onnx import TensorProto, helper

    f = _Body(opset)
    wide = f.op("Cast", "x", to=TensorProto.DOUBLE)
    pool = helper.make_node("MaxPool", [wide], ["pooled"])
    for name in ("kernel_shape", "strides", "pads", "dilations"):
        a = onnx.AttributeProto()
        a.name, a.ref_attr_name, a.type = name, name, onnx.AttributeProto.INTS
        pool.attribute.append(a)
    f.nodes.append(pool)
    f.nodes.append(helper.make_node("Cast", ["pooled"], ["y"], to=TensorProto.INT32))
    return f.function("IntMaxPool", ["x"], ["y"], ["kernel_shape", "strides", "pads", "dilations"])


DYADIC_REQUANT = define(CustomOp(
    op_type="DyadicRequant",
    doc="requantise an int32 value by a dyadic number: clip(floor((x * m + 2^(s-1)) / 2^s), lo, hi) cast to "
        "`to` (default INT8), with int64 inputs multiplier m (1..2^31-1) and shift s (1..62), per channel; "
        "an average over n positions is its sum times m / 2^s ~ 2^k / n (HAWQ-V3); constants from "
        "ir.opdefs.dyadic_constants",
    reference=dyadic_requant_reference, function=dyadic_requant_function))
INT_MAX_POOL = define(CustomOp(
    op_type="IntMaxPool",
    doc="max pooling of int32 values (ONNX MaxPool's attributes kernel_shape, strides, pads, dilations; "
        "ceil_mode 0), exact; int8/uint8 values use ONNX MaxPool itself",
    reference=int_max_pool_reference, function=int_max_pool_function))
