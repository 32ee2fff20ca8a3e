#!/usr/bin/env python3
"""Fuzz sliver with random and hostile inputs; every case is compiled, refused or a defect.

    python tools/fuzz.py 500 --seed 1                 # 100 cases of each of the five kinds
    python tools/fuzz.py 40 --seed 0 --kinds onnx,data --target fpga

Kinds (case ``i`` is of kind ``i mod 5`` unless ``--kinds`` narrows them):

- ``pipeline``: a random pipeline drawn from the pass registry (so new passes are covered as
  they are registered), mostly in level order, with random option values (cheap ones for epochs,
  iterations and image counts), on a random tiny zoo model or on an exported tiny model with an
  .npz of labelled data; run as ``tools/compile.py`` is.
- ``onnx``: a small valid model turned hostile: truncated or garbage bytes, missing, old or
  future opsets, dynamic, zero, negative or huge dimensions, cycles, dangling inputs, missing
  initializers, duplicate names, unknown domains and ops, wrong types, external data outside the
  model's folder (a secret file beside the folder must never be read).
- ``data``: ``--data`` given corrupt, truncated, pickled, mis-shaped, mis-typed, NaN or
  out-of-range-label ``.npz`` files, and corrupt or bomb-sized image files.
- ``checkpoint``: ``models.training.load_checkpoint`` of valid, truncated, altered, mis-shaped
  and code-running checkpoints (a pickle that would create a marker file).
- ``artifact``: ``backends.tvm.load`` of an artifact directory whose model.so or model.json
  was truncated, altered or removed; the library must not be loaded (mapped) when refused.

Each case runs with a timeout in a child forked from a clean runner process that has imported
sliver, torch and TVM once (forking the fuzzer itself deadlocks once torch has run an operator).
The verdict:

- compiled: exit 0 (or the library call returned) and the output is complete;
- refused: exit 2 with exactly one ``error:`` line that is not a wrapped internal exception
  (no traceback, no Python exception class name), or the library's typed error with such a line;
- defect: anything else: a traceback, a wrapped internal exception, a hang (timeout), a crash
  (signal), a half-written or changed output directory after a refusal, a changed input file, a
  hostile file accepted (an altered artifact loaded, a secret read, code run by a checkpoint).

It prints the counts per kind and the defects; the exit code is 1 when there is a defect.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import typing

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

KINDS = ("pipeline", "onnx", "data", "checkpoint", "artifact")
TINY = ("tiny_deit", "tiny_resnet", "tiny_mobilenet_v2", "tiny_vgg", "tiny_segmenter")
#: an error message that carries an internal exception instead of a problem and a fix
WRAPPED = re.compile(r"Traceback|File \"|site-packages|\b(?!Sliver)[A-Z][A-Za-z]*(Error|Exception|Interrupt)\b")
#: address-space limit of every case's process (bytes; 0: none)
MEMORY_LIMIT = 16 << 30
_CURRENT = [0]  # the running case's process (its group is killed when the fuzzer is stopped)


# -- verdicts ---------------------------------------------------------------------------------
@dataclasses.dataclass
class Case:
    kind: str
    what: str  # short description of the mutation
    argv: list | None = None  # a compile.py command line
    call: tuple | None = None  # (function name in this module, args) for a library call
    out: str | None = None  # compile.py --out directory
    inputs: list = dataclasses.field(default_factory=list)  # files that must not change
    must_refuse: bool = False  # a hostile input that must not be accepted
    timeout: float = 900.0


@dataclasses.dataclass
class Verdict:
    verdict: str  # compiled | refused | defect
    detail: str
    composition: bool = False  # a defect inside a pass (PassError wrapping an internal exception)


def _tree_digest(path: str) -> dict:
    """name -> sha256 of every file under path (empty when it does not exist)."""
    found = {}
    if not path or not os.path.exists(path):
        return found
    if os.path.isfile(path):
        with open(path, "rb") as f:
            return {"": hashlib.sha256(f.read()).hexdigest()}
    for base, _dirs, files in os.walk(path):
        for name in files:
            full = os.path.join(base, name)
            try:
                with open(full, "rb") as f:
                    found[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
            except OSError:
                found[os.path.relpath(full, path)] = "unreadable"
    return found


def _case_child(request: dict) -> None:
    """The forked child of the zygote: run one case with its output in files, then _exit."""
    code = 98
    try:
        os.setpgid(0, 0)
        if request["memory_limit"]:  # a runaway case fails alone instead of waking the kernel's OOM killer
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (request["memory_limit"], request["memory_limit"]))
        fo = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        fe = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fo, 1)
        os.dup2(fe, 2)
        sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
        sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        try:
            if request["argv"] is not None:
                import compile as compile_tool

                code = int(compile_tool.main(request["argv"]) or 0)
            else:
                name, args = request["call"]
                result = globals()[name](*args)
                with open(request["result"], "w") as f:
                    json.dump(result, f)
                code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 2
        except BaseException:
            traceback.print_exc()
            code = 99
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def _zygote_main() -> int:
    """``fuzz.py --zygote``: import what the cases need, never run an operator, then fork one
    child per request read from stdin (one JSON line) and answer with its exit status.

    Cases are not forked from the fuzzing process itself: once torch (OpenMP) or TVM have run a
    parallel operator there, a forked child that runs one deadlocks on the pool's state (measured:
    a conv in a child forked after a conv in the parent never returns). This process has no pool
    yet, so its children start clean, and the imports are still paid once."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever an import prints must not corrupt the protocol
    import compile as _compile_tool  # noqa: F401 - imported once here, inherited by every child
    import tvm  # noqa: F401

    from sliver import backends, passes  # noqa: F401

    def stop(signum, _frame):
        if _CURRENT[0]:
            try:
                os.killpg(_CURRENT[0], signal.SIGKILL)
            except ProcessLookupError:
                pass
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the fuzzer decides; it terminates us
    print("ready", file=proto)
    for line in sys.stdin:
        request = json.loads(line)
        t0 = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            _case_child(request)
        _CURRENT[0] = pid
        deadline = t0 + request["timeout"]
        status = None
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.perf_counter() > deadline:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                os.waitpid(pid, 0)
                status = None
                break
            time.sleep(0.05)
        _CURRENT[0] = 0
        if status is None:
            answer = {"status": "hang", "rc": None}
        elif os.WIFSIGNALED(status):
            answer = {"status": f"signal {os.WTERMSIG(status)}", "rc": None}
        else:
            answer = {"status": "exit", "rc": os.WEXITSTATUS(status)}
        answer["seconds"] = time.perf_counter() - t0
        print(json.dumps(answer), file=proto)
    return 0


