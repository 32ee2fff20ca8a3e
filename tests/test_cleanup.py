"""cleanup: constant folding, no-op and dead-node removal on the onnx level."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from sliver import ir, passes


def _messy_model(path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3], np.linspace(-1, 1, 12, dtype=np.float32).tolist())
    two = helper.make_tensor("two", TensorProto.FLOAT, [3], [2.0, 2.0, 2.0])
    nodes = [
        helper.make_node("Identity", ["x"], ["x1"], name="id"),
        helper.make_node("MatMul", ["x1", "w"], ["m"], name="mm"),
        helper.make_node("Mul", ["two", "two"], ["four"], name="const_mul"),   # constant: folds
        helper.make_node("Add", ["m", "four"], ["a"], name="add"),
        helper.make_node("Dropout", ["a"], ["d"], name="drop"),                # inference no-op
        helper.make_node("Cast", ["d"], ["c"], name="cast", to=TensorProto.FLOAT),  # same type
        helper.make_node("Relu", ["c"], ["y"], name="relu"),
        helper.make_node("Neg", ["m"], ["dead"], name="dead"),                 # feeds nothing
    ]
    graph = helper.make_graph(nodes, "messy", [x], [y], [w, two])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    import onnx

    onnx.save(model, str(path))


def test_cleanup_removes_noops_constants_and_dead_nodes(tmp_path, golden):
    path = tmp_path / "messy.onnx"
    _messy_model(path)
    prog = ir.load_onnx(path)
    result = passes.parse("cleanup").run(prog)
    out = result.program
    assert [n.op_type for n in out.module.graph.node] == ["MatMul", "Add", "Relu"]
    notes = result.report.steps[0].notes
    assert notes["nodes_before"] == 8 and notes["nodes_after"] == 3 and notes["noops_removed"] == 3
    np.testing.assert_array_equal(out.run()[0], prog.run()[0])
    golden("onnx/cleanup_messy", out.text())


def test_cleanup_on_an_exported_vit_keeps_outputs(make_program, golden):
    prog = make_program("tiny_deit")
    result = passes.parse("cleanup").run(prog)
    assert result.report.steps[-1].max_abs_diff < 1e-6
    golden("onnx/tiny_deit_cleanup", result.program.text())
