"""Pipelines: MLIR-style text, validation before anything runs, and the instrumented run.

Text form: passes separated by commas, options in braces separated by spaces, list values
separated by commas::

    fold-bn,cleanup
    heatvit{blocks=4,7,10 keep=0.7},rapq{wbits=4 abits=4},pot-shift

``str(parse(text)) == text`` for text in this canonical form (no blank space outside braces, one
space between options, options in the order the pass declares them). The same pipeline can be
built from pass objects: ``Pipeline([FoldBN(), Cleanup()])``.
"""

from __future__ import annotations

import os
import re
import time
from typing import Iterable, Sequence

from ...ir.convert import convert_step
from ...ir.errors import NumericalCheckError, PassError, PassOrderError, PipelineSyntaxError, SliverError
from ...ir.program import PassRecord, Program, level_index
from ...ir.runtime import max_abs_diff, run_program
from .base import Pass, get_pass, providers_of
from .context import PassContext
from .facts import ROUNDING_FACT
from .report import Report, StepReport

#: largest output change allowed for a level conversion, relative to the output magnitude
CONVERSION_TOLERANCE = 1e-4

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_\-]*$")
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*$")


def _split_top(text: str) -> list:
    """Split on commas that are not inside braces."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "{":
            depth += 1
            if depth > 1:
                raise PipelineSyntaxError(f"nested '{{' at character {i + 1} of pipeline {text!r}")
        elif ch == "}":
            depth -= 1
            if depth < 0:
                raise PipelineSyntaxError(f"unmatched '}}' at character {i + 1} of pipeline {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise PipelineSyntaxError(f"missing '}}' in pipeline {text!r}")
    parts.append(text[start:])
    return parts


def parse_pass(item: str) -> Pass:
    item = item.strip()
    if not item:
        raise PipelineSyntaxError("empty pass name in pipeline (two commas in a row, or a trailing comma?)")
    if "{" in item:
        if not item.endswith("}"):
            raise PipelineSyntaxError(f"text after '}}' in {item!r}; write pass{{key=value key=value}}")
        name, body = item[:-1].split("{", 1)
    else:
        name, body = item, ""
    name = name.strip()
    if not _NAME.match(name):
        raise PipelineSyntaxError(f"{name!r} is not a pass name; pass names look like 'fold-bn'")
    cls = get_pass(name)
    options = {}
    for token in body.split():
        if "=" not in token:
            raise PipelineSyntaxError(
                f"option {token!r} of pass {name!r} has no value; write key=value (lists: key=1,2,3)"
            )
        key, value = token.split("=", 1)
        if not _KEY.match(key):
            raise PipelineSyntaxError(f"{key!r} is not an option name (pass {name!r})")
        if key in options:
            raise PipelineSyntaxError(f"option {key!r} is given twice to pass {name!r}")
        options[key] = value
    return cls(**options)


def parse(text: str) -> "Pipeline":
    """Parse pipeline text into a :class:`Pipeline` (unknown passes and options are errors)."""
    if not isinstance(text, str):
        raise PipelineSyntaxError(f"a pipeline is text, got {type(text).__name__}")
    if not text.strip():
        return Pipeline([])
    return Pipeline([parse_pass(item) for item in _split_top(text)])


class Pipeline:
    """An ordered list of passes; the only way passes run."""

    def __init__(self, passes: Iterable[Pass] = ()) -> None:
        self.passes = list(passes)
        for p in self.passes:
            if not isinstance(p, Pass):
                raise PipelineSyntaxError(f"a pipeline holds passes, got {type(p).__name__}")

    def __str__(self) -> str:
        return ",".join(p.text() for p in self.passes)

    def __repr__(self) -> str:
        return f"Pipeline({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Pipeline) and self.passes == other.passes

    def __len__(self) -> int:
        return len(self.passes)

    # -- validation -------------------------------------------------------------------------
    def validate(self, level: str = "torch", facts: Iterable[str] = ()) -> None:
        """Check the order before anything runs: levels only go down, and every fact a pass
        requires is provided by the program or an earlier pass."""
        current = level_index(level)
        have = set(facts)
        by = {}  # fact -> the pass that provided it
        for i, p in enumerate(self.passes):
            if level_index(p.level) < current:
                raise PassOrderError(
                    f"pass {p.name!r} (#{i + 1}) runs at the {p.level} level, but the program is already "
                    f"at the {_level_name(current)} level there; move {p.name} before the "
                    f"{_level_name(current)}-level passes"
                )
            current = level_index(p.level)
            for fact in p.requires:
                if fact not in have:
                    providers = providers_of(fact)
                    fix = (
                        f"put {' or '.join(providers)} before it"
                        if providers
                        else "no registered pass provides it"
                    )
                    raise PassOrderError(
                        f"pass {p.name!r} (#{i + 1}) requires fact {fact!r}, which nothing before it "
                        f"provides; {fix}"
                    )
            for fact, fix in p.refused_facts().items():
                if fact in have:
                    raise PassOrderError(
                        f"pass {p.name!r} (#{i + 1}) cannot follow {by.get(fact, 'the program')!r} "
                        f"({fact}): {fix}"
                    )
            have -= set(p.invalidates)
            have |= set(p.provides)
            by.update({fact: p.name for fact in p.provides})

    # -- running ----------------------------------------------------------------------------
    def run(
        self,
        program: Program,
        ctx: PassContext | None = None,
        *,
        data=None,
        seed: int = 0,
        check: bool = True,
        dump_ir: str | os.PathLike | None = None,
        lower_to: str | None = None,
        progress: bool = False,
    ) -> "PipelineResult":
        """Validate, then run every pass in order on ``program``.

        Levels are converted automatically where a pass needs a lower one (and at the end to
        ``lower_to`` if given). Each step is instrumented: wall time, statistics before and after,
        the IR text after it (written to ``dump_ir/NN-<pass>.txt`` when ``dump_ir`` is set) and,
        with ``check``, the largest output change against the previous program on the example
        inputs (enforced for passes that declare a tolerance).
        """
        if not isinstance(program, Program):
            raise SliverError(f"Pipeline.run() takes a sliver Program, got {type(program).__name__}")
        if ctx is None:
            ctx = PassContext(data=data, seed=seed, progress=progress)
        self.validate(program.level, program.facts)
        if lower_to is not None and level_index(lower_to) < level_index(
            self.passes[-1].level if self.passes else program.level
        ):
            raise PassOrderError(f"cannot end at the {lower_to} level after a lower-level pass")
        report = Report(pipeline=str(self), seed=ctx.seed)
        runner = _Runner(report, ctx, check, dump_ir)
        runner.start(program)
        for p in self.passes:
            while runner.program.level != p.level:
                runner.convert()
            runner.apply(p)
        if lower_to is not None:
            while runner.program.level != lower_to:
                runner.convert()
        return PipelineResult(runner.program, report)


def _level_name(index: int) -> str:
    from ...ir.program import LEVELS

    return LEVELS[index]


class PipelineResult:
    def __init__(self, program: Program, report: Report) -> None:
        self.program = program
        self.report = report

    def __iter__(self):  # allow `program, report = pipe.run(...)`
        return iter((self.program, self.report))


class _Runner:
    """Runs steps one by one and records what each did."""

    def __init__(self, report: Report, ctx: PassContext, check: bool, dump_ir) -> None:
        self.report, self.ctx, self.check, self.dump_ir = report, ctx, check, dump_ir
        self.program: Program | None = None
        self.outputs = None
        self.step = 0

    def start(self, program: Program) -> None:
        self.program = program
        self.stats = _totals(program)
        self.report.before = self.stats
        self.report.after = self.stats  # until a step changes it (an empty pipeline changes nothing)
        if self.check:
            self.outputs = run_program(program, program.example_inputs)
        if self.dump_ir is not None:
            os.makedirs(self.dump_ir, exist_ok=True)
            self._dump("input", program)

    def _dump(self, label: str, program: Program) -> str:
        path = os.path.join(os.fspath(self.dump_ir), f"{self.step:02d}-{label}.txt")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(program.text())
        os.replace(tmp, path)
        return path

    def convert(self) -> None:
        before = self.program
        t0 = time.perf_counter()
        after = convert_step(before)
        label = f"to-{after.level}"
        after = after.replace(history=before.history + (PassRecord(label, after.level),))
        # A conversion must not change what the program computes. Programs that round inside
        # (fixed-point activations) are the exception: float re-association across runtimes
        # (1e-7) can move a value across a rounding boundary, so there it is reported only.
        tolerance = None if ROUNDING_FACT in before.facts else CONVERSION_TOLERANCE
        self._finish(label, after.level, "", before, after, time.perf_counter() - t0, tolerance=tolerance)

    def apply(self, p: Pass) -> None:
        before = self.program
        self.ctx._begin(p)
        t0 = time.perf_counter()
        try:
            after = p.run(before, self.ctx)
        except SliverError:
            raise
        except Exception as e:  # a bug or an unexpected model: name the pass, keep one line
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PassError(f"pass {p.name!r} failed on {before.name}: {type(e).__name__}: {msg}") from e
        seconds = time.perf_counter() - t0
        if not isinstance(after, Program) or after.level != p.level:
            raise PassError(f"pass {p.name!r} did not return a {p.level}-level Program")
        facts = (after.facts - set(p.invalidates)) | set(p.provides)
        notes = self.ctx._end()
        record = PassRecord(p.name, p.level, p.text(), dict(notes))
        after = after.replace(facts=facts, history=before.history + (record,))
        self._finish(p.name, p.level, p.text(), before, after, seconds, p.check_tolerance, notes)

    def _finish(self, label, level, options, before, after, seconds, tolerance=None, notes=None) -> None:
        self.step += 1
        stats_after = _totals(after)
        step = StepReport(
            name=label,
            level=level,
            options=options,
            seconds=seconds,
            before=self.stats,
            after=stats_after,
            notes=dict(notes or {}),
        )
        if self.check and after.level != "tvm":
            outputs = run_program(after, after.example_inputs)
            diff = max_abs_diff(self.outputs, outputs)
            scale = max([1.0] + [float(abs(o).max()) for o in self.outputs if o.size])
            step.max_abs_diff = diff
            if tolerance is not None and diff > tolerance * scale:
                raise NumericalCheckError(
                    f"{label} changed the outputs of {after.name} by {diff:.3g} (allowed "
                    f"{tolerance:g} x {scale:.3g}); {label} must not change the results: please report it"
                )
            self.outputs = outputs
        if self.dump_ir is not None:
            step.ir_path = self._dump(label, after)
        self.report.steps.append(step)
        self.program, self.stats = after, stats_after
        self.report.after = stats_after


def _totals(program: Program) -> dict | None:
    if program.level == "tvm":
        return None
    return program.stats().totals()
