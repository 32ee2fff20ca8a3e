#!/usr/bin/env python3
"""Compile a model through a sliver pipeline to a deployable artifact.

    python tools/compile.py deit_tiny --pipeline fold-bn,cleanup --target x86 --out build/deit_tiny
    python tools/compile.py model.onnx --input-shape 1,3,224,224 --pipeline cleanup --out build/m
    python tools/compile.py tiny_deit --data digits --pipeline "evit{blocks=1,2 keep=0.7}" --out build/t
    python tools/compile.py tiny_deit --data digits --recipe int-vit-fpga --target x86,fpga --compare-dense --out build/t
    python tools/compile.py --list-passes
    python tools/compile.py --list-recipes

MODEL is a zoo name (``--list-models``) or the path of an ``.onnx`` file (never modified). OUT
receives ``model.onnx`` (the program after the pipeline), ``model.so`` + ``model.json`` (the TVM
artifact), ``report.json`` and, with ``--dump-ir``, ``ir/NN-<step>.txt``. With ``--keep-maps``
(after a token pass) it also receives ``keep_maps.png``: the patches each pruning stage kept, drawn
over a digit (a digit scene for 64x64 models) and scikit-image's astronaut photo.

``--recipe NAME`` is a named pipeline (``--list-recipes``, ``sliver.passes.recipes``): it expands to
its pipeline text, which the summary and ``report.json`` print back. ``--target x86,fpga`` builds
the x86 artifact and costs the same program on the FPGA model in one run; ``--compare-dense`` also
builds and costs the input model, so the summary shows CPU latency, FPGA latency and energy before
and after. The pipeline runs once, with one pass context built from the flags (``--data``,
``--seed``, progress, and an FPGA cost model from ``--accel``/``--bits`` for latency-aware options
such as ``heatvit{latency=0.5}``); IR dumps, keep maps and the accuracy guard are instruments on it.

With ``--data`` (``digits``, ``digit-scenes`` or an ``.npz`` path) the pipeline's passes receive
that data (splits ``train``/``val``/``calib``) for calibration and fine-tuning, and the model is
scored on ``--split`` before the pipeline, after every pass that may change its outputs, as the
exported program and as the built x86 artifact; the scores go into ``report.json`` under
``accuracy`` (``stages``: one row per scored step), next to the MACs. ``--max-drop POINTS`` stops
at the first pass that scores more than POINTS below the input model, with one line naming it. A tiny zoo model is then used with its
trained weights (trained once per machine under ``--seed`` and cached, see
``sliver.models.training.cached``); full-size zoo models have only random weights and are refused. OUT is written
atomically: it holds either the complete result or, on failure, whatever it held before.

Errors exit with code 2 and one line ``error: ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time

import numpy as np


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's default prints the usage too)
        sys.stderr.write(f"error: {message} (see --help)\n")
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="compile.py", description="Compile a model through a sliver pipeline.")
    p.add_argument("model", nargs="?", help="zoo model name or path of an .onnx file")
    p.add_argument("--pipeline", default=None, help='pass pipeline, e.g. "fold-bn,cleanup" (default: empty)')
    p.add_argument("--recipe", help="a named pipeline instead of --pipeline (--list-recipes)")
    p.add_argument(
        "--target",
        default="x86",
        help="x86: a TVM artifact for the host CPU (default); arm: a TVM artifact for aarch64 Linux "
        "with NEON (needs aarch64-linux-gnu-g++); fpga: a cycle-level cost report on --accel; "
        "x86,fpga (or arm,fpga): both for the same program",
    )
    p.add_argument("--accel", default="zcu102", help="FPGA accelerator preset for --target fpga (default: zcu102)")
    p.add_argument("--bits", type=int, default=8, help="bit width of float values on the FPGA model (default: 8)")
    p.add_argument(
        "--nonlinear",
        default="auto",
        choices=["auto", "exact", "poly"],
        help="FPGA nonlinear units; auto: poly after the poly-act pass, else exact",
    )
    p.add_argument("--out", help="output directory")
    p.add_argument("--input-shape", help="input shape, e.g. 1,3,224,224 (default: the model's own)")
    p.add_argument("--dump-ir", action="store_true", help="write the IR text after every step to OUT/ir/")
    p.add_argument(
        "--keep-maps",
        action="store_true",
        help="draw the token keep maps of each pruning stage over a digit and a photo into OUT/keep_maps.png",
    )
    p.add_argument(
        "--data",
        help="score before/after on this data and hand it to passes that calibrate or fine-tune: "
        "digits, digit-scenes or an .npz path (tiny zoo models then use their trained weights)",
    )
    p.add_argument("--max-drop", type=float, metavar="POINTS",
                   help="with --data: stop at the first pass that scores more than POINTS below the input model")
    p.add_argument("--compare-dense", action="store_true",
                   help="also build/cost the input model, for CPU latency and FPGA latency/energy before and after")
    p.add_argument("--split", default="test", help="split --data is scored on: train, val or test (default: test)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights of zoo models, example inputs and passes")
    p.add_argument("--no-check", action="store_true", help="skip the per-pass numerical checks")
    p.add_argument("--list-passes", action="store_true", help="list the passes and their options, then exit")
    p.add_argument("--list-models", action="store_true", help="list the zoo models, then exit")
    p.add_argument("--list-recipes", action="store_true", help="list the recipes (named pipelines), then exit")
    p.add_argument("--quiet", action="store_true", help="print only the summary (no progress lines)")
    p.add_argument(
        "--progress", action="store_true", help="print progress lines even when stderr is not a terminal"
    )
    return p


def _say(args, msg: str) -> None:
    if _show_progress(args):
        print(f"[sliver] {msg}", file=sys.stderr, flush=True)


def list_passes() -> str:
    from sliver import passes

    lines = []
    for name, cls in passes.registered().items():
        lines.append(f"{name}  ({cls.level} level) {cls.summary}")
        if cls.requires:
            lines.append(f"    requires: {', '.join(cls.requires)}")
        if cls.provides:
            lines.append(f"    provides: {', '.join(cls.provides)}")
        if cls.conflicts:
            lines.append(f"    refused after: {', '.join(cls.conflicts)}")
        for opt, ty, default, doc in passes.option_docs(cls):
            lines.append(f"    {opt}: {ty}, default {default}. {doc}".rstrip())
    return "\n".join(lines)


def parse_shape(text: str) -> tuple:
    from sliver.ir.errors import ModelInputError

    pieces = text.replace("x", ",").split(",")
    shape = tuple(int(s) for s in pieces) if all(s.strip().isdigit() for s in pieces) else ()
    if not shape or any(d <= 0 for d in shape):
        raise ModelInputError(f"--input-shape {text!r} is not a shape; write it like 1,3,224,224")
    return shape


def load_model(args):
    """(program, torch_module or None) for MODEL."""
    import torch

    from sliver import ir, models
    from sliver.ir.errors import ModelInputError

    shape = parse_shape(args.input_shape) if args.input_shape else None
    looks_like_path = args.model.endswith(".onnx") or os.sep in args.model or os.path.exists(args.model)
    if looks_like_path:
        if not os.path.exists(args.model):
            raise ModelInputError(f"no such file: {args.model}")
        program = ir.load_onnx(args.model, input_shapes=shape, seed=args.seed)
        return program, None
    if args.model not in models.available():
        models.create(args.model)  # raises the zoo's error naming the models there are
    if args.data:
        net = _trained(args)
    else:
        torch.manual_seed(args.seed)
        net = models.create(args.model)
    shape = shape or models.input_shape(args.model)
    example = torch.from_numpy(np.random.default_rng(args.seed).standard_normal(shape).astype(np.float32))
    return ir.trace(net, example, name=args.model), net


def _trained(args):
    """The zoo model's trained weights for ``--data`` (trained and cached on first use)."""
    from sliver.ir.errors import ModelInputError
    from sliver.models import training

    if args.model not in training.DEFAULTS:
        raise ModelInputError(
            f"--data scores trained weights, but zoo model {args.model!r} has only random ones; "
            f"use a tiny model ({', '.join(training.DEFAULTS)}) or an .onnx file of your own"
        )
    config = training.config_for(args.model, seed=args.seed)
    named = args.data.replace("_", "-")
    if named in ("digits", "digit-scenes") and named != config.dataset:
        raise ModelInputError(f"{args.model} is trained on {config.dataset}; use --data {config.dataset}")
    _say(args, f"loading trained {args.model} (training it first if this machine has no checkpoint)")
    net, _ = training.cached(args.model, seed=args.seed, progress=_show_progress(args))
    return net


