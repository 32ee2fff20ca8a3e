"""sliver.backends.fpga: a cycle-counting cost model of a ZCU102-class ViT/CNN accelerator.

    from sliver.backends import fpga
    report = fpga.cost(program, accel="zcu102", bits=8)   # onnx-level Program -> Report
    print(report)                                         # latency, FPS, energy, per-layer table
    report.save("build/m")                                # fpga_report.json + fpga_layers.png
    fpga.block_latency_table(384, 6, 4.0, range(50, 198), bits=8)   # {tokens: ms}

Modules, in reading order: :mod:`.accelerator` (the hardware description and presets, every
constant with its source), :mod:`.formulas` (every cycle and energy formula), :mod:`.lowering`
(ONNX node -> work, one rule per op type; :func:`register_op_cost` is the extension point for
sliver's custom ops), :mod:`.cost` (the driver), :mod:`.report`, :mod:`.blocks` (per-block latency
tables for latency-aware passes).
"""

from .accelerator import (DSP48E2_MACS, PRESETS, ZCU102, ZCU104, Accelerator, AcceleratorError, EnergyModel,
                          GemmEngine, get_accelerator)
from .blocks import (block_latency_ms, block_latency_table, block_model, block_report, pruned_token_schedule,
                     schedule_latency, selector_latency_ms, selector_model)
from .cost import cost, cost_model
from .formulas import GemmWork, OpCost, StreamWork, systolic_cycles
from .lowering import OpContext, known_ops, register_op_cost
from .model import CostModel
from .report import Report

__all__ = [
    "DSP48E2_MACS", "PRESETS", "ZCU102", "ZCU104", "Accelerator", "AcceleratorError", "CostModel", "EnergyModel",
    "GemmEngine", "GemmWork", "OpContext", "OpCost", "Report", "StreamWork", "block_latency_ms",
    "block_latency_table", "block_model", "block_report", "cost", "cost_model", "get_accelerator", "known_ops",
    "pruned_token_schedule", "register_op_cost", "schedule_latency", "selector_latency_ms", "selector_model",
    "systolic_cycles",
]
