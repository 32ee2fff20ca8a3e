"""asvit: head-importance-weighted class attention, learnable thresholds, static compilation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sliver import backends, ir, passes
from sliver.ir import errors
from sliver.passes.tokens.asvit import ThresholdBlock, class_attention_score


def test_score_formula():
    torch.manual_seed(0)
    probs = torch.rand(2, 3, 5, 5).softmax(-1)
    context = torch.randn(2, 3, 5, 4)
    got = class_attention_score(probs, context)
    for b in range(2):
        for j in range(1, 5):
            norms = [context[b, h, j].norm() for h in range(3)]
            expected = sum(probs[b, h, 0, j] * norms[h] / sum(norms) for h in range(3))
            assert got[b, j - 1].item() == pytest.approx(expected.item(), rel=1e-5)


def _stage(make_program, keep=20):
    prog = make_program("tiny_deit")
    block = prog.module.get_submodule("blocks.3")
    return ThresholdBlock(block, keep_tokens=keep).eval()


def test_inference_modes(make_program):
    stage = _stage(make_program)
    x = torch.randn(3, 65, 64)
    with torch.no_grad():
        assert stage(x).shape == (3, 21, 64)  # static: CLS + k
        _, score = stage.scores(x)
        stage.mode = "adaptive"
        stage.threshold.fill_(1.0)  # keep the tokens over the uniform score 1/64
        over = (score > 1.0 / 64).sum()
        assert stage(x).shape == (3, 1 + int(over) // 3, 64)  # batch rule: k = count // B
        assert stage(x[:1]).shape == (1, 1 + int((score[0] > 1.0 / 64).sum()), 64)  # batch 1: exact


def test_training_thresholds_and_static_build(make_program):
    from sliver.models import data

    prog = make_program("tiny_deit")
    pipe = passes.parse("asvit{blocks=3,6 budget=0.8 epochs=1 batch_size=32}")
    train = data.digits("train").take(96)
    result = pipe.run(prog, data=train)
    notes = result.report.steps[0].notes
    assert len(notes["thresholds"]) == 2 and all(np.isfinite(notes["thresholds"]))
    assert len(notes["kept"]) == 2 and all(1 <= k <= 64 for k in notes["kept"])
    assert notes["kept"][1] <= notes["kept"][0]
    out = result.program
    assert out.stats().macs < prog.stats().macs
    onnx_prog = ir.to_onnx(out)
    assert [n.op_type for n in onnx_prog.module.graph.node].count("TopK") == 2
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    ref = out.run([x])[0]
    np.testing.assert_allclose(backends.tvm.build(onnx_prog).run([x])[0], ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "pipeline, error, words",
    [
        ("asvit{blocks=4,20}", errors.OptionValueError, ["block index 20"]),
        ("asvit{budget=1.5}", errors.OptionValueError, ["budget=1.5", "(0, 1]"]),
        ("asvit{epochs=0}", errors.OptionValueError, ["thresholds are learned"]),
        ("asvit", errors.PassError, ["needs data"]),
    ],
)
def test_bad_use(pipeline, error, words, make_program):
    with pytest.raises(error) as info:
        passes.parse(pipeline).run(make_program("tiny_deit"))
    for w in words:
        assert w in str(info.value)
