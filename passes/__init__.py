"""sliver.passes: the pass manager and every rewrite pass.

    from sliver import passes
    pipe = passes.parse("fold-bn,cleanup")
    result = pipe.run(program, seed=0)
    print(result.report)
"""

from . import asvit, cleanup, evit, fold_bn, heatvit, poly_act, pot_shift, rapq  # noqa: F401  (registers the passes)
from .base import Pass, get_pass, option_docs, register, registered
from . import adapruner, block_prune, ofa_prune  # noqa: F401  (registers the pruning passes)
from . import appmul  # noqa: F401  (registers appmul)
from .appmul import AppMulPass
from .adapruner import AdaPruner
from .block_prune import BlockPrune
from .ofa_prune import OFAPrune
from .asvit import ASViT
from .cleanup import Cleanup
from .evit import EViT
from .context import PassContext
from .fold_bn import FoldBN
from .heatvit import HeatViT
from . import lvtp  # noqa: F401  (registers lvtp)
from .lvtp import LVTP
from .poly_act import PolyAct
from .pot_shift import PotShift
from .rapq import RAPQ, PotNaive
from .pipeline import Pipeline, PipelineResult, parse
from .report import Report, StepReport

__all__ = [
    "AppMulPass",
    "AdaPruner",
    "BlockPrune",
    "OFAPrune",
    "ASViT",
    "Cleanup",
    "EViT",
    "FoldBN",
    "HeatViT",
    "LVTP",
    "PolyAct",
    "PotNaive",
    "PotShift",
    "RAPQ",
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
