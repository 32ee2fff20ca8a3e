"""The model registry: names -> builders, default options and default input shapes.

``create(name, **options)`` builds a zoo model in eval mode; options override the entry's defaults
and must be constructor keywords of the model class (plus ``img_size``, accepted by every entry).
Initialization draws from torch's global RNG, so it is reproducible under ``torch.manual_seed``.
For the convolutional models ``img_size`` only sets the default input shape: they end in adaptive
pooling and accept other sizes as they are.

``input_shape(name, **options)`` returns the NCHW shape the model expects, e.g. (1, 3, 224, 224);
``available()`` maps every name to a one-line description.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from torch import nn

from ..ir.errors import ModelInputError, UnknownModelError
from .mobilenet import MobileNetV2
from .resnet import ResNet
from .vgg import VGG
from .vit import Segmenter, VisionTransformer

__all__ = ["ZooEntry", "available", "create", "input_shape", "entry"]


@dataclass(frozen=True)
class ZooEntry:
    """One registered model: its class, the keyword defaults that make it, and a short summary."""

    name: str
    builder: Callable[..., nn.Module]
    defaults: Mapping[str, Any]
    summary: str  # what it is and its size, without the input shape
    img_size: int = 224  # default input resolution (square)
    options: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        params = inspect.signature(self.builder).parameters
        object.__setattr__(self, "options", frozenset(params) | {"img_size"})

    def takes_img_size(self) -> bool:
        return "img_size" in inspect.signature(self.builder).parameters

    def resolve(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults overridden by ``options``; rejects options the model class does not have."""
        unknown = sorted(set(options) - self.options)
        if unknown:
            plural = "s" if len(unknown) > 1 else ""
            raise UnknownModelError(
                f"unknown option{plural} {', '.join(map(repr, unknown))} for zoo model {self.name!r}; "
                f"valid options: {', '.join(sorted(self.options))}")
        resolved = {"img_size": self.img_size, **self.defaults}
        resolved.update(options)
        resolved["img_size"] = _check_img_size(resolved["img_size"])
        return resolved

    def describe(self) -> str:
        return f"{self.summary}; input {'x'.join(map(str, input_shape(self.name)))}"


def _check_img_size(img: Any) -> int | tuple[int, int]:
    pair = tuple(img) if isinstance(img, (tuple, list)) else (img, img)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        raise ModelInputError(f"img_size must be a positive int or a (height, width) pair of them, got {img!r}")
    return img if isinstance(img, int) else (pair[0], pair[1])


_ENTRIES: dict[str, ZooEntry] = {}


def _register(name: str, builder: Callable[..., nn.Module], summary: str, img_size: int = 224,
              **defaults: Any) -> None:
    _ENTRIES[name] = ZooEntry(name, builder, defaults, summary, img_size)


# -- full-size models ---------------------------------------------------------------------------
_register("deit_tiny", VisionTransformer, "DeiT-Tiny/16 ViT classifier (timm layout), 5.72M params, 1000 classes",
          embed_dim=192, depth=12, num_heads=3)
_register("deit_small", VisionTransformer, "DeiT-Small/16 ViT classifier (timm layout), 22.05M params, 1000 classes",
          embed_dim=384, depth=12, num_heads=6)
_register("deit_base", VisionTransformer, "DeiT-Base/16 ViT classifier (timm layout), 86.57M params, 1000 classes",
          embed_dim=768, depth=12, num_heads=12)
_register("resnet18", ResNet, "ResNet-18 classifier (torchvision layout), 11.69M params, 1000 classes",
          block="basic", layers=(2, 2, 2, 2))
_register("resnet50", ResNet, "ResNet-50 v1.5 classifier (torchvision layout), 25.56M params, 1000 classes",
          block="bottleneck", layers=(3, 4, 6, 3))
