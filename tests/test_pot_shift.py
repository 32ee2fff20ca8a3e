"""pot-shift: the integer-only graph equals the PyTorch fake-quant reference bit for bit, under ONNX
Runtime and TVM; float ops are reported by node; ShiftRequant's three forms agree."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from trained import trained_program

from sliver import ir, passes
from sliver.ir import opdefs
from sliver.ir.errors import UnsupportedOpError
from sliver.ir.program import Program
from sliver.models import data
from sliver.passes.quant.pot_shift import BITS_METADATA, check_integer_only

torch.set_num_threads(2)
INTEGER_OPS = {"ConvInteger", "MatMulInteger", "ShiftRequant", "Add", "Sub", "Mul", "Relu", "ReduceSum",
               "Flatten", "Reshape", "Constant"}


def _reference(model: str, quant: str, batch: int = 16):
    """(torch fake-quant reference program, its pot-shift onnx program)."""
    prog = trained_program(model, batch=batch)
    ref = passes.parse(quant).run(prog, data=data.calibration("digits"), check=False).program
    integer = passes.parse("pot-shift").run(ref, check=False)
    return ref, integer


def _integers(program_out: np.ndarray, exponent: int) -> np.ndarray:
    ints = program_out.astype(np.float64) * 2.0 ** exponent
    assert np.array_equal(ints, np.round(ints))
    return ints.astype(np.int64)


@pytest.fixture(scope="module")
def resnet():
    return _reference("tiny_resnet", "rapq{wbits=4 abits=4 calib_images=64 iters=10}")


def test_tiny_resnet_integer_graph_is_bit_exact_under_onnxruntime_and_tvm(resnet):
    from sliver import backends

    ref, res = resnet
    out = res.program
    assert "integer-only" in out.facts and res.report.steps[-1].notes["float_nodes"] == []
    ops = [n.op_type for n in out.module.graph.node]
    assert set(ops) - {"QuantizeLinear", "DequantizeLinear"} <= INTEGER_OPS
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 1  # input and output only
    assert ops.count("ConvInteger") == 12 and ops.count("ShiftRequant") == 13
    e = ref.module.output_quantizer.exponent
    x = data.digits("test").images[:16].numpy()
    want = _integers(ref.run([x])[0], e)
    assert np.array_equal(_integers(out.run([x])[0], e), want)
    artifact = backends.tvm.build(out, target="x86")
    assert np.array_equal(_integers(artifact.run([x])[0], e), want)
    # the FPGA model sees the bit widths of every integer layer
    bits = json.loads(dict((p.key, p.value) for p in out.module.metadata_props)[BITS_METADATA])
    assert len(bits) == 13 and sorted({tuple(v) for v in bits.values()}) == [(4, 4), (8, 8)]


@pytest.mark.slow  # TVM build of the 53-layer integer graph: 27 s on a quiet machine, 218 s loaded
def test_tiny_mobilenet_v2_integer_graph_is_bit_exact_under_onnxruntime_and_tvm():
    from sliver import backends

    ref, res = _reference("tiny_mobilenet_v2", "rapq{wbits=4 abits=4 calib_images=32 iters=10}", batch=8)
    e = ref.module.output_quantizer.exponent
    x = data.digits("test").images[:8].numpy()
    out = res.program
    assert "integer-only" in out.facts and res.report.steps[-1].notes["float_nodes"] == []
    ops = [n.op_type for n in out.module.graph.node]
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 1
    assert ops.count("ConvInteger") == 52 and ops.count("MatMulInteger") == 1
    want = _integers(ref.run([x])[0], e)
    assert len(np.unique(want.argmax(1))) > 1  # not a constant output
    assert np.array_equal(_integers(out.run([x])[0], e), want)
    artifact = backends.tvm.build(out, target="x86")
    assert np.array_equal(_integers(artifact.run([x])[0], e), want)


def test_tiny_deit_float_ops_are_named_or_kept_with_a_warning():
    # the non-linearities left in float (int_nonlinear=false): pot-shift names the first float op
    prog = trained_program("tiny_deit", batch=2)
    ref = passes.parse("pot-naive{wbits=8 abits=8 calib_images=8 int_nonlinear=false}").run(prog, data=data.calibration("digits"),
                                                                       check=False).program
    with pytest.raises(UnsupportedOpError, match=r"node '.*' \((Concat|Add|LayerNormalization|Mul)\) has no integer form"):
        passes.parse("pot-shift").run(ref, check=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = passes.parse("pot-shift{allow_float=true}").run(ref, check=False)
    assert any("left" in str(w.message) and "in float" in str(w.message) for w in caught)
    floats = res.report.steps[-1].notes["float_nodes"]
    assert floats and "integer-only" not in res.program.facts
    ops = {n.op_type for n in res.program.module.graph.node}
    assert {"MatMulInteger", "ShiftRequant"} <= ops
    x = data.digits("test").images[:2].numpy()
    assert res.program.run([x])[0].shape == (2, 10)


def test_integer_only_check_names_the_float_node():
    x = helper.make_tensor_value_info("x", TensorProto.INT8, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    nodes = [helper.make_node("Cast", ["x"], ["f"], to=TensorProto.FLOAT, name="sneaky_cast"),
             helper.make_node("Relu", ["f"], ["y"], name="relu")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    model = onnx.shape_inference.infer_shapes(model)
    with pytest.raises(UnsupportedOpError, match="node 'sneaky_cast' \\(Cast\\) computes in float"):
        check_integer_only(model)


def test_pot_shift_needs_power_of_two_quantisation_first(make_program):
    prog = make_program("tiny_resnet")
    with pytest.raises(Exception, match="requires fact 'quantized:pot'"):
        passes.parse("pot-shift").run(prog)


def test_shift_requant_function_reference_and_tvm_agree():
    from sliver import backends

    rng = np.random.default_rng(0)
    x = rng.integers(-(1 << 20), 1 << 20, (2, 6, 3, 3)).astype(np.int32)
    x[0, :, 0, 0] = [-3, -2, 2, 3, -1, 1]  # ties and small values
    shift = np.array([0, 1, 2, 5, 12, 20], np.int64).reshape(1, 6, 1, 1)
    attrs = {"lo": 0, "hi": 15, "to": TensorProto.UINT8}
    node = helper.make_node("ShiftRequant", ["x", "s"], ["y"], domain="sliver", name="requant", **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.INT32, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, list(x.shape))],
                              [numpy_helper.from_array(shift, "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("sliver", 1)],
                              functions=[opdefs.shift_requant_function()], ir_version=8)
    want = opdefs.lookup("sliver", "ShiftRequant").reference([x, shift], attrs)[0]
    exact = np.clip(np.floor(x / 2.0 ** shift + 0.5), 0, 15)  # round half up, in float64
    assert np.array_equal(want, exact)
    prog = Program("onnx", model, (x,), name="requant", input_names=("x",))
    assert np.array_equal(prog.run([x])[0], want)
    assert np.array_equal(backends.tvm.build(prog, target="x86").run([x])[0], want)


def test_pot_shift_golden(resnet, golden):
    _, res = resnet
    golden("onnx/tiny_resnet_rapq_pot_shift", res.program.text())
