"""The Program: one model at one IR level, plus what every pass needs to know about it.

Levels, lowered in this order:

- ``torch``: a ``torch.fx.GraphModule`` (float, trainable).
- ``onnx``: an ``onnx.ModelProto`` with static shapes; passes edit it through onnx-graphsurgeon.
- ``tvm``: a Relax ``IRModule`` (imported from the onnx level).

A Program is a value: passes return a new Program and never modify the one they were given.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import SliverError

LEVELS = ("torch", "onnx", "tvm")


def level_index(level: str) -> int:
    """Position of ``level`` in the lowering order (torch < onnx < tvm)."""
    try:
        return LEVELS.index(level)
    except ValueError:
        raise SliverError(f"unknown IR level {level!r}; levels are {', '.join(LEVELS)}") from None


@dataclass(frozen=True)
class PassRecord:
    """What one pass (or level conversion) did to a program: kept in ``Program.history``."""

    name: str
    level: str
    options: str = ""
    stats: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Program:
    """A model at one IR level.

    Attributes:
        level: ``"torch"``, ``"onnx"`` or ``"tvm"``.
        module: the level's module (``GraphModule``, ``ModelProto`` or ``IRModule``).
        example_inputs: example inputs as float32 numpy arrays with static shapes; they fix the
            shapes at every level and feed the numerical checks.
        name: a short name used in printed IR and file names.
        facts: what has been established about the program (``"bn-folded"``, ``"quantized:pot"``...).
        history: the passes that produced it, oldest first.
        input_names: names of the graph inputs, in order.
    """

    level: str
    module: Any
    example_inputs: tuple
    name: str = "model"
    facts: frozenset = frozenset()
    history: tuple = ()
    input_names: tuple = ("input",)

    def __post_init__(self) -> None:
        level_index(self.level)
        object.__setattr__(self, "facts", frozenset(self.facts))
        object.__setattr__(self, "history", tuple(self.history))
        object.__setattr__(
            self, "example_inputs", tuple(np.ascontiguousarray(a) for a in self.example_inputs)
        )

    # -- derived views ----------------------------------------------------------------------
    @property
    def input_shapes(self) -> tuple:
        return tuple(tuple(a.shape) for a in self.example_inputs)

    def replace(self, **changes) -> "Program":
        """A copy of this program with some fields changed (the module is not copied)."""
        return dataclasses.replace(self, **changes)

    def with_facts(self, *added: str, removed: tuple = ()) -> "Program":
        return self.replace(facts=(self.facts | set(added)) - set(removed))

    def clone(self) -> "Program":
        """A copy whose module may be edited without touching this program's module."""
        if self.level == "onnx":
            import onnx

            module = onnx.ModelProto()
            module.CopyFrom(self.module)
        else:
            module = copy.deepcopy(self.module)
        return self.replace(module=module)

    # -- text and statistics (dispatch to the level's module) -------------------------------
    def text(self) -> str:
        """The canonical, deterministic text form of this program (see :mod:`sliver.ir.printer`)."""
        from .printer import print_program

        return print_program(self)

    def stats(self):
        """MACs, parameters and bytes, per node and in total (see :mod:`sliver.ir.stats`)."""
        from .stats import program_stats

        return program_stats(self)

    def run(self, inputs=None) -> list:
        """Run the program on ``inputs`` (default: its example inputs) with its level's reference
        runtime (PyTorch for torch, ONNX Runtime for onnx); returns numpy arrays."""
        from .runtime import run_program

        return run_program(self, self.example_inputs if inputs is None else inputs)

    def __repr__(self) -> str:
        shapes = ", ".join("x".join(map(str, s)) for s in self.input_shapes)
        facts = ",".join(sorted(self.facts)) or "-"
        return f"Program({self.name!r}, level={self.level}, inputs=[{shapes}], facts={facts})"
