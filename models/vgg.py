"""VGG in torchvision's layout (configuration "D" = VGG-16, without batch norm by default).

Parameter names match torchvision's ``vgg16``, so its checkpoints load with
``load_state_dict(strict=True)``: ``features.{i}`` is a flat Sequential where every 3x3 conv is
followed by its ReLU and every "M" is a 2x2/2 max-pool (VGG-16's convs sit at indices 0, 2, 5, 7,
10, 12, 14, 17, 19, 21, 24, 26, 28), then ``avgpool`` (AdaptiveAvgPool2d(7x7)) and
``classifier.{0..6}`` = Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear.

Defaults: VGG-16, 224x224 input, 1000 classes, 4096-wide classifier (138.36M parameters).
``cfg``, ``pool_size`` and ``hidden`` shrink it for the tiny test model while keeping the names.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..ir.errors import ModelInputError

__all__ = ["VGG", "VGG16_CFG"]

VGG16_CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                                    512, 512, 512, "M")


def make_features(cfg: Sequence[int | str], in_chans: int = 3, batch_norm: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = in_chans
    for item in cfg:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        if not isinstance(item, int) or item <= 0:
            raise ModelInputError(f"VGG cfg entries must be positive ints or 'M', got {item!r}")
        layers.append(nn.Conv2d(channels, item, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(item))
        layers.append(nn.ReLU())
        channels = item
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """VGG classifier: ``features`` -> ``avgpool`` (pool_size x pool_size) -> ``classifier``."""

    def __init__(self, cfg: Sequence[int | str] = VGG16_CFG, num_classes: int = 1000, in_chans: int = 3,
                 batch_norm: bool = False, pool_size: int = 7, hidden: int = 4096, dropout: float = 0.5):
        super().__init__()
        cfg = list(cfg)
        convs = [c for c in cfg if c != "M"]
        if not convs:
            raise ModelInputError(f"VGG cfg needs at least one conv width, got {cfg!r}")
        self.features = make_features(cfg, in_chans, batch_norm)
        self.avgpool = nn.AdaptiveAvgPool2d((pool_size, pool_size))
        self.num_classes = num_classes
        self.classifier = nn.Sequential(
            nn.Linear(convs[-1] * pool_size * pool_size, hidden),
            nn.ReLU(),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, num_classes),
        )

        # torchvision's init: He-normal (fan_out) convs with zero bias, BN 1/0, Linear N(0, 0.01).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)
