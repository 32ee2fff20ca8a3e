"""Cost statistics of a Program, per node and in total, at the torch and onnx levels.

Conventions (those of the published model sizes, docs/results.md):

- MACs: multiply-accumulates of convolutions, linear layers and matrix products (attention's
  Q.K^T and A.V included); nothing for norms, activations, softmax, pooling or additions.
  For every such op, MACs = (number of output elements) x (length of the reduction).
- params: learnable parameters. At the torch level, ``nn.Parameter`` s (BatchNorm's running
  statistics are buffers, not parameters); at the onnx level, float initializers with more than one
  element, and the constants that are weights (:func:`weight_tensors`: the int8 weights of a QDQ
  or integer-only graph, the int32 biases added to an integer accumulator, biases held in
  ``Constant`` nodes; not shift amounts, scales, clip bounds or multipliers' tables). The exporter folds BatchNorm into the convolution before it, so the onnx count of a
  CNN is lower by one value per BN channel (0.1% of ResNet-18).
- weight bytes: bytes of those parameters at their stored dtype.
- activation bytes: bytes of every node's output, summed (what the nodes write).

The torch level counts MACs by running each node under ``torch.utils.flop_counter`` (aten-level
conv/mm/bmm, so modules kept whole, like attention, are counted inside); the onnx level computes
them from ONNX shapes. Both give the same MACs for the same model; a test asserts it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .program import Program


@dataclass
class NodeStats:
    name: str
    op: str
    macs: int = 0
    params: int = 0
    weight_bytes: int = 0
    activation_bytes: int = 0


@dataclass
class Stats:
    macs: int = 0
    params: int = 0
    weight_bytes: int = 0
    activation_bytes: int = 0
    nodes: list = field(default_factory=list)

    def totals(self) -> dict:
        return {
            "macs": self.macs,
            "params": self.params,
            "weight_bytes": self.weight_bytes,
            "activation_bytes": self.activation_bytes,
        }

    def __str__(self) -> str:
        return (
            f"{self.macs / 1e9:.3f} GMACs, {self.params / 1e6:.3f} M params, "
            f"{self.weight_bytes / 2**20:.2f} MiB weights, {self.activation_bytes / 2**20:.2f} MiB activations"
        )


def program_stats(program: Program) -> Stats:
    if program.level == "torch":
        return torch_stats(program)
    if program.level == "onnx":
        return onnx_stats(program)
    from .errors import SliverError

    raise SliverError("statistics are computed at the torch and onnx levels; take them before lowering to tvm")


# -- torch ------------------------------------------------------------------------------------
def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs (2 per MAC) of CPU fused attention, which torch's flop counter does not register."""
    b, h, m, k = query_shape
    n = key_shape[-2]
    dv = value_shape[-1]
    return 2 * b * h * m * n * (k + dv)


def _native_mha_flops(query_shape, key_shape, value_shape, embed_dim, num_head, *args, out_shape=None, **kwargs) -> int:
    """FLOPs (2 per MAC) of ``nn.MultiheadAttention``'s fused inference path
    (``aten._native_multi_head_attention``), which torch's flop counter does not register:
    the q/k/v input projections, Q.K^T, A.V and the output projection."""
    b, m = query_shape[0], query_shape[-2]
    n = key_shape[-2]
    e = int(embed_dim)
    projections = b * (m + 2 * n) * e * e + b * m * e * e
    products = 2 * b * m * n * e
    return 2 * (projections + products)


def _flop_counter():
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {}
    aten = torch.ops.aten
    for name in ("_scaled_dot_product_flash_attention_for_cpu",):
        op = getattr(aten, name, None)
        if op is not None:
            mapping[op] = _sdpa_cpu_flops
    mha = getattr(aten, "_native_multi_head_attention", None)
    if mha is not None:
        mapping[mha] = _native_mha_flops
    return FlopCounterMode(display=False, custom_mapping=mapping)


def _tensor_bytes(value) -> int:
    import torch

    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_tensor_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    return 0


