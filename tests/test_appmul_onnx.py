"""sliver.AppMatMul: its numpy reference, its ONNX function body (ONNX Runtime) and its TVM lowering
agree bit for bit with each other and with the torch emulation of the integer AppMul layers; an
appmul program exports to ONNX with one AppMatMul per layer and the FPGA model costs it with the
multiplier's energy."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from trained import trained, trained_program

from sliver import backends, ir, passes
from sliver.backends import fpga
from sliver.ir import opdefs
from sliver.ir.program import Program
from sliver.models import data
from sliver.passes.appmul import emulate
from sliver.passes.appmul import library as L
from sliver.passes.appmul.emulate import AppMulLayer

torch.set_num_threads(1)


def _one_node(a, w, lut, weight_constant: bool):
    a_shape = a.shape
    node = helper.make_node("AppMatMul", ["a", "w", "lut"], ["y"], domain="sliver", name="app",
                            multiplier="m", bits=int(np.log2(lut.shape[0])), energy_ratio=0.5)
    inputs = [helper.make_tensor_value_info("a", TensorProto.INT8, list(a_shape))]
    inits = [numpy_helper.from_array(lut, "lut")]
    if weight_constant:
        inits.append(numpy_helper.from_array(w, "w"))
    else:
        inputs.append(helper.make_tensor_value_info("w", TensorProto.INT8, list(w.shape)))
    out = helper.make_tensor_value_info("y", TensorProto.INT32, list(a_shape[:-1]) + [w.shape[1]])
    model = helper.make_model(helper.make_graph([node], "g", inputs, [out], inits),
                              opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    opdefs.attach_functions(model)
    feeds = (a,) if weight_constant else (a, w)
    return Program("onnx", model, feeds, name="app_matmul", input_names=tuple(i.name for i in inputs))


@pytest.mark.parametrize("name", ["s2_exact", "s4_broken_h1_v4", "s5_perforated_s0_m1", "s8_truncated_k6", "s6_log_t3"])
def test_app_matmul_reference_onnxruntime_and_tvm_agree(name):
    lib = L.load()
    m = lib[name]
    side = 1 << m.bits
    lo, hi = -side // 2, side // 2 - 1
    rng = np.random.default_rng(m.bits)
    a = rng.integers(lo, hi + 1, (2, 3, 9)).astype(np.int8)
    a[0, 0, :2] = [lo, hi]  # the extremes of the operand range
    w = rng.integers(lo, hi + 1, (9, 4)).astype(np.int8)
    w[:2, 0] = [lo, hi]
    order = (np.arange(side) + side // 2) % side - side // 2 - lo  # two's-complement index order
    lut = m.table[order][:, order].astype(np.int32)
    # the definition, product by product, against the library table indexed by value - lo
    want = np.einsum("bik,kn->bin", np.ones_like(a, dtype=np.int64), np.zeros_like(w, dtype=np.int64))
    for k in range(9):
        want += m.table[a[..., k : k + 1].astype(np.int64) - lo, w[k].astype(np.int64) - lo]
    ref = opdefs.lookup("sliver", "AppMatMul").reference([a, w, lut], {})[0]
    assert ref.dtype == np.int32 and np.array_equal(ref, want)
    if m.is_exact:
        assert np.array_equal(ref, a.astype(np.int64) @ w.astype(np.int64))
    else:
        assert not np.array_equal(ref, a.astype(np.int64) @ w.astype(np.int64))
    for constant in (True, False):
        prog = _one_node(a, w, lut, constant)
        feeds = [a] if constant else [a, w]
        assert np.array_equal(prog.run(feeds)[0], want)
        assert np.array_equal(backends.tvm.build(prog, target="x86").run(feeds)[0], want)


def test_app_matmul_rejects_operands_outside_the_table():
    lut = np.zeros((16, 16), np.int32)
    with pytest.raises(ValueError, match="signed range"):
        opdefs.app_matmul_reference([np.full((1, 2), 8, np.int8), np.zeros((2, 1), np.int8), lut], {})
    with pytest.raises(ValueError, match="power-of-two"):
        opdefs.app_matmul_reference([np.zeros((1, 2), np.int8), np.zeros((2, 1), np.int8), lut[:, :12]], {})


class _Accumulators(torch.nn.Module):
    """Each layer's int32 accumulator through the AppMatMul graph, one input and output per layer."""

    def __init__(self, layers):
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)

    def forward(self, *xs):
        return tuple(layer.integer_accumulator(x) for layer, x in zip(self.layers, xs))


def _integer_layers(model: str, widths: dict, multipliers: dict):
    """Trained ``model`` with the named layers as AppMulLayers (compensated ``multipliers``), and
    each layer's integer input on real test digits."""
    net = copy.deepcopy(trained(model)[0]).eval()
    train = data.digits("train")
    layers = emulate.attach(net, widths, train.images[:32])
    lib = L.load()
    with torch.no_grad():
        for layer in layers.values():
            layer.capture = True
        net(train.images[:32])
        for n, layer in layers.items():
            counts = torch.bincount(layer.captured_input.flatten() - layer.low, minlength=1 << layer.bits)
            layer.act_hist = (counts.double() / counts.sum()).numpy()
            layer.set_multiplier(lib[multipliers[n]], compensate=True)
        net(data.digits("test").images[:2])
    inputs = {n: layer.captured_input.float() for n, layer in layers.items()}
    for layer in layers.values():
        layer.capture, layer.captured_output = False, None
    return layers, inputs


