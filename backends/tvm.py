"""TVM lowering: build an onnx- or tvm-level Program for a CPU target, save, load and run it.

Targets are given by name or in TVM's dict form (TVM 0.27 accepts only that):

- ``"x86"``: the host CPU, with its LLVM CPU name detected (``"mcpu": "native"`` would silently
  fall back to a generic CPU in TVM 0.27, so the name is asked from LLVM and written out);
- ``"arm"``: 64-bit ARM Linux with NEON (``aarch64-linux-gnu``, Cortex-A53 baseline);
- a dict such as ``{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72"}``.

An :class:`Artifact` is the compiled module plus what is needed to call it (input names, shapes,
dtypes, the target). On disk it is ``model.so`` (a shared library with the weights inside) and
``model.json`` (that description), written atomically.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..ir.convert import convert
from ..ir.errors import BackendError
from ..ir.program import Program

ARM_TARGET = {
    "kind": "llvm",
    "mtriple": "aarch64-linux-gnu",
    "mcpu": "cortex-a53",
    "mattr": ["+neon"],
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
    """A target name (``x86``, ``arm``) or dict -> a TVM target dict."""
    if isinstance(target, dict):
        if target.get("kind") != "llvm":
            raise BackendError(f"sliver builds CPU code: the target kind must be 'llvm', got {target.get('kind')!r}")
        return dict(target)
    names = {"x86": host_target, "host": host_target, "arm": lambda: dict(ARM_TARGET), "aarch64": lambda: dict(ARM_TARGET)}
    if target not in names:
        raise BackendError(f"unknown target {target!r}; use x86, arm, or a TVM target dict")
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

    def run(self, inputs: Sequence) -> list:
        """Run on ``inputs`` (numpy arrays, in order) on this machine; returns numpy arrays."""
        import tvm
        from tvm import relax

        if not is_host(self.target):
            raise BackendError(f"this artifact targets {self.target.get('mtriple')}; run it on that device")
        if len(inputs) != len(self.input_names):
            raise BackendError(f"{self.name} takes {len(self.input_names)} input(s), got {len(inputs)}")
        arrays = []
        for a, shape, dtype, name in zip(inputs, self.input_shapes, self.input_dtypes, self.input_names):
            a = np.ascontiguousarray(np.asarray(a), dtype=dtype)
            if tuple(a.shape) != tuple(shape):
                raise BackendError(f"input {name!r} must have shape {tuple(shape)}, got {tuple(a.shape)}")
            arrays.append(a)
        dev = tvm.cpu()
        vm = relax.VirtualMachine(self.executable, dev)
        out = vm["main"](*[tvm.runtime.tensor(a, dev) for a in arrays])
        return _to_numpy(out)

    def runner(self):
        """A function ``run(inputs) -> None`` bound to one VM, for timing (no output copies)."""
        import tvm
        from tvm import relax

        if not is_host(self.target):
            raise BackendError(f"this artifact targets {self.target.get('mtriple')}; run it on that device")
        dev = tvm.cpu()
        main = relax.VirtualMachine(self.executable, dev)["main"]
        dtypes = list(self.input_dtypes)

        def run(inputs):
            main(*[tvm.runtime.tensor(np.ascontiguousarray(a, dtype=d), dev) for a, d in zip(inputs, dtypes)])

        return run

    def save(self, directory: str | os.PathLike) -> dict:
        """Write ``model.so`` and ``model.json`` into ``directory`` (atomically); returns paths."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        lib = os.path.join(directory, "model.so")
        desc = os.path.join(directory, "model.json")
        cc = None if is_host(self.target) else "aarch64-linux-gnu-g++"
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            tmp_lib = os.path.join(tmp, "model.so")
            try:
                if cc:
                    self.executable.export_library(tmp_lib, cc=cc)
                else:
                    self.executable.export_library(tmp_lib)
            except Exception as e:
                msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                raise BackendError(f"writing the shared library failed: {msg}") from None
            with open(os.path.join(tmp, "model.json"), "w") as f:
                json.dump(self.description(), f, indent=2)
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

    return [
        # TVM's own CPU library dispatch first (topk/sort/scan of token selection, sampling)
        relax.backend.DispatchSampling(),
        relax.backend.DispatchSortScan(),
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
        relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "HWIO"]}),
        relax.transform.FastMathTransform(),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
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


def build(program: Program, target="x86", schedule: str = "rules") -> Artifact:
    """Lower ``program`` (onnx or tvm level) to the tvm level and compile it for ``target``.

    ``schedule`` picks how loops are scheduled (see :data:`SCHEDULES`): by default sliver's
    CPU rules (:mod:`sliver.backends.schedules`) after NHWC layout conversion and fast math.
    """
    import tvm

    if program.level == "torch":
        raise BackendError("build() takes an onnx- or tvm-level program; run it through a pipeline or ir.to_onnx first")
    tdict = resolve_target(target)
    pipeline = relax_pipeline(tdict, schedule)
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


def load(directory: str | os.PathLike) -> Artifact:
    """Load an artifact written by :meth:`Artifact.save` (host targets only)."""
    import tvm

    directory = os.fspath(directory)
    lib = os.path.join(directory, "model.so")
    desc = os.path.join(directory, "model.json")
    if not (os.path.exists(lib) and os.path.exists(desc)):
        raise BackendError(f"{directory} holds no sliver artifact (model.so and model.json)")
    with open(desc) as f:
        d = json.load(f)
    executable = tvm.runtime.load_module(lib)
    return Artifact(
        executable=executable,
        target=d["target"],
        input_names=[i["name"] for i in d["inputs"]],
        input_shapes=[i["shape"] for i in d["inputs"]],
        input_dtypes=[i["dtype"] for i in d["inputs"]],
        name=d.get("name", "model"),
    )
