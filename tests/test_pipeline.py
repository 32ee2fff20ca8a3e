"""The pass manager: text pipelines, validation before running, instrumentation, determinism."""

from __future__ import annotations

import dataclasses
import os
from typing import Literal

import pytest
import torch

from sliver import passes
from sliver.ir import errors
from sliver.ir.program import Program
from sliver.passes.infra.base import Pass, register


# -- passes that exist only for these tests -----------------------------------------------------
@dataclasses.dataclass
class _DemoOptions:
    blocks: tuple[int, ...] = dataclasses.field(default=(3, 6, 9), metadata={"doc": "block indices"})
    keep: float = dataclasses.field(default=0.7, metadata={"doc": "keep ratio"})
    mode: Literal["static", "adaptive"] = "static"
    verbose: bool = False

    def validate(self):
        if not 0.0 < self.keep <= 1.0:
            raise ValueError(f"keep={self.keep} must lie in (0, 1]")


@register
class _Demo(Pass):
    name = "test-demo"
    level = "torch"
    Options = _DemoOptions
    provides = ("demo-done",)

    def run(self, program, ctx):
        ctx.record("keep", self.options.keep)
        return program


@register
class _NeedsDemo(Pass):
    name = "test-needs-demo"
    level = "onnx"
    requires = ("demo-done",)

    def run(self, program, ctx):
        return program


@register
class _Scale(Pass):
    """Multiplies every parameter by 1.01: a pass that breaks its own declared tolerance."""

    name = "test-scale"
    level = "torch"
    check_tolerance = 1e-6

    def run(self, program, ctx):
        program = program.clone()
        with torch.no_grad():
            for p in program.module.parameters():
                p.mul_(1.01)
        return program


@register
class _Crash(Pass):
    name = "test-crash"
    level = "torch"

    def run(self, program, ctx):
        raise ZeroDivisionError("boom")


# -- parsing and printing -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text",
    [
        "fold-bn,cleanup",
        "test-demo{blocks=4,7,10 keep=0.5},cleanup",
        "test-demo{keep=0.25 mode=adaptive verbose=true}",
        "test-demo,test-needs-demo",
        "",
    ],
)
def test_pipeline_text_round_trips(text):
    pipe = passes.parse(text)
    assert str(pipe) == text
    assert passes.parse(str(pipe)) == pipe


def test_options_are_typed():
    pipe = passes.parse("test-demo{blocks=4,7,10 keep=0.5 verbose=yes}")
    opts = pipe.passes[0].options
    assert opts.blocks == (4, 7, 10) and opts.keep == 0.5 and opts.verbose is True and opts.mode == "static"
    # the same pipeline from Python objects
    built = passes.Pipeline([passes.get_pass("test-demo")(blocks=[4, 7, 10], keep=0.5, verbose=True)])
    assert built == pipe and str(built) == "test-demo{blocks=4,7,10 keep=0.5 verbose=true}"


@pytest.mark.parametrize(
    "text, error, words",
    [
        ("fold-bm", errors.UnknownPassError, ["fold-bm", "did you mean 'fold-bn'"]),
        ("test-demo{kep=0.5}", errors.UnknownOptionError, ["kep", "test-demo", "blocks, keep"]),
        ("test-demo{keep=abc}", errors.OptionValueError, ["keep=abc", "a number"]),
        ("test-demo{keep=1.5}", errors.OptionValueError, ["keep=1.5", "(0, 1]"]),
        ("test-demo{blocks=4,x}", errors.OptionValueError, ["blocks", "integer"]),
        ("test-demo{mode=fast}", errors.OptionValueError, ["mode=fast", "static, adaptive"]),
        ("test-demo{keep}", errors.PipelineSyntaxError, ["keep", "key=value"]),
        ("test-demo{keep=0.5", errors.PipelineSyntaxError, ["missing '}'"]),
        ("fold-bn,,cleanup", errors.PipelineSyntaxError, ["empty pass name"]),
        ("test-demo{keep=0.5 keep=0.6}", errors.PipelineSyntaxError, ["given twice"]),
    ],
)
def test_bad_pipelines_fail_with_typed_one_line_errors(text, error, words):
    with pytest.raises(error) as info:
        passes.parse(text)
    message = str(info.value)
    assert "\n" not in message
    for w in words:
        assert w in message


