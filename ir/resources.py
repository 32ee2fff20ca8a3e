"""Refusing inputs that cannot fit in memory before any work starts.

Every level runs a program on its example inputs (tracing propagates shapes with a real run,
the onnx level checks passes with ONNX Runtime), and an input shape of, say, 1x3x20000x20000
would only fail after minutes of swapping, or be killed by the kernel. :func:`check_fits`
compares an estimate of the bytes the activations take with the memory this machine has
(:func:`available_memory`) and raises :class:`~sliver.ir.errors.ResourceError` with that estimate on one line.

The estimate is the sum of the sizes of every activation (all node outputs plus the inputs):
an upper bound on what a run needs at once, and what sliver's own interpreters may hold (the
fx shape propagation keeps every value it computed). It is computed without allocating them:
from the static shapes of an onnx graph, or from a run of the torch module on fake tensors.
"""

from __future__ import annotations

import logging
import math
import os

import numpy as np

from .errors import ResourceError

__all__ = ["available_memory", "check_fits", "onnx_activation_bytes", "torch_activation_bytes", "format_bytes"]

#: the share of the memory the activations of one run may take: a compile holds several sets
#: at once (the example inputs drawn in float64, the reference outputs, ONNX Runtime's arena
#: and the outputs each pass check compares), measured at about 4x the sum on a 1e6-image batch
MEMORY_SHARE = 0.25


def available_memory() -> int:
    """Bytes of memory a run may plan for: ``$SLIVER_MEMORY_LIMIT`` (bytes) if set, else the
    machine's physical memory (MemTotal). Not MemAvailable: what other processes hold at the
    moment changes from second to second, and a shape that fits the machine must not be refused
    because the machine happens to be busy."""
    env = os.environ.get("SLIVER_MEMORY_LIMIT")
    if env and env.isdigit():
        return int(env)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 1 << 62


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


def check_fits(nbytes: int, what: str, fix: str) -> None:
    """Raise ResourceError when ``nbytes`` of activations would not fit in available memory."""
    limit = available_memory()
    if nbytes > MEMORY_SHARE * limit:
        raise ResourceError(
            f"{what} needs about {format_bytes(nbytes)} of activations and a compile holds about "
            f"{round(1 / MEMORY_SHARE)} such sets at once, more than the {format_bytes(limit)} of memory "
            f"this machine has; {fix}"
        )


_ELEM_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}


def onnx_activation_bytes(model) -> int:
    """Sum of the sizes of the graph inputs and every value with a known static shape."""
    g = model.graph
    total = 0
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        t = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in t.shape.dim]
        total += math.prod(max(d, 0) for d in dims) * _ELEM_BYTES.get(t.elem_type, 4)
    return total


def torch_activation_bytes(module, shape, dtype=None) -> int | None:
    """Sum of the sizes of the input and of every leaf module's tensor outputs for one run on
    an input of ``shape``, computed on fake tensors (nothing is allocated); None when the module
    does not run on that shape (tracing then reports why)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    dtype = dtype or torch.float32
    total = [math.prod(shape) * torch.empty((), dtype=dtype).element_size()]

    def count(_module, _inputs, output):
        for t in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(t, torch.Tensor):
                total[0] += t.numel() * t.element_size()

    leaves = [m for m in module.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    log = logging.getLogger("torch._subclasses.fake_tensor")  # it logs a traceback per failed op
    level, log.level = log.level, logging.CRITICAL
    was_training = module.training
    module.eval()  # no running-statistics updates on the real buffers
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
            module(torch.empty(tuple(int(d) for d in shape), dtype=dtype))
    except Exception:
        return None
    finally:
        module.train(was_training)
        log.setLevel(level)
        for h in hooks:
            h.remove()
    return int(total[0])


def check_input_shape(module, shape, what: str = "the model") -> None:
    """Refuse an input ``shape`` whose activations in ``module`` would not fit in memory."""
    shape = tuple(int(d) for d in shape)
    input_bytes = math.prod(shape) * np.dtype(np.float32).itemsize
    fix = "use a smaller --input-shape"
    check_fits(input_bytes, f"input shape {shape} of {what}", fix)  # before touching the module
    nbytes = torch_activation_bytes(module, shape)
    if nbytes is not None:
        check_fits(nbytes, f"input shape {shape} of {what}", fix)
