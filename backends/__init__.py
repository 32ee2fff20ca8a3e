"""sliver.backends: TVM lowering for x86 and aarch64 CPUs.

    from sliver import backends
    artifact = backends.tvm.build(program, target="x86")   # onnx- or tvm-level program
    outputs = artifact.run(program.example_inputs)
    artifact.save("build/")                               # model.so + model.json
"""

from . import lowering, schedules, tvm

__all__ = ["lowering", "schedules", "tvm"]