def test_order_is_validated_before_anything_runs():
    with pytest.raises(errors.PassOrderError, match="requires fact 'demo-done'.*put test-demo before it"):
        passes.parse("test-needs-demo").validate("torch")
    passes.parse("test-demo,test-needs-demo").validate("torch")  # satisfied
    with pytest.raises(errors.PassOrderError, match="'fold-bn'.*torch level.*already at the onnx level"):
        passes.parse("cleanup,fold-bn").validate("torch")
    with pytest.raises(errors.PassOrderError):
        passes.parse("fold-bn").validate("onnx")  # a user's onnx file cannot go back to torch


def test_validation_happens_before_the_first_pass_runs(make_program):
    prog = make_program("tiny_resnet")
    with pytest.raises(errors.PassOrderError):
        passes.parse("test-crash,test-needs-demo").run(prog)  # test-crash would raise if it ran


def test_run_converts_levels_and_instruments_every_step(make_program, tmp_path):
    prog = make_program("tiny_resnet")
    result = passes.parse("fold-bn,test-demo{keep=0.5},cleanup").run(prog, dump_ir=tmp_path)
    out, report = result
    assert out.level == "onnx"
    assert {"bn-folded", "demo-done", "clean"} <= out.facts
    assert [s.name for s in report.steps] == ["fold-bn", "test-demo", "to-onnx", "cleanup"]
    for step in report.steps:
        assert step.seconds >= 0 and step.before["macs"] > 0 and step.after["macs"] == step.before["macs"]
        assert step.max_abs_diff is not None and step.max_abs_diff < 1e-4
        assert os.path.exists(step.ir_path)
    assert report.steps[1].notes == {"keep": 0.5}
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in prog.module.modules())
    assert n_bn == 12 and report.steps[0].notes["folded"] == n_bn  # stem, 2 per block, 3 downsamples
    assert report.steps[0].after["params"] < report.steps[0].before["params"]  # BN params gone
    assert sorted(os.listdir(tmp_path)) == [
        "00-input.txt", "01-fold-bn.txt", "02-test-demo.txt", "03-to-onnx.txt", "04-cleanup.txt"
    ]
    assert [h.name for h in out.history] == ["fold-bn", "test-demo", "to-onnx", "cleanup"]
    assert "fold-bn" in str(report) and "cleanup" in str(report)
    assert prog.level == "torch" and not prog.facts  # the input program is untouched


def test_numerical_check_catches_a_pass_that_breaks_its_tolerance(make_program):
    prog = make_program("tiny_vgg")
    with pytest.raises(errors.NumericalCheckError, match="test-scale changed the outputs"):
        passes.parse("test-scale").run(prog)
    passes.parse("test-scale").run(prog, check=False)  # the check is optional


def test_a_crashing_pass_is_named(make_program):
    with pytest.raises(errors.PassError, match="pass 'test-crash' failed.*ZeroDivisionError: boom"):
        passes.parse("test-crash").run(make_program("tiny_vgg"))


def test_same_seed_same_bytes(make_program):
    outs = []
    for _ in range(2):
        prog = make_program("tiny_mobilenet_v2")
        outs.append(passes.parse("fold-bn,cleanup").run(prog, seed=3).program.module.SerializeToString())
    assert outs[0] == outs[1]


def test_run_rejects_non_programs():
    with pytest.raises(errors.SliverError, match="takes a sliver Program"):
        passes.parse("fold-bn").run(torch.nn.Linear(2, 2))


def test_registry_lists_real_passes_with_options():
    reg = passes.registered()
    assert reg["fold-bn"].level == "torch" and reg["cleanup"].level == "onnx"
    rows = passes.option_docs(reg["test-demo"])
    assert rows[0] == ("blocks", "a comma-separated list of an integer", "3,6,9", "block indices")
    assert isinstance(Program, type)


