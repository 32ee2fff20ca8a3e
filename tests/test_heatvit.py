"""heatvit: multi-head token selectors with a package token; static shapes; training mechanics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from timm_style import RefTimmViT

from sliver import backends, ir, passes
from sliver.ir import errors
from sliver.passes.tokens.heatvit import TokenSelector


def test_deit_small_macs_with_selectors(make_program):
    prog = make_program("deit_small")
    result = passes.parse("heatvit{blocks=3,6,9 keep=0.7 epochs=0}").run(prog)
    schedule = result.report.steps[0].notes["tokens"]
    # DynamicViT's schedule int(196 * 0.7^s) + CLS + package token
    assert [(s["kept"], s["tokens_out"]) for s in schedule] == [(137, 139), (96, 98), (67, 69)]
    stats = result.program.stats()
    selector_macs = sum(n.macs for n in stats.nodes if n.op == "TokenSelector")
    assert 0 < selector_macs < 0.01 * stats.macs  # the selectors' own cost is counted, and small
    assert 2.9 <= stats.macs / 1e9 <= 3.0


def test_selector_static_output_is_cls_kept_and_package():
    torch.manual_seed(0)
    sel = TokenSelector(dim=32, num_heads=4, keep_tokens=5, absorbs_package=True).eval()
    x = torch.randn(2, 1 + 12 + 1, 32)  # CLS, 12 patches, an earlier package token
    with torch.no_grad():
        out = sel(x)
        scores = sel.keep_scores(x[:, 1:])
    assert out.shape == (2, 1 + 5 + 1, 32)
    torch.testing.assert_close(out[:, 0], x[:, 0])
    order = scores[:, :12].argsort(dim=1, descending=True, stable=True)
    kept = torch.gather(x[:, 1:13], 1, order[:, :5, None].expand(-1, -1, 32))
    torch.testing.assert_close(out[:, 1:6], kept)
    # package: keep-score-weighted average of the 7 pruned patches and the earlier package
    rest = torch.cat([order[:, 5:], torch.full((2, 1), 12)], dim=1)
    w = torch.gather(scores, 1, rest)
    tokens = torch.gather(x[:, 1:], 1, rest[:, :, None].expand(-1, -1, 32))
    expected = (w[:, :, None] * tokens).sum(1) / w.sum(1, keepdim=True)
    torch.testing.assert_close(out[:, -1], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model", ["tiny_deit", "timm_style"])
def test_static_mode_builds_with_tvm_and_matches(model, make_program):
    if model == "tiny_deit":
        prog = make_program("tiny_deit")
    else:
        torch.manual_seed(0)
        prog = ir.trace(RefTimmViT(dim=64, depth=6, heads=4, img=32, patch=4, classes=10), torch.randn(1, 3, 32, 32))
    pipe = passes.parse("heatvit{blocks=2,4 keep=0.6 epochs=0}")
    torch_prog = pipe.run(prog).program
    onnx_prog = pipe.run(prog, lower_to="onnx").program
    assert [n.op_type for n in onnx_prog.module.graph.node].count("TopK") == 2
    x = np.random.default_rng(2).standard_normal((1, 3, 32, 32)).astype(np.float32)
    ref = torch_prog.run([x])[0]
    np.testing.assert_allclose(onnx_prog.run([x])[0], ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(backends.tvm.build(onnx_prog).run([x])[0], ref, atol=1e-4, rtol=0)


def test_training_runs_the_policy_and_restores_the_blocks(make_program):
    from sliver.models import data

    prog = make_program("tiny_deit")
    train = data.digits("train").take(128)
    result = passes.parse("heatvit{blocks=3,6 keep=0.5 epochs=1 batch_size=32}").run(prog, data=train)
    out = result.program
    losses = result.report.steps[0].notes["train_loss"]["fine-tune"]
    assert len(losses) == 1 and np.isfinite(losses[0])
    kinds = {type(out.module.get_submodule(n.target)).__name__ for n in out.module.graph.nodes if n.op == "call_module"}
    assert "PolicyBlock" not in kinds and {"Block", "TokenSelector"} <= kinds
    sel = out.module.get_submodule("token_selector_3")
    assert sel.mode == "static" and sel.state is None
    # the dense teacher was not trained: the input program's weights are untouched
    assert all(not p.requires_grad or p.grad is None for p in prog.module.parameters())


def test_adaptive_mode_keeps_tokens_over_half(make_program):
    prog = make_program("tiny_deit")
    out = passes.parse("heatvit{blocks=3 epochs=0 mode=adaptive}").run(prog).program
    sel = out.module.get_submodule("token_selector_3")
    with torch.no_grad():
        y = out.module(torch.from_numpy(prog.example_inputs[0]))
    assert y.shape == (1, 10) and sel.mode == "adaptive"


@pytest.mark.parametrize(
    "pipeline, data_given, error, words",
    [
        ("heatvit{blocks=12 epochs=0}", False, errors.OptionValueError, ["block index 12"]),
        ("heatvit", False, errors.PassError, ["needs data", "epochs=0"]),
        ("heatvit{keep=0}", False, errors.OptionValueError, ["(0, 1]"]),
        ("heatvit{mode=sometimes}", False, errors.OptionValueError, ["static or adaptive"]),
    ],
)
def test_bad_use_is_a_one_line_error(pipeline, data_given, error, words, make_program):
    with pytest.raises(error) as info:
        passes.parse(pipeline).run(make_program("tiny_deit"))
    for w in words:
        assert w in str(info.value)


def test_latency_aware_choice_from_the_cost_models_block_table(make_program):
    from sliver.backends import fpga
    from sliver.passes import PassContext
    from sliver.passes.tokens.heatvit import latency_aware_schedule, schedule_latency_ms

    prog = make_program("tiny_deit")
    cost = fpga.CostModel(accel="zcu102", bits=8)
    result = passes.parse("heatvit{epochs=0 latency=0.7}").run(prog, PassContext(cost_model=cost), check=False)
    notes = result.report.steps[0].notes
    choice = notes["latency_choice"]
    table = cost.block_latency_table(64, 4, 2.0, token_counts=range(2, 67))
    blocks, keep = choice["blocks"], choice["keep"]
    assert blocks in ([2, 5, 8], [3, 6, 9], [4, 7, 10])  # the given stages or shifted by one
    dense = 12 * table[65]
    assert choice["pruned_ms"] == pytest.approx(schedule_latency_ms(table, 12, 64, blocks, keep))
    assert choice["pruned_ms"] <= 0.7 * dense < schedule_latency_ms(table, 12, 64, blocks, keep + 0.01)
    for shifted in ([2, 5, 8], [3, 6, 9], [4, 7, 10]):  # no candidate meets the target keeping more
        assert schedule_latency_ms(table, 12, 64, shifted, keep + 0.01) > 0.7 * dense
    assert [s["kept"] for s in notes["tokens"]] == [int(64 * keep**s) for s in (1, 2, 3)]
    assert [s["block"] for s in notes["tokens"]] == blocks
    # the table's steps matter: FPGA blocks cost a tile of 32 token rows at a time
    assert table[33] - table[32] > 10 * (table[32] - table[31])
    assert latency_aware_schedule(table, 12, 64, [3, 6, 9], 0.01) is None


def test_latency_aware_choice_needs_a_cost_model(make_program):
    with pytest.raises(errors.PassError) as info:
        passes.parse("heatvit{epochs=0 latency=0.7}").run(make_program("tiny_deit"))
    assert "needs a cost model" in str(info.value) and "latency=0" in str(info.value)
