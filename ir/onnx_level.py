"""The onnx level: the deployment contract.

An onnx-level Program holds an ``onnx.ModelProto`` with static shapes on every value (checked by
``onnx.checker`` and strict shape inference). Passes edit it through onnx-graphsurgeon.

Two ways in:

- :func:`export` converts a torch-level Program (TorchScript-based exporter, opset >= 17, constants
  folded). Exporter-generated value names that carry a process-wide counter (``onnx::MatMul_123``)
  are renamed after the node that consumes them, so the same model always gives the same text.
- :func:`load` reads a user's ``.onnx`` file (never modifying it); dynamic dimensions must be fixed
  with ``input_shapes``.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import ExportError, ModelInputError, UnsupportedOpError
from .program import Program

DEFAULT_OPSET = 17
MIN_OPSET = 17
#: domain of sliver's own ops (shift-requantise, approximate matmul, ...)
SLIVER_DOMAIN = "sliver"


# -- shapes -----------------------------------------------------------------------------------
def infer_shapes(model: onnx.ModelProto, what: str = "model") -> onnx.ModelProto:
    """Strict shape inference; every value of the result has a static shape, or this raises."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except Exception as e:
        raise ExportError(f"ONNX shape inference failed on the {what}: {onnx_reason(e, last=True)}") from None
    return inferred


def value_types(model: onnx.ModelProto) -> dict:
    """Map value name -> (elem_type, shape tuple) for inputs, outputs, value_info and initializers."""
    types = {}
    g = model.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        t = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            continue
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim)
        types[vi.name] = (t.elem_type, dims if t.HasField("shape") else None)
    for init in g.initializer:
        types[init.name] = (init.data_type, tuple(init.dims))
    for node in g.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    types[node.output[0]] = (a.t.data_type, tuple(a.t.dims))
    return types


def onnx_reason(e: Exception, last: bool = False) -> str:
    """The reason in an onnx checker or shape-inference exception, without its bracketed
    exception tags (``[ShapeInferenceError]``, ``[ValidationError]``) and their boilerplate."""
    import re

    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    text = (lines[-1] if last else lines[0]) if lines else "unknown reason"
    text = re.sub(r"\[\w*(Error|Exception)\]\s*", "", text)
    text = re.sub(r"^Inference error\(s\):\s*", "", text)
    return text.strip() or "unknown reason"


def check_static(model: onnx.ModelProto) -> None:
    """Raise unless every node output has a known, static shape."""
    types = value_types(model)
    for node in model.graph.node:
        for out in node.output:
            if not out:
                continue
            elem, shape = types.get(out, (None, None))
            if shape is None or any(not isinstance(d, int) for d in shape):
                raise ExportError(
                    f"value {out!r} of node {node.name or node.op_type} ({node.op_type}) has no static "
                    "shape; sliver needs static shapes: fix the input shape (--input-shape)"
                )


def finalize(model: onnx.ModelProto, what: str = "model") -> onnx.ModelProto:
    """Check, infer shapes and check that they are static: the invariant of the onnx level.

    Where shape inference alone leaves a shape unknown because it is computed in the graph
    (``Shape -> Gather -> Concat -> Expand``, as exporters emit for ``x.shape[0]``), the shape
    arithmetic is folded into constants from the static input shapes first.
    """
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        raise ExportError(f"the {what} is not a valid ONNX model: {onnx_reason(e)}") from None
    model = infer_shapes(model, what)
    try:
        check_static(model)
    except ExportError as not_static:
        try:
            folded = fold_shape_arithmetic(model)
        except Exception:  # nothing to fold (or it does not evaluate): the shape stays unknown
            raise not_static from None
        model = infer_shapes(folded, what)
        check_static(model)
    return model


