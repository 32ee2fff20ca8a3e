"""From ONNX nodes to hardware work: one cost rule per op type, in one lookup table.

A *cost rule* takes an ONNX node and an :class:`OpContext` (shapes, bit widths, where each value
lives) and returns the work the node asks of the accelerator: a
:class:`~.formulas.GemmWork` or a :class:`~.formulas.StreamWork`. The formulas that price work
are in :mod:`.formulas`; rules only describe it.

Extension point: sliver's custom ops (``sliver.ShiftRequant``, ``sliver.AppMatMul``, and whatever
passes add later) get their rule with :func:`register_op_cost`::

    from sliver.backends import fpga

    def pot_matmul(node, ctx):                     # a PoT-weight matmul on the LUT engine
        return ctx.matmul_work(node, engine="lut", energy_ratio=0.3)

    fpga.register_op_cost("PotMatMul", pot_matmul)  # domain "sliver" by default

Bit widths: each value has a width. Integer tensors have their dtype's width (INT8 -> 8, INT4 ->
4, INT32 -> 32); a ``DequantizeLinear`` output keeps the width of its integer input, and layout
ops (reshape, transpose, gather, ...) keep their input's; anything else (float) takes the costing
call's default ``bits``. A GEMM runs at the wider of its two operands' widths.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from math import prod
from typing import Callable

from onnx import helper

from ...ir.errors import UnsupportedOpError
from ...ir.onnx_level import SLIVER_DOMAIN, value_types
from ...ir.stats import gemm_shape
from .accelerator import Accelerator
from .formulas import FREE, GemmWork, StreamWork, sort_passes

#: ONNX integer element types -> bit width
_INT_BITS = {2: 8, 3: 8, 4: 16, 5: 16, 6: 32, 7: 64, 9: 1, 12: 32, 13: 64, 21: 4, 22: 4}

_LAYOUT = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Transpose", "Gather", "Slice",
           "Split", "Concat", "Expand", "Tile", "Pad", "DepthToSpace", "SpaceToDepth", "GatherElements",
           "GatherND", "Resize", "Dropout"}


def _domain(node) -> str:
    return "" if node.domain in ("", "ai.onnx") else node.domain


class OpContext:
    """What a cost rule may ask about a graph. Built once per costing."""

    def __init__(self, model, accel: Accelerator, bits: int, *, onchip_io: bool = False,
                 constants: frozenset = frozenset(), types: dict | None = None):
        self.model = model
        self.accel = accel
        self.default_bits = int(bits)
        self.onchip_io = onchip_io
        self.types = types if types is not None else value_types(model)
        g = model.graph
        inits = {i.name for i in g.initializer}
        self.graph_inputs = {i.name for i in g.input} - inits
        self.graph_outputs = {o.name for o in g.output}
        self.constants = set(inits) | set(constants)
        self.value_bits: dict = {}
        for name, (elem, _) in self.types.items():
            if elem in _INT_BITS:
                self.value_bits[name] = _INT_BITS[elem]
        # narrower widths held in int8 containers, recorded by pot-shift: node -> [wbits, abits]
        widths = {p.key: p.value for p in model.metadata_props}.get("sliver.bits")
        if widths:
            import json

            widths = json.loads(widths)
            for node in g.node:
                if node.name in widths and len(node.input) > 1:
                    self.value_bits[node.input[1]] = int(widths[node.name][0])
                    self.value_bits[node.input[0]] = int(widths[node.name][1])
        for node in g.node:
            ins = [i for i in node.input if i]
            if node.op_type == "Constant" or (ins and all(i in self.constants for i in ins)):
                self.constants.update(o for o in node.output if o)
            if not node.output or not ins:
                continue
            out = node.output[0]
            narrow = self._container_bits(node)
            if narrow is not None:
                self.value_bits[out] = narrow
                continue
            if out in self.value_bits:
                continue
            if node.op_type == "DequantizeLinear" or (node.op_type in _LAYOUT and _domain(node) == ""):
                src = self.value_bits.get(ins[0])
                if src is not None:
                    for o in node.output:
                        if o:
                            self.value_bits[o] = src

    def _container_bits(self, node) -> int | None:
        """The width of a value held in a wider integer container: a requantiser clipping an
        int32 output to ``[lo, hi]`` (``sliver.ShiftRequant`` / ``PoTQuantize``: 16-bit tokens and
        scores of an integer token fusion) has the range's width, and a ``Cast`` to int64 (the
        container of an exact integer product) and layout ops on int64 keep their input's width. None: the dtype's width."""
        out = node.output[0]
        elem = self.types.get(out, (None,))[0]
        if elem not in _INT_BITS or _INT_BITS[elem] <= 8:
            return None
        if _domain(node) == SLIVER_DOMAIN and node.op_type in ("ShiftRequant", "PoTQuantize"):
            lo, hi = self.attr(node, "lo"), self.attr(node, "hi")
            if lo is None or hi is None:
                return None
            lo, hi = int(lo), int(hi)
            width = max(1, hi.bit_length()) if lo >= 0 else max((-lo - 1).bit_length(), hi.bit_length()) + 1
            return min(width, _INT_BITS[elem])
        if ((node.op_type == "Cast" or node.op_type in _LAYOUT) and _domain(node) == "" and elem in (7, 13)
                and node.input[0] in self.value_bits):
            return min(self.value_bits[node.input[0]], _INT_BITS[elem])
        return None

    # -- values ------------------------------------------------------------------------------
    def shape(self, name: str) -> tuple:
        elem, shape = self.types.get(name, (None, None))
        if shape is None or any(not isinstance(d, int) for d in shape):
            raise UnsupportedOpError(
                f"value {name!r} has no static shape; the FPGA cost model needs static shapes "
                "(fix the input shape when loading the model)")
        return shape

    def elements(self, name: str) -> int:
        return int(prod(self.shape(name)))

    def bits(self, name: str) -> int:
        """Bit width of a value: its integer dtype's, or the costing call's default."""
        return self.value_bits.get(name, self.default_bits)

    def nbytes(self, name: str) -> float:
        return self.elements(name) * self.bits(name) / 8.0

    def is_constant(self, name: str) -> bool:
        return name in self.constants

    def in_ddr(self, name: str) -> bool:
        """Weights and constants, graph inputs and outputs, and activations too large for half the
        activation buffer live in DDR; every other activation stays on chip."""
        if name in self.constants:
            return True
        if not self.onchip_io and (name in self.graph_inputs or name in self.graph_outputs):
            return True
        return self.nbytes(name) > self.accel.activation_buffer_bytes / 2

    def op_bits(self, names) -> int:
        return max((self.bits(n) for n in names if n), default=self.default_bits)

    @staticmethod
    def attr(node, name: str, default=None):
        for a in node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default

    # -- work builders for rules -------------------------------------------------------------
    def gemm(self, a: str, b: str, out: str, *, batch: int, m: int, k: int, n: int, engine: str = "dsp",
             energy_ratio: float = 1.0, extra_ddr_bytes: float = 0.0, bits: int | None = None,
             a_bytes: float | None = None, b_bytes: float | None = None, out_bytes: float | None = None) -> GemmWork:
        """A GEMM work item whose operands are the values ``a``, ``b`` and ``out``."""
        return GemmWork(
            batch=batch, m=m, k=k, n=n, bits=bits if bits is not None else self.op_bits((a, b)),
            a_bytes=a_bytes if a_bytes is not None else m * k * self.bits(a) / 8.0,
            b_bytes=b_bytes if b_bytes is not None else k * n * self.bits(b) / 8.0,
            out_bytes=out_bytes if out_bytes is not None else m * n * self.bits(out) / 8.0,
            a_ddr=self.in_ddr(a), b_ddr=self.in_ddr(b), out_ddr=self.in_ddr(out),
            engine=engine, energy_ratio=energy_ratio, extra_ddr_bytes=extra_ddr_bytes,
            b_constant=self.is_constant(b))

    def gemm_shape(self, node, a_index: int = 0, b_index: int = 1):
        """The :class:`~sliver.ir.stats.GemmShape` of a GEMM-like node (shared with the MAC
        statistics); a custom op is read as a MatMul of its inputs ``a_index`` and ``b_index``."""
        for name in list(node.input) + list(node.output):
            if name:
                self.shape(name)  # static shapes, or a typed error
        shape = gemm_shape(node, self.types)
        if shape is None:
            proxy = helper.make_node("MatMul", [node.input[a_index], node.input[b_index]], [node.output[0]])
            shape = gemm_shape(proxy, self.types)
        return shape

    def matmul_work(self, node, a_index: int = 0, b_index: int = 1, **kwargs) -> GemmWork:
        """The GEMM work of a MatMul-like node (numpy broadcasting of batch dimensions)."""
        s = self.gemm_shape(node, a_index, b_index)
        return self.gemm(s.a, s.b, s.out, batch=s.batch, m=s.m, k=s.k, n=s.n, **kwargs)

    def stream(self, node, kind: str, passes=(), *, inputs=None) -> StreamWork:
        """A stream work item for ``node``: DDR bytes of the inputs and outputs that live there."""
        names = [i for i in (node.input if inputs is None else inputs) if i]
        outs = [o for o in node.output if o]
        ddr = sum(self.nbytes(v) for v in names + outs if self.in_ddr(v))
        onchip = sum(self.nbytes(v) for v in names + outs if not self.in_ddr(v))
        bits = self.bits(outs[0]) if outs else self.default_bits
        return StreamWork(kind, tuple(passes), ddr_bytes=ddr, onchip_bytes=onchip, bits=bits)


Rule = Callable[[object, OpContext], object]
_RULES: dict = {}
_ELEMENTWISE_OPS: set = set()


def register_op_cost(op_type: str, rule: Rule, domain: str = SLIVER_DOMAIN, replace: bool = False,
                     elementwise: bool = False) -> Rule:
    """Give the cost model a rule for ``domain.op_type``: ``rule(node, ctx) -> work``.

    ``elementwise``: the op computes each output element from the same element of its inputs, so
    it may join a pipeline of elementwise ops (see :func:`elementwise_groups`)."""
    key = ("" if domain in ("", "ai.onnx") else domain, op_type)
    if key in _RULES and not replace:
        raise ValueError(f"the FPGA cost model already has a rule for {domain or 'onnx'}.{op_type}")
    _RULES[key] = rule
    (_ELEMENTWISE_OPS.add if elementwise else _ELEMENTWISE_OPS.discard)(key)
    return rule


def is_elementwise(node) -> bool:
    return (_domain(node), node.op_type) in _ELEMENTWISE_OPS


def elementwise_groups(nodes, works, ctx: OpContext) -> list:
    """Chains of elementwise ops that run as one pipeline, as lists of node indices.

    An elementwise op joins the group of every input it takes from another elementwise op with as
    many output elements (inputs of other sizes, like a row maximum, are broadcast into the
    pipeline from outside), provided no other op runs between them (free layout ops aside): a
    pipeline streams; it does not wait across a GEMM. A GELU exported as ``Div, Erf, Add, Mul,
    Mul`` is one group; so is a polynomial approximation exported as a dozen arithmetic ops."""
    parent = list(range(len(nodes)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    producer, eligible, run, current = {}, [], [], 0
    for i, (node, work) in enumerate(zip(nodes, works)):
        kind = getattr(work, "kind", "")
        eligible.append(is_elementwise(node) and kind in ("vector", "nonlinear", "fused"))
        if not eligible[-1] and kind != "free":
            current += 1  # another op runs here: the pipeline before it has drained
        run.append(current)
        for out in node.output:
            if out:
                producer[out] = i
    for i, node in enumerate(nodes):
        if not eligible[i] or not node.output:
            continue
        size = ctx.elements(node.output[0])
        for name in node.input:
            j = producer.get(name)
            if (name and j is not None and eligible[j] and run[j] == run[i] and not ctx.is_constant(name)
                    and ctx.elements(name) == size):
                parent[find(i)] = find(j)
    groups: dict = {}
    for i in range(len(nodes)):
        if eligible[i]:
            groups.setdefault(find(i), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def cost_rule(node) -> Rule:
    """The rule for a node's op, or a typed error that says how to add one."""
    rule = _RULES.get((_domain(node), node.op_type))
    if rule is None:
        where = f"{node.domain}.{node.op_type}" if _domain(node) else node.op_type
        raise UnsupportedOpError(
            f"the FPGA cost model has no rule for {where} (node {node.name or node.output[0]}); "
            "add one with sliver.backends.fpga.register_op_cost")
    return rule


