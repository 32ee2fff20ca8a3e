"""sliver.passes: the pass manager and every rewrite pass.

    from sliver import passes
    pipe = passes.parse("fold-bn,cleanup")
    result = pipe.run(program, seed=0)
    print(result.report)

Layout: ``infra/`` is the pass manager (base and registry, options, facts, context, pipeline,
report); the families are ``tokens/``, ``quant/``, ``prune/`` and ``appmul/``; ``fold_bn``,
``cleanup``, ``transformer`` (block layouts) and ``qlayers`` (quantised layer types) are shared by
every family. A family never imports another family.
"""

from .infra import (
    DumpIR,
    Instrument,
    NumericalCheck,
    Pass,
    PassContext,
    Pipeline,
    PipelineResult,
    Report,
    StepReport,
    Timing,
    get_pass,
    option,
    option_docs,
    parse,
    register,
    registered,
)
from . import cleanup, fold_bn  # noqa: F401  (registers the general passes)
from .cleanup import Cleanup
from .fold_bn import FoldBN
from .tokens import ASViT, EViT, HeatViT, LVTP, keep_maps  # noqa: F401
from .quant import PolyAct, PotNaive, PotShift, RAPQ
from .prune import AdaPruner, BlockPrune, OFAPrune
from . import appmul  # noqa: F401  (registers appmul)
from .appmul import AppMulPass
from . import recipes  # noqa: E402  (named pipelines; after the passes they name are registered)

__all__ = [
    "DumpIR",
    "Instrument",
    "NumericalCheck",
    "Timing",
    "recipes",
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
    "option",
    "option_docs",
    "parse",
    "register",
    "registered",
]
