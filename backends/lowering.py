"""Lowering rules for sliver's custom-domain ONNX ops, and the Relax clean-ups the CPU build needs.

A pass at the onnx level may emit an op of domain ``sliver`` (``sliver.ShiftRequant``,
``sliver.AppMatMul``, token selection, ...). Its name, attributes and reference semantics are
defined once in :mod:`sliver.ir.opdefs`; *how TVM computes it* is registered here:

    @lowering.register("ShiftRequant")
    def lower_shift_requant(bb, inputs, attrs):
        return <a Relax expression>            # built with tvm.relax.op

:func:`register` puts the rule into :data:`sliver.ir.tvm_level.CUSTOM_IMPORTERS` (op_type ->
converter for TVM's ONNX importer), the single hook through which the onnx -> Relax import sees
custom ops. A rule receives the Relax block builder, the node's inputs as Relax expressions and
its attributes (ints, floats, strings, lists; bytes decoded), and returns one Relax expression
(or a tuple of them for several outputs). Prefer compositions of Relax ops (matmul, shifts, clip,
take, topk...) that the CPU schedule rules already handle; a PrimFunc via ``bb.emit_te`` or
``R.call_tir`` is the escape hatch for anything else.

Worked example: ``sliver.ShiftRequant`` (int32 accumulator -> int8, rounding right shift by
``shift`` bits, saturate), bit-exact against its numpy reference in ``ir.opdefs``.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import numpy as np

from ..ir import opdefs
from ..ir.tvm_level import CUSTOM_IMPORTERS

#: op_type -> lowering rule (bb, inputs, attrs) -> Relax expression
RULES: dict = {}


def register(op_type: str, domain: str = opdefs.SLIVER_DOMAIN) -> Callable:
    """Decorator: register ``fn(bb, inputs, attrs)`` as the TVM lowering of custom op ``op_type``."""

    def wrap(fn: Callable) -> Callable:
        if op_type in RULES:
            raise ValueError(f"a lowering for {op_type} is registered twice")
        definition = opdefs.lookup(domain, op_type)
        if definition is None:
            raise ValueError(f"{domain}.{op_type} has no definition in sliver.ir.opdefs; define it there first")
        RULES[op_type] = fn
        CUSTOM_IMPORTERS[op_type] = _converter(op_type, fn)
        return fn

    return wrap


def _converter(op_type: str, fn: Callable):
    """A converter class in the protocol of TVM 0.27's ONNX importer (``_impl_v1`` classmethod)."""

    def _impl_v1(cls, bb, inputs, attr, params):
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in dict(attr).items()}
        return fn(bb, list(inputs), attrs)

    return type(f"Lower{op_type}", (), {"_impl_v1": classmethod(_impl_v1), "get_converter": classmethod(lambda cls, opset: cls._impl_v1)})


def registered() -> list:
    return sorted(RULES)


def clip_const(x, lo, hi, dtype: str):
    """``clip(x, lo, hi)`` for constant bounds, as ``minimum(maximum(x, lo), hi)`` on ``dtype``
    constants. TVM 0.27's ``ConvertLayout`` has no layout rule for ``relax.op.clip``: a clip after
    an NHWC convolution got a transpose on each side and was not fused into it (measured on the
    integer MobileNetV2: the requantisation's clip in 52 transpose kernels, 21 of its 46 ms).
    ``maximum``/``minimum`` are layout-agnostic, so the whole epilogue fuses."""
    from tvm import relax

    return relax.op.minimum(relax.op.maximum(x, relax.const(lo, dtype)), relax.const(hi, dtype))


# ------------------------------------------------------------------------------------------------
# worked example


@register("ShiftRequant")
def lower_shift_requant(bb, inputs, attrs):
    """int32 -> integers: ``clip((x + 2^(s-1)) >> s, lo, hi)`` cast to ``to`` (the reference in
    ``ir.opdefs`` computes the same in numpy int64). ``s`` is the attribute ``shift`` or the
    optional second input (per-channel shifts).

    With int32 ``x`` and constant shifts below 32 it stays in int32 lanes (twice as many per
    vector as int64, and the requantisation epilogue of an integer kernel is mostly this op) by
    the overflow-free identity ``(x + 2^(s-1)) >> s = (x >> s) + ((x >> (s-1)) & 1)``: with
    ``x = q 2^s + r``, ``0 <= r < 2^s``, both sides are ``q + [r >= 2^(s-1)]`` (arithmetic shifts
    are floors). Otherwise it is computed in int64, where the rounding term cannot overflow."""
    import numpy as np
    import tvm
    from onnx import helper
    from tvm import relax

    x = inputs[0]
    lo, hi = int(attrs.get("lo", opdefs.INT8_RANGE[0])), int(attrs.get("hi", opdefs.INT8_RANGE[1]))
    to = str(np.dtype(helper.tensor_dtype_to_np_dtype(int(attrs.get("to", 3)))))
    shift_input = inputs[1] if len(inputs) > 1 else None
    if shift_input is None:
        shifts = np.asarray(int(attrs.get("shift", 0)), np.int64)
    elif isinstance(shift_input, tvm.ir.expr.Constant):
        shifts = shift_input.value.numpy().astype(np.int64)
    else:
        shifts = None
    i32 = np.iinfo(np.int32)
    if (str(x.ty.dtype) == "int32" and shifts is not None and shifts.size and 0 <= shifts.min()
            and shifts.max() < 32 and i32.min <= lo <= hi <= i32.max):
        if shifts.ndim == 0 or np.all(shifts == shifts.flat[0]):
            s = int(shifts.flat[0])
            y = x if s == 0 else relax.op.add(
                relax.op.right_shift(x, relax.const(s, "int32")),
                relax.op.bitwise_and(relax.op.right_shift(x, relax.const(s - 1, "int32")), relax.const(1, "int32")))
        else:  # per channel: s = 0 keeps x (the rounding bit is masked off)
            s = relax.const(shifts.astype(np.int32), "int32")
            below = relax.const(np.maximum(shifts - 1, 0).astype(np.int32), "int32")
            mask = relax.const(np.minimum(shifts, 1).astype(np.int32), "int32")
            y = relax.op.add(relax.op.right_shift(x, s),
                             relax.op.bitwise_and(relax.op.right_shift(x, below), mask))
        return relax.op.astype(clip_const(y, lo, hi, "int32"), to)
    wide = relax.op.astype(x, "int64")
    if shift_input is not None:
        shift = relax.op.astype(shift_input, "int64")
        one = relax.const(1, "int64")
        # 2^s >> 1 is 2^(s-1) for s > 0 and 0 for s = 0
        half = relax.op.right_shift(relax.op.left_shift(one, shift), one)
        wide = relax.op.right_shift(relax.op.add(wide, half), shift)
    else:
        shift = int(attrs.get("shift", 0))
        if shift > 0:
            wide = relax.op.add(wide, relax.const(1 << (shift - 1), "int64"))
            wide = relax.op.right_shift(wide, relax.const(shift, "int64"))
    wide = clip_const(wide, lo, hi, "int64")
    return relax.op.astype(wide, to)