def lower(node, ctx: OpContext):
    """The work of one node. Nodes on constants only are folded at compile time (free)."""
    ins = [i for i in node.input if i]
    if node.op_type == "Constant" or (ins and all(ctx.is_constant(i) for i in ins)):
        return FREE
    return cost_rule(node)(node, ctx)


# -- built-in rules ---------------------------------------------------------------------------
def _rule(*op_types, domain: str = "", elementwise: bool = False):
    def deco(fn):
        for op in op_types:
            register_op_cost(op, fn, domain=domain, elementwise=elementwise)
        return fn

    return deco


def _bias_bytes(node, ctx, index: int) -> float:
    bias = node.input[index] if len(node.input) > index and node.input[index] else None
    return ctx.nbytes(bias) if bias and ctx.in_ddr(bias) else 0.0


@_rule("MatMul", "MatMulInteger", "QLinearMatMul", "Gemm")
def _matmul(node, ctx):
    work = ctx.matmul_work(node, extra_ddr_bytes=_bias_bytes(node, ctx, 2) if node.op_type == "Gemm" else 0.0)
    if node.op_type in ("MatMul", "Gemm"):
        transposed = node.op_type == "Gemm" and bool(ctx.attr(node, "transB", 0))
        work = _skip_zero_blocks(node.input[1], ctx, work, outputs_first=transposed)
    if node.op_type == "MatMul":
        work = _skip_masked_connections(node, ctx, work)
    return work


