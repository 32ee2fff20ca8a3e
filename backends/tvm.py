"""TVM lowering: build an onnx- or tvm-level Program for a CPU target, save, load and run it.

Targets are given by name or in TVM's dict form (TVM 0.27 accepts only that):

- ``"x86"``: the host CPU, with its LLVM CPU name detected (``"mcpu": "native"`` would silently
  fall back to a generic CPU in TVM 0.27, so the name is asked from LLVM and written out);
- ``"arm"``: 64-bit ARM Linux with NEON (``aarch64-linux-gnu``, Cortex-A53 baseline);
- ``"arm-dotprod"`` (also ``"aarch64-dotprod"``): the same with the dot-product extension
  (Cortex-A55, ``+dotprod``): integer matmuls and convolutions run on ``sdot``
  (:func:`sliver.backends.schedules.int8_dot_intrinsic`);
- a dict such as ``{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72"}``.

An :class:`Artifact` is the compiled module plus what is needed to call it (input names, shapes,
dtypes, the target). On disk it is ``model.so`` (a shared library with the weights inside) and
``model.json`` (that description), written atomically.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..ir.convert import convert
from ..ir.errors import ArtifactError, BackendError
from ..ir.fileio import sha256_bytes, sha256_file
from ..ir.program import Program

ARM_TARGET = {
    "kind": "llvm",
    "mtriple": "aarch64-linux-gnu",
    "mcpu": "cortex-a53",
    "mattr": ["+neon"],
}
#: aarch64 with the dot-product extension (ARMv8.2 ``sdot``/``udot``): Cortex-A55, the in-order
#: successor of the A53 (Cortex-A76 and later cores have it too)
ARM_DOTPROD_TARGET = {
    "kind": "llvm",
    "mtriple": "aarch64-linux-gnu",
    "mcpu": "cortex-a55",
    "mattr": ["+neon", "+dotprod"],
}


def host_target() -> dict:
    """The host CPU as a TVM target dict, with its CPU name detected by LLVM."""
    import tvm

    target = {"kind": "llvm", "num-cores": os.cpu_count() or 1}
    try:
        cpu = tvm.target.codegen.llvm_get_system_cpu()
    except Exception:
        cpu = ""
    if cpu and cpu != "generic":
        target["mcpu"] = cpu
    return target


def resolve_target(target) -> dict:
    """A target name (``x86``, ``arm``, ``arm-dotprod``; ``host``, ``aarch64``,
    ``aarch64-dotprod`` as aliases) or dict -> a TVM target dict."""
    if isinstance(target, dict):
        if target.get("kind") != "llvm":
            raise BackendError(f"sliver builds CPU code: the target kind must be 'llvm', got {target.get('kind')!r}")
        return dict(target)
    names = {"x86": host_target, "host": host_target, "arm": lambda: dict(ARM_TARGET), "aarch64": lambda: dict(ARM_TARGET),
             "arm-dotprod": lambda: dict(ARM_DOTPROD_TARGET), "aarch64-dotprod": lambda: dict(ARM_DOTPROD_TARGET)}
    if target not in names:
        raise BackendError(f"unknown target {target!r}; use x86, arm, arm-dotprod (aarch64 with sdot), or a TVM target dict")
    return names[target]()


def is_host(target: dict) -> bool:
    triple = target.get("mtriple", "")
    return not triple or triple.startswith(os.uname().machine)


@dataclass
class Artifact:
    """A compiled model: a Relax VM executable for one target."""

    executable: object
    target: dict
    input_names: list
    input_shapes: list
    input_dtypes: list
    name: str = "model"
    meta: dict = field(default_factory=dict)
    _library: str | None = field(default=None, init=False, repr=False, compare=False)
    _module: object = field(default=None, init=False, repr=False, compare=False)

    def _export(self, path: str, cc: str | None = None) -> None:
        try:
            if cc:
                self.executable.export_library(path, cc=cc)
            else:
                self.executable.export_library(path)
        except Exception as e:
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise BackendError(f"writing the shared library failed: {msg}") from None

    def _host_library(self) -> str:
        """The executable exported once, for this machine, to a private temporary file (removed
        with the artifact). Every export runs LLVM's code generation (~10 s on the integer tiny
        DeiT), and a VirtualMachine made from the unexported executable would export it itself:
        running and saving share this one."""
        if self._library is None:
            directory = tempfile.mkdtemp(prefix="sliver-artifact-")
            weakref.finalize(self, shutil.rmtree, directory, True)
            path = os.path.join(directory, "model.so")
            self._export(path)
            self._library = path
        return self._library

    def _runnable(self):
        """A runtime module the VirtualMachine can run on this machine."""
        import tvm

        if not is_host(self.target):
            raise BackendError(f"this artifact targets {self.target.get('mtriple')}; run it on that device")
        if self._module is None:
            if isinstance(self.executable, tvm.runtime.Executable):
                self._module = tvm.runtime.load_module(self._host_library())
            else:  # loaded from a saved library (load())
                self._module = self.executable
        return self._module

    def run(self, inputs: Sequence) -> list:
        """Run on ``inputs`` (numpy arrays, in order) on this machine; returns numpy arrays."""
        import tvm
        from tvm import relax

        if len(inputs) != len(self.input_names):
            raise BackendError(f"{self.name} takes {len(self.input_names)} input(s), got {len(inputs)}")
        arrays = []
        for a, shape, dtype, name in zip(inputs, self.input_shapes, self.input_dtypes, self.input_names):
            a = np.ascontiguousarray(np.asarray(a), dtype=dtype)
            if tuple(a.shape) != tuple(shape):
                raise BackendError(f"input {name!r} must have shape {tuple(shape)}, got {tuple(a.shape)}")
            arrays.append(a)
        module = self._runnable()
        dev = tvm.cpu()
        vm = relax.VirtualMachine(module, dev)
        out = vm["main"](*[tvm.runtime.tensor(a, dev) for a in arrays])
        return _to_numpy(out)

    def runner(self):
        """A function ``run(inputs) -> None`` bound to one VM, for timing (no output copies)."""
        import tvm
        from tvm import relax

        module = self._runnable()
        dev = tvm.cpu()
        main = relax.VirtualMachine(module, dev)["main"]
        dtypes = list(self.input_dtypes)
        # input tensors allocated once and refilled per call, as a deployed runtime does: a fresh
        # 600 KB tensor per call cost ~0.15 ms of page faults on MobileNetV2 (3.5 vs 3.4 ms)
        buffers = [tvm.runtime.empty(tuple(s), d, dev) for s, d in zip(self.input_shapes, dtypes)]

        def run(inputs):
            for buf, a, d in zip(buffers, inputs, dtypes):
                buf.copyfrom(np.ascontiguousarray(a, dtype=d))
            main(*buffers)

        return run

    def profile(self, inputs: Sequence, repeat: int = 10) -> list:
        """Time every kernel call of ``main`` (VM instrumentation); host targets only.

        Returns rows ``{"kernel", "calls", "min_ms", "median_ms"}`` sorted by ``min_ms``: a
        kernel's calls per run times the fastest of all its calls (every call of a kernel does
        the same work: static shapes), and the median time it takes per run. On a loaded
        machine the sum of ``min_ms`` is the closest estimate of the idle time (a whole run's
        minimum still includes waits for descheduled worker threads).
        """
        import time

        import tvm
        from tvm import relax

        module = self._runnable()
        dev = tvm.cpu()
        vm = relax.VirtualMachine(module, dev)
        args = [tvm.runtime.tensor(np.ascontiguousarray(a, dtype=d), dev) for a, d in zip(inputs, self.input_dtypes)]
        vm["main"](*args)  # warm-up
        runs, current, started = [], [], {}

        def instrument(func, symbol, before, ret, *call_args):
            if before:
                started[symbol] = time.perf_counter()
            else:
                current.append((symbol, time.perf_counter() - started[symbol]))
            return 0

        vm.set_instrument(instrument)
        for _ in range(max(1, repeat)):
            current = []
            vm["main"](*args)
            runs.append(current)
        rows = {}
        for run in runs:
            per_run = {}
            for name, t in run:
                if not name.startswith("vm.builtin."):
                    per_run.setdefault(name, []).append(t)
            for name, ts in per_run.items():
                row = rows.setdefault(name, {"kernel": name, "calls": len(ts), "fastest": [], "totals": []})
                row["fastest"].append(min(ts))
                row["totals"].append(sum(ts))
        for row in rows.values():
            fastest, totals = row.pop("fastest"), sorted(row.pop("totals"))
            row["min_ms"] = 1e3 * row["calls"] * min(fastest)
            row["median_ms"] = 1e3 * totals[len(totals) // 2]
        return sorted(rows.values(), key=lambda r: -r["min_ms"])

    def save(self, directory: str | os.PathLike) -> dict:
        """Write ``model.so`` and ``model.json`` into ``directory`` (atomically); returns paths."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        lib = os.path.join(directory, "model.so")
        desc = os.path.join(directory, "model.json")
        cc = None if is_host(self.target) else "aarch64-linux-gnu-g++"
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            tmp_lib = os.path.join(tmp, "model.so")
            import tvm

            if cc is None and isinstance(self.executable, tvm.runtime.Executable):
                shutil.copyfile(self._host_library(), tmp_lib)  # exported once (see _host_library)
            else:
                self._export(tmp_lib, cc)
            description = self.description()
            description["sha256"] = _hashes(description, sha256_file(tmp_lib))
            with open(os.path.join(tmp, "model.json"), "w") as f:
                json.dump(description, f, indent=2)
            # the library first: a reader that sees the new model.json sees the library it names
            # (a reader between the two renames finds the hashes disagree and is refused)
            os.replace(tmp_lib, lib)
            os.replace(os.path.join(tmp, "model.json"), desc)
        return {"library": lib, "description": desc}

    def description(self) -> dict:
        return {
            "name": self.name,
            "target": self.target,
            "inputs": [
                {"name": n, "shape": list(s), "dtype": d}
                for n, s, d in zip(self.input_names, self.input_shapes, self.input_dtypes)
            ],
            "runtime": "tvm.relax.VirtualMachine, function 'main'",
            **self.meta,
        }


