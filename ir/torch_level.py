"""The torch level: tracing a ``torch.nn.Module`` into a ``torch.fx.GraphModule`` Program.

Tracing keeps the modules a compiler pass wants to see as single ``call_module`` nodes:

- torch's own leaf modules (Conv2d, BatchNorm2d, Linear, LayerNorm, ...), so Conv+BN and Linear
  stay recognisable;
- transformer blocks and attention modules, recognised by their structure (see
  :func:`is_attention` and :func:`is_transformer_block`), so token-pruning passes can insert a
  selector before block ``k`` and swap a block's attention without unpicking its reshapes;
- any module class the caller lists in ``leaf_modules``.

After tracing, every node carries its output shape and dtype (``node.meta["tensor_meta"]``) from a
run on the example inputs; the printer and the statistics read them.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import warnings
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from .errors import TraceError
from .program import Program


def is_attention(module: nn.Module) -> bool:
    """A multi-head attention module: an integer ``num_heads`` attribute and Linear children
    (the layout of timm's ``Attention`` and sliver's zoo)."""
    return isinstance(getattr(module, "num_heads", None), int) and any(
        isinstance(child, nn.Linear) for child in module.children()
    )


def is_transformer_block(module: nn.Module) -> bool:
    """A transformer block: has an attention child and a LayerNorm child."""
    children = list(module.children())
    return any(is_attention(c) for c in children) and any(isinstance(c, nn.LayerNorm) for c in children)


class SliverTracer(torch.fx.Tracer):
    """fx tracer that keeps transformer blocks, attention and listed classes as leaves."""

    def __init__(self, leaf_modules: Iterable[type] = ()):
        super().__init__()
        self.extra_leaves = tuple(leaf_modules)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.extra_leaves and isinstance(m, self.extra_leaves):
            return True
        if is_transformer_block(m) or is_attention(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def as_numpy_inputs(example_inputs) -> tuple:
    """Normalise one tensor/array or a sequence of them into a tuple of float32 numpy arrays."""
    if isinstance(example_inputs, (torch.Tensor, np.ndarray)):
        example_inputs = (example_inputs,)
    arrays = []
    for x in example_inputs:
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        x = np.asarray(x)
        if x.dtype == np.float64:
            x = x.astype(np.float32)
        arrays.append(x)
    return tuple(arrays)


def as_torch_inputs(arrays: Sequence) -> tuple:
    return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)


def _concrete_defaults(module: nn.Module, n_inputs: int) -> dict:
    """The optional ``forward`` arguments past the example inputs, fixed at their defaults.

    timm 1.0's ``forward(x, attn_mask=None, is_causal=False)`` is traced as ``forward(x)``: the
    defaults become concrete arguments, so control flow on them (``if attn_mask is not None``)
    takes the default path and they are not graph inputs."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    concrete = {}
    for p in positional[n_inputs:]:
        if p.default is inspect.Parameter.empty:
            return {}  # a required argument without an example input: reported after tracing
        concrete[p.name] = p.default
    return concrete


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _fx_trace(root: nn.Module, leaf_modules, concrete: dict) -> torch.fx.GraphModule:
    tracer = SliverTracer(leaf_modules)
    graph = tracer.trace(root, concrete_args=concrete or None)
    gm = torch.fx.GraphModule(root, graph, class_name=type(root).__name__)
    if concrete:  # fx keeps a placeholder per fixed argument, guarded by asserts: drop both
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        fixed = placeholders[len(placeholders) - len(concrete):]
        for node in fixed:  # fx substituted the value itself; the placeholder only feeds guards
            for user in _guard_users(node):
                gm.graph.erase_node(user)
            if not node.users:
                gm.graph.erase_node(node)
        gm.recompile()
    return gm


def _guard_users(node: torch.fx.Node) -> list:
    """fx's specialisation guards on a concrete argument (``x == v`` then ``_assert``), users
    first, so that erasing them in order is valid."""
    guards = []
    for user in list(node.users):
        name = getattr(user.target, "__name__", "")
        if name in ("_assert_is_none", "_assert"):
            guards.append(user)
        elif name == "eq" and all(getattr(u.target, "__name__", "") == "_assert" for u in user.users):
            guards.extend(list(user.users) + [user])
    return guards


def _export_trace(root: nn.Module, arrays, concrete: dict) -> torch.fx.GraphModule:
    """torch.export's graph (aten ops, every size static) as a GraphModule."""
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        ep = torch.export.export(root, as_torch_inputs(arrays), kwargs=concrete or None, strict=False)
        gm = ep.module()
    # an unlifted exported module flattens its inputs with pytree code; a plain fx graph with one
    # placeholder per tensor input is what the rest of sliver expects
    flat = torch.fx.GraphModule(gm, _plain_graph(gm), class_name=type(root).__name__)
    return flat


