#!/usr/bin/env python3
"""Benchmark a model side by side: PyTorch eager, ONNX Runtime and the TVM artifact.

    python tools/bench.py deit_small --batch 1 8 --threads 2 --repeat 20 --json build/bench.json
    python tools/bench.py resnet18 --pipeline fold-bn,cleanup --batch 1
    python tools/bench.py model.onnx --input-shape 1,3,224,224 --engines onnxruntime tvm
    python tools/bench.py deit_small --pipeline "evit{blocks=3,6,9 keep=0.7}" --compare-dense
    python tools/bench.py resnet18 --pipeline fold-bn,cleanup --integer --engines onnxruntime tvm
    python tools/bench.py tiny_mobilenet_v2 --data digits --engines tvm \
        --integer "rapq{wbits=8 abits=8},pot-shift" --integer "rapq{wbits=8 abits=8},appmul{max_drop=1.0},pot-shift"

For each batch size the model goes through the pipeline to the onnx level and TVM builds it for
the host CPU; then the engines run the same input on the same number of threads after a warm-up.
``--wait passive`` (default): every engine's idle workers sleep at once, and the engines run
interleaved (one run of each engine per round, so load changes on a shared machine hit all of them
alike). ``--wait spin``: every engine keeps its own default (its workers spin a while before they
sleep, which saves a thread wake-up per parallel kernel); the engines then run in alternating
blocks, each block after the previous engine's threads went idle, so no engine's spinning workers
take the cores of another (use it on an idle machine). Reported per engine: median latency, min and max, and the ratio to ONNX Runtime and to
PyTorch; per model: MACs and the largest |TVM - ONNX Runtime|. PyTorch eager runs the input model
(before the pipeline): with a pipeline that changes the model its ratio compares two models.
With ``--compare-dense`` the model without the pipeline runs too, interleaved with the pipeline's
model (PyTorch eager then runs the pipeline's torch-level model), and each engine reports the
speedup, the MAC reduction and their ratio (1.0: the engine turns every MAC saved into time).

``--integer [PIPELINE]`` (default ``pot-naive{wbits=8 abits=8},pot-shift``) adds, in the same
interleaved rounds, sliver's integer artifact (``tvm:int``: the model through that pipeline, built by
TVM) and ONNX Runtime's own int8 path (``onnxruntime:int8``: ``quantize_static`` of the same float
ONNX, QDQ, u8 activations, s8 per-channel weights), both calibrated on the same ``--calib`` images
(random normal ones by default: timing does not depend on them); the integer artifact's outputs
are checked against ONNX Runtime running the same integer graph (``max|TVM - ORT|`` must be 0).
``--integer`` may be given several times: the artifacts are ``tvm:int``, ``tvm:int2``, ... in the
same rounds, each later one reported as a ratio to the first (e.g. a pipeline with ``appmul``
against the same one without it).

``--data NAME`` (``digits``, ``digit-scenes``, ``small-digits``) runs a tiny zoo model with its
trained weights (``sliver.models.training.cached``: trained once per machine), gives the passes
that data set's train/val/calib splits (quantisers calibrate on it, ``appmul`` selects its
multipliers on it: the multipliers a model gets, and so its speed, depend on real data), and
times the first test image(s); ONNX Runtime's int8 path calibrates on the same calib split.
Every result records the CPU: its model name and the ISA extensions that matter for integer
kernels (AVX-512 VNNI, AMX, AVX-512, aarch64 dotprod / i8mm).

Prints a table; ``--json OUT`` also writes every number. Errors exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ENGINES = ("torch", "onnxruntime", "tvm")
#: the integer pipeline of ``--integer``
INTEGER_PIPELINE = "pot-naive{wbits=8 abits=8},pot-shift"
#: ISA extensions recorded with every result: /proc/cpuinfo flag -> name
ISA_FLAGS = {"avx2": "AVX2", "avx512f": "AVX-512F", "avx512bw": "AVX-512BW", "avx512_vnni": "AVX-512 VNNI",
             "avx_vnni": "AVX-VNNI", "amx_tile": "AMX", "amx_int8": "AMX-INT8", "asimd": "NEON",
             "asimddp": "dotprod", "i8mm": "i8mm", "sve": "SVE"}


def cpu_info() -> dict:
    """The host CPU: model name, core count, LLVM's CPU name and the ISA extensions of
    :data:`ISA_FLAGS` it has (read from /proc/cpuinfo; empty where that file does not exist)."""
    from sliver.backends import tvm as tvm_backend

    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "cpu model") and not model:
                    model = value.strip()
                elif key in ("flags", "features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return {"model": model or os.uname().machine, "cores": os.cpu_count(),
            "llvm_cpu": tvm_backend.host_target().get("mcpu", "generic"),
            "isa": [name for flag, name in ISA_FLAGS.items() if flag in flags]}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="zoo model name or path of an .onnx file")
    p.add_argument("--pipeline", default="", help="pass pipeline applied before building (default: none)")
    p.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes (default: 1)")
    p.add_argument("--threads", type=int, default=2, help="threads for every engine (default: 2)")
    p.add_argument("--wait", choices=["passive", "spin"], default="passive",
                   help="how idle worker threads wait: passive (default; every engine's workers sleep at "
                        "once, engines interleaved run by run) or spin (every engine's own default spin-"
                        "then-sleep; engines run in alternating blocks, each after the other's threads "
                        "went idle)")
    p.add_argument("--repeat", type=int, default=10, help="timed runs per engine (default: 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs per engine first (default: 2)")
    p.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES, help="engines to run")
    p.add_argument("--schedule", default="rules", choices=["rules", "none"], help="TVM schedules: rules (default) or none")
    p.add_argument("--input-shape", help="input shape for an .onnx model (batch is replaced by --batch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--compare-dense",
        action="store_true",
        help="also run the model without the pipeline, interleaved, and report per engine the speedup of the "
        "pipeline's model and that speedup divided by its MAC reduction (PyTorch then runs the pruned model)",
    )
    p.add_argument("--integer", action="append", nargs="?", const=INTEGER_PIPELINE, default=None, metavar="PIPELINE",
                   help="also run sliver's integer artifact (PIPELINE, default: %(const)s) and ONNX Runtime's int8 "
                        "QDQ path of the same float model, interleaved with the other engines; repeat to compare "
                        "integer pipelines (tvm:int, tvm:int2, ...)")
    p.add_argument("--calib", type=int, default=16, help="calibration images for --integer (default: 16)")
    p.add_argument("--data", metavar="NAME",
                   help="digits, digit-scenes or small-digits: a tiny zoo model runs with its trained weights, the "
                        "passes calibrate and select on that data, and its test images are the input")
    p.add_argument("--json", help="write the results to this JSON file")
    p.add_argument("--rpc", metavar="HOST:PORT",
                   help="instead of the local engines: upload the TVM artifact to the device running TVM's RPC "
                        "server at HOST:PORT (a tracker's address with --rpc-key) and time it there")
    p.add_argument("--rpc-key", help="device key for --rpc when HOST:PORT is an RPC tracker")
    p.add_argument("--target", default="x86",
                   help="TVM target of the artifact for --rpc: x86 (this machine's CPU), arm, or a JSON target dict")
    p.add_argument("--appmul-selection", type=float, metavar="BUDGET",
                   help="instead of the engines: time the appmul selection (exact knapsack vs GA baseline) on "
                        "MODEL's trained sensitivity table at loss budget BUDGET (tiny zoo models)")
    p.add_argument("--appmul-bits", type=int, default=5, help="operand width for --appmul-selection (default: 5)")
    return p


def _calibration(args, shape):
    """The ``--calib`` images the quantisers of ``--integer`` calibrate on (random normal, fixed
    seed), or with ``--data`` that set's calibration split."""
    import numpy as np
    import torch

    from sliver.models import data

    if args.data:
        return data.calibration(_named(args))
    x = np.random.default_rng(args.seed + 1).standard_normal((args.calib,) + tuple(shape[1:])).astype(np.float32)
    return data.ImageSet("bench/random", "images", torch.from_numpy(x))