def _to_numpy(out) -> list:
    if hasattr(out, "numpy"):
        return [out.numpy()]
    return [a for item in out for a in _to_numpy(item)]


#: schedule choices for :func:`build`: ``"rules"`` (sliver's own CPU rules, the default) or
#: ``"none"`` (TVM's default pipeline, no schedules: the slow baseline, ~50-85x slower).
#: A MetaSchedule-database choice belongs here once tuning beats the rules (see README).
SCHEDULES = ("rules", "none")


def fusion_passes(target: dict) -> list:
    """Relax passes up to fused PrimFuncs: layouts, fast math, legalisation, fusion.

    Convolutions go to NHWC activations with HWIO weights, so that output channels are the
    innermost, contiguous axis of outputs and weights (the axis the rules vectorise);
    ``FastMathTransform`` replaces ``exp``/``erf``/softmax by vectorisable polynomials (scalar
    libm calls made softmax and GELU 10x slower than the matmuls around them).
    """
    from tvm import relax

    from . import schedules

    return [
        # TVM's own CPU library dispatch first (topk/sort/scan of token selection, sampling)
        relax.backend.DispatchSampling(),
        relax.backend.DispatchSortScan(),
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
        schedules.integer_relu_min(),
        schedules.take_before_permute(),
        relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "HWIO"]}),
        schedules.fold_input_transpose(schedules.cpu_params(target).lanes),
        schedules.lane_softmax(schedules.cpu_params(target).lanes),
        relax.transform.FastMathTransform(),
        relax.transform.LegalizeOps(schedules.packed_legalizers(target)),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        schedules.fuse_depthwise_pointwise(schedules.cpu_params(target).lanes),
        relax.transform.FuseTIR(),
    ]


