"""sliver.passes: the pass manager and every rewrite pass.

    from sliver import passes
    pipe = passes.parse("fold-bn,cleanup")
    result = pipe.run(program, seed=0)
    print(result.report)
"""

from . import asvit, cleanup, evit, fold_bn, heatvit, poly_act  # noqa: F401  (registers the passes)
from .base import Pass, get_pass, option_docs, register, registered
from .asvit import ASViT
from .cleanup import Cleanup
from .evit import EViT
from .context import PassContext
from .fold_bn import FoldBN
from .heatvit import HeatViT
from .poly_act import PolyAct
from .pipeline import Pipeline, PipelineResult, parse
from .report import Report, StepReport

__all__ = [
    "ASViT",
    "Cleanup",
    "EViT",
    "FoldBN",
    "HeatViT",
    "PolyAct",
    "Pass",
    "PassContext",
    "Pipeline",
    "PipelineResult",
    "Report",
    "StepReport",
    "get_pass",
    "option_docs",
    "parse",
    "register",
    "registered",
]