def load_data(args):
    """The pass context's data for ``--data``: ``{"train", "val", "calib"}`` (a named set) or the
    one set in an ``.npz`` file for all three; the split to score is checked here, before any work."""
    from sliver.models import data as datasets

    if not args.data:
        return None
    datasets.check_split(args.split, args.data)
    if args.split == "calib":
        from sliver.ir.errors import DataError

        raise DataError("--split calib is the calibration subset of train; score on train, val or test")
    return datasets.context_data(args.data)


def _show_progress(args) -> bool:
    return not args.quiet and (args.progress or sys.stderr.isatty())


@contextlib.contextmanager
def staged_output(out: str):
    """Yield a staging directory beside ``out``; on success it replaces ``out`` whole."""
    out = os.path.abspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        from sliver.ir.errors import ModelInputError

        raise ModelInputError(f"--out {out} exists and is not a directory")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    stage = os.path.join(parent, f".{os.path.basename(out)}.tmp-{os.getpid()}")
    shutil.rmtree(stage, ignore_errors=True)
    os.makedirs(stage)
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    old = os.path.join(parent, f".{os.path.basename(out)}.old-{os.getpid()}")
    if os.path.exists(out):
        os.replace(out, old)
    os.replace(stage, out)
    shutil.rmtree(old, ignore_errors=True)