def lowering_passes() -> list:
    """Relax passes after scheduling: the CPU backend's dataflow lowering and finalisation."""
    from tvm import relax

    return [
        relax.transform.RewriteDataflowReshape(),
        relax.transform.ToNonDataflow(),
        relax.transform.RemovePurityChecking(),
        relax.transform.CallTIRRewrite(),
        relax.transform.StaticPlanBlockMemory(),
        relax.transform.LowerAllocTensor(),
        relax.transform.KillAfterLastUse(),
        relax.transform.LowerRuntimeBuiltin(),
        relax.transform.ComputePrimValue(),
        relax.transform.VMShapeLower(),
        relax.transform.AttachGlobalSymbol(),
    ]


def relax_pipeline(target: dict, schedule: str = "rules"):
    """The Relax pipeline :func:`build` runs for ``target`` (a TVM target dict)."""
    import tvm

    from . import schedules

    if schedule not in SCHEDULES:
        raise BackendError(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
    if schedule == "none":
        return None
    passes = fusion_passes(target)
    passes.append(schedules.schedule_module(target))
    passes += lowering_passes()
    seq = tvm.transform.Sequential(passes)
    tvm_target = tvm.target.Target(target)

    @tvm.transform.module_pass(opt_level=0, name="SliverCpuPipeline")
    def _pipeline(mod, _ctx):
        with tvm_target:
            return seq(mod)

    return _pipeline


def _full_width_loops(tdict: dict) -> dict:
    """On AVX-512 x86, LLVM's own loop vectoriser uses 512-bit vectors too (``-prefer-256-bit``).

    LLVM's tuning for AVX-512 Intel cores prefers 256-bit vectors in the loops it vectorises
    itself, while the rules' explicit vectors are 512 bits wide: softmax's exponential and the
    row loops of LayerNorm and the integer kernels ran at half width (one DeiT-S softmax, one
    thread: 0.237 -> 0.135 ms). A target dict that names ``prefer-256-bit`` in ``mattr`` keeps its
    choice.
    """
    from . import schedules

    attrs = list(tdict.get("mattr", []) or [])
    if schedules.cpu_params(tdict).lanes != 16 or any("prefer-256-bit" in a for a in attrs):
        return tdict
    return dict(tdict, mattr=attrs + ["-prefer-256-bit"])


def build(program: Program, target="x86", schedule: str = "rules") -> Artifact:
    """Lower ``program`` (onnx or tvm level) to the tvm level and compile it for ``target``.

    ``schedule`` picks how loops are scheduled (see :data:`SCHEDULES`): by default sliver's
    CPU rules (:mod:`sliver.backends.schedules`) after NHWC layout conversion and fast math.
    """
    import tvm

    if program.level == "torch":
        raise BackendError("build() takes an onnx- or tvm-level program; run it through a pipeline or ir.to_onnx first")
    tdict = resolve_target(target)
    if schedule == "rules":
        # let LLVM reassociate float arithmetic (a target dict may say False): row sums and
        # maxima of softmax and LayerNorm then run on vectors instead of one scalar add chain
        # per row (DeiT-S's 25 LayerNorms: 3.9 -> 1.0 ms). Integers held in floats by the
        # integer rules stay exact: every value and every partial sum there is an integer
        # below 2^24 (float32) or 2^53 (float64), whatever the order.
        tdict.setdefault("fast-math-reassoc", True)
        tdict = _full_width_loops(tdict)
    pipeline = relax_pipeline(tdict, schedule)
    from . import lowering

    from . import schedules

    with lowering.build_importers(dot_product=schedules.int8_dot_intrinsic(tdict) is not None):
        tvm_program = convert(program, "tvm")
    try:
        if pipeline is None:
            executable = tvm.compile(tvm_program.module, target=tvm.target.Target(tdict))
        else:
            executable = tvm.compile(tvm_program.module, target=tvm.target.Target(tdict), relax_pipeline=pipeline)
    except Exception as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise BackendError(f"TVM failed to compile {program.name} for {tdict}: {msg}") from None
    return Artifact(
        executable=executable,
        target=tdict,
        input_names=list(program.input_names),
        input_shapes=[list(a.shape) for a in program.example_inputs],
        input_dtypes=[str(a.dtype) for a in program.example_inputs],
        name=program.name,
        meta={"schedule": schedule},
    )


class BackgroundBuild:
    """:func:`build` and :meth:`Artifact.save` of an onnx-level program in another process.

    TVM compiles one model on one core; a second model (e.g. the input model that ``tools/compile.py
    --compare-dense`` times beside the result) builds on another core meanwhile. :meth:`result`
    waits and returns the saved artifact, loaded (:func:`load`), or raises :class:`BackendError`
    with the child's last error line."""

    def __init__(self, program: Program, target, directory: str | os.PathLike, schedule: str = "rules"):
        import subprocess
        import sys

        if program.level != "onnx":
            raise BackendError("a background build takes an onnx-level program")
        self.directory = os.fspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        source = os.path.join(self.directory, "input.onnx")
        with open(source, "wb") as f:
            f.write(program.module.SerializeToString())
        spec = json.dumps({"source": source, "target": resolve_target(target), "directory": self.directory,
                           "schedule": schedule, "name": program.name,
                           "shapes": {n: list(a.shape) for n, a in zip(program.input_names, program.example_inputs)}})
        self._errors = os.path.join(self.directory, "stderr.txt")
        with open(self._errors, "wb") as err:
            self._proc = subprocess.Popen([sys.executable, "-c", "import sys; from sliver.backends.tvm import _build_child; "
                                           "_build_child(sys.argv[1])", spec],
                                          stdout=subprocess.DEVNULL, stderr=err)

    def result(self) -> Artifact:
        if self._proc.wait() != 0:
            with open(self._errors, errors="replace") as f:
                lines = [line.strip() for line in f if line.strip()]
            raise BackendError(f"the background TVM build failed: {lines[-1] if lines else f'exit {self._proc.returncode}'}")
        return load(self.directory)

    def cancel(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()


def _build_child(spec: str) -> None:
    from ..ir import onnx_level

    spec = json.loads(spec)
    program = onnx_level.load(spec["source"], input_shapes=spec["shapes"], name=spec["name"])
    build(program, spec["target"], spec["schedule"]).save(spec["directory"])


def _hashes(description: dict, library_sha256: str) -> dict:
    """``{"model.so": <sha256 of the library>, "model.json": <sha256 of the description>}``; the
    description's hash covers its canonical JSON (without this field) and the library's hash."""
    body = {k: v for k, v in description.items() if k != "sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")) + library_sha256
    return {"model.so": library_sha256, "model.json": sha256_bytes(canonical.encode())}


#: the largest model.json :func:`verify` reads (a description is a few KB)
MAX_DESCRIPTION_BYTES = 1 << 20


def verify(directory: str | os.PathLike) -> dict:
    """The description of the artifact in ``directory``, after checking that ``model.so`` and
    ``model.json`` are exactly the files :meth:`Artifact.save` wrote (SHA-256 recorded in
    model.json). Raises :class:`ArtifactError` otherwise; nothing is loaded or executed."""
    directory = os.fspath(directory)
    lib = os.path.join(directory, "model.so")
    desc = os.path.join(directory, "model.json")
    if not os.path.isdir(directory) or not (os.path.isfile(lib) and os.path.isfile(desc)):
        raise ArtifactError(f"{directory} holds no sliver artifact (model.so and model.json); build one with tools/compile.py")
    rebuild = "rebuild the artifact with tools/compile.py"
    try:
        if os.path.getsize(desc) > MAX_DESCRIPTION_BYTES:
            raise ValueError
        with open(desc, "rb") as f:
            d = json.loads(f.read().decode("utf-8"))
        if not isinstance(d, dict):
            raise ValueError
    except (ValueError, UnicodeDecodeError, OSError, RecursionError):
        raise ArtifactError(f"{desc} is not a valid artifact description (truncated or altered); {rebuild}") from None
    hashes = d.get("sha256")
    if not isinstance(hashes, dict) or not isinstance(hashes.get("model.so"), str):
        raise ArtifactError(f"{desc} records no SHA-256 of model.so (an artifact from an older sliver or "
                            f"not from sliver); {rebuild}")
    library_sha256 = sha256_file(lib)
    if _hashes(d, hashes["model.so"])["model.json"] != hashes.get("model.json"):
        raise ArtifactError(f"{desc} was altered after it was written (its SHA-256 does not match); {rebuild}")
    if library_sha256 != hashes["model.so"]:
        raise ArtifactError(f"{lib} was altered or truncated after it was written (its SHA-256 does not "
                            f"match model.json); {rebuild}")
    inputs = d.get("inputs")
    ok = isinstance(d.get("target"), dict) and isinstance(inputs, list) and all(
        isinstance(i, dict) and isinstance(i.get("name"), str) and isinstance(i.get("dtype"), str)
        and isinstance(i.get("shape"), list) and all(isinstance(n, int) and n > 0 for n in i["shape"])
        for i in inputs)
    if not ok:
        raise ArtifactError(f"{desc} lacks the target or input fields of an artifact description; {rebuild}")
    return d


def load(directory: str | os.PathLike) -> Artifact:
    """Load an artifact written by :meth:`Artifact.save` (host targets only), after
    :func:`verify` has checked its files against the hashes in model.json."""
    import tvm

    directory = os.fspath(directory)
    d = verify(directory)
    lib = os.path.join(directory, "model.so")
    try:
        executable = tvm.runtime.load_module(lib)
    except Exception:
        raise ArtifactError(f"{lib} cannot be loaded on this machine (built for {d['target'].get('mtriple') or 'another host'}?); "
                            "rebuild the artifact for this machine") from None
    return Artifact(
        executable=executable,
        target=d["target"],
        input_names=[i["name"] for i in d["inputs"]],
        input_shapes=[i["shape"] for i in d["inputs"]],
        input_dtypes=[i["dtype"] for i in d["inputs"]],
        name=d.get("name", "model"),
    )


# ------------------------------------------------------------------------------------------------
# aarch64: checking a cross-compiled library, and running it under qemu-user


#: ELF e_machine codes of the architectures sliver builds for
ELF_MACHINES = {62: "x86_64", 183: "aarch64"}
#: cross tools the aarch64 path needs (``make setup-arm`` installs them with apt-get)
ARM_TOOLS = ("aarch64-linux-gnu-g++", "qemu-aarch64-static")
#: where ``make setup-arm`` puts the aarch64 TVM runtime and the runner built against it
ARM_RUNTIME_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "build", "arm-runtime")
_RUNNER_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runner", "run_model.cc")
_ARM_SYSROOT = "/usr/aarch64-linux-gnu"