class ImporterHook:
    """An ONNX op converter for TVM's importer hook: ``_impl(bb, inputs, attr, params)`` for
    every opset."""

    @classmethod
    def get_converter(cls, opset):
        return cls._impl


class ConvIntegerAsRelaxOp(ImporterHook):
    """ONNX ``ConvInteger`` (TVM 0.27's importer has none): int32 convolution of the operands
    minus their zero-points, ``relax.op.nn.conv2d(..., out_dtype="int32")``; exact. Within the CPU
    build (:func:`build_importers` sets ``on_int8``) a convolution without zero-points stays on the
    int8/uint8 operands: the dot-product kernel for groups 1, 8-bit loads for grouped ones."""

    #: set while the CPU build imports (see build_importers)
    on_int8 = False

    @classmethod
    def _impl(cls, bb, inputs, attr, params):
        from tvm import relax

        x, w = inputs[0], inputs[1]
        kernel = list(attr.get("kernel_shape", []))
        no_zero_points = not any(i is not None for i in inputs[2:])
        if no_zero_points and len(kernel) in (0, 2) and cls.on_int8:
            # on the int8/uint8 operands themselves: the CPU build's dot-product kernel matches
            # (schedules.int8_conv2d_legalizer); grouped and depthwise convolutions read 8-bit
            # data and widen it per load, so their producers write 8-bit tensors instead of
            # int32 ones (4x the bytes). TVM's conv2d accumulates in out_dtype: exact.
            pads = list(attr.get("pads", [0, 0, 0, 0]))
            return relax.op.nn.conv2d(x, w, strides=list(attr.get("strides", [1, 1])), padding=pads,
                                      dilation=list(attr.get("dilations", [1, 1])), groups=int(attr.get("group", 1)),
                                      out_dtype="int32")
        x = relax.op.astype(x, "int32")
        w = relax.op.astype(w, "int32")
        if len(inputs) > 2 and inputs[2] is not None:
            x = relax.op.subtract(x, relax.op.astype(inputs[2], "int32"))
        if len(inputs) > 3 and inputs[3] is not None:
            w = relax.op.subtract(w, relax.op.astype(inputs[3], "int32"))
        kernel = list(attr.get("kernel_shape", []))
        ndim = len(kernel) if kernel else 2
        if ndim != 2:
            from ..ir.errors import UnsupportedOpError

            raise UnsupportedOpError(f"ConvInteger with {ndim}-D kernels has no TVM lowering; only 2-D")
        pads = list(attr.get("pads", [0, 0, 0, 0]))
        return relax.op.nn.conv2d(
            x,
            w,
            strides=list(attr.get("strides", [1, 1])),
            padding=pads,
            dilation=list(attr.get("dilations", [1, 1])),
            groups=int(attr.get("group", 1)),
            out_dtype="int32",
        )


# ------------------------------------------------------------------------------------------------
# Relax clean-ups used by the CPU build


class ClipAsRelaxOp(ImporterHook):
    """ONNX ``Clip`` with constant bounds -> :func:`clip_const` (ReLU6 in MobileNetV2).

    TVM's importer lowers Clip straight to two TIR calls (maximum, minimum), which
    ``ConvertLayout`` cannot move to NHWC: every ReLU6 got a transpose on each side and was not
    fused into its convolution (measured: MobileNetV2 3.5x slower than ONNX Runtime with them).
    ``maximum``/``minimum`` are layout-agnostic, so convolutions stay NHWC and fuse with them. Clips with
    non-constant bounds keep TVM's own conversion. Used only inside :func:`build_importers`.
    """

    @classmethod
    def _impl(cls, bb, inputs, attr, params):
        import tvm
        from tvm import relax
        from tvm.relax.frontend.onnx import onnx_frontend

        import numpy as np

        x = inputs[0]
        bounds = []
        for k, name, default in ((1, "min", -np.inf), (2, "max", np.inf)):
            b = inputs[k] if len(inputs) > k else None
            if b is None:
                bounds.append(float(attr.get(name, default)))
            elif isinstance(b, tvm.ir.expr.Constant) and b.value.numpy().size == 1 and not np.isnan(b.value.numpy()).any():
                bounds.append(float(b.value.numpy().reshape(())))
            else:
                bounds.append(None)
        if None in bounds or str(x.ty.dtype) != "float32":
            return onnx_frontend.Clip.get_converter(13)(bb, inputs, attr, params)
        lo, hi = bounds
        # relax maximum/minimum with scalar constants (ConvertLayout has no layout rule for clip)
        out = x
        if lo > -np.inf:
            out = bb.emit(relax.op.maximum(out, relax.const(lo, "float32")))
        if hi < np.inf:
            out = relax.op.minimum(out, relax.const(hi, "float32"))
        return out


