"""The aarch64 targets: the artifact's architecture and symbols, and a run under qemu-user; on
arm-dotprod, an integer program's matmuls and convolutions on sdot, bit-exact with ONNX Runtime.

The static checks need only the cross compiler (to link the .so); the run needs qemu-user and
the aarch64 TVM runtime, which ``make setup-arm`` installs (apt-get + pip download). Both skip,
naming what is missing, only when those tools are absent.
"""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
import torch

from sliver import backends, ir
from sliver.backends import tvm as tvm_backend

MISSING = tvm_backend.missing_arm_tools()
needs_cross = pytest.mark.skipif(
    shutil.which("aarch64-linux-gnu-g++") is None,
    reason="aarch64-linux-gnu-g++ missing: run `make setup-arm` (apt-get install g++-aarch64-linux-gnu)",
)
needs_qemu = pytest.mark.skipif(bool(MISSING), reason=f"missing {', '.join(MISSING)}: run `make setup-arm`")
OBJDUMP = "aarch64-linux-gnu-objdump"
needs_objdump = pytest.mark.skipif(shutil.which(OBJDUMP) is None,
                                   reason=f"{OBJDUMP} missing: run `make setup-arm` (binutils-aarch64-linux-gnu)")


@pytest.fixture(scope="module")
def arm_resnet(tmp_path_factory):
    from conftest import example_input

    from sliver import models

    torch.manual_seed(0)
    prog = ir.to_onnx(ir.trace(models.create("tiny_resnet"), example_input(models.input_shape("tiny_resnet")), name="tiny_resnet"))
    artifact = backends.tvm.build(prog, target="arm")
    out = tmp_path_factory.mktemp("arm_resnet")
    artifact.save(out)
    return prog, artifact, out


@needs_cross
def test_arm_library_is_aarch64_with_the_kernels_of_the_host_build(arm_resnet):
    prog, artifact, out = arm_resnet
    assert artifact.target["mtriple"] == "aarch64-linux-gnu" and "+neon" in artifact.target["mattr"]
    info = tvm_backend.inspect_library(out / "model.so")
    assert info["format"] == "ELF64" and info["machine"] == "aarch64"
    # the same pipeline built for the host exports the same kernels: nothing was dropped
    host_dir = out / "host"
    backends.tvm.build(prog, target="x86").save(host_dir)
    host = tvm_backend.inspect_library(host_dir / "model.so")
    assert host["machine"] == "x86_64"

    def kernels(symbols):
        return {s for s in symbols if s.startswith("__tvm_ffi_")}

    assert "__tvm_ffi__library_bin" in info["symbols"]
    assert kernels(info["symbols"]) == kernels(host["symbols"]) and len(kernels(info["symbols"])) > 5
    checked = tvm_backend.check_library(out / "model.so", artifact.target)
    assert checked["machine"] == "aarch64" and checked["kernels"] == len(kernels(info["symbols"])) - 1
    with pytest.raises(ir.errors.BackendError, match="built for x86_64, not aarch64"):
        tvm_backend.check_library(host_dir / "model.so", artifact.target)
    with pytest.raises(ir.errors.BackendError, match="run it on that device"):
        artifact.run(prog.example_inputs)


@needs_cross
@needs_qemu
def test_arm_artifact_runs_under_qemu_and_matches_onnxruntime(arm_resnet):
    prog, _, out = arm_resnet
    x = np.random.default_rng(11).standard_normal(prog.input_shapes[0]).astype(np.float32)
    got = tvm_backend.run_with_qemu(out, [x])
    want = prog.run([x])
    assert got[0].shape == want[0].shape
    np.testing.assert_allclose(got[0], want[0], atol=1e-4, rtol=0)
    assert np.abs(want[0]).max() > 1e-2  # a real output, not zeros


def test_inspect_library_rejects_non_elf(tmp_path):
    path = tmp_path / "model.so"
    path.write_bytes(b"not a library")
    with pytest.raises(ir.errors.BackendError, match="not an ELF shared library"):
        tvm_backend.inspect_library(path)