def inspect_library(path: str | os.PathLike) -> dict:
    """Architecture and exported symbols of a shared library, read from its ELF headers.

    Returns ``{"format": "ELF64", "machine": "aarch64", "symbols": [...]}`` where ``symbols`` are
    the defined dynamic symbols (what the TVM runtime looks up: ``__tvm_ffi__library_bin``, the
    serialised VM executable, and one ``__tvm_ffi_<kernel>`` per compiled PrimFunc). Needs no
    tool of the target architecture.
    """
    import struct

    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF":
        raise BackendError(f"{path} is not an ELF shared library")
    if data[4] != 2 or data[5] != 1:
        raise BackendError(f"{path} is not a 64-bit little-endian ELF file")
    e_machine = struct.unpack_from("<H", data, 18)[0]
    e_shoff = struct.unpack_from("<Q", data, 40)[0]
    e_shentsize, e_shnum = struct.unpack_from("<HH", data, 58)
    sections = []
    for k in range(e_shnum):
        off = e_shoff + k * e_shentsize
        _name, sh_type, _flags, _addr, sh_offset, sh_size, sh_link, _info, _align, sh_entsize = struct.unpack_from(
            "<IIQQQQIIQQ", data, off
        )
        sections.append((sh_type, sh_offset, sh_size, sh_link, sh_entsize))
    symbols = []
    for sh_type, offset, size, link, entsize in sections:
        if sh_type != 11:  # SHT_DYNSYM
            continue
        str_off = sections[link][1]
        for pos in range(offset, offset + size, entsize or 24):
            st_name, st_info, _other, st_shndx = struct.unpack_from("<IBBH", data, pos)
            if st_shndx == 0 or st_name == 0:  # undefined or unnamed
                continue
            end = data.index(b"\0", str_off + st_name)
            symbols.append(data[str_off + st_name : end].decode())
    return {"format": "ELF64", "machine": ELF_MACHINES.get(e_machine, f"e_machine {e_machine}"), "symbols": sorted(symbols)}


