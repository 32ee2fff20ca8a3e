"""cleanup: onnx-level tidying with onnx-graphsurgeon.

In order: constant folding (every node whose inputs are all constants becomes a constant; this
also folds the shape arithmetic exporters emit), removal of no-op nodes (Identity, inference
Dropout, Cast to the same type, Reshape/Flatten/Squeeze/Unsqueeze to the same shape), removal of
dead nodes and unused initializers, and a topological sort. The result computes the same values
(checked by the pass manager against ONNX Runtime).

sliver's custom ops (``sliver.ShiftRequant``, ``sliver.AppMatMul``, ...) are kept as they are:
their nodes are never folded, and their model-local function bodies are carried over unchanged
(onnx-graphsurgeon re-exports function bodies with their ``Constant`` nodes turned into bare
tensors, which ONNX Runtime refuses).
"""

from __future__ import annotations

import dataclasses

import onnx_graphsurgeon as gs

from ..ir.onnx_level import make_program, restore_functions, value_types, without_functions
from ..ir.program import Program
from .infra.base import Pass, option, register
from .infra.facts import CLEAN

_SHAPE_NOOPS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Expand")


@dataclasses.dataclass
class CleanupOptions:
    fold_constants: bool = option(True, "evaluate nodes whose inputs are all constants")
    remove_noops: bool = option(True, "remove Identity, Dropout, same-type Cast, same-shape Reshape & co.")


@register
class Cleanup(Pass):
    name = "cleanup"
    level = "onnx"
    summary = "constant folding, no-op and dead-node removal, topological sort (onnx-graphsurgeon)"
    provides = (CLEAN,)
    check_tolerance = 1e-6
    Options = CleanupOptions

    def run(self, program: Program, ctx) -> Program:
        model = program.module
        types = value_types(model)
        nodes_before = len(model.graph.node)
        graph = gs.import_onnx(without_functions(model))
        if self.options.fold_constants:
            graph.fold_constants(error_ok=False)
        graph.cleanup(remove_unused_graph_inputs=False)
        removed = _remove_noops(graph, types) if self.options.remove_noops else 0
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        out = gs.export_onnx(graph, do_type_check=True)
        out.producer_name, out.producer_version = model.producer_name, model.producer_version
        out.ir_version = model.ir_version
        del out.opset_import[:]
        out.opset_import.extend(model.opset_import)
        restore_functions(out, model)
        ctx.record("nodes_before", nodes_before)
        ctx.record("nodes_after", len(out.graph.node))
        ctx.record("noops_removed", removed)
        return make_program(program, out, f"{program.name} after cleanup")


def _is_noop(node: gs.Node, types: dict) -> bool:
    if node.op == "Identity":
        return True
    if node.op == "Dropout":
        return len(node.outputs) == 1 or not node.outputs[1].outputs
    if not node.inputs or not node.outputs:
        return False
    src, dst = node.inputs[0], node.outputs[0]
    src_t, dst_t = types.get(src.name), types.get(dst.name)
    if src_t is None or dst_t is None:
        return False
    if node.op == "Cast":
        return src_t[0] == dst_t[0]
    if node.op in _SHAPE_NOOPS:
        return src_t == dst_t
    return False


def _remove_noops(graph: gs.Graph, types: dict) -> int:
    removed = 0
    outputs = set(id(t) for t in graph.outputs)
    for node in list(graph.nodes):
        if not _is_noop(node, types):
            continue
        src, dst = node.inputs[0], node.outputs[0]
        if id(dst) in outputs:
            if src.inputs and id(src) not in outputs and not isinstance(src, gs.Constant) and src not in graph.inputs:
                # the graph output keeps its name: let the producer write it directly
                producer = src.inputs[0]
                producer.outputs = [dst if t is src else t for t in producer.outputs]
                for consumer in list(src.outputs):
                    if consumer is not node:
                        consumer.inputs = [dst if t is src else t for t in consumer.inputs]
                node.outputs.clear()
                node.inputs.clear()
                removed += 1
            continue
        for consumer in list(dst.outputs):
            consumer.inputs = [src if t is dst else t for t in consumer.inputs]
        node.outputs.clear()
        node.inputs.clear()
        removed += 1
    return removed
