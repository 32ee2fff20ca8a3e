"""sliver's CPU schedule rules, the custom-op lowering registry and the aarch64 target."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from sliver import backends, ir
from sliver.backends import lowering, schedules
from sliver.ir import opdefs


def _onnx_program(nodes, inputs, outputs, initializers=(), name="g", opsets=(("", 17),)):
    import onnx

    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets], ir_version=9)
    return model


@pytest.mark.parametrize("name", ["tiny_deit", "tiny_resnet", "tiny_mobilenet_v2", "tiny_segmenter", "tiny_vgg"])
def test_scheduled_build_matches_onnxruntime(name, make_program):
    prog = ir.to_onnx(make_program(name))
    artifact = backends.tvm.build(prog, target="x86", schedule="rules")
    assert artifact.meta["schedule"] == "rules"
    x = np.random.default_rng(3).standard_normal(prog.input_shapes[0]).astype(np.float32)
    got, ref = artifact.run([x]), prog.run([x])
    np.testing.assert_allclose(got[0], ref[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "m,k,n",
    [(197, 64, 48), (7, 24, 10), (32, 32, 32), (1, 16, 1000), (50, 20, 197)],
)
def test_matmul_shapes_that_do_not_tile(m, k, n):
    """Rows like 197 tokens and columns that are no multiple of the SIMD width (padding paths)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((k, n)).astype(np.float32)
    b = rng.standard_normal((n,)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["y"]),
        helper.make_node("Add", ["y", "b"], ["z"]),
        helper.make_node("Relu", ["z"], ["out"]),
    ]
    model = _onnx_program(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, m, k])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, m, n])],
        [helper.make_tensor("w", TensorProto.FLOAT, w.shape, w.ravel()), helper.make_tensor("b", TensorProto.FLOAT, b.shape, b)],
    )
    prog = ir.Program(level="onnx", module=model, example_inputs=(rng.standard_normal((1, m, k)).astype(np.float32),), input_names=("x",))
    got = backends.tvm.build(prog).run(prog.example_inputs)[0]
    np.testing.assert_allclose(got, prog.run()[0], atol=1e-4, rtol=0)


def test_rules_schedule_the_hot_functions():
    """Every matmul/conv PrimFunc of a small conv net gets the register-tiled schedule."""
    import tvm

    with lowering.build_importers():
        prog = ir.convert(ir.to_onnx(_tiny_convnet()), "tvm")
    target = backends.tvm.host_target()
    with tvm.target.Target(target):
        mod = tvm.transform.Sequential(backends.tvm.fusion_passes(target) + [schedules.schedule_module(target)])(prog.module)
    scripts = {gv.name_hint: f.script() for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    hot = {k: v for k, v in scripts.items() if "conv2d" in k or "matmul" in k}
    assert hot and all("T.vectorized" in s and "T.parallel" in s for s in hot.values()), sorted(hot)
    assert all('"tirx.is_scheduled": True' in s or "tirx.is_scheduled" in s for s in scripts.values())


def test_clip_override_is_scoped_to_the_build():
    """ReLU6 imports as Relax maximum/minimum only inside the build's import (lowering.build_importers)."""
    from sliver.ir.tvm_level import CUSTOM_IMPORTERS

    onnx_prog = ir.to_onnx(_tiny_convnet())
    plain = ir.convert(onnx_prog, "tvm").text()
    with lowering.build_importers():
        assert CUSTOM_IMPORTERS["Clip"] is lowering.ClipAsRelaxOp
        scoped = ir.convert(onnx_prog, "tvm").text()
    assert "Clip" not in CUSTOM_IMPORTERS
    assert "R.maximum" in scoped and "R.minimum" in scoped
    assert "R.maximum" not in plain and "R.call_tir" in plain


def _tiny_convnet():
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1),
        torch.nn.ReLU6(),
        torch.nn.Conv2d(16, 16, 3, padding=1, groups=16),
        torch.nn.Conv2d(16, 24, 1),
        torch.nn.Flatten(),
        torch.nn.Linear(24 * 8 * 8, 10),
    ).eval()
    return ir.trace(net, torch.randn(1, 3, 8, 8), name="tiny_convnet")