@pytest.mark.parametrize("model", ["tiny_resnet", "tiny_deit"])
def test_integer_appmul_layers_are_bit_identical_emulated_onnxruntime_tvm(model):
    if model == "tiny_resnet":
        names = emulate.quantizable_layers(trained(model)[0])
        pick = [names[0], names[1], names[3], names[-1]]  # padded 3x3, stride-2 1x1, linear
        multipliers = ["s6_truncated_k3", "s5_perforated_s0_m1", "s5_broken_h1_v4", "s6_exact"]
    else:
        names = emulate.quantizable_layers(trained(model)[0])
        pick = [names[0], names[1], names[5], names[-1]]  # patch-embedding conv, qkv, mlp, head
        multipliers = ["s6_broken_h2_v6", "s6_truncated_k2", "s4_perforated_s0_m1", "s6_exact"]
    widths = {n: L.load()[m].bits for n, m in zip(pick, multipliers)}
    layers, inputs = _integer_layers(model, widths, dict(zip(pick, multipliers)))
    approximate = [n for n in pick if layers[n].multiplier is not None]
    assert len(approximate) == 3
    emulated = [layers[n].accumulate(inputs[n]).to(torch.int64).numpy() for n in pick]
    for n, acc in zip(pick, emulated):
        exact = layers[n].accumulate(inputs[n], decompose=True) if layers[n].multiplier is None else None
        if n in approximate:  # the approximate multiplier really changes the accumulator
            saved = layers[n].multiplier
            layers[n].set_multiplier(None)
            assert not np.array_equal(layers[n].accumulate(inputs[n]).to(torch.int64).numpy(), acc)
            layers[n].multiplier, layers[n].lut = saved, torch.from_numpy(saved.table.copy())
        else:
            assert np.array_equal(exact.to(torch.int64).numpy(), acc)
    wrapper = _Accumulators([layers[n] for n in pick])
    feeds = tuple(inputs[n] for n in pick)
    eager = [t.numpy() for t in wrapper(*feeds)]  # the op's numpy reference
    prog = Program("torch", wrapper, feeds, name=f"{model}_accumulators", input_names=tuple(f"x{i}" for i in range(len(pick))))
    onnx_prog = ir.convert(prog, "onnx")
    ops = [node.op_type for node in onnx_prog.module.graph.node]
    assert ops.count("AppMatMul") == len(pick)
    arrays = [t.numpy() for t in feeds]
    ort = onnx_prog.run(arrays)
    tvm = backends.tvm.build(onnx_prog, target="x86").run(arrays)
    for i, n in enumerate(pick):
        assert eager[i].dtype == np.int32 and np.array_equal(eager[i], emulated[i]), n
        assert np.array_equal(ort[i], emulated[i]), n
        assert np.array_equal(tvm[i], emulated[i]), n


def test_appmul_program_exports_runs_and_is_costed():
    program = trained_program("tiny_resnet", batch=4)
    res = passes.parse("appmul{budget=0.0004 bits=5 images=32}").run(program, data={"train": data.digits("train")},
                                                                    seed=0, check=False)
    gm = res.program.module
    rows = res.report.steps[-1].notes["layers"]
    onnx_prog = ir.convert(res.program, "onnx")
    nodes = [n for n in onnx_prog.module.graph.node if n.op_type == "AppMatMul"]
    assert [helper.get_attribute_value(a) for n in nodes for a in n.attribute if a.name == "multiplier"] == \
        [r["multiplier"].encode() for r in rows]
    lib = L.load()
    for n, r in zip(nodes, rows):
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        assert attrs["bits"] == 5 and attrs["energy_ratio"] == pytest.approx(lib[r["multiplier"]].energy_rel)
    x = data.digits("test").images[:4].numpy()
    with torch.no_grad():
        want = gm(torch.from_numpy(x)).numpy()
    assert np.array_equal(onnx_prog.run([x])[0], want)  # same float ops around bit-identical integers
    # the cost model sees each layer's multiplier energy and width
    costed = fpga.cost(onnx_prog.module, bits=8)
    ops = [o for o in costed.ops if o.unit == "lut-gemm"]
    assert len(ops) == 13 and all(o.bits == 5 for o in ops)
    ratios = [float(helper.get_attribute_value(a)) for n in nodes for a in n.attribute if a.name == "energy_ratio"]
    exact_model = onnx_prog.module.__class__()
    exact_model.CopyFrom(onnx_prog.module)
    for n in exact_model.graph.node:
        for a in n.attribute:
            if n.op_type == "AppMatMul" and a.name == "energy_ratio":
                a.f = 1.0
    exact = fpga.cost(exact_model, bits=8)
    assert min(ratios) < 1.0 and costed.energy_mj < exact.energy_mj
    assert costed.cycles == exact.cycles


