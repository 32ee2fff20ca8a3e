"""Golden IR: the canonical text of both printers on the tiny zoo models, and after each pass.

`pytest --update-golden` rewrites tests/golden/; review the diff like code.
"""

from __future__ import annotations

import pytest

from sliver import ir, passes

TINY = ["tiny_deit", "tiny_resnet", "tiny_mobilenet_v2", "tiny_vgg", "tiny_segmenter"]


@pytest.mark.parametrize("name", TINY)
def test_torch_printer(name, make_program, golden):
    golden(f"torch/{name}", make_program(name).text())


@pytest.mark.parametrize("name", TINY)
def test_onnx_printer(name, make_program, golden):
    golden(f"onnx/{name}", ir.to_onnx(make_program(name)).text())


def test_fold_bn_golden(make_program, golden):
    golden("torch/tiny_resnet_fold_bn", passes.parse("fold-bn").run(make_program("tiny_resnet")).program.text())


def test_text_is_deterministic_and_free_of_addresses(make_program):
    a = make_program("tiny_resnet").text()
    b = make_program("tiny_resnet", seed=5).text()  # other weights, same structure
    assert a == b
    assert "0x" not in a


def test_golden_harness_fails_on_a_changed_printer(make_program, tmp_path, monkeypatch):
    """A changed printer fails the comparison; updating the golden file restores it."""
    from conftest import golden_checker

    from sliver.ir import printer

    prog = make_program("tiny_vgg")
    golden_checker(str(tmp_path), update=True)("torch/tiny_vgg", prog.text())
    check = golden_checker(str(tmp_path), update=False)
    check("torch/tiny_vgg", prog.text())  # unchanged printer: passes
    real = printer.print_torch
    monkeypatch.setattr(printer, "print_torch", lambda p: real(p).replace("call_module", "call_mod"))
    with pytest.raises(pytest.fail.Exception, match="differs from golden"):
        check("torch/tiny_vgg", prog.text())
    golden_checker(str(tmp_path), update=True)("torch/tiny_vgg", prog.text())  # --update-golden
    check("torch/tiny_vgg", prog.text())