@_rule("Conv", "ConvInteger", "QLinearConv", "ConvTranspose")
def _conv(node, ctx):
    """An implicit GEMM per group. ``A`` is the input feature map as stored (a line buffer reads
    each pixel once), not its im2col expansion."""
    s = ctx.gemm_shape(node)
    g = s.groups
    bias = {"Conv": 2, "ConvTranspose": 2, "QLinearConv": 8}.get(node.op_type, 99)
    work = ctx.gemm(s.a, s.b, s.out, batch=s.batch, m=s.m, k=s.k, n=s.n, extra_ddr_bytes=_bias_bytes(node, ctx, bias),
                    a_bytes=ctx.nbytes(s.a) / g, b_bytes=ctx.nbytes(s.b) / g, out_bytes=ctx.nbytes(s.out) / g)
    if g == 1 and node.op_type == "Conv":
        work = _skip_zero_blocks(node.input[1], ctx, work, outputs_first=True)
    return dataclasses.replace(work, grouped=g > 1)


def _skip_zero_blocks(weight: str, ctx, work, *, outputs_first: bool):
    """Block-sparse weights (passes/prune/block_prune.py): in each column fold of the output-stationary
    array (``cols`` output channels) the reduction steps whose weights are zero across the whole
    fold are skipped and not loaded. The fold's ``T`` becomes its count of non-zero reduction rows;
    cycles are linear in ``T`` per fold, so the work's ``k`` is the width-weighted mean of those
    counts. Dense weights leave the work unchanged."""
    from onnx import numpy_helper

    inits = getattr(ctx, "_initializers", None)
    if inits is None:
        inits = ctx._initializers = {i.name: i for i in ctx.model.graph.initializer}
    if weight not in inits or work.grouped:
        return work
    w = numpy_helper.to_array(inits[weight])
    matrix = w.reshape(w.shape[0], -1) if outputs_first else w.reshape(-1, w.shape[-1]).T  # outputs x reduction
    if matrix.shape != (work.n, work.k) or np.all(matrix != 0):
        return work
    cols = max(1, min(ctx.accel.gemm.cols, work.n))
    rows = [int(np.any(matrix[j:j + cols] != 0, axis=0).sum()) * len(matrix[j:j + cols])
            for j in range(0, work.n, cols)]
    k = max(1, -(-sum(rows) // work.n))
    if k >= work.k:
        return work
    return dataclasses.replace(work, k=k, b_bytes=work.b_bytes * k / work.k)


def connection_masks(model) -> dict:
    """The attention products a Tri-Level connection mask (passes/tokens/trilevel.py) sparsifies:
    ``{MatMul output: (role, kept per row)}`` with role ``"scores"`` (Q.K^T) or ``"context"``
    (A.V) and the mean number of key connections a query row keeps.

    The mask is recognised by its static construction: ``ScatterElements`` of ``TopK`` indices
    (B, M, k) into zeros (B, M, M), concatenated with an all-ones CLS column and row into
    (B, M+1, M+1); the CLS row keeps M+1 connections, a patch row k+1. Each use multiplies the
    exponentials of a softmax (``Mul`` of an ``Exp``); the ``MatMul`` whose output feeds that
    ``Exp`` (through ``Sub``) computes the scores, the one that takes the normalised result
    (through ``Add``/``Div``) as its first operand computes the context."""
    nodes = list(model.graph.node)
    producer = {o: n for n in nodes for o in n.output if o}
    consumers: dict = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    types = value_types(model)
    found = {}
    for scatter in (n for n in nodes if n.op_type == "ScatterElements"):
        idx_shape = types.get(scatter.input[1], (None, None))[1]
        data_shape = types.get(scatter.input[0], (None, None))[1]
        if not idx_shape or not data_shape or not all(isinstance(d, int) for d in idx_shape + data_shape):
            continue
        m, k = data_shape[-1], idx_shape[-1]
        kept = ((m + 1) + m * (k + 1)) / (m + 1)
        frontier, masks = [scatter.output[0]], []
        while frontier:  # through the Concats (and layout ops) to the uses of the finished mask
            name = frontier.pop()
            for c in consumers.get(name, []):
                if c.op_type in ("Concat", "Unsqueeze", "Reshape", "Cast", "Expand", "Identity"):
                    frontier.append(c.output[0])
                elif c.op_type == "Mul":
                    masks.append(c)
        for mul in masks:
            other = [i for i in mul.input if producer.get(i) is not None and producer[i].op_type == "Exp"]
            if not other:
                continue
            src = producer[producer[other[0]].input[0]]
            while src is not None and src.op_type in ("Sub", "Mul", "Div", "Cast"):
                src = producer.get(src.input[0])
            if src is not None and src.op_type == "MatMul":
                found[src.output[0]] = ("scores", kept)
            frontier = [mul.output[0]]
            for _ in range(4):  # Add(eps) -> Div -> MatMul(probs, V)
                nxt = []
                for name in frontier:
                    for c in consumers.get(name, []):
                        if c.op_type == "MatMul" and c.input[0] == name:
                            found[c.output[0]] = ("context", kept)
                        elif c.op_type in ("Add", "Div", "Cast"):
                            nxt.append(c.output[0])
                frontier = nxt
    return found


def _skip_masked_connections(node, ctx, work):
    """Attention products under a Tri-Level connection mask (:func:`connection_masks`).
    Assumption: the accelerator runs masked attention with a sparse kernel that, per query row,
    gathers only the kept keys (indices known once the mask is built, one block earlier): Q.K^T
    computes only the kept scores (its ``n`` becomes the mean kept count per row, rounded up) and
    A.V reduces only over them (its ``k`` likewise); the softmax max runs over the kept scores, which gives the
    same normalised result since masked exponentials are zeroed anyway. The gather itself and the
    index bookkeeping are not charged. The MACs left out are reported as ``skipped_macs``."""
    masks = getattr(ctx, "_connection_masks", None)
    if masks is None:
        masks = ctx._connection_masks = connection_masks(ctx.model)
    hit = masks.get(node.output[0])
    if hit is None:
        return work
    role, kept = hit
    if role == "scores" and work.n > kept:
        n = max(1, math.ceil(kept))
        return dataclasses.replace(work, n=n, out_bytes=work.out_bytes * n / work.n,
                                   b_bytes=work.b_bytes * n / work.n, skipped_macs=work.macs - work.batch * work.m
                                   * work.k * n)
    if role == "context" and work.k > kept:
        k = max(1, math.ceil(kept))
        return dataclasses.replace(work, k=k, a_bytes=work.a_bytes * k / work.k,
                                   b_bytes=work.b_bytes * k / work.k, skipped_macs=work.macs - work.batch * work.m
                                   * k * work.n)
    return work


#: elementwise ops: fused into their producer when all other operands are constants
_ELEMENTWISE = ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "Equal", "Less",
                "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Xor", "Not", "PRelu", "BitShift",
                "Mod", "Relu", "Clip", "LeakyRelu", "Abs", "Neg", "Floor", "Ceil", "Round", "Sign", "Cast",
                "CastLike", "QuantizeLinear", "DequantizeLinear", "BatchNormalization", "HardSigmoid",
                "HardSwish", "Elu", "Selu", "Celu", "Shrink", "IsNaN", "IsInf")


@_rule(*_ELEMENTWISE, elementwise=True)
def _elementwise(node, ctx):
    live = [i for i in node.input if i and not ctx.is_constant(i)]
    if len(live) <= 1:  # bias, scale, requantise, clip, activation: the producer's output stage
        consts = [i for i in node.input if i and ctx.is_constant(i)]
        return StreamWork("fused", ddr_bytes=sum(ctx.nbytes(c) for c in consts), bits=ctx.bits(node.output[0]))
    n = ctx.elements(node.output[0])
    return ctx.stream(node, "vector", [("vector", n)] * (len(live) - 1))


#: unary functions that need a nonlinear unit -> which unit
_FUNCTIONS = {"Erf": "erf", "Gelu": "erf", "Exp": "exp", "Sigmoid": "exp", "Tanh": "exp", "Softplus": "exp",
              "Log": "exp", "Sqrt": "rsqrt", "Reciprocal": "recip"}


@_rule(*_FUNCTIONS, elementwise=True)
def _function(node, ctx):
    return ctx.stream(node, "nonlinear", [(_FUNCTIONS[node.op_type], ctx.elements(node.output[0]))])


def _rows(ctx, name, axis, to_end=False) -> tuple:
    shape = ctx.shape(name)
    axis = axis % len(shape)
    row = int(prod(shape[axis:])) if to_end else shape[axis]
    n = int(prod(shape))
    return n, n // max(row, 1)


@_rule("Softmax", "LogSoftmax")
def _softmax(node, ctx):
    # max, exp and sum, scale by the reciprocal of the sum (one per row)
    n, rows = _rows(ctx, node.input[0], int(ctx.attr(node, "axis", -1)))
    return ctx.stream(node, "nonlinear", [("vector", n), ("exp", n), ("vector", n), ("recip", rows)])


@_rule("LayerNormalization")
def _layer_norm(node, ctx):
    # mean and variance in one pass, one reciprocal square root per row, normalise and scale
    n, rows = _rows(ctx, node.input[0], int(ctx.attr(node, "axis", -1)), to_end=True)
    return ctx.stream(node, "nonlinear", [("vector", n), ("rsqrt", rows), ("vector", n)])


@_rule("InstanceNormalization", "GroupNormalization")
def _group_norm(node, ctx):
    shape = ctx.shape(node.input[0])
    n = int(prod(shape))
    rows = shape[0] * int(ctx.attr(node, "num_groups", shape[1]))
    return ctx.stream(node, "nonlinear", [("vector", n), ("rsqrt", rows), ("vector", n)])


@_rule("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
       "ReduceSumSquare", "ReduceLogSumExp", "ArgMax", "ArgMin", "GlobalAveragePool", "GlobalMaxPool")
def _reduce(node, ctx):
    return ctx.stream(node, "vector", [("vector", ctx.elements(node.input[0]))])


@_rule("MaxPool", "AveragePool", "LpPool")
def _pool(node, ctx):
    window = int(prod(ctx.attr(node, "kernel_shape", [1])))
    return ctx.stream(node, "vector", [("vector", ctx.elements(node.output[0]) * window)])


@_rule("TopK")
def _topk(node, ctx):
    shape = ctx.shape(node.input[0])
    axis = int(ctx.attr(node, "axis", -1)) % len(shape)
    rows = int(prod(shape)) // shape[axis]
    moved = sum(ctx.nbytes(o) for o in node.output if o)
    return ctx.stream(node, "vector", [("vector", rows * sort_passes(shape[axis])), ("move", moved)],
                      inputs=[node.input[0]])


@_rule("Gather")
def _gather(node, ctx):
    data, idx, out = node.input[0], node.input[1], node.output[0]
    if ctx.is_constant(idx) and len(ctx.shape(idx)) == 0:
        return FREE  # one slice of a tensor: the consumer reads it at an offset
    moved = ctx.nbytes(out)  # token selection: copy the kept rows
    ddr = moved if ctx.in_ddr(data) else 0.0
    ddr += moved if ctx.in_ddr(out) else 0.0
    return StreamWork("move", (("move", moved),), ddr_bytes=ddr, onchip_bytes=moved, bits=ctx.bits(out))


@_rule("Transpose", "Concat", "Slice", "Split", "Pad", "Expand", "Tile", "DepthToSpace", "SpaceToDepth",
       "GatherElements", "GatherND", "ScatterND", "ScatterElements", "Resize", "Upsample", "Compress",
       "NonZero", "ReverseSequence", "Trilu")
def _move(node, ctx):
    moved = sum(ctx.nbytes(o) for o in node.output if o)
    return ctx.stream(node, "move", [("move", moved)])


@_rule("GridSample")
def _grid_sample(node, ctx):
    """Bilinear sampling (aftrans's crop): per output element four reads of the input and three
    interpolations (each a multiply-add on the vector unit); nearest mode reads one."""
    n = ctx.elements(node.output[0])
    mode = ctx.attr(node, "mode", b"linear")
    mode = mode.decode() if isinstance(mode, bytes) else str(mode)
    reads, lerps = (1, 0) if mode == "nearest" else (4, 3)
    return ctx.stream(node, "vector", [("vector", lerps * n), ("move", reads * ctx.nbytes(node.output[0]))])


@_rule("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Dropout", "Shape", "Size", "Constant",
       "ConstantOfShape", "Range", "EyeLike")
def _free(node, ctx):
    return FREE


# -- sliver's custom ops ----------------------------------------------------------------------
@_rule("ShiftRequant", domain=SLIVER_DOMAIN, elementwise=True)
def _shift_requant(node, ctx):
    """Shift-requantise (multiply by 2^-k, round, clip): a shifter in the producer's output stage."""
    return _elementwise(node, ctx)


@_rule("PoTQuantize", domain=SLIVER_DOMAIN, elementwise=True)
def _pot_quantize(node, ctx):
    """Power-of-two quantise (scale by 2^e, round, clip) of a QDQ program before pot-shift: what
    QuantizeLinear costs, a shifter and a clip in the producer's output stage."""
    return _elementwise(node, ctx)


@_rule("DyadicRequant", domain=SLIVER_DOMAIN, elementwise=True)
def _dyadic_requant(node, ctx):
    """Dyadic requantise (multiply by m, shift by s, round, clip): a multiplier and a shifter in
    the producer's output stage, like ShiftRequant's."""
    return _elementwise(node, ctx)


@_rule("IntMaxPool", domain=SLIVER_DOMAIN)
def _int_max_pool(node, ctx):
    return _pool(node, ctx)


# sliver's integer nonlinear ops (rapq's integer ViT): their arithmetic is a second-order
# polynomial (I-BERT's i-exp and i-GELU) or an integer Newton square root, so they use the
# polynomial implementation of the nonlinear units whatever the model's ``nonlinear`` setting is.
@_rule("IntSoftmax", domain=SLIVER_DOMAIN)
def _int_softmax(node, ctx):
    """Row max, i-exp, row sum, one integer reciprocal per row, scale (the float rule's passes)."""
    n, rows = _rows(ctx, node.input[0], -1)
    return ctx.stream(node, "nonlinear", [("vector", n), ("exp/poly", n), ("vector", n), ("recip/poly", rows)])


@_rule("IntGELU", domain=SLIVER_DOMAIN, elementwise=True)
def _int_gelu(node, ctx):
    """i-GELU: the polynomial erf and the dyadic rescale, one pass per element."""
    return ctx.stream(node, "nonlinear", [("erf/poly", ctx.elements(node.output[0]))])


@_rule("IntLayerNorm", domain=SLIVER_DOMAIN)
def _int_layer_norm(node, ctx):
    """Row sums of x and x^2, one integer square root per row, normalise and the integer affine."""
    n, rows = _rows(ctx, node.input[0], -1)
    return ctx.stream(node, "nonlinear", [("vector", n), ("rsqrt/poly", rows), ("vector", n)])


@_rule("AppMatMul", domain=SLIVER_DOMAIN)
def _app_matmul(node, ctx):
    """A matmul on approximate multipliers: LUT-built, so it runs on the LUT engine. The node may
    carry ``energy_ratio`` (its multiplier's energy relative to an exact one, from the AppMul
    library; the default is 1) and ``bits`` (the multiplier's operand width: its operands are
    held in int8 containers, so without it the GEMM is costed at the containers' width)."""
    bits = ctx.attr(node, "bits")
    return ctx.matmul_work(node, engine="lut", energy_ratio=float(ctx.attr(node, "energy_ratio", 1.0)),
                           bits=int(bits) if bits is not None else None)


def known_ops() -> list:
    """(domain, op_type) of every op with a cost rule."""
    return sorted(_RULES)
