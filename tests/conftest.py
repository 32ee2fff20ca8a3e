"""Shared fixtures: the golden-IR harness and small programs.

Golden files live in tests/golden/. `pytest --update-golden` rewrites them from the current
printers; review the diff like code.
"""

from __future__ import annotations

import difflib
import os

import numpy as np
import pytest
import torch

GOLDEN_DIR = os.path.join(os.path.dirname(__file__), "golden")


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", help="rewrite tests/golden/ from the current output")


def golden_checker(directory: str, update: bool):
    """check(name, text): compare text with <directory>/<name>.txt, or rewrite it when updating."""

    def check(name: str, text: str) -> None:
        path = os.path.join(directory, name + ".txt")
        if update:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(text)
            return
        if not os.path.exists(path):
            pytest.fail(f"no golden file {path}; run pytest --update-golden and review it")
        with open(path) as f:
            expected = f.read()
        if text != expected:
            diff = "".join(
                difflib.unified_diff(
                    expected.splitlines(True), text.splitlines(True), "golden/" + name, "actual", n=1
                )
            )
            pytest.fail(f"IR differs from golden {name} (pytest --update-golden rewrites it):\n{diff[:6000]}")

    return check


@pytest.fixture
def golden(request):
    """golden(name, text): compare text with tests/golden/<name>.txt (or rewrite it)."""
    return golden_checker(GOLDEN_DIR, request.config.getoption("--update-golden"))


def example_input(shape, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def run_each(program, x):
    """Outputs of ``program`` (a Program or a TVM Artifact) on each image of ``x`` (batch 1), with
    the runner evaluate() uses: one ONNX Runtime session for an onnx-level program, where
    ``program.run`` builds a session per call (about 1 s each on the integer tiny DeiT; 360 of them
    on an AppMul program peaked above 20 GB)."""
    from sliver.backends.evaluate import _runner

    _, run = _runner(program, None)
    return np.concatenate([run(np.ascontiguousarray(x[i:i + 1], np.float32)) for i in range(len(x))])


@pytest.fixture
def make_program():
    """make_program(zoo_name, seed=0) -> torch-level Program of a zoo model with seeded weights."""
    from sliver import ir, models

    def make(name, seed=0, **options):
        torch.manual_seed(seed)
        net = models.create(name, **options)
        return ir.trace(net, example_input(models.input_shape(name, **options), seed), name=name)

    return make