class GatherConstAsRelaxOp(ImporterHook):
    """ONNX ``Gather`` with constant in-range indices on a static axis -> one ``take`` of a constant.

    TVM's importer normalises negative indices with a computation on ``shape_of(data)``
    (``where(less(i, 0), i + shape[axis], i)``), which stays a variable until after
    legalisation; :func:`sliver.backends.schedules.take_before_permute` needs to see the constant
    (a ViT's ``qkv[0]``, ``qkv[1]``, ``qkv[2]``). The indices are normalised here instead. Other
    Gathers keep TVM's conversion. Used only inside :func:`build_importers`.
    """

    @classmethod
    def _impl(cls, bb, inputs, attr, params):
        import numpy as np
        import tvm
        from tvm import relax
        from tvm.relax.frontend.onnx import onnx_frontend

        data, indices = inputs[0], inputs[1]
        axis = int(attr.get("axis", 0))
        shape = getattr(getattr(data, "ty", None), "shape", None)
        # a tensor that is no constant (constants fold, shape values are read by TVM's converter)
        tensor = not isinstance(data, (relax.ShapeExpr, tvm.ir.GenericConst)) and isinstance(shape, relax.ShapeExpr)
        if isinstance(indices, tvm.ir.GenericConst) and tensor:
            dims = shape.values
            axis %= len(dims)
            if isinstance(dims[axis], tvm.tirx.IntImm):
                extent = int(dims[axis])
                idx = indices.value.numpy()
                if np.issubdtype(idx.dtype, np.integer) and ((idx >= -extent) & (idx < extent)).all():
                    idx = np.where(idx < 0, idx + extent, idx).astype(idx.dtype)
                    return relax.op.take(data, relax.const(idx, str(idx.dtype)), axis)
        return onnx_frontend.Gather.get_converter(13)(bb, inputs, attr, params)


#: standard ONNX ops whose import sliver replaces (same hook as the custom ops)
CUSTOM_IMPORTERS["ConvInteger"] = ConvIntegerAsRelaxOp

#: standard ONNX ops imported differently only while the CPU build imports (see
#: :func:`build_importers`): the same values, in a form the build's layout and fusion passes handle
BUILD_IMPORTERS = {"Clip": ClipAsRelaxOp, "Gather": GatherConstAsRelaxOp}


@contextlib.contextmanager
def build_importers(dot_product: bool = False):
    """Within this block the onnx -> Relax import uses :data:`BUILD_IMPORTERS` too.

    ``backends.tvm.build`` imports inside it; ``ir.convert(program, "tvm")`` elsewhere (printing,
    golden text, a user's own Relax passes) sees TVM's own conversion of those ops.
    ``dot_product``: the target has an exact 8-bit dot-product instruction (VNNI, sdot), so a
    product of two 8-bit activations stays on its 8-bit operands (see
    :class:`MatMulIntegerAsRelaxOp`).
    """
    saved = {op: CUSTOM_IMPORTERS.get(op) for op in BUILD_IMPORTERS}
    CUSTOM_IMPORTERS.update(BUILD_IMPORTERS)
    ConvIntegerAsRelaxOp.on_int8 = True
    MatMulIntegerAsRelaxOp.dot_product = bool(dot_product)
    try:
        yield
    finally:
        ConvIntegerAsRelaxOp.on_int8 = False
        MatMulIntegerAsRelaxOp.dot_product = False
        for op, previous in saved.items():
            if previous is None:
                CUSTOM_IMPORTERS.pop(op, None)
            else:
                CUSTOM_IMPORTERS[op] = previous


# ------------------------------------------------------------------------------------------------
# sliver.AppMatMul (issue #8, FAMES approximate multipliers; keep this block together)


#: the relative cost of one int32 multiply-accumulate against one int8 one on the dot-product
#: kernels (a VNNI ``vpdpbusd`` does 64 int8 products; int32 ``vpmulld`` + add do 16, slower)
INT32_MAC_COST = 4


