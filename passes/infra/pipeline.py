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
from ...ir.program import LEVELS, PassRecord, Program, level_index
from ...ir.runtime import max_abs_diff, run_program
from .base import Pass, get_pass, providers_of
from .context import PassContext
from .facts import ROUNDING_FACT
from .report import Report, StepReport

#: largest output change allowed for a level conversion, relative to the output magnitude
CONVERSION_TOLERANCE = 1e-4

#: "not given" for the keyword arguments of Pipeline.run that build a context
_UNSET = object()

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
        """Check the order before anything runs: levels only go down, every fact a pass requires
        is provided by the program or an earlier pass, and no fact a pass refuses holds.
        A refusal is one line naming the pass, the earlier pass that is the reason, and the order
        that works."""
        current = level_index(level)
        lowered_by = None  # (index, name) of the pass that took the program to the current level
        have = {fact: None for fact in facts}  # fact -> (index, name) of the pass that provided it
        for i, p in enumerate(self.passes):
            if level_index(p.level) < current:
                if lowered_by is None:
                    raise PassOrderError(
                        f"pass {p.name!r} (#{i + 1}) runs at the {p.level} level, but the program is already "
                        f"at the {_level_name(current)} level there; a {p.level}-level pass needs a "
                        f"{p.level}-level model (for torch: a zoo model or a traced nn.Module)"
                    )
                k, name = lowered_by
                raise PassOrderError(
                    f"pass {p.name!r} (#{i + 1}) runs at the {p.level} level, but the program is already "
                    f"at the {_level_name(current)} level there (after {name!r}, #{k + 1}); put {p.name} before {name}"
                )
            if level_index(p.level) > current:
                lowered_by = (i, p.name)
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
                    source = have[fact]
                    if source is None:
                        raise PassOrderError(
                            f"pass {p.name!r} (#{i + 1}) cannot run on a program that is already {fact!r}; "
                            f"{fix or f'run {p.name} on the model before that'}"
                        )
                    k, name = source
                    raise PassOrderError(
                        f"pass {p.name!r} (#{i + 1}) cannot run after {name!r} (#{k + 1}), which made the "
                        f"program {fact!r}; {fix or f'put {p.name} before {name}'}"
                    )
            for fact in p.invalidates:
                have.pop(fact, None)
            for fact in p.provides:
                have.setdefault(fact, (i, p.name))

    # -- running ----------------------------------------------------------------------------
    def run(
        self,
        program: Program,
        ctx: PassContext | None = None,
        *,
        data=_UNSET,
        seed=_UNSET,
        progress=_UNSET,
        check: bool = True,
        dump_ir: str | os.PathLike | None = None,
        lower_to: str | None = None,
        instruments: Sequence["Instrument"] = (),
    ) -> "PipelineResult":
        """Validate, then run every pass in order on ``program``.

        The context is built once, by the caller: pass ``ctx`` (a :class:`PassContext`, e.g. with a
        cost model), or the keyword arguments ``data``, ``seed`` and ``progress`` that build one;
        giving both is an error (the keywords would otherwise be ignored).

        Levels are converted automatically where a pass needs a lower one (and at the end to
        ``lower_to`` if given). Every step (pass or level conversion) goes through the
        instruments, before and after it: :class:`Timing` and the statistics always; with
        ``check``, :class:`NumericalCheck` (the largest output change against the previous
        program on the example inputs, enforced for passes that declare a tolerance); with
        ``dump_ir``, :class:`DumpIR` (the IR text after each step in ``dump_ir/NN-<step>.txt``);
        then the caller's ``instruments`` in the order given.
        """
        if not isinstance(program, Program):
            raise SliverError(f"Pipeline.run() takes a sliver Program, got {type(program).__name__}")
        given = [name for name, value in (("data", data), ("seed", seed), ("progress", progress)) if value is not _UNSET]
        if ctx is None:
            ctx = PassContext(
                data=None if data is _UNSET else data,
                seed=0 if seed is _UNSET else seed,
                progress=False if progress is _UNSET else progress,
            )
        elif not isinstance(ctx, PassContext):
            raise SliverError(f"Pipeline.run() takes a PassContext as ctx, got {type(ctx).__name__}")
        elif given:
            raise SliverError(
                f"Pipeline.run() got a context and {', '.join(g + '=' for g in given)}: put {' and '.join(given)} into the "
                "PassContext, or drop ctx and pass them as keywords"
            )
        for inst in instruments:
            if not isinstance(inst, Instrument):
                raise SliverError(f"instruments are sliver.passes.Instrument objects, got {type(inst).__name__}")
        self.validate(program.level, program.facts)
        if lower_to is not None and level_index(lower_to) < level_index(
            self.passes[-1].level if self.passes else program.level
        ):
            raise PassOrderError(f"cannot end at the {lower_to} level after a lower-level pass")
        chain: list = [Timing()]
        if check:
            chain.append(NumericalCheck())
        if dump_ir is not None:
            chain.append(DumpIR(dump_ir))
        chain.extend(instruments)
        report = Report(pipeline=str(self), seed=ctx.seed)
        runner = _Runner(report, ctx, chain)
        runner.start(program)
        for p in self.passes:
            while runner.program.level != p.level:
                runner.convert()
            runner.apply(p)
        if lower_to is not None:
            while runner.program.level != lower_to:
                runner.convert()
        runner.finish()
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


