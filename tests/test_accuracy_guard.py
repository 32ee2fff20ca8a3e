"""The accuracy guard: every stage of a pipeline scored, and a pipeline stopped at the pass that
drops the score by more than the allowed points."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sliver import passes
from sliver.backends.evaluate import AccuracyGuard
from sliver.ir import errors
from sliver.models import data as datasets
from sliver.passes.infra.base import Pass, register


@dataclasses.dataclass
class _FlipOptions:
    fraction: float = dataclasses.field(default=1.0, metadata={"doc": "fraction of output rows reversed"})


@register
class _FlipClasses(Pass):
    """Reverses the rows of the last Linear layer: a lossy pass (no tolerance)."""

    name = "test-flip-classes"
    level = "torch"
    Options = _FlipOptions

    def run(self, program, ctx):
        program = program.clone()
        last = [m for m in program.module.modules() if isinstance(m, torch.nn.Linear)][-1]
        with torch.no_grad():
            last.weight.copy_(last.weight.flip(0))
            last.bias.copy_(last.bias.flip(0))
        return program


def _self_labelled(program, count=40):
    """digits test images labelled with the program's own predictions: the input scores 100%."""
    test = datasets.digits("test").take(count)
    with torch.no_grad():
        labels = torch.cat([program.module(test.images[i:i + 1]).argmax(1) for i in range(count)])
    return dataclasses.replace(test, name="digits/self-labelled", targets=labels)


def test_every_lossy_step_and_the_exported_program_are_scored(make_program):
    prog = make_program("tiny_vgg")
    data = _self_labelled(prog)
    guard = AccuracyGuard(data, "test")
    result = passes.parse("fold-bn,test-flip-classes,cleanup").run(prog, instruments=[guard])
    rows = {row["step"]: row for row in guard.stages}
    assert list(rows) == ["(input)", "test-flip-classes", "cleanup"]  # fold-bn is exact: not scored
    assert rows["(input)"]["value"] == 100.0 and rows["(input)"]["level"] == "torch"
    flipped = rows["test-flip-classes"]["value"]
    assert flipped < 100.0 and rows["test-flip-classes"]["change"] == pytest.approx(flipped - 100.0)
    assert rows["cleanup"]["level"] == "onnx" and rows["cleanup"]["value"] == pytest.approx(flipped)
    steps = {s.name: s for s in result.report.steps}
    assert steps["test-flip-classes"].accuracy["value"] == flipped and steps["fold-bn"].accuracy is None
    assert guard.first.value == 100.0 and guard.last.value == pytest.approx(flipped)
    assert "score %" in str(result.report)


def test_max_drop_stops_at_the_pass_that_crossed_it(make_program):
    prog = make_program("tiny_vgg")
    guard = AccuracyGuard(_self_labelled(prog), "test", max_drop=1.0)
    with pytest.raises(errors.AccuracyDropError) as info:
        passes.parse("fold-bn,test-flip-classes,cleanup").run(prog, instruments=[guard])
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("pass 'test-flip-classes' dropped accuracy on digits/self-labelled from 100.00% to ")
    assert "more than the allowed 1 (--max-drop)" in message
    assert [row["step"] for row in guard.stages] == ["(input)", "test-flip-classes"]  # stopped there


def test_the_caller_scores_the_final_stage_on_what_it_built(make_program):
    """score_export=False: lossy steps followed by another step are scored as usual; the last
    stage (here the conversion to ONNX after the last pass) waits for score_final, here on a TVM
    artifact."""
    from sliver import backends

    prog = make_program("tiny_vgg")
    data = _self_labelled(prog)
    guard = AccuracyGuard(data, "test", score_export=False)
    result = passes.parse("test-flip-classes,fold-bn,test-flip-classes").run(prog, instruments=[guard], lower_to="onnx")
    steps = [s.name for s in result.report.steps]
    assert [row["step"] for row in guard.stages] == ["(input)", "test-flip-classes", "test-flip-classes"]
    assert guard.pending and guard.stages[-1]["level"] == "torch" and guard.last.value == 100.0
    artifact = backends.tvm.build(result.program, target="x86")
    guard.score_final(artifact)
    assert not guard.pending and guard.last.level == "tvm"
    assert [row["step"] for row in guard.stages][-1] == steps[-1] != "test-flip-classes"
    assert guard.last.value == 100.0  # flipped twice: the input's own predictions
    assert result.report.steps[-1].accuracy["level"] == "tvm"
    guard.score_final(artifact)  # nothing pending: no second row
    assert len(guard.stages) == 4