# -- one context, instruments, refusals, recipes ------------------------------------------------
def test_a_context_or_its_keywords_not_both(make_program):
    prog = make_program("tiny_vgg")
    ctx = passes.PassContext(seed=3)
    with pytest.raises(errors.SliverError, match="got a context and data=, seed=: put data and seed into the PassContext"):
        passes.parse("test-demo").run(prog, ctx, data={"train": None}, seed=3)
    assert passes.parse("test-demo").run(prog, ctx, check=False).report.seed == 3
    assert passes.parse("test-demo").run(prog, seed=5, check=False).report.seed == 5


class _Recorder(passes.Instrument):
    def __init__(self):
        self.calls = []

    def start(self, program, report):
        self.calls.append(("start", program.level))

    def before(self, name, program):
        self.calls.append(("before", name, program.level))

    def after(self, step, before, after):
        self.calls.append(("after", step.name, before.level, after.level, step.lossy))

    def finish(self, program, report):
        self.calls.append(("finish", program.level, len(report.steps)))


def test_instruments_see_every_step_before_and_after(make_program):
    rec = _Recorder()
    result = passes.parse("test-demo,cleanup").run(make_program("tiny_vgg"), instruments=[rec], check=False)
    assert rec.calls == [
        ("start", "torch"),
        ("before", "test-demo", "torch"), ("after", "test-demo", "torch", "torch", True),
        ("before", "to-onnx", "torch"), ("after", "to-onnx", "torch", "onnx", False),
        ("before", "cleanup", "onnx"), ("after", "cleanup", "onnx", "onnx", False),
        ("finish", "onnx", 3),
    ]
    assert [s.max_abs_diff for s in result.report.steps] == [None, None, None]  # check=False: no NumericalCheck
    with pytest.raises(errors.SliverError, match="instruments are sliver.passes.Instrument objects"):
        passes.parse("test-demo").run(make_program("tiny_vgg"), instruments=[object()])


class _StopAfter(passes.Instrument):
    def after(self, step, before, after):
        if step.name == "test-demo":
            raise errors.PassError("stopped after test-demo")


def test_an_instrument_stops_the_pipeline(make_program):
    with pytest.raises(errors.PassError, match="stopped after test-demo"):
        passes.parse("test-demo,test-crash").run(make_program("tiny_vgg"), instruments=[_StopAfter()])


@register
class _FloatOnly(Pass):
    name = "test-float-only"
    level = "torch"
    refuses = {"demo-done": ""}  # the default fix: put this pass first

    def run(self, program, ctx):
        return program


def test_conflicting_order_is_refused_naming_the_pair():
    with pytest.raises(errors.PassOrderError) as info:
        passes.parse("test-demo,test-float-only").validate("torch")
    assert str(info.value) == ("pass 'test-float-only' (#2) cannot run after 'test-demo' (#1), which made the program "
                               "'demo-done'; put test-float-only before test-demo")
    passes.parse("test-float-only,test-demo").validate("torch")
    with pytest.raises(errors.PassOrderError, match=r"after 'cleanup', #1\); put fold-bn before cleanup"):
        passes.parse("cleanup,fold-bn").validate("torch")


def test_recipes_are_pipelines_that_print_back():
    from sliver.passes import recipes

    assert {"int-vit-fpga", "int-cnn", "float-vit-cpu"} <= set(recipes.RECIPES)
    for recipe in recipes.RECIPES.values():
        assert str(recipe.parse()) == recipe.pipeline
        recipe.parse().validate("torch")
    assert "pot-shift" in recipes.get("int-vit-fpga").pipeline and "poly-act" in recipes.get("int-vit-fpga").pipeline
    with pytest.raises(errors.PipelineError, match="unknown recipe 'int-vit'; did you mean 'int-vit-fpga'"):
        recipes.get("int-vit")