def fold_shape_arithmetic(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold every computation that depends only on constants and static shapes (onnx-graphsurgeon)."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(without_functions(model))
    graph.fold_constants(fold_shapes=True, error_ok=False).cleanup(remove_unused_graph_inputs=False).toposort()
    folded = gs.export_onnx(graph, do_type_check=True)
    folded.producer_name, folded.producer_version = model.producer_name, model.producer_version
    folded.ir_version = model.ir_version
    del folded.opset_import[:]
    folded.opset_import.extend(model.opset_import)
    restore_functions(folded, model)
    return folded


def without_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` without its model-local functions, for onnx-graphsurgeon, which does not
    round-trip them (it re-exports a body's ``Constant`` nodes as bare tensors, which ONNX Runtime
    refuses: "Invalid output count for op Constant"). The nodes calling them stay; graphsurgeon
    does not fold them (their domain has no kernel). :func:`restore_functions` puts them back."""
    if not model.functions:
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.functions[:]
    return copy


def restore_functions(out: onnx.ModelProto, model: onnx.ModelProto) -> None:
    """Give ``out`` (in place) ``model``'s function bodies that its graph still calls, unchanged."""
    called = {(n.domain, n.op_type) for n in out.graph.node}
    del out.functions[:]
    out.functions.extend(f for f in model.functions if (f.domain, f.name) in called)


# -- torch -> onnx ----------------------------------------------------------------------------
def _unshare_initializers(model: onnx.ModelProto) -> None:
    """Undo the exporter's sharing of equal initializers, in place.

    The TorchScript exporter stores equal tensors once and feeds the other users through
    ``Identity`` nodes; with freshly initialised weights (zero biases) that ties unrelated
    layers together. Each layer gets its own initializer back, so per-node statistics and the
    printed IR show every layer's weights where they are used."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    keep = []
    for node in g.node:
        if node.op_type == "Identity" and node.input[0] in inits and node.output[0] not in {o.name for o in g.output}:
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[node.input[0]])
            copy.name = node.output[0]
            g.initializer.append(copy)
        else:
            keep.append(node)
    if len(keep) != len(g.node):
        del g.node[:]
        g.node.extend(keep)


def _canonical_names(model: onnx.ModelProto) -> None:
    """Rename exporter counter names of constants (``onnx::Op_123``, ``sliver::Op_123``; initializers
    and ``Constant`` nodes) after their first consumer, in place."""
    g = model.graph
    consumers = {}
    for node in g.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, (node, i))
    renames = {}
    taken = {v for node in g.node for v in list(node.input) + list(node.output)}
    taken |= {i.name for i in g.initializer}
    constants = [i.name for i in g.initializer] + [n.output[0] for n in g.node if n.op_type == "Constant"]
    for name in constants:
        # the exporter's counter names: onnx::Op_123, and sliver::Op_123 for custom-op operands
        if name.split("::")[0] in ("onnx", "sliver") and "::" in name and name in consumers:
            node, i = consumers[name]
            new = f"{node.name or node.op_type}.input{i}"
            k = 1
            while new in taken:
                new = f"{node.name or node.op_type}.input{i}.{k}"
                k += 1
            taken.add(new)
            renames[name] = new
    for node in g.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
        if node.op_type == "Constant" and node.output[0] in renames:
            node.output[0] = renames[node.output[0]]
    for init in g.initializer:
        if init.name in renames:
            init.name = renames[init.name]


def export(program: Program, opset: int = DEFAULT_OPSET) -> Program:
    """Convert a torch-level Program to the onnx level (static shapes, constants folded)."""
    if program.level != "torch":
        raise ExportError(f"export() takes a torch-level program, got level {program.level}")
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old; sliver needs opset >= {MIN_OPSET}")
    try:
        model = _export_module(program, program.module, opset)
    except ExportError as first:
        # sizes computed inside kept-whole modules (window attention reshapes) can leave shapes
        # the exporter cannot fold; torch.export's graph has every size as a constant
        from .torch_level import static_graph

        try:
            static = static_graph(program.module, program.example_inputs)
        except Exception:
            raise first from None
        try:
            model = _export_module(program, static, opset)
        except ExportError:
            raise first from None
    return program.replace(level="onnx", module=model)


def _export_module(program: Program, gm, opset: int) -> onnx.ModelProto:
    import torch

    from .torch_level import as_torch_inputs

    inputs = as_torch_inputs(program.example_inputs)
    with torch.no_grad():
        outputs = gm(*inputs)
    n_out = len(outputs) if isinstance(outputs, (tuple, list)) else 1
    output_names = ["output"] if n_out == 1 else [f"output{i}" for i in range(n_out)]
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                gm,
                inputs,
                buf,
                dynamo=False,
                opset_version=opset,
                input_names=list(program.input_names),
                output_names=output_names,
                do_constant_folding=True,
            )
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"torch -> onnx export of {program.name} failed: {msg}") from None
    model = onnx.load_from_string(buf.getvalue())
    from .opdefs import attach_functions

    attach_functions(model)  # bodies of the custom ops the export emitted (sliver.AppMatMul)
    model.producer_name = "sliver"
    model.producer_version = ""
    model.graph.name = program.name
    _unshare_initializers(model)
    _canonical_names(model)
    model = finalize(model, f"exported {program.name}")
    return model


# -- user files -------------------------------------------------------------------------------
def load(
    path: str | os.PathLike,
    *,
    input_shapes: Mapping[str, Sequence[int]] | Sequence[int] | None = None,
    name: str | None = None,
    seed: int = 0,
) -> Program:
    """Load a user's ``.onnx`` file as an onnx-level Program (the file is only read).

    ``input_shapes`` fixes dynamic input dimensions: a mapping input name -> shape, or one shape
    when the model has one input. Example inputs are drawn from N(0, 1) under ``seed``.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelInputError(f"no such file: {path}; give a zoo model name or the path of an .onnx file")
    if os.path.isdir(path):
        raise ModelInputError(f"{path} is a directory; give the path of an .onnx file")
    try:
        with open(path, "rb") as f:
            data = f.read()
        model = onnx.load_from_string(data)
        if not model.graph.node and not model.graph.output:
            raise ValueError("empty graph")
    except Exception:
        raise ModelInputError(f"{path} is not an ONNX model (it does not parse as an ONNX ModelProto)") from None
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    newest = onnx.defs.onnx_opset_version()
    if opset > newest:
        raise ModelInputError(f"{path} uses opset {opset}, newer than the newest this onnx package knows ({newest}); "
                              f"re-export the model with an opset from {MIN_OPSET} to {newest}")
    if opset < MIN_OPSET:
        try:
            from onnx import version_converter

            model = version_converter.convert_version(model, MIN_OPSET)
        except Exception:
            raise ModelInputError(
                f"{path} uses opset {opset}; sliver needs >= {MIN_OPSET} and the conversion failed: "
                "re-export the model with a newer opset"
            ) from None
    _check_domains(model)
    _load_external_data(model, path)
    _lower_ir_version(model)
    _unique_node_names(model)
    inits = {i.name for i in model.graph.initializer}
    graph_inputs = [vi for vi in model.graph.input if vi.name not in inits]
    if len(graph_inputs) < len(model.graph.input):  # old style: initializers listed as inputs
        del model.graph.input[:]
        model.graph.input.extend(graph_inputs)
    shapes = _input_shapes(path, graph_inputs, input_shapes)
    for vi in graph_inputs:
        dims = vi.type.tensor_type.shape.dim
        del dims[:]
        for d in shapes[vi.name]:
            dims.add().dim_value = int(d)
    for vi in model.graph.output:  # symbolic output dims are re-inferred from the fixed inputs
        for d in vi.type.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                d.Clear()
    del model.graph.value_info[:]
    model = finalize(model, path)
    from .resources import check_fits, onnx_activation_bytes

    check_fits(onnx_activation_bytes(model), f"{path} at input shape(s) {', '.join(str(tuple(s)) for s in shapes.values())}",
               "fix smaller input dimensions with --input-shape")
    rng = np.random.default_rng(seed)
    examples = []
    for vi in graph_inputs:
        elem = vi.type.tensor_type.elem_type
        if elem != TensorProto.FLOAT:
            raise UnsupportedOpError(
                f"input {vi.name!r} of {path} has type {TensorProto.DataType.Name(elem)}; "
                "sliver compiles models with float32 inputs"
            )
        examples.append(rng.standard_normal(shapes[vi.name]).astype(np.float32))
    stem = os.path.splitext(os.path.basename(path))[0]
    return Program(
        level="onnx",
        module=model,
        example_inputs=tuple(examples),
        name=name or stem,
        input_names=tuple(vi.name for vi in graph_inputs),
    )


def _unique_node_names(model: onnx.ModelProto) -> None:
    """Give repeated node names a suffix (``conv``, ``conv.1``), in place: ONNX allows repeats,
    but ONNX Runtime and sliver's per-node reports need a name to mean one node."""
    seen = {n.name for n in model.graph.node if n.name}
    counts: dict = {}
    for node in model.graph.node:
        if not node.name or node.name not in counts:
            counts.setdefault(node.name, 0)
            continue
        k = counts[node.name] + 1
        while f"{node.name}.{k}" in seen:
            k += 1
        counts[node.name] = k
        node.name = f"{node.name}.{k}"
        seen.add(node.name)


def _lower_ir_version(model: onnx.ModelProto) -> None:
    """Set the IR version to the lowest one the model's opsets need, in place, when the file
    claims a newer one (files saved by a newer onnx package say IR 11+, which the ONNX Runtime
    sliver checks with may not read yet); kept when the model then fails the checker (it uses
    newer IR features)."""
    try:
        needed = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    except Exception:
        return
    if model.ir_version <= needed:
        return
    claimed = model.ir_version
    model.ir_version = needed
    try:
        onnx.checker.check_model(model)
    except Exception:
        model.ir_version = claimed


def _load_external_data(model: onnx.ModelProto, path: str) -> None:
    """Read tensors stored in external files, in place; only files inside the model's folder.

    Every location is checked before anything is read: a relative path that resolves (symbolic
    links included) to a regular file inside the folder of ``path``, with the tensor's
    offset and length inside that file. Anything else (an absolute path, ``..``, a link out of
    the folder) is refused, so a hostile model cannot make sliver read other files."""
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    folder = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    external = [t for t in _get_all_tensors(model) if uses_external_data(t)]
    for tensor in external:
        try:
            info = ExternalDataInfo(tensor)
        except Exception:
            raise ModelInputError(f"tensor {tensor.name!r} of {path} has malformed external-data fields; re-export the model") from None
        location = info.location or ""
        target = os.path.realpath(os.path.join(folder, location))
        inside = bool(location) and not os.path.isabs(location) and os.path.commonpath([folder, target]) == folder
        if not inside:
            raise ModelInputError(
                f"tensor {tensor.name!r} of {path} keeps its data at {location!r}, outside the model's folder; "
                "sliver reads external data only from the model's own folder: move the data file next to the model"
            )
        if not os.path.isfile(target):
            raise ModelInputError(f"tensor {tensor.name!r} of {path} keeps its data in {location!r}, which does not exist "
                                  "in the model's folder; copy the data file next to the model")
        size = os.path.getsize(target)
        offset = int(info.offset or 0)
        length = info.length
        if offset < 0 or offset > size or (length is not None and (length < 0 or offset + int(length) > size)):
            raise ModelInputError(f"tensor {tensor.name!r} of {path} points past the end of its data file {location!r}; "
                                  "the data file is truncated or belongs to another model: re-export the model")
    if not external:
        return
    from onnx.external_data_helper import load_external_data_for_model

    try:
        load_external_data_for_model(model, folder)
    except Exception:
        raise ModelInputError(f"the external data of {path} cannot be read; re-export the model") from None


def _check_domains(model: onnx.ModelProto) -> None:
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx", SLIVER_DOMAIN):
            raise UnsupportedOpError(
                f"node {node.name or node.op_type!r} uses op {node.domain}.{node.op_type} from a custom "
                "domain sliver does not know; export the model with standard ONNX ops"
            )


def _input_shapes(path, graph_inputs, given) -> dict:
    if given is not None and not isinstance(given, Mapping):
        if len(graph_inputs) != 1:
            names = ", ".join(vi.name for vi in graph_inputs)
            raise ModelInputError(f"{path} has {len(graph_inputs)} inputs ({names}); give a shape per input name")
        given = {graph_inputs[0].name: given}
    given = dict(given or {})
    unknown = set(given) - {vi.name for vi in graph_inputs}
    if unknown:
        raise ModelInputError(f"{path} has no input named {sorted(unknown)[0]!r}")
    shapes = {}
    for vi in graph_inputs:
        dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
        if vi.name in given:
            shape = tuple(int(d) for d in given[vi.name])
            if len(shape) != len(dims) or any(d is not None and d != s for d, s in zip(dims, shape)):
                raise ModelInputError(
                    f"input shape {shape} does not fit input {vi.name!r} of {path}, which is "
                    f"{tuple(d if d is not None else '?' for d in dims)}"
                )
        elif dims and all(d is not None for d in dims) and any(d <= 0 for d in dims):
            raise ModelInputError(
                f"input {vi.name!r} of {path} has shape {tuple(dims)} with a dimension <= 0; "
                "give positive dimensions with --input-shape"
            )
        elif any(d is None or d <= 0 for d in dims) or not dims:
            raise ModelInputError(
                f"input {vi.name!r} of {path} has dynamic shape "
                f"{tuple(d if d else '?' for d in dims)}; fix it with --input-shape"
            )
        else:
            shape = tuple(dims)
        shapes[vi.name] = shape
    return shapes


# -- small helpers passes use -----------------------------------------------------------------
def make_program(program: Program, model: onnx.ModelProto, what: str = "rewritten model") -> Program:
    """A new onnx-level Program for an edited model, after the level's checks."""
    return program.replace(module=finalize(model, what))


def initializer_array(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    return None


__all__ = [
    "DEFAULT_OPSET",
    "SLIVER_DOMAIN",
    "export",
    "load",
    "finalize",
    "infer_shapes",
    "value_types",
    "make_program",
    "initializer_array",
    "helper",
]