def check_library(path: str | os.PathLike, target: dict) -> dict:
    """The static checks of a cross-compiled artifact: ELF architecture and TVM's entry symbols.

    Raises :class:`BackendError` when the library is for another architecture or lacks the
    serialised executable; returns what was checked (for report.json).
    """
    info = inspect_library(path)
    triple = target.get("mtriple", "") or os.uname().machine
    want = "aarch64" if triple.startswith("aarch64") else ("x86_64" if triple.startswith("x86_64") else triple.split("-")[0])
    if info["machine"] != want:
        raise BackendError(f"{path} is built for {info['machine']}, not {want}; rebuild with --target matching the device")
    if "__tvm_ffi__library_bin" not in info["symbols"]:
        raise BackendError(f"{path} exports no __tvm_ffi__library_bin (the VM executable); it is not a TVM artifact")
    kernels = [s for s in info["symbols"] if s.startswith("__tvm_ffi_") and s != "__tvm_ffi__library_bin"]
    return {"format": info["format"], "machine": info["machine"], "executable_symbol": "__tvm_ffi__library_bin", "kernels": len(kernels)}


def missing_arm_tools() -> list:
    """The cross tools of :data:`ARM_TOOLS` that are not on PATH (and a missing sysroot)."""
    import shutil

    missing = [t for t in ARM_TOOLS if shutil.which(t) is None]
    if not os.path.isdir(_ARM_SYSROOT):
        missing.append(_ARM_SYSROOT)
    return missing


