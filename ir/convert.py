"""Level conversions: torch -> onnx (export) and onnx -> tvm (Relax import).

Lowering only goes down: a program never returns to a higher level.
"""

from __future__ import annotations

from .errors import PassOrderError
from .program import LEVELS, Program, level_index


def convert(program: Program, level: str) -> Program:
    """Lower ``program`` step by step until it is at ``level``."""
    target = level_index(level)
    if target < level_index(program.level):
        raise PassOrderError(
            f"cannot raise a {program.level}-level program back to the {level} level; "
            f"put {level}-level passes before {program.level}-level ones"
        )
    while program.level != level:
        program = convert_step(program)
    return program


def convert_step(program: Program) -> Program:
    """Lower ``program`` by exactly one level."""
    if program.level == "torch":
        from .onnx_level import export

        return export(program)
    if program.level == "onnx":
        from .tvm_level import import_onnx

        return import_onnx(program)
    raise PassOrderError(f"a {program.level}-level program is already at the lowest level ({LEVELS[-1]})")
