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


def custom_op(node) -> Optional[CustomOp]:
    """The definition of an ONNX node's op, if it is one of sliver's custom ops."""
    return _OPS.get((node.domain, node.op_type))


def defined_ops() -> list:
    return sorted(_OPS.values(), key=lambda o: (o.domain, o.op_type))