class _Zygote:
    """The fuzzer's handle on its zygote process (see _zygote_main)."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--zygote"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        if self.proc.stdout.readline().strip() != "ready":
            raise SystemExit(f"fuzz: the case runner did not start (exit {self.proc.wait()})")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def run(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"fuzz: the case runner died (exit {self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        """End of input first (the zygote's read loop ends and it exits), then SIGTERM, then
        SIGKILL, each with a bounded wait: a full-suite run once waited 55 minutes here on a
        zygote that was blocked reading its input and did not act on the SIGTERM."""
        if not self.alive():
            return
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        for stop in (None, self.proc.terminate, self.proc.kill):
            if stop is not None:
                stop()
            try:
                self.proc.wait(timeout=10)
                return
            except subprocess.TimeoutExpired:
                continue


_ZYGOTE: list = []


def _zygote() -> _Zygote:
    if not _ZYGOTE or not _ZYGOTE[0].alive():
        _ZYGOTE[:] = [_Zygote()]
    return _ZYGOTE[0]


def close_runner() -> None:
    """Stop the case runner (run() does this when it ends)."""
    if _ZYGOTE:
        _ZYGOTE.pop().close()


def _run_child(case: Case, scratch: str) -> tuple:
    """Run the case in a child of the zygote; (status, rc, stdout, stderr, result json or None, seconds)."""
    out_file, err_file, res_file = (os.path.join(scratch, n) for n in ("stdout", "stderr", "result.json"))
    for f in (out_file, err_file, res_file):
        if os.path.exists(f):
            os.unlink(f)
    request = {"argv": case.argv, "call": case.call, "stdout": out_file, "stderr": err_file, "result": res_file,
               "timeout": case.timeout, "memory_limit": MEMORY_LIMIT}
    answer = _zygote().run(request)
    read = lambda p: open(p, errors="replace").read() if os.path.exists(p) else ""  # noqa: E731
    result = None
    if os.path.exists(res_file):
        try:
            result = json.loads(read(res_file))
        except ValueError:
            result = None
    return answer["status"], answer["rc"], read(out_file), read(err_file), result, answer["seconds"]


def _one_line_refusal(message: str) -> str | None:
    """Why ``message`` is not a proper refusal (None when it is one)."""
    if not message.strip():
        return "empty error message"
    if "\n" in message.strip():
        return "error message of more than one line"
    if WRAPPED.search(message):
        return "wrapped internal exception"
    return None


def _error_lines(stderr: str) -> list:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _complete_output(out: str, argv: list) -> str | None:
    """Why the compile.py output directory is not complete (None when it is)."""
    if not os.path.isdir(out):
        return "no output directory"
    names = set(os.listdir(out))
    target = argv[argv.index("--target") + 1] if "--target" in argv else "x86"
    need = {"model.onnx", "report.json"} | ({"fpga_report.json"} if target == "fpga" else {"model.so", "model.json"})
    if not need <= names:
        return f"missing {sorted(need - names)}"
    if any(n.endswith(".tmp") for n in names):
        return "temporary file left in the output"
    try:
        with open(os.path.join(out, "report.json")) as f:
            json.load(f)
    except ValueError:
        return "report.json does not parse"
    if "fpga" not in target:
        from sliver import backends

        try:
            backends.tvm.verify(out)
        except Exception as e:  # noqa: BLE001 - any failure is the finding
            return f"artifact does not verify: {e}"
    parent, base = os.path.dirname(out), os.path.basename(out)
    litter = [n for n in os.listdir(parent) if n.startswith(f".{base}.tmp-")]
    if litter:
        return f"staging directory left beside the output: {litter[0]}"
    return None


def classify(case: Case, scratch: str) -> Verdict:
    before_inputs = {p: _tree_digest(p) for p in case.inputs}
    before_out = _tree_digest(case.out) if case.out else None
    status, rc, stdout, stderr, result, seconds = _run_child(case, scratch)
    changed = [p for p in case.inputs if _tree_digest(p) != before_inputs[p]]
    if status == "hang":
        return Verdict("defect", f"hang (no result after {case.timeout:.0f} s)")
    if status != "exit":
        return Verdict("defect", f"crash ({status}): {stderr.strip().splitlines()[-1:] or ''}")
    if changed:
        return Verdict("defect", f"changed input file {changed[0]}")
    if rc == 99 or "Traceback (most recent call last)" in stderr:
        last = [line for line in stderr.strip().splitlines() if line.strip()][-1:] or ["?"]
        return Verdict("defect", f"traceback: {last[0][:300]}")
    if case.argv is not None:
        errors = _error_lines(stderr)
        if rc == 0:
            if errors:
                return Verdict("defect", f"exit 0 with an error line: {errors[0][:200]}")
            why = _complete_output(case.out, case.argv)
            if why:
                return Verdict("defect", f"half-written output: {why}")
            if case.must_refuse:
                return Verdict("defect", "hostile input accepted")
            return Verdict("compiled", f"{seconds:.1f} s")
        if rc != 2:
            return Verdict("defect", f"exit code {rc}: {(errors or stderr.strip().splitlines()[-1:] or [''])[0][:200]}")
        if len(errors) != 1:
            return Verdict("defect", f"exit 2 with {len(errors)} error lines")
        message = errors[0][len("error:"):].strip()
        why = _one_line_refusal(message)
        if why:
            composition = message.startswith("pass '") and " failed on " in message
            return Verdict("defect", f"{why}: {message[:300]}", composition)
        if case.out and _tree_digest(case.out) != before_out:
            return Verdict("defect", f"output directory changed by a refused run ({message[:120]})")
        return Verdict("refused", message)
    # a library call: result = {"status": "ok"|"refused", "message", "defect"?}
    if rc != 0 or result is None:
        return Verdict("defect", f"library call ended with exit {rc}: {stderr.strip()[-200:]}")
    if result.get("defect"):
        return Verdict("defect", result["defect"])
    if result["status"] == "refused":
        why = _one_line_refusal(result["message"])
        if why:
            return Verdict("defect", f"{why}: {result['message'][:300]}")
        return Verdict("refused", result["message"])
    if case.must_refuse:
        return Verdict("defect", f"hostile input accepted ({result.get('message', '')})")
    return Verdict("compiled", result.get("message", "loaded"))


# -- library-call cases (run in the child) ----------------------------------------------------
def _typed(fn):
    """Run fn(); {"status": "ok"} or {"status": "refused", "message"} for sliver's typed errors.
    Any other exception propagates (a traceback: a defect)."""
    from sliver.ir.errors import SliverError

    try:
        message = fn()
        return {"status": "ok", "message": message or "loaded"}
    except SliverError as e:
        return {"status": "refused", "message": str(e)}


def call_build_artifact(onnx_path: str, out: str) -> dict:
    from sliver import backends, ir

    backends.tvm.build(ir.load_onnx(onnx_path), target="x86").save(out)
    return {"status": "ok", "message": "built"}


def call_selftest(how: str) -> dict:
    """A call whose verdict is known, to check the classifier itself: ``key`` raises an internal
    exception (defect), ``typed`` a one-line typed error (refused), ``wrapped`` a typed error that
    carries an internal exception (defect), ``hang`` sleeps past any test timeout."""
    from sliver.ir import errors

    def go():
        if how == "key":
            return {}["missing"]
        if how == "typed":
            raise errors.DataError("the data is bad; give good data")
        if how == "wrapped":
            raise errors.DataError("loading failed: KeyError: 'x'")
        time.sleep(60)

    return _typed(go)


def call_load_checkpoint(path: str, marker: str) -> dict:
    from sliver.models import training

    def load():
        net, ckpt = training.load_checkpoint(path)
        import torch

        x = torch.zeros(1, 3, 32, 32)
        with torch.no_grad():
            net(x)
        return f"loaded {ckpt['model']}"

    result = _typed(load)
    if os.path.exists(marker):
        result["defect"] = "the checkpoint ran code while loading (marker file created)"
    return result


def _mapped(path: str) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/maps") as f:
        return any(real in line for line in f)


def call_load_artifact(directory: str) -> dict:
    from sliver import backends

    def load():
        artifact = backends.tvm.load(directory)
        x = np.zeros(artifact.input_shapes[0], dtype=np.float32)
        out = artifact.run([x])
        return f"loaded and ran ({tuple(out[0].shape)})"

    result = _typed(load)
    if result["status"] == "refused" and _mapped(os.path.join(directory, "model.so")):
        result["defect"] = "model.so was loaded before the artifact was refused"
    return result


# -- assets shared by the cases ---------------------------------------------------------------
def small_onnx(batch=1, size=8, classes=4, opset=17):
    """A tiny valid model: Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(np.zeros(4, np.float32), "b")
    w2 = numpy_helper.from_array(rng.standard_normal((classes, 4)).astype(np.float32), "w2")
    b2 = numpy_helper.from_array(np.zeros(classes, np.float32), "b2")
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "small",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, classes])],
        [w, b, w2, b2],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="fuzz")


