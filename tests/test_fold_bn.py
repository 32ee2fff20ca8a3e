"""fold-bn: BatchNorm disappears into the layer before it, outputs equal within 1e-5."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from sliver import ir, passes


def _trained_looking_bn(net):
    g = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return net


def _bn_nodes(prog):
    gm = prog.module
    return [
        n for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.modules.batchnorm._BatchNorm)
    ]


@pytest.mark.parametrize("name", ["tiny_resnet", "tiny_mobilenet_v2", "resnet18"])
def test_fold_bn_is_exact(name):
    from sliver import models

    torch.manual_seed(0)
    net = _trained_looking_bn(models.create(name))
    x = torch.from_numpy(np.random.default_rng(0).standard_normal(models.input_shape(name)).astype(np.float32))
    prog = ir.trace(net, x, name=name)
    assert _bn_nodes(prog)
    out = passes.parse("fold-bn").run(prog).program
    assert not _bn_nodes(out) and "bn-folded" in out.facts
    ref = prog.run()[0]
    np.testing.assert_allclose(out.run()[0], ref, atol=1e-5 * max(1.0, np.abs(ref).max()), rtol=0)
    assert out.stats().macs == prog.stats().macs


def test_fold_bn_linear_bn1d_and_what_it_leaves_alone():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 5)
            self.bn = nn.BatchNorm1d(5)
            self.shared = nn.Conv2d(3, 3, 1)
            self.bn2 = nn.BatchNorm2d(3)
            self.conv = nn.Conv2d(3, 3, 1)
            self.bn3 = nn.BatchNorm2d(3)

        def forward(self, x, v):
            y = self.bn(self.fc(v))                       # folded
            a = self.bn2(self.shared(self.shared(x)))     # shared conv: not folded
            c = self.conv(x)
            b = self.bn3(c) + c                           # conv output used twice: not folded
            return y, a + b

    net = _trained_looking_bn(Net())
    prog = ir.trace(net, (torch.randn(2, 3, 4, 4), torch.randn(2, 6)))
    result = passes.parse("fold-bn").run(prog)
    remaining = [n.target for n in _bn_nodes(result.program)]
    assert remaining == ["bn2", "bn3"]
    assert result.report.steps[0].notes["folded"] == 1
    for got, ref in zip(result.program.run(), prog.run()):
        np.testing.assert_allclose(got, ref, atol=1e-5)