def torch_stats(program: Program) -> Stats:
    import torch
    import torch.fx

    from .torch_level import as_torch_inputs

    gm = program.module
    stats = Stats()
    seen_params: set = set()

    class _Counter(torch.fx.Interpreter):
        def run_node(self, n):
            with _flop_counter() as counter:
                out = super().run_node(n)
            ns = NodeStats(n.name, _torch_op(gm, n), macs=counter.get_total_flops() // 2)
            for p in _node_params(gm, n):
                ns.params += p.numel()
                ns.weight_bytes += p.numel() * p.element_size()
            if n.op not in ("placeholder", "output", "get_attr"):
                ns.activation_bytes = _tensor_bytes(out)
            stats.nodes.append(ns)
            return out

    with torch.no_grad():
        _Counter(gm).run(*as_torch_inputs(program.example_inputs))
    stats.macs = sum(n.macs for n in stats.nodes)
    stats.activation_bytes = sum(n.activation_bytes for n in stats.nodes)
    for p in gm.parameters():  # unique parameters, even if a module is called twice
        if id(p) not in seen_params:
            seen_params.add(id(p))
            stats.params += p.numel()
            stats.weight_bytes += p.numel() * p.element_size()
    return stats


def _torch_op(gm, n) -> str:
    if n.op == "call_module":
        return type(gm.get_submodule(n.target)).__name__
    if n.op == "call_function":
        return getattr(n.target, "__name__", str(n.target))
    return str(n.target) if n.op == "call_method" else n.op


def _node_params(gm, n) -> list:
    import torch

    if n.op == "call_module":
        return list(gm.get_submodule(n.target).parameters())
    if n.op == "get_attr":
        obj = gm
        for part in n.target.split("."):
            obj = getattr(obj, part)
        return [obj] if isinstance(obj, torch.nn.Parameter) else []
    return []


# -- onnx -------------------------------------------------------------------------------------
_FLOAT_TYPES = (1, 10, 11, 16)  # FLOAT, FLOAT16, DOUBLE, BFLOAT16


@dataclass(frozen=True)
class GemmShape:
    """A GEMM-like ONNX node as ``batch`` independent products ``(m x k) @ (k x n)``.

    ``a``, ``b``, ``out``: the names of the values that play the left operand, the right operand
    and the result (for a convolution: input feature map, weights, output). ``groups``: a
    convolution's groups (the batch), 1 otherwise. MACs = batch * m * k * n.
    """

    batch: int
    m: int
    k: int
    n: int
    a: str
    b: str
    out: str
    groups: int = 1

    @property
    def macs(self) -> int:
        return self.batch * self.m * self.k * self.n


_MATMUL_OPERANDS = {"MatMul": (0, 1), "MatMulInteger": (0, 1), "QLinearMatMul": (0, 3)}
_CONV_OPERANDS = {"Conv": (0, 1), "ConvInteger": (0, 1), "QLinearConv": (0, 3), "ConvTranspose": (0, 1)}


def _attr(node, name, default):
    return next((a.i for a in node.attribute if a.name == name), default)


def gemm_shape(node, types) -> GemmShape | None:
    """The GEMM a standard ONNX node computes, from its shapes; None for ops that are not
    GEMM-like (custom ops declare their MACs in :mod:`.opdefs` instead).

    - MatMul family (numpy broadcasting): a right operand without batch dimensions (a layer's
      weights) is shared, so the left operand's leading dimensions fold into ``m``; otherwise
      ``batch`` is the output's leading dimensions.
    - Gemm: ``transA`` / ``transB`` honoured.
    - Conv family, as an implicit GEMM per group: ``m`` = output pixels (times N), ``k`` =
      (Cin / groups) x kernel, ``n`` = Cout / groups. ConvTranspose: ``m`` = input pixels, ``k``
      = Cin / groups, ``n`` = (Cout / groups) x kernel (each input pixel scatters a patch).
    """
    op = node.op_type
    if not node.output or types.get(node.output[0], (None, None))[1] is None:
        return None
    out = node.output[0]
    so = types[out][1]
    if op in _MATMUL_OPERANDS:
        ia, ib = _MATMUL_OPERANDS[op]
        a, b = node.input[ia], node.input[ib]
        sa, sb = types[a][1], types[b][1]
        k = int(sa[-1])
        m = int(sa[-2]) if len(sa) > 1 else 1
        n = int(sb[-1]) if len(sb) > 1 else 1
        if len(sb) <= 2:  # shared right operand: fold the left operand's batch into m
            m = int(np.prod(sa[:-1], dtype=np.int64)) if len(sa) > 1 else 1
            return GemmShape(1, m, k, n, a, b, out)
        batch = int(np.prod(so, dtype=np.int64)) // (m * n)
        return GemmShape(batch, m, k, n, a, b, out)
    if op == "Gemm":
        a, b = node.input[0], node.input[1]
        sa, sb = types[a][1], types[b][1]
        m, k = (sa[1], sa[0]) if _attr(node, "transA", 0) else (sa[0], sa[1])
        n = sb[0] if _attr(node, "transB", 0) else sb[1]
        return GemmShape(1, int(m), int(k), int(n), a, b, out)
    if op in _CONV_OPERANDS:
        ix, iw = _CONV_OPERANDS[op]
        x, w = node.input[ix], node.input[iw]
        sx, sw = types[x][1], types[w][1]
        g = int(_attr(node, "group", 1))
        if op == "ConvTranspose":
            m = int(sx[0]) * int(np.prod(sx[2:], dtype=np.int64))
            k, n = int(sw[0]) // g, int(sw[1]) * int(np.prod(sw[2:], dtype=np.int64))
        else:
            m = int(so[0]) * int(np.prod(so[2:], dtype=np.int64))
            k, n = int(np.prod(sw[1:], dtype=np.int64)), int(sw[0]) // g
        return GemmShape(g, m, k, n, x, w, out, groups=g)
    return None


def _onnx_macs(node, types) -> int:
    """MACs of one ONNX node from its shapes; 0 for ops that are not GEMM-like."""
    if not node.output or types.get(node.output[0], (None, None))[1] is None:
        return 0
    shape = gemm_shape(node, types)
    if shape is not None:
        return shape.macs
    from .opdefs import custom_op

    spec = custom_op(node)
    if spec is not None and spec.macs is not None:
        return int(spec.macs(node, types))
    return 0


def _constant_tensors(model) -> dict:
    """name -> TensorProto of every initializer and ``Constant`` node value of ``model``."""
    tensors = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    tensors[node.output[0]] = a.t
    return tensors


def weight_tensors(model, types) -> set:
    """Names of the constants of ``model`` that are parameters beyond its float initializers:
    integer weights dequantised by a ``DequantizeLinear`` (QDQ), the constant operands of a
    GEMM-like node (``ConvInteger``, ``MatMulInteger``, ...; a ``Conv``/``Gemm`` bias too) or the
    weights a custom op declares (:attr:`.opdefs.CustomOp.weights`), and a bias: the constant
    operand of an ``Add`` to the accumulator of such a node. Shift amounts, scales, clip bounds
    and multipliers' tables are not parameters."""
    from .opdefs import custom_op

    tensors = {n: t for n, t in _constant_tensors(model).items() if int(np.prod(t.dims, dtype=np.int64)) > 1}
    found, accumulators = set(), set()
    for node in model.graph.node:
        candidates = []
        if node.op_type == "DequantizeLinear":
            candidates = [node.input[0]]
        else:
            shape = gemm_shape(node, types)
            spec = custom_op(node)
            if shape is not None:
                candidates = [shape.a, shape.b] + (list(node.input[2:3]) if node.op_type in ("Conv", "Gemm") else [])
                accumulators.update(node.output)
            elif spec is not None and spec.weights:
                candidates = [node.input[k] for k in spec.weights if k < len(node.input)]
                accumulators.update(node.output)
            elif node.op_type == "Add" and any(i in accumulators for i in node.input):
                candidates = list(node.input)
        found.update(c for c in candidates if c in tensors)
    return found


def onnx_stats(program: Program) -> Stats:
    from onnx import helper

    from .onnx_level import value_types

    model = program.module
    types = value_types(model)
    tensors = _constant_tensors(model)
    inits = {i.name for i in model.graph.initializer}
    counted: set = set()
    weights = weight_tensors(model, types)
    stats = Stats()
    for node in model.graph.node:
        ns = NodeStats(node.name or node.output[0], node.op_type, macs=_onnx_macs(node, types))
        for name in node.input:
            t = tensors.get(name)
            if t is None or not (name in weights or (name in inits and t.data_type in _FLOAT_TYPES)):
                continue
            size = int(np.prod(t.dims, dtype=np.int64))
            if size <= 1:
                continue
            nbytes = size * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
            ns.params += size
            ns.weight_bytes += nbytes
            if name not in counted:
                counted.add(name)
                stats.params += size
                stats.weight_bytes += nbytes
        for out in node.output:
            elem, shape = types.get(out, (None, None))
            if shape is not None and elem:
                itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(elem)).itemsize
                ns.activation_bytes += int(np.prod(shape, dtype=np.int64)) * itemsize
        stats.nodes.append(ns)
    stats.macs = sum(n.macs for n in stats.nodes)
    stats.activation_bytes = sum(n.activation_bytes for n in stats.nodes if n.op != "Constant")
    return stats
