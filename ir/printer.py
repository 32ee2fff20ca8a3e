"""Canonical text of a Program, one form per level.

The text is deterministic and carries structure only: node order, ops, attributes, shapes and
dtypes; never weight values or memory addresses. Golden tests compare it with files in
``tests/golden/``.

torch level::

    program tiny_resnet level=torch
    facts -
    module BasicBlock.0 = ...                      (composite leaf modules, defined once)
    input x : f32[1,3,32,32]
    %conv1 = call_module conv1 Conv2d(3, 16, kernel_size=(3, 3), ...)(%x) : f32[1,16,32,32]
    %add = call_function operator.add(%bn2, %relu) : f32[1,16,32,32]
    return %fc

onnx level::

    program tiny_resnet level=onnx opset=17
    facts -
    input input : f32[1,3,32,32]
    weight conv1.weight : f32[16,3,3,3]
    %/conv1/Conv_output_0 = Conv(%input, @conv1.weight, @conv1.bias) {group=1, ...} : f32[1,16,32,32]
    return %output : f32[1,10]
"""

from __future__ import annotations

import enum

import numpy as np

from .program import Program

_TORCH_DTYPES = {
    "float32": "f32", "float64": "f64", "float16": "f16", "bfloat16": "bf16",
    "int64": "i64", "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "b8",
}


def print_program(program: Program) -> str:
    if program.level == "torch":
        return print_torch(program)
    if program.level == "onnx":
        return print_onnx(program)
    return print_tvm(program)


def _header(program: Program, extra: str = "") -> list:
    facts = " ".join(sorted(program.facts)) or "-"
    return [f"program {program.name} level={program.level}{extra}", f"facts {facts}"]


# -- torch ------------------------------------------------------------------------------------
def _torch_type(meta) -> str:
    from torch.fx.passes.shape_prop import TensorMetadata

    if meta is None:
        return "?"
    if isinstance(meta, TensorMetadata):
        dtype = _TORCH_DTYPES.get(str(meta.dtype).replace("torch.", ""), str(meta.dtype))
        return f"{dtype}[{','.join(str(int(d)) for d in meta.shape)}]"
    if isinstance(meta, (tuple, list)):
        return "(" + ", ".join(_torch_type(m) for m in meta) + ")"
    if isinstance(meta, dict):
        return "{" + ", ".join(f"{k}: {_torch_type(v)}" for k, v in meta.items()) + "}"
    dtype = _TORCH_DTYPES.get(str(meta.dtype).replace("torch.", ""), str(meta.dtype))
    return f"{dtype}[{','.join(str(int(d)) for d in meta.shape)}]"


def _torch_arg(a) -> str:
    import torch
    import torch.fx

    if isinstance(a, torch.fx.Node):
        return f"%{a.name}"
    if isinstance(a, tuple):
        return "(" + ", ".join(_torch_arg(x) for x in a) + ("," if len(a) == 1 else "") + ")"
    if isinstance(a, list):
        return "[" + ", ".join(_torch_arg(x) for x in a) + "]"
    if isinstance(a, dict):
        return "{" + ", ".join(f"{k}: {_torch_arg(v)}" for k, v in a.items()) + "}"
    if isinstance(a, slice):
        return f"{_torch_arg(a.start)}:{_torch_arg(a.stop)}" + (f":{_torch_arg(a.step)}" if a.step is not None else "")
    if isinstance(a, (torch.dtype, torch.device, torch.memory_format, torch.layout)):
        return str(a)
    if isinstance(a, enum.Enum):
        return f"{type(a).__name__}.{a.name}"
    if a is Ellipsis:
        return "..."
    if isinstance(a, torch.Tensor):
        return f"tensor {_torch_type(a)}"
    return repr(a)


def module_structure(module) -> str:
    """One-line description of a leaf module: repr for torch's own leaves, nested child structure
    for composite ones."""
    children = list(module.named_children())
    if not children:
        extra = module.extra_repr()
        return f"{type(module).__name__}({extra})"
    parts = [f"{name}: {module_structure(child)}" for name, child in children]
    own = [f"{n}: param {_torch_type(p)}" for n, p in module.named_parameters(recurse=False)]
    extra = module.extra_repr()
    head = f"{type(module).__name__}({extra})" if extra else type(module).__name__
    return f"{head} {{" + ", ".join(own + parts) + "}"