# -- instruments ------------------------------------------------------------------------------
class Instrument:
    """Something that watches a pipeline run: called before and after every step (a pass or a
    level conversion). Subclass it and override what you need; raise a
    :class:`~sliver.ir.errors.SliverError` from :meth:`after` to stop the pipeline.

    - ``start(program, report)``: once, with the input program;
    - ``before(name, program)``: before a step named ``name`` (the pass name, or ``to-<level>``);
    - ``after(step, before, after)``: after it, with its :class:`StepReport` (fill fields or
      ``step.notes``) and the programs before and after it (``after`` carries the step's facts
      and history; ``step.lossy`` says whether the step may change outputs);
    - ``finish(program, report)``: once, with the final program.
    """

    def start(self, program: Program, report: Report) -> None:
        pass

    def before(self, name: str, program: Program) -> None:
        pass

    def after(self, step: StepReport, before: Program, after: Program) -> None:
        pass

    def finish(self, program: Program, report: Report) -> None:
        pass


class Timing(Instrument):
    """Wall time of each step (``step.seconds``), the pass's own work and any instrument before it."""

    def before(self, name, program):
        self._t0 = time.perf_counter()

    def after(self, step, before, after):
        step.seconds = time.perf_counter() - self._t0


class NumericalCheck(Instrument):
    """The largest output change of each step on the example inputs (``step.max_abs_diff``),
    enforced (:class:`~sliver.ir.errors.NumericalCheckError`) for steps with a tolerance."""

    def start(self, program, report):
        self.outputs = run_program(program, program.example_inputs)

    def after(self, step, before, after):
        if after.level == "tvm":
            return
        outputs = run_program(after, after.example_inputs)
        diff = max_abs_diff(self.outputs, outputs)
        scale = max([1.0] + [float(abs(o).max()) for o in self.outputs if o.size])
        step.max_abs_diff = diff
        tolerance = step.tolerance
        if tolerance is not None and diff > tolerance * scale:
            raise NumericalCheckError(
                f"{step.name} changed the outputs of {after.name} by {diff:.3g} (allowed "
                f"{tolerance:g} x {scale:.3g}); {step.name} must not change the results: please report it"
            )
        self.outputs = outputs


class DumpIR(Instrument):
    """The IR text of the input and after every step, in ``directory/NN-<step>.txt``
    (``step.ir_path``); each file is written atomically."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = os.fspath(directory)
        self.index = 0

    def start(self, program, report):
        os.makedirs(self.directory, exist_ok=True)
        self._dump("input", program)

    def after(self, step, before, after):
        self.index += 1
        step.ir_path = self._dump(step.name, after)

    def _dump(self, label: str, program: Program) -> str:
        path = os.path.join(self.directory, f"{self.index:02d}-{label}.txt")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(program.text())
        os.replace(tmp, path)
        return path


class _Runner:
    """Runs steps one by one through the instruments and records what each did."""

    def __init__(self, report: Report, ctx: PassContext, instruments: list) -> None:
        self.report, self.ctx, self.instruments = report, ctx, instruments
        self.program: Program | None = None

    def start(self, program: Program) -> None:
        self.program = program
        self.stats = _totals(program)
        self.report.before = self.stats
        self.report.after = self.stats  # until a step changes it (an empty pipeline changes nothing)
        for inst in self.instruments:
            inst.start(program, self.report)

    def finish(self) -> None:
        for inst in self.instruments:
            inst.finish(self.program, self.report)

    def _before(self, name: str) -> None:
        for inst in self.instruments:
            inst.before(name, self.program)

    def convert(self) -> None:
        before = self.program
        label = f"to-{LEVELS[level_index(before.level) + 1]}"
        self._before(label)
        after = convert_step(before)
        label = f"to-{after.level}"
        after = after.replace(history=before.history + (PassRecord(label, after.level),))
        # A conversion must not change what the program computes. Programs that round inside
        # (fixed-point activations) are the exception: float re-association across runtimes
        # (1e-7) can move a value across a rounding boundary, so there it is reported only.
        tolerance = None if ROUNDING_FACT in before.facts else CONVERSION_TOLERANCE
        self._finish(label, after.level, "", before, after, tolerance=tolerance, lossy=False)

    def apply(self, p: Pass) -> None:
        before = self.program
        self._before(p.name)
        self.ctx._begin(p)
        try:
            after = p.run(before, self.ctx)
        except SliverError:
            raise
        except Exception as e:  # a bug or an unexpected model: name the pass, keep one line
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PassError(f"pass {p.name!r} failed on {before.name}: {type(e).__name__}: {msg}") from e
        if not isinstance(after, Program) or after.level != p.level:
            raise PassError(f"pass {p.name!r} did not return a {p.level}-level Program")
        facts = (after.facts - set(p.invalidates)) | set(p.provides)
        notes = self.ctx._end()
        record = PassRecord(p.name, p.level, p.text(), dict(notes))
        after = after.replace(facts=facts, history=before.history + (record,))
        self._finish(p.name, p.level, p.text(), before, after, p.check_tolerance, notes,
                     lossy=p.check_tolerance is None)

    def _finish(self, label, level, options, before, after, tolerance=None, notes=None, lossy=False) -> None:
        stats_after = _totals(after)
        step = StepReport(
            name=label,
            level=level,
            options=options,
            seconds=0.0,
            before=self.stats,
            after=stats_after,
            notes=dict(notes or {}),
            tolerance=tolerance,
            lossy=lossy,
        )
        for inst in self.instruments:
            inst.after(step, before, after)
        self.report.steps.append(step)
        self.program, self.stats = after, stats_after
        self.report.after = stats_after


def _totals(program: Program) -> dict | None:
    if program.level == "tvm":
        return None
    return program.stats().totals()