def arm_runtime(directory: str | os.PathLike = ARM_RUNTIME_DIR, fetch: bool = True) -> dict:
    """The aarch64 TVM runtime and ``run_model`` built against it, in ``directory``.

    On first use (``fetch=True``): ``pip download`` of the aarch64 wheels of the installed
    ``apache-tvm`` and ``apache-tvm-ffi`` versions, their runtime libraries unpacked into
    ``directory/lib``, and ``backends/runner/run_model.cc`` cross-compiled to
    ``directory/run_model``. Later calls reuse them. Returns ``{"runner", "lib"}``.
    """
    import glob
    import importlib.metadata as metadata
    import shutil
    import subprocess
    import sys
    import zipfile

    directory = os.path.abspath(os.fspath(directory))
    runner = os.path.join(directory, "run_model")
    lib = os.path.join(directory, "lib")
    needed = ["libtvm_runtime.so", "libtvm_runtime_extra.so", "libtvm_ffi.so"]
    fresh = os.path.exists(runner) and os.path.getmtime(runner) >= os.path.getmtime(_RUNNER_SOURCE)
    if fresh and all(os.path.exists(os.path.join(lib, n)) for n in needed):
        return {"runner": runner, "lib": lib}
    if not fetch:
        raise BackendError(f"no aarch64 runtime in {directory}; run `make setup-arm`")
    missing = missing_arm_tools()
    if missing:
        raise BackendError(f"missing {', '.join(missing)}; run `make setup-arm` (apt-get install g++-aarch64-linux-gnu qemu-user-static)")
    wheels = os.path.join(directory, "wheels")
    os.makedirs(wheels, exist_ok=True)
    pins = [f"apache-tvm=={metadata.version('apache-tvm')}", f"apache-tvm-ffi=={metadata.version('apache-tvm-ffi')}"]
    pyver = f"{sys.version_info[0]}{sys.version_info[1]}"
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--only-binary=:all:", "--no-deps",
           "--platform", "manylinux_2_28_aarch64", "--python-version", pyver, "-d", wheels, *pins]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BackendError(f"pip download of the aarch64 TVM wheels failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    unpacked = os.path.join(directory, "unpacked")
    for wheel in glob.glob(os.path.join(wheels, "*aarch64*.whl")):
        with zipfile.ZipFile(wheel) as z:
            z.extractall(unpacked)
    os.makedirs(lib, exist_ok=True)
    for name in needed:
        found = glob.glob(os.path.join(unpacked, "**", name), recursive=True)
        if not found:
            raise BackendError(f"the aarch64 wheels hold no {name}; check the versions {', '.join(pins)}")
        shutil.copy2(found[0], os.path.join(lib, name))
    include = glob.glob(os.path.join(unpacked, "**", "tvm", "ffi", "function.h"), recursive=True)
    if not include:
        raise BackendError("the apache-tvm-ffi wheel holds no C++ headers (tvm/ffi/function.h)")
    include_dir = os.path.dirname(os.path.dirname(os.path.dirname(include[0])))
    dlpack = glob.glob(os.path.join(unpacked, "**", "dlpack", "dlpack.h"), recursive=True)
    flags = ["-I" + include_dir] + (["-I" + os.path.dirname(os.path.dirname(dlpack[0]))] if dlpack else [])
    cmd = ["aarch64-linux-gnu-g++", "-std=c++17", "-O2", _RUNNER_SOURCE, *flags, "-L" + lib,
           "-ltvm_runtime", "-ltvm_runtime_extra", "-ltvm_ffi", "-o", runner + ".tmp"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BackendError(f"building run_model for aarch64 failed: {(proc.stderr.strip().splitlines() or ['?'])[0]}")
    os.replace(runner + ".tmp", runner)
    return {"runner": runner, "lib": lib}


def run_with_qemu(artifact_dir: str | os.PathLike, inputs: Sequence, runtime_dir: str | os.PathLike = ARM_RUNTIME_DIR,
                  timeout: float = 600, cpu: str | None = None) -> list:
    """Run an aarch64 artifact (``model.so`` + ``model.json``) under qemu-user on this machine.

    For correctness only (qemu timings mean nothing). Uses the runtime of :func:`arm_runtime`
    (built on first use); one float32 input, returns the first output as a numpy array in a list.
    ``cpu`` is the CPU qemu emulates (``-cpu``). By default: ``max`` (every extension qemu
    emulates) for a target with the dot-product extension (``arm-dotprod``), so that its ``sdot``
    instructions do not depend on qemu's default CPU (qemu-user 7.2's default ran them here; with
    ``-cpu cortex-a53`` they stop the run as illegal instructions); qemu's default otherwise.
    """
    import subprocess

    from .schedules import cpu_has_feature

    artifact_dir = os.path.abspath(os.fspath(artifact_dir))
    desc = verify(artifact_dir)
    specs = desc["inputs"]
    if len(inputs) != 1 or len(specs) != 1 or specs[0]["dtype"] != "float32":
        raise BackendError("the aarch64 runner takes one float32 input; this model has " + ", ".join(f"{s['dtype']}{s['shape']}" for s in specs))
    x = np.ascontiguousarray(np.asarray(inputs[0]), dtype=np.float32)
    if list(x.shape) != list(specs[0]["shape"]):
        raise BackendError(f"input must have shape {tuple(specs[0]['shape'])}, got {tuple(x.shape)}")
    runtime = arm_runtime(runtime_dir)
    if cpu is None and cpu_has_feature(desc.get("target", {}), "dotprod"):
        cpu = "max"
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "input.bin"), os.path.join(tmp, "output.bin")
        x.tofile(src)
        env = dict(os.environ, QEMU_LD_PREFIX=_ARM_SYSROOT, LD_LIBRARY_PATH=runtime["lib"])
        cmd = ["qemu-aarch64-static", *(["-cpu", cpu] if cpu else []), runtime["runner"],
               os.path.join(artifact_dir, "model.so"), src, ",".join(str(d) for d in x.shape), dst]
        # (in the temporary directory: a crash's core file, if any, goes there)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=tmp)
        if proc.returncode != 0:
            raise BackendError(f"the aarch64 artifact failed under qemu: {(proc.stderr.strip().splitlines() or ['exit ' + str(proc.returncode)])[-1]}")
        shape_line = [line for line in proc.stdout.splitlines() if line.startswith("output shape")]
        shape = tuple(int(d) for d in shape_line[-1].split()[-1].split(","))
        return [np.fromfile(dst, dtype=np.float32).reshape(shape)]
