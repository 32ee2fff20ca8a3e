"""ofa-prune: early structure search, jointly trained (budget, resolution) cohort."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sliver import passes
from sliver.ir.errors import OptionValueError, PassError
from sliver.models import data
from sliver.passes.prune.channels import ChannelGraph
from sliver.passes.prune.ofa_prune import _MaskedBN, cohort

torch.set_num_threads(2)


def test_masked_supernet_equals_sliced_subnetwork(make_program):
    prog = make_program("tiny_mobilenet_v2")
    gm = prog.module
    graph = ChannelGraph(gm)
    keep = graph.full_mask()
    keep[:-1] = np.random.default_rng(0).random(graph.num_units) < 0.5
    for g in graph.groups:
        keep[g.offset] = True
    masked = copy.deepcopy(gm)
    hooks = _MaskedBN(masked, ChannelGraph(masked))
    hooks.mask = keep
    x = torch.from_numpy(prog.example_inputs[0])
    with torch.no_grad():
        torch.testing.assert_close(masked(x), graph.sliced(gm, keep)(x), atol=1e-4, rtol=1e-4)
    hooks.remove()


def test_cohort_of_budgets_and_resolutions():
    from trained import trained_program

    prog = trained_program("tiny_resnet")
    dense = prog.stats().macs
    ctx = passes.PassContext(data=data.digits("train").take(256), seed=0)
    pipe = passes.parse("ofa-prune{budgets=0.5 resolutions=32,24 search_epochs=2 train_epochs=1 select=1}")
    result = pipe.run(prog, ctx, check=False)
    members = ctx.extra["ofa-prune"]
    assert sorted(members) == [(0.5, 24), (0.5, 32)]
    chosen = members[(0.5, 24)]  # select=1: budgets-major order
    assert result.program.input_shapes == chosen.input_shapes == ((1, 3, 24, 24),)
    assert result.program.stats().macs == chosen.stats().macs
    notes = result.report.steps[0].notes
    assert 1 <= notes["search_epochs"] <= 2
    for (budget, size), member in members.items():
        assert member.input_shapes == ((1, 3, size, size),)
        ratio = member.stats().macs / dense
        assert 0.45 <= ratio <= budget, (size, ratio)
        assert notes["macs_ratio"][f"{budget}@{size}"] == round(ratio, 4)
    # the lower resolution leaves room for more channels under the same budget
    widths = {size: sum(p.numel() for p in m.module.parameters()) for (_, size), m in members.items()}
    assert widths[24] > widths[32]
    test = data.digits("test").take(200)
    for (_, size), member in members.items():
        x = F.interpolate(test.images, size=(size, size), mode="bilinear", align_corners=False)
        with torch.no_grad():
            accuracy = (member.module(x).argmax(-1) == test.targets).float().mean().item()
        assert accuracy >= 0.8, (size, accuracy)


def test_options_and_requirements():
    with pytest.raises(OptionValueError, match="budgets"):
        passes.parse("ofa-prune{budgets=0,0.5}")
    from sliver import ir, models

    vgg = ir.trace(models.create("tiny_vgg"), torch.zeros(1, 3, 32, 32))
    with pytest.raises(PassError, match="needs one"):
        cohort(vgg, data.digits("train").take(64), budgets=(0.5,))
