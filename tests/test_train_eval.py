"""Training recipes, checkpoints, the per-machine cache, and scoring at the three levels.

The trained models come from ``tests/trained.py`` (trained once per machine, then loaded). On a
cold cache this module trains tiny_deit (~35 s) and tiny_segmenter (~110 s); the three CNN
recipes are checked in ``slow`` cases (~1.5 min together).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from trained import trained, trained_program

from sliver import backends, ir, passes
from sliver.backends.evaluate import evaluate, evaluate_before_after, score
from sliver.ir.errors import DataError, ModelInputError, UnknownModelError
from sliver.models import data, training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"sliver_tool_{name}", os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- recipes and initialisation -------------------------------------------------------------------
def test_config_for_rejects_what_it_cannot_train():
    assert training.config_for("tiny_deit", epochs=3, seed=5).epochs == 3
    with pytest.raises(UnknownModelError, match="unknown zoo model 'tiny_deitt'"):
        training.config_for("tiny_deitt")
    with pytest.raises(ModelInputError, match="no training recipe for zoo model 'deit_small'"):
        training.config_for("deit_small")
    with pytest.raises(ModelInputError, match="unknown training option"):
        training.config_for("tiny_deit", epoch=3)
    with pytest.raises(ModelInputError, match="must be positive"):
        training.config_for("tiny_deit", epochs=0)


def test_vit_initialisation():
    codes = training.sincos_position_embedding((8, 8), 64)
    assert codes.shape == (64, 64)
    assert torch.allclose(codes[0, :16], torch.zeros(16)) and torch.allclose(codes[0, 16:32], torch.ones(16))
    from sliver import models

    net = training._prepare(models.create("tiny_deit"), training.config_for("tiny_deit"))
    assert torch.equal(net.pos_embed[0, 1:], codes) and not net.pos_embed[0, 0].any()
    attn, dim = net.blocks[3].attn, 64
    weight = attn.qkv.weight.detach()
    w_q, w_k, w_v = weight[:dim], weight[dim:2 * dim], weight[2 * dim:]
    assert float((w_q.T @ w_k).diagonal().mean()) == pytest.approx(0.7, abs=0.05)
    assert float((attn.proj.weight.detach() @ w_v).diagonal().mean()) == pytest.approx(-0.4, abs=0.05)
    cnn = models.create("tiny_resnet")
    before = {k: v.clone() for k, v in cnn.state_dict().items()}
    training._prepare(cnn, training.config_for("tiny_resnet"))
    assert all(torch.equal(before[k], v) for k, v in cnn.state_dict().items())  # CNNs untouched


# -- training, checkpoints, cache -----------------------------------------------------------------
def test_training_is_reproducible_and_checkpoints_round_trip(tmp_path):
    first = training.train("tiny_vgg", epochs=1, progress=False)
    second = training.train("tiny_vgg", epochs=1, progress=False)
    assert first.scores == second.scores and first.metric == "accuracy"
    assert all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()))
    other = training.train("tiny_vgg", epochs=1, seed=1, progress=False)
    assert not torch.equal(other.model.features[0].weight, first.model.features[0].weight)

    path = training.save_checkpoint(first, tmp_path / "ckpt" / "vgg.pt")
    assert os.listdir(tmp_path / "ckpt") == ["vgg.pt"]  # no temporary file left behind
    net, ckpt = training.load_checkpoint(path)
    assert ckpt["model"] == "tiny_vgg" and ckpt["config"]["epochs"] == 1 and ckpt["train_seconds"] > 0
    assert ckpt["scores"] == first.scores and ckpt["metric"] == "accuracy"
    assert training.evaluate_module(net, data.digits("test")) == first.scores["test"]


def test_checkpoint_errors(tmp_path):
    with pytest.raises(DataError, match="no such checkpoint"):
        training.load_checkpoint(tmp_path / "missing.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(DataError, match="is not a sliver checkpoint"):
        training.load_checkpoint(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_text("junk")
    with pytest.raises(DataError, match="not a readable torch checkpoint"):
        training.load_checkpoint(tmp_path / "junk.pt")


def test_cache_trains_once_per_key(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIVER_CACHE", str(tmp_path))
    calls = []
    real_train = training.train

    def counting_train(*args, **kwargs):
        calls.append(args)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(training, "train", counting_train)
    net, ckpt = training.cached("tiny_vgg", epochs=1)
    again, _ = training.cached("tiny_vgg", epochs=1)
    assert len(calls) == 1 and torch.equal(net.features[0].weight, again.features[0].weight)
    path = training.cached_path(training.config_for("tiny_vgg", epochs=1))
    assert os.path.dirname(path) == str(tmp_path) and os.path.basename(path).startswith("tiny_vgg-seed0-")
    # the key covers the seed and the config
    assert training.cached_path(training.config_for("tiny_vgg", epochs=1, seed=1)) != path
    assert training.cached_path(training.config_for("tiny_vgg", epochs=2)) != path


# -- the trained models reach their goals; the levels agree ----------------------------------------
def test_tiny_deit_reaches_goal_and_three_levels_agree():
    _, ckpt = trained("tiny_deit")
    assert ckpt["scores"]["test"] >= 97.0, ckpt["scores"]
    program = trained_program("tiny_deit", batch=32)
    torch_score = score(program)
    onnx_program = ir.to_onnx(program)
    onnx_score = score(onnx_program)
    tvm_score = score(backends.tvm.build(onnx_program, "x86"))
    values = [torch_score.value, onnx_score.value, tvm_score.value]
    assert [torch_score.level, onnx_score.level, tvm_score.level] == ["torch", "onnx", "tvm"]
    assert max(values) - min(values) <= 0.2, values
    assert abs(torch_score.value - ckpt["scores"]["test"]) <= 0.2  # the traced program is the trained model
    assert torch_score.metric == "accuracy" and torch_score.count == 360 and torch_score.dataset == "digits/test"


def test_tiny_segmenter_reaches_goal_and_levels_agree():
    _, ckpt = trained("tiny_segmenter")
    assert ckpt["metric"] == "miou" and ckpt["scores"]["test"] >= 80.0, ckpt["scores"]
    program = trained_program("tiny_segmenter", batch=20)
    torch_miou = evaluate(program)
    onnx_program = ir.to_onnx(program)
    onnx_miou = evaluate(onnx_program, task="segmentation")
    tvm_miou = evaluate(backends.tvm.build(onnx_program, "x86"), data="digit-scenes")
    assert max(torch_miou, onnx_miou, tvm_miou) - min(torch_miou, onnx_miou, tvm_miou) <= 0.2
    assert abs(torch_miou - ckpt["scores"]["test"]) <= 0.2


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny_resnet", "tiny_mobilenet_v2", "tiny_vgg"])
def test_cnn_recipes_reach_goal(model):
    _, ckpt = trained(model)
    assert ckpt["scores"]["test"] >= 97.0, ckpt["scores"]
    assert ckpt["train_seconds"] > 0


# -- the evaluation API ---------------------------------------------------------------------------------
def test_scoring_does_not_depend_on_the_batch_size():
    whole = score(trained_program("tiny_deit", batch=32), split="val")
    one = score(trained_program("tiny_deit", batch=1), split="val")  # torch.fx: scored 32 at a time
    assert one.value == whole.value and one.count == whole.count == 359 and one.batch_size == 32
    # static shapes: ONNX Runtime at the program's batch, 359 = 51 x 7 + 2 (the last batch padded)
    ragged = score(ir.convert(trained_program("tiny_deit", batch=7), "onnx"), split="val")
    assert ragged.batch_size == 7 and ragged.count == 359
    assert ragged.value == score(ir.convert(trained_program("tiny_deit", batch=32), "onnx"), split="val").value
    assert abs(ragged.value - whole.value) <= 100.0 / 359  # float ONNX Runtime vs PyTorch: at most one image
    assert score(trained_program("tiny_deit", batch=32), limit=50).count == 50


def test_a_program_that_mixes_its_batch_is_scored_at_its_own_batch():
    class BatchMean(torch.nn.Module):  # centres each image on the batch's mean: batch-dependent
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3 * 32 * 32, 10)

        def forward(self, x):
            x = x.flatten(1)
            return self.fc(x - 0.5 * x.mean(0, keepdim=True))

    torch.manual_seed(0)
    program = ir.trace(BatchMean().eval(), torch.zeros(1, 3, 32, 32))
    got = score(program, split="val", limit=40)
    assert got.batch_size == 1 and got.count == 40
    images, labels = data.digits("val").images[:40], data.digits("val").targets[:40]
    with torch.no_grad():
        alone = torch.cat([program.module(images[i:i + 1]) for i in range(40)])
    assert got.value == pytest.approx(100.0 * float((alone.argmax(1) == labels).float().mean()))


def test_evaluate_errors_are_one_line():
    program = trained_program("tiny_deit", batch=32)
    cases = [
        (lambda: evaluate(program, split="tset"), "unknown split 'tset' for digits"),
        (lambda: evaluate(program, data="digit-scenes"), "digit-scenes/test images are 3x64x64 but the model takes 3x32x32"),
        (lambda: evaluate(program, task="segmentation"), "digit-scenes/test images are 3x64x64"),
        (lambda: evaluate(program, task="detection"), "unknown task 'detection'"),
        (lambda: evaluate(program, data="/no/such/set.npz"), "no such data file or directory: /no/such/set.npz"),
        (lambda: evaluate(program, data=data.photos(size=32)), "has no labels to score against"),
        (lambda: evaluate("model.onnx"), "takes a sliver Program or a TVM Artifact"),
    ]
    for call, message in cases:
        with pytest.raises(DataError) as info:
            call()
        assert message in str(info.value) and "\n" not in str(info.value)


def test_evaluate_before_after_a_pipeline():
    program = trained_program("tiny_deit", batch=32)
    result = passes.parse("fold-bn,cleanup").run(program, data=data.calibration("digits"), seed=0)
    report = evaluate_before_after(program, result.program, data="digits", split="test")
    assert report["metric"] == "accuracy" and report["dataset"] == "digits/test"
    assert report["levels"] == {"before": "torch", "after": "onnx"}
    assert abs(report["change"]) <= 0.2 and report["before"] >= 97.0
    json.dumps(report)  # ready for report.json


# -- the command-line tools ----------------------------------------------------------------------------
def test_train_cli(tmp_path, capsys):
    train_tool = _tool("train")
    out = tmp_path / "vgg.pt"
    assert train_tool.main(["tiny_vgg", "--epochs", "1", "--out", str(out), "--quiet"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    _, ckpt = training.load_checkpoint(out)
    assert ckpt["config"]["epochs"] == 1 and "test" in ckpt["scores"]
    assert train_tool.main(["deit_small", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no training recipe for zoo model 'deit_small'") and err.count("\n") == 1
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train.py"), "tiny_resnett"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: unknown zoo model 'tiny_resnett'")
    assert proc.stderr.count("\n") == 1


def test_report_cli_plots_accuracy_against_macs(tmp_path, capsys):
    report_tool = _tool("report")
    png = tmp_path / "plots" / "deit.png"
    code = report_tool.main(["tiny_deit", "--pipeline", "fold-bn,cleanup", "--pipeline", "cleanup",
                             "--out", str(png), "--limit", "100"])
    assert code == 0, capsys.readouterr().err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads(png.with_suffix(".json").read_text())["rows"]
    assert [r["pipeline"] for r in rows] == ["(dense)", "fold-bn,cleanup", "cleanup"]
    assert rows[0]["level"] == "torch" and rows[1]["level"] == "onnx"
    assert all(r["macs"] == rows[0]["macs"] > 0 for r in rows)  # these passes keep every MAC
    assert all(r["metric"] == "accuracy" and r["score"] >= 95.0 for r in rows)
    assert report_tool.main(["tiny_deit", "--pipeline", "no-such-pass", "--out", str(png)]) == 2
    assert "unknown pass" in capsys.readouterr().err
    assert report_tool.main(["tiny_deit", "--out", str(tmp_path / "plot.svg")]) == 2
    assert "must name a .png file" in capsys.readouterr().err