def _write_atomic(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


TARGETS = ("x86", "arm", "fpga")


def parse_targets(text: str) -> list:
    """``--target``: one of x86, arm, fpga, or a CPU target and fpga joined by a comma."""
    from sliver.ir.errors import ModelInputError

    targets = [t.strip() for t in text.split(",")]
    if any(t not in TARGETS for t in targets) or len(set(targets)) != len(targets) or \
            sum(t != "fpga" for t in targets) > 1:
        raise ModelInputError(f"--target {text!r}: give x86, arm or fpga, or one of x86/arm with fpga (x86,fpga)")
    return targets


def pipeline_of(args):
    """(Pipeline, recipe name or None) from ``--pipeline`` or ``--recipe`` (not both)."""
    from sliver import passes
    from sliver.ir.errors import ModelInputError

    if args.recipe is not None:
        if args.pipeline is not None:
            raise ModelInputError("give --recipe or --pipeline, not both (a recipe is a pipeline: --list-recipes)")
        return passes.recipes.parse(args.recipe), args.recipe
    return passes.parse(args.pipeline or ""), None


def build_context(args, data):
    """The one pass context of the run, from the flags: data, seed, progress and the FPGA cost
    model of ``--accel``/``--bits`` (for latency-aware options such as ``heatvit{latency=...}``)."""
    from sliver import passes
    from sliver.backends import fpga

    return passes.PassContext(data=data, seed=args.seed, progress=_show_progress(args),
                              cost_model=fpga.CostModel(accel=args.accel, bits=args.bits))


def compile_model(args) -> dict:
    from sliver.ir import tvm_level
    from sliver.ir.errors import ModelInputError

    if not args.model:
        raise ModelInputError("no MODEL given: name a zoo model (--list-models) or an .onnx file")
    if not args.out:
        raise ModelInputError("no --out directory given")
    targets = parse_targets(args.target)
    pipeline, recipe = pipeline_of(args)
    if args.max_drop is not None and not args.data:
        raise ModelInputError("--max-drop needs --data: the accuracy guard scores every stage on it")
    data = load_data(args)
    ctx = build_context(args, data)
    t0 = time.perf_counter()
    _say(args, f"loading {args.model}")
    program, net = load_model(args)
    pipeline.validate(program.level, program.facts)
    cpu = next((t for t in targets if t != "fpga"), None)
    if program.level == "onnx" and cpu is not None:
        tvm_level.check_importable(program)  # fail before any work, not after the passes
    reference_outputs = program.run()
    report = {"model": args.model, "target": args.target, "seed": args.seed, "pipeline": str(pipeline)}
    if recipe is not None:
        report["recipe"] = recipe
    with staged_output(args.out) as stage:
        _say(args, f"running pipeline {str(pipeline) or '(empty)'}")
        instruments = _instruments(args, stage)
        result = pipeline.run(program, ctx, check=not args.no_check,
                              dump_ir=os.path.join(stage, "ir") if args.dump_ir else None,
                              lower_to="onnx", instruments=list(instruments.values()))
        if "keep_maps" in instruments:
            report["keep_maps"] = {"file": "keep_maps.png", "kept_per_stage": instruments["keep_maps"].kept}
        final = result.program
        _write_atomic(os.path.join(stage, "model.onnx"), final.module.SerializeToString())
        report.update(
            {
                "input_shapes": [list(s) for s in final.input_shapes],
                "steps": result.report.to_dict()["steps"],
                "before": result.report.before,
                "after": result.report.after,
                "integer_only": "integer-only" in final.facts,
                "files": {"onnx": "model.onnx", "ir": "ir/" if args.dump_ir else None},
            }
        )
        dense = _dense_onnx(program) if args.compare_dense else None
        artifact = None
        if "fpga" in targets:
            report.update(_cost_on_fpga(args, final, stage, dense))
        if cpu is not None:
            built, artifact = _build_with_tvm(args, cpu, final, stage, reference_outputs, dense)
            report.update(built)
        if data is not None:
            report["accuracy"] = _score(args, instruments["accuracy"], artifact)
        report["total_seconds"] = time.perf_counter() - t0
        _write_atomic(os.path.join(stage, "report.json"), json.dumps(report, indent=2).encode())
    return report


def _instruments(args, stage) -> dict:
    """The caller's instruments on the one pipeline run: the accuracy guard (with ``--data``) and
    the keep maps (``--keep-maps``). Timing, checks and IR dumps are the runner's own."""
    instruments = {}
    if args.data:
        from sliver.backends.evaluate import AccuracyGuard

        instruments["accuracy"] = AccuracyGuard(args.data, args.split, max_drop=args.max_drop)
    if args.keep_maps:
        from sliver.passes.tokens.keep_maps import KeepMaps

        instruments["keep_maps"] = KeepMaps(os.path.join(stage, "keep_maps.png"))
    return instruments


def _dense_onnx(program):
    """The input model at the onnx level (for ``--compare-dense``), converted as the pipeline would."""
    from sliver.ir.convert import convert_step

    while program.level != "onnx":
        program = convert_step(program)
    return program


def _cpu_latency_ms(artifact, inputs, repeat: int = 20) -> float:
    """Median wall time of one run of ``artifact`` on this machine (after two warm-up runs)."""
    import statistics

    run = artifact.runner()
    for _ in range(2):
        run(inputs)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        run(inputs)
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def _build_with_tvm(args, target, final, stage, reference_outputs, dense=None) -> dict:
    """Build the TVM artifact into ``stage`` and check it against the references; on the host,
    time it (and, with ``dense``, a build of the input model too)."""
    from sliver import backends
    from sliver.ir.runtime import max_abs_diff

    _say(args, f"building with TVM for {target}")
    tb = time.perf_counter()
    with _quiet_native_stderr():  # TVM's C++ warnings are not for users
        artifact = backends.tvm.build(final, target=target)
        build_seconds = time.perf_counter() - tb
        paths = artifact.save(stage)
    tvm_outputs, check = None, {}
    if backends.tvm.is_host(artifact.target):
        tvm_outputs = artifact.run(final.example_inputs)
        check["method"] = "run on this machine"
    else:
        # a cross-compiled artifact: its ELF architecture and TVM entry symbols are always
        # checked; it also runs under qemu-user when `make setup-arm` has installed the tools
        check["library"] = backends.tvm.check_library(paths["library"], artifact.target)
        reason = _qemu_unavailable(backends.tvm, final)
        if reason is None:
            _say(args, "running the aarch64 artifact under qemu-user (correctness only)")
            tvm_outputs = backends.tvm.run_with_qemu(stage, final.example_inputs)
            check["method"] = "run under qemu-aarch64-static with backends/runner/run_model (timings meaningless)"
        else:
            check["method"] = "static: ELF architecture and exported symbols only; outputs not compared"
            check["not_run_because"] = reason
    if tvm_outputs is not None:
        diffs = {
            "tvm_vs_onnxruntime": max_abs_diff(tvm_outputs, final.run()),
            "tvm_vs_input_model": max_abs_diff(tvm_outputs, reference_outputs),
        }
    else:
        diffs = None
    latency = None
    if backends.tvm.is_host(artifact.target):
        _say(args, "timing the artifact on this machine")
        latency = {"after_ms": _cpu_latency_ms(artifact, final.example_inputs)}
        if dense is not None:
            with _quiet_native_stderr():
                dense_artifact = backends.tvm.build(dense, target=target)
            latency["before_ms"] = _cpu_latency_ms(dense_artifact, dense.example_inputs)
    return {
        "cpu_latency": latency,
        "tvm_target": artifact.target,
        "tvm_build_seconds": build_seconds,
        "check": check,
        "max_abs_diff": diffs,
        "artifact": {"library": os.path.basename(paths["library"]), "description": os.path.basename(paths["description"])},
    }, artifact


def _qemu_unavailable(tvm_backend, final) -> str | None:
    """Why the aarch64 artifact cannot run here under qemu (None when it can)."""
    missing = tvm_backend.missing_arm_tools()
    if missing:
        return f"missing {', '.join(missing)} (make setup-arm installs them)"
    try:
        tvm_backend.arm_runtime(fetch=False)
    except Exception as e:
        return str(e)
    if len(final.example_inputs) != 1 or str(final.example_inputs[0].dtype) != "float32":
        return "the aarch64 runner takes one float32 input"
    return None


def _score(args, guard, artifact) -> dict:
    """Accuracy / mIoU before and after the pipeline (from the accuracy guard, which scored every
    stage during the run) and of the host artifact, on ``--split``."""
    from sliver import backends
    from sliver.backends.evaluate import score

    first, last = guard.first, guard.last
    result = {"split": args.split, "dataset": first.dataset, "metric": first.metric, "before": first.value,
              "after": last.value, "change": last.value - first.value,
              "levels": {"before": first.level, "after": last.level}, "count": first.count,
              "stages": guard.stages}
    if artifact is not None and backends.tvm.is_host(artifact.target):
        _say(args, f"scoring the artifact on {args.data} {args.split}")
        result["tvm"] = score(artifact, args.split, data=args.data).value
    return result


def _cost_on_fpga(args, final, stage, dense=None) -> dict:
    """Cost the final program on the FPGA model; writes fpga_report.json and fpga_layers.png.
    With ``dense`` (the input model at the onnx level) it is costed too, with exact nonlinear units."""
    from sliver.backends import fpga

    nonlinear = args.nonlinear
    if nonlinear == "auto":
        nonlinear = "poly" if "poly-act" in final.facts else "exact"
    _say(args, f"costing on the {args.accel} model at {args.bits} bits ({nonlinear} nonlinear units)")
    fpga_report = fpga.cost(final, accel=args.accel, bits=args.bits, nonlinear=nonlinear)
    fpga_report.save(stage)
    totals = fpga_report.to_dict()["totals"]
    extra = {}
    if dense is not None:
        before = fpga.cost(dense, accel=args.accel, bits=args.bits, nonlinear="exact").totals()
        extra["fpga_before"] = {k: before[k] for k in ("latency_ms", "energy_mj", "macs", "cycles")}
    return {**extra, "fpga": {"accel": args.accel, "bits": args.bits, "nonlinear": nonlinear, **totals},
            "fpga_summary": fpga_report.summary(),
            "fpga_files": ["fpga_report.json", "fpga_layers.png"]}


@contextlib.contextmanager
def _quiet_native_stderr():
    """Silence TVM's C++ log lines (``Warning: Scope Saving``) while it builds and writes."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _change(before, after) -> str:
    return f"{100.0 * (after - before) / before:+.1f}%" if before else "n/a"


def summary(report: dict, out: str) -> str:
    b, a = report["before"], report["after"]
    targets = report["target"].split(",")
    steps = " | ".join(f"{s['name']} {s['seconds']:.2f}s" for s in report["steps"]) or "(none)"
    where = []
    if "tvm_target" in report:
        where.append(f"{targets[0] if targets[0] != 'fpga' else targets[-1]}, {report['tvm_target'].get('mcpu', 'generic')}")
    if "fpga" in report:
        where.append(f"fpga, {report['fpga']['accel']}, {report['fpga']['bits']}-bit")
    recipe = f"  (recipe {report['recipe']})" if "recipe" in report else ""
    lines = [
        f"sliver: {report['model']} -> {out} ({'; '.join(where)})",
        f"  pipeline  {report['pipeline'] or '(empty)'}{recipe}",
        f"  MACs      {b['macs'] / 1e9:.4f} G -> {a['macs'] / 1e9:.4f} G ({_change(b['macs'], a['macs'])})"
        f"   params {b['params'] / 1e6:.3f} M -> {a['params'] / 1e6:.3f} M"
        + ("   integer-only" if report.get("integer_only") else ""),
    ]
    if "accuracy" in report:
        acc = report["accuracy"]
        unit = "%" if acc["metric"] == "accuracy" else "% mIoU"
        tvm = f", TVM artifact {acc['tvm']:.2f}{unit}" if "tvm" in acc else ""
        lines.append(f"  {acc['metric']:<9} {acc['before']:.2f}{unit} -> {acc['after']:.2f}{unit} "
                     f"({acc['change']:+.2f} pt) on {acc['dataset']}{tvm}")
        stages = [f"{st['step']} {st['value']:.2f}" for st in acc.get("stages", [])[1:]]
        if stages:
            lines.append(f"  stages    {' | '.join(stages)}")
    latency = report.get("cpu_latency")
    if latency:
        before = f"{latency['before_ms']:.3f} ms -> " if "before_ms" in latency else ""
        change = f" ({_change(latency['before_ms'], latency['after_ms'])})" if "before_ms" in latency else ""
        lines.append(f"  CPU       {before}{latency['after_ms']:.3f} ms{change} per image, TVM artifact on this machine")
    if "fpga" in report:
        f = report["fpga"]
        fb = report.get("fpga_before")
        if fb:
            lines.append(f"  FPGA      {fb['latency_ms']:.4f} ms -> {f['latency_ms']:.4f} ms "
                         f"({_change(fb['latency_ms'], f['latency_ms'])}), energy {fb['energy_mj']:.4f} mJ -> "
                         f"{f['energy_mj']:.4f} mJ ({_change(fb['energy_mj'], f['energy_mj'])})")
    ir_dir = ", ir/" if report["files"]["ir"] else ""
    lines.append(f"  steps     {steps}" + (f" | tvm-build {report['tvm_build_seconds']:.2f}s" if "tvm_build_seconds" in report else ""))
    if "fpga" in report:
        lines.append("  fpga      " + report["fpga_summary"].replace("\n", "\n            "))
    written = [os.path.join(out, "model.onnx")]
    if "tvm_target" in report:
        diff = report["max_abs_diff"]
        if diff is None:
            lib = report["check"]["library"]
            check = (f"{lib['machine']} ELF with {lib['kernels']} kernels and the VM executable; not run: "
                     f"{report['check']['not_run_because']}")
        else:
            where = " (under qemu)" if "library" in report["check"] else ""
            exact = ", bit-exact" if report.get("integer_only") and diff["tvm_vs_onnxruntime"] == 0 else ""
            check = (f"max|TVM - ONNX Runtime|{where} {diff['tvm_vs_onnxruntime']:.2e}{exact}, "
                     f"max|TVM - input model| {diff['tvm_vs_input_model']:.2e}")
        lines.append(f"  check     {check}")
        written += ["model.so", "model.json"]
    if "fpga" in report:
        written += ["fpga_report.json", "fpga_layers.png"]
    lines.append(f"  wrote     {', '.join(written)}, report.json{ir_dir}")
    if "keep_maps" in report:
        kept = "; ".join(f"{name} {'/'.join(map(str, counts))}" for name, counts in report["keep_maps"]["kept_per_stage"].items())
        lines.append(f"  keep maps {os.path.join(out, 'keep_maps.png')} (patches kept per stage: {kept})")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from sliver.ir.errors import SliverError

    try:
        if args.list_passes:
            print(list_passes())
            return 0
        if args.list_recipes:
            from sliver import passes

            print(passes.recipes.describe())
            return 0
        if args.list_models:
            from sliver import models

            for name, desc in models.available().items():
                print(f"{name:<20}{desc}")
            return 0
        report = compile_model(args)
    except SliverError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(summary(report, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
