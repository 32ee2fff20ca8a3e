"""evit: EViT's static top-k token selection with a fused token (the training-free baseline)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from timm_style import RefTimmViT

from sliver import backends, ir, passes
from sliver.ir import errors


def _block_macs(n_in, n_out, dim, mlp_ratio=4, selector=False):
    """MACs of one block: qkv + proj on n_in tokens, Q.K^T and A.V, the MLP on n_out tokens; an
    EViT stage also does two weighted sums (all patches, kept patches)."""
    macs = 4 * n_in * dim * dim + 2 * n_in * n_in * dim + 2 * mlp_ratio * n_out * dim * dim
    if selector:
        macs += (n_in - 1) * dim + (n_out - 2) * dim
    return macs


def test_deit_small_keep_07_at_3_6_9(make_program):
    prog = make_program("deit_small")
    result = passes.parse("evit{blocks=3,6,9 keep=0.7}").run(prog)
    schedule = result.report.steps[0].notes["tokens"]
    assert [(s["tokens_in"], s["kept"], s["tokens_out"]) for s in schedule] == [
        (197, 138, 140), (140, 98, 100), (100, 70, 72)  # k = ceil(0.7 * (N - 1)), + CLS + fused
    ]
    dense = prog.stats().macs
    pruned = result.program.stats().macs
    # closed form: patch embedding and head unchanged, blocks at their token counts
    tokens, expected = 197, dense
    for i in range(12):
        stage = next((s for s in schedule if s["block"] == i), None)
        n_out = stage["tokens_out"] if stage else tokens
        expected += _block_macs(tokens, n_out, 384, selector=stage is not None) - _block_macs(197, 197, 384)
        tokens = n_out
    assert pruned == expected
    assert pruned / 1e9 == pytest.approx(3.03, abs=0.01)  # EViT reports 3.0 GFLOPs for DeiT-S/0.7
    assert pruned / dense == pytest.approx(0.659, abs=0.002)


@pytest.mark.parametrize("model", ["tiny_deit", "timm_style"])
def test_static_mode_exports_and_builds_with_tvm(model, make_program):
    if model == "tiny_deit":
        prog = make_program("tiny_deit")
    else:
        torch.manual_seed(0)
        net = RefTimmViT(dim=64, depth=6, heads=4, img=32, patch=4, classes=10)
        prog = ir.trace(net, torch.randn(1, 3, 32, 32), name="timm_style")
    result = passes.parse("evit{blocks=1,3 keep=0.5}").run(prog, lower_to="onnx")
    onnx_prog = result.program
    ops = [n.op_type for n in onnx_prog.module.graph.node]
    assert ops.count("TopK") == 2 and ops.count("GatherElements") >= 2
    topk_k = [i for i in onnx_prog.module.graph.initializer if "TopK" in i.name]
    assert topk_k or all(n.op_type != "TopK" or n.input[1] for n in onnx_prog.module.graph.node)
    artifact = backends.tvm.build(onnx_prog)
    x = np.random.default_rng(3).standard_normal((1, 3, 32, 32)).astype(np.float32)
    torch_prog = passes.parse("evit{blocks=1,3 keep=0.5}").run(prog).program
    np.testing.assert_allclose(artifact.run([x])[0], torch_prog.run([x])[0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(onnx_prog.run([x])[0], torch_prog.run([x])[0], atol=1e-4, rtol=0)


def test_fused_token_is_the_attention_weighted_average(make_program):
    from sliver.passes.tokens.evit import EViTBlock
    from sliver.passes.transformer import attention_with_probs

    prog = make_program("tiny_deit")
    block = prog.module.get_submodule("blocks.0")
    x = torch.randn(2, 65, 64)
    pruned = EViTBlock(block, keep_tokens=40)
    with torch.no_grad():
        out = pruned(x)
        attn_out, probs = attention_with_probs(block.attn, block.norm1(x))
        y = x + attn_out
        scores = probs[:, :, 0, 1:].mean(1)
        order = scores.argsort(dim=1, descending=True)
        rest = order[:, 40:]
        w = torch.gather(scores, 1, rest)
        fused = (torch.gather(y[:, 1:], 1, rest.unsqueeze(-1).expand(-1, -1, 64)) * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True)
        z = torch.cat([y[:, :1], torch.gather(y[:, 1:], 1, order[:, :40].unsqueeze(-1).expand(-1, -1, 64)), fused[:, None]], 1)
        expected = z + block.mlp(block.norm2(z))
    assert out.shape == (2, 42, 64)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_keep_one_changes_nothing(make_program):
    prog = make_program("tiny_deit")
    out = passes.parse("evit{keep=1.0}").run(prog).program
    assert out.stats().macs == prog.stats().macs


@pytest.mark.parametrize(
    "pipeline, model, error, words",
    [
        ("evit{blocks=3,12}", "tiny_deit", errors.OptionValueError, ["block index 12", "12 blocks (0..11)"]),
        ("evit{blocks=3,3}", "tiny_deit", errors.OptionValueError, ["repeat"]),
        ("evit{keep=0}", "tiny_deit", errors.OptionValueError, ["keep=0.0 must lie in (0, 1]"]),
        ("evit{keep=1.2}", "tiny_deit", errors.OptionValueError, ["(0, 1]"]),
        ("evit", "tiny_resnet", errors.UnsupportedOpError, ["needs a vision transformer", "no attention blocks"]),
    ],
)
def test_bad_options_are_one_line_errors(pipeline, model, error, words, make_program):
    with pytest.raises(error) as info:
        passes.parse(pipeline).run(make_program(model))
    assert "\n" not in str(info.value)
    for w in words:
        assert w in str(info.value)


def test_evit_golden(make_program, golden):
    golden("torch/tiny_deit_evit", passes.parse("evit").run(make_program("tiny_deit")).program.text())


def test_keep_count_rule():
    from sliver.passes.tokens.common import keep_count

    assert keep_count(0.7, 196) == math.ceil(0.7 * 196) == 138
    assert keep_count(0.7, 139) == 98 and keep_count(0.01, 10) == 1 and keep_count(1.0, 10) == 10


def test_bench_compares_pruned_with_dense(tmp_path):
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(root, "tools", "bench.py"), "tiny_deit", "--pipeline", "evit{blocks=3,6,9 keep=0.7}",
         "--compare-dense", "--engines", "torch", "onnxruntime", "--repeat", "2", "--warmup", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    b = json.loads(out.read_text())["batches"][0]
    assert set(b["speedup"]) == {"torch", "onnxruntime"} and "speedup / MAC reduction" in proc.stdout
    assert b["dense"]["macs"] / b["macs"] == pytest.approx(1.50, abs=0.02)  # tiny DeiT, 3 stages at keep 0.7
    for name, sp in b["speedup"].items():
        assert sp["speedup"] == pytest.approx(b["dense"]["engines"][name]["median_ms"] / b["engines"][name]["median_ms"])
        assert sp["speedup_per_mac_reduction"] == pytest.approx(sp["speedup"] / sp["mac_reduction"])
