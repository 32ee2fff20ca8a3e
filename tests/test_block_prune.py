"""block-prune: tile-structured weight sparsity, and the FPGA model skipping the zero tiles."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from sliver import ir, passes
from sliver.backends import fpga
from sliver.ir.errors import OptionValueError
from sliver.passes.prune.block_prune import block_mask

torch.set_num_threads(2)


def test_block_mask_zeroes_the_weakest_tiles():
    m = torch.zeros(4, 6)
    m[:2, :3] = 5.0  # tile (0, 0) strongest
    m[2:, :3] = 1.0  # tile (1, 0)
    m[:2, 3:] = 0.1  # tile (0, 1) weakest
    m[2:, 3:] = 2.0  # tile (1, 1)
    keep = block_mask(m, (2, 3), 0.5)
    expected = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1]]).bool()
    assert torch.equal(keep, expected)
    # edge tiles are smaller, and a block larger than the matrix is clipped to it
    assert block_mask(torch.randn(5, 7), (2, 3), 0.0).all()
    assert (~block_mask(torch.randn(3, 3), (8, 1), 1 / 3)).sum() == 3  # one column of the 3x1 tiles


def test_tiles_are_zero_and_rest_untouched(make_program):
    prog = make_program("tiny_resnet")
    out = passes.parse("block-prune{block=16,4 sparsity=0.5 finetune_epochs=0}").run(prog, check=False)
    notes = out.report.steps[0].notes
    assert 0.49 <= notes["weight_sparsity"] <= 0.51
    before = dict(prog.module.named_modules())
    for name, mod in out.program.module.named_modules():
        if isinstance(mod, nn.Conv2d) and mod.weight.shape[0] >= 16 and mod.weight[0].numel() >= 8:
            w = mod.weight.detach().reshape(mod.weight.shape[0], -1)
            tiles = w.reshape(w.shape[0] // 16, 16, -1)
            w0 = before[name].weight.detach().reshape(w.shape)
            kept = w != 0
            assert torch.equal(w[kept], w0[kept])  # surviving weights unchanged
            zero_fraction = (w == 0).float().mean().item()
            assert 0.4 <= zero_fraction <= 0.6, name
            del tiles
    assert "block-sparse" in out.program.facts


def test_fpga_model_skips_pruned_blocks(make_program):
    prog = make_program("tiny_resnet")
    pruned = passes.parse("block-prune{sparsity=0.5 finetune_epochs=0}").run(prog, check=False).program
    dense_cost, sparse_cost = fpga.cost(ir.to_onnx(prog)), fpga.cost(ir.to_onnx(pruned))
    assert sparse_cost.cycles < 0.8 * dense_cost.cycles
    assert sparse_cost.macs < 0.6 * dense_cost.macs  # MACs the array actually issues
    # the same sparsity scattered at random (no whole zero rows per column fold) saves nothing
    rng = np.random.default_rng(0)
    scattered = prog.clone()
    with torch.no_grad():
        for mod in scattered.module.modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                mod.weight.mul_(torch.from_numpy(rng.random(tuple(mod.weight.shape)) > 0.5).float())
    assert fpga.cost(ir.to_onnx(scattered)).cycles == pytest.approx(dense_cost.cycles, rel=1e-9)


def test_options_are_checked():
    with pytest.raises(OptionValueError, match="block=4"):
        passes.parse("block-prune{block=4}")
    with pytest.raises(OptionValueError, match="sparsity"):
        passes.parse("block-prune{sparsity=1.0}")