def _named(args) -> str:
    from sliver.ir.errors import DataError
    from sliver.models import data

    name = args.data.replace("_", "-")
    if name not in data.NAMED:
        raise DataError(f"--data {args.data!r}: bench.py takes a named data set ({', '.join(data.NAMED)})")
    return name


def _trained(args):
    """MODEL with its trained weights for ``--data`` (trained and cached on first use)."""
    from sliver.ir.errors import ModelInputError
    from sliver.models import training

    if args.model not in training.DEFAULTS:
        raise ModelInputError(f"--data runs trained weights, but {args.model!r} has none; use a tiny zoo model "
                              f"({', '.join(training.DEFAULTS)})")
    return training.trained_for(args.model, _named(args), seed=args.seed)


def _load(args, batch: int, pipeline: str | None = None):
    """(onnx-level program, torch module or None, torch module after ``pipeline`` or None) of MODEL
    at ``batch``; ``pipeline`` defaults to ``--pipeline``."""
    import numpy as np
    import torch

    from sliver import ir, models, passes
    from sliver.ir.errors import DataError

    if args.data and (args.model.endswith(".onnx") or os.path.exists(args.model)):
        raise DataError("--data runs a tiny zoo model with its trained weights; an .onnx file runs with the weights it has")
    if args.model.endswith(".onnx") or os.path.exists(args.model):
        shape = None
        if args.input_shape:
            shape = tuple(int(s) for s in args.input_shape.split(","))
            shape = (batch,) + shape[1:]
        program, net = ir.load_onnx(args.model, input_shapes=shape, seed=args.seed), None
    elif args.data:
        from sliver.models import data

        net = _trained(args)
        test = data.load(_named(args), "test")
        if batch > len(test):
            raise DataError(f"--batch {batch} is larger than {args.data}'s {len(test)} test images")
        program = ir.trace(net, test.images[:batch].contiguous(), name=args.model)
    else:
        torch.manual_seed(args.seed)
        net = models.create(args.model).eval()
        shape = (batch,) + tuple(models.input_shape(args.model))[1:]
        x = torch.from_numpy(np.random.default_rng(args.seed).standard_normal(shape).astype(np.float32))
        program = ir.trace(net, x, name=args.model)
    pipeline = args.pipeline if pipeline is None else pipeline
    if args.data:
        from sliver.models import data

        calib = data.context_data(_named(args))
    else:
        calib = _calibration(args, program.example_inputs[0].shape) if args.integer else None
    result = passes.parse(pipeline).run(program, seed=args.seed, check=False, data=calib)
    eager = result.program.module if result.program.level == "torch" else None
    lowered = passes.parse("").run(result.program, seed=args.seed, check=False, lower_to="onnx")
    return lowered.program, net, eager


