"""The minimal TVM x86 path: import, build for the host CPU, run, compare with ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from sliver import backends, ir
from sliver.ir import errors


@pytest.mark.parametrize("name", ["tiny_deit", "tiny_resnet", "tiny_mobilenet_v2", "tiny_segmenter"])
def test_tvm_matches_onnxruntime(name, make_program):
    prog = ir.to_onnx(make_program(name))
    artifact = backends.tvm.build(prog, target="x86")
    x = np.random.default_rng(7).standard_normal(prog.input_shapes[0]).astype(np.float32)
    got = artifact.run([x])
    ref = prog.run([x])
    assert len(got) == len(ref) == 1 and got[0].shape == ref[0].shape
    np.testing.assert_allclose(got[0], ref[0], atol=1e-4, rtol=0)


def test_artifact_saves_and_loads(make_program, tmp_path):
    prog = ir.to_onnx(make_program("tiny_vgg"))
    artifact = backends.tvm.build(prog)
    assert artifact.target["kind"] == "llvm" and artifact.target.get("mcpu") not in (None, "native")
    paths = artifact.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.so"]
    loaded = backends.tvm.load(tmp_path)
    x = prog.example_inputs[0]
    np.testing.assert_array_equal(loaded.run([x])[0], artifact.run([x])[0])
    assert paths["library"].endswith("model.so")
    with pytest.raises(errors.BackendError, match="must have shape"):
        loaded.run([x[:, :, :8]])


def test_running_and_saving_share_one_export(make_program, tmp_path, monkeypatch):
    """An artifact's library is exported once (each export runs LLVM's code generation): running
    it exports to a private file, saving copies that file, and the file goes with the artifact."""
    import gc
    import os

    prog = ir.to_onnx(make_program("tiny_vgg"))
    artifact = backends.tvm.build(prog)
    calls = []
    export = type(artifact.executable).export_library
    monkeypatch.setattr(type(artifact.executable), "export_library",
                        lambda self, *a, **k: calls.append(a) or export(self, *a, **k))
    got = artifact.run(prog.example_inputs)
    artifact.save(tmp_path)
    np.testing.assert_array_equal(backends.tvm.load(tmp_path).run(prog.example_inputs)[0], got[0])
    assert len(calls) == 1
    private = artifact._library
    with open(private, "rb") as a, open(tmp_path / "model.so", "rb") as b:
        assert a.read() == b.read()
    del artifact
    gc.collect()
    assert not os.path.exists(private)


def test_background_build_matches_and_reports_failure(make_program, tmp_path):
    prog = ir.to_onnx(make_program("tiny_vgg"))
    background = backends.tvm.BackgroundBuild(prog, "x86", tmp_path / "bg")
    here = backends.tvm.build(prog)
    other = background.result()
    x = prog.example_inputs
    np.testing.assert_array_equal(other.run(x)[0], here.run(x)[0])
    assert other.target == here.target
    import onnx

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Celu", ["x"], ["y"], name="my_celu")], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), str(tmp_path / "c.onnx"))
    bad = backends.tvm.BackgroundBuild(ir.load_onnx(tmp_path / "c.onnx"), "x86", tmp_path / "bad")
    with pytest.raises(errors.BackendError, match="background TVM build failed: .*Celu") as err:
        bad.result()
    assert "\n" not in str(err.value)


def test_artifact_profile_times_every_kernel(make_program):
    prog = ir.to_onnx(make_program("tiny_vgg"))
    artifact = backends.tvm.build(prog)
    rows = artifact.profile(prog.example_inputs, repeat=3)
    names = [r["kernel"] for r in rows]
    assert len(names) == len(set(names)) and any("conv2d" in n for n in names)
    assert not any(n.startswith("vm.builtin") for n in names)
    assert all(r["calls"] >= 1 and 0 < r["min_ms"] <= r["median_ms"] for r in rows)
    assert [r["min_ms"] for r in rows] == sorted((r["min_ms"] for r in rows), reverse=True)


def test_tvm_level_program_prints(make_program):
    prog = ir.convert(ir.to_onnx(make_program("tiny_vgg")), "tvm")
    text = prog.text()
    assert prog.level == "tvm" and "R.nn.conv2d" in text and "metadata[" in text


def test_unsupported_op_is_named_before_import(tmp_path):
    import onnx

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Celu", ["x"], ["y"], name="my_celu")], "g", [x], [y])
    path = tmp_path / "celu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), str(path))
    prog = ir.load_onnx(path)
    with pytest.raises(errors.UnsupportedOpError, match="TVM cannot import op Celu \\(node 'my_celu'\\)"):
        backends.tvm.build(prog)


def test_target_names():
    assert backends.tvm.resolve_target("arm")["mtriple"] == "aarch64-linux-gnu"
    with pytest.raises(errors.BackendError, match="unknown target 'gpu'"):
        backends.tvm.resolve_target("gpu")
