"""The user's own model and data: timm 1.0 / torchvision / window-attention layouts (tests/user_layouts.py),
one MAC count at both levels, the token passes on every layout, checkpoints and image folders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from user_layouts import Timm1ViT, TorchvisionViT, WindowViT

from sliver import backends, ir, passes
from sliver.ir import errors
from sliver.ir.torch_level import trace_method
from sliver.models import data as D

X = np.random.default_rng(3).standard_normal((1, 3, 32, 32)).astype(np.float32)


def _vit_macs(tokens, dim, depth, mlp, patch_pixels, classes):
    """Closed form: patch embedding, per block qkv+proj, Q.K^T and A.V, MLP; the head."""
    per_block = 4 * tokens * dim * dim + 2 * tokens * tokens * dim + 2 * tokens * dim * mlp
    return (tokens - 1) * dim * 3 * patch_pixels + depth * per_block + dim * classes


def _program(cls, **kw):
    torch.manual_seed(0)
    return ir.trace(cls(**kw).eval(), torch.from_numpy(X))


@pytest.mark.parametrize("cls", [Timm1ViT, TorchvisionViT])
def test_layouts_trace_and_count_the_same_macs_at_both_levels(cls):
    prog = _program(cls)
    assert trace_method(prog) == "fx" and prog.input_names == ("x",)
    expected = _vit_macs(17, 48, 4, 192, 64, 10)
    assert prog.stats().macs == expected  # fused SDPA / nn.MultiheadAttention's fast path counted
    onnx_prog = ir.to_onnx(prog)
    assert onnx_prog.stats().macs == expected
    np.testing.assert_allclose(onnx_prog.run([X])[0], prog.run([X])[0], atol=1e-5, rtol=0)


def test_multihead_attention_fast_path_is_counted():
    """nn.MultiheadAttention in eval/no-grad with even heads runs aten._native_multi_head_attention."""
    mha = nn.MultiheadAttention(64, 4, batch_first=True).eval()

    class Self(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = mha

        def forward(self, x):
            return self.mha(x, x, x, need_weights=False)[0]

    prog = ir.trace(Self(), torch.randn(2, 10, 64))
    assert prog.stats().macs == 2 * (4 * 10 * 64 * 64 + 2 * 10 * 10 * 64)
    assert ir.to_onnx(prog).stats().macs == prog.stats().macs


def test_timm_optional_arguments_keep_their_defaults():
    prog = _program(Timm1ViT, init_values=1e-5, qk_norm=True)
    code = prog.module.code
    assert "attn_mask" not in code and "is_causal" not in code
    torch.manual_seed(0)
    net = Timm1ViT(init_values=1e-5, qk_norm=True).eval()
    np.testing.assert_allclose(prog.run([X])[0], net(torch.from_numpy(X)).detach().numpy(), atol=1e-6, rtol=0)


def test_required_argument_without_example_is_one_line():
    class Two(nn.Module):
        def forward(self, x, y):
            return x + y

    with pytest.raises(errors.TraceError, match=r"takes 2 input\(s\) \(x, y\) but 1 example"):
        ir.trace(Two(), torch.randn(1, 3))


def test_window_attention_falls_back_to_torch_export_with_static_shapes():
    torch.manual_seed(0)
    net = WindowViT().eval()
    prog = ir.trace(net, torch.from_numpy(X))
    assert trace_method(prog) == "export"
    assert "control flow" in prog.module.meta["trace_fallback_reason"]
    with pytest.raises(errors.TraceError, match="torch.fx cannot trace WindowViT"):
        ir.trace(net, torch.from_numpy(X), method="fx")
    onnx_prog = ir.to_onnx(prog)
    assert onnx_prog.stats().macs == prog.stats().macs > 0
    reference = net(torch.from_numpy(X)).detach().numpy()
    np.testing.assert_allclose(prog.run([X])[0], reference, atol=1e-6, rtol=0)
    np.testing.assert_allclose(onnx_prog.run([X])[0], reference, atol=1e-5, rtol=0)


def test_untraceable_model_is_one_line():
    class Branchy(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent: neither tracer takes it
                return x * 2
            return x

    with pytest.raises(errors.TraceError, match="cannot trace Branchy with torch.fx nor with torch.export") as e:
        ir.trace(Branchy(), torch.randn(1, 4))
    assert "\n" not in str(e.value)


TOKEN_PIPES = [
    "evit{blocks=1,2 keep=0.5}",
    "heatvit{blocks=1,2 keep=0.7 epochs=1 warm_start=1 batch_size=32}",
    "asvit{blocks=1,2 epochs=1 batch_size=32}",
    "lvtp{blocks=1,2 keep=0.5}",
    "poly-act",
]


@pytest.mark.parametrize("cls", [Timm1ViT, TorchvisionViT])
@pytest.mark.parametrize("pipe", TOKEN_PIPES, ids=lambda p: p.split("{")[0])
def test_every_token_pass_runs_on_each_layout(cls, pipe):
    prog = _program(cls)
    result = passes.parse(pipe).run(prog, data=D.digits("train").take(64))
    out = result.program
    onnx_prog = ir.to_onnx(out)
    assert out.stats().macs == onnx_prog.stats().macs
    np.testing.assert_allclose(onnx_prog.run([X])[0], out.run([X])[0], atol=1e-4, rtol=0)
    if pipe == "poly-act":
        assert result.report.steps[0].notes["replaced"]["softmax"] == 4  # every block's attention
    else:
        assert out.stats().macs < prog.stats().macs


@pytest.mark.slow
@pytest.mark.parametrize("cls", [Timm1ViT, TorchvisionViT])
def test_layouts_build_with_tvm_after_token_passes(cls):
    """One TVM build per layout: 130-170 s each on the loaded 2-core machine (about 40 s when quiet)."""
    prog = _program(cls)
    out = passes.parse("poly-act,evit{blocks=1,2 keep=0.5}").run(prog).program
    onnx_prog = ir.to_onnx(out)
    artifact = backends.tvm.build(onnx_prog)
    np.testing.assert_allclose(artifact.run([X])[0], out.run([X])[0], atol=1e-4, rtol=0)


def test_unknown_block_layout_names_what_was_found():
    class OddAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.num_heads = 2
            self.to_q, self.to_kv, self.out = nn.Linear(8, 8), nn.Linear(8, 16), nn.Linear(8, 8)

        def forward(self, x):
            return self.out(self.to_q(x))

    class OddBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre, self.mix = nn.LayerNorm(8), OddAttention()

        def forward(self, x):
            return x + self.mix(self.pre(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(OddBlock(), OddBlock())

        def forward(self, x):
            return self.blocks(x)

    prog = ir.trace(Net(), torch.randn(1, 5, 8))
    with pytest.raises(errors.UnsupportedOpError, match=r"block layout of OddBlock \(children pre: LayerNorm, "
                                                        r"mix: OddAttention\); known layouts: timm Block") as e:
        passes.parse("evit{blocks=0 keep=0.5}").run(prog)
    assert "\n" not in str(e.value)


# -- data through the pass context --------------------------------------------------------------------
def test_any_torch_dataset_calibrates_like_sliver_sets(make_program):
    prog = make_program("tiny_resnet")
    calib = D.calibration("digits").take(32)
    plain = torch.utils.data.TensorDataset(calib.images.clone(), calib.targets.clone())
    pipe = "rapq{wbits=8 abits=8 calib_images=32 iters=20}"  # learned rounding on, kept short
    a = passes.parse(pipe).run(prog, data={"calib": calib}).program
    b = passes.parse(pipe).run(prog, data={"calib": plain}).program
    np.testing.assert_array_equal(a.run()[0], b.run()[0])


def test_cuda_device_without_gpu_is_one_line():
    from sliver.passes.infra.context import PassContext

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(errors.PassError, match="device cuda: torch sees no GPU"):
        PassContext(device="cuda")
    assert PassContext().device == torch.device("cpu")
