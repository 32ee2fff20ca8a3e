#!/usr/bin/env python3
"""Benchmark a model side by side: PyTorch eager, ONNX Runtime and the TVM artifact.

    python tools/bench.py deit_small --batch 1 8 --threads 2 --repeat 20 --json build/bench.json
    python tools/bench.py resnet18 --pipeline fold-bn,cleanup --batch 1
    python tools/bench.py model.onnx --input-shape 1,3,224,224 --engines onnxruntime tvm

For each batch size the model goes through the pipeline to the onnx level and TVM builds it for
the host CPU; then the engines run the same input on the same number of threads, interleaved (one
run of each engine per round, so load changes on a shared machine hit all of them alike), after a
warm-up. Reported per engine: median latency, min and max, and the ratio to ONNX Runtime and to
PyTorch; per model: MACs and the largest |TVM - ONNX Runtime|. PyTorch eager runs the input model
(before the pipeline): with a pipeline that changes the model its ratio compares two models.

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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="zoo model name or path of an .onnx file")
    p.add_argument("--pipeline", default="", help="pass pipeline applied before building (default: none)")
    p.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes (default: 1)")
    p.add_argument("--threads", type=int, default=2, help="threads for every engine (default: 2)")
    p.add_argument("--repeat", type=int, default=10, help="timed runs per engine (default: 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs per engine first (default: 2)")
    p.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES, help="engines to run")
    p.add_argument("--schedule", default="rules", choices=["rules", "none"], help="TVM schedules: rules (default) or none")
    p.add_argument("--input-shape", help="input shape for an .onnx model (batch is replaced by --batch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results to this JSON file")
    return p


def _load(args, batch: int):
    """(onnx-level program, torch module or None) of MODEL at ``batch``."""
    import numpy as np
    import torch

    from sliver import ir, models, passes

    if args.model.endswith(".onnx") or os.path.exists(args.model):
        shape = None
        if args.input_shape:
            shape = tuple(int(s) for s in args.input_shape.split(","))
            shape = (batch,) + shape[1:]
        program, net = ir.load_onnx(args.model, input_shapes=shape, seed=args.seed), None
    else:
        torch.manual_seed(args.seed)
        net = models.create(args.model).eval()
        shape = (batch,) + tuple(models.input_shape(args.model))[1:]
        x = torch.from_numpy(np.random.default_rng(args.seed).standard_normal(shape).astype(np.float32))
        program = ir.trace(net, x, name=args.model)
    result = passes.parse(args.pipeline).run(program, seed=args.seed, check=False, lower_to="onnx")
    return result.program, net


def _ort_session(model, threads: int):
    """ONNX Runtime on ``threads`` threads that do not spin after a run.

    The engines run interleaved in one process; ORT's default spin-waiting workers kept a core
    busy after each ORT run and slowed the next engine 3x (MobileNetV2 under TVM: 80 ms
    interleaved vs 24 ms alone, measured here). All three engines wait passively instead.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_batch(args, batch: int) -> dict:
    import numpy as np
    import torch

    from sliver import backends
    from sliver.ir.runtime import max_abs_diff

    program, net = _load(args, batch)
    x = program.example_inputs
    runners, notes = {}, {}
    if "torch" in args.engines and net is not None:
        xt = [torch.from_numpy(np.ascontiguousarray(a)) for a in x]

        def run_torch():
            with torch.no_grad():
                net(*xt)

        runners["torch"] = run_torch
    sess = _ort_session(program.module, args.threads)
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
    for _ in range(args.warmup):
        for fn in runners.values():
            fn()
    times = {name: [] for name in runners}
    for _ in range(args.repeat):
        for name, fn in runners.items():
            times[name].append(_time(fn))
    engines = {}
    for name, ts in times.items():
        engines[name] = {
            "median_ms": 1e3 * statistics.median(ts),
            "min_ms": 1e3 * min(ts),
            "max_ms": 1e3 * max(ts),
            "runs": len(ts),
        }
    for name, e in engines.items():
        for ref in ("onnxruntime", "torch"):
            if ref in engines and ref != name:
                e[f"ratio_to_{ref}"] = e["median_ms"] / engines[ref]["median_ms"]
    stats = program.stats()
    out = {
        "batch": batch,
        "input_shapes": [list(a.shape) for a in x],
        "macs": int(stats.macs),
        "params": int(stats.params),
        "engines": engines,
        "tvm_build_seconds": build_seconds,
        "max_abs_diff_tvm_vs_onnxruntime": diff,
    }
    out.update(notes)
    return out


def table(result: dict) -> str:
    lines = [
        f"{result['model']}  pipeline: {result['pipeline'] or '(none)'}  threads: {result['threads']}  "
        f"cpu: {result['cpu']}  schedule: {result['schedule']}",
        f"{'batch':>5} {'engine':<12} {'median ms':>10} {'min ms':>9} {'max ms':>9} {'/ORT':>6} {'/torch':>7} {'GMAC/s':>7}",
    ]
    for b in result["batches"]:
        for name, e in b["engines"].items():
            r_ort = f"{e['ratio_to_onnxruntime']:.2f}" if "ratio_to_onnxruntime" in e else "1.00" if name == "onnxruntime" else "-"
            r_t = f"{e['ratio_to_torch']:.2f}" if "ratio_to_torch" in e else "1.00" if name == "torch" else "-"
            gmacs = b["macs"] / e["median_ms"] / 1e6 if e["median_ms"] else 0.0
            lines.append(
                f"{b['batch']:>5} {name:<12} {e['median_ms']:>10.2f} {e['min_ms']:>9.2f} {e['max_ms']:>9.2f} "
                f"{r_ort:>6} {r_t:>7} {gmacs:>7.1f}"
            )
        extra = f"  MACs {b['macs'] / 1e9:.3f} G"
        if b["tvm_build_seconds"] is not None:
            extra += f", TVM build {b['tvm_build_seconds']:.1f} s, max|TVM - ORT| {b['max_abs_diff_tvm_vs_onnxruntime']:.2e}"
        lines.append(extra)
    return "\n".join(lines)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    # every engine gets the same threads; TVM reads its variable when its thread pool starts
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    # PyTorch's OpenMP threads spin-wait by default: on a shared or busy machine that made 2-thread
    # ResNet-18 take 1.4 s instead of 0.1 s (measured here). Passive waiting is fair to all engines.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")
    # TVM pins its workers to cores by default; next to PyTorch's threads (and anything else on
    # the machine) that made MobileNetV2 22.8 ms instead of 8.1 ms unpinned (measured here)
    os.environ.setdefault("TVM_BIND_THREADS", "0")
    import torch

    torch.set_num_threads(args.threads)
    from sliver.backends import tvm as tvm_backend
    from sliver.ir.errors import SliverError

    if args.repeat < 1 or args.threads < 1 or any(b < 1 for b in args.batch):
        print("error: --repeat, --threads and --batch must be positive", file=sys.stderr)
        return 2
    try:
        result = {
            "model": args.model,
            "pipeline": args.pipeline,
            "threads": args.threads,
            "repeat": args.repeat,
            "schedule": args.schedule,
            "cpu": tvm_backend.host_target().get("mcpu", "generic"),
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
