"""lvtp: multi-scale Tsallis entropy + Sobel edges, twice clustering, grid restoration, static
shapes through ONNX and TVM, and the mIoU of the trained tiny segmenter on digit scenes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm_style import RefTimmViT

from sliver import backends, ir, models, passes
from sliver.ir import errors
from sliver.passes.tokens.lvtp import PatchEdges, multiscale_entropy, tsallis_entropy, two_means
from sliver.passes.transformer import attention_parts


def test_tsallis_entropy_formula():
    p = torch.tensor([[0.5, 0.25, 0.25]])
    # S_2 = 1 - sum p^2 = 0.625, largest value (uniform over 3) = 1 - 1/3
    assert tsallis_entropy(p, 2.0).item() == pytest.approx(0.625 / (2 / 3), rel=1e-6)
    shannon = -(0.5 * math.log(0.5) + 0.5 * math.log(0.25))
    assert tsallis_entropy(p, 1.0).item() == pytest.approx(shannon / math.log(3), rel=1e-6)
    assert tsallis_entropy(p, 1.001).item() == pytest.approx(tsallis_entropy(p, 1.0).item(), abs=1e-3)  # q -> 1
    assert tsallis_entropy(torch.full((1, 7), 1 / 7), 0.5).item() == pytest.approx(1.0, rel=1e-6)
    assert tsallis_entropy(torch.tensor([[1.0, 0.0, 0.0]]), 0.5).item() == pytest.approx(0.0, abs=1e-6)


def test_dynamic_weights_follow_the_spread():
    torch.manual_seed(0)
    probs = torch.rand(2, 3, 5, 9).softmax(-1)
    mixed = multiscale_entropy(probs, (0.5, 1.0, 2.0))
    scales = torch.stack([tsallis_entropy(probs, q).mean(1) for q in (0.5, 1.0, 2.0)], 1)
    w = scales.std(-1) + 1e-6
    w = w / w.sum(1, keepdim=True)
    torch.testing.assert_close(mixed, (w[:, :, None] * scales).sum(1))
    assert mixed.shape == (2, 5) and bool((mixed >= 0).all() and (mixed <= 1).all())


def test_two_means_splits_and_respects_the_mask():
    v = torch.tensor([[0.0, 0.1, 0.9, 1.0, 0.2], [0.5, 0.5, 0.5, 0.5, 3.0]])
    assert two_means(v).tolist() == [[False, False, True, True, False], [False, False, False, False, True]]
    mask = torch.tensor([[True, True, False, False, True], [True] * 5])
    assert two_means(v, mask).tolist()[0] == [False, False, False, False, True]  # 0.2 is high among 0, 0.1, 0.2


def test_patch_edges_find_the_patches_with_the_edge():
    image = torch.zeros(1, 3, 32, 32)
    image[..., 12:] = 1.0  # a vertical step between pixel columns 11 and 12: patch column 1 of 4
    edges = PatchEdges(8)(image).reshape(4, 4)
    # the image's outermost pixel rows get no gradient, so the top and bottom patches have 7 of 8 rows
    torch.testing.assert_close(edges[:, 1], torch.tensor([7 / 8, 1.0, 1.0, 7 / 8]))
    assert float(edges[:, [0, 2, 3]].abs().max()) == 0.0


def test_keep_entropy_decides_which_attention_ranks_first(make_program):
    """keep_entropy=low ranks a token with focused attention over one that attends everywhere;
    high the other way round (edge score off)."""
    prog = make_program("tiny_segmenter")
    probs = torch.full((1, 4, 3, 3), 1 / 3)  # CLS + 2 patch tokens; token 2 attends uniformly
    probs[:, :, 1] = torch.tensor([0.02, 0.96, 0.02])  # token 1 attends to itself
    edges = torch.zeros(1, 2)
    for direction, first in (("low", 0), ("high", 1)):
        stage = passes.parse(f"lvtp{{blocks=2 keep_entropy={direction}}}").run(prog).program.module.get_submodule("blocks.2")
        rank, score, _ = stage.scores(probs, edges)
        assert int(rank.argmax()) == first and float(score.max() - score.min()) > 0.2


def _block_macs(n, dim=64, mlp_ratio=2):
    return (4 + 2 * mlp_ratio) * n * dim * dim + 2 * n * n * dim


def test_schedule_and_exact_macs(make_program):
    prog = make_program("tiny_segmenter")
    result = passes.parse("lvtp{blocks=1,2,3 keep=0.7}").run(prog, check=False)
    schedule = result.report.steps[0].notes["tokens"]
    assert [(s["tokens_in"], s["kept"], s["tokens_out"]) for s in schedule] == [(65, 45, 46), (46, 32, 33), (33, 23, 24)]
    # the stage blocks run in full; blocks 2, 3, 4, 5 see 46, 33, 24, 24 tokens; Sobel: 2 x 3x3 on 62x62
    tokens = [65, 65, 46, 33, 24, 24]
    dense = result.report.before["macs"]
    expected = dense - 6 * _block_macs(65) + sum(_block_macs(n) for n in tokens) + 2 * 9 * 62 * 62
    assert result.report.after["macs"] == expected
    assert 1 - expected / dense >= 0.20


def _input_of_block(net, x, index):
    tokens = torch.cat([net.cls_token.expand(x.shape[0], -1, -1), net.patch_embed(x)], 1) + net.pos_embed
    for i in range(index):
        tokens = net.blocks[i](tokens)
    return tokens


def test_pruned_tokens_are_restored_with_their_last_features(make_program):
    """The pass's output equals a hand-written progressive pruning of the segmenter."""
    prog = make_program("tiny_segmenter")
    out = passes.parse("lvtp{blocks=2 keep=0.5}").run(prog).program
    torch.manual_seed(0)
    net, stage = models.create("tiny_segmenter"), out.module.get_submodule("blocks.2")  # make_program's weights
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got = out.module(x)
        before = _input_of_block(net, x, 2)
        _, probs, _ = attention_parts(net.blocks[2].attn, net.blocks[2].norm1(before))
        tokens = net.blocks[2](before)
        rank, _, _ = stage.scores(probs, PatchEdges(8)(x))
        kept = rank.argsort(dim=1, descending=True, stable=True)[:, :32]
        active = torch.cat([tokens[:, :1], torch.gather(tokens[:, 1:], 1, kept[..., None].expand(-1, -1, 64))], 1)
        for i in range(3, 6):
            active = net.blocks[i](active)
        grid = tokens[:, 1:].scatter(1, kept[..., None].expand(-1, -1, 64), active[:, 1:])  # parked: block 2's output
        full = net.norm(torch.cat([active[:, :1], grid], 1))
        expected = F.interpolate(net.decoder(full[:, 1:]), size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model", ["tiny_segmenter", "timm_style"])
def test_static_mode_exports_and_builds_with_tvm(model, make_program):
    """The segmenter goes through TVM; the timm-style classifier (grid restored before the final
    norm, the head reads CLS) through ONNX Runtime: its ONNX ops are the same (TopK, GatherElements,
    ScatterElements), and one TVM build per op set keeps the suite fast."""
    if model == "tiny_segmenter":
        prog = make_program("tiny_segmenter")
    else:
        torch.manual_seed(0)
        prog = ir.trace(RefTimmViT(dim=64, depth=6, heads=4, img=32, patch=4, classes=10), torch.randn(1, 3, 32, 32))
    pipe = passes.parse("lvtp{blocks=1,3 keep=0.6}")
    torch_prog = pipe.run(prog).program
    onnx_prog = pipe.run(prog, lower_to="onnx").program
    ops = [n.op_type for n in onnx_prog.module.graph.node]
    assert ops.count("TopK") == 2 and ops.count("ScatterElements") == 1
    x = np.random.default_rng(5).standard_normal(prog.example_inputs[0].shape).astype(np.float32)
    ref = torch_prog.run([x])[0]
    np.testing.assert_allclose(onnx_prog.run([x])[0], ref, atol=1e-4, rtol=0)
    if model == "tiny_segmenter":
        np.testing.assert_allclose(backends.tvm.build(onnx_prog).run([x])[0], ref, atol=1e-4, rtol=0)


def test_adaptive_mode_keeps_the_chosen_clusters(make_program):
    prog = make_program("tiny_segmenter")
    out = passes.parse("lvtp{blocks=1,3 mode=adaptive}").run(prog).program
    stage = out.module.get_submodule("blocks.1")
    assert not stage.last_stage and out.module.get_submodule("blocks.3").last_stage
    x = torch.from_numpy(prog.example_inputs[0])
    seen = {}
    stage.register_forward_hook(lambda m, i, o: seen.update(kept=o[0].shape[1] - 1, parked=o[2].shape[1]))
    with torch.no_grad():
        y = out.module(x)
        torch.manual_seed(0)
        _, probs, _ = attention_parts(stage.attn, stage.norm1(_input_of_block(models.create("tiny_segmenter"), x, 1)))
        edges = PatchEdges(8)(x)
        _, _, chosen = stage.scores(probs, edges)
        kept = stage.adaptive_choice(chosen, edges, torch.arange(64).reshape(1, 64))
    assert y.shape == (1, 11, 64, 64)
    assert bool((kept >= chosen).all())
    assert seen["kept"] == int(kept.sum()) and seen["kept"] + seen["parked"] == 64


def test_adaptive_choice_keeps_edge_tokens_and_their_neighbours_until_the_last_stage(make_program):
    stage = passes.parse("lvtp{blocks=2 mode=adaptive}").run(make_program("tiny_segmenter")).program.module.get_submodule("blocks.2")
    edges = torch.zeros(1, 64)
    edges[0, 3 * 8 + 5] = 1.0  # one edge patch at row 3, column 5 of the 8 x 8 grid
    nothing = torch.zeros(1, 64, dtype=torch.bool)
    index = torch.arange(64).reshape(1, 64)
    assert stage.last_stage and stage.adaptive_choice(nothing, edges, index).nonzero()[:, 1].tolist() == [29]
    stage.last_stage = False
    kept = stage.adaptive_choice(nothing, edges, index).reshape(8, 8)
    assert kept.nonzero().tolist() == [[r, c] for r in (2, 3, 4) for c in (4, 5, 6)]
    # a later stage sees only some tokens: the neighbourhood is taken on the grid, then gathered
    later = stage.adaptive_choice(nothing[:, :3], edges, torch.tensor([[0, 20, 29]]))
    assert later.tolist() == [[False, True, True]]


def test_lvtp_golden(make_program, golden):
    golden("torch/tiny_segmenter_lvtp", passes.parse("lvtp").run(make_program("tiny_segmenter")).program.text())


@pytest.mark.parametrize(
    "pipeline, model, error, words",
    [
        ("lvtp{blocks=1,6}", "tiny_segmenter", errors.OptionValueError, ["block index 6", "6 blocks (0..5)"]),
        ("lvtp{keep=0}", "tiny_segmenter", errors.OptionValueError, ["keep=0.0 must lie in (0, 1]"]),
        ("lvtp{keep=1.5}", "tiny_segmenter", errors.OptionValueError, ["(0, 1]"]),
        ("lvtp{q=0,1}", "tiny_segmenter", errors.OptionValueError, ["positive numbers"]),
        ("lvtp{edge_weight=2}", "tiny_segmenter", errors.OptionValueError, ["edge_weight=2.0", "[0, 1]"]),
        ("lvtp{keep_entropy=mid}", "tiny_segmenter", errors.OptionValueError, ["keep_entropy=mid", "low or high"]),
        ("lvtp", "tiny_resnet", errors.UnsupportedOpError, ["needs a vision transformer", "no attention blocks"]),
    ],
)
def test_bad_options_are_one_line_errors(pipeline, model, error, words, make_program):
    with pytest.raises(error) as info:
        passes.parse(pipeline).run(make_program(model))
    assert "\n" not in str(info.value)
    for w in words:
        assert w in str(info.value)


def test_trained_segmenter_keeps_its_miou_with_20_percent_fewer_macs():
    """The acceptance figure: the trained tiny segmenter with lvtp's defaults in adaptive mode (per-image
    token counts, batch 1), no training, on the 300 val and the 300 test digit scenes: >= 20% fewer
    MACs on average, at most one point of mIoU lost. The MACs of each image are counted exactly from
    the tokens its stages kept (the block formula of test_schedule_and_exact_macs, plus the Sobel
    filter). Static mode does not reach this (about -4 points at 0.78 of the MACs; see the pass's
    docstring: even a ground-truth choice of the parked tokens loses 2.5 points with static counts)."""
    from sliver.backends.evaluate import score
    from sliver.models import data
    from sliver.passes.tokens.common import recording_selections

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 600 batch-1 runs of a 0.2M-parameter model: threads only add overhead
    try:
        _check_adaptive_segmenter(score, data, recording_selections)
    finally:
        torch.set_num_threads(threads)


def _check_adaptive_segmenter(score, data, recording_selections):
    from trained import trained_program

    program = trained_program("tiny_segmenter", batch=1)
    result = passes.parse("lvtp{mode=adaptive}").run(program, check=False)
    dense_macs = result.report.before["macs"]
    blocks = [s["block"] for s in result.report.steps[0].notes["tokens"]]
    assert blocks == [2, 3]
    for split in ("val", "test"):
        scenes = data.digit_scenes(split)
        before = score(program, data=scenes).value
        outputs, ratios = [], []
        with torch.no_grad():
            for i in range(len(scenes)):
                with recording_selections() as kept:
                    outputs.append(result.program.module(scenes.images[i : i + 1]))
                tokens = [65, 65, 65] + [int(kept[0].shape[1]) + 1] + [int(kept[1].shape[1]) + 1] * 2
                macs = dense_macs - 6 * _block_macs(65) + sum(_block_macs(n) for n in tokens) + 2 * 9 * 62 * 62
                ratios.append(macs / dense_macs)
        metric = data.MeanIoU(scenes.num_classes)
        metric.update(torch.cat(outputs), scenes.targets)
        after = metric.value()
        macs = sum(ratios) / len(ratios)
        print(f"lvtp adaptive, {split}: mIoU {before:.2f}% -> {after:.2f}% ({after - before:+.2f} pt) at {macs:.3f} of the MACs")
        assert macs <= 0.80
        assert after >= before - 1.0

