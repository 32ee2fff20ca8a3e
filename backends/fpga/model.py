"""The cost model object a caller puts in the pass context (``PassContext(cost_model=...)``).

Passes never import backends; they call these methods on ``ctx.cost_model``, so any
object with the same methods (a table of TVM timings, say) can stand in:

- ``latency_ms(program) -> float``: latency of a whole program;
- ``block_latency_ms(embed_dim, heads, mlp_ratio, tokens, bits=None) -> float``: one transformer
  block on ``tokens`` tokens;
- ``block_latency_table(embed_dim, heads, mlp_ratio, token_counts, bits=None) -> {tokens: ms}``.
"""

from __future__ import annotations

from .accelerator import get_accelerator
from .blocks import block_latency_ms, block_latency_table
from .cost import cost


class CostModel:
    """The FPGA cost model with a fixed accelerator, default bit width and nonlinear units."""

    def __init__(self, accel="zcu102", bits: int = 8, nonlinear: str = "exact"):
        self.accel = get_accelerator(accel)
        self.bits = int(bits)
        self.nonlinear = nonlinear

    def cost(self, program, bits: int | None = None):
        return cost(program, self.accel, bits or self.bits, self.nonlinear)

    def latency_ms(self, program, bits: int | None = None) -> float:
        return self.cost(program, bits).latency_ms

    def block_latency_ms(self, embed_dim: int, heads: int, mlp_ratio: float = 4.0, tokens: int = 197,
                         bits: int | None = None) -> float:
        return block_latency_ms(embed_dim, heads, mlp_ratio, tokens, bits or self.bits, self.accel, self.nonlinear)

    def block_latency_table(self, embed_dim: int, heads: int, mlp_ratio: float = 4.0, token_counts=range(1, 198),
                            bits: int | None = None) -> dict:
        return block_latency_table(embed_dim, heads, mlp_ratio, token_counts, bits or self.bits, self.accel,
                                   self.nonlinear)

    def __repr__(self) -> str:
        return f"CostModel({self.accel.name}, bits={self.bits}, nonlinear={self.nonlinear})"