def print_torch(program: Program) -> str:
    import torch.fx
    from torch.fx.node import _get_qualified_name

    gm = program.module
    lines = _header(program)
    defs: dict = {}  # structure -> label
    body = []
    for node in gm.graph.nodes:
        ty = _torch_type(node.meta.get("tensor_meta"))
        args = [_torch_arg(a) for a in node.args] + [f"{k}={_torch_arg(v)}" for k, v in node.kwargs.items()]
        if node.op == "placeholder":
            body.append(f"input {node.name} : {ty}")
        elif node.op == "output":
            body.append(f"return {_torch_arg(node.args[0])}")
        elif node.op == "get_attr":
            body.append(f"%{node.name} = get_attr {node.target} : {ty}")
        elif node.op == "call_module":
            sub = gm.get_submodule(node.target)
            structure = module_structure(sub)
            if list(sub.children()):
                if structure not in defs:
                    defs[structure] = f"{type(sub).__name__}.{sum(1 for v in defs if v.startswith(type(sub).__name__ + ' '))}"
                desc = defs[structure]
            else:
                desc = structure
            body.append(f"%{node.name} = call_module {node.target} {desc}({', '.join(args)}) : {ty}")
        elif node.op == "call_method":
            body.append(f"%{node.name} = call_method {node.target}({', '.join(args)}) : {ty}")
        else:
            target = _get_qualified_name(node.target) if callable(node.target) else str(node.target)
            target = target.replace("_operator.", "operator.")
            body.append(f"%{node.name} = call_function {target}({', '.join(args)}) : {ty}")
    for structure, label in defs.items():
        lines.append(f"module {label} = {structure}")
    return "\n".join(lines + body) + "\n"


# -- onnx -------------------------------------------------------------------------------------
def _onnx_type(elem: int, shape) -> str:
    from onnx import helper

    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(elem)).name
    except Exception:
        dtype = f"t{elem}"
    dtype = _TORCH_DTYPES.get(dtype, dtype)
    if shape is None:
        return f"{dtype}[?]"
    return f"{dtype}[{','.join(str(d) for d in shape)}]"


def _onnx_attr(attr) -> str:
    from onnx import AttributeProto, numpy_helper

    t = attr.type
    if t == AttributeProto.INT:
        return str(attr.i)
    if t == AttributeProto.FLOAT:
        return repr(float(np.float32(attr.f)))
    if t == AttributeProto.STRING:
        return repr(attr.s.decode("utf-8", "replace"))
    if t == AttributeProto.INTS:
        return "[" + ",".join(str(i) for i in attr.ints) + "]"
    if t == AttributeProto.FLOATS:
        return "[" + ",".join(repr(float(np.float32(f))) for f in attr.floats) + "]"
    if t == AttributeProto.STRINGS:
        return "[" + ",".join(repr(s.decode()) for s in attr.strings) + "]"
    if t == AttributeProto.TENSOR:
        return _const_text(numpy_helper.to_array(attr.t), attr.t.data_type)
    if t == AttributeProto.GRAPH:
        return f"<graph {attr.g.name} with {len(attr.g.node)} nodes>"
    return f"<attr type {t}>"


def _const_text(array: np.ndarray, elem: int) -> str:
    """Small integer constants are structure (shapes, axes) and are printed; other constants
    (weights, scales) are summarised by type."""
    ty = _onnx_type(elem, array.shape)
    if array.dtype.kind in "iub" and array.size <= 8:
        return f"{ty} {array.reshape(-1).tolist()}"
    return ty


def print_onnx(program: Program) -> str:
    model = program.module
    g = model.graph
    from .onnx_level import value_types

    types = value_types(model)
    opsets = " ".join(
        f"{o.domain or 'ai.onnx'}:{o.version}" for o in sorted(model.opset_import, key=lambda o: o.domain)
    )
    lines = _header(program, f" opset={opsets}")
    inits = {i.name for i in g.initializer}
    for vi in g.input:
        if vi.name not in inits:
            lines.append(f"input {vi.name} : {_onnx_type(*types[vi.name])}")
    from onnx import numpy_helper

    for init in g.initializer:
        size = int(np.prod(init.dims, dtype=np.int64))
        if size > 8 or (init.data_type in (1, 10, 11, 16) and size > 1):
            lines.append(f"weight {init.name} : {_onnx_type(init.data_type, tuple(init.dims))}")
        else:
            lines.append(f"const {init.name} : {_const_text(numpy_helper.to_array(init), init.data_type)}")
    for node in g.node:
        ins = ", ".join(("@" if name in inits else "%") + name if name else "_" for name in node.input)
        attrs = ", ".join(f"{a.name}={_onnx_attr(a)}" for a in sorted(node.attribute, key=lambda a: a.name))
        op = f"{node.domain}.{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
        outs = ", ".join(f"%{o}" for o in node.output)
        out_types = ", ".join(_onnx_type(*types.get(o, (0, None))) for o in node.output if o)
        lines.append(f"{outs} = {op}({ins})" + (f" {{{attrs}}}" if attrs else "") + f" : {out_types}")
    for vi in g.output:
        lines.append(f"return %{vi.name} : {_onnx_type(*types[vi.name])}")
    return "\n".join(lines) + "\n"


# -- tvm --------------------------------------------------------------------------------------
def print_tvm(program: Program) -> str:
    """TVMScript of the Relax module with constants shown as metadata references, not values."""
    text = program.module.script(show_meta=False)
    return "\n".join(_header(program)) + "\n" + text.rstrip() + "\n"
