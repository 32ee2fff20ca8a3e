"""sliver.backends: TVM lowering for x86 and aarch64 CPUs, the FPGA cost model, evaluation.

    from sliver import backends
    artifact = backends.tvm.build(program, target="x86")   # onnx- or tvm-level program
    outputs = artifact.run(program.example_inputs)
    artifact.save("build/")                               # model.so + model.json
    report = backends.fpga.cost(program, accel="zcu102", bits=8)
"""

from . import evaluate, fpga, lowering, schedules, tvm

__all__ = ["evaluate", "fpga", "lowering", "schedules", "tvm"]
