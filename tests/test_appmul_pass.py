"""The appmul pass on a trained tiny ResNet: selection within the loss budget, real energy saved,
accuracy kept on digits, and typed errors for bad options."""

from __future__ import annotations

import pytest
import torch

from sliver import passes
from sliver.ir.errors import OptionValueError, PassError
from sliver.models import data
from sliver.passes.appmul import library
from sliver.passes.appmul.emulate import AppMulLayer
from trained import trained_program

torch.set_num_threads(2)


@torch.no_grad()
def _accuracy(module, images, targets):
    return 100.0 * float((module(images).argmax(1) == targets).float().mean())


@pytest.fixture(scope="module")
def result():
    program = trained_program("tiny_resnet")
    pipe = passes.parse("appmul{budget=0.0004 bits=5 images=64}")
    return program, pipe.run(program, data={"train": data.digits("train")}, seed=0, check=False)


def test_selection_respects_budget_and_saves_energy(result):
    _, res = result
    notes = res.report.steps[-1].notes
    rows = notes["layers"]
    assert len(rows) == 13 and all(r["bits"] == 5 for r in rows)
    assert notes["estimated_loss_increase"] <= 0.0004 + 1e-12
    lib = library.load()
    # the reported saving is recomputed from the library's energies and the layers' MACs
    exact = lib.exact(5, True).stats["energy"]
    total = sum(r["macs"] for r in rows) * exact
    used = sum(r["macs"] * lib[r["multiplier"]].stats["energy"] for r in rows)
    assert notes["multiplier_energy_saved"] == pytest.approx(1 - used / total, abs=1e-4)
    assert notes["multiplier_energy_saved"] > 0.1
    modules = {n: m for n, m in res.program.module.named_modules() if isinstance(m, AppMulLayer)}
    assert [modules[r["layer"]].multiplier_name for r in rows] == [r["multiplier"] for r in rows]
    assert "appmul" in res.program.facts


def test_accuracy_is_kept_on_digits(result):
    program, res = result
    test = data.digits("test")
    x, y = test.images[:200], test.targets[:200]
    gm = res.program.module
    approx = _accuracy(gm, x, y)
    layers = [m for m in gm.modules() if isinstance(m, AppMulLayer)]
    saved = [(m.multiplier, m.correction) for m in layers]
    for m in layers:
        m.set_multiplier(None)
    exact = _accuracy(gm, x, y)
    for m, (mult, corr) in zip(layers, saved):
        m.set_multiplier(mult, compensate=corr is not None)
        assert (corr is None) == (m.correction is None) and (corr is None or torch.equal(corr, m.correction))
    assert exact >= _accuracy(program.module, x, y) - 3.0  # 5-bit quantization itself
    assert approx >= exact - 2.0


def test_options_are_checked():
    with pytest.raises(OptionValueError, match="2..8"):
        passes.parse("appmul{bits=9}")
    with pytest.raises(OptionValueError, match="budget"):
        passes.parse("appmul{budget=-1}")
    assert str(passes.parse("appmul{budget=0.05 bits=5,6}")) == "appmul{budget=0.05 bits=5,6}"
    program = trained_program("tiny_resnet")
    with pytest.raises(PassError, match="one per layer"):
        passes.parse("appmul{bits=5,6 images=8}").run(program, data={"train": data.digits("train")}, check=False)
    with pytest.raises(PassError, match="needs data"):
        passes.parse("appmul{images=8}").run(program, check=False)
