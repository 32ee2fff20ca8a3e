"""Tracing (torch level), export and loading (onnx level)."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from sliver import ir, models
from sliver.ir import errors


class UserNet(torch.nn.Module):
    """A user's own module with a transformer-like block, not from the zoo."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        t = x.flatten(2).transpose(1, 2)
        t, _ = self.attn(t, t, t, need_weights=False)
        return self.fc(t.mean(1))


def test_trace_keeps_blocks_attention_conv_bn_linear_as_module_nodes(make_program):
    prog = make_program("tiny_deit")
    gm = prog.module
    kinds = {n.target: type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes if n.op == "call_module"}
    assert [t for t, k in kinds.items() if k == "Block"] == [f"blocks.{i}" for i in range(12)]
    assert kinds["patch_embed.proj"] == "Conv2d" and kinds["head"] == "Linear"
    resnet = make_program("tiny_resnet").module
    order = [n.target for n in resnet.graph.nodes if n.op == "call_module"]
    assert order[:2] == ["conv1", "bn1"]
    assert ir.is_attention(gm.get_submodule("blocks.0.attn")) and ir.is_transformer_block(gm.get_submodule("blocks.0"))


def test_trace_a_users_module_and_never_modify_it():
    net = UserNet().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    prog = ir.trace(net, torch.randn(1, 3, 8, 8), name="user")
    assert net.training  # the caller's module is untouched (tracing works on a copy)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert prog.level == "torch" and prog.input_shapes == ((1, 3, 8, 8),)
    with torch.no_grad():
        expected = net.eval()(torch.from_numpy(prog.example_inputs[0])).numpy()
    np.testing.assert_allclose(prog.run()[0], expected, atol=1e-6)
    onnx_prog = ir.to_onnx(prog)
    np.testing.assert_allclose(onnx_prog.run()[0], expected, atol=1e-5)


def test_trace_errors_are_one_line():
    class DataDependent(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x
            return -x

    with pytest.raises(errors.TraceError, match="cannot trace DataDependent.*leaf_modules"):
        ir.trace(DataDependent(), torch.randn(2))
    with pytest.raises(errors.TraceError, match=r"does not run on example input\(s\) of shape \(1, 3, 30\)"):
        ir.trace(models.create("tiny_resnet"), torch.randn(1, 3, 30))
    with pytest.raises(errors.TraceError, match="needs a torch.nn.Module"):
        ir.trace("resnet", torch.randn(1))


def test_export_is_static_checked_and_deterministic(make_program):
    a = ir.to_onnx(make_program("tiny_deit"))
    b = ir.to_onnx(make_program("tiny_deit"))
    model = a.module
    onnx.checker.check_model(model, full_check=True)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    for vi in list(model.graph.value_info) + list(model.graph.output):
        assert all(d.HasField("dim_value") for d in vi.type.tensor_type.shape.dim), vi.name
    assert not any(i.name.startswith("onnx::") for i in model.graph.initializer)
    assert a.text() == b.text() and model.SerializeToString() == b.module.SerializeToString()


def _write(model, path):
    onnx.save(model, str(path))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _dynamic_model():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3], np.arange(12, dtype=np.float32).tolist())
    shape = helper.make_node("Shape", ["x"], ["s"])
    mm = helper.make_node("MatMul", ["x", "w"], ["m"])
    relu = helper.make_node("Relu", ["m"], ["y"])
    graph = helper.make_graph([shape, mm, relu], "dyn", [x], [y], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_load_user_onnx_fixes_dynamic_shapes_and_leaves_the_file_alone(tmp_path):
    path = tmp_path / "dyn.onnx"
    digest = _write(_dynamic_model(), path)
    with pytest.raises(errors.ModelInputError, match="dynamic shape.*--input-shape"):
        ir.load_onnx(path)
    prog = ir.load_onnx(path, input_shapes=(2, 4))
    assert prog.level == "onnx" and prog.input_shapes == ((2, 4),) and prog.name == "dyn"
    assert prog.stats().macs == 2 * 4 * 3
    x = prog.example_inputs[0]
    np.testing.assert_allclose(prog.run()[0], np.maximum(x @ np.arange(12, dtype=np.float32).reshape(4, 3), 0), rtol=1e-6)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    with pytest.raises(errors.ModelInputError, match="does not fit input 'x'"):
        ir.load_onnx(path, input_shapes=(2, 5))


def test_load_errors(tmp_path):
    with pytest.raises(errors.ModelInputError, match="no such file"):
        ir.load_onnx(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a protobuf at all \x00\xff")
    with pytest.raises(errors.ModelInputError, match="is not an ONNX model"):
        ir.load_onnx(junk)
    model = _dynamic_model()
    model.graph.node[2].domain = "com.example"
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    _write(model, tmp_path / "custom.onnx")
    with pytest.raises(errors.UnsupportedOpError, match="com.example.Relu.*custom domain"):
        ir.load_onnx(tmp_path / "custom.onnx", input_shapes=(1, 4))


def test_program_is_a_value(make_program):
    prog = make_program("tiny_vgg")
    clone = prog.clone()
    with torch.no_grad():
        next(clone.module.parameters()).add_(1.0)
    assert not torch.equal(next(clone.module.parameters()), next(prog.module.parameters()))
    assert "tiny_vgg" in repr(prog) and "level=torch" in repr(prog)