@pytest.mark.parametrize(
    "in_ch,out_ch,kernel,stride,dilation,padding",
    [(8, 24, 3, 2, 1, (1, 0, 2, 1)), (16, 40, 1, 1, 1, (0, 0, 0, 0)), (8, 64, 3, 1, 2, (2, 2, 2, 2)),
     # RGB stems read the NCHW input directly; fewer output channels than a vector fall back to
     # TVM's legalisation with the transpose put back
     (3, 24, 7, 2, 1, (3, 3, 3, 3)), (3, 4, 3, 1, 1, (1, 1, 1, 1))],
)
def test_packed_conv2d_matches_onnxruntime(in_ch, out_ch, kernel, stride, dilation, padding):
    """Convolutions read build-time packed weights; channels that do not tile are padded and cropped."""
    rng = np.random.default_rng(out_ch)
    w = rng.standard_normal((out_ch, in_ch, kernel, kernel)).astype(np.float32)
    x = rng.standard_normal((1, in_ch, 13, 11)).astype(np.float32)
    out_hw = [
        (size + padding[axis] + padding[axis + 2] - dilation * (kernel - 1) - 1) // stride + 1
        for axis, size in enumerate(x.shape[2:])
    ]
    node = helper.make_node("Conv", ["x", "w"], ["y"], strides=[stride] * 2, dilations=[dilation] * 2, pads=list(padding))
    model = _onnx_program(
        [node],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, out_ch, *out_hw])],
        [helper.make_tensor("w", TensorProto.FLOAT, w.shape, w.ravel())],
    )
    prog = ir.Program(level="onnx", module=model, example_inputs=(x,), input_names=("x",))
    want = prog.run()[0]
    got = backends.tvm.build(prog).run([x])[0]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_weights_are_packed_at_build_time():
    """The conv and matmul kernels take 5-D / 3-D packed constants; no packing kernel is left to run."""
    import tvm

    with lowering.build_importers():
        prog = ir.convert(ir.to_onnx(_tiny_convnet()), "tvm")
    target = backends.tvm.host_target()
    params = schedules.cpu_params(target)
    with tvm.target.Target(target):
        mod = tvm.transform.Sequential(backends.tvm.fusion_passes(target))(prog.module)
    funcs = {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    assert not any("weight_pack" in name for name in funcs), sorted(funcs)
    shapes = {name: _param_shapes(f) for name, f in funcs.items()}
    # (the depthwise conv and the 1x1 conv after it may be one fused function: every 5-D parameter)
    dense_conv = [p for n, s in shapes.items() if "conv2d" in n for p in s if len(p) == 5]
    # Conv2d(3->16, 3x3) and Conv2d(16->24, 1x1) are packed; the depthwise one keeps HWIO
    assert sorted(dense_conv) == sorted(
        [[-(-16 // b), 3, 3, 3, b] for b in [schedules.pack_block(16, params)]]
        + [[-(-24 // b), 1, 1, 16, b] for b in [schedules.pack_block(24, params)]]
    )
    (matmul,) = [s for n, s in shapes.items() if "matmul" in n]
    # 10 classes are fewer than one vector: such a GEMV keeps its [K, N] weights
    packed = [-(-10 // params.j_block), 24 * 8 * 8, params.j_block]
    assert matmul[1] == ([24 * 8 * 8, 10] if 10 < params.lanes else packed)


def _param_shapes(func) -> list:
    """Shapes of a PrimFunc's buffer parameters, read from its TVMScript signature."""
    import re

    signature = func.script().split("T.func_attr")[0]
    return [
        [int(d) for d in re.findall(r"T\.int64\((\d+)\)", dims)]
        for dims in re.findall(r'T\.Buffer\(\((.*?)\), "', signature)
    ]


def test_register_block_choice():
    p = schedules.CpuParams(lanes=8, vector_regs=16, threads=2)
    assert schedules._register_block(56, 64, p) == (4, 16)
    ib, jb = schedules._register_block(7, 512, p)
    assert (ib, jb) == (7, 8)
    neon = schedules.cpu_params(dict(backends.tvm.ARM_TARGET))
    assert neon.lanes == 4 and neon.vector_regs == 32


def test_unknown_schedule_is_rejected(make_program):
    prog = ir.to_onnx(make_program("tiny_vgg"))
    with pytest.raises(ir.errors.BackendError, match="unknown schedule 'fast'"):
        backends.tvm.build(prog, schedule="fast")


# ------------------------------------------------------------------------------------------------
# custom-op lowering registry: sliver.ShiftRequant


def _shift_requant_program(shift: int, x: np.ndarray):
    node = helper.make_node("ShiftRequant", ["x"], ["y"], domain="sliver", shift=shift, name="requant")
    model = _onnx_program(
        [node],
        [helper.make_tensor_value_info("x", TensorProto.INT32, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.INT8, list(x.shape))],
        opsets=(("", 17), ("sliver", 1)),
    )
    return model


@pytest.mark.parametrize("shift", [0, 1, 7, 12])
def test_shift_requant_is_bit_exact(shift):
    rng = np.random.default_rng(shift)
    x = rng.integers(-(2**31), 2**31 - 1, size=(4, 257), dtype=np.int64).astype(np.int32)
    x[0, :8] = [0, 1, -1, 2**31 - 1, -(2**31), 127 << shift, -(128 << shift), (1 << shift) // 2 if shift else 5]
    x[1] = rng.integers(-300 << shift, 300 << shift, size=257) if shift else rng.integers(-300, 300, size=257)
    model = _shift_requant_program(shift, x)
    import tvm
    from tvm import relax

    from sliver.ir.tvm_level import import_onnx

    prog = ir.Program(level="onnx", module=model, example_inputs=(x,), input_names=("x",))
    mod = import_onnx(prog).module
    ex = tvm.compile(mod, target=tvm.target.Target(backends.tvm.host_target()), relax_pipeline=backends.tvm.relax_pipeline(backends.tvm.host_target()))
    dev = tvm.cpu()
    got = relax.VirtualMachine(ex, dev)["main"](tvm.runtime.tensor(x, dev))
    got = got.numpy() if hasattr(got, "numpy") else got[0].numpy()
    want = opdefs.lookup("sliver", "ShiftRequant").reference([x], {"shift": shift})[0]
    assert got.dtype == np.int8 and want.dtype == np.int8
    np.testing.assert_array_equal(got, want)


def test_registry_lists_and_guards():
    assert "ShiftRequant" in lowering.registered()
    from sliver.ir.tvm_level import CUSTOM_IMPORTERS

    assert "ShiftRequant" in CUSTOM_IMPORTERS
    with pytest.raises(ValueError, match="registered twice"):
        lowering.register("ShiftRequant")(lambda bb, inputs, attrs: inputs[0])
    with pytest.raises(ValueError, match="no definition"):
        lowering.register("NoSuchOp")(lambda bb, inputs, attrs: inputs[0])


@pytest.mark.parametrize("pool", ["max3s2p1", "avg2", "avg3s2p1"])
def test_window_rule_pools_match_onnxruntime(pool):
    """Max / average pooling (channels last after the layout change) get the window rule: the
    window loops outside a vector of channels, padding inlined, rows in parallel."""
    import torch
    import tvm

    layer = {"max3s2p1": torch.nn.MaxPool2d(3, 2, 1), "avg2": torch.nn.AvgPool2d(2),
             "avg3s2p1": torch.nn.AvgPool2d(3, 2, 1, count_include_pad=False)}[pool]
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), layer, torch.nn.Conv2d(32, 16, 1)).eval()
    prog = ir.to_onnx(ir.trace(net, torch.randn(1, 3, 18, 18), name="pooled"))
    x = np.random.default_rng(1).standard_normal(prog.input_shapes[0]).astype(np.float32)
    np.testing.assert_allclose(backends.tvm.build(prog).run([x])[0], prog.run([x])[0], atol=1e-5, rtol=0)
    with lowering.build_importers():
        tprog = ir.convert(prog, "tvm")
    target = dict(backends.tvm.host_target(), **{"num-cores": 2})
    with tvm.target.Target(target):
        mod = tvm.transform.Sequential(backends.tvm.fusion_passes(target) + [schedules.schedule_module(target)])(tprog.module)
    pools = [f.script() for gv, f in mod.functions_items() if "pool" in gv.name_hint]
    assert pools, [gv.name_hint for gv in mod.get_global_vars()]
    for s in pools:
        assert "T.vectorized" in s and "T.parallel" in s and "pad_temp" not in s, s


def _dw_pw_model(channels: int, stride: int, out_ch: int, residual: bool):
    """x -> depthwise 3x3 + bias -> Clip(0, 6) -> 1x1 conv + bias [-> + x]: an inverted-residual tail."""
    rng = np.random.default_rng(channels + stride)
    x = rng.standard_normal((1, channels, 14, 14)).astype(np.float32)
    tensors = {
        "wd": rng.standard_normal((channels, 1, 3, 3)).astype(np.float32),
        "bd": rng.standard_normal(channels).astype(np.float32),
        "wp": (rng.standard_normal((out_ch, channels, 1, 1)) / np.sqrt(channels)).astype(np.float32),
        "bp": rng.standard_normal(out_ch).astype(np.float32),
        "lo": np.array(0.0, np.float32),
        "hi": np.array(6.0, np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "wd", "bd"], ["d"], group=channels, pads=[1, 1, 1, 1], strides=[stride] * 2),
        helper.make_node("Clip", ["d", "lo", "hi"], ["a"]),
        helper.make_node("Conv", ["a", "wp", "bp"], ["p" if residual else "y"]),
    ]
    if residual:
        nodes.append(helper.make_node("Add", ["p", "x"], ["y"]))
    side = 14 // stride
    model = _onnx_program(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, out_ch, side, side])],
        [helper.make_tensor(k, TensorProto.FLOAT, v.shape, v.ravel()) for k, v in tensors.items()],
    )
    return ir.Program(level="onnx", module=model, example_inputs=(x,), input_names=("x",))


@pytest.mark.parametrize(
    "channels,stride,out_ch,residual",
    [(32, 1, 32, True), (32, 2, 24, False), (48, 1, 16, False), (24, 1, 24, True)],
)
def test_depthwise_pointwise_fusion_matches_onnxruntime(channels, stride, out_ch, residual):
    """A depthwise conv (+ bias, ReLU6) feeding a 1x1 conv is one kernel when its channels fill
    whole vectors (and the 1x1 conv's activations outweigh its weights); fused or not, the
    output equals ONNX Runtime's."""
    import tvm

    prog = _dw_pw_model(channels, stride, out_ch, residual)
    target = backends.tvm.host_target()
    lanes = schedules.cpu_params(target).lanes
    with lowering.build_importers():
        mod = ir.convert(prog, "tvm").module
    with tvm.target.Target(target):
        fused = tvm.transform.Sequential(backends.tvm.fusion_passes(target))(mod)
    names = [gv.name_hint for gv, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    merged = [n for n in names if "_fused_" in n]
    assert len(merged) == (1 if channels % lanes == 0 else 0), names
    if merged:  # and the dw-pw rule scheduled it (the generic fallback would leave no vector loop)
        func = schedules.schedule_func(fused[merged[0]], schedules.cpu_params(target))
        assert "T.vectorized" in func.script() and "T.parallel" in func.script()
    got = backends.tvm.build(prog).run(list(prog.example_inputs))[0]
    np.testing.assert_allclose(got, prog.run()[0], atol=1e-4, rtol=0)


def test_float_row_reductions_are_vectorised_and_match_onnxruntime():
    """The rules' builds let LLVM reassociate float arithmetic, so a LayerNorm's row sums run on
    vectors (one scalar add chain per row made DeiT-S's 25 LayerNorms 4x slower); a target dict
    that says ``fast-math-reassoc: False`` keeps the strict order. Both within 1e-5 of ONNX Runtime."""
    import onnx
    from onnx import numpy_helper

    from sliver.ir.program import Program

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 197, 384)).astype(np.float32)
    g = rng.standard_normal(384).astype(np.float32)
    b = rng.standard_normal(384).astype(np.float32)
    graph = helper.make_graph([helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1)], "ln",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
                              [numpy_helper.from_array(g, "g"), numpy_helper.from_array(b, "b")])
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    prog = Program("onnx", model, (x,), name="ln", input_names=("x",))
    want = prog.run([x])[0]
    host = backends.tvm.resolve_target("x86")
    vector_adds = {}
    for strict in (False, True):
        target = dict(host, **({"fast-math-reassoc": False} if strict else {}))
        art = backends.tvm.build(prog, target=target)
        assert art.target["fast-math-reassoc"] is (not strict)
        assert np.abs(art.run([x])[0] - want).max() < 1e-5
        asm = "\n".join(m.inspect_source("asm") for m in art.executable.mod.imports if m.kind == "llvm")
        vector_adds[strict] = sum(line.split()[0] == "vaddps" for line in asm.splitlines() if line.strip())
    assert vector_adds[False] > vector_adds[True]


@pytest.mark.parametrize("length", [197, 64, 20])
def test_softmax_row_maximum_runs_on_vector_lanes(length):
    """A float softmax over rows of at least two vectors takes its row maximum as per-lane partial
    maxima (``schedules.lane_softmax``: LLVM leaves a float max reduction scalar without no-NaN
    semantics), with a row tail (197 = 12 x 16 + 5) or without; shorter rows keep TVM's softmax.
    Within 1e-6 of ONNX Runtime; the partial maxima's lanes loop is vectorised."""
    from sliver.ir.program import Program

    shape = [1, 6, 197, length]
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(shape) * 4).astype(np.float32)
    x[0, 0, 0, -1] = 60.0  # the row's maximum in its tail
    x[0, 1, 3, 0] = -1e30
    model = _onnx_program([helper.make_node("Softmax", ["x"], ["y"], axis=-1)],
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
    prog = Program("onnx", model, (x,), name="softmax", input_names=("x",))
    art = backends.tvm.build(prog)
    got, want = art.run([x])[0], prog.run([x])[0]
    assert np.abs(got - want).max() < 1e-6
    import tvm

    from sliver.backends import tvm as btvm

    target = art.target
    lanes = schedules.cpu_params(target).lanes
    with tvm.target.Target(target):
        mod = tvm.transform.Sequential(btvm.fusion_passes(target) + [schedules.schedule_module(target)])(
            btvm.convert(prog, "tvm").module)
    text = "\n".join(f.script() for _, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc))
    lines = text.splitlines()
    at = [i for i, line in enumerate(lines) if 'T.sblock("T_softmax_maxlanes")' in line]
    if length >= 2 * lanes:  # the partial maxima: one block per row, its lanes loop on a vector
        assert len(at) == 1 and f"T.vectorized(T.int64({lanes}))" in lines[at[0] - 1]
    else:
        assert not at


@pytest.mark.parametrize("m,k,n", [(197, 64, 197), (197, 197, 64), (50, 20, 40)])
def test_attention_matmuls_need_no_padding_copies(m, k, n):
    """Batched products of two activations (attention's ``q k^T`` and ``P v``) whose rows or columns
    do not tile: rows past the end read the last row (cropped), columns are packed into panels per
    call; no zero-padding copy of the rows runs. Within 1e-4 of numpy."""
    rng = np.random.default_rng(2)
    a = rng.standard_normal((1, 6, m, k)).astype(np.float32)
    b = rng.standard_normal((1, 6, k, n)).astype(np.float32)
    model = _onnx_program([helper.make_node("MatMul", ["a", "b"], ["y"])],
                          [helper.make_tensor_value_info("a", TensorProto.FLOAT, list(a.shape)),
                           helper.make_tensor_value_info("b", TensorProto.FLOAT, list(b.shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, m, n])])
    prog = ir.Program(level="onnx", module=model, example_inputs=(a, b), input_names=("a", "b"))
    art = backends.tvm.build(prog)
    np.testing.assert_allclose(art.run([a, b])[0], a @ b, atol=1e-4, rtol=0)
    kernels = {r["kernel"] for r in art.profile([a, b], repeat=1)}
    lanes = schedules.cpu_params(art.target).lanes
    assert kernels <= {"matmul", "activation_pack"}
    assert ("activation_pack" in kernels) == (n % (2 * lanes) != 0)


@pytest.mark.parametrize("index", [0, 2, -1, [1, 0]])
def test_constant_gathers_of_a_permuted_tensor_are_slices(index):
    """A ViT's ``qkv.reshape(...).permute(2, 0, 3, 1, 4)[i]``: a Gather of one constant index (also
    negative) after a Transpose is taken before the permutation, as a slice that fuses with what
    follows, so no kernel copies the whole permuted tensor; other constant indices stay a take.
    Equal to ONNX Runtime."""
    from onnx import numpy_helper

    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 197, 1152)).astype(np.float32)
    idx = np.array(index, dtype=np.int64)
    out_shape = ([2] if idx.ndim else []) + [1, 6, 197, 64]
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["r"]),
        helper.make_node("Transpose", ["r"], ["t"], perm=[2, 0, 3, 1, 4]),
        helper.make_node("Gather", ["t", "i"], ["g"], axis=0),
        helper.make_node("Mul", ["g", "s"], ["y"]),
    ]
    model = _onnx_program(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
                          [numpy_helper.from_array(np.array([1, 197, 3, 6, 64], dtype=np.int64), "shape"),
                           numpy_helper.from_array(idx, "i"), numpy_helper.from_array(np.float32(0.125), "s")])
    prog = ir.Program(level="onnx", module=model, example_inputs=(x,), input_names=("x",))
    art = backends.tvm.build(prog)
    np.testing.assert_array_equal(art.run([x])[0], prog.run([x])[0])
    kernels = [r["kernel"] for r in art.profile([x], repeat=1)]
    if idx.ndim == 0:
        assert len(kernels) == 1 and "strided_slice" in kernels[0] and "take" not in kernels[0]
    else:
        assert any("take" in k for k in kernels)