class Assets:
    """Valid inputs built once per run: the mutations start from these."""

    def __init__(self, work: str, seed: int):
        import onnx
        import torch

        from sliver import ir, models

        self.work = work
        os.makedirs(work, exist_ok=True)
        self.small = small_onnx()
        # a tiny zoo model exported to ONNX (random weights) with labelled data of its shape
        self.vgg_onnx = os.path.join(work, "tiny_vgg.onnx")
        torch.manual_seed(seed)
        net = models.create("tiny_vgg").eval()
        prog = ir.trace(net, torch.zeros(1, 3, 32, 32), name="tiny_vgg")
        onnx.save(ir.to_onnx(prog).module, self.vgg_onnx)
        rng = np.random.default_rng(seed)
        self.npz = os.path.join(work, "data.npz")
        np.savez(self.npz, images=rng.standard_normal((24, 3, 32, 32)).astype(np.float32),
                 labels=rng.integers(0, 10, 24))
        # a checkpoint of tiny_vgg (random weights) in sliver's format
        from sliver.models import training

        self.checkpoint = os.path.join(work, "tiny_vgg.pt")
        cfg = training.config_for("tiny_vgg")
        training.save_checkpoint(training.TrainResult(net, cfg, "accuracy", {"test": 10.0}, 0.0), self.checkpoint)
        # an artifact of the small model, built by the case runner so this process never loads TVM code
        self.artifact = os.path.join(work, "artifact")
        if not os.path.exists(os.path.join(self.artifact, "model.json")):
            path = os.path.join(work, "small.onnx")
            onnx.save(self.small, path)
            case = Case("artifact", "base", call=("call_build_artifact", (path, self.artifact)), timeout=900)
            status, rc, _out, err, _result, _seconds = _run_child(case, work)
            if (status, rc) != ("exit", 0):
                raise SystemExit(f"fuzz: building the base artifact failed ({status} {rc}):\n{err[-2000:]}")
        # the secret next to (outside) every case folder: hostile models point at it
        self.secret = os.path.join(work, "secret.bin")
        with open(self.secret, "wb") as f:
            f.write(np.full(4 * 3 * 3 * 3, 1234.5, np.float32).tobytes())


# -- case generators --------------------------------------------------------------------------
def _hint(tp):
    return typing.get_origin(tp), typing.get_args(tp)


