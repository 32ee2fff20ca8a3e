"""Latency of one transformer block as a function of its token count: the table latency-aware
passes choose keep ratios and selector positions with (HeatViT's latency-aware training reads the
same kind of table, measured on its board).

The block is built as a small ONNX graph with the structure sliver's ViT exports (pre-norm
attention and MLP, GELU through ``Erf``) and costed by the same rules and formulas as a whole
program, so a block of the table and the same block inside a costed DeiT agree to the cycle.

    from sliver.backends import fpga
    table = fpga.block_latency_table(384, 6, 4.0, token_counts=range(50, 198), bits=8)  # {tokens: ms}
    ms = fpga.block_latency_ms(384, 6, 4.0, tokens=139)

For a pass, put the model in the pass context and call it through ``ctx.cost_model``::

    ctx = PassContext(cost_model=fpga.CostModel(accel="zcu102", bits=8))
    ctx.cost_model.block_latency_ms(embed_dim=384, heads=6, mlp_ratio=4.0, tokens=139)

A token-pruned model's latency (until the pruning passes exist) is the dense program's cost with
its blocks replaced by blocks of the pruned token counts, plus one token selector per pruning
stage: :func:`pruned_token_schedule` and :func:`schedule_latency`.
"""

from __future__ import annotations

from math import sqrt

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .accelerator import get_accelerator
from .cost import cost_model
from .report import Report

_OPSET = 17


class _Builder:
    """A tiny ONNX graph builder: weights are graph inputs (no data), costed as DDR constants."""

    def __init__(self, name: str):
        self.name, self.nodes, self.inputs, self.inits, self.weights = name, [], [], [], set()
        self._n = 0

    def weight(self, shape) -> str:
        name = f"w{len(self.weights)}"
        self.weights.add(name)
        self.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape)))
        return name

    def const(self, value, dtype=np.float32) -> str:
        name = f"c{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, *inputs, scope: str = "", **attrs) -> str:
        self._n += 1
        out = f"{scope}/{op_type}_{self._n}_output"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=f"{scope}/{op_type}_{self._n}", **attrs))
        return out

    def linear(self, x: str, d_in: int, d_out: int, scope: str) -> str:
        y = self.op("MatMul", x, self.weight((d_in, d_out)), scope=scope)
        return self.op("Add", self.weight((d_out,)), y, scope=scope)

    def gelu(self, x: str, scope: str) -> str:
        e = self.op("Erf", self.op("Div", x, self.const(sqrt(2.0)), scope=scope), scope=scope)
        return self.op("Mul", self.op("Mul", x, self.op("Add", e, self.const(1.0), scope=scope), scope=scope),
                       self.const(0.5), scope=scope)

    def layer_norm(self, x: str, dim: int, scope: str) -> str:
        return self.op("LayerNormalization", x, self.weight((dim,)), self.weight((dim,)), scope=scope,
                       axis=-1, epsilon=1e-6)

    def model(self, x_shape, out: str) -> onnx.ModelProto:
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))
        y = helper.make_tensor_value_info(out, TensorProto.FLOAT, None)
        graph = helper.make_graph(self.nodes, self.name, [x] + self.inputs, [y], initializer=self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)])
        return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def block_model(embed_dim: int, heads: int, mlp_ratio: float = 4.0, tokens: int = 197, batch: int = 1) -> tuple:
    """(ModelProto, weight names) of one pre-norm transformer block on ``tokens`` tokens."""
    d, hidden = embed_dim // heads, int(embed_dim * mlp_ratio)
    b = _Builder(f"block_{embed_dim}_{heads}_{tokens}")
    s = "/blocks.0"
    x = "x"
    h = b.layer_norm(x, embed_dim, s + "/norm1")
    qkv = b.linear(h, embed_dim, 3 * embed_dim, s + "/attn/qkv")
    qkv = b.op("Reshape", qkv, b.const([batch, tokens, 3, heads, d], np.int64), scope=s + "/attn")
    qkv = b.op("Transpose", qkv, scope=s + "/attn", perm=[2, 0, 3, 1, 4])
    q, k, v = (b.op("Gather", qkv, b.const(i, np.int64), scope=s + "/attn", axis=0) for i in range(3))
    q = b.op("Mul", q, b.const(d ** -0.5), scope=s + "/attn")
    kt = b.op("Transpose", k, scope=s + "/attn", perm=[0, 1, 3, 2])
    a = b.op("Softmax", b.op("MatMul", q, kt, scope=s + "/attn"), scope=s + "/attn", axis=-1)
    o = b.op("Transpose", b.op("MatMul", a, v, scope=s + "/attn"), scope=s + "/attn", perm=[0, 2, 1, 3])
    o = b.op("Reshape", o, b.const([batch, tokens, embed_dim], np.int64), scope=s + "/attn")
    x = b.op("Add", x, b.linear(o, embed_dim, embed_dim, s + "/attn/proj"), scope=s)
    h = b.layer_norm(x, embed_dim, s + "/norm2")
    h = b.gelu(b.linear(h, embed_dim, hidden, s + "/mlp/fc1"), s + "/mlp/act")
    x = b.op("Add", x, b.linear(h, hidden, embed_dim, s + "/mlp/fc2"), scope=s)
    return b.model((batch, tokens, embed_dim), x), frozenset(b.weights)


