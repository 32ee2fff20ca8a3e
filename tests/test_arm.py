"""The aarch64 target: the artifact's architecture and symbols, and a run under qemu-user.

The static checks need only the cross compiler (to link the .so); the run needs qemu-user and
the aarch64 TVM runtime, which ``make setup-arm`` installs (apt-get + pip download). Both skip,
naming what is missing, only when those tools are absent.
"""

from __future__ import annotations

import shutil

import numpy as np
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
