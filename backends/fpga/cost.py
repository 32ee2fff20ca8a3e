"""Cost an onnx-level Program on an accelerator: lower every node, price the work, report.

    from sliver.backends import fpga
    report = fpga.cost(program)                         # ZCU102, 8-bit, exact nonlinear units
    report = fpga.cost(program, accel="zcu102", bits=16, nonlinear="poly")
    report.save("build/m")                              # fpga_report.json + fpga_layers.png
"""

from __future__ import annotations

import numbers
import time

from ...ir.errors import BackendError
from .accelerator import NONLINEAR_IMPLS, Accelerator, get_accelerator
from .formulas import GemmWork, OpCost, energy_pj, gemm_cost, pipeline_cycles, stream_cost
from .lowering import OpContext, elementwise_groups, lower
from .report import Report, layer_of

_UNIT_OF_KIND = {"vector": "vector", "nonlinear": "nonlinear", "move": "move", "fused": "fused", "free": "free"}


def _check(bits, nonlinear: str) -> int:
    if nonlinear not in NONLINEAR_IMPLS:
        raise BackendError(f"unknown nonlinear implementation {nonlinear!r}; use one of {', '.join(NONLINEAR_IMPLS)}")
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not 1 <= bits <= 32:
        raise BackendError(f"bits must be an integer from 1 to 32, got {bits!r}")
    return int(bits)


def cost(program, accel="zcu102", bits: int = 8, nonlinear: str = "exact", name: str | None = None) -> Report:
    """The cycle-level cost of ``program`` on ``accel``.

    Args:
        program: an onnx-level :class:`~sliver.ir.Program` (a torch-level one is exported first)
            or an ``onnx.ModelProto`` with static shapes.
        accel: an :class:`Accelerator` or a preset name (``"zcu102"``, ``"zcu104"``).
        bits: operand width of every value whose dtype is not an integer type (float graphs are
            costed as if quantized to ``bits``); integer tensors keep their own width.
        nonlinear: ``"exact"`` or ``"poly"`` (polynomial approximations, as HeatViT uses).
    """
    model, label, batch = _model_of(program)
    return cost_model(model, get_accelerator(accel), bits, nonlinear, name=name or label, batch=batch)


def _model_of(program) -> tuple:
    import onnx

    if isinstance(program, onnx.ModelProto):
        return program, program.graph.name or "model", _batch(program)
    level = getattr(program, "level", None)
    if level == "torch":
        from ...ir.convert import convert

        program = convert(program, "onnx")
        level = "onnx"
    if level != "onnx":
        raise BackendError(f"the FPGA cost model reads onnx-level programs, got a {level}-level one; "
                           "cost the program before lowering it to tvm")
    return program.module, program.name, _batch(program.module)


def _batch(model) -> int:
    from ...ir.onnx_level import value_types

    types = value_types(model)
    inits = {i.name for i in model.graph.initializer}
    for i in model.graph.input:
        shape = types.get(i.name, (None, None))[1]
        if i.name not in inits and shape and isinstance(shape[0], int) and len(shape) >= 3:
            return shape[0]
    return 1


def cost_model(model, accel: Accelerator, bits: int = 8, nonlinear: str = "exact", *, name: str = "model",
               batch: int = 1, onchip_io: bool = False, constants: frozenset = frozenset()) -> Report:
    """Cost an ``onnx.ModelProto``. ``onchip_io``: the graph's inputs and outputs stay on chip
    (a piece of a larger model, as in :mod:`.blocks`); ``constants``: extra value names to treat
    as weights in DDR (graph inputs that stand for weights)."""
    bits = _check(bits, nonlinear)
    t0 = time.perf_counter()
    ctx = OpContext(model, accel, bits, onchip_io=onchip_io, constants=frozenset(constants))
    report = Report(name=name, accel=accel, bits=bits, nonlinear=nonlinear, batch=batch)
    nodes = list(model.graph.node)
    works = [lower(node, ctx) for node in nodes]
    for node, work in zip(nodes, works):
        node_name = node.name or (node.output[0] if node.output else node.op_type)
        report.ops.append(price(work, accel, nonlinear, node_name, node.op_type))
    for group in elementwise_groups(nodes, works, ctx):
        _merge_pipeline([report.ops[i] for i in group], accel)
    report.seconds = time.perf_counter() - t0
    return report