# ------------------------------------------------------------------------------------------------
# arm-dotprod: integer matmuls and convolutions on sdot (issue #18)


def test_dot_product_intrinsic_by_target():
    """sdot where the aarch64 CPU has the dot-product extension (named in mattr, or a core LLVM
    knows has it), nothing on the Cortex-A53 baseline; the packing follows the intrinsic."""
    from sliver.backends import schedules

    resolve = tvm_backend.resolve_target
    assert resolve("arm-dotprod") == resolve("aarch64-dotprod")
    assert resolve("arm-dotprod")["mattr"] == ["+neon", "+dotprod"]
    assert schedules.int8_dot_intrinsic(resolve("arm-dotprod")) == schedules.SDOT_INTRIN == "dot_4x4_i8i8s32_sdot"
    assert schedules.int8_dot_intrinsic(resolve("arm")) is None
    arm = {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}
    assert schedules.int8_dot_intrinsic({**arm, "mcpu": "cortex-a76"}) == schedules.SDOT_INTRIN
    assert schedules.int8_dot_intrinsic({**arm, "mcpu": "cortex-a72"}) is None
    # 4 output columns x 4 k per sdot, s8 activations; 16 x 4 per vpdpbusd, u8 activations
    assert schedules.dot_layout(schedules.SDOT_INTRIN) == (4, "int8")
    schedules._register_vnni()
    assert schedules.dot_layout(schedules.VNNI_INTRIN) == (16, "uint8")
    with pytest.raises(ir.errors.BackendError, match="arm-dotprod"):
        resolve("armv9")


@pytest.fixture(scope="module")
def arm_integer_resnet(tmp_path_factory):
    """An untrained tiny ResNet through pot-naive W8A8 and pot-shift (integer-only: int8 stem
    input, uint8 activations after ReLU, a MatMulInteger classifier), built for arm-dotprod and
    for arm (Cortex-A53)."""
    from sliver import models, passes
    from sliver.models import data

    torch.manual_seed(0)
    net = models.create("tiny_resnet").eval()
    x = torch.randn(8, *models.input_shape("tiny_resnet")[1:])
    prog = ir.trace(net, x[:1], name="tiny_resnet")
    ref = passes.parse("pot-naive{wbits=8 abits=8 calib_images=8}").run(
        prog, data=data.ImageSet("random", "images", x), check=False).program
    integer = passes.parse("pot-shift").run(ref, check=False).program
    out = tmp_path_factory.mktemp("arm_integer")
    dirs = {}
    for target in ("arm-dotprod", "arm"):
        backends.tvm.build(integer, target=target).save(out / target)
        dirs[target] = out / target
    return integer, dirs


@needs_cross
@needs_qemu
def test_arm_dotprod_integer_artifact_is_bit_exact_with_onnxruntime_under_qemu(arm_integer_resnet):
    integer, dirs = arm_integer_resnet
    assert "integer-only" in integer.facts
    types = ir.onnx_level.value_types(integer.module)
    ops = [(n.op_type, types[n.input[0]][0]) for n in integer.module.graph.node if n.op_type.endswith("Integer")]
    # both activation types on the convolution (int8: no offset; uint8: -128 and +128 sum W), and the matmul
    assert ("ConvInteger", onnx.TensorProto.INT8) in ops and ("ConvInteger", onnx.TensorProto.UINT8) in ops
    assert ("MatMulInteger", onnx.TensorProto.UINT8) in ops and len(ops) == 13
    rng = np.random.default_rng(12)
    for scale in (1.0, 4.0):  # 4: many activations saturate at the 8-bit extremes
        x = (scale * rng.standard_normal(integer.input_shapes[0])).astype(np.float32)
        want = integer.run([x])[0]
        assert len(np.unique(want)) > 3  # a real output, not a constant
        assert np.array_equal(tvm_backend.run_with_qemu(dirs["arm-dotprod"], [x])[0], want)
        assert np.array_equal(tvm_backend.run_with_qemu(dirs["arm"], [x])[0], want)
    # the sdot instructions are what runs: a CPU without the dot-product extension stops on them
    with pytest.raises(ir.errors.BackendError, match="Illegal instruction"):
        tvm_backend.run_with_qemu(dirs["arm-dotprod"], [x], cpu="cortex-a53")


