"""MAC and parameter counts: the published sizes (docs/results.md), and the two levels agree."""

from __future__ import annotations

import pytest
import torch

from sliver import ir, models

# (GMACs, M params) as published (timm and torchvision model cards, the papers); sliver must reproduce them within 2%.
PUBLISHED = {
    "deit_tiny": (1.258, 5.72),
    "deit_small": (4.608, 22.05),
    "deit_base": (17.58, 86.57),
    "resnet18": (1.81, 11.69),
    "resnet50": (4.09, 25.56),
    "mobilenet_v2": (0.30, 3.50),
    "vgg16": (15.47, 138.36),
}
SLOW_EXPORT = {"deit_base", "vgg16"}  # 12-20 s to export on this machine


def _program(name):
    torch.manual_seed(0)
    net = models.create(name)
    # Trained-looking BatchNorm statistics: with the default ones (mean 0, var 1, beta 0) every
    # folded conv bias is zero and the exporter shares the identical tensors.
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.bias.data.uniform_(-0.1, 0.1)
    return ir.trace(net, torch.randn(*models.input_shape(name)), name=name)


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_EXPORT else n for n in PUBLISHED]
)
def test_published_sizes_at_both_levels(name):
    gmacs, mparams = PUBLISHED[name]
    prog = _program(name)
    ts = prog.stats()
    assert ts.macs / 1e9 == pytest.approx(gmacs, rel=0.02)
    assert ts.params / 1e6 == pytest.approx(mparams, rel=0.02)
    os_ = ir.to_onnx(prog).stats()
    assert os_.macs == ts.macs  # same convention, same model: exactly the same count
    # the exporter folds BatchNorm into convs: one parameter fewer per BN channel, nothing else
    bn_channels = sum(m.num_features for m in prog.module.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert os_.params == ts.params - bn_channels
    assert os_.params / 1e6 == pytest.approx(mparams, rel=0.02)


def test_attention_matmuls_are_counted():
    """DeiT-T's Q.K^T and A.V: 12 blocks x 2 x (197 x 197 x 192) MACs = 0.179 GMACs."""
    prog = _program("deit_tiny")
    stats = prog.stats()
    blocks = [n for n in stats.nodes if n.op == "Block"]
    assert len(blocks) == 12
    linear = sum(m.in_features * m.out_features for m in prog.module.modules() if isinstance(m, torch.nn.Linear))
    per_block_linear = sum(
        m.in_features * m.out_features for m in prog.module.get_submodule("blocks.0").modules() if isinstance(m, torch.nn.Linear)
    )
    attention = blocks[0].macs - 197 * per_block_linear
    assert attention == 2 * 197 * 197 * 192
    assert 12 * attention / 1e9 == pytest.approx(0.179, rel=0.01)
    assert linear > 0


def test_fused_attention_is_counted_too():
    """A user's attention written with scaled_dot_product_attention is counted like the explicit one."""

    class Fused(torch.nn.Module):
        def forward(self, q):
            return torch.nn.functional.scaled_dot_product_attention(q, q, q)

    q = torch.randn(1, 3, 197, 64)
    stats = ir.trace(Fused(), q).stats()
    assert stats.macs == 2 * 3 * 197 * 197 * 64


def test_per_node_stats_add_up():
    prog = _program("resnet18")
    stats = prog.stats()
    assert sum(n.macs for n in stats.nodes) == stats.macs
    conv1 = next(n for n in stats.nodes if n.name == "conv1")
    assert conv1.macs == 64 * 112 * 112 * 3 * 7 * 7 and conv1.params == 64 * 3 * 7 * 7
    assert conv1.weight_bytes == 4 * conv1.params and conv1.activation_bytes == 4 * 64 * 112 * 112
    onnx_stats = ir.to_onnx(prog).stats()
    first_conv = next(n for n in onnx_stats.nodes if n.op == "Conv")
    assert first_conv.macs == conv1.macs and first_conv.params == conv1.params + 64  # + folded BN bias
