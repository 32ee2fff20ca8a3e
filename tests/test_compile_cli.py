"""tools/compile.py end to end: artifacts that match the references, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPILE = os.path.join(ROOT, "tools", "compile.py")


def compile_(*args):
    return subprocess.run([sys.executable, COMPILE, *map(str, args)], capture_output=True, text=True, cwd=ROOT)


@pytest.mark.parametrize("name", ["deit_tiny", "resnet18", "mobilenet_v2"])
def test_compiled_artifact_matches_onnxruntime_and_pytorch(name, tmp_path):
    from sliver import backends, models
    from sliver.ir.runtime import run_onnxruntime

    out = tmp_path / "out"
    proc = compile_(name, "--pipeline", "fold-bn,cleanup", "--target", "x86", "--out", out, "--dump-ir")
    assert proc.returncode == 0, proc.stderr
    assert f"sliver: {name} -> {out}" in proc.stdout
    assert sorted(os.listdir(out)) == ["ir", "model.json", "model.onnx", "model.so", "report.json"]
    assert sorted(os.listdir(out / "ir")) == ["00-input.txt", "01-fold-bn.txt", "02-to-onnx.txt", "03-cleanup.txt"]
    report = json.loads((out / "report.json").read_text())
    assert report["before"]["macs"] == report["after"]["macs"] > 0
    assert [s["name"] for s in report["steps"]] == ["fold-bn", "to-onnx", "cleanup"]
    assert report["max_abs_diff"]["tvm_vs_onnxruntime"] < 1e-4

    # an independent check on a fresh random input: the artifact vs ONNX Runtime vs PyTorch
    artifact = backends.tvm.load(out)
    x = np.random.default_rng(123).standard_normal(artifact.input_shapes[0]).astype(np.float32)
    got = artifact.run([x])[0]
    from sliver.ir.program import Program

    ort = run_onnxruntime(Program("onnx", onnx.load(str(out / "model.onnx")), (x,)), [x])[0]
    torch.manual_seed(0)  # compile.py's default --seed 0 fixes the zoo weights
    with torch.no_grad():
        ref = models.create(name)(torch.from_numpy(x)).numpy()
    assert np.abs(got - ort).max() < 1e-4
    assert np.abs(got - ref).max() < 1e-4
    # relative too: randomly initialised MobileNetV2 has outputs of size ~1e-9
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def _onnx_file(path, op="Relu"):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node(op, ["x"], ["y"], name="n0")], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), str(path))
    return path


def test_compile_a_users_onnx_file_without_touching_it(tmp_path):
    src = _onnx_file(tmp_path / "user.onnx")
    before = src.read_bytes()
    proc = compile_(src, "--pipeline", "cleanup", "--out", tmp_path / "o")
    assert proc.returncode == 0, proc.stderr
    assert src.read_bytes() == before
    assert json.loads((tmp_path / "o" / "report.json").read_text())["max_abs_diff"]["tvm_vs_input_model"] == 0.0


@pytest.mark.parametrize(
    "args, words",
    [
        (["tiny_vgg", "--pipeline", "fold-bm"], ["unknown pass 'fold-bm'", "did you mean 'fold-bn'"]),
        (["tiny_vgg", "--pipeline", "cleanup{fold=true}"], ["no option 'fold'", "fold_constants"]),
        (["tiny_vgg", "--pipeline", "cleanup{fold_constants=maybe}"], ["fold_constants=maybe", "true or false"]),
        (["tiny_vgg", "--pipeline", "cleanup,fold-bn"], ["'fold-bn'", "already at the onnx level"]),
        (["missing.onnx", "--pipeline", "cleanup"], ["no such file: missing.onnx"]),
        (["NOTONNX", "--pipeline", "cleanup"], ["is not an ONNX model"]),
        (["CELU", "--pipeline", "cleanup"], ["TVM cannot import op Celu (node 'n0')"]),
        (["resnet99"], ["unknown", "resnet99", "resnet18"]),
        (["tiny_vgg", "--input-shape", "1,3,x"], ["--input-shape", "1,3,224,224"]),
        (["tiny_vgg", "--target", "gpu"], ["--target 'gpu'", "x86,fpga"]),
        (["tiny_vgg", "--target", "x86,arm"], ["--target 'x86,arm'", "one of x86/arm with fpga"]),
        (["tiny_deit", "--recipe", "int-vit"], ["unknown recipe 'int-vit'", "did you mean 'int-vit-fpga'"]),
        (["tiny_deit", "--recipe", "int-vit-fpga", "--pipeline", "evit"], ["--recipe or --pipeline, not both"]),
        (["tiny_vgg", "--max-drop", "1"], ["--max-drop needs --data"]),
        (["tiny_vgg", "--data", "nowhere/d.npz"], ["no such data file or directory: nowhere/d.npz"]),
        (["tiny_vgg", "--data", "digits", "--split", "tset"], ["unknown split 'tset'", "did you mean 'test'"]),
        (["resnet18", "--data", "digits"], ["only random ones", "tiny_resnet"]),
        (["tiny_segmenter", "--data", "digits"], ["trained on digit-scenes", "--data digit-scenes"]),
    ],
)
def test_bad_input_exits_2_with_one_line(args, words, tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_text("hello, I am a text file")
    celu = _onnx_file(tmp_path / "celu.onnx", op="Celu")
    args = [str(junk) if a == "NOTONNX" else str(celu) if a == "CELU" else a for a in args]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("the user's earlier result")
    proc = compile_(*args, "--out", out)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for w in words:
        assert w in lines[0]
    # OUT keeps what it held; no staging directory is left behind
    assert sorted(os.listdir(out)) == ["keep.txt"]
    assert [p for p in os.listdir(tmp_path) if p.startswith(".out")] == []


def test_data_scores_the_trained_model_before_after_and_as_artifact(tmp_path):
    """--data digits: the trained tiny ResNet, scored on the test split at all three levels."""
    from trained import trained

    out = tmp_path / "scored"
    proc = compile_("tiny_resnet", "--data", "digits", "--pipeline", "fold-bn,cleanup", "--out", out)
    assert proc.returncode == 0, proc.stderr
    acc = json.loads((out / "report.json").read_text())["accuracy"]
    _, checkpoint = trained("tiny_resnet")
    assert (acc["dataset"], acc["metric"], acc["count"], acc["split"]) == ("digits/test", "accuracy", 360, "test")
    assert acc["before"] == pytest.approx(checkpoint["scores"]["test"], abs=1e-9)  # the trained weights were used
    assert abs(acc["after"] - acc["before"]) <= 0.2 and abs(acc["tvm"] - acc["before"]) <= 0.2  # exact rewrites
    assert f"accuracy  {acc['before']:.2f}% -> {acc['after']:.2f}%" in proc.stdout


def test_list_recipes_prints_each_recipe_and_its_pipeline_text():
    from sliver.passes import recipes

    proc = compile_("--list-recipes")
    assert proc.returncode == 0
    for recipe in recipes.RECIPES.values():
        assert f"{recipe.name}  {recipe.goal}" in proc.stdout and f"    pipeline: {recipe.pipeline}" in proc.stdout


def test_latency_aware_heatvit_works_from_the_command_line(tmp_path):
    """The context compile.py builds carries the FPGA cost model of --accel/--bits."""
    out = tmp_path / "latency"
    proc = compile_("tiny_deit", "--pipeline", "heatvit{epochs=0 latency=0.5}", "--target", "fpga", "--out", out)
    assert proc.returncode == 0, proc.stderr
    from sliver.backends import fpga
    from sliver.passes.tokens.heatvit import schedule_latency_ms

    step = json.loads((out / "report.json").read_text())["steps"][0]
    choice = step["notes"]["latency_choice"]
    table = fpga.CostModel(accel="zcu102", bits=8).block_latency_table(64, 4, 2.0, token_counts=range(2, 67))
    assert step["name"] == "heatvit"
    assert choice["pruned_ms"] == pytest.approx(schedule_latency_ms(table, 12, 64, choice["blocks"], choice["keep"]))
    assert choice["pruned_ms"] <= 0.5 * 12 * table[65]
    assert "heatvit{epochs=0 latency=0.5}" in proc.stdout


def test_list_passes_documents_options():
    proc = compile_("--list-passes")
    assert proc.returncode == 0
    assert "fold-bn  (torch level)" in proc.stdout
    assert "cleanup  (onnx level)" in proc.stdout and "fold_constants: true or false, default true." in proc.stdout


def test_fpga_target_writes_a_cost_report(tmp_path):
    out = tmp_path / "fpga"
    proc = compile_("tiny_deit", "--pipeline", "evit,poly-act", "--target", "fpga", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(out)) == ["fpga_layers.png", "fpga_report.json", "model.onnx", "report.json"]
    report = json.loads((out / "report.json").read_text())
    assert report["fpga"]["nonlinear"] == "poly" and report["fpga"]["bits"] == 8  # auto: poly after poly-act
    assert report["fpga"]["latency_ms"] > 0 and report["fpga"]["macs"] == report["after"]["macs"]
    detail = json.loads((out / "fpga_report.json").read_text())
    assert sum(op["cycles"] for op in detail["ops"]) == pytest.approx(detail["totals"]["cycles"], abs=1)
    assert "ms" in proc.stdout and "fpga_report.json" in proc.stdout