def _ort_session(model, threads: int, spin: bool = False):
    """ONNX Runtime on ``threads`` threads; they spin after a run only with ``spin``.

    With ``--wait passive`` the engines run interleaved in one process; ORT's default spin-waiting
    workers kept a core busy after each ORT run and slowed the next engine 3x (MobileNetV2 under
    TVM: 80 ms interleaved vs 24 ms alone, measured here), so all engines wait passively.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _runners(args, program, torch_module) -> tuple:
    """({engine: run()}, TVM build seconds or None, max|TVM - ORT| or None) for one model."""
    import numpy as np
    import torch

    from sliver import backends
    from sliver.ir.runtime import max_abs_diff

    x = program.example_inputs
    runners = {}
    if "torch" in args.engines and torch_module is not None:
        xt = [torch.from_numpy(np.ascontiguousarray(a)) for a in x]

        def run_torch():
            with torch.no_grad():
                torch_module(*xt)

        runners["torch"] = run_torch
    sess = _ort_session(program.module, args.threads, spin=args.wait == "spin")
    feeds = {i.name: a for i, a in zip(sess.get_inputs(), x)}
    ort_out = [np.asarray(o) for o in sess.run(None, feeds)]
    if "onnxruntime" in args.engines:
        runners["onnxruntime"] = lambda: sess.run(None, feeds)
    build_seconds, diff = None, None
    if "tvm" in args.engines:
        t0 = time.perf_counter()
        artifact = backends.tvm.build(program, target="x86", schedule=args.schedule)
        build_seconds = time.perf_counter() - t0
        diff = max_abs_diff(artifact.run(x), ort_out)
        run_tvm = artifact.runner()
        runners["tvm"] = lambda: run_tvm(x)
    return runners, build_seconds, diff


def _settle(limit_s: float = 5.0, window_s: float = 0.01) -> float:
    """Wait until this process's threads are idle; returns the seconds waited.

    Idle: in a ``window_s`` window the process used under 10% of one core. Spin-waiting workers
    of the engine that ran last (ORT's keep spinning about a second after a run) would otherwise
    share the cores with the next engine.
    """
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit_s:
        c0, w0 = time.process_time(), time.perf_counter()
        time.sleep(window_s)
        if time.process_time() - c0 < 0.1 * (time.perf_counter() - w0):
            break
    return time.perf_counter() - t0


def _measure(every: dict, args) -> dict:
    """{engine: [seconds per timed run]} after the warm-up, in the order ``--wait`` asks for."""
    for _ in range(args.warmup):
        for fn in every.values():
            fn()
    times = {name: [] for name in every}
    if args.wait == "passive":  # one run of each engine per round
        for _ in range(args.repeat):
            for name, fn in every.items():
                times[name].append(_time(fn))
        return times
    # spin: blocks of runs per engine (4 rounds), each block after the threads went idle and one
    # untimed run that wakes the engine's workers: the steady state of back-to-back inference
    rounds = min(4, args.repeat)
    sizes = [args.repeat // rounds + (1 if r < args.repeat % rounds else 0) for r in range(rounds)]
    for size in sizes:
        for name, fn in every.items():
            _settle()
            fn()
            times[name].extend(_time(fn) for _ in range(size))
    return times


def _summaries(times: dict) -> dict:
    engines = {}
    for name, ts in times.items():
        engines[name] = {
            "median_ms": 1e3 * statistics.median(ts),
            "min_ms": 1e3 * min(ts),
            "max_ms": 1e3 * max(ts),
            "runs": len(ts),
        }
    for name, e in engines.items():
        for ref in ("onnxruntime", "torch", "tvm", "onnxruntime:int8", "tvm:int"):
            if ref in engines and ref != name:
                e[f"ratio_to_{ref}"] = e["median_ms"] / engines[ref]["median_ms"]
    return engines


def _ort_int8(args, program):
    """ONNX Runtime's own int8 path for the float ``program``: ``quantize_static`` (QDQ, u8
    activations, s8 per-channel weights) calibrated on the ``--calib`` images."""
    import tempfile

    import numpy as np
    import onnx
    from onnxruntime import quantization as q

    calib = _calibration(args, program.example_inputs[0].shape).images.numpy()
    name = program.input_names[0]
    batch = program.example_inputs[0].shape[0]

    class Reader(q.CalibrationDataReader):
        def __init__(self):
            self.items = iter([{name: np.ascontiguousarray(calib[i:i + batch])}
                               for i in range(0, len(calib) - batch + 1, batch)])

        def get_next(self):
            return next(self.items, None)

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "float.onnx"), os.path.join(tmp, "int8.onnx")
        onnx.save(program.module, src)
        q.quantize_static(src, dst, Reader(), quant_format=q.QuantFormat.QDQ, activation_type=q.QuantType.QUInt8,
                          weight_type=q.QuantType.QInt8, per_channel=True)
        return onnx.load(dst)


def _integer_engine(position: int) -> str:
    """``tvm:int`` for the first ``--integer`` pipeline, ``tvm:int2``, ``tvm:int3``... for the next."""
    return "tvm:int" if position == 0 else f"tvm:int{position + 1}"


def _integer_runners(args, batch: int, float_program) -> tuple:
    """({"tvm:int", "tvm:int2"..., "onnxruntime:int8"}: run()) and the facts of each integer
    artifact (a list, in ``--integer`` order)."""
    import numpy as np

    from sliver import backends

    runners, infos = {}, []
    for position, pipeline in enumerate(args.integer):
        int_program, _, _ = _load(args, batch, pipeline=pipeline)
        x = int_program.example_inputs
        engine = _integer_engine(position)
        info = {"engine": engine, "pipeline": pipeline, "integer_only": "integer-only" in int_program.facts}
        sess = _ort_session(int_program.module, args.threads, spin=args.wait == "spin")
        feeds = {i.name: a for i, a in zip(sess.get_inputs(), x)}
        ort_out = [np.asarray(o) for o in sess.run(None, feeds)]
        if "tvm" in args.engines:
            t0 = time.perf_counter()
            artifact = backends.tvm.build(int_program, target="x86", schedule=args.schedule)
            info["tvm_build_seconds"] = time.perf_counter() - t0
            out = artifact.run(x)
            info["max_abs_diff_tvm_vs_onnxruntime"] = float(max(
                np.abs(a.astype(np.float64) - b.astype(np.float64)).max() for a, b in zip(out, ort_out)))
            run_tvm = artifact.runner()
            runners[engine] = lambda run_tvm=run_tvm, x=x: run_tvm(x)
        infos.append(info)
    if "onnxruntime" in args.engines:
        int8 = _ort_session(_ort_int8(args, float_program), args.threads, spin=args.wait == "spin")
        feeds8 = {i.name: a for i, a in zip(int8.get_inputs(), float_program.example_inputs)}
        runners["onnxruntime:int8"] = lambda: int8.run(None, feeds8)
    return runners, infos


def bench_batch(args, batch: int) -> dict:
    compare = bool(args.compare_dense and args.pipeline)
    program, net, eager = _load(args, batch)
    runners, build_seconds, diff = _runners(args, program, eager if compare else net)
    every = dict(runners)
    integer = None
    if args.integer:
        int_runners, integer = _integer_runners(args, batch, program)
        every.update(int_runners)
    if compare:  # the dense model's engines run interleaved with the pruned model's
        dense_program, dense_net, _ = _load(args, batch, pipeline="")
        dense_runners, _, _ = _runners(args, dense_program, dense_net)
        every.update({f"dense:{name}": fn for name, fn in dense_runners.items()})
    times = _measure(every, args)
    engines = _summaries({k: v for k, v in times.items() if not k.startswith("dense:")})
    stats = program.stats()
    out = {
        "batch": batch,
        "input_shapes": [list(a.shape) for a in program.example_inputs],
        "input": f"{_named(args)}/test[:{batch}]" if args.data else f"random normal (seed {args.seed})",
        "macs": int(stats.macs),
        "params": int(stats.params),
        "engines": engines,
        "tvm_build_seconds": build_seconds,
        "max_abs_diff_tvm_vs_onnxruntime": diff,
    }
    if integer is not None:
        out["integer"] = integer[0]  # the first (and usually only) --integer pipeline
        out["integers"] = integer
    if compare:
        dense_engines = _summaries({k[6:]: v for k, v in times.items() if k.startswith("dense:")})
        dense_macs = int(dense_program.stats().macs)
        reduction = dense_macs / max(out["macs"], 1)
        out["dense"] = {"macs": dense_macs, "engines": dense_engines}
        out["speedup"] = {
            name: {
                "speedup": dense_engines[name]["median_ms"] / e["median_ms"],
                "mac_reduction": reduction,
                "speedup_per_mac_reduction": dense_engines[name]["median_ms"] / e["median_ms"] / reduction,
            }
            for name, e in engines.items() if name in dense_engines
        }
    return out


def table(result: dict) -> str:
    lines = [
        f"{result['model']}  pipeline: {result['pipeline'] or '(none)'}  threads: {result['threads']}  "
        f"cpu: {result['cpu']}  schedule: {result['schedule']}  wait: {result.get('wait', 'passive')}",
        f"cpu model: {result['cpu_info']['model']} ({result['cpu_info']['cores']} cores)  "
        f"isa: {', '.join(result['cpu_info']['isa']) or '-'}",
        f"{'batch':>5} {'engine':<16} {'median ms':>10} {'min ms':>9} {'max ms':>9} {'/ORT':>6} {'/torch':>7} {'GMAC/s':>7}",
    ]
    for b in result["batches"]:
        for name, e in b["engines"].items():
            r_ort = f"{e['ratio_to_onnxruntime']:.2f}" if "ratio_to_onnxruntime" in e else "1.00" if name == "onnxruntime" else "-"
            r_t = f"{e['ratio_to_torch']:.2f}" if "ratio_to_torch" in e else "1.00" if name == "torch" else "-"
            gmacs = b["macs"] / e["median_ms"] / 1e6 if e["median_ms"] else 0.0
            lines.append(
                f"{b['batch']:>5} {name:<16} {e['median_ms']:>10.2f} {e['min_ms']:>9.2f} {e['max_ms']:>9.2f} "
                f"{r_ort:>6} {r_t:>7} {gmacs:>7.1f}"
            )
        extra = f"  MACs {b['macs'] / 1e9:.3f} G"
        if b["tvm_build_seconds"] is not None:
            extra += f", TVM build {b['tvm_build_seconds']:.1f} s, max|TVM - ORT| {b['max_abs_diff_tvm_vs_onnxruntime']:.2e}"
        lines.append(extra)
        for i in b.get("integers", []):
            e = b["engines"]
            name = i["engine"]
            text = f"  {name} ({i['pipeline']}): integer-only {i['integer_only']}"
            if "tvm_build_seconds" in i:
                text += f", TVM build {i['tvm_build_seconds']:.1f} s, max|TVM - ORT| {i['max_abs_diff_tvm_vs_onnxruntime']:.0f}"
            lines.append(text)
            if name != "tvm:int" and name in e and "tvm:int" in e:
                lines.append(f"  {name} takes {e[name]['ratio_to_tvm:int']:.2f}x the time of tvm:int")
            if name == "tvm:int" and "tvm:int" in e and "tvm" in e:
                lines.append(f"  tvm:int is {e['tvm']['median_ms'] / e['tvm:int']['median_ms']:.2f}x as fast as tvm (float)"
                             + (f"; tvm:int / onnxruntime:int8 = {e['tvm:int']['ratio_to_onnxruntime:int8']:.2f}"
                                if "ratio_to_onnxruntime:int8" in e["tvm:int"] else ""))
        if "speedup" in b:
            lines.append(f"{'':>5} {'engine':<12} {'dense ms':>10} {'pruned ms':>10} {'speedup':>8} {'MACs /':>7} {'ratio':>6}")
            for name, sp in b["speedup"].items():
                lines.append(
                    f"{b['batch']:>5} {name:<12} {b['dense']['engines'][name]['median_ms']:>10.2f} "
                    f"{b['engines'][name]['median_ms']:>10.2f} {sp['speedup']:>7.2f}x {sp['mac_reduction']:>6.2f}x "
                    f"{sp['speedup_per_mac_reduction']:>6.2f}"
                )
            lines.append("  speedup = dense / pruned median; MACs / = dense / pruned MACs; ratio = speedup / MAC reduction")
    return "\n".join(lines)


def _appmul_selection(args) -> int:
    """One row: exact AppMul selection vs the genetic baseline on the same objective."""
    from sliver.models import data, training
    from sliver.passes.appmul.substitute import selection_benchmark

    net, _ = training.cached(args.model, seed=args.seed)
    calib = data.digits("calib")
    r = selection_benchmark(net, calib.images[:128], calib.targets[:128], args.appmul_bits, args.appmul_selection,
                            repeat=args.repeat, seed=args.seed)
    print(f"{'model':<12} {'bits':>4} {'layers':>6} {'exact ms':>9} {'GA ms':>9} {'speedup':>8} {'saved exact':>11} {'saved GA':>9}")
    print(f"{args.model:<12} {r['bits']:>4} {r['layers']:>6} {r['exact_ms']:>9.3f} {r['genetic_ms']:>9.1f} "
          f"{r['speedup']:>7.0f}x {100 * r['exact_energy_saved']:>10.1f}% {100 * r['genetic_energy_saved']:>8.1f}%")
    print(f"  HiGHS ILP on the same problem: {r['milp_ms']:.2f} ms, objective {r['milp_value']:.6g} (exact {r['exact_value']:.6g}); "
          f"numpy Pareto DP {r['pareto_numpy_ms']:.2f} ms, objective {r['pareto_numpy_value']:.6g}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)
    return 0


def _passive_threads() -> None:
    """Every engine's worker threads sleep as soon as they run out of work (``--wait passive``)."""
    # PyTorch's OpenMP threads spin-wait by default: on a shared or busy machine that made 2-thread
    # ResNet-18 take 1.4 s instead of 0.1 s (measured here). Passive waiting is fair to all engines.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")
    # TVM pins its workers to cores by default; next to PyTorch's threads (and anything else on
    # the machine) that made MobileNetV2 22.8 ms instead of 8.1 ms unpinned (measured here)
    os.environ.setdefault("TVM_BIND_THREADS", "0")