_register("mobilenet_v2", MobileNetV2, "MobileNetV2 1.0 classifier (torchvision layout), 3.50M params, 1000 classes")
_register("vgg16", VGG, "VGG-16 classifier without BN (torchvision layout), 138.36M params, 1000 classes")
_register("segmenter_tiny", Segmenter,
          "Segmenter ViT-Tiny/16 + linear decoder, semantic segmentation (timm encoder layout), "
          "5.71M params, 150 classes (ADE20K), output 150x512x512", img_size=512,
          embed_dim=192, depth=12, num_heads=3, num_classes=150)

# -- tiny variants for tests and digit training (32x32 input, 10 classes) ------------------------
_register("tiny_deit", VisionTransformer,
          "tiny DeiT (patch 4, D 64, depth 12, 4 heads, mlp 2) for 32x32 digits, 0.41M params, 10 classes",
          img_size=32, patch_size=4, embed_dim=64, depth=12, num_heads=4, mlp_ratio=2.0, num_classes=10)
_register("tiny_resnet", ResNet,
          "tiny ResNet (BasicBlock [1,1,1,1], widths 16-128, 3x3/1 stem, no max-pool) for 32x32 digits, "
          "0.31M params, 10 classes",
          img_size=32, block="basic", layers=(1, 1, 1, 1), widths=(16, 32, 64, 128), num_classes=10,
          stem_kernel=3, stem_stride=1, stem_pool=False)
_register("tiny_mobilenet_v2", MobileNetV2,
          "tiny MobileNetV2 (width 0.35, last channel 256, stride-1 stem) for 32x32 digits, "
          "0.28M params, 10 classes",
          img_size=32, width_mult=0.35, last_channel=256, stem_stride=1, num_classes=10)
_register("tiny_vgg", VGG,
          "tiny VGG (16,M,32,M,64,M,128,M; 1x1 avgpool; 128-wide classifier) for 32x32 digits, "
          "0.13M params, 10 classes",
          img_size=32, cfg=(16, "M", 32, "M", 64, "M", 128, "M"), pool_size=1, hidden=128, num_classes=10)
_register("tiny_segmenter", Segmenter,
          "tiny Segmenter (patch 8, D 64, depth 6, 4 heads, mlp 2) for 64x64 digit scenes, 0.22M params, "
          "11 classes (10 digits + background), output 11x64x64",
          img_size=64, patch_size=8, embed_dim=64, depth=6, num_heads=4, mlp_ratio=2.0, num_classes=11)


def entry(name: str) -> ZooEntry:
    """The registry entry for ``name``; raises :class:`UnknownModelError` listing the valid names."""
    try:
        return _ENTRIES[name]
    except (KeyError, TypeError):
        pass
    close = difflib.get_close_matches(str(name), _ENTRIES, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UnknownModelError(
        f"unknown zoo model {name!r}{hint}; available models: {', '.join(_ENTRIES)}")


def available() -> dict[str, str]:
    """Every zoo name mapped to a one-line description (what it is, size, default input shape)."""
    return {name: e.describe() for name, e in _ENTRIES.items()}


def create(name: str, **options: Any) -> nn.Module:
    """Build zoo model ``name`` in eval mode; ``options`` override the entry's constructor defaults.

    Raises :class:`UnknownModelError` for an unknown name or option and
    :class:`~sliver.ir.errors.ModelInputError` for option values the model cannot be built with.
    """
    e = entry(name)
    kwargs = e.resolve(options)
    if not e.takes_img_size():
        kwargs.pop("img_size")  # size-agnostic CNN: img_size only sets input_shape()
    try:
        model = e.builder(**kwargs)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ModelInputError(
            f"cannot build zoo model {name!r} with options {dict(options)!r}: {exc}; check the option values"
        ) from exc
    return model.eval()


def input_shape(name: str, batch_size: int = 1, **options: Any) -> tuple[int, int, int, int]:
    """The NCHW input shape of ``create(name, **options)``, e.g. (1, 3, 224, 224)."""
    e = entry(name)
    kwargs = e.resolve(options)
    img = kwargs["img_size"]
    height, width = (img, img) if isinstance(img, int) else img
    return (int(batch_size), int(kwargs.get("in_chans", 3)), int(height), int(width))