def test_every_array_multiplier_table_is_bilinear_in_the_operand_bits():
    """The TVM lowering's fast form needs LUT[i, j] = x(i)^T C x(j) exactly: true for every exact,
    truncated, broken-array and perforated multiplier of the library, false for the logarithmic
    ones (which keep the table form), and C of an exact signed multiplier is the signed product's."""
    lib = L.load()
    seen = {True: 0, False: 0}
    for m in lib:
        side = 1 << m.bits
        order = (np.arange(side) + side // 2) % side - side // 2 - m.low  # two's-complement index order
        lut = m.table[order][:, order]
        factors = opdefs.app_matmul_bit_factors(lut)
        assert (factors is not None) == (m.spec.family != "log"), m.name
        seen[factors is not None] += 1
        if m.is_exact and m.signed:
            assert np.array_equal(factors, opdefs.app_matmul_exact_factors(m.bits))
    assert seen[True] > 100 and seen[False] > 10


def test_lowering_plans_reproduce_every_bilinear_table_and_take_the_cheaper_side():
    """``backends.lowering.app_matmul_plan``, evaluated in numpy as the TVM lowering evaluates it
    (``[A, pieces of A] @ weights + bias``), equals the op's reference for every bilinear multiplier
    of the library over the whole operand range; a perforated multiplier costs what the exact
    product costs (its parts fold into the weights), a truncated one keeps its low activation
    bits, and each storage type holds what is stored in it."""
    from sliver.backends.lowering import app_matmul_plan

    lib = L.load()
    rng = np.random.default_rng(3)
    checked, dtypes = 0, {"int8": 0, "uint8": 0, "int32": 0}
    for m in lib:
        if not m.signed:
            continue
        side = 1 << m.bits
        lo = -side // 2
        order = (np.arange(side) + side // 2) % side - side // 2 - m.low
        lut = m.table[order][:, order]
        factors = opdefs.app_matmul_bit_factors(lut)
        if factors is None:
            continue
        a = np.arange(lo, -lo, dtype=np.int64)[None, :].repeat(3, axis=0)  # every operand value
        a = np.concatenate([a, rng.integers(lo, -lo, (3, side))], axis=0)
        w = rng.integers(lo, -lo, (side, 5))
        w[:, 0] = np.arange(lo, -lo)
        plan = app_matmul_plan(w, factors, m.bits)
        assert plan is not None, m.name
        bits = (a[..., None] % side >> np.arange(m.bits)) & 1
        parts = []
        for kind, payload, lo, shift in plan["parts"]:
            raw = a if kind == "a" else bits[..., payload] if kind == "bit" else bits @ payload
            assert not np.any((raw - lo) % (1 << shift)), m.name  # the shift drops no set bit
            parts.append((raw - lo) >> shift)
        x = np.concatenate(parts, axis=-1)
        low, high = {"int8": (-128, 127), "uint8": (0, 255), "int32": (-(1 << 31), (1 << 31) - 1)}[plan["dtype"]]
        assert x.min() >= low and x.max() <= high, m.name
        if plan["dtype"] != "int32":
            assert plan["weights"].min() >= -128 and plan["weights"].max() <= 127, m.name
        got = x @ plan["weights"] + plan["bias"]
        want = opdefs.app_matmul_reference([a.astype(np.int8), w.astype(np.int8), lut.astype(np.int32)], {})[0]
        assert np.array_equal(got, want), m.name
        dtypes[plan["dtype"]] += 1
        if m.spec.family == "perforated" or m.is_exact:
            assert len(plan["parts"]) == 1 and plan["dtype"] == "int8", m.name
        if m.name in ("s4_truncated_k2", "s8_truncated_k2"):
            assert (plan["side"], [p[:2] for p in plan["parts"]]) == ("activation", [("a", None), ("bit", 0), ("bit", 1)])
        checked += 1
    assert dtypes["uint8"] > 0  # the 8-bit broken arrays
    assert checked > 80


@pytest.mark.parametrize("name", ["s8_truncated_k6", "s8_broken_h2_v7", "s8_broken_h2_v9", "s8_perforated_s0_m2",
                                  "s7_log_t4"])
def test_tvm_lowering_of_constant_weights_is_bit_exact_for_both_forms(name):
    lib = L.load()
    m = lib[name]
    side = 1 << m.bits
    lo, hi = -side // 2, side // 2 - 1
    rng = np.random.default_rng(7)
    a = rng.integers(lo, hi + 1, (1, 5, 48)).astype(np.int8)
    w = rng.integers(lo, hi + 1, (48, 16)).astype(np.int8)
    a[0, 0, :2], w[:2, 0] = [lo, hi], [lo, hi]
    order = (np.arange(side) + side // 2) % side - side // 2 - m.low
    lut = m.table[order][:, order].astype(np.int32)
    want = opdefs.lookup("sliver", "AppMatMul").reference([a, w, lut], {})[0]
    prog = _one_node(a, w, lut, True)
    assert np.array_equal(backends.tvm.build(prog, target="x86").run([a])[0], want)