def _remote(args) -> int:
    """``--rpc``: build MODEL for ``--target`` and time it on the device (``sliver.backends.rpc``);
    outputs are compared with this machine's ONNX Runtime run of the same program."""
    from sliver.backends import rpc
    from sliver.backends import tvm as tvm_backend
    from sliver.ir.errors import SliverError

    try:
        rpc.parse_address(args.rpc)  # a malformed address fails before any build
        target = json.loads(args.target) if args.target.lstrip().startswith("{") else args.target
        rows = []
        for batch in args.batch:
            program, _, _ = _load(args, batch)
            artifact = tvm_backend.build(program, target=target, schedule=args.schedule)
            inputs = [x for x in program.example_inputs]
            timing = rpc.time_remote(artifact, args.rpc, inputs, key=args.rpc_key, repeat=args.repeat,
                                     reference=program.run(inputs))
            rows.append({"batch": batch, "target": artifact.target, **timing})
    except (SliverError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r in rows:
        print(f"{args.model} batch {r['batch']} on {r['address']}{' key ' + r['key'] if r['key'] else ''} "
              f"({r['target'].get('mcpu', 'generic')}): median {r['median_ms']:.3f} ms, min {r['min_ms']:.3f}, "
              f"max {r['max_ms']:.3f} (device clock, {args.repeat} runs); max|device - ORT| {r['max_abs_diff']:.2e}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "pipeline": args.pipeline, "remote": rows}, f, indent=2)
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    # every engine gets the same threads; TVM reads its variable when its thread pool starts
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    if args.wait == "passive":
        _passive_threads()
    import torch

    torch.set_num_threads(args.threads)
    from sliver.backends import tvm as tvm_backend
    from sliver.ir.errors import SliverError

    if args.repeat < 1 or args.threads < 1 or any(b < 1 for b in args.batch):
        print("error: --repeat, --threads and --batch must be positive", file=sys.stderr)
        return 2
    if args.appmul_selection is not None:
        return _appmul_selection(args)
    if args.rpc:
        return _remote(args)
    try:
        result = {
            "model": args.model,
            "pipeline": args.pipeline,
            "threads": args.threads,
            "repeat": args.repeat,
            "schedule": args.schedule,
            "wait": args.wait,
            "cpu": tvm_backend.host_target().get("mcpu", "generic"),
            "cpu_info": cpu_info(),
            "batches": [bench_batch(args, b) for b in args.batch],
        }
    except SliverError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(result))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
