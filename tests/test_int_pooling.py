"""Integer pooling and dyadic requantisation (issue #18): max pooling of int32 values and the
average over a window that is not a power of two (``sliver.DyadicRequant``, HAWQ-V3) agree bit for
bit between the numpy reference, ONNX Runtime and TVM; a ResNet with a max-pooled stem and a 3x3
global average pool becomes integer-only and matches its fake-quant reference; the full-size zoo
CNNs become integer-only with pot-shift's defaults."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from sliver import ir, models, passes
from sliver.ir import opdefs
from sliver.ir.program import Program
from sliver.models import data

torch.set_num_threads(1)


def _single_op(op_type, x, consts, out_type, **attrs):
    inits = [numpy_helper.from_array(v, k) for k, v in consts.items()]
    node = helper.make_node(op_type, ["x", *consts], ["y"], domain="sliver", name=op_type, **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.INT32, list(x.shape))],
                              [helper.make_tensor_value_info("y", out_type, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("sliver", 1)],
                              ir_version=8)
    opdefs.attach_functions(model)
    model = onnx.shape_inference.infer_shapes(model)
    return Program("onnx", model, (x,), name=op_type.lower(), input_names=("x",))


def _three_ways(prog, x):
    from sliver import backends

    spec = opdefs.lookup("sliver", prog.module.graph.node[0].op_type)
    node = prog.module.graph.node[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    consts = [numpy_helper.to_array(i) for i in prog.module.graph.initializer]
    want = spec.reference([x, *consts], attrs)[0]
    ort = prog.run([x])[0]
    tvm = backends.tvm.build(prog, target="x86").run([x])[0]
    return want, ort, tvm


def test_dyadic_requant_reference_onnxruntime_and_tvm_agree():
    rng = np.random.default_rng(0)
    x = rng.integers(-(1 << 31), (1 << 31) - 1, (64, 4), dtype=np.int64).astype(np.int32)
    x[0] = [-(1 << 31), (1 << 31) - 1, 0, -1]
    x[1] = [49, -49 * 32, 98 * 3, -9 << 19]  # exact quotients and a tie (-1/2)
    factors = np.array([1 / 49, 2.0 ** -5 / 49, 3.0, 2.0 ** -20 / 9])
    m, s = opdefs.dyadic_constants(factors)
    assert (m >= 1 << 30).all() and (m < 1 << 31).all()
    assert np.allclose(m / np.power(2.0, s), factors, rtol=2.0 ** -30, atol=0)
    for lo, hi, to in ((-128, 127, TensorProto.INT8), (-(1 << 31), (1 << 31) - 1, TensorProto.INT32)):
        prog = _single_op("DyadicRequant", x, {"m": m.reshape(1, 4), "s": s.reshape(1, 4)}, to, lo=lo, hi=hi, to=to)
        want, ort, tvm = _three_ways(prog, x)
        exact = np.clip(np.floor(x.astype(np.float64) * factors + 0.5), lo, hi)
        # the dyadic factor is within 2^-30 of the real one: only near-ties of big values may differ
        assert np.abs(want - exact).max() <= 1 and (want == exact).mean() > 0.95
        assert np.array_equal(want, ort) and np.array_equal(want, tvm)
    assert list(want[1, :3]) == [1, -1, 882] and want[1, 3] in (-1, 0)  # a tie of 1/9: dyadic, near


@pytest.mark.parametrize("kernel,stride,pads", [(3, 2, 1), (2, 2, 0)])
def test_int_max_pool_reference_onnxruntime_and_tvm_agree(kernel, stride, pads):
    rng = np.random.default_rng(1)
    x = rng.integers(-(1 << 31), (1 << 31) - 1, (1, 5, 9, 9), dtype=np.int64).astype(np.int32)
    x[0, 0] = -(1 << 31)  # padding must not win even against the type's minimum
    attrs = dict(kernel_shape=[kernel] * 2, strides=[stride] * 2, pads=[pads] * 4, dilations=[1, 1])
    prog = _single_op("IntMaxPool", x, {}, TensorProto.INT32, **attrs)
    want, ort, tvm = _three_ways(prog, x)
    torch_pool = torch.nn.functional.max_pool2d(torch.from_numpy(x.astype(np.float64)), kernel, stride, pads)
    assert np.array_equal(want, torch_pool.numpy())
    assert np.array_equal(want, ort) and np.array_equal(want, tvm)


@pytest.fixture(scope="module")
def pooled_resnet():
    """A tiny ResNet with the full-size stem (7x7/2 conv, 3x3/2 max pool on int32 accumulators) at
    72x72: 36 (stem) -> 18 (pool) -> 18, 9, 5, 3, so the global average is over 9 positions."""
    torch.manual_seed(0)
    net = models.create("tiny_resnet", stem_kernel=7, stem_stride=2, stem_pool=True).eval()
    x = torch.randn(16, 3, 72, 72)
    prog = ir.trace(net, x[:4], name="pooled_resnet")
    calib = data.ImageSet("random", "images", x)
    ref = passes.parse("pot-naive{wbits=8 abits=8 calib_images=16}").run(prog, data=calib, check=False).program
    return ref, passes.parse("pot-shift").run(ref, check=False), x[:4].numpy()


def test_max_pooled_resnet_with_a_9_position_average_is_integer_only_and_bit_exact(pooled_resnet):
    from sliver import backends

    ref, res, x = pooled_resnet
    out = res.program
    ops = [n.op_type for n in out.module.graph.node]
    assert "integer-only" in out.facts and res.report.steps[-1].notes["float_nodes"] == []
    assert ops.count("IntMaxPool") == 1 and ops.count("DyadicRequant") == 1 and ops.count("ReduceSum") == 1
    gap = next(n for n in out.module.graph.node if n.op_type == "ReduceSum")
    shape = ir.onnx_level.value_types(out.module)[gap.input[0]][1]
    assert list(shape[2:]) == [3, 3]
    e = ref.module.output_quantizer.exponent
    want = ref.run([x])[0].astype(np.float64) * 2.0 ** e
    got_ort = out.run([x])[0].astype(np.float64) * 2.0 ** e
    got_tvm = backends.tvm.build(out, target="x86").run([x])[0].astype(np.float64) * 2.0 ** e
    assert np.array_equal(got_ort, got_tvm)
    assert np.array_equal(got_ort, want)
    assert len(np.unique(want)) > 4  # not a constant output


@pytest.mark.slow  # pot-naive on two 224x224 CNNs: ~90 s on a loaded 2-core machine
def test_full_size_cnns_become_integer_only_with_defaults():
    """ResNet-18 (int32 max-pooled stem, 7x7 = 49-position average) and MobileNetV2 (ReLU6, 49-position
    average) at 224x224: pot-shift with its defaults leaves no float op. Graph structure only (no run
    of the full-size models)."""
    for name in ("resnet18", "mobilenet_v2"):
        torch.manual_seed(0)
        net = models.create(name).eval()
        x = torch.randn(2, 3, 224, 224)
        prog = ir.trace(net, x[:1], name=name)
        ref = passes.parse("pot-naive{wbits=8 abits=8 calib_images=2}").run(
            prog, data=data.ImageSet("random", "images", x), check=False).program
        res = passes.parse("pot-shift").run(ref, check=False)
        ops = [n.op_type for n in res.program.module.graph.node]
        assert "integer-only" in res.program.facts and res.report.steps[-1].notes["float_nodes"] == [], name
        assert ops.count("DyadicRequant") == 1 and ops.count("IntMaxPool") == (1 if name == "resnet18" else 0), name


def test_average_pool_windows_of_the_zoo():
    """VGG's AdaptiveAvgPool2d(7) on a 7x7 map exports as a 1x1 AveragePool (the identity); a window
    over the whole map is the global average; other windows are named as having no integer form."""
    from sliver.ir.errors import UnsupportedOpError
    from sliver.passes.quant.pot_shift import _Builder

    def graph(kernel, spatial):
        c = 4
        w = numpy_helper.from_array(np.ones((c, c, 1, 1), np.int8), "w")
        scale = numpy_helper.from_array(np.array(0.25, np.float32), "s")
        wscale = numpy_helper.from_array(np.full(c, 0.5, np.float32), "ws")
        zero = numpy_helper.from_array(np.array(0, np.int8), "z")
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
                 helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"]),
                 helper.make_node("DequantizeLinear", ["w", "ws"], ["wf"], axis=0),
                 helper.make_node("Conv", ["dq", "wf"], ["c"]),
                 helper.make_node("AveragePool", ["c"], ["p"], kernel_shape=kernel, strides=[1, 1], name="pool"),
                 helper.make_node("QuantizeLinear", ["p", "s", "z"], ["q2"]),
                 helper.make_node("DequantizeLinear", ["q2", "s", "z"], ["y"])]
        shape = [1, c, spatial, spatial]
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, scale, wscale, zero])
        return onnx.shape_inference.infer_shapes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))

    ops = [n.op_type for n in _Builder(graph([1, 1], 7), False).build().graph.node]
    assert "ShiftRequant" in ops and "ReduceSum" not in ops and "AveragePool" not in ops
    ops = [n.op_type for n in _Builder(graph([7, 7], 7), False).build().graph.node]
    assert "ReduceSum" in ops and "DyadicRequant" in ops
    with pytest.raises(UnsupportedOpError, match="'pool' \\(AveragePool\\) has no integer form"):
        _Builder(graph([3, 3], 7), False).build()