def _plain_graph(gm: torch.fx.GraphModule) -> torch.fx.Graph:
    """``gm``'s graph without the pytree in/out specs (positional tensor inputs, tensor output)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = copy.deepcopy(gm.graph)
    graph._codegen = torch.fx.graph.CodeGen()
    for node in list(graph.nodes):
        if node.op == "call_module" and "_guards" in str(node.target):
            graph.erase_node(node)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for node in placeholders:
        if not node.users:
            graph.erase_node(node)
    output = next(n for n in graph.nodes if n.op == "output")
    value = output.args[0]
    if isinstance(value, (tuple, list)) and len(value) == 1:
        output.args = (value[0],)
    graph.lint()
    return graph


def trace(
    module: nn.Module,
    example_inputs,
    *,
    name: str | None = None,
    leaf_modules: Iterable[type] = (),
    method: str = "auto",
) -> Program:
    """Trace ``module`` into a torch-level :class:`Program`.

    The module is copied and put in eval mode; the caller's module is never modified.
    ``example_inputs`` (a tensor, an array or a sequence of them) fixes the static shapes.
    Optional ``forward`` arguments past the example inputs keep their defaults.

    ``method``: ``"fx"`` (torch.fx symbolic tracing, which keeps transformer blocks and attention
    whole for the passes that rewrite them), ``"export"`` (``torch.export``: an aten-level graph in
    which every size is a constant, for models torch.fx cannot trace, such as window attention
    with size-dependent control flow) or ``"auto"``: fx, and export where fx fails. The path taken
    is :func:`trace_method` of the result (and ``module.meta["trace_fallback_reason"]`` why).
    """
    if not isinstance(module, nn.Module):
        raise TraceError(f"trace() needs a torch.nn.Module, got {type(module).__name__}")
    if method not in ("auto", "fx", "export"):
        raise TraceError(f"trace method {method!r} is not one of auto, fx, export")
    arrays = as_numpy_inputs(example_inputs)
    root = copy.deepcopy(module).eval()
    concrete = _concrete_defaults(root, len(arrays))
    gm, used, fx_error = None, None, None
    if method in ("auto", "fx"):
        try:
            gm, used = _fx_trace(root, leaf_modules, concrete), "fx"
        except Exception as e:  # torch.fx raises many types; the user needs one line
            fx_error = _first_line(e)
            if method == "fx":
                raise TraceError(
                    f"torch.fx cannot trace {type(module).__name__}: {fx_error}; make forward() free of "
                    "data-dependent control flow, pass leaf_modules=[TheClass] to keep that module "
                    "whole, or trace with method='export'"
                ) from None
    if gm is None:
        try:
            gm, used = _export_trace(root, arrays, concrete), "export"
        except Exception as e:
            export_error = _first_line(e)
            why = f"torch.fx: {fx_error}; torch.export: {export_error}" if fx_error else f"torch.export: {export_error}"
            raise TraceError(
                f"cannot trace {type(module).__name__} with torch.fx nor with torch.export ({why}); "
                "make forward() free of data-dependent control flow, pass leaf_modules=[TheClass] to "
                "keep that module whole, or export the model to ONNX yourself and compile the .onnx file"
            ) from None
    input_names = tuple(n.name for n in gm.graph.nodes if n.op == "placeholder")
    if len(input_names) != len(arrays):
        raise TraceError(
            f"{type(module).__name__}.forward takes {len(input_names)} input(s) "
            f"({', '.join(input_names)}) but {len(arrays)} example input(s) were given"
        )
    propagate_shapes(gm, arrays)
    gm.meta["trace_method"] = used
    if fx_error:
        gm.meta["trace_fallback_reason"] = fx_error
    return Program(
        level="torch",
        module=gm,
        example_inputs=arrays,
        name=name or type(module).__name__.lower(),
        input_names=input_names,
    )


def static_graph(gm: torch.fx.GraphModule, arrays) -> torch.fx.GraphModule:
    """``gm`` re-traced by torch.export: the same computation with every size a constant (the
    ONNX exporter's fallback when sizes computed in the graph leave shapes unknown)."""
    return _export_trace(gm, arrays, {})


def trace_method(program: Program) -> str:
    """How a torch-level program was traced: ``"fx"`` or ``"export"`` (torch.export fallback)."""
    return getattr(program.module, "meta", {}).get("trace_method", "fx")


def propagate_shapes(gm: torch.fx.GraphModule, arrays: Sequence, rewritten: bool = False) -> None:
    """Run ``gm`` once on ``arrays`` and store each node's output shape/dtype in its meta.
    ``rewritten``: ``gm`` is a pass's rewrite of a program that ran on ``arrays``, so a failure is
    the rewrite's fault, not the input shape's."""
    try:
        # ShapeProp prints a traceback before re-raising; the user gets one line instead
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            ShapeProp(gm).propagate(*as_torch_inputs(arrays))
    except Exception as e:
        cause = e.__cause__ if e.__cause__ is not None else e
        msg = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        shapes = ", ".join(str(tuple(a.shape)) for a in arrays)
        if rewritten:
            raise TraceError(
                f"the rewritten model no longer runs on its example input(s) of shape {shapes}: {msg}; "
                "the pass does not fit a module of this model (report it with the model's layout)"
            ) from None
        raise TraceError(
            f"the model does not run on example input(s) of shape {shapes}: {msg}; "
            "pass the input shape the model expects (--input-shape)"
        ) from None


def retrace(program: Program, gm: torch.fx.GraphModule) -> Program:
    """A torch-level Program for an edited GraphModule: recompiles, lints and re-runs shapes."""
    gm.graph.lint()
    gm.recompile()
    propagate_shapes(gm, program.example_inputs, rewritten=True)
    return program.replace(module=gm)