def app_matmul_plan(w, factors, bits: int) -> dict | None:
    """How :func:`lower_app_matmul` computes ``sum_k LUT[A[., k], W[k, n]]`` for constant ``W``
    from the bit factors ``C`` of the table (:func:`ir.opdefs.app_matmul_bit_factors`), as one
    matmul ``[parts of A] @ [weight blocks] + bias``; None when no plan fits int32.

    With ``D = C - C_exact`` and ``x(v) = [bits of v, 1]``, the multiplier's error on one product
    is ``x(a)^T D x(w)``. The first part is ``A @ W`` itself; the error is split along one operand:

    - **activation bits**: ``sum_{i in R_a} bit_i(A) @ E_i`` with ``E_i = sum_j D[i, j] x_j(W)``,
      ``R_a`` the activation bits whose row of ``D`` is used (a truncated multiplier: its low bits);
    - **weight bits**: ``sum_{j in R_w} F_j(A) @ bit_j(W)`` with ``F_j(a) = sum_{i<b} D[i, j] a_i``
      (elementwise), plus ``G(A) @ 1`` for the activation-only terms ``G(a) = sum_i D[i, b] a_i``.
      A part whose ``F`` is affine in ``a`` (``alpha a + beta`` over the whole operand range) needs
      no product of its own: ``alpha bit_j(W)`` is added to ``W`` and ``beta sum_k bit_j(W)`` to the
      bias. A perforated multiplier drops the partial products of one or two weight bits, i.e. it
      multiplies by ``W`` with those bits changed: it costs what the exact product costs.

    The constant terms go into ``bias``. Storage, the first that fits: **int8** (every part over
    the whole operand range and every weight block in int8); **uint8** (each part ``v`` stored as
    ``(v - lo) >> s``, ``lo`` its minimum, ``s`` the smallest shift that brings it under 256 and
    divides it exactly, its weight block times ``2^s`` still in int8, ``lo sum_k u`` moved to the
    bias: the error parts of 8-bit broken-array multipliers span up to 2^8 values); else
    **int32**. 8-bit storage runs on the dot-product kernels of ``backends.schedules``; the plan
    with the lower cost is taken: parts x (``INT32_MAC_COST`` for int32, 1 otherwise), the
    activation side on a tie. Returns ``{"side", "dtype", "parts": [(kind, payload, lo, shift)],
    "weights" (K * parts, N) int64, "bias" (N,) int64, "cost"}``; a part's stored value is
    ``(raw - lo) >> shift`` with ``raw`` = ``a`` (kind "a"), ``bit_payload(a)`` ("bit") or
    ``sum_i payload[i] bit_i(a)`` ("sum")."""
    from ..ir import opdefs

    wv = np.asarray(w, dtype=np.int64)
    side = 1 << bits
    d = np.asarray(factors, dtype=np.int64) - opdefs.app_matmul_exact_factors(bits)
    xw = np.concatenate([((wv % side)[..., None] >> np.arange(bits)) & 1, np.ones(wv.shape + (1,), np.int64)], axis=-1)
    grid = np.arange(-side // 2, side // 2, dtype=np.int64)
    xa = ((grid % side)[:, None] >> np.arange(bits)) & 1  # (S, b): the activation bits over the operand range

    def in8(a) -> bool:
        return a.size == 0 or (a.min() >= -128 and a.max() <= 127)

    def stored(parts):
        """(dtype, [(kind, payload, lo, shift)], weight blocks, bias change): int8, else uint8, else int32."""
        if all(in8(v) and in8(u) for _, _, v, u in parts):
            return "int8", [(k, p, 0, 0) for k, p, _, _ in parts], [u for *_, u in parts], 0
        out, blocks, bias = [], [], 0
        for kind, payload, v, u in parts:
            lo = int(v.min())
            r = v - lo
            shift = 0
            while int(r.max()) >> shift > 255:
                shift += 1
            if np.any(r % (1 << shift)) or not in8(u << shift):
                break
            out.append((kind, payload, lo, shift))
            blocks.append(u << shift)
            bias = bias + lo * u.sum(axis=0)
        else:
            return "uint8", out, blocks, bias
        return "int32", [(k, p, 0, 0) for k, p, _, _ in parts], [u for *_, u in parts], 0

    candidates = []
    # activation bits
    per_bit = np.einsum("knj,ij->ikn", xw, d)  # (b+1, K, N): E_i, the last one for the constant bit
    parts = [("a", None, grid, wv)] + [("bit", i, xa[:, i], per_bit[i]) for i in range(bits) if per_bit[i].any()]
    candidates.append(("activation", parts, per_bit[bits].sum(axis=0)))
    # weight bits
    errors = [(d[:bits, j], xw[..., j]) for j in range(bits) if d[:bits, j].any() and xw[..., j].any()]
    if d[:bits, bits].any():
        errors.append((d[:bits, bits], np.ones_like(wv)))
    exact_w, bias = wv.copy(), (xw @ d[bits]).sum(axis=0)
    parts = []
    for c, u in errors:
        f = xa @ c  # F over the operand range
        alpha = (f[-1] - f[0]) // (grid[-1] - grid[0])
        beta = f[0] - alpha * grid[0]
        if np.array_equal(f, alpha * grid + beta):  # affine in a: folded into the weights and bias
            exact_w += alpha * u
            bias = bias + beta * u.sum(axis=0)
        else:
            parts.append(("sum", c, f, u))
    candidates.append(("weight", [("a", None, grid, exact_w)] + parts, bias))
    best = None
    for name, parts, bias in candidates:
        dtype, layout, blocks, extra = stored(parts)
        weights, bias = np.concatenate(blocks, axis=0), bias + extra
        if np.abs(weights).max(initial=0) >= 1 << 31 or np.abs(bias).max(initial=0) >= 1 << 31:
            continue
        cost = len(layout) * (INT32_MAC_COST if dtype == "int32" else 1)
        if best is None or cost < best["cost"]:
            best = {"side": name, "dtype": dtype, "parts": layout, "weights": weights, "bias": bias, "cost": cost}
    return best


@register("AppMatMul")
def lower_app_matmul(bb, inputs, attrs):
    """``sliver.AppMatMul`` as ordinary integer matmuls (a per-product gather does not vectorise).

    Weights constant (a layer's), table bilinear in the operand bits (every multiplier of the
    library but the logarithmic ones, :func:`ir.opdefs.app_matmul_bit_factors`): the exact
    product plus the multiplier's error, split along the activation bits or the weight bits
    (:func:`app_matmul_plan`), as one matmul ``[parts of A] @ [weight blocks] + bias`` over
    ``K x parts``, in 8 bits (the dot-product kernels of ``backends.schedules``) when the parts
    fit, against ``K * S`` for the table decomposition.

    Otherwise (a logarithmic multiplier, or weights computed in the graph): the table
    decomposition ``sum_v f_v(A) @ 1[W == v]``. ``F = take(LUT[:, cols], A mod S)`` stacks the
    columns ``f_v`` of the weight values ``v`` in ``cols`` (only the values that occur when ``W`` is
    constant); the masks ``1[W == v]`` are stacked the same way, and ``F`` reshaped to
    (..., K * |cols|) times the masks reshaped to (K * |cols|, N) is the accumulator.

    Both are bit-exact against ``ir.opdefs.app_matmul_reference`` (integers throughout)."""
    import tvm
    from tvm import relax

    from ..ir import opdefs

    a, w, lut = inputs[:3]
    side = int(lut.ty.shape[0])
    a_shape = [int(d) for d in a.ty.shape]
    k, n = (int(d) for d in w.ty.shape)
    constant_w = isinstance(w, tvm.ir.expr.Constant)
    factors = None
    if constant_w and isinstance(lut, tvm.ir.expr.Constant):
        factors = opdefs.app_matmul_bit_factors(lut.value.numpy())
    plan = None if factors is None else app_matmul_plan(w.value.numpy(), factors, side.bit_length() - 1)
    if plan is not None:
        dtype = plan["dtype"]
        a32 = relax.op.astype(a, "int32")

        def bit(i):
            return relax.op.bitwise_and(relax.op.right_shift(a32, relax.const(i, "int32")), relax.const(1, "int32"))

        parts = []
        for kind, payload, lo, shift in plan["parts"]:
            if kind == "a":
                if dtype == "int8":
                    parts.append(relax.op.astype(a, "int8"))
                    continue
                v = a32
            elif kind == "bit":
                v = bit(payload)
            else:  # sum_i c[i] a_i
                v = None
                for i, c in enumerate(payload):
                    if c:
                        term = relax.op.multiply(bit(i), relax.const(int(c), "int32"))
                        v = term if v is None else relax.op.add(v, term)
            if lo:
                v = relax.op.subtract(v, relax.const(lo, "int32"))
            if shift:
                v = relax.op.right_shift(v, relax.const(shift, "int32"))
            parts.append(relax.op.astype(v, dtype))
        x = parts[0] if len(parts) == 1 else relax.op.concat(parts, axis=-1)
        wdtype = "int32" if dtype == "int32" else "int8"  # the 8-bit kernels take int8 weights
        y = relax.op.matmul(x, relax.const(plan["weights"].astype(wdtype), wdtype), out_dtype="int32")
        if plan["bias"].any():
            y = relax.op.add(y, relax.const(plan["bias"].astype(np.int32), "int32"))
        return y
    table = relax.op.astype(lut, "int32")
    index = relax.op.bitwise_and(relax.op.astype(a, "int64"), relax.const(side - 1, "int64"))
    if constant_w:
        wv = w.value.numpy().astype(np.int64) % side
        cols = np.unique(wv)
        masks = (wv[:, None, :] == cols[None, :, None]).astype(np.int32).reshape(k * cols.size, n)
        table = relax.op.take(table, relax.const(cols, "int64"), axis=1, mode="clip")
        masks = relax.const(masks, "int32")
        width = int(cols.size)
    else:
        wv = relax.op.bitwise_and(relax.op.astype(w, "int64"), relax.const(side - 1, "int64"))
        values = relax.const(np.arange(side, dtype=np.int64).reshape(1, side, 1), "int64")
        masks = relax.op.astype(relax.op.equal(relax.op.expand_dims(wv, 1), values), "int32")
        masks = relax.op.reshape(masks, (k * side, n))
        width = side
    f = relax.op.take(table, index, axis=0, mode="clip")  # (..., K, width)
    f = relax.op.reshape(f, a_shape[:-1] + [k * width])
    return relax.op.matmul(f, masks, out_dtype="int32")


# ------------------------------------------------------------------------------------------------
# integer non-linearities of a ViT (issue #7, I-BERT; keep this block together). Integer
# arithmetic only (int64); each rule computes exactly its numpy reference in ``ir.opdefs``.


def _i64(value):
    from tvm import relax

    return relax.const(int(value), "int64")


def _i32(value):
    from tvm import relax

    return relax.const(int(value), "int32")


def _corrected_quotient(q, rem, d, dtype: str):
    """``q`` moved one step toward ``floor(a / d)`` given the exact remainder ``rem = a - q d``
    (``d > 0``): an estimate within one of the quotient becomes exact."""
    from tvm import relax

    op = relax.op
    q = op.subtract(q, op.astype(op.less(rem, relax.const(0, dtype)), dtype))
    return op.add(q, op.astype(op.greater_equal(rem, d), dtype))


def _pow2(s: int):
    return _i64(1 << int(s))


@register("PoTQuantize")
def lower_pot_quantize(bb, inputs, attrs):
    """float -> int32 ``clip(floor(x * 2^e + 0.5), lo, hi)`` (the only float rule here: it is the
    entry of a float value into integers, which pot-shift replaces by ShiftRequant)."""
    from tvm import relax

    x = relax.op.astype(inputs[0], "float32")
    y = relax.op.floor(relax.op.add(relax.op.multiply(x, relax.const(2.0 ** int(attrs["exponent"]), "float32")),
                                    relax.const(0.5, "float32")))
    y = clip_const(y, float(int(attrs["lo"])), float(int(attrs["hi"])), "float32")
    return relax.op.astype(y, "int32")


def _floor_div_f64(bb, a, d, reciprocal=None):
    """``floor(a / d)`` of integer-valued float64 tensors with ``0 <= a``, ``0 < d`` and
    ``a + d < 2^53`` (the caller checks the bound): the float quotient's floor is within one of
    the exact one, and one correction step each way (``r = a - q d``, every term an integer below
    2^53, so exact) makes it exact. x86 has no vector int64 division: as int64 ``floor_divide``
    every element was a scalar ``idiv`` (the integer softmax of DeiT-S: a third of its run time).

    ``reciprocal`` (``1 / d``, e.g. once per row) turns the division into a product: ``a (1/d)``
    is within a relative 2^-52 of ``a / d``, so the estimate is still within one whenever the
    quotient stays below 2^51, and the same correction makes it exact."""
    from tvm import relax

    op = relax.op
    one = relax.const(1.0, "float64")
    q = bb.emit(op.floor(op.divide(a, d) if reciprocal is None else op.multiply(a, reciprocal)))
    r = bb.emit(op.subtract(a, op.multiply(q, d)))
    q = op.where(op.less(r, relax.const(0.0, "float64")), op.subtract(q, one), q)
    return op.where(op.greater_equal(r, d), op.add(q, one), q)


def _floor_div_i64_small_quotient(bb, a, d):
    """``floor(a / d)`` of int64 tensors with ``d > 0`` whose quotient stays below 2^50 in
    magnitude: estimated in float64 (see below: off by at most one), then
    corrected by one step each way on the exact int64 remainder ``a - q d``. Used for the integer
    LayerNorm's ``(c << k) // r``: ``r = floor(sqrt(V))`` with ``V >= floor(sum(c^2) 4^extra / D) + 1``
    bounds the quotient by ``2^(frac + 1) sqrt(D)`` for every int32 input (``r >= |c| 2^extra /
    (2 sqrt(D))`` where that is >= 1, else ``|c| 2^extra < 2 sqrt(D)`` and ``r >= 1``), while ``a``
    itself may pass 2^53. x86 has no vector int64 division; the estimate, the int64 product and
    the compares are vector instructions (AVX-512 DQ). The estimate multiplies by ``1 / d``
    (computed once per row instead of a float division per element); with that rounding too its
    relative error stays below 4 2^-53, so it is still within one of the quotient."""
    from tvm import relax

    op = relax.op
    recip = bb.emit(op.divide(relax.const(1.0, "float64"), op.astype(d, "float64")))  # once per row
    q = bb.emit(op.astype(op.floor(op.multiply(op.astype(a, "float64"), recip)), "int64"))
    rem = bb.emit(op.subtract(a, op.multiply(q, d)))
    return _corrected_quotient(q, rem, d, "int64")


@register("IntSoftmax")
def lower_int_softmax(bb, inputs, attrs):
    """I-BERT integer softmax (``ir.opdefs.int_softmax_reference``).

    ``x' = x - max(x)`` in int64 (an int32 row may span 2^32). Every ``x' < -(zmax + 1) ln2``
    has ``z > zmax``, and a shift by ``zmax`` already clears the polynomial (``zmax`` is the bit
    length of its largest value ``b^2 + c``), so ``x'`` is clamped there: the same ``E = 0``.
    When ``b^2 + c < 2^31`` (input exponents up to 14) the rest runs on 16 int32 lanes: ``z``
    from a float32 product of ``-x'`` (below 2^24) and ``1 / ln2``, corrected one step each way
    on the exact int32 remainder, the polynomial and its shift in int32. Otherwise it stays in int64 (``z``
    in float64, corrected, when ``ln2 < 2^20``). The row sum is int64; the normalisation
    ``floor(E 2^M / sum)`` multiplies by the row's float64 reciprocal and corrects the estimate
    exactly (:func:`_floor_div_f64`) when ``(b^2 + c) 2^M`` and the row length times ``b^2 + c``
    stay below 2^53, else it is an int64 division."""
    from tvm import relax

    op = relax.op
    ln2, b, c, zmax, m = (int(attrs[k]) for k in ("ln2", "b", "c", "zmax", "out_exponent"))
    e_max = max(b * b, (b - ln2) ** 2) + max(c, 0)  # the polynomial's largest value (p in (-ln2, 0])
    floor_x = (zmax + 1) * ln2
    # the row maximum on the int32 input: the producer (q k^T's kernel) then writes int32, not
    # the int64 a cast first would fuse into it
    top = bb.emit(op.max(inputs[0], axis=[-1], keepdims=True))
    x = bb.emit(op.subtract(op.astype(inputs[0], "int64"), op.astype(top, "int64")))
    if e_max < 2**31 and zmax <= 31 and floor_x < 2**24:
        x = bb.emit(op.astype(op.maximum(x, _i64(-floor_x)), "int32"))  # in [-(zmax+1) ln2, 0]
        neg = bb.emit(op.negative(x))
        # -x' (x) 1/ln2 in float32: relative error <= 2^-23 on a quotient <= zmax + 1, within one
        z = bb.emit(op.astype(op.floor(op.multiply(op.astype(neg, "float32"), relax.const(1.0 / ln2, "float32"))), "int32"))
        rem = bb.emit(op.subtract(neg, op.multiply(z, _i32(ln2))))
        z = bb.emit(_corrected_quotient(z, rem, _i32(ln2), "int32"))
        pb = bb.emit(op.add(op.add(x, op.multiply(z, _i32(ln2))), _i32(b)))
        e32 = op.right_shift(op.add(op.multiply(pb, pb), _i32(c)), op.minimum(z, _i32(zmax)))
        e = bb.emit(op.astype(e32, "int64"))
    else:
        x = bb.emit(op.maximum(x, _i64(-floor_x)))
        if ln2 < 2**20:
            z = op.astype(_floor_div_f64(bb, op.astype(op.negative(x), "float64"), relax.const(float(ln2), "float64")), "int64")
        else:
            z = op.floor_divide(op.negative(x), _i64(ln2))
        z = bb.emit(z)
        p = op.add(x, op.multiply(z, _i64(ln2)))
        pb = bb.emit(op.add(p, _i64(b)))
        poly = op.add(op.multiply(pb, pb), _i64(c))
        e = bb.emit(op.right_shift(poly, op.minimum(z, _i64(zmax))))
    total = bb.emit(op.sum(e, axis=[-1], keepdims=True))
    row = int(inputs[0].ty.shape[-1]) if inputs[0].ty.shape is not None else None
    if row is not None and (e_max << m) + row * e_max < 2**53 and m <= 50:
        d = bb.emit(op.astype(total, "float64"))
        recip = bb.emit(op.divide(relax.const(1.0, "float64"), d))
        y = _floor_div_f64(bb, op.astype(op.left_shift(e, _i64(m)), "float64"), d, reciprocal=recip)
    else:
        y = op.floor_divide(op.left_shift(e, _i64(m)), total)
    return op.astype(y, "int32")


#: value ranges of the integer dtypes a tensor may be widened from
_INT_RANGES = {"int8": (-128, 127), "uint8": (0, 255), "int16": (-32768, 32767), "uint16": (0, 65535)}


def _int_range(bb, expr, depth: int = 6):
    """``(lo, hi)`` bounding the integer values of ``expr`` from how it was computed, or None:
    a widening ``astype`` of an 8- or 16-bit tensor has that type's range; a clip to constants
    (``minimum``/``maximum``, :func:`clip_const`) narrows the range of what it clips."""
    import tvm
    from tvm import relax

    if depth <= 0:
        return None
    dtype = str(getattr(expr.ty, "dtype", ""))
    if dtype in _INT_RANGES:
        return _INT_RANGES[dtype]
    if not isinstance(expr, relax.Var):
        return None
    try:
        call = bb.lookup_binding(expr)
    except Exception:
        return None
    if not isinstance(call, relax.Call) or not isinstance(call.op, tvm.ir.Op):
        return None
    name = call.op.name
    if name == "relax.astype" and str(call.ty.dtype).startswith("int"):
        return _int_range(bb, call.args[0], depth - 1)
    if name in ("relax.minimum", "relax.maximum") and isinstance(call.args[1], relax.Constant):
        bound = call.args[1].data.numpy()
        if bound.size != 1:
            return None
        inner = _int_range(bb, call.args[0], depth - 1) or (-(2**63), 2**63 - 1)
        k = int(bound.reshape(()))
        return (min(inner[0], k), min(inner[1], k)) if name == "relax.minimum" else (max(inner[0], k), max(inner[1], k))
    return None


def gelu_fits_int32(attrs, x_max: int | None) -> bool:
    """True when :func:`lower_int_gelu` may compute ``n`` in int32 (``b^2 + 2|c|`` bounds every
    step before it) and, for ``|x| <= x_max`` (None: any int32), also ``t = (x n) >> shift1``
    (``|n| <= max(-2c, b^2)``)."""
    b, c, s1 = int(attrs["b"]), int(attrs["c"]), int(attrs["shift1"])
    if b * b + 2 * abs(c) >= 2**31:
        return False
    return x_max is None or (x_max * max(-2 * c, b * b) < 2**31 and s1 < 31)


@register("IntGELU")
def lower_int_gelu(bb, inputs, attrs):
    """I-BERT integer GELU (``ir.opdefs.int_gelu_reference``); ``right_shift`` is arithmetic
    (floor) in both widths.

    ``min(|x|, -b)`` is ``|clip(x, b, -b)|`` (no overflow at ``x = -2^31``). While ``b^2 + 2|c|``
    stays below 2^31 (:func:`gelu_fits_int32`), ``n = -(L + c)`` is computed in int32 lanes and
    ``x n`` as a product of two sign-extended int32 values; with the input's range known from
    how it was computed (:func:`_int_range`: an 8-bit requantisation widened) and ``|x| max|n|``
    below 2^31, ``t = (x n) >> shift1`` stays in int32 too. ``t m`` and the rounding shift are
    int64. Otherwise all of it is int64."""
    from tvm import relax

    op = relax.op
    b, c, m, s1, s2, lo, hi = (int(attrs[k]) for k in ("b", "c", "m", "shift1", "shift2", "lo", "hi"))
    if str(inputs[0].ty.dtype) in ("int32", "int16", "int8", "uint8", "uint16") and gelu_fits_int32(attrs, None):
        span = _int_range(bb, inputs[0])
        narrow = span is not None and gelu_fits_int32(attrs, max(abs(span[0]), abs(span[1])))
        x = bb.emit(op.astype(inputs[0], "int32"))
        ab = op.add(op.abs(op.maximum(op.minimum(x, _i32(-b)), _i32(b))), _i32(b))
        poly = bb.emit(op.add(op.multiply(ab, ab), _i32(c)))
        big = op.where(op.greater(x, _i32(0)), poly, op.where(op.less(x, _i32(0)), op.negative(poly), _i32(0)))
        n = bb.emit(op.negative(op.add(big, _i32(c))))
        if narrow:
            t = op.astype(op.right_shift(op.multiply(x, n), _i32(s1)) if s1 else op.multiply(x, n), "int64")
        else:
            t = op.multiply(op.astype(x, "int64"), op.astype(n, "int64"))
            t = op.right_shift(t, _i64(s1)) if s1 else t
        y = op.right_shift(op.add(op.multiply(t, _i64(m)), _i64(1 << (s2 - 1))), _i64(s2))
        return op.astype(clip_const(y, lo, hi, "int64"), "int32")
    x = bb.emit(op.astype(inputs[0], "int64"))
    a = op.minimum(op.abs(x), _i64(-b))
    ab = bb.emit(op.add(a, _i64(b)))
    sign = op.subtract(op.astype(op.greater(x, _i64(0)), "int64"), op.astype(op.less(x, _i64(0)), "int64"))
    big = op.multiply(sign, op.add(op.multiply(ab, ab), _i64(c)))
    n = op.negative(op.add(big, _i64(c)))
    t = op.multiply(x, n)
    if s1:
        t = op.right_shift(t, _i64(s1))
    y = op.right_shift(op.add(op.multiply(t, _i64(m)), _i64(1 << (s2 - 1))), _i64(s2))
    return op.astype(clip_const(y, lo, hi, "int64"), "int32")


@register("IntLayerNorm")
def lower_int_layernorm(bb, inputs, attrs):
    """Integer LayerNorm (``ir.opdefs.int_layernorm_reference``) in int64, the Newton steps
    unrolled (``ir.opdefs.NEWTON_STEPS`` of them)."""
    from tvm import relax

    op = relax.op
    eps, extra, frac, shift, lo, hi = (int(attrs[k]) for k in ("eps", "extra", "frac", "shift", "lo", "hi"))
    x = bb.emit(op.astype(inputs[0], "int64"))
    g = op.astype(inputs[1], "int64")
    bt = op.astype(inputs[2], "int64")
    d = int(inputs[0].ty.shape[-1])
    c = bb.emit(op.subtract(op.multiply(x, _i64(d)), op.sum(x, axis=[-1], keepdims=True)))
    sq = op.left_shift(op.sum(op.multiply(c, c), axis=[-1], keepdims=True), _i64(2 * extra))
    v = bb.emit(op.add(op.floor_divide(sq, _i64(d)), _i64(eps)))
    powers = relax.const(np.array(opdefs.SQRT_START_POWERS, np.int64), "int64")
    m = op.sum(op.astype(op.greater_equal(v, powers), "int64"), axis=[-1], keepdims=True)
    r = bb.emit(op.left_shift(op.ones_like(m), m))
    for _ in range(opdefs.NEWTON_STEPS):
        r = bb.emit(op.minimum(r, op.floor_divide(op.add(r, op.floor_divide(v, r)), _i64(2))))
    scaled = bb.emit(op.left_shift(c, _i64(frac + extra)))
    # |n| <= 2^(frac + 1) sqrt(d) (see _floor_div_i64_small_quotient): below 2^50 for these bounds
    n = _floor_div_i64_small_quotient(bb, scaled, r) if frac <= 40 and d <= 1 << 16 else op.floor_divide(scaled, r)
    acc = op.add(op.multiply(n, g), bt)
    if shift > 0:
        acc = op.right_shift(op.add(acc, _i64(1 << (shift - 1))), _i64(shift))
    return op.astype(clip_const(acc, lo, hi, "int64"), "int32")


# ------------------------------------------------------------------------------------------------
# integer pooling and dyadic requantisation (issue #18; keep this block together). Each rule
# computes exactly its numpy reference in ``ir.opdefs``.


@register("DyadicRequant")
def lower_dyadic_requant(bb, inputs, attrs):
    """``clip(floor((x * m + 2^(s-1)) / 2^s), lo, hi)`` in int64 (``x * m`` < 2^62; ``right_shift``
    on int64 is arithmetic, i.e. floor)."""
    from onnx import helper
    from tvm import relax

    op = relax.op
    lo, hi = int(attrs.get("lo", opdefs.INT8_RANGE[0])), int(attrs.get("hi", opdefs.INT8_RANGE[1]))
    to = str(np.dtype(helper.tensor_dtype_to_np_dtype(int(attrs.get("to", 3)))))
    x = op.astype(inputs[0], "int64")
    m = op.astype(inputs[1], "int64")
    s = op.astype(inputs[2], "int64")
    one = relax.const(1, "int64")
    half = op.left_shift(one, op.subtract(s, one))
    y = op.right_shift(op.add(op.multiply(x, m), half), s)
    return op.astype(clip_const(y, lo, hi, "int64"), to)


@register("IntMaxPool")
def lower_int_max_pool(bb, inputs, attrs):
    """Integer max pooling: ``relax.op.nn.max_pool2d`` on the integers (TVM pads a max pool with
    the dtype's minimum, so padding never wins, as in the reference)."""
    from tvm import relax

    from ..ir.errors import UnsupportedOpError

    kernel = [int(k) for k in attrs["kernel_shape"]]
    if len(kernel) != 2:
        raise UnsupportedOpError(f"IntMaxPool with {len(kernel)}-D windows has no TVM lowering; only 2-D")
    if int(attrs.get("ceil_mode", 0)):
        raise UnsupportedOpError("IntMaxPool with ceil_mode=1 has no TVM lowering; export with ceil_mode=False")
    pads = [int(p) for p in attrs.get("pads", [0, 0, 0, 0])]
    return relax.op.nn.max_pool2d(inputs[0], pool_size=kernel, strides=[int(s) for s in attrs.get("strides", [1, 1])],
                                  padding=pads, dilation=[int(d) for d in attrs.get("dilations", [1, 1])])


#: float32 represents every integer of magnitude <= 2^24 exactly
FLOAT32_EXACT = 1 << 24


def exact_in_float32(k: int, a_dtype: str, b_dtype: str) -> bool:
    """True when a product of ``[.., K]`` and ``[K, ..]`` integer operands of these 8-bit dtypes
    is computed exactly in float32: every product, and every partial sum in any order, is an
    integer of magnitude at most ``K * max|a| * max|b|``, which must stay within 2^24."""
    bound = {"int8": 128, "uint8": 255}
    if a_dtype not in bound or b_dtype not in bound:
        return False
    return int(k) * bound[a_dtype] * bound[b_dtype] <= FLOAT32_EXACT


class MatMulIntegerAsRelaxOp(ImporterHook):
    """ONNX ``MatMulInteger`` without zero-points -> ``relax.op.matmul(a, b, out_dtype="int32")`` on
    the int8/uint8 operands themselves (TVM's importer casts both to int32 first, which no integer
    dot-product instruction can match). The CPU build then legalises a product with constant
    int8 weights into sliver's packed dot-product kernel (``schedules.int8_matmul_legalizer``).

    A product of two activations (attention's ``q k^T`` and ``P v``) with an int8 right operand
    stays on the 8-bit operands too where the target has a dot-product instruction
    (``dot_product``, set by :func:`build_importers`): the legaliser packs that operand per call.
    Otherwise it is computed in float32 when that is exact (:func:`exact_in_float32`: K = 64 or
    197 in DeiT-S), cast back to int32: the float kernel's FMAs on 16 lanes instead of int32
    ``vpmulld`` (several times slower per element on Intel cores), the same integers.
    With zero-points it keeps TVM's conversion. Exact either way."""

    #: set while the CPU build imports for a target with a dot-product instruction
    dot_product = False

    @classmethod
    def _impl(cls, bb, inputs, attr, params):
        from tvm import relax
        from tvm.relax.frontend.onnx import onnx_frontend

        from .schedules import _is_constant, _static_shape

        if len(inputs) > 2 and any(i is not None for i in inputs[2:]):
            return onnx_frontend.MatMulInteger.get_converter(10)(bb, inputs, attr, params)
        a, b = inputs[0], inputs[1]
        a_shape, b_shape = _static_shape(a), _static_shape(b)
        if (a_shape is not None and b_shape is not None and len(a_shape) >= 2 and len(b_shape) >= 2
                and not _is_constant(bb, b) and not (cls.dot_product and str(b.ty.dtype) == "int8")
                and exact_in_float32(a_shape[-1], str(a.ty.dtype), str(b.ty.dtype))):
            y = relax.op.matmul(relax.op.astype(a, "float32"), relax.op.astype(b, "float32"), out_dtype="float32")
            return relax.op.astype(y, "int32")
        return relax.op.matmul(a, b, out_dtype="int32")


BUILD_IMPORTERS["MatMulInteger"] = MatMulIntegerAsRelaxOp
