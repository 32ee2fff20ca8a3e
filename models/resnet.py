"""ResNet (v1.5: the stride sits on the 3x3 conv of a bottleneck) in torchvision's layout.

Parameter names match torchvision's ``ResNet``, so its checkpoints load with
``load_state_dict(strict=True)``::

    conv1, bn1, [maxpool], layer1..layer4 . {i} . conv1/bn1/conv2/bn2(/conv3/bn3)
                                              . downsample.0 (1x1 conv) / downsample.1 (BN)
    avgpool (AdaptiveAvgPool2d(1)), fc

Parameterless modules differ slightly from torchvision: each ReLU call site has its own
non-inplace ``nn.ReLU`` (``relu`` in the stem, ``relu1``.. in the blocks) instead of one shared
in-place module, so every node of a ``torch.fx`` graph maps to a distinct module. The state_dict
is unaffected.

Defaults: ResNet-18 = BasicBlock [2, 2, 2, 2], ResNet-50 = Bottleneck [3, 4, 6, 3], stage widths
64/128/256/512, 7x7/2 stem conv + 3x3/2 max-pool, 224x224 input, 1000 classes. The stem options
(``stem_kernel``, ``stem_stride``, ``stem_pool``) give the CIFAR-style stem (3x3/1 conv, no pool)
used by the tiny test model.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..ir.errors import ModelInputError

__all__ = ["BasicBlock", "Bottleneck", "ResNet"]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN projection) shortcut."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.relu2 = nn.ReLU()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (strided) -> 1x1 expand (x4), with an identity or projection shortcut."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        width = planes
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU()
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = downsample
        self.relu3 = nn.ReLU()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + identity)


_BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
    """ResNet image classifier in torchvision's layout.

    ``block`` is ``"basic"`` / ``"bottleneck"`` (or the class), ``layers`` the number of blocks per
    stage, ``widths`` the per-stage base width (the bottleneck output is 4x that); the stem conv has
    ``widths[0]`` channels. Stages 2-4 halve the resolution.
    """

    def __init__(self, block: str | type = "basic", layers: Sequence[int] = (2, 2, 2, 2),
                 widths: Sequence[int] = (64, 128, 256, 512), num_classes: int = 1000, in_chans: int = 3,
                 stem_kernel: int = 7, stem_stride: int = 2, stem_pool: bool = True):
        super().__init__()
        if isinstance(block, str):
            if block not in _BLOCKS:
                raise ModelInputError(f"unknown ResNet block {block!r}; use one of {', '.join(_BLOCKS)}")
            block = _BLOCKS[block]
        if block not in (BasicBlock, Bottleneck):
            raise ModelInputError(f"unknown ResNet block {block!r}; use 'basic' or 'bottleneck'")
        layers, widths = list(layers), list(widths)
        if len(layers) != 4 or len(widths) != 4 or min(layers) < 1 or min(widths) < 1:
            raise ModelInputError(
                f"ResNet needs 4 stages with >= 1 block and >= 1 channel each, got layers={layers} "
                f"widths={widths}; pass two lists of 4 positive ints")
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(in_chans, self.inplanes, kernel_size=stem_kernel, stride=stem_stride,
                               padding=stem_kernel // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if stem_pool else None
        self.layer1 = self._make_layer(block, widths[0], layers[0], stride=1)
        self.layer2 = self._make_layer(block, widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, widths[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.num_features = widths[3] * block.expansion
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes)

        # torchvision's init: He-normal (fan_out) convs, BN scale 1 / shift 0, default Linear.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block: type, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        stage = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        stage += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        if self.maxpool is not None:
            x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)
