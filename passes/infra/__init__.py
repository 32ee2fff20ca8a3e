"""The pass manager: the pass base and registry with declared options (:mod:`.base`), facts
(:mod:`.facts`), the pass context (:mod:`.context`), the pipeline and its runner with instruments
(:mod:`.pipeline`) and the report (:mod:`.report`). Nothing here knows any particular pass."""

from .base import Pass, get_pass, option, option_docs, register, registered
from .context import PassContext
from .pipeline import DumpIR, Instrument, NumericalCheck, Pipeline, PipelineResult, Timing, parse
from .report import Report, StepReport
