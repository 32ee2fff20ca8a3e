"""The tvm level: a Relax IRModule imported from an onnx-level Program.

Import goes through ``tvm.relax.frontend.onnx.from_onnx`` (TVM 0.27). Ops the importer does not
know are found before import, from its converter table, and reported with the node that uses them.
Lowering rules for sliver's custom-domain ops plug in through :data:`CUSTOM_IMPORTERS`
(filled by ``sliver.backends``), keyed by op type.
"""

from __future__ import annotations

from .errors import BackendError, UnsupportedOpError
from .program import Program

#: op_type -> converter class with ``_impl_v1`` (the TVM ONNX frontend's converter protocol);
#: backends register lowering rules for sliver's custom ops here.
CUSTOM_IMPORTERS: dict = {}


def _converter_table() -> dict:
    # TVM 0.27 has no public hook for extra ONNX ops (an unknown op raises OpNotImplemented); its
    # table is this private function. This is the one place sliver touches it.
    from tvm.relax.frontend.onnx import onnx_frontend

    return onnx_frontend._get_convert_map()


def unsupported_nodes(model) -> list:
    """(node name, op) of every node TVM's ONNX importer cannot convert."""
    table = _converter_table()
    bad = []
    for node in model.graph.node:
        if node.op_type not in table and node.op_type not in CUSTOM_IMPORTERS:
            bad.append((node.name or node.output[0], f"{node.domain + '.' if node.domain else ''}{node.op_type}"))
    return bad


def check_importable(program: Program) -> None:
    bad = unsupported_nodes(program.module)
    if bad:
        ops = sorted({op for _, op in bad})
        raise UnsupportedOpError(
            f"TVM cannot import op {ops[0]} (node {bad[0][0]!r}"
            + (f", and {len(bad) - 1} more node(s) with ops {', '.join(ops)}" if len(bad) > 1 else "")
            + "); replace it with standard ONNX ops or register a lowering for it"
        )


def import_onnx(program: Program) -> Program:
    """Lower an onnx-level Program to a Relax IRModule (weights embedded as constants)."""
    if program.level != "onnx":
        raise BackendError(f"import_onnx() takes an onnx-level program, got level {program.level}")
    check_importable(program)
    from tvm.relax.frontend.onnx import onnx_frontend

    table = _converter_table()
    saved = onnx_frontend._get_convert_map
    patched = dict(table, **CUSTOM_IMPORTERS)
    try:
        if CUSTOM_IMPORTERS:
            onnx_frontend._get_convert_map = lambda: patched
        shape_dict = {n: list(a.shape) for n, a in zip(program.input_names, program.example_inputs)}
        mod = onnx_frontend.from_onnx(program.module, shape_dict=shape_dict, keep_params_in_input=False)
    except UnsupportedOpError:
        raise
    except Exception as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise BackendError(f"TVM's ONNX importer failed on {program.name}: {msg}") from None
    finally:
        onnx_frontend._get_convert_map = saved
    return program.replace(level="tvm", module=mod)
