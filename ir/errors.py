"""Typed errors for everything sliver reports to a user.

Every error a user can cause (a bad pipeline, a bad model file, an op no backend supports) is a
subclass of :class:`SliverError`. The message is one line that names what was wrong and what to do
about it; the command-line tools print it as ``error: <message>`` and exit with code 2.
"""

from __future__ import annotations


class SliverError(Exception):
    """Base class of all errors sliver raises on purpose."""

    exit_code = 2

    def __str__(self) -> str:  # keep the message on one line, whatever the caller passed
        return " ".join(str(self.args[0]).split()) if self.args else self.__class__.__name__


# -- pipelines --------------------------------------------------------------------------------
class PipelineError(SliverError):
    """A pipeline that cannot run: found while parsing or validating, before anything runs."""


class PipelineSyntaxError(PipelineError):
    """The pipeline text does not parse."""


class UnknownPassError(PipelineError):
    """A pipeline names a pass that is not registered."""


class UnknownOptionError(PipelineError):
    """A pass is given an option it does not have."""


class OptionValueError(PipelineError):
    """An option value has the wrong type or is out of range."""


class PassOrderError(PipelineError):
    """A pass needs a fact (or a level) that no earlier pass provides."""


# -- models and inputs ------------------------------------------------------------------------
class ModelInputError(SliverError):
    """A model file or name that cannot be loaded (missing, not ONNX, unknown zoo name)."""


class UnknownModelError(ModelInputError):
    """A zoo model name that does not exist."""


class DataError(SliverError):
    """A data set, split or data path that does not exist, or data that does not fit the model."""


class TraceError(SliverError):
    """A torch module that torch.fx cannot trace, or an example input that does not fit it."""


class ExportError(SliverError):
    """The torch -> onnx conversion failed or produced an invalid model."""


class UnsupportedOpError(SliverError):
    """An op that a level, a pass or a backend cannot handle; the message names the node."""


# -- passes and backends at run time ----------------------------------------------------------
class PassError(SliverError):
    """A pass failed on this program; the message names the pass and the reason."""


class NumericalCheckError(PassError):
    """A pass changed the program's outputs by more than its declared tolerance."""


class AccuracyDropError(PassError):
    """A step of a pipeline lowered the score by more than the allowed drop (``--max-drop``)."""


class BackendError(SliverError):
    """A backend (TVM, ONNX Runtime, the FPGA model) failed to build or run a program."""


class ArtifactError(BackendError):
    """A saved artifact that is incomplete, altered or not sliver's: refused before it is loaded."""


# -- resources and integrity ------------------------------------------------------------------
class ResourceError(SliverError):
    """An input that would need more memory than the machine has; the message gives the estimate."""


class CheckpointError(DataError):
    """A checkpoint file that is not a safe, intact sliver checkpoint."""
