"""sliver.ir: programs at each level, tracing and import, printers, statistics.

    from sliver.ir import trace, load_onnx, Program
    prog = trace(net, torch.randn(1, 3, 224, 224))
    print(prog.text()); print(prog.stats())
"""

from . import errors
from .convert import convert
from .onnx_level import export as to_onnx
from .onnx_level import load as load_onnx
from .program import LEVELS, PassRecord, Program
from .stats import Stats
from .torch_level import is_attention, is_transformer_block, trace

__all__ = [
    "LEVELS",
    "PassRecord",
    "Program",
    "Stats",
    "convert",
    "errors",
    "is_attention",
    "is_transformer_block",
    "load_onnx",
    "to_onnx",
    "trace",
]
