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
import io
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


def trace(
    module: nn.Module,
    example_inputs,
    *,
    name: str | None = None,
    leaf_modules: Iterable[type] = (),
) -> Program:
    """Trace ``module`` into a torch-level :class:`Program`.

    The module is copied and put in eval mode; the caller's module is never modified.
    ``example_inputs`` (a tensor, an array or a sequence of them) fixes the static shapes.
    """
    if not isinstance(module, nn.Module):
        raise TraceError(f"trace() needs a torch.nn.Module, got {type(module).__name__}")
    arrays = as_numpy_inputs(example_inputs)
    root = copy.deepcopy(module).eval()
    tracer = SliverTracer(leaf_modules)
    try:
        graph = tracer.trace(root)
    except Exception as e:  # torch.fx raises many types; the user needs one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TraceError(
            f"torch.fx cannot trace {type(module).__name__}: {first}; make forward() free of "
            "data-dependent control flow, or pass leaf_modules=[TheClass] to keep that module whole"
        ) from None
    gm = torch.fx.GraphModule(root, graph, class_name=type(module).__name__)
    input_names = tuple(n.name for n in gm.graph.nodes if n.op == "placeholder")
    if len(input_names) != len(arrays):
        raise TraceError(
            f"{type(module).__name__}.forward takes {len(input_names)} input(s) "
            f"({', '.join(input_names)}) but {len(arrays)} example input(s) were given"
        )
    propagate_shapes(gm, arrays)
    return Program(
        level="torch",
        module=gm,
        example_inputs=arrays,
        name=name or type(module).__name__.lower(),
        input_names=input_names,
    )


def propagate_shapes(gm: torch.fx.GraphModule, arrays: Sequence) -> None:
    """Run ``gm`` once on ``arrays`` and store each node's output shape/dtype in its meta."""
    try:
        # ShapeProp prints a traceback before re-raising; the user gets one line instead
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            ShapeProp(gm).propagate(*as_torch_inputs(arrays))
    except Exception as e:
        cause = e.__cause__ if e.__cause__ is not None else e
        msg = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        shapes = ", ".join(str(tuple(a.shape)) for a in arrays)
        raise TraceError(
            f"the model does not run on example input(s) of shape {shapes}: {msg}; "
            "pass the input shape the model expects (--input-shape)"
        ) from None


def retrace(program: Program, gm: torch.fx.GraphModule) -> Program:
    """A torch-level Program for an edited GraphModule: recompiles, lints and re-runs shapes."""
    gm.graph.lint()
    gm.recompile()
    propagate_shapes(gm, program.example_inputs)
    return program.replace(module=gm)