def selector_model(embed_dim: int, heads: int, tokens: int, kept: int, batch: int = 1) -> tuple:
    """(ModelProto, weight names) of a HeatViT-style multi-head token selector on ``tokens``
    tokens (the CLS token first) keeping ``kept`` of the others and packaging the rest.

    Per head (``d = embed_dim / heads``): local features MLP(d -> d/2) with GELU, a global feature
    (their mean over tokens), both concatenated, MLP(d -> d/2 -> 2) and a softmax for keep/prune;
    a head-weight MLP(embed_dim -> heads) and sigmoid weighs the heads; the top ``kept`` scores
    are gathered, and the pruned tokens are averaged into one package token (a score-weighted
    sum, one GEMM). Output: CLS, kept tokens, package token."""
    d = embed_dim // heads
    n = tokens - 1
    b = _Builder(f"selector_{embed_dim}_{heads}_{tokens}_{kept}")
    s = "/selector"
    x = "x"
    patches = b.op("Slice", x, b.const([1], np.int64), b.const([tokens], np.int64), b.const([1], np.int64),
                   scope=s)
    xh = b.op("Transpose", b.op("Reshape", patches, b.const([batch, n, heads, d], np.int64), scope=s),
              scope=s, perm=[0, 2, 1, 3])
    local = b.gelu(b.op("Add", b.op("MatMul", xh, b.weight((heads, d, d // 2)), scope=s),
                        b.weight((heads, 1, d // 2)), scope=s), s)
    glob = b.op("ReduceMean", local, scope=s, axes=[2], keepdims=1)
    glob = b.op("Expand", glob, b.const([batch, heads, n, d // 2], np.int64), scope=s)
    feats = b.op("Concat", local, glob, scope=s, axis=-1)
    hid = b.gelu(b.op("MatMul", feats, b.weight((heads, d, d // 2)), scope=s), s)
    logits = b.op("MatMul", hid, b.weight((heads, d // 2, 2)), scope=s)
    keep = b.op("Softmax", logits, scope=s, axis=-1)  # (b, h, n, 2)
    head_w = b.op("Sigmoid", b.op("MatMul", patches, b.weight((embed_dim, heads)), scope=s), scope=s)  # (b, n, h)
    keep0 = b.op("Gather", keep, b.const(0, np.int64), scope=s, axis=3)  # (b, h, n)
    score = b.op("ReduceSum", b.op("Mul", b.op("Transpose", keep0, scope=s, perm=[0, 2, 1]), head_w, scope=s),
                 b.const([2], np.int64), scope=s, keepdims=0)  # (b, n)
    top = b.op("TopK", score, b.const([kept], np.int64), scope=s, axis=-1)
    idx = top + "_indices"
    b.nodes[-1].output.append(idx)  # TopK's second output: the kept tokens' indices
    idx1 = b.op("Squeeze", idx, b.const([0], np.int64), scope=s)
    kept_tokens = b.op("Gather", patches, idx1, scope=s, axis=1)  # (b, kept, D)
    weights = b.op("Unsqueeze", score, b.const([1], np.int64), scope=s)  # (b, 1, n)
    package = b.op("MatMul", weights, patches, scope=s)  # (b, 1, D)
    cls = b.op("Slice", x, b.const([0], np.int64), b.const([1], np.int64), b.const([1], np.int64), scope=s)
    out = b.op("Concat", cls, kept_tokens, package, scope=s, axis=1)
    return b.model((batch, tokens, embed_dim), out), frozenset(b.weights)


# -- latency ----------------------------------------------------------------------------------
_CACHE: dict = {}


def _cached(kind: str, builder, args: tuple, accel, bits: int, nonlinear: str) -> Report:
    accel = get_accelerator(accel)
    key = (kind, args, id(accel), bits, nonlinear)
    hit = _CACHE.get(key)
    if hit is not None and hit[0] is accel:
        return hit[1]
    model, weights = builder(*args)
    report = cost_model(model, accel, bits, nonlinear, name=model.graph.name, onchip_io=True, constants=weights)
    if len(_CACHE) > 4096:
        _CACHE.clear()
    _CACHE[key] = (accel, report)
    return report


def block_report(embed_dim: int, heads: int, mlp_ratio: float = 4.0, tokens: int = 197, bits: int = 8,
                 accel="zcu102", nonlinear: str = "exact") -> Report:
    """The cost :class:`Report` of one transformer block on ``tokens`` tokens (its input and output
    stay on chip, its weights stream from DDR)."""
    return _cached("block", block_model, (int(embed_dim), int(heads), float(mlp_ratio), int(tokens)),
                   accel, bits, nonlinear)


def block_latency_ms(embed_dim: int, heads: int, mlp_ratio: float = 4.0, tokens: int = 197, bits: int = 8,
                     accel="zcu102", nonlinear: str = "exact") -> float:
    """Latency in milliseconds of one transformer block on ``tokens`` tokens."""
    return block_report(embed_dim, heads, mlp_ratio, tokens, bits, accel, nonlinear).latency_ms


def block_latency_table(embed_dim: int, heads: int, mlp_ratio: float = 4.0, token_counts=range(1, 198),
                        bits: int = 8, accel="zcu102", nonlinear: str = "exact") -> dict:
    """{token count: block latency in ms} for every count in ``token_counts``."""
    return {int(t): block_latency_ms(embed_dim, heads, mlp_ratio, int(t), bits, accel, nonlinear)
            for t in token_counts}


def selector_latency_ms(embed_dim: int, heads: int, tokens: int, kept: int, bits: int = 8, accel="zcu102",
                        nonlinear: str = "exact") -> float:
    """Latency in milliseconds of one token selector (see :func:`selector_model`)."""
    return _cached("selector", selector_model, (int(embed_dim), int(heads), int(tokens), int(kept)),
                   accel, bits, nonlinear).latency_ms


def pruned_token_schedule(tokens: int = 197, depth: int = 12, blocks=(3, 6, 9), keep: float = 0.7,
                          package_token: bool = True) -> list:
    """Token count entering each of ``depth`` blocks when a selector before each block index in
    ``blocks`` (0-based) keeps ``keep`` of the image tokens (HeatViT: the CLS token bypasses the
    selector; the pruned tokens, with any earlier package token, become one package token)."""
    counts, image_tokens, package = [], tokens - 1, 0
    for i in range(depth):
        if i in blocks:
            pruned_from = image_tokens
            image_tokens = max(1, int(round(keep * pruned_from)))
            package = 1 if package_token else 0
        counts.append(1 + image_tokens + package)
    return counts


def schedule_latency(dense: Report, embed_dim: int, heads: int, mlp_ratio: float, schedule, *,
                     block_prefix: str = "blocks", selectors: bool = True) -> dict:
    """Latency of a model whose blocks see the token counts ``schedule`` (one per block), from the
    cost report of its dense version: its non-block layers plus one block per entry, plus one
    selector where the count drops. Returns ``{"ms", "blocks_ms", "selectors_ms", "other_ms"}``."""
    accel, bits, nl = dense.accel, dense.bits, dense.nonlinear
    block_cycles = sum(dense.layer_cycles(f"{block_prefix}.{i}") for i in range(len(schedule)))
    other_ms = accel.cycles_to_ms(dense.cycles - block_cycles)
    blocks_ms = sum(block_latency_ms(embed_dim, heads, mlp_ratio, t, bits, accel, nl) for t in schedule)
    sel_ms = 0.0
    if selectors:
        for before, after in zip(schedule, schedule[1:]):
            if after < before:
                sel_ms += selector_latency_ms(embed_dim, heads, before, after - 2, bits, accel, nl)
    return {"ms": other_ms + blocks_ms + sel_ms, "blocks_ms": blocks_ms, "selectors_ms": sel_ms,
            "other_ms": other_ms}