def test_llvm_loop_vectoriser_uses_full_width_vectors_on_avx512():
    """LLVM's tuning for AVX-512 Intel cores vectorises its own loops (softmax's exponential, row
    sums) with 256-bit vectors; the rules' builds ask for 512 (``-prefer-256-bit``) unless the
    target dict names ``prefer-256-bit`` itself. AVX2 targets are left alone."""
    from sliver.backends import tvm as btvm

    assert "mattr" not in btvm._full_width_loops({"kind": "llvm", "mcpu": "haswell", "num-cores": 2})
    assert btvm._full_width_loops({"kind": "llvm", "mcpu": "icelake-server"})["mattr"] == ["-prefer-256-bit"]
    kept = {"kind": "llvm", "mcpu": "icelake-server", "mattr": ["+prefer-256-bit"]}
    assert btvm._full_width_loops(kept)["mattr"] == ["+prefer-256-bit"]
    host = backends.tvm.resolve_target("x86")
    if schedules.cpu_params(host).lanes != 16:
        pytest.skip("the host has no AVX-512")
    shape = [1, 6, 197, 197]
    x = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    model = _onnx_program([helper.make_node("Softmax", ["x"], ["y"], axis=-1)],
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
    prog = ir.Program(level="onnx", module=model, example_inputs=(x,), input_names=("x",))
    counts = {}
    for name, target in (("full", host), ("half", dict(host, mattr=["+prefer-256-bit"]))):
        art = backends.tvm.build(prog, target=target)
        assert np.abs(art.run([x])[0] - prog.run([x])[0]).max() < 1e-6
        asm = "\n".join(m.inspect_source("asm") for m in art.executable.mod.imports if m.kind == "llvm")
        counts[name] = sum(line.split()[0] == "vcvttps2dq" and "zmm" in line for line in asm.splitlines() if line.strip())
    assert counts["full"] > 0 and counts["half"] == 0  # the exponential's float -> int conversion


@pytest.mark.parametrize("size,channels,stride,chunked", [(7, 256, 1, True), (14, 128, 2, True), (28, 64, 1, False)])
def test_windowed_convolutions_sweep_weights_in_l1_chunks(size, channels, stride, chunked):
    """A 3x3 convolution whose weight panel outgrows L1 (ResNet's 7x7x512 ones: 590 KB) reduces
    over input channels in chunks outside its pixel tiles, so every tile of a panel reads a chunk
    from L1; not with fewer output panels (64 channels: 2) than two per thread, which would then
    leave threads idle. The result matches ONNX Runtime within 1e-4 either way."""
    import tvm
    from onnx import numpy_helper

    from sliver.backends import tvm as btvm

    rng = np.random.default_rng(6)
    x = rng.standard_normal((1, channels, size, size)).astype(np.float32)
    w = (rng.standard_normal((channels, channels, 3, 3)) * 0.05).astype(np.float32)
    out = (size + 2 - 3) // stride + 1
    model = _onnx_program([helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], strides=[stride, stride]),
                           helper.make_node("Relu", ["c"], ["y"])],
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, out, out])],
                          [numpy_helper.from_array(w, "w")])
    prog = ir.Program(level="onnx", module=model, example_inputs=(x,), input_names=("x",))
    art = backends.tvm.build(prog)
    np.testing.assert_allclose(art.run([x])[0], prog.run([x])[0], atol=1e-4, rtol=0)
    target = art.target
    with tvm.target.Target(target):
        mod = tvm.transform.Sequential(btvm.fusion_passes(target) + [schedules.schedule_module(target)])(
            btvm.convert(prog, "tvm").module)
    text = "\n".join(f.script() for _, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc))
    params = schedules.cpu_params(target)
    chunk = max(d for d in range(1, channels) if channels % d == 0 and d * 9 * params.j_block * 4 <= schedules.L1_BUDGET_BYTES)
    if params.threads < 2:
        pytest.skip("one core: the rule needs two panels per thread")
    assert (f"T.int64({channels // chunk}), T.int64(1), T.int64({out})" in text) == chunked  # chunks outside the rows