def _random_value(rng, name: str, tp, default):
    """A random option value as pipeline text: cheap for costs, otherwise anything plausible
    (sometimes out of range, to exercise validation)."""
    origin, args = _hint(tp)
    lname = name.lower()
    if tp is bool:
        return rng.choice(["true", "false"]) if rng.random() < 0.95 else "maybe"
    if origin is typing.Literal:
        return str(rng.choice(list(args))) if rng.random() < 0.9 else "bogus"
    if tp is int:
        if "epoch" in lname or lname == "warm_start":
            return str(rng.choice([0, 0, 1]))
        if "iters" in lname:
            return str(rng.choice([0, 1, 3]))
        if "images" in lname:
            return str(rng.choice([8, 16, 32]))
        if "batch" in lname:
            return str(rng.choice([4, 8, 16]))
        return str(rng.choice([0, 1, 2, 3, 4, 6, 8, -1, 100000]))
    if tp is float:
        return str(rng.choice([0.0, 0.05, 0.3, 0.5, 0.7, 0.9, 1.0, 1.5, -0.2, 1e9]))
    if origin is tuple:
        item = args[0]
        n = int(rng.choice([0, 1, 2, 3]))
        if item is int:
            return ",".join(str(int(v)) for v in rng.choice([0, 1, 2, 3, 4, 5, 8, 11, 12, -1], n))
        if item is float:
            return ",".join(str(v) for v in rng.choice([0.25, 0.5, 0.75, 1.0, 2.0, -1.0], n))
        return ",".join(["x"] * n)
    if tp is str:
        return str(rng.choice(["static", "adaptive", "low", "high", "bogus", ""])) if rng.random() < 0.5 else str(default)
    return str(default)


def _legal_value(rng, name: str, tp, default):
    """A random value that should be accepted: near the default, cheap for costly options,
    token-pruning blocks among the first six (every tiny ViT has at least six)."""
    origin, args = _hint(tp)
    lname = name.lower()
    if lname.startswith("blocks") and origin is tuple:
        picks = sorted(set(int(v) for v in rng.choice(6, int(rng.integers(1, 4)))))
        return ",".join(map(str, picks))
    if tp is bool:
        return str(rng.choice(["true", "false"]))
    if origin is typing.Literal:
        return str(rng.choice(list(args)))
    if tp is int:
        if "epoch" in lname or lname == "warm_start":
            return str(rng.choice([0, 0, 1]))
        if "iters" in lname:
            return str(rng.choice([0, 1, 3]))
        if "images" in lname:
            return str(rng.choice([8, 16, 32]))
        if "batch" in lname:
            return str(rng.choice([8, 16]))
        if "bits" in lname and isinstance(default, int) and default > 0:
            return str(rng.choice([4, 6, 8]))
        return str(default)
    if tp is float and isinstance(default, (int, float)) and 0 < default <= 1:
        return f"{min(1.0, default * float(rng.choice([0.7, 0.85, 1.0, 1.15]))):.3g}"
    return str(default) if not isinstance(default, tuple) else ",".join(map(str, default))


def _clamp(text: str, tp, bounds: dict) -> str:
    """A legal pick moved into the option's declared bounds (``passes.option(ge=..., le=...)``)."""
    if tp not in (int, float) or not bounds:
        return text
    try:
        value = float(text)
    except ValueError:
        return text
    low = bounds.get("ge", bounds.get("gt"))
    high = bounds.get("le", bounds.get("lt"))
    if low is not None and (value < low or ("gt" in bounds and value <= low)):
        value = low + (1 if tp is int else 1e-3) * ("gt" in bounds)
    if high is not None and (value > high or ("lt" in bounds and value >= high)):
        value = high - (1 if tp is int else 1e-3) * ("lt" in bounds)
    return str(int(value)) if tp is int else f"{value:.4g}"


def random_pipeline(rng, legal: bool = True) -> str:
    """A random composition of registered passes, in level order with cheap, plausible options
    (``legal``), or in any order with random option values (to exercise validation)."""
    from sliver import passes
    from sliver.ir.program import LEVELS

    registry = passes.registered()
    count = int(rng.choice([0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3]))
    names = list(rng.choice(sorted(registry), count, replace=False))
    if legal or rng.random() < 0.7:
        names.sort(key=lambda n: LEVELS.index(registry[n].level))
    items = []
    for name in names:
        cls = registry[name]
        hints = typing.get_type_hints(cls.Options)
        opts = []
        for f in dataclasses.fields(cls.Options):
            lname = f.name.lower()
            costly = "epoch" in lname or "iters" in lname or "images" in lname or lname == "warm_start"
            if costly or rng.random() < (0.3 if legal else 0.35):
                default = f.default if f.default is not dataclasses.MISSING else None
                if legal:
                    value = _clamp(_legal_value(rng, f.name, hints[f.name], default), hints[f.name],
                                   f.metadata.get("bounds", {}))
                else:
                    value = _random_value(rng, f.name, hints[f.name], default)
                if value != "":
                    opts.append(f"{f.name}={value}")
        items.append(f"{name}{{{' '.join(opts)}}}" if opts else name)
    return ",".join(items)


def _out(case_dir: str, rng, prefill: bool = True) -> str:
    out = os.path.join(case_dir, "out")
    if prefill and rng.random() < 0.5:  # an earlier result that a refusal must leave as it was
        os.makedirs(out)
        with open(os.path.join(out, "previous.txt"), "w") as f:
            f.write("an earlier result\n")
    return out


def gen_pipeline(rng, assets: Assets, case_dir: str, target: str) -> Case:
    text = random_pipeline(rng, legal=rng.random() < 0.6)
    out = _out(case_dir, rng)
    if rng.random() < 0.75:
        model, inputs, extra = str(rng.choice(TINY)), [], []
    else:
        model, inputs = assets.vgg_onnx, [assets.vgg_onnx, assets.npz]
        extra = ["--data", assets.npz, "--split", "test"] if rng.random() < 0.7 else []
    argv = [model, "--pipeline", text, "--target", target, "--out", out, "--seed", str(int(rng.integers(0, 3))), *extra]
    if rng.random() < 0.2:
        argv.append("--dump-ir")
    if rng.random() < 0.1:
        argv.append("--keep-maps")
    if rng.random() < 0.2:
        argv.append("--no-check")
    return Case("pipeline", f"{model.split('/')[-1]} {text!r}", argv=argv, out=out, inputs=inputs)


