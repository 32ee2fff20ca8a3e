"""MobileNetV2 in torchvision's layout.

Parameter names match torchvision's ``mobilenet_v2``, so its checkpoints load with
``load_state_dict(strict=True)``::

    features.0              conv-BN-ReLU6 group (indices 0 conv, 1 BN, 2 ReLU6), 3x3 stride 2
    features.1 .. 17        InvertedResidual, each with a ``conv`` Sequential:
                              expand ratio 1: conv.0 depthwise group, conv.1 1x1 Conv2d, conv.2 BN
                              otherwise:      conv.0 1x1 expand group, conv.1 depthwise group,
                                              conv.2 1x1 Conv2d, conv.3 BN
    features.18             1x1 conv-BN-ReLU6 group to ``last_channel``
    classifier.0 Dropout, classifier.1 Linear

Channel counts are scaled by ``width_mult`` and rounded to multiples of 8 exactly as torchvision
does. Defaults: width 1.0, last channel 1280, 224x224 input, 1000 classes (3.50M parameters).
``stem_stride`` (default 2) lets small inputs keep resolution, as the tiny test model does.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..ir.errors import ModelInputError

__all__ = ["ConvNormAct", "InvertedResidual", "MobileNetV2", "make_divisible", "DEFAULT_SETTING"]

# (expand ratio t, output channels c, repeats n, first stride s) for each stage.
DEFAULT_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` without dropping more than 10%."""
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class ConvNormAct(nn.Sequential):
    """Conv2d (no bias, "same" padding) -> BatchNorm2d -> ReLU6, as indices 0, 1, 2."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1):
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU6(),
        )
        self.out_channels = out_channels


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> 1x1 linear projection; residual add iff stride 1 and in == out."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        if stride not in (1, 2):
            raise ModelInputError(f"InvertedResidual stride must be 1 or 2, got {stride}")
        self.stride = stride
        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvNormAct(inp, hidden_dim, kernel_size=1))
        layers += [
            ConvNormAct(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim),
            nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 classifier: ``features`` -> global average pool -> ``classifier``."""

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, in_chans: int = 3,
                 inverted_residual_setting: Sequence[Sequence[int]] | None = None, round_nearest: int = 8,
                 last_channel: int = 1280, stem_stride: int = 2, dropout: float = 0.2):
        super().__init__()
        setting = [tuple(s) for s in (inverted_residual_setting or DEFAULT_SETTING)]
        if not setting or any(len(s) != 4 for s in setting):
            raise ModelInputError(
                "inverted_residual_setting must be a non-empty list of (t, c, n, s) 4-tuples, "
                f"got {inverted_residual_setting!r}")
        if width_mult <= 0:
            raise ModelInputError(f"width_mult must be > 0, got {width_mult}")
        input_channel = make_divisible(32 * width_mult, round_nearest)
        self.last_channel = make_divisible(last_channel * max(1.0, width_mult), round_nearest)

        features: list[nn.Module] = [ConvNormAct(in_chans, input_channel, stride=stem_stride)]
        for t, c, n, s in setting:
            output_channel = make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                features.append(InvertedResidual(input_channel, output_channel, s if i == 0 else 1, t))
                input_channel = output_channel
        features.append(ConvNormAct(input_channel, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.num_classes = num_classes
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes))

        # torchvision's init: He-normal (fan_out) convs, BN 1/0, Linear N(0, 0.01) with zero bias.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)
