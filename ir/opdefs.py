"""sliver's custom-domain ONNX ops: names, attributes and cost, defined once.

Passes that emit a custom op (``sliver.ShiftRequant``, ``sliver.AppMatMul``, ...) and backends
that lower it both read its definition here, so neither depends on the other (DESIGN.md,
"Dependencies point one way"). A definition gives the op's MAC count for the statistics and, where
it has one, a reference implementation (numpy) that fixes its semantics for the runtimes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from .onnx_level import SLIVER_DOMAIN


@dataclass(frozen=True)
class CustomOp:
    op_type: str
    doc: str
    #: (node, value_types) -> MACs; None for ops that do no multiply-accumulates
    macs: Optional[Callable] = None
    #: (inputs: list[np.ndarray], attrs: dict) -> list[np.ndarray]
    reference: Optional[Callable] = None
    domain: str = SLIVER_DOMAIN


_OPS: dict = {}


def define(op: CustomOp) -> CustomOp:
    """Register a custom op definition (once per op type)."""
    key = (op.domain, op.op_type)
    if key in _OPS:
        raise ValueError(f"custom op {op.domain}.{op.op_type} is defined twice")
    _OPS[key] = op
    return op


def lookup(domain: str, op_type: str) -> Optional[CustomOp]:
    """The definition of ``domain.op_type``, or None."""
    return _OPS.get((domain, op_type))


def custom_op(node) -> Optional[CustomOp]:
    """The definition of an ONNX node's op, if it is one of sliver's custom ops."""
    return _OPS.get((node.domain, node.op_type))


def defined_ops() -> list:
    return sorted(_OPS.values(), key=lambda o: (o.domain, o.op_type))


# ------------------------------------------------------------------------------------------------
# definitions

INT8_RANGE = (-128, 127)


def shift_requant_reference(inputs, attrs):
    """int32 x -> int8 ``clip((x + 2^(shift-1)) >> shift, -128, 127)`` (round half up; shift 0: x)."""
    import numpy as np

    x = np.asarray(inputs[0]).astype(np.int64)
    shift = int(attrs.get("shift", 0))
    if shift > 0:
        x = (x + (1 << (shift - 1))) >> shift
    return [np.clip(x, *INT8_RANGE).astype(np.int8)]


SHIFT_REQUANT = define(
    CustomOp(
        op_type="ShiftRequant",
        doc="requantise an int32 accumulator to int8: rounding arithmetic right shift by the "
        "attribute `shift` (>= 0), then saturate to [-128, 127]",
        reference=shift_requant_reference,
    )
)
