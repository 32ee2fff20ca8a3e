#!/usr/bin/env python3
"""Compile a model through a sliver pipeline to a deployable artifact.

    python tools/compile.py deit_tiny --pipeline fold-bn,cleanup --target x86 --out build/deit_tiny
    python tools/compile.py model.onnx --input-shape 1,3,224,224 --pipeline cleanup --out build/m
    python tools/compile.py --list-passes

MODEL is a zoo name (``--list-models``) or the path of an ``.onnx`` file (never modified). OUT
receives ``model.onnx`` (the program after the pipeline), ``model.so`` + ``model.json`` (the TVM
artifact), ``report.json`` and, with ``--dump-ir``, ``ir/NN-<step>.txt``. OUT is written
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
    p.add_argument("--pipeline", default="", help='pass pipeline, e.g. "fold-bn,cleanup" (default: empty)')
    p.add_argument(
        "--target",
        default="x86",
        choices=["x86", "arm", "fpga"],
        help="x86: a TVM artifact for the host CPU (default); arm: a TVM artifact for aarch64 Linux "
        "with NEON (needs aarch64-linux-gnu-g++); fpga: a cycle-level cost report on --accel",
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
    p.add_argument("--seed", type=int, default=0, help="seed for weights of zoo models, example inputs and passes")
    p.add_argument("--no-check", action="store_true", help="skip the per-pass numerical checks")
    p.add_argument("--list-passes", action="store_true", help="list the passes and their options, then exit")
    p.add_argument("--list-models", action="store_true", help="list the zoo models, then exit")
    p.add_argument("--quiet", action="store_true", help="print only the summary (no progress lines)")
    p.add_argument(
        "--progress", action="store_true", help="print progress lines even when stderr is not a terminal"
    )
    return p


def _say(args, msg: str) -> None:
    if not args.quiet and (args.progress or sys.stderr.isatty()):
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
    torch.manual_seed(args.seed)
    net = models.create(args.model)
    shape = shape or models.input_shape(args.model)
    example = torch.from_numpy(np.random.default_rng(args.seed).standard_normal(shape).astype(np.float32))
    return ir.trace(net, example, name=args.model), net


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


def compile_model(args) -> dict:
    from sliver import passes
    from sliver.ir import tvm_level
    from sliver.ir.errors import ModelInputError

    if not args.model:
        raise ModelInputError("no MODEL given: name a zoo model (--list-models) or an .onnx file")
    if not args.out:
        raise ModelInputError("no --out directory given")
    pipeline = passes.parse(args.pipeline)
    t0 = time.perf_counter()
    _say(args, f"loading {args.model}")
    program, net = load_model(args)
    pipeline.validate(program.level, program.facts)
    if program.level == "onnx" and args.target != "fpga":
        tvm_level.check_importable(program)  # fail before any work, not after the passes
    reference_outputs = program.run()
    report = {"model": args.model, "target": args.target, "seed": args.seed, "pipeline": str(pipeline)}
    with staged_output(args.out) as stage:
        _say(args, f"running pipeline {str(pipeline) or '(empty)'}")
        result = pipeline.run(
            program,
            seed=args.seed,
            check=not args.no_check,
            dump_ir=os.path.join(stage, "ir") if args.dump_ir else None,
            lower_to="onnx",
            progress=not args.quiet and (args.progress or sys.stderr.isatty()),
        )
        final = result.program
        _write_atomic(os.path.join(stage, "model.onnx"), final.module.SerializeToString())
        report.update(
            {
                "input_shapes": [list(s) for s in final.input_shapes],
                "steps": result.report.to_dict()["steps"],
                "before": result.report.before,
                "after": result.report.after,
                "files": {"onnx": "model.onnx", "ir": "ir/" if args.dump_ir else None},
            }
        )
        if args.target == "fpga":
            report.update(_cost_on_fpga(args, final, stage))
        else:
            report.update(_build_with_tvm(args, final, stage, reference_outputs))
        report["total_seconds"] = time.perf_counter() - t0
        _write_atomic(os.path.join(stage, "report.json"), json.dumps(report, indent=2).encode())
    return report


def _build_with_tvm(args, final, stage, reference_outputs) -> dict:
    """Build the TVM artifact into ``stage`` and check it against the references."""
    from sliver import backends
    from sliver.ir.runtime import max_abs_diff

    _say(args, f"building with TVM for {args.target}")
    tb = time.perf_counter()
    with _quiet_native_stderr():  # TVM's C++ warnings are not for users
        artifact = backends.tvm.build(final, target=args.target)
        build_seconds = time.perf_counter() - tb
        paths = artifact.save(stage)
    if backends.tvm.is_host(artifact.target):
        tvm_outputs = artifact.run(final.example_inputs)
        ort_outputs = final.run()
        diffs = {
            "tvm_vs_onnxruntime": max_abs_diff(tvm_outputs, ort_outputs),
            "tvm_vs_input_model": max_abs_diff(tvm_outputs, reference_outputs),
        }
    else:  # a cross-compiled artifact runs on its device (backends/runner/README.md)
        diffs = {"tvm_vs_onnxruntime": float("nan"), "tvm_vs_input_model": float("nan")}
    return {
        "tvm_target": artifact.target,
        "tvm_build_seconds": build_seconds,
        "max_abs_diff": diffs,
        "artifact": {"library": os.path.basename(paths["library"]), "description": os.path.basename(paths["description"])},
    }


def _cost_on_fpga(args, final, stage) -> dict:
    """Cost the final program on the FPGA model; writes fpga_report.json and fpga_layers.png."""
    from sliver.backends import fpga

    nonlinear = args.nonlinear
    if nonlinear == "auto":
        nonlinear = "poly" if "poly-act" in final.facts else "exact"
    _say(args, f"costing on the {args.accel} model at {args.bits} bits ({nonlinear} nonlinear units)")
    fpga_report = fpga.cost(final, accel=args.accel, bits=args.bits, nonlinear=nonlinear)
    fpga_report.save(stage)
    totals = fpga_report.to_dict()["totals"]
    return {"fpga": {"accel": args.accel, "bits": args.bits, "nonlinear": nonlinear, **totals},
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


def summary(report: dict, out: str) -> str:
    b, a = report["before"], report["after"]
    change = 100.0 * (a["macs"] - b["macs"]) / b["macs"] if b["macs"] else 0.0
    steps = " | ".join(f"{s['name']} {s['seconds']:.2f}s" for s in report["steps"]) or "(none)"
    if report["target"] == "fpga":
        where = f"fpga, {report['fpga']['accel']}, {report['fpga']['bits']}-bit"
    else:
        where = f"{report['target']}, {report['tvm_target'].get('mcpu', 'generic')}"
    lines = [
        f"sliver: {report['model']} -> {out} ({where})",
        f"  pipeline  {report['pipeline'] or '(empty)'}",
        f"  MACs      {b['macs'] / 1e9:.4f} G -> {a['macs'] / 1e9:.4f} G ({change:+.1f}%)"
        f"   params {b['params'] / 1e6:.3f} M -> {a['params'] / 1e6:.3f} M",
    ]
    ir_dir = ", ir/" if report["files"]["ir"] else ""
    if report["target"] == "fpga":
        lines += [
            f"  steps     {steps}",
            "  fpga      " + report["fpga_summary"].replace("\n", "\n            "),
            f"  wrote     {os.path.join(out, 'model.onnx')}, fpga_report.json, fpga_layers.png, report.json{ir_dir}",
        ]
    else:
        diff = report["max_abs_diff"]
        lines += [
            f"  steps     {steps} | tvm-build {report['tvm_build_seconds']:.2f}s",
            f"  check     max|TVM - ONNX Runtime| {diff['tvm_vs_onnxruntime']:.2e}, "
            f"max|TVM - input model| {diff['tvm_vs_input_model']:.2e}",
            f"  wrote     {os.path.join(out, 'model.onnx')}, model.so, model.json, report.json{ir_dir}",
        ]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from sliver.ir.errors import SliverError

    try:
        if args.list_passes:
            print(list_passes())
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
