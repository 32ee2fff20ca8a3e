"""sliver's model zoo: plain PyTorch vision models with timm / torchvision parameter names.

``create(name, **options)`` builds a model (eval mode), ``input_shape(name, **options)`` gives
its NCHW input shape and ``available()`` lists the names with one-line descriptions. ViTs follow
timm's ``VisionTransformer`` layout and CNNs torchvision's, so their checkpoints load with
``load_state_dict(strict=True)``. Every model traces with ``torch.fx.symbolic_trace`` and exports
with ``torch.onnx.export``.
"""

from . import data, training  # noqa: F401
from .mobilenet import ConvNormAct, InvertedResidual, MobileNetV2
from .resnet import BasicBlock, Bottleneck, ResNet
from .vgg import VGG
from .vit import Attention, Block, LinearDecoder, Mlp, PatchEmbed, Segmenter, VisionTransformer
from .zoo import ZooEntry, available, create, entry, input_shape

__all__ = [
    "available", "create", "input_shape", "entry", "ZooEntry",
    "VisionTransformer", "Segmenter", "PatchEmbed", "Attention", "Mlp", "Block", "LinearDecoder",
    "ResNet", "BasicBlock", "Bottleneck",
    "MobileNetV2", "InvertedResidual", "ConvNormAct",
    "VGG",
]