def _onnx_mutation(rng, assets: Assets, case_dir: str):
    """(what, model path, extra argv, must_refuse)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(assets.small)
    g = m.graph
    path = os.path.join(case_dir, "model.onnx")
    extra: list = []
    must_refuse = False
    kinds = ["valid", "truncated", "garbage", "empty", "text", "no_opset", "old_opset", "future_opset", "dup_opset",
             "dynamic", "dynamic_given", "zero_dim", "negative_dim", "huge_dims", "huge_batch", "cycle", "dangling",
             "missing_init", "dup_output", "dup_init", "dup_node_name", "dup_input", "unknown_domain", "unknown_op",
             "ext_parent", "ext_absolute", "ext_symlink", "ext_missing", "ext_offset", "ext_inside", "int_input",
             "bad_attr", "bad_weight_shape", "no_outputs", "output_not_produced", "ir_version", "wrong_given_shape",
             "bitflip", "fp16_weight", "empty_name_output"]
    what = str(rng.choice(kinds))

    def save(model):
        with open(path, "wb") as f:
            f.write(model.SerializeToString())

    def external(location: str, offset: int = 0, length: int | None = None):
        w = g.initializer[0]
        w.ClearField("raw_data")
        w.ClearField("float_data")
        w.data_location = TensorProto.EXTERNAL
        del w.external_data[:]
        for k, v in (("location", location), ("offset", str(offset))) + ((("length", str(length)),) if length is not None else ()):
            entry = w.external_data.add()
            entry.key, entry.value = k, v

    if what == "valid":
        save(m)
    elif what in ("truncated", "bitflip"):
        data = bytearray(m.SerializeToString())
        if what == "truncated":
            data = data[: int(rng.integers(1, len(data)))]
        else:
            for _ in range(int(rng.integers(1, 8))):
                data[int(rng.integers(0, len(data)))] ^= 1 << int(rng.integers(0, 8))
        with open(path, "wb") as f:
            f.write(bytes(data))
    elif what == "garbage":
        with open(path, "wb") as f:
            f.write(rng.integers(0, 256, int(rng.integers(1, 4096)), dtype=np.uint8).tobytes())
    elif what == "empty":
        open(path, "wb").close()
    elif what == "text":
        with open(path, "w") as f:
            f.write("this is not a model\n")
    elif what == "no_opset":
        del m.opset_import[:]
        save(m)
    elif what == "old_opset":
        m.opset_import[0].version = int(rng.choice([1, 7, 11, 13, 16]))
        save(m)
    elif what == "future_opset":
        m.opset_import[0].version = int(rng.choice([30, 99, 10000]))
        save(m)
    elif what == "dup_opset":
        m.opset_import.append(helper.make_opsetid("", 13))
        save(m)
    elif what in ("dynamic", "dynamic_given", "wrong_given_shape"):
        dims = g.input[0].type.tensor_type.shape.dim
        for k in rng.choice(4, int(rng.integers(1, 5)), replace=False):
            dims[int(k)].Clear()
            dims[int(k)].dim_param = f"d{k}"
        if what == "dynamic_given":
            extra = ["--input-shape", str(rng.choice(["1,3,8,8", "2,3,16,16", "1,3,1,1", "4,3,8,8"]))]
        elif what == "wrong_given_shape":
            extra = ["--input-shape", str(rng.choice(["1,3,8", "1,4,8,8", "1,3,8,8,1", "0,3,8,8", "1,x,8,8", "-1,3,8,8"]))]
        save(m)
    elif what in ("zero_dim", "negative_dim", "huge_dims", "huge_batch"):
        dims = g.input[0].type.tensor_type.shape.dim
        if what == "zero_dim":
            dims[int(rng.integers(0, 4))].dim_value = 0
        elif what == "negative_dim":
            dims[int(rng.integers(0, 4))].dim_value = -3
        elif what == "huge_dims":
            dims[2].dim_value = dims[3].dim_value = int(rng.choice([100000, 2 ** 31, 2 ** 40]))
        else:
            dims[0].dim_value = int(rng.choice([10 ** 6, 10 ** 9]))
        for d in g.output[0].type.tensor_type.shape.dim:
            d.Clear()
        save(m)
    elif what == "cycle":
        g.node[0].input[0] = "r"  # conv reads relu's output, which reads conv's
        save(m)
    elif what == "dangling":
        node = g.node[int(rng.integers(1, len(g.node)))]
        node.input[0] = "nowhere"
        save(m)
    elif what == "missing_init":
        del g.initializer[int(rng.integers(0, len(g.initializer)))]
        save(m)
    elif what == "dup_output":
        g.node[2].output[0] = "c"
        save(m)
    elif what == "dup_init":
        extra_init = onnx.TensorProto()
        extra_init.CopyFrom(g.initializer[3])
        extra_init.name = "w"
        g.initializer.append(extra_init)
        save(m)
    elif what == "dup_node_name":
        for node in g.node:
            node.name = "same"
        save(m)
    elif what == "dup_input":
        g.input.append(g.input[0])
        save(m)
    elif what == "unknown_domain":
        g.node[1].domain = str(rng.choice(["com.evil", "com.microsoft", "ai.onnx.ml"]))
        m.opset_import.append(helper.make_opsetid(g.node[1].domain, 1))
        save(m)
    elif what == "unknown_op":
        g.node[1].op_type = "FrobnicateNd"
        save(m)
    elif what.startswith("ext_"):
        must_refuse = what in ("ext_parent", "ext_absolute", "ext_symlink", "ext_missing", "ext_offset")
        data = numpy_helper.to_array(g.initializer[0]).tobytes()
        if what == "ext_parent":
            external(os.path.relpath(assets.secret, case_dir))
        elif what == "ext_absolute":
            external(assets.secret)
        elif what == "ext_symlink":
            os.symlink(assets.secret, os.path.join(case_dir, "weights.bin"))
            external("weights.bin")
        elif what == "ext_missing":
            external("weights-missing.bin")
        elif what == "ext_offset":
            with open(os.path.join(case_dir, "weights.bin"), "wb") as f:
                f.write(data)
            external("weights.bin", offset=len(data) * 4, length=len(data))
        else:  # inside the folder: a legal model
            with open(os.path.join(case_dir, "weights.bin"), "wb") as f:
                f.write(data)
            external("weights.bin", 0, len(data))
        save(m)
    elif what == "int_input":
        g.input[0].type.tensor_type.elem_type = TensorProto.INT64
        save(m)
    elif what == "bad_attr":
        g.node[0].attribute.append(helper.make_attribute("kernel_shape", [5, 5]))
        save(m)
    elif what == "bad_weight_shape":
        g.initializer[2].CopyFrom(numpy_helper.from_array(np.ones((3, 7), np.float32), "w2"))
        save(m)
    elif what == "no_outputs":
        del g.output[:]
        save(m)
    elif what == "output_not_produced":
        g.output[0].name = "ghost"
        save(m)
    elif what == "ir_version":
        m.ir_version = int(rng.choice([0, 1, 99]))
        save(m)
    elif what == "fp16_weight":
        g.initializer[0].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(g.initializer[0]).astype(np.float16), "w"))
        save(m)
    elif what == "empty_name_output":
        g.node[1].output[0] = ""
        save(m)
    return what, path, extra, must_refuse


def gen_onnx(rng, assets: Assets, case_dir: str, target: str) -> Case:
    what, path, extra, must_refuse = _onnx_mutation(rng, assets, case_dir)
    out = _out(case_dir, rng)
    pipeline = str(rng.choice(["", "cleanup", "cleanup{fold_constants=false}"]))
    argv = [path, "--pipeline", pipeline, "--target", target, "--out", out, *extra]
    inputs = [p for p in (path, os.path.join(case_dir, "weights.bin"), assets.secret) if os.path.exists(p)]
    return Case("onnx", what, argv=argv, out=out, inputs=inputs, must_refuse=must_refuse, timeout=600)


def _png_bytes(h: int, w: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def gen_data(rng, assets: Assets, case_dir: str, target: str) -> Case:
    kinds = ["valid", "truncated", "garbage", "empty_file", "no_images", "images_rank", "images_size", "object",
             "strings", "complex", "nan", "labels_high", "labels_negative", "labels_float", "labels_count",
             "empty_n", "labels_2d", "int_images", "channels", "png", "png_truncated", "png_garbage", "jpg_empty",
             "image_dir", "png_bomb", "not_npz_suffix", "labels_huge"]
    what = str(rng.choice(kinds))
    r = np.random.default_rng(int(rng.integers(0, 2 ** 31)))
    images = r.standard_normal((12, 3, 32, 32)).astype(np.float32)
    labels = r.integers(0, 10, 12)
    path = os.path.join(case_dir, "data.npz")
    arrays = {"images": images, "labels": labels}
    raw = None
    if what == "truncated":
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        raw = buf.getvalue()[: int(rng.integers(1, len(buf.getvalue())))]
    elif what == "garbage":
        raw = r.integers(0, 256, 2000, dtype=np.uint8).tobytes()
    elif what == "empty_file":
        raw = b""
    elif what == "no_images":
        arrays = {"pixels": images}
    elif what == "images_rank":
        arrays["images"] = images[0]
    elif what == "images_size":
        arrays["images"] = r.standard_normal((12, 3, 28, 28)).astype(np.float32)
    elif what == "channels":
        arrays["images"] = r.standard_normal((12, 1, 32, 32)).astype(np.float32)
    elif what == "object":
        arrays["images"] = np.array([images[0], "x"], dtype=object)
    elif what == "strings":
        arrays["labels"] = np.array(["cat"] * 12)
    elif what == "complex":
        arrays["images"] = images.astype(np.complex64)
    elif what == "nan":
        images[0, 0, 0, 0] = np.nan
    elif what == "labels_high":
        labels[3] = int(rng.choice([10, 11, 1000]))
    elif what == "labels_huge":
        labels[3] = 2 ** 40
    elif what == "labels_negative":
        labels[0] = -1
    elif what == "labels_float":
        arrays["labels"] = labels.astype(np.float32) + 0.5
    elif what == "labels_count":
        arrays["labels"] = labels[:5]
    elif what == "empty_n":
        arrays = {"images": images[:0], "labels": labels[:0]}
    elif what == "labels_2d":
        arrays["labels"] = r.integers(0, 10, (12, 5, 5))
    elif what == "int_images":
        arrays["images"] = (images * 50).astype(np.int16)
    elif what.startswith("png") or what.startswith("jpg") or what == "image_dir":
        suffix = ".jpg" if what.startswith("jpg") else ".png"
        path = os.path.join(case_dir, "image" + suffix)
        if what == "png":
            raw = _png_bytes(40, 30)
        elif what == "png_truncated":
            raw = _png_bytes(40, 30)[:50]
        elif what == "png_garbage":
            raw = b"\x89PNG\r\n\x1a\n" + r.integers(0, 256, 300, dtype=np.uint8).tobytes()
        elif what == "jpg_empty":
            raw = b""
        elif what == "png_bomb":  # a valid header claiming 60000 x 60000 pixels
            import struct
            import zlib

            ihdr = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)
            chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
            raw = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")
        else:
            path = os.path.join(case_dir, "images")
            os.makedirs(path)
            with open(os.path.join(path, "a.png"), "wb") as f:
                f.write(_png_bytes(32, 32))
            with open(os.path.join(path, "b.png"), "wb") as f:
                f.write(b"not a png")
    elif what == "not_npz_suffix":
        path = os.path.join(case_dir, "data.bin")
        raw = b"\0" * 100
    if what != "image_dir":
        if raw is None:
            np.savez(path, **arrays)
        else:
            with open(path, "wb") as f:
                f.write(raw)
    out = _out(case_dir, rng)
    split = str(rng.choice(["test", "test", "val", "train"]))
    argv = [assets.vgg_onnx, "--data", path, "--split", split, "--pipeline", str(rng.choice(["", "cleanup"])),
            "--target", target, "--out", out]
    must_refuse = what not in ("valid", "int_images")
    return Case("data", what, argv=argv, out=out, inputs=[path, assets.vgg_onnx], must_refuse=must_refuse, timeout=600)


class _RunsCode:
    """Pickled, it calls os.system to create a marker file when unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def gen_checkpoint(rng, assets: Assets, case_dir: str, target: str) -> Case:
    import pickle

    import torch

    kinds = ["valid", "truncated", "bitflip", "runs_code", "runs_code_raw", "tensor", "wrong_format", "no_state",
             "wrong_shapes", "extra_key", "unknown_model", "directory", "empty", "garbage", "numpy_array",
             "missing_key", "state_not_tensors"]
    what = str(rng.choice(kinds))
    path = os.path.join(case_dir, "model.pt")
    marker = os.path.join(case_dir, "code-ran")
    must_refuse = what not in ("valid", "bitflip")
    base = torch.load(assets.checkpoint, weights_only=True)
    if what in ("valid", "truncated", "bitflip"):
        with open(assets.checkpoint, "rb") as f:
            data = bytearray(f.read())
        if what == "truncated":
            data = data[: int(rng.integers(1, len(data)))]
        elif what == "bitflip":
            for _ in range(int(rng.integers(1, 4))):
                data[int(rng.integers(0, len(data)))] ^= 0xFF
        with open(path, "wb") as f:
            f.write(bytes(data))
    elif what == "runs_code":
        torch.save({"format": base["format"], "model": "tiny_vgg", "state_dict": base["state_dict"],
                    "payload": _RunsCode(marker)}, path)
    elif what == "runs_code_raw":
        with open(path, "wb") as f:
            pickle.dump(_RunsCode(marker), f)
    elif what == "tensor":
        torch.save(torch.zeros(3), path)
    elif what == "numpy_array":
        torch.save({"format": base["format"], "model": "tiny_vgg", "state_dict": base["state_dict"],
                    "extra": np.zeros(3)}, path)
    else:
        ckpt = dict(base)
        state = dict(base["state_dict"])
        if what == "wrong_format":
            ckpt["format"] = "other/1"
        elif what == "no_state":
            del ckpt["state_dict"]
        elif what == "wrong_shapes":
            key = sorted(state)[int(rng.integers(0, len(state)))]
            state[key] = torch.zeros(tuple(d + 1 for d in state[key].shape) or (2,))
            ckpt["state_dict"] = state
        elif what == "extra_key":
            state["ghost.weight"] = torch.zeros(2)
            ckpt["state_dict"] = state
        elif what == "missing_key":
            del state[sorted(state)[0]]
            ckpt["state_dict"] = state
        elif what == "state_not_tensors":
            ckpt["state_dict"] = {k: 1.0 for k in state}
        elif what == "unknown_model":
            ckpt["model"] = str(rng.choice(["resnet9000", "", "../../etc"]))
        if what == "directory":
            os.makedirs(path)
        elif what == "empty":
            open(path, "wb").close()
        elif what == "garbage":
            with open(path, "wb") as f:
                f.write(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
        else:
            torch.save(ckpt, path)
    return Case("checkpoint", what, call=("call_load_checkpoint", (path, marker)), inputs=[path],
                must_refuse=must_refuse, timeout=300)


def gen_artifact(rng, assets: Assets, case_dir: str, target: str) -> Case:
    kinds = ["valid", "so_truncated", "so_bitflip", "so_appended", "so_missing", "so_garbage_rehashed",
             "json_truncated", "json_field", "json_hash_edited", "json_no_hash", "json_missing", "json_list",
             "json_garbage", "json_shape_rehashed", "json_huge", "empty_dir", "so_is_dir"]
    what = str(rng.choice(kinds))
    directory = os.path.join(case_dir, "artifact")
    shutil.copytree(assets.artifact, directory)
    lib, desc = os.path.join(directory, "model.so"), os.path.join(directory, "model.json")
    with open(desc) as f:
        d = json.load(f)

    def rehash(description, lib_bytes=None):
        from sliver.backends import tvm as tvm_backend
        from sliver.ir.fileio import sha256_file

        description["sha256"] = tvm_backend._hashes(description, sha256_file(lib))
        with open(desc, "w") as f:
            json.dump(description, f)

    if what.startswith("so_"):
        with open(lib, "rb") as f:
            data = bytearray(f.read())
        if what == "so_truncated":
            data = data[: int(rng.integers(0, len(data)))]
        elif what == "so_bitflip":
            pos = int(rng.integers(0, len(data)))
            data[pos] ^= 1 << int(rng.integers(0, 8))
        elif what == "so_appended":
            data += b"\0" * int(rng.integers(1, 100))
        elif what == "so_garbage_rehashed":
            data = bytearray(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
        os.unlink(lib)
        if what == "so_is_dir":
            os.makedirs(lib)
        elif what != "so_missing":
            with open(lib, "wb") as f:
                f.write(bytes(data))
        if what == "so_garbage_rehashed":
            rehash(d)
    elif what == "json_truncated":
        text = open(desc).read()
        with open(desc, "w") as f:
            f.write(text[: int(rng.integers(0, len(text)))])
    elif what == "json_field":
        d["inputs"][0]["shape"] = [1, 3, 9, 9]
        with open(desc, "w") as f:
            json.dump(d, f)
    elif what == "json_hash_edited":
        d["sha256"]["model.so"] = "0" * 64
        with open(desc, "w") as f:
            json.dump(d, f)
    elif what == "json_no_hash":
        del d["sha256"]
        with open(desc, "w") as f:
            json.dump(d, f)
    elif what == "json_missing":
        os.unlink(desc)
    elif what == "json_list":
        with open(desc, "w") as f:
            json.dump([d], f)
    elif what == "json_garbage":
        with open(desc, "wb") as f:
            f.write(rng.integers(0, 256, 300, dtype=np.uint8).tobytes())
    elif what == "json_shape_rehashed":  # consistent hashes, but a description no artifact has
        d["inputs"][0]["shape"] = [1, -3, "x"]
        rehash(d)
    elif what == "json_huge":
        with open(desc, "w") as f:
            f.write("[" * 100000)
    elif what == "empty_dir":
        shutil.rmtree(directory)
        os.makedirs(directory)
    must_refuse = what != "valid"
    return Case("artifact", what, call=("call_load_artifact", (directory,)), inputs=[directory],
                must_refuse=must_refuse, timeout=300)


GENERATORS = {"pipeline": gen_pipeline, "onnx": gen_onnx, "data": gen_data, "checkpoint": gen_checkpoint,
              "artifact": gen_artifact}


# -- the run ----------------------------------------------------------------------------------
def run(n: int, seed: int, kinds=KINDS, target: str = "mixed", work: str | None = None, verbose: bool = False,
        stream=sys.stdout) -> dict:
    """Run ``n`` cases; returns {"counts": {kind: {verdict: n}}, "defects": [...], "composition": [...]}."""
    os.environ.setdefault("SLIVER_MEMORY_LIMIT", str(4 << 30))  # huge-shape cases: refuse on any machine
    own = work is None
    work = work or tempfile.mkdtemp(prefix="sliver-fuzz-")
    assets = Assets(os.path.join(work, "assets"), seed)
    counts = {k: {"compiled": 0, "refused": 0, "defect": 0} for k in kinds}
    defects, composition = [], []
    scratch = os.path.join(work, "scratch")
    os.makedirs(scratch, exist_ok=True)
    t0 = time.perf_counter()
    for i in range(n):
        kind = kinds[i % len(kinds)]
        rng = np.random.default_rng([seed, i])
        case_dir = os.path.join(work, "cases", f"{i:04d}")
        shutil.rmtree(case_dir, ignore_errors=True)
        os.makedirs(case_dir)
        tgt = target if target != "mixed" else str(rng.choice(["x86", "fpga", "fpga", "fpga"]))
        case = GENERATORS[kind](rng, assets, case_dir, tgt)
        verdict = classify(case, scratch)
        counts[kind][verdict.verdict] += 1
        line = f"[{i + 1}/{n}] {kind:<10} {verdict.verdict:<8} {case.what[:90]}"
        if verdict.verdict == "defect":
            entry = {"case": i, "kind": kind, "what": case.what, "detail": verdict.detail,
                     "command": " ".join(case.argv) if case.argv else f"{case.call[0]}{case.call[1]}"}
            (composition if verdict.composition else defects).append(entry)
            for name in ("stdout", "stderr"):
                if os.path.exists(os.path.join(scratch, name)):
                    shutil.copy(os.path.join(scratch, name), os.path.join(case_dir, f"fuzz-{name}.txt"))
            with open(os.path.join(case_dir, "fuzz-case.json"), "w") as f:
                json.dump(entry, f, indent=1)
            line += f"\n      -> {verdict.detail}"
        elif verbose:
            line += f"  ({verdict.detail[:100]})"
        print(line, file=stream, flush=True)
        if verdict.verdict != "defect":
            shutil.rmtree(case_dir, ignore_errors=True)
    close_runner()
    if own and not defects and not composition:
        shutil.rmtree(work, ignore_errors=True)
    return {"counts": counts, "defects": defects, "composition": composition, "seconds": time.perf_counter() - t0,
            "work": work}


def format_counts(result: dict) -> str:
    lines = [f"{'kind':<12}{'cases':>7}{'compiled':>10}{'refused':>9}{'defect':>8}"]
    total = {"compiled": 0, "refused": 0, "defect": 0}
    for kind, c in result["counts"].items():
        lines.append(f"{kind:<12}{sum(c.values()):>7}{c['compiled']:>10}{c['refused']:>9}{c['defect']:>8}")
        for k in total:
            total[k] += c[k]
    lines.append(f"{'total':<12}{sum(total.values()):>7}{total['compiled']:>10}{total['refused']:>9}{total['defect']:>8}")
    return "\n".join(lines)


def main(argv=None) -> int:
    if (sys.argv[1:] if argv is None else argv) == ["--zygote"]:  # the case runner (internal)
        return _zygote_main()
    p = argparse.ArgumentParser(description="Fuzz sliver with random and hostile inputs.")
    p.add_argument("n", type=int, help="number of cases (spread evenly over the kinds)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated subset of {','.join(KINDS)}")
    p.add_argument("--target", default="mixed", choices=["mixed", "x86", "fpga"],
                   help="compile.py target of the cases (mixed: a quarter x86, the rest fpga)")
    p.add_argument("--work", help="working directory (default: a temporary one, kept when there are defects)")
    p.add_argument("--json", help="also write the counts and defects to this JSON file")
    p.add_argument("-v", "--verbose", action="store_true", help="print the refusal message of every case")
    args = p.parse_args(argv)

    def stop(signum, _frame):
        close_runner()  # the runner kills the running case's process group
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        p.error(f"unknown kind {unknown[0] if unknown else '(none)'}; kinds: {', '.join(KINDS)}")
    result = run(args.n, args.seed, kinds, args.target, args.work, args.verbose)
    print(f"\nsliver fuzz: {args.n} cases, seed {args.seed}, {result['seconds']:.0f} s")
    print(format_counts(result))
    if result["composition"]:
        print(f"\ndefects inside passes (composition): {len(result['composition'])}")
        for d in result["composition"]:
            print(f"  case {d['case']}: {d['what']}\n      {d['detail']}")
    if result["defects"]:
        print(f"\ndefects: {len(result['defects'])} (cases kept in {result['work']})")
        for d in result["defects"]:
            print(f"  case {d['case']} {d['kind']} {d['what']}: {d['detail']}\n      {d['command']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 1 if result["defects"] or result["composition"] else 0


if __name__ == "__main__":
    sys.exit(main())