def _merge_pipeline(ops: list, accel: Accelerator) -> None:
    """Charge a chain of elementwise ops as one pipeline (:func:`.formulas.pipeline_cycles`) to
    its slowest member; the others become fused."""
    if not any(o.unit in ("vector", "nonlinear") for o in ops):
        return  # bias, scale, clip... only: already fused into their producer
    head = max(ops, key=lambda o: o.compute_cycles)
    memory = sum(o.memory_cycles for o in ops)
    cycles = pipeline_cycles([o.compute_cycles for o in ops], [o.memory_cycles for o in ops], accel)
    for o in ops:
        if o is not head:
            o.cycles, o.unit, o.bound = 0.0, "fused", "fused"
            o.detail = (o.detail + f"; in the pipeline of {head.name}").lstrip("; ")
    head.cycles, head.memory_cycles = cycles, memory
    head.bound = "compute" if head.compute_cycles >= memory else "memory"
    head.detail = (head.detail + f"; pipeline of {len(ops)} elementwise ops").lstrip("; ")


def price(work, accel: Accelerator, nonlinear: str, name: str, op: str) -> OpCost:
    """Cycles and energy of one work item (the formulas are in :mod:`.formulas`)."""
    layer = layer_of(name)
    if isinstance(work, GemmWork):
        c = gemm_cost(work, accel)
        engine = accel.gemm if work.engine == "dsp" else accel.lut_gemm
        onchip = work.batch * sum(b for b, ddr in ((work.a_bytes, work.a_ddr), (work.b_bytes, work.b_ddr),
                                                    (work.out_bytes, work.out_ddr)) if not ddr)
        peak = engine.peak_macs_per_cycle(work.bits)
        return OpCost(
            name=name, op=op, layer=layer, unit="gemm" if work.engine == "dsp" else "lut-gemm",
            cycles=c["cycles"], compute_cycles=c["compute"], memory_cycles=c["memory"],
            bound="compute" if c["compute"] >= c["memory"] else "memory", bits=work.bits, macs=work.macs,
            ddr_bytes=c["ddr_bytes"], onchip_bytes=onchip,
            energy_pj=energy_pj(accel, nonlinear, macs=work.macs, bits=work.bits, ddr_bytes=c["ddr_bytes"],
                                onchip_bytes=onchip, mac_ratio=work.energy_ratio *
                                (accel.energy.lut_mac_ratio if work.engine == "lut" else 1.0)),
            utilisation=work.macs / (c["cycles"] * peak) if c["cycles"] else 0.0,
            detail=(f"{work.batch}x[{work.m}x{work.k}x{work.n}] on {c['rows']}x{c['cols']} "
                    f"{c['dataflow'].upper()} (x{c['pack']:g} packing), tile {c['tile'][0]}x{c['tile'][1]}"
                    + (f", M in chunks of {c['m_chunk']}" if c["m_chunk"] < work.m else "")
                    + (f", masked connections skip {work.skipped_macs:,} MACs" if work.skipped_macs else "")),
            skipped_macs=work.skipped_macs,
            gemm={"batch": work.batch, "m": work.m, "k": work.k, "n": work.n, "rows": c["rows"],
                  "cols": c["cols"], "dataflow": c["dataflow"], "pack": c["pack"], "tile": list(c["tile"])},
        )
    c = stream_cost(work, accel, nonlinear)
    bound = {"free": "free", "fused": "fused"}.get(work.kind) or ("compute" if c["compute"] >= c["memory"]
                                                                 else "memory")
    detail = ", ".join(f"{unit} {amount:,.0f}" for unit, amount in work.passes)
    return OpCost(
        name=name, op=op, layer=layer, unit=_UNIT_OF_KIND[work.kind], cycles=c["cycles"],
        compute_cycles=c["compute"], memory_cycles=c["memory"], bound=bound, bits=work.bits,
        ddr_bytes=work.ddr_bytes, onchip_bytes=work.onchip_bytes,
        energy_pj=energy_pj(accel, nonlinear, ddr_bytes=work.ddr_bytes, onchip_bytes=work.onchip_bytes,
                            passes=work.passes),
        detail=detail,
    )