@needs_cross
@needs_qemu
@needs_objdump
@pytest.mark.parametrize("a_dtype", [np.int8, np.uint8])
def test_arm_dotprod_attention_matmul_packs_per_call_and_is_exact_under_qemu(a_dtype, tmp_path):
    """q @ k^T (int8 rows: no offset on sdot) and P @ v (uint8 rows: -128, corrected per call by
    +128 times the column sums of the right operand), batched over heads, on sdot."""
    from onnx import TensorProto, helper

    from sliver.ir.program import Program

    rng = np.random.default_rng(7)
    rows, k, n = 13, 36, 21
    lo, hi = (-128, 128) if a_dtype == np.int8 else (0, 256)
    a = rng.integers(lo, hi, (2, 3, rows, k))
    b = rng.integers(-128, 128, (2, 3, n, k))  # the runner takes one float input: a and b^T stacked
    a[..., 0, :], b[..., 0, :] = hi - 1, -128
    x = np.concatenate([a, b], axis=2).astype(np.float32)
    want = (a @ b.transpose(0, 1, 3, 2)).astype(np.float32)  # |y| < 2^24: exact in float32
    to = TensorProto.INT8 if a_dtype == np.int8 else TensorProto.UINT8
    c = lambda v: helper.make_tensor(v, TensorProto.INT64, [1], [{"lo": 0, "mid": rows, "hi": rows + n, "ax": 2}[v]])  # noqa: E731
    nodes = [helper.make_node("Slice", ["x", "lo", "mid", "ax"], ["xa"]),
             helper.make_node("Slice", ["x", "mid", "hi", "ax"], ["xb"]),
             helper.make_node("Cast", ["xa"], ["a"], to=to), helper.make_node("Cast", ["xb"], ["bt"], to=TensorProto.INT8),
             helper.make_node("Transpose", ["bt"], ["b"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMulInteger", ["a", "b"], ["acc"]), helper.make_node("Cast", ["acc"], ["y"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [c(v) for v in ("lo", "mid", "hi", "ax")])
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    prog = Program("onnx", model, (x,), name="attention", input_names=("x",))
    assert np.array_equal(prog.run([x])[0], want)  # ONNX Runtime
    backends.tvm.build(prog, target="arm-dotprod").save(tmp_path)
    assert np.array_equal(tvm_backend.run_with_qemu(tmp_path, [x])[0], want)
    assert sum(n for f, n in _sdot_per_function(tmp_path / "model.so").items() if "int8_matmul" in f) >= 16


def _sdot_per_function(library) -> dict:
    import subprocess

    text = subprocess.run([OBJDUMP, "-d", str(library)], capture_output=True, text=True, check=True).stdout
    counts, function = {}, None
    for line in text.splitlines():
        if line.endswith(">:") and " <" in line:
            function = line.split(" <", 1)[1][:-2]
        elif "\tsdot\t" in line:
            counts[function] = counts.get(function, 0) + 1
    return counts


@needs_cross
@needs_objdump
def test_arm_dotprod_library_has_sdot_in_every_integer_kernel_and_the_a53_one_none(arm_integer_resnet):
    _, dirs = arm_integer_resnet
    counts = _sdot_per_function(dirs["arm-dotprod"] / "model.so")
    kernels = {f for f in counts if f.startswith(("fused_int8_conv2d", "fused_int8_matmul"))}
    assert set(counts) == kernels  # sdot only in the integer kernels...
    assert sum(f.startswith("fused_int8_conv2d") for f in kernels) == 12  # ...and in each of them
    assert sum(f.startswith("fused_int8_matmul") for f in kernels) == 1
    # a register tile of 4 pixels x 4 groups of 4 channels: 16 sdot per convolution
    assert all(counts[f] >= 16 for f in kernels)
    assert _sdot_per_function(dirs["arm"] / "model.so") == {}
