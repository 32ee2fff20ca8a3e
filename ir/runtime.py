"""Reference runtimes of the levels: PyTorch eager for torch, ONNX Runtime for onnx.

They define what a Program computes; the pass manager's numerical checks and the backends'
correctness tests compare against them. (They live in ``ir`` rather than ``backends`` because the
pass manager needs them and ``passes`` may not import ``backends``.)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .errors import BackendError, UnsupportedOpError
from .program import Program


def run_program(program: Program, inputs: Sequence) -> list:
    if program.level == "torch":
        return run_torch(program, inputs)
    if program.level == "onnx":
        return run_onnxruntime(program, inputs)
    raise BackendError("a tvm-level program runs through sliver.backends.tvm.build(...).run(...)")


def _flatten(value) -> list:
    import torch

    if isinstance(value, torch.Tensor):
        return [value.detach().cpu().numpy()]
    if isinstance(value, (tuple, list)):
        return [a for v in value for a in _flatten(v)]
    if isinstance(value, dict):
        return [a for v in value.values() for a in _flatten(v)]
    return []


def run_torch(program: Program, inputs: Sequence) -> list:
    import torch

    from .torch_level import as_numpy_inputs, as_torch_inputs

    with torch.no_grad():
        out = program.module(*as_torch_inputs(as_numpy_inputs(inputs)))
    return _flatten(out)


def onnxruntime_session(model, threads: int | None = None):
    """An ONNX Runtime CPU session for a ModelProto; unsupported ops raise UnsupportedOpError."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise UnsupportedOpError(f"ONNX Runtime cannot load the model: {ort_message(e)}") from None


def ort_message(e: Exception) -> str:
    """The reason in an ONNX Runtime exception, without its ``[ONNXRuntimeError] : 1 : FAIL :``
    prefix and the C++ source location and function signature that follow it."""
    import re

    text = str(e).strip().splitlines()[0] if str(e).strip() else "unknown failure"
    text = re.sub(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*", "", text)
    located = re.search(r"\S+\.(cc|h|cpp):\d+\s", text)
    if located:  # "path.cc:256 ns::Func(args...) reason": drop up to the signature's last ')'
        rest = text[located.end():]
        depth, cut = 0, 0
        for i, ch in enumerate(rest):
            if ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
                if depth == 0:
                    cut = i + 1
                    break
        text = rest[cut:].strip() or text
    return text


def run_onnxruntime(program: Program, inputs: Sequence) -> list:
    from .torch_level import as_numpy_inputs

    sess = onnxruntime_session(program.module)
    arrays = as_numpy_inputs(inputs)
    feeds = {i.name: a for i, a in zip(sess.get_inputs(), arrays)}
    try:
        return [np.asarray(o) for o in sess.run(None, feeds)]
    except Exception as e:
        raise BackendError(f"ONNX Runtime failed to run {program.name}: {ort_message(e)}") from None


def max_abs_diff(a: Sequence, b: Sequence) -> float:
    """Largest absolute difference between two lists of outputs (inf if their shapes differ)."""
    if len(a) != len(b):
        return float("inf")
    worst = 0.0
    for x, y in zip(a, b):
        x, y = np.asarray(x), np.asarray(y)
        if x.shape != y.shape:
            return float("inf")
        if x.size:
            worst = max(worst, float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))))
    return worst
